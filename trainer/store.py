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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ValidationError

from humpback.contracts import (
    ACTIVE_STATUSES,
    CheckpointMetrics,
    FileObject,
    FineTuningJob,
    Hyperparameters,
    InputError,
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


class UnreadableJob(InputError):
    """A stored job that no longer parses (written by an older version, or edited by hand)."""

    def __init__(self, job_id: str, problem: str) -> None:
        super().__init__(f"the stored job {job_id} cannot be read: {problem}")
        self.job_id = job_id


def validation_reason(errors: Sequence[Mapping[str, Any]], skip: int = 0) -> tuple[str, str]:
    """(where, why) of the first of pydantic's `errors`: the dotted field path (less its first `skip`
    items) and the message. A value that fits no member of `"auto" | number` fails each member, with
    the member's tag appended to the path: then the field is named, with the number's reason."""
    err = errors[0]
    loc = [str(p) for p in err["loc"][skip:]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if loc and loc[-1].startswith("literal[") and len(errors) > 1 and errors[1]["loc"][:-1] == err["loc"][:-1]:
        loc, msg = loc[:-1], f"{errors[1]['msg']} (or 'auto')"
    return ".".join(loc), msg


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

    def list_files(self, after: str | None = None, limit: int = 10_000,
                   order: Literal["asc", "desc"] = "desc") -> tuple[list[FileObject], bool]:
        """In upload order (`desc`: newest first); `after` is the id of the last file of the previous page."""
        sql, args = "SELECT * FROM files", []
        if after:
            sql += f" WHERE rowid {'<' if order == 'desc' else '>'} (SELECT rowid FROM files WHERE id = ?)"
            args.append(after)
        rows = self._exec(sql + f" ORDER BY rowid {order.upper()} LIMIT ?", (*args, limit + 1))
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    def delete_unused_file(self, file_id: str) -> list[str]:
        """Delete the file's row unless a job that has not finished names it; the ids of those jobs
        (empty: deleted). One step under the lock, so a job created meanwhile cannot lose its file."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        with self._lock:
            users = self._db.execute(
                f"SELECT id FROM jobs WHERE status IN ({marks}) AND (training_file = ? OR validation_file = ?)"
                " ORDER BY rowid", (*ACTIVE_STATUSES, file_id, file_id),
            ).fetchall()
            if not users:
                self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return [r["id"] for r in users]

    # --- jobs ---------------------------------------------------------------------------------

    def add_job(self, job: FineTuningJob, suffix: str | None) -> bool:
        """Insert the job, unless one of its files was deleted meanwhile (then False)."""
        with self._lock:
            if any(f is not None and self.get_file(f) is None for f in (job.training_file, job.validation_file)):
                return False
            self._insert_job(job, suffix)
            return True

    def _insert_job(self, job: FineTuningJob, suffix: str | None) -> None:
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
        """The job as the API shows it (an unreadable row as far as it can be read, with the reason)."""
        rows = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _shown_job(rows[0]) if rows else None

    def load_job(self, job_id: str) -> FineTuningJob:
        """The job to run; UnreadableJob when its row does not parse."""
        return _job(self.job_row(job_id))

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
        jobs = [_shown_job(r) for r in rows]
        if metadata:
            jobs = [j for j in jobs if all((j.metadata or {}).get(k) == v for k, v in metadata.items())]
        return jobs[:limit], len(jobs) > limit

    def job_ids(self, status: JobStatus) -> list[str]:
        """The ids of the jobs in `status`, oldest first: ids only, so no row that fails to parse stops a scan."""
        return [r["id"] for r in self._exec("SELECT id FROM jobs WHERE status = ? ORDER BY rowid", (status,))]

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
    """The row as a job; UnreadableJob naming the column that does not parse."""
    hyperparameters = _column(r, "hyperparameters", Hyperparameters.model_validate_json)
    method = _column(r, "method", Method.model_validate_json)
    metadata = _column(r, "metadata", lambda v: json.loads(v) if v else None)
    error = _column(r, "error", lambda v: JobError.model_validate_json(v) if v else None)
    try:
        return FineTuningJob(
            id=r["id"],
            created_at=r["created_at"],
            status=r["status"],
            model=r["model"],
            training_file=r["training_file"],
            validation_file=r["validation_file"],
            hyperparameters=hyperparameters,
            method=method,
            seed=r["seed"],
            metadata=metadata,
            fine_tuned_model=r["fine_tuned_model"],
            finished_at=r["finished_at"],
            error=error,
            trained_tokens=r["trained_tokens"],
        )
    except ValidationError as exc:
        where, why = validation_reason(exc.errors(include_url=False))
        raise UnreadableJob(str(r["id"]), f"{where}: {why}") from exc


def _column(r: sqlite3.Row, column: str, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(r[column])
    except ValidationError as exc:
        where, why = validation_reason(exc.errors(include_url=False))
        raise UnreadableJob(str(r["id"]), f"{'.'.join(filter(None, (column, where)))}: {why}") from exc
    except (ValueError, TypeError) as exc:
        raise UnreadableJob(str(r["id"]), f"{column}: {exc}") from exc


_STATUSES: tuple[str, ...] = get_args(JobStatus)


def _shown_job(r: sqlite3.Row) -> FineTuningJob:
    """`_job`, or for a row that does not parse, its id, status and plain columns with the reason as its
    error and "auto" hyperparameters, so that listing, retrieving and cancelling still work."""
    try:
        return _job(r)
    except UnreadableJob as exc:
        def text(column: str) -> str:
            return r[column] if isinstance(r[column], str) else ""

        def integer(column: str) -> int:
            return r[column] if isinstance(r[column], int) else 0

        return FineTuningJob(
            id=str(r["id"]), created_at=integer("created_at"),
            status=r["status"] if r["status"] in _STATUSES else "failed",
            model=text("model"), training_file=text("training_file"), seed=integer("seed"),
            hyperparameters=Hyperparameters(), method=Method(),
            error=JobError(code="invalid_job", message=str(exc)),
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
