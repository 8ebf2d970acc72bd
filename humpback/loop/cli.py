"""`humpback run` (the loop) and `humpback report RUN_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="the self-alignment loop end to end (resumable)")
    run.add_argument("--config", type=Path, default=None, help="YAML or JSON config (defaults: the CPU demo)")
    run.add_argument("--quick", action="store_true", help="tiny sizes: minutes on a CPU (what the tests run)")
    run.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (re-run to resume)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a value")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="render RUN_DIR/report.html with plots")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=_report)


def _run(args: argparse.Namespace) -> int:
    from humpback.loop.config import load_config
    from humpback.loop.report import render
    from humpback.loop.run import Loop

    cfg = load_config(args.config, quick=args.quick, overrides=args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    Loop(cfg, args.out).run()
    print(f"report: {render(args.out.absolute())}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from humpback.loop.report import render

    print(render(args.run_dir.absolute()))
    return 0
