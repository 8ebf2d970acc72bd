"""The one config of `humpback run`: defaults are the embedded CPU demo; every value is overridable
from a YAML/JSON file or `--set section.field=value`. The resolved config is saved in the run folder.

`augment`, `curate` and `rewrite` are the client's own `AugmentConfig`, `CurateConfig` and
`RewriteConfig` (declared once, in `client/`), with the demo's values in `DEMO`; the training presets
are the trainer's `PRESETS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from client.augment import AugmentConfig
from client.curate import CurateConfig, Scorer
from client.rewrite import RewriteConfig
from humpback.contracts import (
    DEFAULT_MODEL_DIR, DEFAULT_URLS, JUDGE_API_KEY_ENV, QUALITY_MODEL_DIR, REWRITE_API_KEY_ENV, SERVE_STATE_DIR,
    TRAINER_DATA_DIR, TRAINER_URL,
)
from humpback.settings import env_values, setting, stack_api_key
from services.config import ServeConfig
from trainer.config import PresetName


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """Where the seed, held-out and corpus come from. Demo sizes: the CPU budget, not the method, sets them."""

    build_demo: bool = setting(True, "build the seed, held-out and corpus with `humpback data demo` (from the "
                                     "installed Debian docs) into RUN_DIR/data when no paths are given")
    seed: Path | None = setting(None, "seed pairs, JSONL: {instruction, response}, Alpaca's {instruction, input, "
                                      "output} or OpenAI chat {messages} lines (docs/data.md), or `humpback data "
                                      "oasst1|demo` output; a bad line goes to RUN_DIR/data/errors.jsonl")
    heldout: Path | None = setting(None, "held-out pairs, in the formats of data.seed")
    corpus: list[Path] = setting(default_factory=list,
                                 help="unlabelled corpora: JSONL or text (either may be .gz) or Parquet")
    text_field: str = setting("text", "JSONL/Parquet field holding the text")
    # A CPU job sees 6 x 8 = 48 examples: 60 seed pairs leave room for A_k in M1's, as in the paper
    # where curated data outnumbers the seed.
    max_seed: int = setting(60, "seed pairs kept after the ~10% held-out split (which uses every pair)")
    max_corpus_docs: int = setting(300, "documents of the corpus")
    # 64 on the demo: each segment costs a backtranslation and, per iteration, four likelihood terms
    # (the combined scorer); 128 took the demo past 25 minutes.
    max_segments: int = setting(64, "segments sent to the backward model (the augment stage's limit)")
    calibration_pairs: int = setting(24, "pairs moved from the seed side's rest (seed_rest.jsonl, the seed pairs "
                                         "past data.max_seed) to RUN_DIR/data/calibration.jsonl, held out of every "
                                         "training set and of the evaluation: what each iteration's `combined` "
                                         "scorer is calibrated on (curate.scorer)", ge=0)

    def problem(self) -> str | None:
        """What keeps the data stage from starting, with the fix (None when nothing does)."""
        if self.seed is None and self.corpus:
            return "data.corpus is given without data.seed: give both (docs/data.md), or neither for the demo's data"
        if self.seed is not None and not self.corpus:
            return "data.seed is given without data.corpus: give both (docs/data.md), or neither for the demo's data"
        if self.heldout is not None and self.seed is None:
            return "data.heldout is given without data.seed and data.corpus: give all three (docs/data.md)"
        if self.seed is None and not self.build_demo:
            return "no data: give data.seed and data.corpus (docs/data.md), or set data.build_demo"
        return None


class ServicesConfig(_Section):
    """The model servers and the trainer; started by the run when they do not answer."""

    base_model: str = setting(str(DEFAULT_MODEL_DIR), "the model every role starts from: the folder the servers the "
                                                     "run starts serve and the trainer it starts fine-tunes, and what "
                                                     "running servers and trainer must serve (their /v1/models), "
                                                     "else the run is refused")
    backward_url: str = setting(DEFAULT_URLS["backward"], "base URL of the backward model's server")
    scorer_url: str = setting(DEFAULT_URLS["scorer"], "base URL of the scorer's (forward model's) server")
    trainer_url: str = setting(TRAINER_URL, "base URL of the trainer")
    api_key: str | None = stack_api_key("sent to the model servers and the trainer, and required by those the run "
                                        "starts")
    start: bool = setting(True, "start the servers and the trainer when they do not answer")
    ray: str | None = setting(None, "run the augment, curate and rewrite stages on this Ray cluster (an address, "
                                    "auto or local: `humpback augment --ray`, docs/ray.md), each stage split into "
                                    "shards by content id; a stage's own `ray` (augment.ray, ...) beats it")
    state_dir: Path = setting(SERVE_STATE_DIR, "state folder of `humpback serve up`")
    trainer_data_dir: Path = setting(TRAINER_DATA_DIR, "data folder of the trainer it starts")

    @property
    def registry(self) -> Path:
        """The servers' registry, which `serve up` keeps in `state_dir`."""
        return ServeConfig(state_dir=self.state_dir, servers=[]).registry


