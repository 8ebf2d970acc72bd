"""The wire format: OpenAI's file, fine_tuning.job, event and checkpoint objects, nothing else.

Field names and status values are OpenAI's, so the official `openai` SDK parses every response.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from humpback.contracts.defaults import Role

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("validating_files", "queued", "running")
TERMINAL_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
ORGANIZATION = "humpback"

T = TypeVar("T")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# What a request may ask, OpenAI's ranges: every number finite and bounded, and of its own JSON type
# (strict: `true` is not a batch size, "2" is not a number).
MAX_BATCH_SIZE = 256
MAX_LEARNING_RATE_MULTIPLIER = 10.0
MAX_EPOCHS = 50
MAX_SEED = 2**31 - 1
# Humpback's `metadata.max_steps` (the paper's largest schedule is 1,600 steps).
MAX_STEPS = 100_000
# OpenAI's metadata: at most 16 pairs, keys of 64 characters, values of 512.
MAX_METADATA_PAIRS = 16
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class Hyperparameters(BaseModel):
    """A job's three knobs as it reports them: what the request asked, then (once the job runs) the
    values resolved from the preset. "auto" leaves the preset's value (paper rule for batch, its
    schedule). Resolved `n_epochs` follow from `metadata.max_steps` and may pass a request's bound."""

    model_config = ConfigDict(extra="forbid")

    batch_size: Literal["auto"] | Annotated[int, Field(strict=True, ge=1)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = "auto"
    n_epochs: Literal["auto"] | Annotated[int, Field(strict=True, ge=1)] = "auto"


class RequestedHyperparameters(Hyperparameters):
    """The knobs a request may set, within OpenAI's ranges."""

    batch_size: Literal["auto"] | Annotated[int, Field(strict=True, ge=1, le=MAX_BATCH_SIZE)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[
        float, Field(strict=True, gt=0, le=MAX_LEARNING_RATE_MULTIPLIER, allow_inf_nan=False)] = "auto"
    n_epochs: Literal["auto"] | Annotated[int, Field(strict=True, ge=1, le=MAX_EPOCHS)] = "auto"


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class RequestedSupervisedMethod(SupervisedMethod):
    hyperparameters: RequestedHyperparameters = Field(default_factory=RequestedHyperparameters)


class RequestedMethod(Method):
    supervised: RequestedSupervisedMethod | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class CreateJobRequest(BaseModel):
    """`POST /v1/fine_tuning/jobs`. Humpback reads these `metadata` keys (strings, like OpenAI's):

    - `deploy_to`: "backward" or "scorer": hot-swap the result into that server;
    - `preset`: a training preset name (see `trainer.config.PRESETS`);
    - `method`: "lora" or "full", overriding the preset's;
    - `max_steps`: optimizer steps (1 to `MAX_STEPS`), overriding the preset's schedule.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: RequestedHyperparameters | None = None
    method: RequestedMethod | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)] | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=MAX_METADATA_PAIRS)
    integrations: list[dict[str, Any]] | None = None

    def effective_hyperparameters(self) -> RequestedHyperparameters:
        """`method.supervised.hyperparameters` (current API) wins over the deprecated top-level field."""
        if self.method and self.method.supervised:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or RequestedHyperparameters()


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str = ORGANIZATION
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: Method


class DeployRequest(BaseModel):
    """`POST /v1/fine_tuning/jobs/{job_id}/deploy`, a humpback extension beside OpenAI's API: serve a
    succeeded job's model in `role`'s server (a hot-swap), unless that server serves it already."""

    model_config = ConfigDict(extra="forbid")

    role: Role


class Deployment(BaseModel):
    """The answer to a deploy request: `role`'s server now serves the job's model."""

    object: Literal["fine_tuning.job.deployment"] = "fine_tuning.job.deployment"
    fine_tuning_job_id: str
    fine_tuned_model: str
    role: Role
    # False when the server served this job's model already: nothing was touched.
    swapped: bool
    # How long the swap held requests back, in seconds; None when nothing was swapped.
    stall_s: float | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class TrainingStep(BaseModel):
    """The `data` of a `metrics` event the trainer records per training step (`trainer.train` emits it):
    what the loop reads as a job's loss curve."""

    step: int
    total_steps: int
    train_loss: float
    train_mean_token_accuracy: float | None = None
    learning_rate: float | None = None
    num_tokens: int
    step_tokens: int
    step_time: float
    tokens_per_second: float


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class ModelCard(BaseModel):
    """One model of `GET /v1/models`, in the shape vLLM answers it: `root` is the folder (or hub id) the
    model was loaded from, which the run compares with its `services.base_model`."""

    id: str
    object: Literal["model"] = "model"
    owned_by: str = ORGANIZATION
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
