"""The data builds: `demo` (Debian documentation: seed Q/A, held-out split, prose corpus) and `oasst1`.

Both share the seed pipeline: length filter, dedup by normalized instruction and by normalized response,
a hash-based held-out split that never reshuffles, then `seed.jsonl`, `heldout.jsonl`, `seed_rest.jsonl`
(the seed pairs past `max_seed`), `LICENSES.md` and `manifest.json`. A file that fails to parse is recorded in the manifest and the build goes on.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

from humpback.data.catalog import CORPUS_SOURCES, SEED_SOURCES, DocSource
from humpback.data.debian_faq import debian_faq_pairs
from humpback.data.pod import perlfaq_pairs
from humpback.data.prose import documents
from humpback.contracts import CorpusDoc, OasstError, ParseFailure, SeedPair, normalize, text_id, write_jsonl
from humpback.data.records import cap_seed, split_bucket
from humpback.data.rst import parse_rst
from humpback.data.text import qa_pairs
from humpback.settings import setting

T = TypeVar("T")

log = logging.getLogger(__name__)


class BuildConfig(BaseModel):
    """Settings of a data build (`humpback data demo|oasst1` flags are generated from them)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = setting(Path("data/demo"), "output directory")
    root: Path = setting(Path("/"), "filesystem root the Debian paths are read under (a fixture tree in tests)")
    min_answer_chars: int = setting(
        100, "keep seed pairs whose response has at least this many characters "
        "(the paper's seed responses average 1,072±818)")
    max_answer_chars: int = setting(3000, "keep seed pairs whose response has at most this many characters")
    min_instruction_chars: int = setting(10, "keep seed pairs whose instruction has at least this many characters")
    max_instruction_chars: int = setting(1000, "keep seed pairs whose instruction has at most this many characters")
    heldout_fraction: float = setting(
        0.1, "share of pairs held out for evaluation, chosen by a hash of the pair's id so a pair never changes "
        "side between builds", ge=0, lt=1)
    max_seed: int | None = setting(
        None, "keep at most this many seed pairs after the held-out split (the ones with the smallest id hash, so "
        "every source stays represented; default: all); the held-out side is the same whatever max_seed is")
    min_doc_chars: int = setting(200, "drop corpus documents shorter than this (the segmenter keeps 600+ anyway)")
    max_corpus_docs: int | None = setting(
        None, "keep at most this many corpus documents (smallest content hash; default: all)")

    @model_validator(mode="after")
    def _answer_bounds(self) -> BuildConfig:
        if self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_answer_chars is larger than max_answer_chars")
        return self


@dataclass
class SourceCounts:
    """Per-source counts for the manifest and the printed table."""

    files: int = 0
    failed_files: int = 0
    parsed: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    seed: int = 0
    heldout: int = 0
    chars: int = 0


# --- seed ------------------------------------------------------------------------------------------

def _pairs_of(src: DocSource, text: str) -> list[tuple[str, str]]:
    if src.format == "pod":
        return perlfaq_pairs(text)
    if src.format == "rst":
        return qa_pairs(parse_rst(text))
    return debian_faq_pairs(text)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="strict")


def _parsed_files(sources: Iterable[DocSource], cfg: BuildConfig, counts: dict[str, SourceCounts],
                  failures: list[ParseFailure], parse: Callable[[DocSource, str], list[T]],
                  ) -> Iterator[tuple[DocSource, SourceCounts, Path, list[T]]]:
    """(source, its counts, file, parsed items) of every installed file of `sources`, in sorted order.

    A file the parser fails on is recorded in `failures` and skipped: the build goes on.
    """
    for src in sources:
        c = counts.setdefault(src.name, SourceCounts())
        files = src.files(cfg.root)
        if not files:
            log.warning("%s: no files (is the Debian package %s installed?)", src.name, src.package)
        for path in files:
            c.files += 1
            try:
                items = parse(src, _read(path))
            except Exception as exc:  # any parser error: record the file and go on
                c.failed_files += 1
                failures.append(ParseFailure(source=src.name, file=str(path), reason=f"{type(exc).__name__}: {exc}"))
                continue
            c.parsed += len(items)
            yield src, c, path, items


