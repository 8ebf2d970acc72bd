"""`humpback data demo` and `humpback data oasst1`: flags mirror `BuildConfig` (see its docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _seed_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
    p.add_argument("--min-answer-chars", type=int, default=100)
    p.add_argument("--max-answer-chars", type=int, default=3000)
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share held out for evaluation")
    p.add_argument("--max-seed", type=int, default=None,
                   help="at most this many seed pairs (the held-out split is made first)")


def _config(args: argparse.Namespace, **extra: Any) -> Any:
    from humpback.data.build import BuildConfig

    return BuildConfig(out=args.out, min_answer_chars=args.min_answer_chars, max_answer_chars=args.max_answer_chars,
                       heldout_fraction=args.heldout_fraction, max_seed=args.max_seed, **extra)


def _demo(args: argparse.Namespace) -> int:
    from humpback.data.build import build_demo, format_table

    result = build_demo(_config(args, root=args.root, max_corpus_docs=args.max_corpus_docs,
                                min_doc_chars=args.min_doc_chars))
    print(format_table(result))
    print(f"wrote {result.out}/(seed, heldout, corpus).jsonl, LICENSES.md, manifest.json")
    return 0


def _oasst1(args: argparse.Namespace) -> int:
    from humpback.data.build import build_oasst1, format_table
    from humpback.data.oasst1 import OasstError

    try:
        result = build_oasst1(args.input, args.hub, args.split, _config(args), lang=args.lang)
    except (OasstError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(format_table(result))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="build seed and corpus files")
    data = p.add_subparsers(dest="data_command", required=True)

    d = data.add_parser("demo", help="seed Q/A, held-out split and prose corpus from Debian documentation")
    _seed_args(d, "data/demo")
    d.add_argument("--max-corpus-docs", type=int, default=None, help="at most this many corpus documents")
    d.add_argument("--min-doc-chars", type=int, default=200, help="drop shorter corpus documents")
    d.add_argument("--root", type=Path, default=Path("/"), help="filesystem root of the Debian files")
    d.set_defaults(func=_demo)

    o = data.add_parser("oasst1", help="the paper's seed: oasst1 first turns, English, rank-0 replies")
    _seed_args(o, "data/oasst1")
    o.add_argument("--input", type=Path, action="append", default=[],
                   help="oasst1 messages as .parquet, .jsonl or .jsonl.gz (repeatable)")
    o.add_argument("--hub", default=None, help="load this hub dataset with `datasets` (e.g. OpenAssistant/oasst1)")
    o.add_argument("--split", default="train+validation", help="hub split(s)")
    o.add_argument("--lang", default="en")
    o.set_defaults(func=_oasst1)
