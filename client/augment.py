"""Self-augmentation: stream a corpus, ask the backward model M_yx for one instruction per segment.

`augment()` is the whole `humpback augment` command as an async function. Results are appended to a
journal as they arrive; running it again with the same arguments resumes (finished `custom_id`s are
skipped, failed ones retried), and a kill at any moment loses no finished line and duplicates none.

Every answer is checked with `client.instructions.instruction_issue`: an instruction that is truncated,
empty, a copy of its segment or a meta-answer is no candidate. Online, such a segment is asked again
with another seed, up to `AugmentConfig.resample` times, before it counts as failed; a batch import
(`client.batch`) cannot ask again, so there it fails at once. Either way the failure's reason names
the kind, and a later run retries the segment.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from client.completions import chat_choice
from client.corpus import Corpus, open_corpora
from client.extras import AugmentExtra, EndpointLoad, InstructionQuality
from client.fanout import Fanout, FanoutConfig
from client.instructions import ISSUE_KINDS, instruction_issue
from client.journal import FsyncPolicy, LineWriter
from client.prepare import PrepareConfig, Preparer
from client.runner import Answer, RunSummary, online, open_run, run, served_model
from client.shard import ClusterSettings, ShardSpec, shard_jobs
from client.tasks import Job, Parsed
from humpback.contracts import (
    AUGMENT_TEMPERATURE,
    AUGMENT_TOP_P,
    DEMONSTRATION_MAX_CHARS,
    BatchRequest,
    Candidate,
    ChatRequest,
    InputError,
    Rejected,
    RequestFailed,
    Segment,
    SeedPair,
    UnusableInstruction,
    backward_messages,
    content_id,
    pick_demonstrations,
    read_pairs,
)
from humpback.settings import setting

log = logging.getLogger(__name__)


class AugmentConfig(ClusterSettings):
    """Generation settings of a self-augmentation run."""

    model: str | None = setting(None, "served model name; unset takes the first model the endpoint lists")
    checkpoint: str | None = setting(None, "version label recorded with each candidate; unset records the served "
                                           "model's root (its weights path) from /v1/models (batch import: none)")
    max_tokens: int = setting(256, "cap on the instruction's length; an instruction cut at the cap is not a "
                                   "candidate", ge=1)
    temperature: float = setting(AUGMENT_TEMPERATURE, "sampling temperature (the paper's, §3.1)", ge=0)
    top_p: float = setting(AUGMENT_TOP_P, "nucleus sampling mass (the paper's, §3.1)", gt=0, le=1)
    seed: int | None = setting(None, "per-request sampling seed, for reproducible runs")
    shots: int = setting(0, "demonstrations shown before each segment: this many pairs of --demonstrations, as "
                            "earlier turns of the conversation (contracts.pick_demonstrations: short ones, the same "
                            "for every segment, so vLLM's prefix cache computes them once); 0: the paper's "
                            "zero-shot prompt", ge=0)
    demonstrations: Path | None = setting(None, "human pairs the demonstrations are drawn from: JSONL with "
                                                "'instruction' and 'response' per line (a seed file); needed "
                                                "with --shots")
    resample: int = setting(2, "extra samples, each with the next seed, for a segment whose instruction is unusable "
                               "(client.instructions) before it counts as failed; none at temperature 0. Not part "
                               "of the custom_id", ge=0)
    limit: int | None = setting(None, "take only the first N kept segments (done ones included, so a resumed run "
                                      "takes the same ones): a trial run, or a fixed CPU budget", ge=0)
    shard: ShardSpec | None = setting(None, "do only shard I of N (0 <= I < N) of the requests, by content id "
                                            "(client.shard): N runs on N machines split the corpus with no "
                                            "overlap and no gap. Every shard reads and prepares the whole corpus, "
                                            "and --limit L is the unsharded run's (the first L kept segments "
                                            "overall, of which this shard does its own); `humpback merge` joins "
                                            "the shards' outputs",
                                      metavar="I/N")
    fsync: FsyncPolicy = setting("interval", "journal durability policy (see client.journal.Journal)")
    progress: bool = setting(True, "show a progress bar on stderr")


def prepared_segments(corpora: Iterable[Corpus], preparer: Preparer | None, errors: LineWriter,
                      summary: RunSummary) -> Iterator[tuple[Corpus, Segment]]:
    """Kept segments of the corpora; rejected records go to `errors` and are counted by reason."""
    for corpus in corpora:
        for rec in corpus:
            summary.input["records"] += 1
            if isinstance(rec, Rejected):
                summary.input["rejected"] += 1
                summary.rejected[rec.reason.split(" at byte")[0].split(":")[0]] += 1
                errors.write(rec.model_dump_json())
                continue
            if preparer is None:
                yield corpus, rec
            else:
                for seg in preparer(rec):
                    yield corpus, seg


def load_demonstrations(cfg: AugmentConfig) -> tuple[SeedPair, ...]:
    """The `cfg.shots` demonstrations of a run, picked from `cfg.demonstrations`
    (`contracts.pick_demonstrations`); none for `shots` 0. A file that cannot be used raises
    `InputError` naming it (and the line), before anything is sent."""
    if not cfg.shots:
        return ()
    path = cfg.demonstrations
    if path is None:
        raise InputError(f"--shots {cfg.shots} needs --demonstrations FILE: human pairs to show the model")
    try:
        pairs = [SeedPair.make(x, y, source=f"{path}:{n}", license="unknown") for n, x, y in read_pairs(path)]
    except OSError as exc:
        raise InputError(f"{path}: cannot read the demonstrations ({exc.strerror or exc})") from None
    demos = pick_demonstrations(pairs, cfg.shots)
    if len(demos) < cfg.shots:
        log.warning("%s: only %d of %d pairs fit as demonstrations (a response of at most %d characters, a "
                    "one-line instruction)", path, len(demos), cfg.shots, DEMONSTRATION_MAX_CHARS)
    return demos


def parse_instruction(data: dict[str, Any]) -> tuple[str, str]:
    """(instruction, finish_reason) of a chat completion, the instruction stripped: an aborted or
    malformed answer is retried (`RetryableError`), a finish other than stop or length fails. Whether
    the instruction is usable is `AugmentTask.record`'s question: it needs the segment."""
    choice, text = chat_choice(data)
    finish = choice.get("finish_reason") or "stop"
    if finish not in ("stop", "length"):
        raise RequestFailed(f"unusable finish_reason={finish!r}", 1)
    return text.strip(), finish