class TrainConfig(_Section):
    """The demo trains four models (M_yx, M0, M1, M2; `make demo-ablations` two more: M1 on rewritten pairs
    and the uncurated control). On 2 cores a step of 8 examples of up to 512 tokens, one per forward pass
    (the cpu-demo preset), takes ~22 s, and ~20 s of each job is start, export and swap: with 4 steps per
    forward job the four jobs took ~9 of `make demo`'s minutes (docs/results.md)."""

    backward_preset: PresetName = setting("cpu-demo-short", "training preset of the backward model "
                                                            "(trainer/config.py)")
    forward_preset: PresetName = setting("cpu-demo", "training preset of the forward models M0, M1, ...")
    max_steps: int | None = setting(4, "steps of every forward job (M0, M1, ..., the rewrite arm, the control); "
                                       "null for the preset's schedule")
    backward_max_steps: int | None = setting(12, "steps of the backward model's job: its short examples cost half a "
                                                 "forward step each; null for the preset's schedule")
    backward_examples: Literal["seed", "short"] = setting(
        "short", "what M_yx learns from. seed: the forward models' seed pairs, reversed (the paper). short: every "
        "pair of the seed side of the split, data.max_seed's cap aside (seed.jsonl and seed_rest.jsonl), whose "
        "response has at most 700 characters and whose instruction is one line (contracts.short_pairs): on the "
        "demo, more pairs in shorter examples took M_yx's usable rate from 0.56 to 0.84 and its ROUGE-L from 0.136 "
        "to 0.189 at the same cost (docs/results.md, Quality)")


# The k values whose kept counts the report shows, by scorer: the rubric's 1-5 scale, and P(good pair).
# A PMI's scale is the data's: no fixed k means anything there.
THRESHOLDS = {"rubric": [3.0, 3.5, 4.0, 4.5], "combined": [0.5, 0.7, 0.8, 0.9]}


class CurateSection(CurateConfig):
    """The client's curate settings, and the thresholds whose kept counts the report plots."""

    # The loop calibrates `combined` itself (a stage before each curate), so it can default to the scorer that
    # measured best; `humpback curate` keeps `rubric`, which needs no calibration file.
    scorer: Scorer = setting("combined", "rubric: the paper's 5-point rubric; pmi, reverse_pmi: the likelihood "
                                         "signals; combined: P(good pair) from both, calibrated each iteration "
                                         "(stage calibrate_t) on data.calibration_pairs with the current scorer "
                                         "and backward model, falling back to pmi (one warning) when it cannot "
                                         "be (docs/curation.md). Measured on held-out pairs, 135M untrained: "
                                         "rubric AUC 0.56, pmi 0.92, reverse_pmi 0.88, combined 0.98")
    thresholds: list[float] | None = setting(None, help="k values whose kept counts the report shows; null: the "
                                                         "scorer's (rubric 3-4.5, combined P 0.5-0.9, none for a PMI)")

    def calibrates(self) -> bool:
        """Whether each iteration fits its own combiner (stage calibrate_t): `combined` without one given."""
        return self.scorer == "combined" and self.calibration is None

    def kept_thresholds(self, scorer: str) -> list[float]:
        return self.thresholds if self.thresholds is not None else THRESHOLDS.get(scorer, [])


