"""The service's logic without HTTP: validating uploads, creating, cancelling and deploying jobs.

Routes in `trainer.api` call these methods and map `ApiError` to OpenAI's error shape. Every path
the service touches is derived from its data dir and ids it generated itself: requests name files
and models by id or registered name, never by path.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from humpback.contracts import (
    ACTIVE_STATUSES,
    ApiError,
    ChatExample,
    CreateJobRequest,
    Deployment,
    FileObject,
    FineTuningJob,
    Method,
    Role,
    SupervisedMethod,
    SwapError,
)
from trainer.config import PRESETS, ServiceSettings
from trainer.deploy import Deployer
from trainer.store import Store, new_id, now

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
MAX_REPORTED_ERRORS = 5


def validate_jsonl(data: bytes) -> int:
    """The number of examples in an OpenAI chat fine-tuning file; ApiError naming the bad lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the file is not UTF-8 (byte {exc.start})", param="file", code="invalid_file") from exc
    problems: list[str] = []
    examples = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ChatExample.model_validate_json(line)
            examples += 1
        except ValidationError as exc:
            problems.append(f"line {number}: {_reason(exc)}")
    if problems:
        more = len(problems) - MAX_REPORTED_ERRORS
        tail = f"; and {more} more invalid lines" if more > 0 else ""
        raise ApiError(400, "; ".join(problems[:MAX_REPORTED_ERRORS]) + tail, param="file", code="invalid_file")
    if examples == 0:
        raise ApiError(400, "the file holds no examples", param="file", code="invalid_file")
    return examples


