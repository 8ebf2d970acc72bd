"""The `humpback` subcommands this package registers, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

from humpback.cli import main
from tests.client.fake_server import FakeServer


def test_augment_then_curate_cli(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    cands, curated = tmp_path / "cands.jsonl", tmp_path / "curated.jsonl"
    assert main(["augment", "--corpus", str(corpus), "--out", str(cands), "--endpoint", fake.url,
                 "--no-progress", "--no-near-dedup"]) == 0
    assert len(cands.read_text().splitlines()) == 30
    assert main(["curate", "--candidates", str(cands), "--out", str(curated), "--endpoint", fake.url,
                 "--no-progress", "--min-score", "1"]) == 0
    assert len(curated.read_text().splitlines()) == 30
    summary = json.loads((tmp_path / "curated.summary.json").read_text())
    assert summary["extra"]["selected"] == 30


def test_batch_export_cli(corpus: Path, tmp_path: Path) -> None:
    req = tmp_path / "req.jsonl"
    assert main(["batch", "export", "augment", "--corpus", str(corpus), "--out", str(req), "--model", "m"]) == 0
    lines = [json.loads(x) for x in req.read_text().splitlines()]
    assert len(lines) == 30 and set(lines[0]) == {"custom_id", "method", "url", "body"}
