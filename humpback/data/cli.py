"""`humpback data demo` and `humpback data oasst1`: flags generated from `BuildConfig`, and for oasst1
from `Oasst1Source` (where its messages come from)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from humpback.contracts import InputError
from humpback.data.build import BuildConfig, build_demo, build_oasst1, format_table
from humpback.settings import add_arguments, from_args, setting

# The oasst1 build reads no Debian files and writes no corpus.
DEMO_ONLY = ("root", "min_doc_chars", "max_corpus_docs")
OASST1_DEFAULTS = {"out": Path("data/oasst1")}


class Oasst1Source(BaseModel):
    """Where `humpback data oasst1` reads the oasst1 messages: local files or a hub dataset."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Path] = setting(default_factory=list, help="oasst1 messages as .parquet, .jsonl or .jsonl.gz "
                                 "(repeatable)", flag="input", metavar="FILE")
    hub: str | None = setting(None, "load this hub dataset with `datasets` (e.g. OpenAssistant/oasst1)")
    split: str = setting("train+validation", "hub split(s)")
    lang: str = setting("en", "keep first turns in this language")


def _demo(args: argparse.Namespace) -> int:
    cfg = from_args(BuildConfig, args)
    if not cfg.root.is_dir():  # read anyway, every source would be "not installed" and the files empty
        raise InputError(f"--root {cfg.root}: no such folder; give the root the Debian paths are read under")
    result = build_demo(cfg)
    print(format_table(result))
    print(f"wrote {result.out}/(seed, heldout, corpus).jsonl, LICENSES.md, manifest.json")
    return 0


def _oasst1(args: argparse.Namespace) -> int:
    src = from_args(Oasst1Source, args)
    cfg = from_args(BuildConfig, args, exclude=DEMO_ONLY, defaults=OASST1_DEFAULTS)
    print(format_table(build_oasst1(src.inputs, src.hub, src.split, cfg, lang=src.lang)))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="build seed and corpus files")
    data = p.add_subparsers(dest="data_command", required=True)

    d = data.add_parser("demo", help="seed Q/A, held-out split and prose corpus from Debian documentation")
    add_arguments(d, BuildConfig)
    d.set_defaults(func=_demo)

    o = data.add_parser("oasst1", help="the paper's seed: oasst1 first turns, English, rank-0 replies")
    add_arguments(o, BuildConfig, exclude=DEMO_ONLY, defaults=OASST1_DEFAULTS)
    add_arguments(o, Oasst1Source)
    o.set_defaults(func=_oasst1)