def _reason(exc: ValidationError) -> str:
    """The first validation problem as `field: message`, e.g. `messages.1.role: Input should be ...`."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


class TrainerService:
    """Files and jobs over the store; the worker picks queued jobs up."""

    def __init__(self, settings: ServiceSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.data_dir = settings.data_dir.absolute()
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)

    # --- files --------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        if not FILE_ID.match(file_id):
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return self.files_dir / f"{file_id}.jsonl"

    def upload(self, filename: str, purpose: str, data: bytes) -> FileObject:
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose {purpose!r} is not supported; use 'fine-tune'", param="purpose")
        examples = validate_jsonl(data)
        file_id = new_id("file")
        fd, tmp = tempfile.mkstemp(dir=self.files_dir, prefix=".upload-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.file_path(file_id))
        # Only the base name is kept, for display: it never becomes a path.
        return self.store.add_file(file_id, Path(filename or "upload.jsonl").name, len(data), examples)

    def get_file(self, file_id: str) -> FileObject:
        found = self.store.get_file(file_id) if FILE_ID.match(file_id) else None
        if found is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return found

    def file_content(self, file_id: str) -> bytes:
        self.get_file(file_id)
        return self.file_path(file_id).read_bytes()

    def delete_file(self, file_id: str) -> bool:
        self.get_file(file_id)
        self.store.delete_file(file_id)
        self.file_path(file_id).unlink(missing_ok=True)
        return True

    # --- jobs ---------------------------------------------------------------------------------

    def base_model_dir(self, model: str) -> Path:
        """The folder a job named `model` fine-tunes from: a served role, a registered model, or a
        model an earlier job produced."""
        known = self.settings.base_models()
        if model in known:
            return known[model].absolute()
        row = self.store.find_fine_tuned(model)
        if row is not None and row["export_dir"]:
            return Path(row["export_dir"])
        names = ", ".join(sorted(known))
        raise ApiError(
            400, f"model {model!r} is unknown; known base models: {names}, or a succeeded fine_tuned_model",
            param="model", code="model_not_available",
        )

    def create_job(self, req: CreateJobRequest) -> FineTuningJob:
        if req.integrations:
            raise ApiError(400, "integrations are not supported", param="integrations")
        self.base_model_dir(req.model)
        for param, file_id in (("training_file", req.training_file), ("validation_file", req.validation_file)):
            if file_id is not None and (not FILE_ID.match(file_id) or self.store.get_file(file_id) is None):
                raise ApiError(400, f"{param} {file_id!r} does not exist", param=param, code="file_not_found")
        metadata = req.metadata or {}
        self._check_metadata(metadata)
        hyper = req.effective_hyperparameters()
        for name in ("batch_size", "n_epochs"):
            value = getattr(hyper, name)
            if value != "auto" and value < 1:
                raise ApiError(400, f"hyperparameters.{name} must be at least 1", param=f"hyperparameters.{name}")
        if hyper.learning_rate_multiplier != "auto" and hyper.learning_rate_multiplier <= 0:
            raise ApiError(400, "hyperparameters.learning_rate_multiplier must be positive", param="hyperparameters.learning_rate_multiplier")
        job = FineTuningJob(
            id=new_id("ftjob"),
            created_at=now(),
            hyperparameters=hyper,
            model=req.model,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
            status="queued",
            training_file=req.training_file,
            validation_file=req.validation_file,
            metadata=req.metadata,
            method=Method(supervised=SupervisedMethod(hyperparameters=hyper)),
        )
        self.store.add_job(job, req.suffix)
        self.store.add_event(job.id, f"Created fine-tuning job: {job.id}")
        return job

    def _check_metadata(self, metadata: dict[str, str]) -> None:
        deploy = metadata.get("deploy_to")
        if deploy is not None and deploy not in ("backward", "scorer"):
            raise ApiError(400, f"metadata.deploy_to must be 'backward' or 'scorer', got {deploy!r}", param="metadata.deploy_to")
        preset = metadata.get("preset")
        if preset is not None and preset not in PRESETS:
            raise ApiError(400, f"metadata.preset {preset!r} is unknown; presets: {', '.join(PRESETS)}", param="metadata.preset")
        method = metadata.get("method")
        if method is not None and method not in ("lora", "full"):
            raise ApiError(400, f"metadata.method must be 'lora' or 'full', got {method!r}", param="metadata.method")
        steps = metadata.get("max_steps")
        if steps is not None and (not steps.isdigit() or int(steps) < 1):
            raise ApiError(400, f"metadata.max_steps must be a positive integer, got {steps!r}", param="metadata.max_steps")

    def get_job(self, job_id: str) -> FineTuningJob:
        job = self.store.get_job(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
        return job

    def cancel(self, job_id: str, worker_cancel: Callable[[str], None]) -> FineTuningJob:
        job = self.get_job(job_id)
        if job.status not in ACTIVE_STATUSES:
            raise ApiError(400, f"Job {job_id} has already {job.status} and cannot be cancelled", param="fine_tuning_job_id")
        worker_cancel(job_id)
        return self.get_job(job_id)

    def deploy(self, job_id: str, role: Role, deployer: Deployer) -> Deployment:
        """Make `role`'s server serve a succeeded job's model; nothing is swapped when it does already."""
        job = self.get_job(job_id)
        if job.status != "succeeded" or job.fine_tuned_model is None:
            raise ApiError(
                400, f"Job {job_id} is {job.status}: only a succeeded job's model can be deployed",
                param="fine_tuning_job_id",
            )
        export = self.store.job_row(job_id)["export_dir"]
        if not export or not (Path(export) / "config.json").is_file():
            raise ApiError(
                409, f"The model of job {job_id} is no longer in the trainer's data dir, so it cannot be "
                "deployed; train it again", param="fine_tuning_job_id", code="model_not_found",
            )
        try:
            result = deployer.ensure(job_id, role, Path(export), job.fine_tuned_model)
        except SwapError as exc:
            raise ApiError(
                502, f"The model of job {job_id} was not deployed to {role}; the server keeps its previous "
                f"weights: {exc}", type="server_error", code="deploy_failed",
            ) from exc
        return Deployment(
            fine_tuning_job_id=job_id, fine_tuned_model=job.fine_tuned_model, role=role,
            swapped=result is not None, stall_s=result.stall_s if result else None,
        )
