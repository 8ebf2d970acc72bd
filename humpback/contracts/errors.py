"""Every error humpback raises, as one hierarchy under `HumpbackError` (as httpx's `_exceptions`).

Catch `HumpbackError` for "anything humpback refused or failed", or a subclass for one kind. Each
keeps the builtin base its callers already caught (`ValueError` for bad input, `RuntimeError` for a
service that failed), and says what was wrong, where (file, line, record, field) and, where there is
one, the fix.

Each class carries the exit status of a command it ends (`exit_code`), so this hierarchy is the table
of exit statuses (docs/contracts.md "Exit statuses"): 2 bad input, 3 requests that failed for good,
4 a fault of the environment, 5 the Ray cluster, 1 anything else that failed. `humpback.cli.main`
is the one place that turns an error into its one line and status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


class HumpbackError(Exception):
    """Base of every error humpback raises on purpose."""

    exit_code: ClassVar[int] = 1


# --- input: files and records ---------------------------------------------------------------------


class InputError(HumpbackError, ValueError):
    """Input that cannot be used: names the file (and line or field) and the fix. One line per problem."""

    exit_code = 2


class RecordError(InputError):
    """A record of an input file that cannot be used: `path`, its `line` (or item of a JSON list),
    the `field` at fault where one is, and what is wrong with it and the fix."""

    def __init__(self, path: Path | str, line: int | None, problem: str, *, field: str | None = None,
                 where: str = "line") -> None:
        at = f"{path} {where} {line}" if line is not None else str(path)
        super().__init__(f"{at}: {field}: {problem}" if field else f"{at}: {problem}")
        self.path, self.line, self.field, self.problem = path, line, field, problem


class ConfigError(InputError):
    """A config (a file or a flag's value) that cannot be used: says which and the key at fault."""


class ChecksumMismatch(InputError):
    """Joined parts that are not the file recorded (a packaged model's GGUF): a part is damaged or from
    another release."""


class CorpusError(InputError):
    """A corpus that cannot be read at all (unknown format, missing Parquet column)."""


class PodError(InputError):
    """A POD document that cannot be read (unbalanced formatting code)."""


class OasstError(HumpbackError, RuntimeError):
    """oasst1 cannot be read at all (missing file, unknown format, hub unreachable)."""

    exit_code = 2


class CheckpointError(InputError):
    """The folder cannot be served in place of the current weights; nothing was changed."""

    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(f"checkpoint {folder}: {problem}")
        self.folder = folder
        self.problem = problem


class OutputError(HumpbackError, OSError):
    """An output that cannot be written (a full disk, a read-only folder): names the file and says what
    it still holds. The run stops at once rather than ask for answers it cannot keep."""

    exit_code = 4


# --- requests to the model servers -----------------------------------------------------------------


class RetryableError(HumpbackError):
    """A response that may succeed on a retry (e.g. a generation aborted by the server)."""


class RequestFailed(HumpbackError):
    """A request that failed for good: a client error, or every retry used up."""

    exit_code = 3

    def __init__(self, reason: str, attempts: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


class UnusableInstruction(RequestFailed):
    """An answer whose instruction is no candidate for its segment; `kind` is one of `client.instructions.ISSUE_KINDS`.
    `attempts` counts the samples drawn for the segment."""

    def __init__(self, kind: str, instruction: str) -> None:
        super().__init__(f"unusable instruction ({kind}): {instruction[:80]!r}", 1)
        self.kind = kind


class Unreachable(RequestFailed):
    """No server answered (every endpoint refused the connection or timed out, every retry used up): a
    fault of the environment, not of the request; start the servers or point at running ones."""

    exit_code = 4


# --- the services -------------------------------------------------------------------------------


class ServeError(HumpbackError, RuntimeError):
    """The model servers could not be started, found or stopped."""

    exit_code = 4


class ClusterError(HumpbackError, RuntimeError):
    """A run on a Ray cluster (`--ray`) that could not go on: the cluster cannot be reached, or a shard
    failed on it for good (its retries used up). Every finished answer is in its shard's journal: a
    re-run resumes each shard."""

    exit_code = 5


class SwapError(HumpbackError, RuntimeError):
    """The server refused or failed the swap. Where the server survived, it serves the old weights."""


class JobFailed(HumpbackError, RuntimeError):
    """A fine-tuning job ended other than `succeeded`, or the trainer refused a request."""


@dataclass
class ApiError(HumpbackError):
    """An error the trainer answers as OpenAI's `{"error": {message, type, param, code}}`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def __str__(self) -> str:
        return self.message
