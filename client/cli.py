"""`humpback augment`, `humpback curate` and `humpback batch ...`: thin wrappers over the async API.

Each flag mirrors a field of `FanoutConfig`, `AugmentConfig`, `CurateConfig` or `PrepareConfig`, which
document them; handlers import the client only when run.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def _fanout_args(p: argparse.ArgumentParser, default_endpoint: str) -> None:
    g = p.add_argument_group("servers")
    g.add_argument("--endpoint", action="append", default=None,
                   help=f"server base URL, repeatable for load balancing and failover (default {default_endpoint})")
    g.add_argument("--api-key", default=os.environ.get("HUMPBACK_API_KEY"),
                   help="bearer token (default: $HUMPBACK_API_KEY)")
    g.add_argument("--model", default=None, help="served model name (default: the first the server lists)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="fixed in-flight requests per endpoint (default: adapt to the server's queue)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queueing included")
    g.add_argument("--max-retries", type=int, default=8)
    _common_args(g)
    p.set_defaults(default_endpoint=default_endpoint)


def _fanout_config(args: argparse.Namespace) -> Any:
    from client.fanout import FanoutConfig

    return FanoutConfig(endpoints=args.endpoint or [args.default_endpoint], api_key=args.api_key,
                        concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries)


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring and selection of A_k")
    g.add_argument("--mode", choices=("logprobs", "free_text"), default="logprobs")
    k = g.add_mutually_exclusive_group()
    k.add_argument("--min-score", type=float, default=4.5, help="keep score >= k (default 4.5, the paper's A_5)")
    k.add_argument("--top-fraction", type=float, default=None,
                   help="keep the best-scored fraction instead; k is then that fraction's lowest score")
    g.add_argument("--max-tokens", type=int, default=256, help="free-text reasoning budget")
    g.add_argument("--scored", default=None, help="scored-candidates journal (default <out>.scored.jsonl)")
    g.add_argument("--no-histogram", action="store_true")


def _common_args(p: Any) -> None:
    """Output flags of every command that writes a journal (a parser or an argument group)."""
    p.add_argument("--checkpoint", default=None,
                   help="version label recorded with each result (augment/curate default: the served model's root)")
    p.add_argument("--fsync", choices=("never", "interval", "always"), default="interval")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus preparation (paper App. E; each rule on by default)")
    g.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    g.add_argument("--min-chars", type=int, default=600)
    g.add_argument("--max-chars", type=int, default=3000)
    g.add_argument("--no-segment", action="store_true", help="keep documents whole")
    g.add_argument("--no-boilerplate-filter", action="store_true")
    g.add_argument("--no-repetition-filter", action="store_true")
    g.add_argument("--no-dedup", action="store_true", help="no exact nor near-duplicate removal")
    g.add_argument("--no-near-dedup", action="store_true", help="exact-duplicate removal only")


def _prepare_config(args: argparse.Namespace) -> Any:
    from client.prepare import PrepareConfig

    return PrepareConfig(segment=not args.no_segment, min_chars=args.min_chars, max_chars=args.max_chars,
                         boilerplate=not args.no_boilerplate_filter, repetition=not args.no_repetition_filter,
                         dedup_exact=not args.no_dedup, dedup_near=not (args.no_dedup or args.no_near_dedup))


def _augment_config(args: argparse.Namespace) -> Any:
    from client.augment import AugmentConfig

    return AugmentConfig(model=args.model, checkpoint=args.checkpoint, max_tokens=args.max_tokens, seed=args.seed,
                         limit=getattr(args, "limit", None), fsync=args.fsync, progress=not args.no_progress)


def _curate_config(args: argparse.Namespace) -> Any:
    from client.curate import CurateConfig

    return CurateConfig(mode=args.mode, min_score=args.min_score, top_fraction=args.top_fraction, model=args.model,
                        checkpoint=args.checkpoint, max_tokens=args.max_tokens, scored=args.scored,
                        histogram=not args.no_histogram, fsync=args.fsync, progress=not args.no_progress)


def _run(coro: Any) -> Any:
    import asyncio

    try:
        import uvloop  # optional: a faster event loop where installed
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _report(summary: Any) -> None:
    import json
    import sys

    print(json.dumps(summary.to_dict(), indent=2), file=sys.stderr)


def _augment(args: argparse.Namespace) -> int:
    from client.augment import augment

    summary = _run(augment(args.corpus, args.out, _fanout_config(args), _augment_config(args),
                           _prepare_config(args), text_field=args.text_field))
    _report(summary)
    return 0 if not summary.results["failed"] else 3


def _curate(args: argparse.Namespace) -> int:
    from client.curate import curate

    summary = _run(curate(args.candidates, args.out, _fanout_config(args), _curate_config(args)))
    _report(summary)
    return 0 if not summary.results["failed"] else 3


def _batch_export(args: argparse.Namespace) -> int:
    from client import batch

    if args.kind == "augment":
        summary = batch.export_augment(args.corpus, args.out, args.model, _augment_config(args),
                                       _prepare_config(args), text_field=args.text_field)
    else:
        summary = batch.export_curate(args.corpus[0], args.out, args.model, _curate_config(args))
    _report(summary)
    return 0


def _batch_import(args: argparse.Namespace) -> int:
    from client import batch

    if args.kind == "augment":
        summary = batch.import_augment(args.requests, args.results, args.out, checkpoint=args.checkpoint)
    else:
        summary = batch.import_curate(args.requests, args.results, args.out, _curate_config(args))
    _report(summary)
    return 0


def register(sub: Any) -> None:
    """Add `augment`, `curate` and `batch` to the `humpback` command."""
    p = sub.add_parser("augment", help="self-augmentation: one instruction per corpus segment (resumable)",
                       description="Stream a corpus through the backward model; re-run the same command to resume.")
    p.add_argument("--corpus", nargs="+", required=True, help="JSONL, text or Parquet files (.gz allowed)")
    p.add_argument("--out", required=True, help="candidates JSONL (appended; side files next to it)")
    p.add_argument("--max-tokens", type=int, default=256, help="instruction length cap")
    p.add_argument("--seed", type=int, default=None, help="sampling seed per request")
    p.add_argument("--limit", type=int, default=None, help="only the first N kept segments (a trial run)")
    _fanout_args(p, "http://127.0.0.1:8001")
    _prepare_args(p)
    p.set_defaults(func=_augment)

    p = sub.add_parser("curate", help="self-curation: score candidates and select A_k (resumable)")
    p.add_argument("--candidates", required=True, help="candidates JSONL (instruction and output fields)")
    p.add_argument("--out", required=True, help="curated set, chat-format JSONL (rewritten each run)")
    _selection_args(p)
    _fanout_args(p, "http://127.0.0.1:8002")
    p.set_defaults(func=_curate)

    p = sub.add_parser("batch", help="OpenAI batch JSONL: export requests, import results")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    e = bsub.add_parser("export", help="write batch request lines (for `vllm run-batch` or a hosted batch API)")
    e.add_argument("kind", choices=("augment", "curate"))
    e.add_argument("--corpus", nargs="+", required=True, help="corpus files (augment) or a candidates file (curate)")
    e.add_argument("--out", required=True, help="batch requests JSONL (+ <out>.segments.jsonl for augment)")
    e.add_argument("--model", required=True, help="model name to put in each request body")
    e.add_argument("--seed", type=int, default=None)
    _selection_args(e)  # its --max-tokens also caps augment's instructions
    _common_args(e)
    _prepare_args(e)
    e.set_defaults(func=_batch_export)
    i = bsub.add_parser("import", help="turn batch results into candidates (augment) or a curated set (curate)")
    i.add_argument("kind", choices=("augment", "curate"))
    i.add_argument("--requests", required=True, help="the exported requests JSONL")
    i.add_argument("--results", required=True, help="the batch output JSONL")
    i.add_argument("--out", required=True, help="candidates journal (augment) or curated set (curate)")
    i.add_argument("--model", default=None)
    _selection_args(i)
    _common_args(i)
    i.set_defaults(func=_batch_import)
