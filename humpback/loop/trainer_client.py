"""The loop's side of the trainer service: OpenAI's files and fine-tuning API over httpx."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from humpback.contracts import TERMINAL_STATUSES, JobFailed

log = logging.getLogger(__name__)



class TrainerClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=f"{url}/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _json(self, resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            raise JobFailed(f"trainer answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def upload(self, path: Path) -> str:
        with path.open("rb") as f:
            body = self._json(self.http.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"}))
        return body["id"]

    def create_job(self, model: str, training_file: str, suffix: str, metadata: dict[str, str],
                   seed: int = 0) -> dict[str, Any]:
        return self._json(self.http.post("/fine_tuning/jobs", json={
            "model": model, "training_file": training_file, "suffix": suffix, "metadata": metadata, "seed": seed}))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/fine_tuning/jobs/{job_id}"))

    def wait(self, job_id: str, poll: float = 5.0) -> dict[str, Any]:
        """Poll until the job ends; log its new events (loss per step) as they come."""
        seen: set[str] = set()
        while True:
            job = self.job(job_id)
            events = self._json(self.http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100}))["data"]
            for event in reversed(events):
                if event["id"] not in seen:
                    seen.add(event["id"])
                    log.info("%s: %s", job_id, event["message"])
            if job["status"] in TERMINAL_STATUSES:
                if job["status"] != "succeeded":
                    raise JobFailed(f"job {job_id} {job['status']}: {job.get('error')}")
                return job
            time.sleep(poll)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of the job, oldest first (the API pages 100 at a time, newest first)."""
        events: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._json(self.http.get(f"/fine_tuning/jobs/{job_id}/events", params=params))
            events += page["data"]
            if not page.get("has_more") or not page["data"]:
                return events[::-1]
            params["after"] = page["data"][-1]["id"]