@dataclass(frozen=True)
class AugmentTask:
    """Backtranslate a segment (a `client.tasks.Task`): ask `model` for the instruction the segment
    answers; the candidate records `checkpoint` as its version. An unusable instruction is no
    candidate: `record` raises `UnusableInstruction`, and `resample` builds the request for another try."""

    model: str
    checkpoint: str | None = None
    config: AugmentConfig = field(default_factory=AugmentConfig)
    demonstrations: tuple[SeedPair, ...] = ()  # `load_demonstrations(config)`

    def request(self, seg: Segment) -> BatchRequest:
        cfg = self.config
        messages = backward_messages(seg.text, self.demonstrations)
        body = ChatRequest(model=self.model, messages=messages, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_tokens=cfg.max_tokens, seed=cfg.seed).body()
        cid = content_id("augment", messages, self.model, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed)
        return BatchRequest(custom_id=cid, body=body)

    @property
    def resamples(self) -> int:
        """Extra samples allowed per segment: `config.resample`, or none at temperature 0, where
        decoding is greedy and a new sample would repeat the last."""
        return self.config.resample if self.config.temperature > 0 else 0

    def resample(self, request: BatchRequest, attempt: int) -> BatchRequest:
        """The `attempt`-th extra sample (1, 2, ...) of the segment `request` asks for, with the same
        `custom_id` (the journal holds one line per segment however many samples it took). With a
        `seed`, each sample gets its own, `seed + attempt`, so that it differs from the others; without
        one, sampling differs by itself, and no seed is sent (CPU servers refuse per-request seeds)."""
        if self.config.seed is None:
            return request
        return request.model_copy(update={"body": {**request.body, "seed": self.config.seed + attempt}})

    def parse(self, body: dict[str, Any]) -> tuple[str, str]:
        return parse_instruction(body)

    def record(self, custom_id: str, seg: Segment, parsed: tuple[str, str]) -> Candidate:
        instruction, finish = parsed
        kind = instruction_issue(instruction, seg.text, finish)
        if kind is not None:
            raise UnusableInstruction(kind, instruction)
        return Candidate(custom_id=custom_id, instruction=instruction, output=seg.text, source=seg.source,
                         model=self.model, checkpoint=self.checkpoint, finish_reason=finish)


