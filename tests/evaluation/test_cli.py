"""`humpback eval ifeval|pairwise|nll`: one flag per settings field, values from flag > environment > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from humpback.contracts import API_KEY_ENV, DEFAULT_URLS, SEED_SYSTEM_PROMPT
from humpback.evaluation.cli import (NLL_UNUSED, PAIRWISE_SUBSET, IFEvalInput, PairwiseSides, Run, Server, SystemTag,
                                     _generation)
from humpback.evaluation.common import GenerationConfig
from humpback.evaluation.pairwise import PairwiseConfig
from humpback.settings import flags, from_args, parser_flags
from tests.subcommand import subcommand

# The names the commands had before their flags were generated: scripts keep working.
SERVER_FLAGS = {"--endpoint", "--model", "--api-key", "--concurrency", "--timeout", "--out", "--limit"}
GENERATION_FLAGS = {"--max-tokens", "--temperature", "--system"}


def _flags(*models: type, run_exclude: tuple[str, ...] = ()) -> set[str]:
    """The flags of `Run` (less `run_exclude`) and of every model in `models`."""
    return set(flags(Run, exclude=run_exclude)).union(*(flags(m) for m in models))


def test_every_field_has_a_flag_and_every_flag_a_field() -> None:
    ifeval = parser_flags(subcommand("eval", "ifeval"))
    assert ifeval == _flags(Server, GenerationConfig, SystemTag, IFEvalInput)
    assert SERVER_FLAGS | GENERATION_FLAGS | {"--seed", "--responses"} == ifeval

    pairwise = parser_flags(subcommand("eval", "pairwise"))
    assert pairwise == _flags(Server, GenerationConfig, SystemTag, PairwiseSides, PairwiseConfig,
                              run_exclude=PAIRWISE_SUBSET)
    assert SERVER_FLAGS | GENERATION_FLAGS | {"--seed", "--answers", "--baseline-answers", "--baseline-endpoint",
                                              "--baseline-model", "--judge-endpoint", "--judge-model",
                                              "--judge-max-chars", "--dataset", "--ci", "--ci-level",
                                              "--max-flip-rate"} == pairwise

    nll = parser_flags(subcommand("eval", "nll"))
    assert nll == _flags(Server, SystemTag, run_exclude=NLL_UNUSED)
    assert SERVER_FLAGS | {"--system"} == nll


def test_endpoints_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = subcommand("eval", "pairwise")
    for var in ("HUMPBACK_EVAL_URL", "HUMPBACK_JUDGE_URL", API_KEY_ENV):
        monkeypatch.delenv(var, raising=False)
    args = parser.parse_args(["--out", "o"])
    assert from_args(Server, args).endpoint == DEFAULT_URLS["backward"]
    assert from_args(PairwiseSides, args).judge_endpoint == DEFAULT_URLS["scorer"]
    monkeypatch.setenv("HUMPBACK_EVAL_URL", "http://eval:1")
    monkeypatch.setenv("HUMPBACK_JUDGE_URL", "http://judge:2")
    monkeypatch.setenv(API_KEY_ENV, "k")
    server = from_args(Server, args)
    assert (server.endpoint, server.api_key, from_args(PairwiseSides, args).judge_endpoint) == (
        "http://eval:1", "k", "http://judge:2")
    args = parser.parse_args(["--out", "o", "--endpoint", "http://flag:3", "--judge-endpoint", "http://flag:4"])
    assert (from_args(Server, args).endpoint, from_args(PairwiseSides, args).judge_endpoint) == (
        "http://flag:3", "http://flag:4")


def test_values_reach_the_configs() -> None:
    args = subcommand("eval", "pairwise").parse_args(
        ["--out", "o", "--limit", "5", "--seed", "2", "--ci", "normal", "--system", "seed", "--max-tokens", "64",
         "--concurrency", "4", "--timeout", "9"])
    assert from_args(PairwiseConfig, args) == PairwiseConfig(limit=5, seed=2, ci="normal")
    assert _generation(args) == GenerationConfig(max_tokens=64, system_prompt=SEED_SYSTEM_PROMPT)
    fan = from_args(Server, args).fanout("http://judge:2")
    assert (fan.endpoints, fan.concurrency, fan.timeout) == (["http://judge:2"], 4, 9.0)
    assert from_args(Run, args, exclude=PAIRWISE_SUBSET).out == Path("o")
    assert _generation(subcommand("eval", "ifeval").parse_args(["--out", "o"])) == GenerationConfig()
    with pytest.raises(SystemExit):  # --out is required
        subcommand("eval", "nll").parse_args(["seed.jsonl"])
