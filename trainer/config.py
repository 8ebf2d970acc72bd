"""Typed settings of the trainer service and the training presets, each field documented once.

`ServiceSettings` is what `humpback trainer serve` takes (its flags are generated from the fields);
`Preset` is a named set of training hyperparameters a job picks with `metadata.preset`.
"""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from humpback.contracts import (
    API_KEY_ENV,
    DEFAULT_MODEL_DIR,
    DEFAULT_URLS,
    LOOPBACK,
    TRAINER_DATA_DIR,
    TRAINER_PORT,
    Role,
)
from humpback.settings import setting, stack_api_key

FinetuneMethod = Literal["lora", "full"]


# Paper Table 18: number of training examples -> (batch size, steps).
PAPER_SCHEDULE: tuple[tuple[int, int, int], ...] = (
    (100, 8, 30),
    (800, 8, 300),
    (1_600, 8, 600),
    (3_200, 32, 500),
    (6_400, 32, 600),
    (12_800, 32, 600),
    (25_600, 32, 1_200),
    (51_200, 32, 1_600),
)


def paper_batch_size(n_examples: int) -> int:
    """Batch 8 under 3,000 examples, else 32 (paper §3.1)."""
    return 8 if n_examples < 3_000 else 32


def paper_steps(n_examples: int) -> int:
    """Steps from Table 18 for the largest listed size not above `n_examples` (the smallest row below 100)."""
    steps = PAPER_SCHEDULE[0][2]
    for size, _, row_steps in PAPER_SCHEDULE:
        if n_examples >= size:
            steps = row_steps
    return steps


