"""What each task's run names beside its counts: the typed `extra` of a `client.runner.RunSummary`,
one model per task on a base every run shares. A run sets the fields it knows; only the fields set
are written (`<out>.summary.json` holds no key a run did not name), so a field left unset reads
None here and is absent from the file, while one set to None (curate's `bands` under a likelihood
scorer) is written as null."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

from pydantic import BaseModel, ConfigDict


@dataclass
class InstructionQuality:
    """What an augment run's instructions were worth (`client.augment.augment`): `sent` segments
    asked, `usable` candidates written, the unusable answers of each kind (`client.instructions.
    ISSUE_KINDS`), `resampled` requests and `rescued` segments, and `usable_rate` = usable / sent
    (None when nothing was sent). A dataclass, not a model: a field of a model may not be named `copy`."""

    sent: int
    usable: int
    truncated: int
    empty: int
    copy: int
    meta: int
    resampled: int
    rescued: int
    usable_rate: float | None

    @classmethod
    def summed(cls, parts: Sequence[InstructionQuality]) -> InstructionQuality:
        """The quality of one run from its shards' (`client.cluster.combined`): counts summed, the rate
        of all the shards' requests."""
        counts = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(cls) if f.name != "usable_rate"}
        return cls(**counts, usable_rate=counts["usable"] / counts["sent"] if counts["sent"] else None)


class Extra(BaseModel):
    # validate_assignment: a field assigned a dict becomes its model, and counts as set.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayRun(Extra):
    """A run spread over a cluster (`client.cluster`): its address, shards and each shard's records."""

    address: str
    shards: int
    written: list[int]


class RunExtra(Extra):
    """What every run may name: the journal's repair, the served model, the shard, the retries, and,
    for a run spread over a cluster (`client.cluster.combined`), the cluster and the merge's counts
    (`merge`: the merge's `results`, and the ids it found `missing_ids` or `unexpected_ids`)."""

    repaired_bytes: int | None = None
    corrupt_journal_lines: int | None = None
    model: str | None = None
    checkpoint: str | None = None
    shard: str | None = None
    retries: int | None = None
    ray: RayRun | None = None
    merge: dict[str, int | list[str]] | None = None

    def copy_from(self, other: RunExtra, drop: Collection[str] = ()) -> None:
        """Set each field `other` set, but those in `drop` (a cluster run's from its shards' and its own)."""
        for name in other.model_fields_set - set(drop):
            setattr(self, name, getattr(other, name))


class EndpointLoad(Extra):
    """What one endpoint did in an augment run."""

    completed: int
    errors: int
    window: int


class AugmentExtra(RunExtra):
    """augment's: what each endpoint did."""

    endpoints: dict[str, EndpointLoad] | None = None


class MeanChars(Extra):
    """Mean response length of the kept pairs and of all scored ones (None when there are none)."""

    kept: float | None
    all: float | None


class CombinerUsed(Extra):
    """The combined scorer's fitted combiner, copied beside the scores, and what it was fitted on."""

    path: str
    data: str
    pairs: int
    negatives: dict[str, int]


class CurateExtra(RunExtra):
    """curate's (and its batch import's): the scored mode, the threshold `k` (whichever of min_score,
    top_fraction or min_prob chose it), what was selected of how many, the rubric's bands and parse
    rate, mean lengths, the combiner, the contamination per set (None when off), and a likelihood
    scorer's terms (`terms`: a batch import's counts; `terms_asked`: an online run's)."""

    contaminated: dict[str, int] | None = None
    mode: str | None = None
    combiner: CombinerUsed | None = None
    terms: dict[str, int] | None = None
    terms_asked: int | None = None
    bands: dict[str, int] | None = None
    selected: int | None = None
    k: float | None = None
    top_fraction: float | None = None
    scored_total: int | None = None
    mean_chars: MeanChars | None = None
    parse_rate: float | None = None


class ShardSetNames(Extra):
    """What a merge's shard set lacks, by name (`client.merge.ShardSet`)."""

    count: int | None
    missing: list[int]
    repeated: list[int]
    unproven: list[str]
    failed: dict[str, int]
    settings: dict[str, list[str]]


class MergeExtra(RunExtra):
    """A merge's (`client.merge.merge`): the shard set, the ids missing or unexpected (the first few),
    and the records each shard gave."""

    shard_set: ShardSetNames | None = None
    missing: list[str] | None = None
    unexpected: list[str] | None = None
    shards: dict[str, int] | None = None


class PreferencesExtra(RunExtra):
    """export dpo's: the scorer whose scores made the pairs."""

    scorer: str | None = None
