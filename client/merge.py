"""`humpback merge`: join the outputs of a sharded run (`--shard I/N`, `client.shard`) into one, and
prove that together they are the unsharded run's output: every kept segment exactly once.

The shards' journals (candidates, scored candidates, or curated sets) are read line by line and
written to one JSONL file in order (shard by shard, line by line), each record once:
- records are keyed by their `custom_id` (the content id of the request that made them); a line
  without one (a curated chat example) is keyed by its own content;
- the same `custom_id` twice with the same content (the same shard merged twice, or a shard copied
  back twice) is written once and counted as a duplicate;
- the same `custom_id` with different content means two runs answered the same request: shards
  that overlapped (different N, or one shard run twice with a sampling temperature). Nothing is
  written then (`InputError` naming both lines): which answer to keep is the user's choice;
- a line that is not a JSON object, or whose `custom_id` is not hex (a torn write of a killed
  shard), is skipped, counted and written to `<out>.errors.jsonl`; a re-run of its shard redoes it.

Every shard proves what it is from its own summary (`<shard>.summary.json`, or the summary of the
curate run whose `<out>.scored.jsonl` it is), which records its `I/N`, for every task (augment,
curate, rewrite): the merge checks that the shards are one set, each `I` of one `N` exactly once
(`missing_shards`, `repeated_shards`), that each summary names its shard (`unproven_shards`), that
each shard's last run had no failed request (`shards_failed`: see its `<shard>.failed.jsonl`) and
that they ran the same model and checkpoint (`settings_differ`), and that every record is one its
shard owns: a record of another shard's (another run, other settings) is not written; it goes to
`<out>.errors.jsonl` and is counted as `foreign`. `proven(summary)` is whether the merged file is
the unsharded run's output by all of these; `humpback merge` exits 3 when it is not.

With the corpus (and the run's preparation and generation settings, `--limit` included), `merge`
also recomputes the `custom_id`s the unsharded `augment` would have asked for, with augment's own
code (`prepared_segments`, `AugmentTask.request`), and compares: ids no shard holds are listed in
`<out>.missing.jsonl` with their segment's source and, where a shard's `<shard>.failed.jsonl` names
them, why they failed; ids no segment asks for (`unexpected`: a shard run with other settings or
another corpus) in `<out>.unexpected.jsonl`. The model name is part of every id: unset, it is the
one model the shards' candidates name.

Memory grows with the number of records (one pair of ints per record), never with their size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, cast

from client.augment import AugmentConfig, AugmentTask, load_demonstrations, prepared_segments
from client.corpus import Corpus, Lines, check_input, open_corpora
from client.extras import MergeExtra, ShardSetNames
from client.journal import LineWriter, output_lock
from client.prepare import PrepareConfig, Preparer
from client.runner import RunSummary, side_path
from client.shard import Shard, in_shard
from humpback.contracts import Failure, InputError, OutputError, Rejected, SeedPair, Source

PathLike = str | os.PathLike[str]

# How many missing or unexpected ids the summary names (all of them are in the side files).
SHOWN = 10


@dataclass(frozen=True)
class Line:
    """One record line of a shard: where it is, its key, and a digest of its content."""

    shard: Path
    lineno: int
    custom_id: str | None  # None: keyed by content
    digest: int
    model: str | None  # the `model` (a candidate) or `scorer_model` (a scored candidate) it names
    raw: bytes


def _digest(obj: Any) -> int:
    """64 bits of a hash of a record's canonical JSON: two lines are the same record when their JSON is
    the same whatever its key order or spacing."""
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big")


def _hex_id(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        int(value, 16)
    except ValueError:
        return None
    return value


def shard_lines(shard: Path, errors: LineWriter | None, counts: Counter[str]) -> Iterator[Line]:
    """The record lines of one shard output; the others go to `errors` (when given) and are counted as
    `counts["corrupt_lines"]`."""
    lines = Lines(shard, max_bytes=None)
    for lineno, raw in lines:
        assert raw is not None  # no size limit
        if not raw.strip():
            continue
        reason = None
        try:
            obj = json.loads(raw)
        except ValueError:
            obj, reason = None, "not JSON (a torn or overwritten line)"
        if reason is None and not isinstance(obj, dict):
            reason = "not a JSON object"
        cid = None
        if reason is None and "custom_id" in obj:
            cid = _hex_id(obj["custom_id"])
            if cid is None:
                reason = "custom_id is not a hex content id"
        if reason is not None:
            counts["corrupt_lines"] += 1
            if errors is not None:
                errors.write(Rejected(source=str(shard), line=lineno, reason=f"not a record: {reason}",
                                      excerpt=raw[:80].decode("utf-8", "replace")).model_dump_json())
            continue
        model = obj.get("model", obj.get("scorer_model"))
        yield Line(shard, lineno, cid, _digest(obj), model if isinstance(model, str) and model else None,
                   raw if raw.endswith(b"\n") else raw + b"\n")
    broken = lines.broken()
    if broken is not None:
        counts["corrupt_lines"] += 1
        if errors is not None:
            errors.write(broken.model_dump_json())


def _key(line: Line) -> int:
    """The key a record is merged by: its custom_id as an int (128 bits), or, for a line without one,
    its digest offset past every 128-bit id (so the two kinds of key cannot meet)."""
    return int(line.custom_id, 16) if line.custom_id is not None else (1 << 128) + line.digest


def _first(shards: Sequence[Path], custom_id: str) -> Line | None:
    """The first line that holds `custom_id` (read again: only an error needs it, so no record's place
    is kept in memory)."""
    for shard in shards:
        for line in shard_lines(shard, None, Counter()):
            if line.custom_id == custom_id:
                return line
    return None


@dataclass
class Joined:
    """What joining the shards found: the key and digest of every record written, the models the
    records name (their `model`, or a scored record's `scorer_model`), and counts."""

    seen: dict[int, int] = field(default_factory=dict)
    models: Counter[str] = field(default_factory=Counter)
    per_shard: dict[str, int] = field(default_factory=dict)


def join(shards: Sequence[Path], dst: BinaryIO, errors: LineWriter, summary: RunSummary,
         owners: dict[Path, Shard] | None = None) -> Joined:
    """Write every record of `shards` once to `dst`; raise `InputError` on two
    different records under one custom_id. A record whose shard (`owners`: shard output -> its I/N)
    does not own its custom_id is not written: it goes to `errors` and is counted as `foreign`."""
    joined = Joined()
    summary.results["foreign"] = 0
    for shard in shards:
        written = 0
        owner = (owners or {}).get(shard)
        for line in shard_lines(shard, errors, summary.input):
            summary.input["records"] += 1
            if owner is not None and line.custom_id is not None and not in_shard(line.custom_id, owner):
                summary.results["foreign"] += 1
                errors.write(Rejected(source=str(shard), line=line.lineno, reason=(
                    f"custom_id {line.custom_id} is not in shard {owner}, which this file's summary says it is: a "
                    "record of another run or other settings; not merged"),
                    excerpt=line.raw[:80].decode("utf-8", "replace")).model_dump_json())
                continue
            key = _key(line)
            known = joined.seen.get(key)
            if known is not None:
                if known != line.digest:
                    first = _first(shards, line.custom_id or "")
                    where = f"{first.shard} line {first.lineno}" if first is not None else "an earlier line"
                    raise InputError(f"{line.shard} line {line.lineno}: custom_id {line.custom_id} is also in "
                                     f"{where} with different content: two runs answered the same request (shards "
                                     "that overlap: the same shard run twice, or shards of different N). Keep one "
                                     "of the two files' lines and merge again; nothing was written")
                summary.results["duplicates"] += 1
                continue
            joined.seen[key] = line.digest
            if line.model is not None:
                joined.models[line.model] += 1
            dst.write(line.raw)
            written += 1
        joined.per_shard[str(shard)] = written
        summary.results["written"] += written
    return joined


def shard_summary(shard: Path) -> Path:
    """Where the summary of the run that wrote `shard` is: `<shard>.summary.json`, or, for a curate
    run's scored journal (`<out>.scored.jsonl`), `<out>.summary.json`."""
    own = side_path(shard, "summary.json")
    if not own.is_file() and shard.name.endswith(".scored.jsonl"):
        return shard.with_name(shard.name[:-len(".scored.jsonl")] + ".summary.json")
    return own


@dataclass
class ShardSet:
    """What the shards' own summaries prove about them as a set (`prove_shard_set`)."""

    owners: dict[Path, Shard] = field(default_factory=dict)
    count: int | None = None
    missing: list[int] = field(default_factory=list)  # indices of the I/N set no shard is
    repeated: list[int] = field(default_factory=list)  # indices two shard outputs claim
    unproven: list[str] = field(default_factory=list)  # shard outputs whose summary names no I/N (or of another N)
    failed: dict[str, int] = field(default_factory=dict)  # shard -> requests its last run failed
    settings: dict[str, list[str]] = field(default_factory=dict)  # model/checkpoint -> the values the shards name

    def record(self, summary: RunSummary[MergeExtra]) -> None:
        """Count what this set lacks in `summary` (results) and name it (`extra.shard_set`)."""
        summary.results.update(missing_shards=len(self.missing), repeated_shards=len(self.repeated),
                               unproven_shards=len(self.unproven), shards_failed=len(self.failed),
                               settings_differ=len(self.settings))
        summary.extra.shard_set = ShardSetNames(count=self.count, missing=self.missing, repeated=self.repeated,
                                                unproven=self.unproven, failed=self.failed, settings=self.settings)


def prove_shard_set(shards: Sequence[Path]) -> ShardSet:
    """Read each shard's summary (`shard_summary`) and check the shards are one complete I/N set of one
    run's settings, each index once, none with failed requests (see the module docstring)."""
    found = ShardSet()
    named: dict[str, set[str]] = {"model": set(), "checkpoint": set()}
    for shard in shards:
        try:
            data = json.loads(shard_summary(shard).read_text(encoding="utf-8"))
            spec = Shard.parse(data["extra"]["shard"])
        except (OSError, ValueError, KeyError, TypeError):
            found.unproven.append(str(shard))
            continue
        if found.count is None:
            found.count = spec.count
        if spec.count != found.count:
            found.unproven.append(str(shard))
            continue
        if spec in found.owners.values():
            found.repeated.append(spec.index)
        found.owners[shard] = spec
        results, extra = data.get("results") or {}, data.get("extra") or {}
        if results.get("failed"):
            found.failed[str(shard)] = int(results["failed"])
        for key in named:
            if isinstance(extra.get(key), str):
                named[key].add(extra[key])
    held = {s.index for s in found.owners.values()}
    found.missing = [i for i in range(found.count or 0) if i not in held]
    found.settings = {k: sorted(v) for k, v in named.items() if len(v) > 1}
    return found


def proven(summary: RunSummary) -> bool:
    """Whether a merge's `summary` proves its output is the unsharded run's: a complete shard set of
    one run with no failed request and no foreign record, and, where the corpus was checked, no id
    missing or unexpected."""
    r = summary.results
    return not any(r.get(k) for k in ("missing_shards", "repeated_shards", "unproven_shards", "shards_failed",
                                      "settings_differ", "foreign", "missing", "unexpected"))


class _Discard:
    """Where the corpus's rejected records go when merge reads it: nowhere (the shards reported them)."""

    def write(self, line: str) -> None:
        pass


@dataclass(frozen=True)
class UnshardedRun:
    """What the unsharded augment run read: its corpora (checked, not yet read), its preparation, and
    its generation settings with the demonstrations they pick."""

    corpora: list[Corpus]
    prepare: PrepareConfig | None
    config: AugmentConfig
    demonstrations: tuple[SeedPair, ...]

    @classmethod
    def open(cls, corpus: Iterable[PathLike], config: AugmentConfig, prepare: PrepareConfig | None,
             text_field: str = "text") -> UnshardedRun:
        """Check every file first (`InputError` naming each that cannot be used), as augment does."""
        return cls(open_corpora(corpus, text_field), prepare, config, load_demonstrations(config))


def expected_requests(run: UnshardedRun, model: str) -> Iterator[tuple[str, Source]]:
    """(custom_id, source) of every request the unsharded `augment` asks `model`: the same corpus reader,
    preparation, `--limit` and request building (`AugmentTask.request`), so the ids cannot drift
    from augment's. Rejected corpus records were reported by the shards and are not reported again."""
    task = AugmentTask(model, None, run.config, run.demonstrations)
    segments = prepared_segments(run.corpora, Preparer(run.prepare), cast(LineWriter, _Discard()), RunSummary())
    for _, seg in islice(segments, run.config.limit):
        yield task.request(seg).custom_id, seg.source


def _model(config: AugmentConfig, joined: Joined) -> str:
    """The model the ids are computed for: `config.model`, else the one model the records name."""
    if config.model is not None:
        return config.model
    if len(joined.models) == 1:
        return next(iter(joined.models))
    named = ", ".join(repr(m) for m in sorted(joined.models)) or "none"
    raise InputError(f"the shards' records name {len(joined.models)} models ({named}): pass --model, the served "
                     "model name the shards ran with (it is part of every custom_id)")


def failure_reasons(shards: Sequence[Path]) -> dict[str, str]:
    """custom_id -> why it failed, for every id a shard's `<shard>.failed.jsonl` names (the failures of
    each shard's last run: few, so they are held, and the missing ids can be written as they are found)."""
    reasons: dict[str, str] = {}
    for shard in shards:
        failed = side_path(shard, "failed.jsonl")
        if not failed.is_file():
            continue
        with open(failed, "rb") as f:
            for line in f:
                try:
                    rec = Failure.model_validate_json(line)
                except ValueError:
                    continue
                reasons[rec.custom_id] = f"failed in {shard}: {rec.reason}"
    return reasons


def check_complete(shards: Sequence[Path], out: Path, joined: Joined, expected: Iterable[tuple[str, Source]],
                   summary: RunSummary[MergeExtra]) -> None:
    """Compare the joined records with the `expected` requests: write `<out>.missing.jsonl` and
    `<out>.unexpected.jsonl` (none when empty) and count both in `summary`."""
    reasons = failure_reasons(shards)
    summary.results.update(expected=0, missing=0, missing_failed=0, unexpected=0)
    wanted: set[int] = set()
    missing: list[str] = []  # the first SHOWN, for the summary
    with LineWriter(side_path(out, "missing.jsonl")) as w:
        for cid, source in expected:
            key = int(cid, 16)
            if key in wanted:
                continue  # a segment repeated in the corpus (dedup off) is one request
            wanted.add(key)
            if key in joined.seen:
                continue
            summary.results["missing"] += 1
            summary.results["missing_failed"] += cid in reasons
            if len(missing) < SHOWN:
                missing.append(cid)
            w.write(json.dumps({"custom_id": cid, "source": source.model_dump(mode="json"),
                                "reason": reasons.get(cid, "in no shard's output")}, ensure_ascii=False))
    unexpected = (f"{key:032x}" for key in joined.seen if key < 1 << 128 and key not in wanted)
    shown: list[str] = []
    with LineWriter(side_path(out, "unexpected.jsonl")) as w:
        for cid in unexpected:
            summary.results["unexpected"] += 1
            if len(shown) < SHOWN:
                shown.append(cid)
            w.write(json.dumps({"custom_id": cid}))
    summary.results["expected"] = len(wanted)
    summary.extra.missing = missing
    summary.extra.unexpected = shown


def merge(shards: Sequence[PathLike], out: PathLike, corpus: Sequence[PathLike] | None = None,
          config: AugmentConfig | None = None, prepare: PrepareConfig | None = None,
          text_field: str = "text") -> RunSummary[MergeExtra]:
    """Join the shard outputs `shards` into `out` (rewritten), each record once; with `corpus`, check
    them against the requests the unsharded augment run asks for (`config`: its model, sampling,
    demonstrations and `limit`; `prepare`: its preparation; see the module docstring).

    Raises `InputError` (nothing written) for a shard that cannot be read, `out` among the shards, two
    different records under one custom_id, or no model to compute the ids for. The summary
    (`<out>.summary.json`) counts `records` read and `corrupt_lines` skipped, and `written`,
    `duplicates`, `foreign` and what the shards' summaries prove (`missing_shards`, `repeated_shards`,
    `unproven_shards`, `shards_failed`, `settings_differ`, named in `extra.shard_set`) and, with
    `corpus`, `expected`, `missing` (`missing_failed` of them named in a shard's failures file) and
    `unexpected`; `extra.shards` is the records each shard gave. `proven(summary)` says whether
    all of it proves the merged file is the unsharded run's output.
    """
    paths = [Path(s) for s in shards]
    out = Path(out)
    problems = []
    for path in paths:
        try:
            check_input(path)
        except InputError as exc:
            problems.append(str(exc))
    if any(p.resolve() == out.resolve() for p in paths if p.exists()):
        problems.append(f"{out}: the output is also a shard to merge; choose another --out")
    if not paths:
        problems.append("no shard outputs to merge: name each shard's --out file")
    if problems:
        raise InputError("\n".join(problems))
    unsharded = None if corpus is None else UnshardedRun.open(corpus, config or AugmentConfig(), prepare, text_field)
    with output_lock(out):
        return _merge(paths, out, unsharded)


def _merge(shards: list[Path], out: Path, unsharded: UnshardedRun | None) -> RunSummary[MergeExtra]:
    summary = RunSummary(extra=MergeExtra())
    start = time.monotonic()
    summary.input.update(shards=len(shards), records=0, corrupt_lines=0)
    summary.results.update(written=0, duplicates=0)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shard_set = prove_shard_set(shards)
        shard_set.record(summary)
        with LineWriter(side_path(out, "errors.jsonl")) as errors, open(tmp, "wb") as dst:
            joined = join(shards, dst, errors, summary, shard_set.owners)
        if unsharded is not None:
            model = _model(unsharded.config, joined)
            summary.extra.model = model
            check_complete(shards, out, joined, expected_requests(unsharded, model), summary)
        os.replace(tmp, out)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{exc.filename or out}: {exc.strerror or exc}; {out} was not replaced") from exc
    finally:
        tmp.unlink(missing_ok=True)
    summary.extra.shards = joined.per_shard
    summary.elapsed_s = time.monotonic() - start
    summary.write(side_path(out, "summary.json"))
    return summary
