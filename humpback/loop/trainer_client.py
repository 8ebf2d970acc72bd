"""The loop's side of the trainer service: OpenAI's files and fine-tuning API over httpx, plus the
trainer's deploy route; every reply is read through its wire model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from humpback.contracts import (
    TERMINAL_STATUSES,
    CreateJobRequest,
    Deployment,
    DeployRequest,
    FileObject,
    FineTuningJob,
    JobEvent,
    JobFailed,
    ListPage,
    Role,
    TrainingStep,
    auth_headers,
)
from services.hotswap import SwapResult

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# A deploy waits for a hot-swap: several calls to the model server, each allowed the trainer's
# `swap_timeout` (300 s by default).
DEPLOY_TIMEOUT = 1800.0


class TrainerClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        headers = auth_headers(api_key)
        self.http = httpx.Client(base_url=f"{url}/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _read(self, resp: httpx.Response, model: type[M]) -> M:
        if resp.status_code >= 400:
            raise JobFailed(f"trainer answered {resp.status_code}: {resp.text[:500]}")
        return model.model_validate_json(resp.content)

    def upload(self, path: Path) -> FileObject:
        with path.open("rb") as f:
            resp = self.http.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
        return self._read(resp, FileObject)

    def create_job(self, request: CreateJobRequest) -> FineTuningJob:
        body = request.model_dump(mode="json", exclude_none=True)
        return self._read(self.http.post("/fine_tuning/jobs", json=body), FineTuningJob)

    def job(self, job_id: str) -> FineTuningJob:
        return self._read(self.http.get(f"/fine_tuning/jobs/{job_id}"), FineTuningJob)

    def _events_page(self, job_id: str, after: str | None = None) -> ListPage[JobEvent]:
        params: dict[str, int | str] = {"limit": 100, **({"after": after} if after else {})}
        return self._read(self.http.get(f"/fine_tuning/jobs/{job_id}/events", params=params), ListPage[JobEvent])

    def wait(self, job_id: str, poll: float = 5.0) -> FineTuningJob:
        """Poll until the job ends; log its new events (loss per step) as they come."""
        seen: set[str] = set()
        while True:
            job = self.job(job_id)
            for event in reversed(self._events_page(job_id).data):
                if event.id not in seen:
                    seen.add(event.id)
                    log.info("%s: %s", job_id, event.message)
            if job.status in TERMINAL_STATUSES:
                if job.status != "succeeded":
                    reason = f"{job.error.code}: {job.error.message}" if job.error else "no reason given"
                    raise JobFailed(f"job {job_id} {job.status}: {reason}")
                return job
            time.sleep(poll)

    def events(self, job_id: str) -> list[JobEvent]:
        """Every event of the job, oldest first (the API pages 100 at a time, newest first)."""
        events: list[JobEvent] = []
        after = None
        while True:
            page = self._events_page(job_id, after)
            events += page.data
            if not page.has_more or not page.data:
                return events[::-1]
            after = page.data[-1].id

    def deploy(self, job_id: str, role: Role) -> Deployment:
        """Have the trainer make `role`'s server serve the job's model (it swaps only when needed)."""
        body = DeployRequest(role=role).model_dump()
        resp = self.http.post(f"/fine_tuning/jobs/{job_id}/deploy", json=body, timeout=DEPLOY_TIMEOUT)
        return self._read(resp, Deployment)


def training_steps(events: list[JobEvent]) -> list[TrainingStep]:
    """A job's training steps (its `metrics` events with a training loss), by step."""
    return sorted((step for e in events if e.type == "metrics" and (step := _data(TrainingStep, e)) is not None),
                  key=lambda s: s.step)


def swaps(events: list[JobEvent]) -> list[SwapResult]:
    """The hot-swaps the trainer recorded for a job (its `Deployed to ...` events), oldest first."""
    return [swap for e in events if e.type == "message" and (swap := _data(SwapResult, e)) is not None]


def _data(model: type[M], event: JobEvent) -> M | None:
    """An event's data as `model`; None where it is another kind of event (a validation loss, a stage)."""
    if event.data is None:
        return None
    try:
        return model.model_validate(event.data)
    except ValidationError:
        return None
