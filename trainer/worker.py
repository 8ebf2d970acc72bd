"""Runs queued jobs one at a time: train in a subprocess, export, deploy, record everything.

A job's life: `queued` -> `running` (training subprocess, then the swap) -> `succeeded` | `failed` |
`cancelled`. Progress is committed to the store as it streams in, so a restarted service finds
each job as it was: jobs left `running` go back to the queue and resume from their last checkpoint
(or from the exported weights, when only the swap was left), until `max_attempts` restarts, after
which they are failed with the reason.

No stored row stops the queue: the queue is read as ids, a job whose row does not parse is failed
by id with the reason, and any other error fails its job. `alive()` says whether the loop runs
(`/health` answers 503 when it does not).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import trainer
from humpback.contracts import (
    ACTIVE_STATUSES,
    ApiError,
    FineTuningJob,
    Hyperparameters,
    JobError,
    Method,
    SupervisedMethod,
    SwapError,
)
from trainer.config import PRESETS
from trainer.deploy import Deployer
from trainer.metrics import TrainerMetrics
from trainer.serving import TrainerService
from trainer.store import UnreadableJob, model_name, now
from trainer.train import TrainSpec, last_checkpoint

log = logging.getLogger(__name__)

# The package root, so the training subprocess imports this checkout whatever the working directory.
_SOURCE_ROOT = str(Path(trainer.__file__).resolve().parent.parent)


class Worker:
    """The single consumer of the job queue, on its own thread."""

    def __init__(self, service: TrainerService, metrics: TrainerMetrics, deployer: Deployer) -> None:
        self.service = service
        self.store = service.store
        self.settings = service.settings
        self.metrics = metrics
        self.deployer = deployer
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the three fields below against cancel()
        self._current: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._deploying = False
        self._thread = threading.Thread(target=self._loop, name="trainer-worker", daemon=True)

    def job_dir(self, job_id: str) -> Path:
        return self.service.data_dir / "checkpoints" / job_id

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop without touching job states: a job killed here resumes at the next start."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._proc is not None:
                _kill(self._proc)
        self._thread.join(timeout)

    def alive(self) -> bool:
        """Whether the queue loop runs: it ends on `stop()`, or when failing a job fails too."""
        return self._thread.is_alive()

    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def recover(self) -> None:
        """Requeue the jobs a previous process left `running`, or fail those out of attempts."""
        for job_id in self.store.job_ids("running"):
            row = self.store.job_row(job_id)
            _kill_stale(row["pid"], job_id)
            if row["attempts"] >= self.settings.max_attempts:
                self._fail(
                    job_id, "interrupted",
                    f"The service stopped during this job {row['attempts']} times; it was not started again",
                )
                continue
            ckpt = last_checkpoint(self.job_dir(job_id) / "train")
            where = f"resuming from {ckpt.name}" if ckpt else "no checkpoint was saved yet; starting from step 0"
            self.store.transition(job_id, ("running",), "queued")
            self.store.add_event(job_id, f"The service restarted during the job; {where}", level="warn")

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if self._current == job_id and self._deploying:
                raise ApiError(409, f"Job {job_id} is deploying its model and can no longer be cancelled", param="fine_tuning_job_id")
            if not self.store.transition(job_id, ACTIVE_STATUSES, "cancelled", finished_at=now()):
                return
            self.store.add_event(job_id, "Fine-tuning job cancelled")
            if self._current == job_id and self._proc is not None:
                _kill(self._proc)

    # --- the queue ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id: str | None = None
            try:
                queued = self.store.job_ids("queued")
                if not queued:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                job_id = queued[0]
                self._run(job_id)
            except Exception as exc:  # a bug must fail the job, not stop the queue
                if job_id is None:
                    # The store could not be read: wait and try again rather than spin.
                    log.exception("reading the job queue")
                    self._stop.wait(1.0)
                    continue
                log.exception("job %s", job_id)
                self._abandon_process()
                # Should failing the job raise too, the loop ends and /health reports it.
                self._fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._current, self._proc, self._deploying = None, None, False

    def _abandon_process(self) -> None:
        """Kill the training process of a job that failed while it still ran."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                _kill(self._proc)

    def _run(self, job_id: str) -> None:
        try:
            job = self.store.load_job(job_id)
        except UnreadableJob as exc:
            self._fail(job_id, "invalid_job", f"{exc}; the job was not started")
            return
        attempts = self.store.job_row(job.id)["attempts"] + 1
        with self._lock:
            if not self.store.transition(job.id, ("queued",), "running", attempts=attempts):
                return
            self._current = job.id
        job_dir = self.job_dir(job.id)
        export_dir = job_dir / "final"
        trained_tokens = self.store.job_row(job.id)["trained_tokens"] or 0
        if (export_dir / "config.json").is_file():
            self.store.add_event(job.id, "Training had finished before the restart; deploying the exported model")
        else:
            spec = self._spec(job, job_dir, export_dir)
            self.store.add_event(job.id, "Fine-tuning job started")
            result = self._train(job.id, spec)
            if result is None:
                return
            trained_tokens = result
        self._finish(job, export_dir, trained_tokens)

    def _spec(self, job: FineTuningJob, job_dir: Path, export_dir: Path) -> TrainSpec:
        """Resolve preset, hyperparameters and metadata into the run's settings; record them on the job."""
        meta = job.metadata or {}
        preset = PRESETS[meta.get("preset", self.settings.default_preset)]
        hyper = job.hyperparameters
        n = self.store.file_examples(job.training_file)
        batch = preset.resolve_batch(n, hyper.batch_size if hyper.batch_size != "auto" else None)
        epochs = hyper.n_epochs if hyper.n_epochs != "auto" else None
        steps = int(meta["max_steps"]) if "max_steps" in meta else preset.resolve_steps(n, batch, epochs)
        multiplier = hyper.learning_rate_multiplier if hyper.learning_rate_multiplier != "auto" else 1.0
        resolved = Hyperparameters(
            batch_size=batch, learning_rate_multiplier=multiplier, n_epochs=math.ceil(steps * batch / n)
        )
        self.store.update_job(
            job.id,
            hyperparameters=resolved.model_dump_json(),
            method=Method(supervised=SupervisedMethod(hyperparameters=resolved)).model_dump_json(),
        )
        resolved_preset = preset.model_copy(update={
            "method": meta.get("method", preset.method),  # validated at creation
            "learning_rate": preset.learning_rate * multiplier,
            "batch_size": batch,
            "max_steps": steps,
            "save_steps": min(preset.save_steps, steps),
        })
        return TrainSpec(
            **resolved_preset.model_dump(),
            base_model=self.service.base_model_dir(job.model),
            training_file=self.service.file_path(job.training_file),
            validation_file=self.service.file_path(job.validation_file) if job.validation_file else None,
            output_dir=job_dir / "train",
            export_dir=export_dir,
            seed=job.seed,
        )

    def _train(self, job_id: str, spec: TrainSpec) -> int | None:
        """Run the training subprocess; the trained-token count, or None when the job ended otherwise."""
        job_dir = spec.output_dir.parent
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_path = job_dir / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(p for p in (_SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p),
        }
        log_path = job_dir / "train.log"
        with log_path.open("a") as log_file, self._lock:
            if self._stop.is_set() or self.store.job_row(job_id)["status"] != "running":
                return None
            proc = subprocess.Popen(
                [*self._launcher(), "trainer.train", str(spec_path)],
                stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, start_new_session=True,
            )
            self._proc = proc
        self.store.update_job(job_id, pid=proc.pid)
        exported: dict[str, Any] | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or "type" not in event:
                continue  # a line some library printed, not one of the training process's events
            if event["type"] == "exported":
                exported = event
            else:
                self._record(job_id, event)
        code = proc.wait()
        if self._stop.is_set() or self.store.job_row(job_id)["status"] != "running":
            return None  # service shutdown (resumed at the next start) or cancelled
        if code < 0:  # killed by a signal: the log's last line is whatever it printed before, not a cause
            self._fail(job_id, "training_failed",
                       f"Training was killed by {_signal_name(-code)}"
                       + (" (the out-of-memory killer sends it: see `dmesg`)" if code == -signal.SIGKILL else "")
                       + f"; its log is {log_path}")
            return None
        if code != 0 or exported is None:
            self._fail(job_id, "training_failed", f"Training exited with code {code}: {_last_error(log_path)}")
            return None
        return int(exported["trained_tokens"])

    def _launcher(self) -> list[str]:
        """The command that runs a module: plain Python, or `accelerate launch` across the GPUs."""
        cfg = self.settings.accelerate_config
        if cfg is None:
            return [sys.executable, "-m"]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg.absolute()), "-m"]

    def _record(self, job_id: str, event: dict[str, Any]) -> None:
        kind = event.pop("type")
        if kind == "metrics":
            self.store.add_event(
                job_id,
                f"Step {event['step']}/{event['total_steps']}: training loss={event['train_loss']:.4f}",
                data=event,
                type="metrics",
            )
            self.store.update_job(job_id, trained_tokens=event["num_tokens"])
            self.metrics.step_seconds.observe(event["step_time"])
            self.metrics.tokens_per_second.set(event["tokens_per_second"])
            self.metrics.trained_tokens.inc(event["step_tokens"])
        elif kind == "checkpoint":
            self.store.add_checkpoint(job_id, event["step"], event["metrics"])
            self.store.add_event(job_id, f"Checkpoint created at step {event['step']}", data={"step": event["step"]})
        elif kind == "eval":
            self.store.add_event(
                job_id, f"Step {event['step']}: validation loss={event['valid_loss']:.4f}", data=event, type="metrics"
            )
        else:
            self.store.add_event(job_id, event["message"], data=event.get("data"))

    def _finish(self, job: FineTuningJob, export_dir: Path, trained_tokens: int) -> None:
        """Deploy to the job's server when it names one, then mark the job succeeded."""
        row = self.store.job_row(job.id)
        name = model_name(job.model, row["suffix"], job.id)
        role = (job.metadata or {}).get("deploy_to")
        self.store.update_job(job.id, export_dir=str(export_dir), trained_tokens=trained_tokens)
        self.store.add_event(job.id, f"New fine-tuned model created: {name}")
        if role is not None:
            with self._lock:
                if self.store.job_row(job.id)["status"] != "running":
                    return
                self._deploying = True
            try:
                self.deployer.deploy(job.id, role, export_dir, name)  # type: ignore[arg-type]  # validated at creation
            except SwapError as exc:
                self._fail(
                    job.id, "deploy_failed",
                    f"The model was trained and saved but not deployed to {role}: {exc}",
                )
                return
        if self.store.transition(
            job.id, ("running",), "succeeded", fine_tuned_model=name, finished_at=now(), error=None
        ):
            self.store.add_event(job.id, "The job has successfully completed")

    def _fail(self, job_id: str, code: str, message: str) -> None:
        if self.store.transition(
            job_id, ACTIVE_STATUSES, "failed", finished_at=now(), error=JobError(code=code, message=message)
        ):
            self.store.add_event(job_id, message, level="error")


def _kill(proc: subprocess.Popen[str]) -> None:
    """Kill the training process group (it may have spawned data-loading workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_stale(pid: int | None, job_id: str) -> None:
    """Kill a training process a previous service left behind, if the pid is still that process."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"trainer.train" in cmdline and job_id.encode() in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_error(log_path: Path) -> str:
    """The last non-empty line of the training log: the exception, for a crash."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:500] if lines else "no output"
