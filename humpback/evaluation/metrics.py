"""What the stage metrics share (`eval backward`, `eval scorer`): the `Metric` record with its
bootstrap interval, the statistics they bootstrap, the held-out pairs they read, and their output.

Every interval is a seeded percentile bootstrap (`N_BOOT` resamples of the measured items with
replacement), so two runs on the same rows print the same interval.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from humpback import contracts
from humpback.evaluation.common import table
from humpback.evaluation.records import HeldoutPair

N_BOOT = 1000
LEVEL = 0.95


class Metric(BaseModel):
    """One measured number: its value, the 95% bootstrap interval and the number of items behind it.

    `value` and `ci95` are None when no item was measured (`n` 0): a precision among no kept pairs,
    say, is undefined rather than 0.
    """

    model_config = ConfigDict(extra="forbid")

    value: float | None
    ci95: tuple[float, float] | None
    n: int


def bootstrap(statistic: Callable[..., float], *sizes: int, n_boot: int = N_BOOT, seed: int = 0,
              level: float = LEVEL) -> Metric:
    """`statistic` of every item, with a percentile interval from `n_boot` resamples.

    `statistic` takes one array of item indices per group of `sizes`; each group is resampled on its
    own (stratified: an AUC's positives and negatives keep their numbers). Resamples whose statistic
    is undefined (NaN) are left out of the interval; where the statistic of all items is undefined
    (no items, no bigrams), so are the value and the interval."""
    value = float(statistic(*(np.arange(n) for n in sizes))) if sizes and min(sizes) > 0 else float("nan")
    if np.isnan(value):
        return Metric(value=None, ci95=None, n=sum(sizes))
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(*(rng.integers(0, n, n) for n in sizes)) for _ in range(n_boot)])
    lo, hi = np.nanquantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Metric(value=value, ci95=(float(lo), float(hi)), n=sum(sizes))


def mean_metric(values: Sequence[float], seed: int = 0, n_boot: int = N_BOOT) -> Metric:
    """The mean of `values`, bootstrapped over them."""
    arr = np.asarray(values, dtype=float)
    return bootstrap(lambda i: arr[i].mean(), len(arr), n_boot=n_boot, seed=seed)


def ratio_metric(numerators: Sequence[float], denominators: Sequence[float], seed: int = 0,
                 n_boot: int = N_BOOT) -> Metric:
    """sum(numerators) / sum(denominators), bootstrapped over the items (each item one pair of terms):
    a per-token mean over pairs of different lengths, or distinct bigrams over instructions."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)

    def ratio(i: np.ndarray) -> float:
        total = den[i].sum()
        return float(num[i].sum() / total) if total > 0 else float("nan")

    return bootstrap(ratio, len(num), n_boot=n_boot, seed=seed)


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney U over both counts."""
    scores = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, the mean rank of each tie
    n_pos = len(positives)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * len(negatives)))


def auc_metric(positives: Sequence[float], negatives: Sequence[float], seed: int = 0, n_boot: int = N_BOOT) -> Metric:
    """ROC AUC of scores, positives against negatives, bootstrapped within each class."""
    pos, neg = np.asarray(positives, dtype=float), np.asarray(negatives, dtype=float)
    return bootstrap(lambda i, j: roc_auc(pos[i], neg[j]), len(pos), len(neg), n_boot=n_boot, seed=seed)


def bigrams(text: str) -> list[tuple[str, str]]:
    words = text.lower().split()
    return list(zip(words, words[1:]))


def distinct_2(texts: Sequence[str], seed: int = 0, n_boot: int = N_BOOT) -> Metric:
    """distinct-2 (Li et al. 2016): distinct word bigrams / all word bigrams over `texts` (lower-cased,
    split on white space).

    The interval resamples texts, each carrying its share of the distinct bigrams (1/count of each of
    its bigrams, counted over all texts), so the value is a ratio of per-text sums. Recounting the
    bigrams of each resample instead would count a text drawn twice as repetition and put the
    interval well below the value."""
    grams = [bigrams(t) for t in texts]
    counts: dict[tuple[str, str], int] = {}
    for g in grams:
        for b in g:
            counts[b] = counts.get(b, 0) + 1
    shares = [sum(1 / counts[b] for b in g) for g in grams]
    return ratio_metric(shares, [len(g) for g in grams], seed, n_boot)


def read_pairs(path: Path) -> list[HeldoutPair]:
    """Held-out human pairs (`contracts.read_pairs`: `instruction` and `response` strings per line,
    `output` read for `response`); `InputError` names a line that is none, or a file with no pair."""
    pairs = [HeldoutPair(line=n, instruction=x, response=y) for n, x, y in contracts.read_pairs(path)]
    if not pairs:
        raise contracts.InputError(f"{path}: no pairs")
    return pairs


def beside(out: Path, kind: str) -> Path:
    """`results/backward.json` -> `results/backward.<kind>`: where a command's side files go."""
    return out.with_name(f"{out.stem}.{kind}")


def write_metrics(path: Path, metrics: Mapping[str, Metric]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {name: m.model_dump(mode="json") for name, m in metrics.items()}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_metrics(path: Path) -> dict[str, Metric]:
    return {name: Metric.model_validate(m) for name, m in json.loads(path.read_text(encoding="utf-8")).items()}


def format_metrics(title: str, metrics: Mapping[str, Metric]) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    return table([(title, "value", "95% CI", "n"),
                  *((name, num(m.value), "-" if m.ci95 is None else f"[{num(m.ci95[0])}, {num(m.ci95[1])}]",
                     str(m.n)) for name, m in metrics.items())])
