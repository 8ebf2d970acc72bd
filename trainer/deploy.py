"""Deployment: a job's exported model hot-swapped into a role's server, recorded on the job.

One code path for both ways a model gets deployed: by the worker right after training (when the
job's `metadata.deploy_to` names a role), and on request (`POST /v1/fine_tuning/jobs/{id}/deploy`),
for instance by the loop after a server restart put the base weights back.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from humpback.contracts import CheckpointError, Role, SwapError
from services.hotswap import SwapResult, describe_role, role_servers, served_version, swap_role
from trainer.config import ServiceSettings
from trainer.metrics import TrainerMetrics
from trainer.store import Store


class Deployer:
    """Swaps exported models into the role servers, one swap at a time."""

    def __init__(self, settings: ServiceSettings, store: Store, metrics: TrainerMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        # The worker's swap after training and a requested one may meet: both pause the same server.
        self._lock = threading.Lock()

    def serves(self, role: Role, job_id: str) -> bool:
        """Whether every server of `role` serves job `job_id`'s model now, by the servers' registry."""
        return served_version(role, self.settings.registry) == job_id

    def deploy(self, job_id: str, role: Role, export_dir: Path, name: str) -> SwapResult:
        """Swap `export_dir` into `role`'s server as job `job_id`'s model `name`.

        Raises SwapError when the folder is unfit or a server failed the swap; its message ends with
        what the registry says the role's servers serve now (swap_role puts back the replicas it
        swapped, and names those it could not)."""
        with self._lock:
            return self._swap(job_id, role, export_dir, name)

    def ensure(self, job_id: str, role: Role, export_dir: Path, name: str) -> SwapResult | None:
        """`deploy`, unless `role`'s server serves this job's model already (then None)."""
        with self._lock:
            if self.serves(role, job_id):
                return None
            return self._swap(job_id, role, export_dir, name)

    def servers(self, role: Role) -> dict[str, str]:
        """name -> URL of each server of `role`: the configured one and its recorded replicas."""
        return role_servers(role, self.settings.role_url(role), self.settings.registry)

    def _swap(self, job_id: str, role: Role, export_dir: Path, name: str) -> SwapResult:
        servers = self.servers(role)
        where = (f"the {role} server at {next(iter(servers.values()))}" if len(servers) == 1
                 else f"the {len(servers)} {role} servers at {', '.join(servers.values())}")
        self.store.add_event(job_id, f"Deploying {name} to {where}")
        try:
            result = swap_role(
                servers, export_dir, role=role, version=job_id, alias=name, api_key=self.settings.api_key,
                registry=self.settings.registry, timeout=self.settings.swap_timeout,
            )
        except (CheckpointError, SwapError, httpx.HTTPError, OSError) as exc:
            self.metrics.swaps.labels(role, "failed").inc()
            if isinstance(exc, SwapError):
                raise
            raise SwapError(f"{exc}; now {describe_role(role, self.settings.registry)}") from exc
        self.metrics.swaps.labels(role, "succeeded").inc()
        self.metrics.swap_stall_seconds.labels(role).set(result.stall_s)
        self.store.add_event(
            job_id, f"Deployed to {role}: requests stalled {result.stall_s:.2f} s", data=result.model_dump()
        )
        return result