class Preset(BaseModel):
    """Training hyperparameters a job starts from; the job's `hyperparameters` override some of them."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = setting(help="peak learning rate (`learning_rate_multiplier` scales it)")
    final_lr_ratio: float = setting(
        0.9, "the learning rate decays linearly from `learning_rate` to this fraction of it over the run "
        "(paper: 1e-5 -> 9e-6, i.e. 0.9)")
    weight_decay: float = setting(0.1, "AdamW weight decay (paper: 0.1)")
    dropout: float = setting(
        0.1, "LoRA dropout; the paper's 0.1 dropout applies to full fine-tuning through the model's attention dropout")
    batch_size: int | None = setting(
        None, "examples per optimizer step; None applies the paper's rule (8 under 3,000 examples, else 32)")
    micro_batch_size: int = setting(8, "examples per forward pass; the rest is gradient accumulation")
    max_steps: int | None = setting(
        None, "optimizer steps; None follows the paper's Table 18 for the data size, unless the job asks for n_epochs")
    max_length: int = setting(2048, "tokens per example (longer ones are truncated)")
    method: FinetuneMethod = setting(
        "lora", '"lora" (adapters on all linear layers, bf16, merged into full weights for export) or '
        '"full" (all weights, fp32)')
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scale")
    save_steps: int = setting(50, "a resumable checkpoint every this many steps (a killed job loses at most these)")
    gradient_checkpointing: bool = setting(
        True, "recompute activations in the backward pass instead of keeping them (TRL's default): less memory, "
        "~40% more time per step (2 CPU steps of the demo's M0 data: 44.7 s against 31.4)")

    def resolve_batch(self, n_examples: int, override: int | None) -> int:
        return override or self.batch_size or paper_batch_size(n_examples)

    def resolve_steps(self, n_examples: int, batch: int, n_epochs: int | None) -> int:
        if n_epochs:
            return n_epochs * math.ceil(n_examples / batch)
        return self.max_steps or paper_steps(n_examples)


PRESETS: dict[str, Preset] = {
    # The paper's settings as published: full fine-tuning, lr 1e-5 -> 9e-6, wd 0.1, dropout 0.1,
    # batch 8/32 and the Table 18 step schedule.
    "paper": Preset(learning_rate=1e-5, method="full", micro_batch_size=4),
    # The paper's schedule with LoRA (the service default): adapters need a ~10x larger learning
    # rate than full fine-tuning to move as far in the same number of steps.
    "paper-lora": Preset(learning_rate=1e-4),
    # A few minutes on a 2-core CPU: enough to see the loss fall on a small seed set. One example per
    # forward pass: a batch of 8 is padded to its longest example, which on the demo's M0 data made
    # 3 steps take 97 s against 54 s one by one (77 s two by two), for the same loss (same examples,
    # the loss normalised over the step's tokens either way). No gradient checkpointing: keeping
    # the activations of one 512-token example of a 135M model costs ~0.8 GB (the job's peak RSS 2.5 GB
    # against 1.7), and recomputing them made 2 steps of M0 take 44.7 s against 31.4 s, same losses.
    "cpu-demo": Preset(learning_rate=2e-4, batch_size=8, micro_batch_size=1, max_steps=30, max_length=512,
                       save_steps=10, gradient_checkpointing=False),
    # The demo's backward model: short examples (a response of <= 700 characters is < 256 tokens), so
    # a step costs half of cpu-demo's and twice the steps see twice the pairs (bench/bench_quality.py).
    "cpu-demo-short": Preset(learning_rate=2e-4, batch_size=8, micro_batch_size=1, max_steps=12, max_length=256,
                             save_steps=6, gradient_checkpointing=False),
    # Seconds per step on a CPU: for tests and smoke runs.
    "cpu-test": Preset(
        learning_rate=1e-3, batch_size=2, micro_batch_size=2, max_steps=3, max_length=256, save_steps=1,
        gradient_checkpointing=False,
    ),
}


# The presets' names, for `--default-preset`'s choices: the keys above are their one declaration.
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


def is_loopback(host: str) -> bool:
    """Whether `host` is an address of this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServiceSettings(BaseModel):
    """Settings of `humpback trainer serve`: one flag per field (`--models` is spelled `--model NAME=PATH`).

    Without an API key the service listens on loopback only: any other `host` is refused."""

    model_config = ConfigDict(extra="forbid")

    host: str = setting(LOOPBACK, f"where the API listens; other than loopback only with an API key ({API_KEY_ENV})")
    port: int = setting(TRAINER_PORT, "the API's port")
    data_dir: Path = setting(
        TRAINER_DATA_DIR, "the service's own folder: SQLite database, uploaded files (under service-chosen ids), "
        "checkpoints (checkpoints/<job_id>/); requests never name a path")
    api_key: str | None = stack_api_key("required on every request to the trainer when set (empty: none), and "
                                        "sent to the model servers it deploys to")
    backward_url: str = setting(DEFAULT_URLS["backward"],
                                "base URL (no /v1) of the backward server a job can deploy to, when the registry "
                                "records no backward server (each records itself and its URL at start, and a "
                                "deploy reaches every replica it records)")
    scorer_url: str = setting(DEFAULT_URLS["scorer"], "base URL (no /v1) of the scorer server a job can deploy to, "
                                                      "when the registry records none (as --backward-url)")
    registry: Path | None = setting(None, "the servers' registry: which servers serve each role and what they "
                                          "serve; their middleware reads it (default: the serve state's)")
    backward_model: Path = setting(
        DEFAULT_MODEL_DIR, "the folder the backward role serves; a job whose model is `backward` fine-tunes from it")
    scorer_model: Path = setting(
        DEFAULT_MODEL_DIR, "the folder the scorer role serves; a job whose model is `scorer` fine-tunes from it")
    models: dict[str, Path] = setting(default_factory=dict, help="register a further base model a job may name "
                                      "(repeatable)", flag="model", metavar="NAME=PATH")
    default_preset: PresetName = setting("paper-lora", "the preset of a job that names none in metadata.preset")
    max_attempts: int = setting(
        3, "how many times a job may be started: a job interrupted by a service restart is started again "
        "(resuming from its last checkpoint) until then, and failed after")
    swap_timeout: float = setting(300.0, "seconds allowed for one hot-swap")
    max_upload_bytes: int = setting(
        512 * 1024 * 1024, "the largest training file an upload may carry, in bytes (a larger one: 413)", ge=1)
    max_concurrent_uploads: int = setting(
        2, "uploads received at once; one more is answered 429 (uploads stream to disk, so this bounds "
        "open requests and disk writes)", ge=1)
    accelerate_config: Path | None = setting(
        None, "an `accelerate` config file (see trainer/accelerate/); when set, each run is started with "
        "`accelerate launch` (multi-GPU data parallel), else as one process")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        # An unset compose variable arrives as "": no key, not a key that "Bearer " would match.
        return value or None

    @model_validator(mode="after")
    def _open_only_with_a_key(self) -> ServiceSettings:
        if self.api_key is None and not is_loopback(self.host):
            raise ValueError(
                f"the trainer has no API key, so it listens on loopback only, not on {self.host!r}: set "
                f"{API_KEY_ENV} (or --api-key) to a secret to listen there, or listen on {LOOPBACK}"
            )
        return self

    def role_url(self, role: Role) -> str:
        return self.backward_url if role == "backward" else self.scorer_url

    def base_models(self) -> dict[str, Path]:
        """Every base model name a job may use: the two roles, then the registered ones."""
        return {"backward": self.backward_model, "scorer": self.scorer_model, **self.models}
