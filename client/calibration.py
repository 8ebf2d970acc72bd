"""The `combined` scorer's model: a logistic regression that turns a pair's likelihood signals into
P(good pair), fitted on held-out pairs and negatives built from them (`humpback eval calibrate`),
applied by `curate --scorer combined --calibration FILE`.

The features are the summed and per-token PMI of both directions and log(response tokens): summed
PMI rewards complete responses, per-token PMI does not, and length alone tells a cut response from
the whole one; the regression weighs them. The fitted weights are a small JSON file (`Combiner`),
applied here without scikit-learn, which only fitting needs (the `quality` extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from humpback.contracts import InputError

FEATURES = ("pmi", "pmi_per_token", "reverse_pmi", "reverse_pmi_per_token", "log_response_tokens")


def features(signals: dict[str, float]) -> list[float]:
    """The combiner's features of one pair's signals (`client.likelihood.pmi_signals` of both directions)."""
    derived = {**signals, "log_response_tokens": math.log(max(1.0, signals["pmi_target_tokens"]))}
    return [derived[f] for f in FEATURES]


class Combiner(BaseModel):
    """A fitted combiner: P(good) = sigmoid(intercept + sum(coef * (x - mean) / scale)) over `features`,
    and what it was fitted on (`data`: the calibration pairs' file; `pair_ids`: their content ids, so
    an evaluation can refuse to measure it on them; `negatives`: count per kind)."""

    model_config = ConfigDict(extra="forbid")

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    data: str
    pairs: int
    negatives: dict[str, int]
    pair_ids: list[str]
    scorer_model: str
    backward_endpoint: str

    @classmethod
    def load(cls, path: Path) -> Combiner:
        try:
            combiner = cls.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise InputError(f"{path}: cannot read the combiner ({exc.strerror or exc})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            raise InputError(f"{path}: not a combiner ({'.'.join(map(str, err['loc']))}: {err['msg']}); fit one with "
                             "`humpback eval calibrate`") from None
        if combiner.features != list(FEATURES):
            raise InputError(f"{path}: fitted on features {combiner.features}, this version computes {list(FEATURES)}")
        return combiner

    def __call__(self, signals: dict[str, float]) -> float:
        z = self.intercept + math.fsum(c * (x - m) / s for c, x, m, s in
                                       zip(self.coef, features(signals), self.mean, self.scale))
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n", encoding="utf-8")


def fit(signals: Sequence[dict[str, float]], labels: Sequence[bool], seed: int = 0) -> tuple[list[float], list[float],
                                                                                             list[float], float]:
    """(mean, scale, coef, intercept) of a logistic regression of `labels` on the standardized
    features of `signals` (scikit-learn, balanced classes: a fifth of the rows are positives)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.asarray([features(s) for s in signals], dtype=float)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(class_weight="balanced", random_state=seed, max_iter=1000)
    model.fit((x - mean) / scale, np.asarray(labels, dtype=bool))
    return mean.tolist(), scale.tolist(), model.coef_[0].tolist(), float(model.intercept_[0])