def collect_seed(cfg: BuildConfig, counts: dict[str, SourceCounts], failures: list[ParseFailure],
                 ) -> Iterator[SeedPair]:
    """Every (question, answer) of the installed FAQ sources, in sorted file order."""
    for src, c, _, pairs in _parsed_files(SEED_SOURCES, cfg, counts, failures, _pairs_of):
        for question, answer in pairs:
            if question.strip() and answer.strip():
                yield SeedPair.make(question, answer, src.name, src.license)
            else:
                c.dropped["empty"] += 1


def filter_pairs(pairs: Iterable[SeedPair], cfg: BuildConfig, counts: dict[str, SourceCounts]) -> list[SeedPair]:
    """Pairs of sensible length, the first of each normalized instruction and of each normalized response."""
    seen_q: set[str] = set()
    seen_a: set[str] = set()
    kept: list[SeedPair] = []
    for p in pairs:
        c = counts.setdefault(p.source, SourceCounts())
        reason = None
        if not cfg.min_answer_chars <= len(p.response) <= cfg.max_answer_chars:
            reason = "answer_too_short" if len(p.response) < cfg.min_answer_chars else "answer_too_long"
        elif not cfg.min_instruction_chars <= len(p.instruction) <= cfg.max_instruction_chars:
            reason = "instruction_length"
        else:
            q, a = normalize(p.instruction), normalize(p.response)
            if q in seen_q or a in seen_a:
                reason = "duplicate"
            seen_q.add(q)
            seen_a.add(a)
        if reason:
            c.dropped[reason] += 1
            continue
        kept.append(p)
        c.kept += 1
    return kept


def split_pairs(pairs: list[SeedPair], cfg: BuildConfig, counts: dict[str, SourceCounts],
                ) -> tuple[list[SeedPair], list[SeedPair], list[SeedPair]]:
    """(seed, held-out, rest), each in input order. The held-out side is chosen first, by a hash of each
    id, so it never depends on `max_seed`; `max_seed` then keeps the seed pairs of smallest id hash, and
    the others are the rest (never held-out pairs: a model may still learn from them)."""
    seed, heldout = [], []
    for p in pairs:
        (heldout if split_bucket(p.id) < cfg.heldout_fraction else seed).append(p)
    seed, rest = cap_seed(seed, cfg.max_seed)
    for p in rest:
        counts[p.source].dropped["over_max_seed"] += 1
    for side, held in ((seed, False), (heldout, True)):
        for p in side:
            c = counts[p.source]
            c.heldout += held
            c.seed += not held
            c.chars += len(p.instruction) + len(p.response)
    return seed, heldout, rest


# --- corpus ----------------------------------------------------------------------------------------

def collect_corpus(cfg: BuildConfig, counts: dict[str, SourceCounts], failures: list[ParseFailure],
                   ) -> Iterator[CorpusDoc]:
    """Documents of the installed documentation, sorted file order, exact duplicates and short ones dropped."""
    seen: set[bytes] = set()
    def parse(src: DocSource, text: str) -> list[tuple[str, str]]:
        return documents(text, src.format)

    for src, c, path, docs in _parsed_files(CORPUS_SOURCES, cfg, counts, failures, parse):
        rel = path.relative_to(cfg.root).as_posix()
        for title, text in docs:
            if len(text) < cfg.min_doc_chars:
                c.dropped["too_short"] += 1
                continue
            key = hashlib.sha256(normalize(text).encode("utf-8")).digest()
            if key in seen:
                c.dropped["duplicate"] += 1
                continue
            seen.add(key)
            yield CorpusDoc(text=text, source=src.name, title=title, license=src.license, path=rel)


