"""The fault suite's table: each test marked `fault` records what it did to the system and what came
out (records lost and duplicated, services healthy afterwards). `pytest -m fault` prints the table at
the end; with HUMPBACK_FAULT_REPORT=FILE it is also written there as Markdown (docs/reliability.md is
filled from it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

REPORT_ENV = "HUMPBACK_FAULT_REPORT"


@dataclass(frozen=True)
class FaultRow:
    fault: str  # what was done
    sees: str  # what the user sees
    records: int | str = "-"  # records (segments, jobs, requests) exposed to the fault
    lost: int | str = "-"
    duplicated: int | str = "-"
    healthy_after: str = "-"  # which services answered /health (or the run exited 0) afterwards
    seconds: float | None = None


ROWS: list[FaultRow] = []
HEADER = ("fault", "what the user sees", "records", "lost", "duplicated", "healthy afterwards", "seconds")


def markdown(rows: list[FaultRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = [getattr(row, f.name) for f in fields(row)]
        cells[-1] = "-" if row.seconds is None else f"{row.seconds:.1f}"
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report() -> Path | None:
    target = os.environ.get(REPORT_ENV)
    if not target or not ROWS:
        return None
    path = Path(target)
    path.write_text(markdown(ROWS), encoding="utf-8")
    return path
