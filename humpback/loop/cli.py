"""`humpback run` (the loop) and `humpback report RUN_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from humpback.settings import add_arguments, from_args, setting


class RunArgs(BaseModel):
    """The flags of `humpback run`; the run's own settings are in `humpback.loop.config.RunConfig`."""

    model_config = ConfigDict(extra="forbid")

    config: Path | None = setting(None, "YAML or JSON config (defaults: the CPU demo)")
    quick: bool = setting(False, "tiny sizes: minutes on a CPU (what the tests run)")
    out: Path = setting(Path("runs/demo"), "run folder (re-run to resume)")
    overrides: list[str] = setting(default_factory=list, help="override a value of the config, repeatable",
                                   flag="set", metavar="SECTION.FIELD=VALUE")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="the self-alignment loop end to end (resumable)")
    add_arguments(run, RunArgs)
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="render RUN_DIR/report.html with plots")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=_report)


def _run(args: argparse.Namespace) -> int:
    from humpback.loop.config import load_config
    from humpback.loop.report import render
    from humpback.loop.run import Loop

    opts = from_args(RunArgs, args)
    cfg = load_config(opts.config, quick=opts.quick, overrides=opts.overrides)
    opts.out.mkdir(parents=True, exist_ok=True)
    Loop(cfg, opts.out).run()
    print(f"report: {render(opts.out.absolute())}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from humpback.loop.report import render

    print(render(args.run_dir.absolute()))
    return 0
