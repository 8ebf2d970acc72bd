"""Evaluate one trained model of the loop on IFEval, pairwise win rate and held-out NLL."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from humpback.contracts import SEED_SYSTEM_PROMPT

if TYPE_CHECKING:
    from humpback.loop.run import Loop


def mean_ci(values: list[float], z: float = 1.96) -> list[float] | None:
    if len(values) < 2:
        return None
    m, s = statistics.fmean(values), statistics.stdev(values)
    return [m - z * s / math.sqrt(len(values)), m + z * s / math.sqrt(len(values))]


def evaluate_model(loop: Loop, name: str, model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    from humpback.evaluation.common import GenerationConfig
    from humpback.evaluation.ifeval import run_ifeval
    from humpback.evaluation.nll import run_nll
    from humpback.evaluation.pairwise import Contender, PairwiseConfig, run_pairwise
    from client.fanout import FanoutConfig

    cfg = loop.cfg.eval
    url = loop.deployed(model)
    fan = FanoutConfig(endpoints=[url], api_key=loop.svc.api_key)
    judge = FanoutConfig(endpoints=[cfg.judge_url or url], api_key=loop.svc.api_key)
    out = loop.dir / "eval" / name
    # The paper's best inference-time tag (Table 8): answer in the seed's AI-assistant style.
    gen = GenerationConfig(max_tokens=cfg.max_tokens, system_prompt=SEED_SYSTEM_PROMPT)
    role = model["role"]

    async def both() -> tuple[Any, Any]:
        ife = await run_ifeval(out, fan, model=role, gen=gen, limit=cfg.ifeval_limit)
        pw = await run_pairwise(out, Contender(fanout=fan, model=role), Contender(), judge,
                                judge_model=cfg.judge_model, gen=gen, config=PairwiseConfig(limit=cfg.pairwise_limit))
        return ife, pw

    ife, pw = asyncio.run(both())
    result: dict[str, Any] = {
        "model": model["fine_tuned_model"],
        "ifeval": {"n": ife.prompt_level.n, "prompt_strict": ife.prompt_level.strict, "prompt_loose": ife.prompt_level.loose,
                   "instruction_strict": ife.instruction_level.strict, "instruction_loose": ife.instruction_level.loose},
        "pairwise": {"n": pw.n, "win_rate": pw.win_rate, "ci": [pw.ci_low, pw.ci_high], "wins": pw.wins,
                     "ties": pw.ties, "losses": pw.losses, "judge": pw.judge_model, "baseline": pw.model_b},
    }
    if cfg.nll and data.get("heldout") and Path(data["heldout"]).is_file():
        nll = asyncio.run(run_nll(Path(data["heldout"]), out, fan, model=role, limit=cfg.nll_limit,
                                  system_prompt=SEED_SYSTEM_PROMPT))
        # Mean over pairs of each pair's per-token NLL, so that the interval (over pairs) fits it.
        result["nll"] = {"n": nll.pairs, "mean": nll.nll_per_pair, "per_token": nll.nll_per_token,
                         "ci": mean_ci(_pair_means(out / "nll.rows.jsonl")), "perplexity": nll.perplexity}
    return result


def _pair_means(rows: Path) -> list[float]:
    with rows.open(encoding="utf-8") as f:
        return [r["nll_mean"] for r in map(json.loads, f) if r.get("nll_mean") is not None]
