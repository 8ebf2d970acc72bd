"""`humpback eval calibrate`: fit the `combined` scorer's combiner on held-out pairs.

The pairs (the run's calibration split of the seed, held out of training) are the positives; the
negatives are built from them as `eval scorer` builds them, every kind. Both directions' likelihood
signals are computed by the served scorer and backward model (`client.likelihood`, journaled beside
`--out`), a logistic regression is fitted on them (`client.calibration.fit`), and the combiner is
written to `--out` (JSON): its weights, the calibration file, how many pairs and negatives of each
kind, and the pairs' content ids, so `eval scorer` refuses to measure it on them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from client.calibration import FEATURES, Combiner, fit
from client.curate import CurateConfig
from client.fanout import FanoutConfig
from humpback.contracts import InputError
from humpback.evaluation.scorer import ScorerEvalConfig, pair_ids, score_pairs


async def run_calibration(pairs_path: Path, out: Path, fanout: FanoutConfig, backward_endpoint: str,
                          model: str | None = None, config: ScorerEvalConfig | None = None, limit: int | None = None,
                          seed: int = 0, terms: Path | None = None, checkpoint: str | None = None) -> Combiner:
    """Fit and write the combiner of the served scorer (`fanout`, its weights' version `checkpoint`, None:
    the served root) and backward model on the pairs of `pairs_path` (a `limit` subset drawn with `seed`)
    and negatives built from them; the likelihood terms are journaled in `terms` (None: beside `out`'s
    scores)."""
    score = CurateConfig(scorer="combined", backward_endpoint=backward_endpoint, terms=terms, checkpoint=checkpoint)
    built, scored, curate_cfg = await score_pairs(pairs_path, out, fanout, model, config or ScorerEvalConfig(), limit,
                                                  seed, score)
    labels = [kind == "positive" for kind, *_ in built]
    if all(labels) or not any(labels):
        raise InputError(f"{pairs_path}: too few pairs to build negatives from; calibrate on two or more")
    signals = [s.signals or {} for s in scored]
    mean, scale, coef, intercept = fit(signals, labels, seed)
    pairs = [p for kind, p, *_ in built if kind == "positive"]
    combiner = Combiner(features=list(FEATURES), mean=mean, scale=scale, coef=coef, intercept=intercept,
                        data=str(pairs_path), pairs=len(pairs),
                        negatives=dict(Counter(kind for kind, *_ in built if kind != "positive")),
                        pair_ids=pair_ids(pairs), scorer_model=curate_cfg.model or "",
                        backward_endpoint=backward_endpoint)
    combiner.write(out)
    return combiner
