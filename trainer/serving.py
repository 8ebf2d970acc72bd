"""The service's logic without HTTP: validating uploads, creating, cancelling and deploying jobs.

Routes in `trainer.api` call these methods and map `ApiError` to OpenAI's error shape. Every path
the service touches is derived from its data dir and ids it generated itself: requests name files
and models by id or registered name, never by path.

Uploads never sit in memory: the route streams the body into a staging file under the files folder
(`staging`), and `upload` validates it line by line before it becomes a file.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from humpback.contracts import (
    ACTIVE_STATUSES,
    MAX_STEPS,
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
from trainer.store import Store, new_id, now, validation_reason

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
MAX_REPORTED_ERRORS = 5
# One example's line: far above any training example (`max_length` tokens), and what bounds the
# memory a validation takes, whatever the file's size.
MAX_LINE_BYTES = 8 * 1024 * 1024
# Uploads being received; what a killed service left of them is removed at the next start.
STAGING_PREFIX = ".upload-"


def validate_jsonl(f: BinaryIO) -> int:
    """The number of examples in an OpenAI chat fine-tuning file, read one line at a time; ApiError
    naming the bad lines."""
    problems: list[str] = []
    bad = examples = 0
    for number, line in enumerate(_lines(f), start=1):
        if line is not None and not line.strip():
            continue
        problem = _problem(line)
        if problem is None:
            examples += 1
            continue
        bad += 1
        if len(problems) < MAX_REPORTED_ERRORS:
            problems.append(f"line {number}: {problem}")
    if problems:
        tail = f"; and {bad - len(problems)} more invalid lines" if bad > len(problems) else ""
        raise ApiError(400, "; ".join(problems) + tail, param="file", code="invalid_file")
    if examples == 0:
        raise ApiError(400, "the file holds no examples", param="file", code="invalid_file")
    return examples


def _lines(f: BinaryIO) -> Iterator[bytes | None]:
    """Each line of `f`; None for a line longer than MAX_LINE_BYTES, whose rest is skipped unread."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while (rest := f.readline(1024 * 1024)) and not rest.endswith(b"\n"):
            pass
        yield None


def _problem(line: bytes | None) -> str | None:
    """Why one line is not a chat example; None when it is one."""
    if line is None:
        return f"the line is longer than {MAX_LINE_BYTES} bytes"
    try:
        ChatExample.model_validate_json(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte {exc.start} of the line)"
    except ValidationError as exc:
        return _reason(exc)
    return None


def _reason(exc: ValidationError) -> str:
    """The first validation problem as `field: message`, e.g. `messages.1.role: Input should be ...`."""
    where, msg = validation_reason(exc.errors(include_url=False))
    return f"{where}: {msg}" if where else msg


class TrainerService:
    """Files and jobs over the store; the worker picks queued jobs up."""

    def __init__(self, settings: ServiceSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.data_dir = settings.data_dir.absolute()
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.files_dir.glob(f"{STAGING_PREFIX}*"):
            stale.unlink(missing_ok=True)

    # --- files --------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        if not FILE_ID.match(file_id):
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return self.files_dir / f"{file_id}.jsonl"

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A new empty file under the files folder for an upload to stream into; removed on leaving
        unless `upload` adopted it."""
        fd, tmp = tempfile.mkstemp(dir=self.files_dir, prefix=STAGING_PREFIX)
        os.close(fd)
        try:
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def upload(self, filename: str, purpose: str | None, staged: Path) -> FileObject:
        """Validate a staged upload and make it a file under a new id."""
        if purpose != "fine-tune":
            got = "no purpose" if purpose is None else f"purpose {purpose!r}"
            raise ApiError(400, f"{got} is not supported; use 'fine-tune'", param="purpose")
        with staged.open("rb") as f:
            examples = validate_jsonl(f)
        file_id = new_id("file")
        size = staged.stat().st_size
        os.replace(staged, self.file_path(file_id))
        # Only the base name is kept, for display: it never becomes a path.
        return self.store.add_file(file_id, Path(filename or "upload.jsonl").name[:255], size, examples)

    def get_file(self, file_id: str) -> FileObject:
        found = self.store.get_file(file_id) if FILE_ID.match(file_id) else None
        if found is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return found

    def file_content(self, file_id: str) -> Path:
        """The path of a file's content (streamed from disk, never read whole)."""
        self.get_file(file_id)
        return self.file_path(file_id)

    def delete_file(self, file_id: str) -> bool:
        """Delete a file, unless a job that has not finished needs it (409 naming the jobs)."""
        self.get_file(file_id)
        users = self.store.delete_unused_file(file_id)
        if users:
            raise ApiError(
                409, f"File {file_id} is the training or validation file of {len(users)} job(s) that have not "
                f"finished ({', '.join(users)}); cancel them or wait until they end, then delete it",
                param="id", code="file_in_use",
            )
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
        if not self.store.add_job(job, req.suffix):
            raise ApiError(400, "a file of this job was deleted while the job was created", param="training_file",
                           code="file_not_found")
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
        if steps is not None and not (re.fullmatch(r"[0-9]{1,6}", steps) and 1 <= int(steps) <= MAX_STEPS):
            raise ApiError(400, f"metadata.max_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}",
                           param="metadata.max_steps")

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
                502, f"The model of job {job_id} was not deployed to {role}: {exc}", type="server_error",
                code="deploy_failed",
            ) from exc
        return Deployment(
            fine_tuning_job_id=job_id, fine_tuned_model=job.fine_tuned_model, role=role,
            swapped=result is not None, stall_s=result.stall_s if result else None,
        )
