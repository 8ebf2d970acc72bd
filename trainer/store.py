"""SQLite persistence of files, jobs, events and checkpoints: the service's only state besides files.

Every state change is committed before it is acted on, so a restarted service finds each job as it
was left. One connection guarded by a lock: the API's threads and the worker share it, writes are
small and rare (one per training step at most).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from humpback.contracts import (
    CheckpointMetrics,
    FileObject,
    FineTuningJob,
    Hyperparameters,
    JobCheckpoint,
    JobError,
    JobEvent,
    JobStatus,
    Method,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    examples INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, hyperparameters TEXT NOT NULL,
    method TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL, metadata TEXT,
    fine_tuned_model TEXT, finished_at INTEGER, error TEXT, trained_tokens INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER, export_dir TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, data TEXT, type TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step INTEGER NOT NULL, metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Store:
    """Files, jobs, events and checkpoints in one SQLite database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- files --------------------------------------------------------------------------------

    def add_file(self, file_id: str, filename: str, size: int, examples: int) -> FileObject:
        created = now()
        self._exec(
            "INSERT INTO files (id, filename, bytes, created_at, examples) VALUES (?, ?, ?, ?, ?)",
            (file_id, filename, size, created, examples),
        )
        return FileObject(id=file_id, bytes=size, created_at=created, filename=filename)

    def get_file(self, file_id: str) -> FileObject | None:
        rows = self._exec("SELECT * FROM files WHERE id = ?", (file_id,))
        return _file(rows[0]) if rows else None

    def file_examples(self, file_id: str) -> int:
        return int(self._exec("SELECT examples FROM files WHERE id = ?", (file_id,))[0]["examples"])

    def list_files(self) -> list[FileObject]:
        return [_file(r) for r in self._exec("SELECT * FROM files ORDER BY created_at DESC, rowid DESC")]

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # --- jobs ---------------------------------------------------------------------------------

    def add_job(self, job: FineTuningJob, suffix: str | None) -> None:
        self._exec(
            "INSERT INTO jobs (id, created_at, status, model, training_file, validation_file,"
            " hyperparameters, method, suffix, seed, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.created_at,
                job.status,
                job.model,
                job.training_file,
                job.validation_file,
                job.hyperparameters.model_dump_json(),
                job.method.model_dump_json(),
                suffix,
                job.seed,
                json.dumps(job.metadata) if job.metadata is not None else None,
            ),
        )

    def get_job(self, job_id: str) -> FineTuningJob | None:
        rows = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def job_row(self, job_id: str) -> sqlite3.Row:
        """The raw row, with the service-internal columns (attempts, pid, export_dir, suffix)."""
        return self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,))[0]

    def list_jobs(self, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None) -> tuple[list[FineTuningJob], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        sql, args = "SELECT * FROM jobs", []
        if after:
            sql += " WHERE rowid < (SELECT rowid FROM jobs WHERE id = ?)"
            args.append(after)
        rows = self._exec(sql + " ORDER BY rowid DESC", tuple(args))
        jobs = [_job(r) for r in rows]
        if metadata:
            jobs = [j for j in jobs if all((j.metadata or {}).get(k) == v for k, v in metadata.items())]
        return jobs[:limit], len(jobs) > limit

    def jobs_with_status(self, *statuses: JobStatus) -> list[FineTuningJob]:
        marks = ",".join("?" * len(statuses))
        return [_job(r) for r in self._exec(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid", statuses)]

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._exec("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set columns; `error` takes a JobError (or None)."""
        if "error" in fields and fields["error"] is not None:
            fields["error"] = fields["error"].model_dump_json()
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def transition(self, job_id: str, expected: tuple[JobStatus, ...], status: JobStatus, **fields: Any) -> bool:
        """Change the status only from one of `expected` (so a cancel and a finish cannot both win)."""
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] not in expected:
                return False
            self.update_job(job_id, status=status, **fields)
            return True

    def find_fine_tuned(self, name: str) -> sqlite3.Row | None:
        rows = self._exec("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'", (name,))
        return rows[0] if rows else None

    # --- events and checkpoints ---------------------------------------------------------------

    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message") -> None:
        self._exec(
            "INSERT INTO events (job_id, created_at, level, message, data, type) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, now(), level, message, json.dumps(data) if data is not None else None, type),
        )

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Newest first, like OpenAI; `after` is the id of the last event of the previous page."""
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if after and after.startswith("ftevent-") and after[8:].isdigit():
            sql += " AND seq < ?"
            args.append(int(after[8:]))
        rows = self._exec(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return [_event(r) for r in rows[:limit]], len(rows) > limit

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        self._exec(
            "INSERT INTO checkpoints (job_id, created_at, step, metrics) VALUES (?, ?, ?, ?)",
            (job_id, now(), step, json.dumps(metrics)),
        )

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[JobCheckpoint], bool]:
        row = self._exec("SELECT fine_tuned_model, model, suffix FROM jobs WHERE id = ?", (job_id,))[0]
        sql, args = "SELECT * FROM checkpoints WHERE job_id = ?", [job_id]
        if after and after.startswith("ftckpt-") and after[7:].isdigit():
            sql += " AND seq < ?"
            args.append(int(after[7:]))
        rows = self._exec(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        name = model_name(row["model"], row["suffix"], job_id)
        return [_checkpoint(r, name) for r in rows[:limit]], len(rows) > limit


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: `ft:<base>:<org>[:<suffix>]:<short id>`."""
    parts = ["ft", base, "humpback", *([suffix] if suffix else []), job_id.removeprefix("ftjob-")[:8]]
    return ":".join(parts)


def _file(r: sqlite3.Row) -> FileObject:
    return FileObject(id=r["id"], bytes=r["bytes"], created_at=r["created_at"], filename=r["filename"])


def _job(r: sqlite3.Row) -> FineTuningJob:
    return FineTuningJob(
        id=r["id"],
        created_at=r["created_at"],
        status=r["status"],
        model=r["model"],
        training_file=r["training_file"],
        validation_file=r["validation_file"],
        hyperparameters=Hyperparameters.model_validate_json(r["hyperparameters"]),
        method=Method.model_validate_json(r["method"]),
        seed=r["seed"],
        metadata=json.loads(r["metadata"]) if r["metadata"] else None,
        fine_tuned_model=r["fine_tuned_model"],
        finished_at=r["finished_at"],
        error=JobError.model_validate_json(r["error"]) if r["error"] else None,
        trained_tokens=r["trained_tokens"],
    )


def _event(r: sqlite3.Row) -> JobEvent:
    return JobEvent(
        id=f"ftevent-{r['seq']}",
        created_at=r["created_at"],
        level=r["level"],
        message=r["message"],
        data=json.loads(r["data"]) if r["data"] else None,
        type=r["type"],
    )


def _checkpoint(r: sqlite3.Row, name: str) -> JobCheckpoint:
    return JobCheckpoint(
        id=f"ftckpt-{r['seq']}",
        created_at=r["created_at"],
        fine_tuned_model_checkpoint=f"{name}:ckpt-step-{r['step']}",
        fine_tuning_job_id=r["job_id"],
        metrics=CheckpointMetrics(**json.loads(r["metrics"])),
        step_number=r["step"],
    )
