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
    out: Path | None = setting(None, "run folder (re-run to resume); default: runs/demo, or runs/NAME for "
                                     "--config NAME.yaml")
    overrides: list[str] = setting(default_factory=list, help="override a value of the config, repeatable",
                                   flag="set", metavar="SECTION.FIELD=VALUE")
    check: bool = setting(False, "check the config, its files, the extras, models, servers, ports, disk and memory, "
                                 "print the plan and exit (2 with every problem listed) without starting anything; "
                                 "a run makes this check first and does not start on a problem")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="the self-alignment loop end to end (resumable)")
    add_arguments(run, RunArgs)
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="render RUN_DIR/report.html with plots")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=_report)


def _run(args: argparse.Namespace) -> int:
    from humpback.contracts import ConfigError
    from humpback.loop.config import load_config
    from humpback.loop.preflight import config_problem, preflight
    from humpback.loop.report import render
    from humpback.loop.run import Loop

    opts = from_args(RunArgs, args)
    try:
        cfg = load_config(opts.config, quick=opts.quick, overrides=opts.overrides)
    except Exception as exc:  # a user's config: a missing file, bad YAML or JSON, a value refused
        # One line per problem; `humpback --debug` shows this traceback, the cause's with it.
        raise ConfigError("\n".join(config_problem(exc, opts.config))) from exc
    out = opts.out or Path("runs") / (opts.config.stem if opts.config else "demo")
    check = preflight(cfg, out)
    if opts.check or check.problems:
        print(check.render())
    if check.problems:
        if not opts.check:
            print("the run did not start: mend the problems above (`humpback run --check` lists them again)")
        return 2
    if opts.check:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    Loop(cfg, out).run()
    print(f"report: {render(out.absolute())}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from humpback.contracts import InputError
    from humpback.loop.report import render

    if not (args.run_dir / "stages").is_dir():  # rendered anyway, it would be an empty report in a new folder
        raise InputError(f"{args.run_dir}: not a run folder (no stages/ in it); give the --out of `humpback run`")
    print(render(args.run_dir.absolute()))
    return 0
