"""Shards: split one run's requests over N clients (N machines) with no overlap and no gap.

A shard is `I/N`: the requests whose content id (`custom_id`, 32 hex digits of a sha256) is I modulo
N. Membership is a pure function of the id, so N clients that read the same corpus with the same
settings divide the work among themselves without talking to each other, and a re-run of a shard
takes exactly the same requests (its resume works as an unsharded run's does). Nothing in a shard
depends on a server: the engines behind `--endpoint` do the placement, humpback only shards.

Every shard reads and prepares the whole input: exact and near dedup, and `--limit`, depend on
everything before a segment, so each shard must see it all to decide the same segments as the
unsharded run; only the requests are divided. `client.merge` joins the shards' outputs and proves
that together they are the unsharded run's.

Each command that shards (augment, curate, rewrite) declares a `shard: ShardSpec | None` setting and
wraps its jobs in `shard_jobs`; its config derives from `ClusterSettings`, whose `--ray` runs every
shard of the run on a Ray cluster (`client.cluster`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from client.tasks import Job
from humpback.contracts import InputError
from humpback.settings import setting

Item = TypeVar("Item")

# Leading hex digits of a custom_id read as the shard key: 64 bits of a sha256, so `key % N` is as
# even as N buckets can be (the bias of a 64-bit modulus is below 1e-17 for any N humpback will see).
KEY_HEX_DIGITS = 16
_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (written `index/count`, as on the command line)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard {self}: the count N of I/N must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self}: the index I of I/N runs from 0 to N-1 ({0}/{self.count} .. "
                             f"{self.count - 1}/{self.count})")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"I/N"` -> `Shard(I, N)`; a `ValueError` that says the expected form."""
        m = _SPEC.fullmatch(text)
        if m is None:
            raise ValueError(f"shard {text!r}: expected I/N, e.g. 0/4 (shard 0 of 4)")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _validate(value: Any) -> Shard:
    if isinstance(value, Shard):
        return value
    if isinstance(value, str):
        return Shard.parse(value)
    raise ValueError(f"shard {value!r}: expected I/N, e.g. 0/4 (shard 0 of 4)")


# The type of a `shard` setting: given as "I/N" (flag, environment, config file), held as a `Shard`,
# written back as "I/N" (so a dumped config reads back the same).
ShardSpec = Annotated[Shard, PlainValidator(_validate), PlainSerializer(str, return_type=str),
                      WithJsonSchema({"type": "string", "pattern": r"^\d+/\d+$"})]


def shard_key(custom_id: str) -> int:
    """The integer a custom_id is sharded by: its leading `KEY_HEX_DIGITS` hex digits."""
    try:
        return int(custom_id[:KEY_HEX_DIGITS], 16)
    except ValueError:
        raise InputError(f"custom_id {custom_id!r}: not hex, so it cannot be sharded (ids come from "
                         "contracts.content_id)") from None


def in_shard(custom_id: str, shard: Shard | None) -> bool:
    """Whether `shard` owns the request `custom_id`; every request is in the shard None (no sharding)."""
    return shard is None or shard_key(custom_id) % shard.count == shard.index


def shard_jobs(jobs: Iterable[Job[Item]], shard: Shard | None, counts: Counter[str]) -> Iterator[Job[Item]]:
    """The jobs of `shard`, before any is sent; `counts["other_shard"]` counts the others. Applied after
    `--limit` has cut the stream, so the limit is the unsharded run's and every shard does its part of it."""
    if shard is None:
        yield from jobs
        return
    for job in jobs:
        if in_shard(job.request.custom_id, shard):
            yield job
        else:
            counts["other_shard"] += 1


class ClusterSettings(BaseModel):
    """Where the shards of a run are placed: `ray` runs all of them as tasks of a Ray cluster
    (`client.cluster`), each with its own journal under `<out>.shards/`. The base of the configs of
    the commands that shard (augment, curate, rewrite), so that `--ray` and `--shards` are declared once."""

    model_config = ConfigDict(extra="forbid")

    ray: str | None = setting(None, "run the shards on a Ray cluster: its address (host:6379, ray://host:10001), "
                                    "`auto` (the cluster this machine belongs to, or RAY_ADDRESS) or `local` (a "
                                    "cluster of this machine's cores, started for the run); each shard writes its "
                                    "journal to <out>.shards/, which every node must see (a shared volume), then "
                                    "they are merged into --out (needs the ray extra: docs/ray.md)",
                              metavar="ADDRESS")
    shards: int | None = setting(None, "with --ray: the shards (Ray tasks) the requests are split into, by content "
                                       "id; unset: the cluster's CPUs. Keep it for the life of a run: a re-run "
                                       "resumes each shard from its journal", ge=1)

    @model_validator(mode="after")
    def _one_placement(self) -> ClusterSettings:
        if self.ray is not None and getattr(self, "shard", None) is not None:
            raise ValueError("--ray runs every shard of the run: give --shards N, not --shard I/N")
        if self.shards is not None and self.ray is None:
            raise ValueError("--shards N places the shards on a Ray cluster: give --ray ADDRESS too (or --shard I/N "
                             "to run one shard here)")
        return self
