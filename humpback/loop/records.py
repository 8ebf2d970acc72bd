"""What each stage of a run records (`RUN_DIR/stages/NAME.json`, see `humpback.loop.stages`), one model
per kind of stage: read by the loop to go on (or resume), by `humpback report` to draw the run.

A client command's summary (`client.runner.RunSummary`) is read in one adapter per task
(`AugmentResult.from_summary`, `CurateResult.from_summary`, `RewriteResult.from_summary`): the
fields the loop reads are copied out there, once, and the summary itself is kept for the record.

Records of an older version of humpback are not read: a stage record that does not fit its model
names the file and the field (`InputError`, from `Stages`); re-run into a fresh run folder
(docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, JsonValue

from client.extras import AugmentExtra, CurateExtra
from client.runner import RunSummary
from humpback.contracts import Role
from humpback.evaluation.metrics import Metric


class StageRecord(BaseModel):
    """What every finished stage records besides its outputs: its timing, set by `Stages.run`."""

    model_config = ConfigDict(extra="forbid")

    elapsed_s: float = 0.0
    attempts: int = 0
    # Wall time since the first attempt started (an interrupted attempt leaves no timing of its own).
    since_first_start_s: float = 0.0
    finished_at: str = ""


class StageState(BaseModel):
    """An unfinished stage's progress (`RUN_DIR/stages/NAME.state.json`): its attempts and, for a
    training stage, the job a re-run waits for instead of starting another."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = 0
    first_started: float | None = None
    job: str | None = None
    file: str | None = None
    examples: int | None = None


class ClientSummary(BaseModel):
    """A client command's summary as it wrote it (`client.runner.RunSummary`), kept for the record.
    Only the counters are read here; `extra` is each task's own and is read in its adapter alone."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, int] = {}
    rejected: dict[str, int] = {}
    prepare: dict[str, int] = {}
    results: dict[str, int] = {}
    failures: dict[str, int] = {}
    # Counts and rates (augment: `client.augment.instruction_quality`); ints stay ints.
    quality: dict[str, int | float | None] = {}
    extra: dict[str, JsonValue] = {}
    elapsed_s: float = 0.0

    @classmethod
    def of(cls, summary: RunSummary) -> ClientSummary:
        return cls.model_validate(summary.to_dict())


# --- the data stage -------------------------------------------------------------------------------


class PairCounts(BaseModel):
    """The pairs of a user's seed and held-out files (`humpback.data.pairs.import_pairs`)."""

    seed: int
    heldout: int
    seed_rest: int
    rejected: int


class DataFiles(StageRecord):
    """The run's data (`data` stage): built for the demo, or imported from the user's pair files."""

    seed: Path
    heldout: Path | None = None
    # The seed side's pairs past `data.max_seed`, where the build or import wrote one.
    seed_rest: Path | None = None
    corpus: list[Path]
    # Imported pairs only: the lines left out, and the counts.
    errors: Path | None = None
    pairs: PairCounts | None = None
    calibration: Path | None = None
    calibration_pairs: int = 0


# --- training -------------------------------------------------------------------------------------


class LossPoint(BaseModel):
    step: int
    loss: float
    tokens_per_second: float | None = None


class TrainedModel(StageRecord):
    """A fine-tuning job (`train_*`): its model, and the role whose servers it is deployed to."""

    job: str
    fine_tuned_model: str
    role: Role
    examples: int
    trained_tokens: int | None = None
    # The request stall of the job's last hot-swap (None: it was never swapped in).
    swap_stall_s: float | None = None
    losses: list[LossPoint] = []


# --- augment, calibrate, curate, rewrite ----------------------------------------------------------


class AugmentResult(StageRecord):
    candidates: Path
    summary: ClientSummary

    @classmethod
    def from_summary(cls, candidates: Path, summary: RunSummary[AugmentExtra]) -> AugmentResult:
        return cls(candidates=candidates, summary=ClientSummary.of(summary))


class CalibrationResult(StageRecord):
    """Iteration t's combiner (`calibrate_t`), or why none was fitted (that iteration curates with `fallback`)."""

    combiner: Path | None
    pairs: int | None = None
    negatives: dict[str, int] | None = None
    coef: dict[str, float] | None = None
    fallback: str | None = None
    reason: str | None = None


