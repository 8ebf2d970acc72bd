"""The seed and held-out formats users have, read into `SeedPair`s (what the loop trains and measures on).

One JSON object per line, in any of these shapes (a file may mix them):
- `{"instruction", "response"}`, humpback's own `seed.jsonl` among them (its `id`, `source` and `license`
  are kept);
- Alpaca's `{"instruction", "input", "output"}`: a non-empty `input` follows the instruction after a blank
  line, as Alpaca's prompt puts it;
- OpenAI chat `{"messages": [...]}`: the first user message and the assistant's reply to it (system
  messages skipped; later turns ignored, as the paper takes first turns);
- oasst1: `humpback data oasst1` writes `seed.jsonl` and `heldout.jsonl` in the first shape.

Where a line gives none, the id is derived from the pair's text (`SeedPair.make`: the same pair gets the
same id in every run), the source is the file's name and the license `unknown`. A line that is no pair
comes back as a `Rejected` naming the file, line and field, never as an exception: the caller writes it
to an errors file and goes on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.corpus import Lines, check_input
from humpback.contracts import InputError, Rejected, SeedPair, read_jsonl, write_jsonl
from humpback.data.records import cap_seed

log = logging.getLogger(__name__)

UNKNOWN_LICENSE = "unknown"
FORMATS = ('{"instruction", "response"}, {"instruction", "input", "output"} (Alpaca) or {"messages": [...]} '
           "(OpenAI chat)")
_EXCERPT = 80


class PairError(ValueError):
    """A line that is no pair: which field, and what is wrong with it."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _text(obj: dict[str, Any], field: str, where: str = "") -> str:
    value = obj.get(field)
    if value is None:
        raise PairError(where + field, "missing")
    if isinstance(value, list):  # OpenAI content parts: the text ones, joined
        value = "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(value, str):
        raise PairError(where + field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise PairError(where + field, "is empty")
    return value


def _chat_turn(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise PairError("messages", "expected a list of {role, content} objects")
    turns = [(i, m) for i, m in enumerate(messages) if m.get("role") != "system"]
    if len(turns) < 2 or turns[0][1].get("role") != "user" or turns[1][1].get("role") != "assistant":
        raise PairError("messages", "expected a user message, then the assistant's reply")
    (i, user), (j, assistant) = turns[:2]
    return _text(user, "content", f"messages[{i}]."), _text(assistant, "content", f"messages[{j}].")


def pair_of(obj: Any, source: str) -> SeedPair:
    """The pair one parsed line holds (see the module docstring); `PairError` where it holds none."""
    if not isinstance(obj, dict):
        raise PairError(None, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        instruction, response = _chat_turn(obj["messages"])
    elif "instruction" in obj:
        instruction = _text(obj, "instruction")
        response = _text(obj, "output" if "output" in obj and "response" not in obj else "response")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise PairError("input", f"expected a string, got {type(extra).__name__}")
        if extra and extra.strip():
            instruction = f"{instruction.strip()}\n\n{extra.strip()}"
    else:
        raise PairError("instruction", f"missing: expected {FORMATS}")
    given = {k: obj[k] for k in ("source", "license") if isinstance(obj.get(k), str) and obj[k].strip()}
    pair = SeedPair.make(instruction, response, given.get("source", source), given.get("license", UNKNOWN_LICENSE))
    if isinstance(obj.get("id"), str) and obj["id"].strip():  # humpback's own files: keep the id it gave
        pair = pair.model_copy(update={"id": obj["id"]})
    return pair


def read_user_pairs(path: Path) -> Iterator[tuple[int, SeedPair | Rejected]]:
    """(line, pair) for each line of `path`, or (line, `Rejected`) naming the field and reason (blank lines
    skipped). A file that cannot be read at all raises `InputError` naming it and the fix."""
    check_input(path)
    lines = Lines(path)
    for lineno, raw in lines:
        if raw is None:
            yield lineno, Rejected(source=str(path), line=lineno, reason="line over 1 MiB")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, Rejected(source=str(path), line=lineno, reason=f"invalid UTF-8 at byte {exc.start}")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, Rejected(source=str(path), line=lineno, reason=f"invalid JSON: {exc.msg} (column "
                                   f"{exc.colno})", excerpt=text[:_EXCERPT])
            continue
        try:
            yield lineno, pair_of(obj, path.stem)
        except PairError as exc:
            yield lineno, Rejected(source=str(path), line=lineno, field=exc.field, reason=exc.reason,
                                   excerpt=text[:_EXCERPT])
    broken = lines.broken()
    if broken is not None:
        yield broken.line, broken


def describe(rejected: Rejected) -> str:
    """One line for a person: file, line, field and what is wrong."""
    field = f", field {rejected.field!r}" if rejected.field else ""
    return f"{rejected.source} line {rejected.line}{field}: {rejected.reason}"


def read_pairs_file(path: Path, what: str, rejected: list[Rejected], taken: dict[str, str]) -> list[SeedPair]:
    """The pairs of a seed or held-out file (`what` names which) that are not in `taken` (id -> where
    it was read), which it extends; every other line goes to `rejected`. `InputError` when the file cannot
    be read or no pair is left."""
    pairs = []
    for line, rec in read_user_pairs(path):
        if isinstance(rec, Rejected):
            rejected.append(rec)
        elif rec.id in taken:
            rejected.append(Rejected(source=str(path), line=line, reason=f"the same pair as {taken[rec.id]}",
                                     excerpt=rec.instruction[:_EXCERPT]))
        else:
            taken[rec.id] = f"{path} line {line}"
            pairs.append(rec)
    if not pairs:
        raise InputError(f"{path}: no {what} pair in {FORMATS}" + (f" ({describe(rejected[-1])})" if rejected else ""))
    return pairs


def import_pairs(seed: Path, heldout: Path | None, out: Path, max_seed: int | None) -> dict[str, Any]:
    """The user's seed and held-out files as humpback's `seed.jsonl`, `heldout.jsonl` and `seed_rest.jsonl`
    (the seed pairs past `max_seed`) in `out`; lines that are no pair, and seed pairs that repeat a held-out
    pair (the models would be measured on what they trained on), go to `errors.jsonl`, one warning each.
    What the loop's data stage records."""
    rejected: list[Rejected] = []
    taken: dict[str, str] = {}
    held = read_pairs_file(heldout, "held-out", rejected, taken) if heldout is not None else []
    kept, rest = cap_seed(read_pairs_file(seed, "seed", rejected, taken), max_seed)
    files = {"seed": out / "seed.jsonl", "heldout": out / "heldout.jsonl" if heldout is not None else None,
             "seed_rest": out / "seed_rest.jsonl", "errors": out / "errors.jsonl"}
    for name, records in (("seed", kept), ("heldout", held), ("seed_rest", rest), ("errors", rejected)):
        if files[name] is not None:
            write_jsonl(files[name], records)
    for r in rejected:
        log.warning("%s (left out; see %s)", describe(r), files["errors"])
    return {**{k: None if v is None else str(v) for k, v in files.items()},
            "pairs": {"seed": len(kept), "heldout": len(held), "seed_rest": len(rest), "rejected": len(rejected)}}


def split_calibration(rest: Path, out: Path, count: int, seed: int = 0) -> int:
    """Move `count` pairs (a seeded draw, kept in file order) from the seed side's rest (`seed_rest.jsonl`)
    to `out`: the pairs the `combined` scorer is calibrated on. Moved rather than copied, so that no reader
    of the rest (M_yx's short examples) trains on them; the held-out pairs never held them. The number moved."""
    pairs = read_jsonl(rest, SeedPair) if rest.is_file() else []
    picked = set(random.Random(seed).sample(range(len(pairs)), min(count, len(pairs))))
    write_jsonl(out, [p for i, p in enumerate(pairs) if i in picked])
    write_jsonl(rest, [p for i, p in enumerate(pairs) if i not in picked])
    return len(picked)