class RewriteSection(RewriteConfig):
    """The client's rewrite settings, and the loop's rewrite ablation arm: M1 trained on the curated A_1
    with its responses rewritten, against M1 on the originals."""

    enabled: bool = setting(True, "rewrite A_1's responses after curate_1 and train and evaluate M1 on the seed and "
                                  "the rewritten pairs beside M1 (the report's \"Rewrite ablation\")")
    url: str | None = setting(None, "the rewriter: base URL of an OpenAI-compatible server of an aligned model "
                                    "(sent rewrite.api_key, never the stack's key); null: the model of model_dir, "
                                    "else M0")
    api_key: str | None = setting(None, "bearer token of rewrite.url, a server the stack does not own; null sends "
                                        "no Authorization header", env=REWRITE_API_KEY_ENV)
    model_dir: Path | None = setting(None, "the rewriter when url is null: a model folder the run serves for the "
                                           "rewrite stage alone (a vLLM server of role `rewriter` on `port`, "
                                           "started before the stage and stopped after it). null: the run's scorer "
                                           "server while it serves M0, right after curate_1 (no other server or "
                                           "swap), which on the CPU default loops until the token cap on every "
                                           "pair: a 135M model cannot rewrite a passage (docs/architecture.md, "
                                           "Past the paper)")
    port: int = setting(8003, "port of the server that serves model_dir")

    @model_validator(mode="after")
    def _model_needs_url(self) -> RewriteSection:
        if self.model is not None and self.url is None:
            raise ValueError("rewrite.model names a model of rewrite.url; with url null the loop sets it (the "
                             "`rewriter` it serves, or M0 served as the scorer): remove it or give rewrite.url")
        return self


class EvalSection(_Section):
    """What each trained model is evaluated on (sizes chosen for a 2-core CPU)."""

    judge_url: str | None = setting(None, "the pairwise judge (any OpenAI-compatible server); null judges with the "
                                          "evaluated model's own server, which a 135M model does badly "
                                          "(see docs/eval.md)")
    judge_model: str | None = setting(None, "the judge's model name")
    judge_api_key: str | None = setting(None, "bearer token of judge_url, a server the stack does not own (it is "
                                              "never sent the stack's key); null sends no Authorization header",
                                        env=JUDGE_API_KEY_ENV)
    ifeval_limit: int = setting(24, "IFEval prompts")
    pairwise_limit: int = setting(12, "pairwise-judged prompts")
    nll_limit: int | None = setting(16, "held-out pairs whose NLL is measured (null: all of them)")
    max_tokens: int = setting(128, "answer length cap")
    nll: bool = setting(True, "measure the held-out NLL")
    ablation: bool = setting(True, "train and evaluate the uncurated control")
    # Cost on the demo's 2 cores at 32 pairs, measured in `make demo`: 33-35 s per backward model and 140 s
    # per scorer with the combined scorer (each pair with 5 negatives, 4 likelihood terms each), so 16.
    stage_metrics: bool = setting(True, "measure the stages against held-out human pairs: the backward model before "
                                        "and after training (`eval backward`), each model used as a scorer "
                                        "(`eval scorer`), and the candidates' usable rate and diversity")
    stage_pairs: int | None = setting(16, "held-out pairs of the stage metrics, a seeded subset (null: all of them)",
                                      ge=1)