def resampling(answer: Answer, task: AugmentTask, counts: Counter[str]) -> Answer:
    """`answer`, asking again (`task.resample`) up to `task.resamples` times while the instruction is
    unusable, at once: an unusable answer is no fault of the server, so there is no backoff. `counts`
    gets the kind of each unusable answer, the extra requests (`resampled`) and the segments that a
    resample turned into a candidate (`rescued`)."""

    async def resampled(request: BatchRequest, parse: Callable[[dict[str, Any]], Parsed]) -> Parsed:
        attempt = 0
        while True:
            try:
                result = await answer(task.resample(request, attempt) if attempt else request, parse)
            except UnusableInstruction as exc:
                counts[exc.kind] += 1
                if attempt == task.resamples:
                    exc.attempts = attempt + 1
                    raise
                attempt += 1
                counts["resampled"] += 1
                continue
            if attempt:
                counts["rescued"] += 1
            return result

    return resampled


def instruction_quality(summary: RunSummary, counts: Counter[str]) -> InstructionQuality:
    """The `quality` of an augment run's summary (see `augment`)."""
    usable, sent = summary.results["written"], summary.results["written"] + summary.results["failed"]
    return InstructionQuality(sent=sent, usable=usable, **{kind: counts[kind] for kind in ISSUE_KINDS},
                              resampled=counts["resampled"], rescued=counts["rescued"],
                              usable_rate=usable / sent if sent else None)


async def augment(corpus: Iterable[str | os.PathLike[str] | Corpus], out: str | os.PathLike[str],
                  fanout: FanoutConfig, config: AugmentConfig | None = None,
                  prepare: PrepareConfig | None = None, text_field: str = "text") -> RunSummary[AugmentExtra]:
    """Backtranslate every kept segment of `corpus` into `out` (a candidates journal); resumable.

    `prepare=None` applies the paper's default preparation; pass `PrepareConfig(...)` to change it.
    Every corpus file is checked first (`CorpusError` names each that cannot be read, and nothing is
    sent), then `out` is locked for the run (`InputError` while another run writes it). Side files:
    `<out>.errors.jsonl` (rejected input records, and journal lines that are no record: their segments
    are asked again), `<out>.failed.jsonl` (requests that failed this run; retried next run),
    `<out>.summary.json`.

    The summary's `quality` measures the instructions of this run's requests: `sent` segments asked
    (segments done by an earlier run are not), `usable` candidates written, the count of unusable
    answers of each kind (`truncated`, `empty`, `copy`, `meta`; resampled ones included), `resampled`
    (extra requests made) and `rescued` (segments a resample saved), and `usable_rate` = usable /
    sent (None when nothing was sent). Every answer is usable or of one kind, so
    `sent + resampled` = `usable` + the kinds + the segments that failed for another reason.

    With `config.shard` I/N, only the segments whose `custom_id` is in shard I are asked; the others
    are counted as `results["other_shard"]` and left to the other shards (`client.shard`).
    """
    cfg = config or AugmentConfig()
    out = Path(out)
    corpora = open_corpora(corpus, text_field)
    demonstrations = load_demonstrations(cfg)
    preparer = Preparer(prepare)
    counts: Counter[str] = Counter()
    total = sum(c.total_bytes for c in corpora)

    def finish(summary: RunSummary[AugmentExtra]) -> None:
        summary.prepare.update(preparer.counts)
        summary.quality = instruction_quality(summary, counts)

    with open_run(out, "augment", total, fsync=cfg.fsync, progress=cfg.progress, finish=finish,
                  extra=AugmentExtra()) as opened:
        summary, errors, progress = opened.summary, opened.errors, opened.progress
        async with Fanout(fanout) as fan:
            model, root = await served_model(fan, cfg.model)
            task = AugmentTask(model, cfg.checkpoint or root, cfg, demonstrations)
            summary.extra.model, summary.extra.checkpoint = model, task.checkpoint
            if cfg.shard is not None:
                summary.extra.shard = str(cfg.shard)

            def jobs() -> Iterator[Job[Segment]]:
                offset, last = 0, None  # bytes of the corpora before `last`, the one being read
                for corp, seg in islice(prepared_segments(corpora, preparer, errors, summary), cfg.limit):
                    if corp is not last:
                        offset += last.total_bytes if last is not None else 0
                        last = corp
                    yield Job(task.request(seg), seg, seg.source, offset + corp.bytes_read)

            mine = shard_jobs(jobs(), cfg.shard, summary.results)  # after --limit: the limit is the whole run's
            await run(task, mine, resampling(online(fan, usage=summary.results), task, counts), opened.journal,
                      opened.failed, summary, progress, fan.max_inflight)
            progress.advance(total)
            summary.extra.retries = fan.retries
            summary.extra.endpoints = {e.url: EndpointLoad(completed=e.completed, errors=e.errors, window=e.window)
                                       for e in fan.endpoints}
    return summary