def _cap_corpus(docs: Iterable[CorpusDoc], cfg: BuildConfig, counts: dict[str, SourceCounts]) -> Iterator[CorpusDoc]:
    if cfg.max_corpus_docs is None:
        yield from docs
        return
    order = {src.name: i for i, src in enumerate(CORPUS_SOURCES)}
    total = Counter[str]()

    def key(d: CorpusDoc) -> str:
        total[d.source] += 1
        return text_id(d.text)

    # Smallest content hashes: a sample spread over every source, holding only `max_corpus_docs` in memory.
    chosen = heapq.nsmallest(cfg.max_corpus_docs, docs, key=key)
    kept = Counter(d.source for d in chosen)
    for name, n in total.items():
        counts[name].dropped["over_max_corpus_docs"] += n - kept[name]
    yield from sorted(chosen, key=lambda d: (order[d.source], d.path))


# --- outputs ---------------------------------------------------------------------------------------

def copyright_license(path: Path) -> str:
    """The `License:` of the `Files: *` stanza of a machine-readable copyright file, else "see file"."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "copyright file missing"
    if not text.startswith("Format:"):
        return "free-form copyright file (see it)"
    for stanza in text.split("\n\n"):
        lines = stanza.strip().splitlines()
        if lines and lines[0].strip() == "Files: *":
            for ln in lines:
                if ln.startswith("License:"):
                    return ln.split(":", 1)[1].strip()
    return "see file"


def write_licenses(path: Path, root: Path, sources: Iterable[tuple[str, str, str, Path | None]]) -> None:
    """LICENSES.md: one row per source (name, Debian package, license summary, copyright file)."""
    rows = ["# Licenses of the data sources", "",
            "Each record also carries its source's license in its `license` field. The copyright files named "
            "here are authoritative; the summaries are for orientation.", "",
            "| Source | Package | License (summary) | Copyright file | `Files: *` license | sha256 |",
            "|---|---|---|---|---|---|"]
    for name, package, summary, copyright_path in sources:
        if copyright_path is None:
            rows.append(f"| {name} | {package} | {summary} | (upstream) | | |")
            continue
        digest = (hashlib.sha256(copyright_path.read_bytes()).hexdigest()[:16]
                  if copyright_path.is_file() else "missing")
        shown = "/" + copyright_path.relative_to(root).as_posix()
        rows.append(f"| {name} | {package} | {summary} | `{shown}` | {copyright_license(copyright_path)} | {digest} |")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def _manifest(path: Path, kind: str, cfg: BuildConfig | None, counts: dict[str, SourceCounts],
              failures: list[ParseFailure], outputs: dict[str, dict[str, int]], extra: dict[str, Any]) -> None:
    settings = cfg.model_dump(mode="json") if cfg else {}
    data = {
        "build": kind,
        "settings": settings,
        "sources": {name: {**asdict(c), "dropped": dict(sorted(c.dropped.items()))} for name, c in counts.items()},
        "outputs": outputs,
        "failures": [f.model_dump() for f in failures],
        **extra,
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _file_info(path: Path, records: int, chars: int) -> dict[str, int]:
    return {"records": records, "chars": chars, "bytes": path.stat().st_size}


def _write_seed(out: Path, seed: list[SeedPair], heldout: list[SeedPair], rest: list[SeedPair]
                ) -> dict[str, dict[str, int]]:
    """seed.jsonl, heldout.jsonl and seed_rest.jsonl (the seed pairs past `max_seed`: the loop's backward
    model learns from more of the seed than the forward models, see `humpback.loop.config.TrainConfig`)."""
    outputs = {}
    for name, pairs in (("seed.jsonl", seed), ("heldout.jsonl", heldout), ("seed_rest.jsonl", rest)):
        n = write_jsonl(out / name, pairs)
        outputs[name] = _file_info(out / name, n, sum(len(p.instruction) + len(p.response) for p in pairs))
    return outputs


@dataclass
class BuildResult:
    """What a build wrote, for the printed table and for tests."""

    out: Path
    counts: dict[str, SourceCounts]
    failures: list[ParseFailure]
    outputs: dict[str, dict[str, int]]


def build_demo(cfg: BuildConfig) -> BuildResult:
    """seed.jsonl, heldout.jsonl, corpus.jsonl, LICENSES.md and manifest.json from Debian documentation."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, SourceCounts] = {}
    failures: list[ParseFailure] = []
    pairs = filter_pairs(collect_seed(cfg, counts, failures), cfg, counts)
    outputs = _write_seed(cfg.out, *split_pairs(pairs, cfg, counts))

    corpus_counts: dict[str, SourceCounts] = {}
    docs = _cap_corpus(collect_corpus(cfg, corpus_counts, failures), cfg, corpus_counts)

    def tally(stream: Iterable[CorpusDoc]) -> Iterator[CorpusDoc]:
        for d in stream:
            c = corpus_counts[d.source]
            c.kept += 1
            c.chars += len(d.text)
            yield d

    n = write_jsonl(cfg.out / "corpus.jsonl", tally(docs))
    outputs["corpus.jsonl"] = _file_info(cfg.out / "corpus.jsonl", n, sum(c.chars for c in corpus_counts.values()))
    write_licenses(cfg.out / "LICENSES.md", cfg.root,
                   [(s.name, s.package, s.license, s.copyright_file(cfg.root)) for s in (*SEED_SOURCES, *CORPUS_SOURCES)])
    all_counts = {**{f"seed/{k}": v for k, v in counts.items()}, **{f"corpus/{k}": v for k, v in corpus_counts.items()}}
    _manifest(cfg.out / "manifest.json", "demo", cfg, all_counts, failures, outputs, {})
    for f in failures:
        log.warning("%s: %s: %s", f.source, f.file, f.reason)
    return BuildResult(cfg.out, all_counts, failures, outputs)


