"""The one config of `humpback run`: defaults are the embedded CPU demo; every value is overridable
from a YAML/JSON file or `--set section.field=value`. The resolved config is saved in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from humpback.contracts import DEFAULT_URLS, SERVE_STATE_DIR, TRAINER_DATA_DIR, TRAINER_URL


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """Where the seed, held-out and corpus come from.

    build_demo: build them with `humpback data demo` (from the installed Debian docs) into
        `RUN_DIR/data` when no paths are given.
    seed / heldout: SeedPair JSONL files (`humpback data demo` or `humpback data oasst1` output).
    corpus: unlabelled corpora (JSONL/text/Parquet, gzip'd or not).
    max_seed: seed pairs kept after the ~10% held-out split (which uses every pair); max_corpus_docs:
        documents of the corpus;
    max_segments: segments sent to the backward model. Demo sizes: the CPU budget, not the method,
        sets them.
    """

    build_demo: bool = True
    seed: Path | None = None
    heldout: Path | None = None
    corpus: list[Path] = Field(default_factory=list)
    text_field: str = "text"
    # A CPU job sees 6 x 8 = 48 examples: 60 seed pairs leave room for A_k in M1's, as in the paper
    # where curated data outnumbers the seed.
    max_seed: int = 60
    max_corpus_docs: int = 300
    max_segments: int = 128


class ServicesConfig(_Section):
    """The model servers and the trainer; started by the run when they do not answer."""

    backward_url: str = DEFAULT_URLS["backward"]
    scorer_url: str = DEFAULT_URLS["scorer"]
    trainer_url: str = TRAINER_URL
    api_key: str | None = None
    start: bool = True
    state_dir: Path = SERVE_STATE_DIR
    trainer_data_dir: Path = TRAINER_DATA_DIR


class TrainConfig(_Section):
    """Training presets (see `trainer/config.py`) per model, and an optional step override.

    The demo trains five models (M_yx, M0, M1, M2, the uncurated control). On 2 cores a step of batch 8
    (max_length 512) takes ~35 s, ~40 s of each job is start, export and swap, and the other stages take
    ~13 min, so 6 steps per job keep the whole run under 40 minutes. Set max_steps to null for the
    preset's schedule.
    """

    backward_preset: str = "cpu-demo"
    forward_preset: str = "cpu-demo"
    max_steps: int | None = 6


class AugmentSection(_Section):
    """max_tokens caps an instruction (a cut one is no candidate); seed is vLLM's per-request seed,
    which CPU servers refuse (see services.guard)."""

    max_tokens: int = 96
    seed: int | None = None


class CurateSection(_Section):
    """k: min_score is the paper's A_5 ("score >= 4.5"). top_fraction, when set, replaces it by the
    lowest score of the best-scored fraction: the demo's few-step 135M scorer puts almost every pair
    below 2 (measured: 146 of 149 in [1, 2)), so an absolute 4.5 keeps nothing there, while its ranking
    still separates pairs. Set top_fraction to null for the paper's rule.
    """

    mode: Literal["logprobs", "free_text"] = "logprobs"
    min_score: float = 4.5
    top_fraction: float | None = Field(default=0.25, gt=0.0, le=1.0)
    thresholds: list[float] = Field(default_factory=lambda: [3.0, 3.5, 4.0, 4.5])


class EvalSection(_Section):
    """What each trained model is evaluated on (sizes chosen for a 2-core CPU).

    judge_url / judge_model: the pairwise judge (any OpenAI-compatible server); None judges with the
        evaluated model's own server, which a 135M model does badly (see docs/eval.md).
    nll_limit: held-out pairs whose NLL is measured (None: all of them).
    """

    judge_url: str | None = None
    judge_model: str | None = None
    ifeval_limit: int = 24
    pairwise_limit: int = 12
    nll_limit: int | None = 16
    max_tokens: int = 128
    nll: bool = True
    ablation: bool = True


class RunConfig(_Section):
    iterations: int = 2
    data: DataConfig = Field(default_factory=DataConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    curate: CurateSection = Field(default_factory=CurateSection)
    eval: EvalSection = Field(default_factory=EvalSection)


# `--quick`: the tests' preset, minutes on a CPU.
QUICK: dict[str, Any] = {
    "iterations": 1,
    "data": {"max_seed": 20, "max_corpus_docs": 24, "max_segments": 12},
    "train": {"backward_preset": "cpu-test", "forward_preset": "cpu-test", "max_steps": None},
    "augment": {"max_tokens": 48},
    "curate": {"min_score": 1.0, "top_fraction": None},  # keep all: exercise every path
    "eval": {"ifeval_limit": 3, "pairwise_limit": 2, "nll_limit": 4, "max_tokens": 48, "ablation": True},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"--set expects section.field=value, got {item!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    tree: dict[str, Any] = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def load_config(path: Path | None = None, quick: bool = False, overrides: list[str] = ()) -> RunConfig:
    data: dict[str, Any] = QUICK if quick else {}
    if path is not None:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text)
        data = _merge(data, loaded)
    for item in overrides:
        data = _merge(data, _parse_override(item))
    return RunConfig.model_validate(data)
