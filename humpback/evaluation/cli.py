"""`humpback eval ifeval|pairwise|nll`: thin wrappers over `humpback.evaluation`.

Flags mirror `GenerationConfig`, `PairwiseConfig` and `FanoutConfig`, which document them; handlers
import the evaluation code only when run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

MODEL_URL = os.environ.get("HUMPBACK_EVAL_URL", "http://127.0.0.1:8001")
JUDGE_URL = os.environ.get("HUMPBACK_JUDGE_URL", "http://127.0.0.1:8002")


def _server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model under test")
    g.add_argument("--endpoint", default=MODEL_URL, help="base URL (default $HUMPBACK_EVAL_URL or %(default)s)")
    g.add_argument("--model", default=None, help="served model name (default: the first the server lists)")
    g.add_argument("--api-key", default=os.environ.get("HUMPBACK_API_KEY"),
                   help="bearer token for every endpoint (default: $HUMPBACK_API_KEY)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="fixed in-flight requests per endpoint (default: adapt to the server's queue)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queueing included")
    p.add_argument("--out", type=Path, required=True, help="folder for the rows and the summary")
    p.add_argument("--limit", type=int, default=None, help="evaluate this many items only")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (and of the bootstrap)")


def _generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (see GenerationConfig)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    _system_arg(g)


def _system_arg(g: Any) -> None:
    g.add_argument("--system", choices=("none", "seed", "augmented"), default="none",
                   help="system prompt: none, or the paper's tag for seed / augmented data")


def _system(args: argparse.Namespace) -> str | None:
    from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, SEED_SYSTEM_PROMPT

    return {"none": None, "seed": SEED_SYSTEM_PROMPT, "augmented": AUGMENTED_SYSTEM_PROMPT}[args.system]


def _fanout(args: argparse.Namespace, endpoint: str) -> Any:
    from client.fanout import FanoutConfig

    return FanoutConfig(endpoints=[endpoint], api_key=args.api_key, concurrency=args.concurrency,
                        timeout=args.timeout)


def _generation(args: argparse.Namespace) -> Any:
    from humpback.evaluation.common import GenerationConfig

    return GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, system_prompt=_system(args))


def _ifeval(args: argparse.Namespace) -> int:
    from humpback.evaluation import ifeval

    summary = asyncio.run(ifeval.run_ifeval(args.out, None if args.responses else _fanout(args, args.endpoint),
                                            args.model, _generation(args), args.limit, args.seed, args.responses))
    print(ifeval.format_summary(summary))
    return 0


def _pairwise(args: argparse.Namespace) -> int:
    from humpback.evaluation import pairwise

    a = pairwise.Contender(answers=args.answers, model=args.model,
                           fanout=None if args.answers else _fanout(args, args.endpoint))
    b = pairwise.Contender(answers=args.baseline_answers, model=args.baseline_model,
                           fanout=_fanout(args, args.baseline_endpoint) if args.baseline_endpoint else None)
    cfg = pairwise.PairwiseConfig(limit=args.limit, seed=args.seed, dataset=args.dataset,
                                  judge_max_chars=args.judge_max_chars, ci=args.ci, ci_level=args.ci_level)
    summary = asyncio.run(pairwise.run_pairwise(args.out, a, b, _fanout(args, args.judge_endpoint), args.judge_model,
                                                _generation(args), cfg))
    print(pairwise.format_summary(summary))
    return 0


def _nll(args: argparse.Namespace) -> int:
    from humpback.evaluation import nll

    summary = asyncio.run(nll.run_nll(args.seed_file, args.out, _fanout(args, args.endpoint), args.model, args.limit,
                                      _system(args)))
    print(nll.format_summary(summary))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a served model: IFEval, pairwise win rate, held-out NLL")
    esub = p.add_subparsers(dest="eval_command", required=True)

    e = esub.add_parser("ifeval", help="IFEval: prompt- and instruction-level strict and loose accuracy")
    _server_args(e)
    _generation_args(e)
    e.add_argument("--responses", type=Path, default=None,
                   help="score this JSONL of {prompt, response} instead of asking the endpoint")
    e.set_defaults(func=_ifeval)

    w = esub.add_parser("pairwise", help="win rate against a baseline on AlpacaEval prompts, by an LLM judge")
    _server_args(w)
    _generation_args(w)
    w.add_argument("--answers", type=Path, default=None,
                   help="model A's answers (AlpacaEval JSON or JSONL of {instruction, output}) instead of --endpoint")
    g = w.add_argument_group("baseline (default: AlpacaEval's GPT-4-turbo reference answers)")
    g.add_argument("--baseline-answers", type=Path, default=None, help="answers file, as --answers")
    g.add_argument("--baseline-endpoint", default=None, help="or a server whose model answers")
    g.add_argument("--baseline-model", default=None)
    g = w.add_argument_group("judge")
    g.add_argument("--judge-endpoint", default=JUDGE_URL, help="default $HUMPBACK_JUDGE_URL or %(default)s")
    g.add_argument("--judge-model", default=None, help="default: the first model the judge lists")
    g.add_argument("--judge-max-chars", type=int, default=2000, help="answers are cut to this in the judge prompt")
    g = w.add_argument_group("prompts and interval")
    g.add_argument("--dataset", default=None, help="vicuna, selfinstruct, oasst, koala or helpful_base only")
    g.add_argument("--ci", choices=("bootstrap", "normal"), default="bootstrap")
    g.add_argument("--ci-level", type=float, default=0.95)
    w.set_defaults(func=_pairwise)

    n = esub.add_parser("nll", help="mean NLL of held-out human responses (prompt log-probabilities)")
    n.add_argument("seed_file", type=Path, help="JSONL of {instruction, output} or {messages} pairs")
    _server_args(n)
    _system_arg(n.add_argument_group("prompt"))
    n.set_defaults(func=_nll)