def build_oasst1(inputs: list[Path], hub: str | None, split: str, cfg: BuildConfig, lang: str = "en") -> BuildResult:
    """seed.jsonl, heldout.jsonl, LICENSES.md and manifest.json from oasst1 messages (paper §3.1)."""
    from humpback.data.oasst1 import LICENSE, SOURCE, OasstStats, first_turn_pairs, read_messages

    if not inputs and not hub:
        raise OasstError("give oasst1 message files (--input) or a hub dataset name (--hub)")
    cfg.out.mkdir(parents=True, exist_ok=True)
    stats = OasstStats()
    counts: dict[str, SourceCounts] = {SOURCE: SourceCounts(files=len(inputs) + bool(hub))}
    selected = list(first_turn_pairs(read_messages(inputs, hub, split, stats), stats, lang))
    counts[SOURCE].parsed = len(selected)
    outputs = _write_seed(cfg.out, *split_pairs(filter_pairs(selected, cfg, counts), cfg, counts))
    write_licenses(cfg.out / "LICENSES.md", cfg.root, [(SOURCE, f"OpenAssistant/oasst1 ({hub or 'local copy'})",
                                                         LICENSE, None)])
    selection = {"messages": stats.messages, "roots": stats.roots, "first_turn_pairs": stats.selected,
                 "dropped": dict(sorted(stats.dropped.items())), "lang": lang,
                 "inputs": [str(p) for p in inputs], "hub": hub}
    settings = cfg.model_copy(update={"root": Path("/")})
    _manifest(cfg.out / "manifest.json", "oasst1", settings, counts, stats.failures, outputs, {"selection": selection})
    return BuildResult(cfg.out, counts, stats.failures, outputs)


def format_table(result: BuildResult) -> str:
    """The counts as a small fixed-width table."""
    head = f"{'source':<24}{'files':>7}{'failed':>7}{'parsed':>8}{'kept':>7}{'seed':>7}{'heldout':>8}{'chars':>12}"
    rows = [head, "-" * len(head)]
    for name, c in result.counts.items():
        corpus = name.startswith("corpus/")
        rows.append(f"{name:<24}{c.files:>7}{c.failed_files:>7}{c.parsed:>8}{c.kept:>7}"
                    f"{'' if corpus else c.seed:>7}{'' if corpus else c.heldout:>8}{c.chars:>12,}")
    rows.append("-" * len(head))
    for name, info in result.outputs.items():
        rows.append(f"{name:<24}{info['records']:>7} records {info['chars']:>14,} chars {info['bytes']:>12,} bytes")
    if result.failures:
        rows.append(f"{len(result.failures)} input(s) failed to parse: see manifest.json")
    return "\n".join(rows)
