"""`humpback eval ifeval|pairwise|nll|backward|scorer|calibrate`: thin wrappers over `humpback.evaluation`.

Flags are generated from the settings models below and from `GenerationConfig`, `PairwiseConfig`,
`AugmentConfig` (how `backward` samples), `ScorerEvalConfig` and `CurateConfig` (how `scorer` scores),
which document them; `ifeval`, `nll`
and `backward` (ROUGE) are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from client.augment import AugmentConfig
from client.curate import CurateConfig
from client.fanout import FanoutConfig
from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, DEFAULT_URLS, SEED_SYSTEM_PROMPT
from humpback.evaluation.common import GenerationConfig
from humpback.evaluation import pairwise
from humpback.evaluation.metrics import format_metrics
from humpback.evaluation.scorer import ScorerEvalConfig, run_scorer_eval
from humpback.settings import add_arguments, from_args, setting, stack_api_key

SYSTEM_PROMPTS = {"none": None, "seed": SEED_SYSTEM_PROMPT, "augmented": AUGMENTED_SYSTEM_PROMPT}


class Server(BaseModel):
    """The model under test, and how every endpoint of the command (judge and baseline included) is reached."""

    model_config = ConfigDict(extra="forbid")

    # The model under test defaults to the first local server, the judge to the second.
    endpoint: str = setting(DEFAULT_URLS["backward"], "base URL of the model under test (no /v1)",
                            env="HUMPBACK_EVAL_URL")
    model: str | None = setting(None, "served model name (default: the first the server lists)")
    api_key: str | None = stack_api_key("sent to every endpoint of the command")
    concurrency: int | None = setting(
        None, "fixed in-flight requests per endpoint (default: adapt to the server's queue)")
    timeout: float = setting(600.0, "seconds per request, queueing included")

    def fanout(self, endpoint: str) -> FanoutConfig:
        return FanoutConfig(endpoints=[endpoint], api_key=self.api_key, concurrency=self.concurrency,
                            timeout=self.timeout)


class Run(BaseModel):
    """Where results go and which items are evaluated."""

    model_config = ConfigDict(extra="forbid")

    out: Path = setting(help="folder for the rows and the summary")
    limit: int | None = setting(None, "evaluate this many items only")
    seed: int = setting(0, "seed of the --limit subset")


class SystemTag(BaseModel):
    """The system prompt the evaluated model is asked with, by name."""

    model_config = ConfigDict(extra="forbid")

    system: Literal["none", "seed", "augmented"] = setting(
        "none", "system prompt: none, or the paper's tag for seed / augmented data")

    def prompt(self) -> str | None:
        return SYSTEM_PROMPTS[self.system]


class PairwiseSides(BaseModel):
    """Who is compared (A, the model under test, against a baseline B) and who judges."""

    model_config = ConfigDict(extra="forbid")

    answers: Path | None = setting(
        None, "model A's answers (AlpacaEval JSON or JSONL of {instruction, output}) instead of --endpoint")
    baseline_answers: Path | None = setting(
        None, "the baseline's answers file, as --answers (default: AlpacaEval's GPT-4-turbo reference answers)")
    baseline_endpoint: str | None = setting(None, "or a server whose model answers for the baseline")
    baseline_model: str | None = setting(None, "the baseline server's model (default: the first it lists)")
    judge_endpoint: str = setting(DEFAULT_URLS["scorer"], "base URL of the judge (no /v1)", env="HUMPBACK_JUDGE_URL")
    judge_model: str | None = setting(None, "the judge's model (default: the first the judge lists)")


class IFEvalInput(BaseModel):
    """Answers to score instead of asking the endpoint."""

    model_config = ConfigDict(extra="forbid")

    responses: Path | None = setting(None, "score this JSONL of {prompt, response} instead of asking the endpoint")


class StageRun(BaseModel):
    """The held-out pairs a stage metric is measured on, and where its metrics go."""

    model_config = ConfigDict(extra="forbid")

    pairs: Path = setting(help="held-out human pairs: JSONL of {instruction, response} (humpback's heldout.jsonl)")
    out: Path = setting(help="the metrics, a JSON file; the rows and the request journal are written beside it")
    limit: int | None = setting(None, "measure a subset of this many pairs, drawn with --seed, in file order")
    seed: int = setting(0, "seed of the --limit subset, the sampling, the negatives and the bootstrap intervals")


# The pairwise command takes its subset from `pairwise.PairwiseConfig`; the NLL reads the first --limit pairs, unseeded.
PAIRWISE_SUBSET = ("limit", "seed")
NLL_UNUSED = ("seed",)
# `eval backward` asks as augment does; of augment's settings it takes the sampling and prompt ones.
BACKWARD_SAMPLING = ("max_tokens", "temperature", "top_p", "shots", "demonstrations")
AUGMENT_UNUSED = tuple(f for f in AugmentConfig.model_fields if f not in BACKWARD_SAMPLING)
SCORER_DEFAULTS = {"endpoint": DEFAULT_URLS["scorer"]}
# `eval scorer` scores as `curate` does: these of curate's settings choose how.
SCORING = ("scorer", "mode", "backward_endpoint", "calibration", "min_prob")
CURATE_UNUSED = tuple(f for f in CurateConfig.model_fields if f not in SCORING)
CALIBRATE_UNUSED = tuple(f for f in CurateConfig.model_fields if f != "backward_endpoint")


def _generation(args: argparse.Namespace) -> GenerationConfig:
    return from_args(GenerationConfig, args, system_prompt=from_args(SystemTag, args).prompt())


def _ifeval(args: argparse.Namespace) -> int:
    from humpback.evaluation import ifeval

    server, run, responses = from_args(Server, args), from_args(Run, args), from_args(IFEvalInput, args).responses
    fanout = None if responses else server.fanout(server.endpoint)
    summary = asyncio.run(ifeval.run_ifeval(run.out, fanout, server.model, _generation(args), run.limit, run.seed,
                                            responses))
    print(ifeval.format_summary(summary))
    return 0


def _pairwise(args: argparse.Namespace) -> int:
    server, sides = from_args(Server, args), from_args(PairwiseSides, args)
    run = from_args(Run, args, exclude=PAIRWISE_SUBSET)
    a = pairwise.Contender(answers=sides.answers, model=server.model,
                           fanout=None if sides.answers else server.fanout(server.endpoint))
    b = pairwise.Contender(answers=sides.baseline_answers, model=sides.baseline_model,
                           fanout=server.fanout(sides.baseline_endpoint) if sides.baseline_endpoint else None)
    summary = asyncio.run(pairwise.run_pairwise(run.out, a, b, server.fanout(sides.judge_endpoint), sides.judge_model,
                                                _generation(args), from_args(pairwise.PairwiseConfig, args)))
    print(pairwise.format_summary(summary))
    return 0


def _nll(args: argparse.Namespace) -> int:
    from humpback.evaluation import nll

    server, run = from_args(Server, args), from_args(Run, args, exclude=NLL_UNUSED)
    summary = asyncio.run(nll.run_nll(args.seed_file, run.out, server.fanout(server.endpoint), server.model, run.limit,
                                      from_args(SystemTag, args).prompt()))
    print(nll.format_summary(summary))
    return 0


def _backward(args: argparse.Namespace) -> int:
    from humpback.evaluation import backward

    server, run = from_args(Server, args), from_args(StageRun, args)
    result = asyncio.run(backward.run_backward_eval(
        run.pairs, run.out, server.fanout(server.endpoint), server.model,
        from_args(AugmentConfig, args, exclude=AUGMENT_UNUSED), run.limit, run.seed))
    print(format_metrics("backward", result))
    return 0


def _scorer(args: argparse.Namespace) -> int:
    server, run = from_args(Server, args, defaults=SCORER_DEFAULTS), from_args(StageRun, args)
    cfg = from_args(ScorerEvalConfig, args)
    score = from_args(CurateConfig, args, exclude=CURATE_UNUSED)
    result = asyncio.run(run_scorer_eval(run.pairs, run.out, server.fanout(server.endpoint), server.model, cfg,
                                         run.limit, run.seed, score))
    print(format_metrics("scorer", result))
    if cfg.corpus is None:
        print("no 'passage' negatives: pass --corpus to build them")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from humpback.evaluation.calibrate import run_calibration

    server, run = from_args(Server, args, defaults=SCORER_DEFAULTS), from_args(StageRun, args)
    backward = from_args(CurateConfig, args, exclude=CALIBRATE_UNUSED).backward_endpoint or DEFAULT_URLS["backward"]
    combiner = asyncio.run(run_calibration(run.pairs, run.out, server.fanout(server.endpoint), backward, server.model,
                                           from_args(ScorerEvalConfig, args, exclude=("threshold",)), run.limit,
                                           run.seed))
    print(f"combiner fitted on {combiner.pairs} pairs and {sum(combiner.negatives.values())} negatives "
          f"({combiner.negatives}): {run.out}")
    return 0


def _common(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    add_arguments(p.add_argument_group("model under test"), Server)
    add_arguments(p, Run, exclude=exclude, required=("out",))


def _generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    add_arguments(g, GenerationConfig)
    add_arguments(g, SystemTag)


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a served model: IFEval, pairwise win rate, held-out NLL, and the "
                                    "backward model and the scorer against held-out human pairs")
    esub = p.add_subparsers(dest="eval_command", required=True)

    e = esub.add_parser("ifeval", help="IFEval: prompt- and instruction-level strict and loose accuracy")
    _common(e)
    _generation_args(e)
    add_arguments(e, IFEvalInput)
    e.set_defaults(func=_ifeval)

    w = esub.add_parser("pairwise", help="win rate against a baseline on AlpacaEval prompts, by an LLM judge")
    _common(w, exclude=PAIRWISE_SUBSET)
    _generation_args(w)
    add_arguments(w.add_argument_group("contenders and judge"), PairwiseSides)
    add_arguments(w.add_argument_group("prompts and interval"), pairwise.PairwiseConfig)
    w.set_defaults(func=_pairwise)

    n = esub.add_parser("nll", help="mean NLL of held-out human responses (prompt log-probabilities)")
    n.add_argument("seed_file", type=Path, help="JSONL of {instruction, output} or {messages} pairs")
    _common(n, exclude=NLL_UNUSED)
    add_arguments(n.add_argument_group("prompt"), SystemTag)
    n.set_defaults(func=_nll)

    b = esub.add_parser("backward", help="the backward model on held-out pairs: NLL of the human instruction, "
                                         "ROUGE-L, usable rate and distinct-2 of generated ones")
    add_arguments(b.add_argument_group("model under test"), Server)
    add_arguments(b, StageRun, required=("pairs", "out"))
    add_arguments(b.add_argument_group("sampling (augment's)"), AugmentConfig, exclude=AUGMENT_UNUSED)
    b.set_defaults(func=_backward)

    c = esub.add_parser("scorer", help="the scorer on held-out pairs against negatives built from them: AUC, "
                                       "precision at the threshold, mean score of each kind")
    add_arguments(c.add_argument_group("model under test"), Server, defaults=SCORER_DEFAULTS)
    add_arguments(c, StageRun, required=("pairs", "out"))
    add_arguments(c.add_argument_group("negatives and threshold"), ScorerEvalConfig)
    add_arguments(c.add_argument_group("scoring (curate's)"), CurateConfig, exclude=CURATE_UNUSED)
    c.set_defaults(func=_scorer)

    k = esub.add_parser("calibrate", help="fit the combined scorer's combiner on held-out pairs and negatives built "
                                          "from them (a JSON file for curate --calibration)")
    add_arguments(k.add_argument_group("scorer (forward model)"), Server, defaults=SCORER_DEFAULTS)
    add_arguments(k, StageRun, required=("pairs", "out"))
    add_arguments(k.add_argument_group("negatives"), ScorerEvalConfig, exclude=("threshold",))
    add_arguments(k.add_argument_group("backward model"), CurateConfig, exclude=CALIBRATE_UNUSED)
    k.set_defaults(func=_calibrate)