# The demo's values where they differ from the client's defaults.
DEMO: dict[str, Any] = {
    # max_tokens caps an instruction (a cut one is no candidate): the backward model's instructions are
    # short. seed stays unset: the CPU servers refuse vLLM's per-request seed (see services.guard).
    "augment": {"max_tokens": 96},
    # The demo's few-step 135M scorer puts almost every pair below 2 (measured: 146 of 149 in [1, 2)), so the
    # paper's absolute k = 4.5 keeps nothing there, while its ranking still separates pairs: keep its best
    # quarter. `--set curate.top_fraction=null` restores the paper's rule.
    "curate": {"top_fraction": 0.25},
    # The rewriter is Qwen2.5-Coder-0.5B-Instruct (`make models-quality`). On 24 demo passages it finished
    # 22 rewrites within 768 tokens and 9 within 384 (the rest are cut, so they are no rewrite); M1's
    # examples are cut at 512 tokens anyway (the cpu-demo preset), as the longest originals are.
    "rewrite": {"model_dir": str(QUALITY_MODEL_DIR), "max_tokens": 768},
}

# Set by the loop for each stage: the served role, the job that trained it, files of the run folder.
# (`rewrite.model` is the loop's only where `rewrite.url` is null: `RewriteSection` checks it.)
STAGE_FIELDS = {"augment": ("model", "checkpoint", "limit", "shard"),
                "curate": ("model", "checkpoint", "scored", "terms", "shard"),
                "rewrite": ("checkpoint", "shard")}

# The run's keys: left out of the config the run saves, which is copied with the run folder.
SECRETS = {"services": {"api_key"}, "rewrite": {"api_key"}, "eval": {"judge_api_key"}}


class RunConfig(_Section):
    iterations: int = setting(2, "self-training iterations (M1, M2, ...)")
    data: DataConfig = Field(default_factory=DataConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    curate: CurateSection = Field(default_factory=CurateSection)
    rewrite: RewriteSection = Field(default_factory=RewriteSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, data: Any) -> Any:
        """The demo's values under whatever the caller gives, so `{"curate": {"mode": ...}}` keeps the rest."""
        return _merge(DEMO, data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _stage_fields_unset(self) -> RunConfig:
        for section, names in STAGE_FIELDS.items():
            for name in names:
                if getattr(getattr(self, section), name) is not None:
                    raise ValueError(f"{section}.{name} is set by the loop for each stage; remove it from the config"
                                     + (" (data.max_segments sets the augment limit)" if name == "limit" else "")
                                     + (" (the loop runs whole stages: shard with `humpback augment|curate|rewrite "
                                        "--shard` and `humpback merge`)" if name == "shard" else ""))
        return self


# `--quick`: the tests' preset, minutes on a CPU.
QUICK: dict[str, Any] = {
    "iterations": 1,
    "data": {"max_seed": 20, "max_corpus_docs": 24, "max_segments": 12, "calibration_pairs": 8},
    "train": {"backward_preset": "cpu-test", "forward_preset": "cpu-test", "max_steps": None,
              "backward_max_steps": None},
    "augment": {"max_tokens": 48},
    "curate": {"top_fraction": 1.0},  # keep all, on any scorer's scale: exercise every path
    # The arm stays on, briefly, with M0 as the rewriter (the tests use the models `make setup` prepares):
    # in the loop test M0 ran past 96 tokens on all 12 pairs, so there it exercises the failure path
    # (counted, left out) and M1-rewritten learns from the seed alone.
    "rewrite": {"model_dir": None, "max_tokens": 96},
    "eval": {"ifeval_limit": 3, "pairwise_limit": 2, "nll_limit": 4, "max_tokens": 48, "ablation": True,
             "stage_pairs": 4},
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
    """The run's config: `--set` overrides beat the config file, which beats the environment
    (`HUMPBACK_API_KEY`, ...), which beats the defaults (the demo, or `QUICK`)."""
    data: dict[str, Any] = _merge(QUICK if quick else {}, env_values(RunConfig))
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
