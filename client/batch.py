"""OpenAI batch JSONL: export requests, import results (for `vllm run-batch` or a hosted batch API).

Export writes request lines `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`,
built by the same functions as the online path, plus a side file `<requests>.meta.jsonl` with what
the answer must be joined to (the segment, or the pair to score). Import matches result lines
(`{"custom_id", "response": {"status_code", "body"}, "error"}`) back by `custom_id` into the same
journals `augment` and `curate` write, so online and batch runs mix and resume alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from client.augment import (CHAT_PATH, AugmentConfig, augment_request, candidate_line, parse_instruction,
                            prepared_segments)
from client.corpus import Corpus
from client.curate import CurateConfig, Pair, read_pairs, score_parser, score_request, scored_line, select
from client.dispatch import RunSummary, reason_key, side_path
from client.fanout import RequestFailed, RetryableError
from client.journal import Journal, LineWriter
from client.prepare import PrepareConfig, Preparer
from humpback.contracts import Failure, Segment, Source

PathLike = str | os.PathLike[str]


def _request_line(cid: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT_PATH, "body": body}, ensure_ascii=False)


def _meta_path(requests: Path) -> Path:
    return side_path(requests, "meta.jsonl")


def export_augment(corpus: Iterable[PathLike], out: PathLike, model: str, config: AugmentConfig | None = None,
                   prepare: PrepareConfig | None = None, text_field: str = "text") -> RunSummary:
    """Batch requests for every kept segment (one per distinct `custom_id`)."""
    cfg = config or AugmentConfig()
    out = Path(out)
    summary = RunSummary()
    preparer = Preparer(prepare)
    errors = LineWriter(side_path(out, "errors.jsonl"))
    seen: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as req, open(_meta_path(out), "w", encoding="utf-8") as meta:
        for _, seg in prepared_segments([Corpus(c, text_field=text_field) for c in corpus], preparer, errors, summary):
            cid, body = augment_request(seg.text, model, cfg)
            if cid in seen:
                continue
            seen.add(cid)
            req.write(_request_line(cid, body) + "\n")
            meta.write(json.dumps({"custom_id": cid, "segment": seg.model_dump()}, ensure_ascii=False) + "\n")
            summary.results["requests"] += 1
    errors.close()
    summary.prepare.update(preparer.counts)
    return summary


def export_curate(candidates: PathLike, out: PathLike, model: str, config: CurateConfig | None = None) -> RunSummary:
    """Batch scoring requests for every pair of a candidates file."""
    cfg = config or CurateConfig()
    out = Path(out)
    summary = RunSummary()
    errors = LineWriter(side_path(out, "errors.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as req, open(_meta_path(out), "w", encoding="utf-8") as meta:
        for pair in read_pairs(Path(candidates), errors, summary):
            cid, body = score_request(pair, model, cfg)
            req.write(_request_line(cid, body) + "\n")
            meta.write(json.dumps({"custom_id": cid, "pair": {"candidate_id": pair.candidate_id,
                                                             "instruction": pair.instruction, "output": pair.output,
                                                             "source": pair.source.model_dump()}},
                                  ensure_ascii=False) + "\n")
            summary.results["requests"] += 1
    errors.close()
    return summary


def _read_results(results: Path, summary: RunSummary) -> dict[str, dict[str, Any] | str]:
    """custom_id -> response body, or an error string. Batch result files are bounded (50k lines)."""
    out: dict[str, dict[str, Any] | str] = {}
    with open(results, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
                cid = obj["custom_id"]
            except (ValueError, KeyError, TypeError):
                summary.rejected[f"invalid result line {lineno}"] += 1
                continue
            resp = obj.get("response") or {}
            if obj.get("error") or resp.get("status_code") != 200:
                out[cid] = f"batch error: {obj.get('error') or resp.get('status_code')}"
            else:
                out[cid] = resp.get("body") or {}
    return out


def _answer(cid: str, results: dict[str, dict[str, Any] | str], parse: Any) -> Any:
    got = results.get(cid)
    if got is None:
        raise RequestFailed("no result in the batch output", 0)
    if isinstance(got, str):
        raise RequestFailed(got, 1)
    try:
        return parse(got)
    except RetryableError as exc:
        raise RequestFailed(str(exc), 1) from None


def _replay(journal_path: Path, rows: Iterator[tuple[str, Any, Source]], answers: dict[str, dict[str, Any] | str],
            parse: Callable[[dict[str, Any]], Any], record: Callable[[str, Any, Any], str], failed: LineWriter,
            summary: RunSummary) -> None:
    """Append `record(custom_id, item, parse(answer))` for each exported (custom_id, item, source) not
    yet in the journal; a missing or failed answer goes to `failed`, like a failed request."""
    with Journal(journal_path) as journal:
        for cid, item, source in rows:
            if cid in journal.done:
                summary.results["skipped_done"] += 1
                continue
            try:
                result = _answer(cid, answers, parse)
            except RequestFailed as exc:
                summary.failures[reason_key(exc.reason)] += 1
                failed.write(Failure(custom_id=cid, source=source, reason=exc.reason,
                                     attempts=exc.attempts).model_dump_json())
                continue
            journal.append(record(cid, item, result))
            journal.done.add(cid)
            summary.results["written"] += 1
    failed.close()
    summary.results["failed"] = sum(summary.failures.values())


def _meta_rows(requests: Path, key: str, load: Callable[[dict[str, Any]], Any]) -> Iterator[tuple[str, Any, Source]]:
    with open(_meta_path(requests), encoding="utf-8") as meta:
        for line in meta:
            row = json.loads(line)
            item = load(row[key])
            yield row["custom_id"], item, item.source


def import_augment(requests: PathLike, results: PathLike, out: PathLike, checkpoint: str | None = None) -> RunSummary:
    """Append the batch's candidates to the `out` journal (skipping ids already there)."""
    out = Path(out)
    summary = RunSummary()
    answers = _read_results(Path(results), summary)
    model_of = {}
    with open(requests, encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            model_of[req["custom_id"]] = req["body"]["model"]

    def record(cid: str, seg: Segment, result: tuple[str, str]) -> str:
        return candidate_line(cid, seg, result, model_of.get(cid, ""), checkpoint)

    _replay(out, _meta_rows(Path(requests), "segment", Segment.model_validate), answers, parse_instruction, record,
            LineWriter(side_path(out, "failed.jsonl")), summary)
    return summary


def import_curate(requests: PathLike, results: PathLike, out: PathLike, config: CurateConfig | None = None) -> RunSummary:
    """Append the batch's scores to the scored journal, then write the curated set to `out`."""
    cfg = config or CurateConfig()
    out = Path(out)
    scored_path = Path(cfg.scored) if cfg.scored is not None else side_path(out, "scored.jsonl")
    summary = RunSummary()
    answers = _read_results(Path(results), summary)
    model = cfg.model or ""
    with open(requests, encoding="utf-8") as f:
        first = f.readline()
        if first:
            model = model or json.loads(first)["body"]["model"]

    def load(p: dict[str, Any]) -> Pair:
        return Pair(p["candidate_id"], p["instruction"], p["output"], Source.model_validate(p["source"]))

    def record(cid: str, pair: Pair, result: Any) -> str:
        return scored_line(cid, pair, result, cfg.mode, model, cfg.checkpoint)

    _replay(scored_path, _meta_rows(Path(requests), "pair", load), answers, score_parser(cfg.mode), record,
            LineWriter(side_path(out, "failed.jsonl")), summary)
    if model:
        select(scored_path, out, cfg, model, summary, side_path(out, "scores.png") if cfg.histogram else None)
    return summary