class CurateResult(StageRecord):
    """Iteration t's curation (`curate_t`): A_t, its scores and the threshold `k` it selected with."""

    curated: Path
    scored: Path
    dataset: Path
    # The scorer's fine-tuned model, and the name it was served under (what the scored journal records).
    scorer: str
    served_as: str
    # How it scored (`curate.scorer`) and the journal's mode of those scores.
    scoring: str
    mode: str
    calibration: Path | None = None
    # The threshold selected with: `curate.min_score` or the one `curate.top_fraction` chose; None where
    # nothing was scored.
    k: float | None
    selected: int
    scored_total: int
    kept_per_threshold: dict[str, int]
    contaminated: int
    contaminated_file: Path
    summary: ClientSummary

    @classmethod
    def from_summary(cls, summary: RunSummary[CurateExtra], **outputs: object) -> CurateResult:
        """The curate stage's record from curate's summary and the loop's `outputs` (files, scorer,
        counts)."""
        extra = summary.extra
        return cls.model_validate({
            **outputs, "k": extra.k, "selected": extra.selected, "scored_total": extra.scored_total,
            "mode": extra.mode, "served_as": extra.model, "contaminated": summary.results["contaminated"],
            "summary": ClientSummary.of(summary)})


class RewriteResult(StageRecord):
    """The rewrite arm's A_1 (`rewrite_1`): the pairs sent, the rewrites that came back, and who rewrote."""

    candidates: Path
    rewritten_file: Path
    rewriter: str
    rewriter_checkpoint: str | None
    curated: int
    rewritten: int
    not_rewritten: int
    summary: ClientSummary

    @classmethod
    def from_summary(cls, summary: RunSummary, candidates: Path, rewritten_file: Path, curated: int,
                     rewritten: int) -> RewriteResult:
        return cls(candidates=candidates, rewritten_file=rewritten_file, rewriter=str(summary.extra.model),
                   rewriter_checkpoint=summary.extra.checkpoint, curated=curated, rewritten=rewritten,
                   not_rewritten=curated - rewritten, summary=ClientSummary.of(summary))


# --- evaluation -----------------------------------------------------------------------------------


class IfevalScores(BaseModel):
    n: int
    prompt_strict: float
    prompt_loose: float
    instruction_strict: float
    instruction_loose: float


class PairwiseScores(BaseModel):
    n: int
    win_rate: float
    ci: tuple[float, float]
    wins: int
    ties: int
    losses: int
    judge: str
    baseline: str
    position_flip_rate: float
    # False where the judge favoured a position in most pairs: its win rate is no result.
    informative: bool


class NllScores(BaseModel):
    n: int
    # Mean over pairs of each pair's per-token NLL (`ci` is over pairs).
    mean: float | None
    per_token: float | None
    ci: tuple[float, float] | None
    perplexity: float | None


class Evaluation(StageRecord):
    """A model's evaluation (`eval_*`); `nll` where `eval.nll` is on and the run has held-out pairs."""

    model: str
    ifeval: IfevalScores
    pairwise: PairwiseScores
    nll: NllScores | None = None


# --- stage metrics (`eval.stage_metrics`) ---------------------------------------------------------


class StageMetrics(StageRecord):
    """A measured stage (`stage_*`): a `Metric` per name, as `humpback eval` writes them to `out`; or
    why it was not measured (`skipped`)."""

    model: str
    metrics: dict[str, Metric] = {}
    out: Path | None = None
    skipped: str | None = None


class ScorerMetrics(StageMetrics):
    """`eval scorer` of an iteration's scorer, scoring as it curated and counting at its `k`."""

    scoring: str
    threshold: float


class CandidateQuality(StageMetrics):
    """What augment's candidates are worth (`stage_candidates`): usable rate, diversity, rejections."""

    instructions: int
    # Augment's counts: sent, usable, each kind of unusable instruction, resampled, rescued.
    rejections: dict[str, int]
    plot: Path


def record_type(name: str) -> type[StageRecord]:
    """The model of stage `name`'s record."""
    for prefix, kind in RECORD_TYPES:
        if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
            return kind
    raise KeyError(f"no stage is named {name}")


# Exact names first, then prefixes (`stage_candidates` before `stage_`...).
RECORD_TYPES: tuple[tuple[str, type[StageRecord]], ...] = (
    ("data", DataFiles), ("augment", AugmentResult), ("stage_candidates", CandidateQuality),
    ("train_", TrainedModel), ("calibrate_", CalibrationResult), ("curate_", CurateResult),
    ("rewrite_", RewriteResult), ("eval_", Evaluation), ("stage_backward_", StageMetrics),
    ("stage_scorer_", ScorerMetrics),
)
