"""Self-curation: score candidates, select A_k.

`--scorer rubric` (default) asks the scorer the paper's 5-point rubric; `pmi`, `reverse_pmi` and
`combined` score by likelihoods instead (`client.likelihood`: one prefill per term, no decoding).
The rubric's two scoring modes share the rubric prefix (so vLLM's prefix cache serves it once per server):
- "logprobs" (default): the answer is constrained to one digit "1".."5" and the top log-probabilities
  give a distribution over the digits and an expected score, so "score >= 4.5" is well defined;
- "free_text": the paper's prompt, a brief reasoning ending in "Score: N", parsed; the parse rate is
  reported.
Scored candidates go to a resumable journal; the curated set is rewritten from it on every run.
The candidates file is JSONL, gzip'd where it ends in .gz; a candidate with a field longer than
`max_field_chars` is set aside unsent, as `augment` sets aside segments over `--max-chars`. So is a
candidate that shares a 13-word n-gram with an evaluation prompt or the held-out pairs
(`client.decontaminate`): it goes to `<out>.contaminated.jsonl`, never scored, never selected.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from client import decontaminate
from client.completions import chat_choice, choice_mass
from client.corpus import Lines, check_input
from client.decontaminate import Decontaminator
from client.extras import CombinerUsed, CurateExtra, MeanChars
from client.fanout import Fanout, FanoutConfig
from client.journal import FsyncPolicy, Journal, LineWriter
from client.calibration import Combiner
from client.likelihood import LikelihoodScorer, Model, TermTask, score_online
from client.progress import Progress
from client.runner import CorruptLines, RunSummary, online, open_run, run, served_model, side_path
from client.shard import ClusterSettings, ShardSpec, in_shard, shard_jobs
from client.tasks import Job
from humpback.contracts import (
    AUGMENTED_SYSTEM_PROMPT,
    BAND_LABELS,
    SCORE_CHOICES,
    UNPARSED,
    BatchRequest,
    Candidate,
    ChatRequest,
    InputError,
    Rejected,
    RequestFailed,
    ScoredCandidate,
    ScoreMode,
    Source,
    band_of,
    content_id,
    parse_free_text_score,
    rubric_messages,
    tagged_example,
)
from humpback.settings import setting

log = logging.getLogger(__name__)

HIST_BINS = 40

Scorer = Literal["rubric", "pmi", "reverse_pmi", "combined"]


class CurateConfig(ClusterSettings):
    """Scoring and selection settings of a self-curation run."""

    scorer: Scorer = setting("rubric", "rubric: the paper's 5-point rubric asked of the scorer (--mode); pmi: "
                                       "log p(y|x) - log p(y) under the scorer; reverse_pmi: log p(x|y) - log p(x) "
                                       "under the backward model (--backward-endpoint); combined: P(good pair) "
                                       "from both and the response's length (client.likelihood)")
    mode: ScoreMode = setting("logprobs", "rubric: logprobs: expected score from the digit probabilities; "
                                          "free_text: the paper's format, a brief reasoning ending in 'Score: N'")
    backward_endpoint: str | None = setting(None, "the backward model's server, for --scorer reverse_pmi and combined",
                                            metavar="URL")
    min_score: float = setting(4.5, "select pairs with score >= k (the paper's A_5 is 'score >= 4.5')")
    top_fraction: float | None = setting(None, "instead, select the best-scored fraction of pairs: k becomes the "
                                               "score of the last pair of that fraction (ties kept) and is "
                                               "reported; for scorers whose scale is off, such as a small model "
                                               "after a few CPU steps", gt=0, le=1)
    min_prob: float | None = setting(None, "with --scorer combined: select pairs with P(good pair) >= this (a "
                                           "threshold that means the same for every model size); overrides "
                                           "--min-score and --top-fraction", ge=0, le=1)
    calibration: Path | None = setting(None, "with --scorer combined: the fitted combiner, a JSON file "
                                             "`humpback eval calibrate` wrote (weights, features, the pairs "
                                             "it was fitted on); copied beside the scores as <out>.combiner.json",
                                       metavar="FILE")
    model: str | None = setting(None, "served scorer name; unset takes the first model the endpoint lists (batch "
                                      "import: the model the requests name)")
    checkpoint: str | None = setting(None, "version label recorded with each score; unset records the served "
                                           "model's root (batch import: none)")
    max_tokens: int = setting(256, "budget of the free-text reasoning", ge=1)
    max_field_chars: int = setting(8000, "longest instruction or output scored, in characters: a longer candidate "
                                         "goes to <out>.errors.jsonl unsent (augment's segments are at most "
                                         "--max-chars, 3,000 by default; both fields and the rubric must fit the "
                                         "scorer's context)", ge=1)
    temperature: float = setting(0.0, "scoring temperature: 0 makes scores reproducible (the paper does not say how "
                                      "it sampled)", ge=0)
    scored: Path | None = setting(None, "scored-candidates journal; unset puts it next to the output as "
                                        "<out>.scored.jsonl")
    terms: Path | None = setting(None, "journal of the likelihood scorers' terms (each log-probability, keyed by the "
                                       "text, the model's name and its version: --checkpoint, else the served "
                                       "root, which a server that reloads other weights keeps); unset puts it next "
                                       "to the scored journal as <scored>.terms.jsonl. Runs that score the same "
                                       "text with the same weights may share one: the loop's iterations ask the "
                                       "backward model's terms once",
                                 metavar="FILE")
    histogram: bool = setting(True, "draw the score histogram <out>.scores.png")
    decontaminate: bool = setting(True, "drop, before scoring, every candidate whose instruction or output shares a "
                                        "13-word n-gram (normalised words), or holds a shorter one whole, with an "
                                        "IFEval or AlpacaEval prompt "
                                        "or a --decontaminate-against set; they go to <out>.contaminated.jsonl "
                                        "(the shipped prompts need the eval extra: pip install -e '.[eval]')")
    decontaminate_against: list[Path] = setting(default_factory=list, metavar="FILE",
                                                help="more sets to decontaminate against, repeatable: JSONL or JSON "
                                                     "files whose objects hold their text in prompt, instruction, "
                                                     "response or output (the loop adds its held-out pairs)")
    shard: ShardSpec | None = setting(None, "score only shard I of N (0 <= I < N) of the candidates, by the content "
                                            "id of their scoring request (client.shard): N runs split the "
                                            "candidates with no overlap and no gap; each selects from its own "
                                            "scores, so join the shards' scored journals with `humpback merge` "
                                            "and select once (--top-fraction is a fraction of all the scores)",
                                      metavar="I/N")
    fsync: FsyncPolicy = setting("interval", "journal durability policy (see client.journal.Journal)")
    progress: bool = setting(True, "show a progress bar on stderr")


def _chat_pair(messages: list[Any]) -> dict[str, Any]:
    """The instruction (last user turn) and output (last assistant turn) of a chat example's messages."""
    last = {m.get("role"): m.get("content") for m in messages if isinstance(m, dict)}
    return {"instruction": last.get("user"), "output": last.get("assistant")}


def scored_mode(cfg: CurateConfig) -> str:
    """The `mode` the scores of `cfg` are recorded under: the rubric's mode, or the likelihood scorer."""
    return cfg.mode if cfg.scorer == "rubric" else cfg.scorer


def read_candidates(path: Path, errors: LineWriter, summary: RunSummary,
                    max_field_chars: int) -> Iterator[tuple[Candidate, int]]:
    """The candidates of a JSONL file (gzip'd where it ends in .gz), each with the bytes of the file
    read so far (for progress).

    A line `augment` wrote is read whole; any other JSON object with `instruction` and `output`
    strings is a candidate too (a curated set's chat line gives its last user and assistant turns), its `custom_id` and `source` derived from the line where it has none
    (or an invalid one) and its `model` empty where it names none. Other lines, and candidates with a
    field over `max_field_chars` characters, go to `errors`; so does the line where a gzip stream
    breaks off, which ends the file.
    """
    lines = Lines(path)
    for lineno, raw in lines:
        summary.input["records"] += 1
        reason, field = None, None
        obj: Any = None
        if raw is None:
            reason = f"record larger than {lines.max_bytes} bytes"
        else:
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                reason = f"invalid JSON: {exc}"
        if reason is None and not isinstance(obj, dict):
            reason = "expected a JSON object"
        if reason is None and "instruction" not in obj and isinstance(obj.get("messages"), list):
            obj = {**obj, **_chat_pair(obj["messages"])}  # a curated set's line (ChatExample)
        if reason is None:
            for field in ("instruction", "output"):
                v = obj.get(field)
                if not isinstance(v, str) or not v.strip():
                    reason = f"field {field!r} missing, empty or not a string"
                    break
                if len(v) > max_field_chars:
                    reason = f"field {field!r} longer than {max_field_chars} characters (--max-field-chars)"
                    break
        if reason is not None:
            summary.input["rejected"] += 1
            summary.rejected[reason.split(":")[0]] += 1
            excerpt = None if raw is None else raw[:80].decode("utf-8", "replace")
            errors.write(Rejected(source=str(path), line=lineno, reason=reason, field=field,
                                  excerpt=excerpt).model_dump_json())
            continue
        src = obj.get("source")
        try:
            source = Source.model_validate(src) if isinstance(src, dict) else Source(path=str(path), line=lineno)
        except ValueError:
            source = Source(path=str(path), line=lineno)
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            cid = content_id("pair", obj["instruction"], obj["output"])
        known = {k: v for k in ("model", "checkpoint", "finish_reason") if isinstance(v := obj.get(k), str)}
        yield Candidate(**{"model": "", **known}, custom_id=cid, instruction=obj["instruction"],
                        output=obj["output"], source=source), lines.bytes_read
    broken = lines.broken()
    if broken is not None:
        summary.input["rejected"] += 1
        summary.rejected["unreadable file"] += 1
        errors.write(broken.model_dump_json())


class ContaminatedCandidate(Candidate):
    """A line of `<out>.contaminated.jsonl`: a candidate dropped before scoring, with the set it
    overlaps, the field that overlaps it and the shared n-gram (normalised words). Still a candidate:
    `curate --no-decontaminate` reads the file back, for a look at what was dropped."""

    contaminated_set: str
    contaminated_field: Literal["instruction", "output"]
    ngram: str


def decontaminator(cfg: CurateConfig) -> Decontaminator | None:
    """The decontaminator `cfg` asks for (None when off), every set read now: a set that cannot be
    read raises `InputError` before anything is sent."""
    if not cfg.decontaminate:
        return None
    return decontaminate.load(cfg.decontaminate_against)


class Contamination:
    """Drops the contaminated candidates of a stream before they are scored: each goes to `out` as a
    `ContaminatedCandidate` and is counted in `summary` (`results["contaminated"]`, and per set in
    `extra.contaminated`, None when off). `ids` holds the dropped candidates' ids, so that `select`
    leaves out a score an earlier run (without decontamination, or with fewer sets) wrote for one."""

    def __init__(self, found: Decontaminator | None, out: LineWriter, summary: RunSummary[CurateExtra]) -> None:
        self.found = found
        self.out = out
        self.summary = summary
        self.ids: set[str] = set()
        summary.results["contaminated"] = 0
        summary.extra.contaminated = None if found is None else dict.fromkeys(found.sizes, 0)

    def clean(self, cands: Iterable[tuple[Candidate, int]]) -> Iterator[tuple[Candidate, int]]:
        """`cands` without the contaminated ones."""
        for cand, pos in cands:
            if self.found is None or not self._dropped(cand, self.found):
                yield cand, pos

    def _dropped(self, cand: Candidate, found: Decontaminator) -> bool:
        for field in ("instruction", "output"):
            hit = found.match(getattr(cand, field))
            if hit is not None:
                self.out.write(ContaminatedCandidate(**cand.model_dump(), contaminated_set=hit.set_name,
                                                     contaminated_field=field, ngram=hit.ngram).model_dump_json())
                self.ids.add(cand.custom_id)
                self.summary.results["contaminated"] += 1
                self.summary.extra.contaminated[hit.set_name] += 1  # type: ignore[index]
                return True
        return False


def contaminated_ids(path: Path) -> set[str]:
    """The candidate ids of a `<out>.contaminated.jsonl` (none where there is no such file: a run
    that dropped nothing leaves none)."""
    if not path.exists():
        return set()
    with open(path, "rb") as src:
        return {ContaminatedCandidate.model_validate_json(line).custom_id for line in src if line.strip()}


def parse_logprob_score(data: dict[str, Any]) -> tuple[float, dict[str, float], str]:
    """(expected score, distribution over "1".."5", chosen digit) from a constrained chat completion."""
    choice, content = chat_choice(data)
    content = content.strip()
    mass = choice_mass(choice, SCORE_CHOICES)
    total = sum(mass.values())
    if total <= 0:  # no log-probabilities returned: fall back on the chosen digit
        if content not in mass:
            raise RequestFailed(f"no score digit in the answer {content[:40]!r}", 1)
        mass[content], total = 1.0, 1.0
    dist = {k: v / total for k, v in mass.items()}
    return sum(int(k) * p for k, p in dist.items()), dist, content


def parse_free_text(data: dict[str, Any]) -> tuple[float | None, str]:
    """(parsed score or None, raw text) from a free-text rubric answer."""
    _, text = chat_choice(data)
    score = parse_free_text_score(text)
    return (None if score is None else float(score)), text


@dataclass(frozen=True)
class ScoreTask:
    """Score a candidate on the rubric (a `client.tasks.Task`): ask `model` in `config.mode`; the
    score records `checkpoint` as the scorer's version."""

    model: str
    checkpoint: str | None
    config: CurateConfig

    def request(self, cand: Candidate) -> BatchRequest:
        mode = self.config.mode
        messages = rubric_messages(cand.instruction, cand.output, mode)
        if mode == "logprobs":
            chat = ChatRequest(model=self.model, messages=messages, temperature=self.config.temperature, max_tokens=1,
                               logprobs=True, top_logprobs=len(SCORE_CHOICES),
                               structured_outputs={"choice": list(SCORE_CHOICES)})
        else:
            chat = ChatRequest(model=self.model, messages=messages, temperature=self.config.temperature,
                               max_tokens=self.config.max_tokens)
        cid = content_id("score", mode, messages, self.model, chat.max_tokens, self.config.temperature)
        return BatchRequest(custom_id=cid, body=chat.body())

    def parse(self, body: dict[str, Any]) -> tuple[float | None, dict[str, float] | None, str]:
        """(score, distribution or None, raw answer), whatever the mode."""
        if self.config.mode == "logprobs":
            return parse_logprob_score(body)
        score, raw = parse_free_text(body)
        return score, None, raw

    def record(self, custom_id: str, cand: Candidate,
               parsed: tuple[float | None, dict[str, float] | None, str]) -> ScoredCandidate:
        score, dist, raw = parsed
        return ScoredCandidate(custom_id=custom_id, candidate_id=cand.custom_id, instruction=cand.instruction,
                               output=cand.output, source=cand.source, mode=self.config.mode, score=score,
                               distribution=dist, raw=raw, scorer_model=self.model,
                               scorer_checkpoint=self.checkpoint)


def scored_records(scored: Path, mode: str | None = None, scorer_model: str | None = None,
                   corrupt: Callable[[int, bytes], None] | None = None,
                   exclude: Collection[str] = ()) -> Iterator[ScoredCandidate]:
    """This mode's and scorer's records of a scored journal (it may hold others; None takes any), but
    those of the candidates in `exclude` (contaminated ones an earlier run scored). A line that is no
    record is skipped, and passed to `corrupt` with its line number."""
    with open(scored, "rb") as src:
        for lineno, line in enumerate(src, 1):
            try:
                rec = ScoredCandidate.model_validate_json(line)
            except ValidationError:
                if corrupt is not None:
                    corrupt(lineno, line)
                continue
            if mode in (None, rec.mode) and scorer_model in (None, rec.scorer_model) \
                    and rec.candidate_id not in exclude:
                yield rec


class Selection(BaseModel):
    """What chose a curated set, as curate's summary names it (`extra`: `k`, `mode`, `model`): the
    threshold k, whichever setting computed it, the scored records' mode and the scorer's name."""

    k: float
    mode: str
    model: str

    @classmethod
    def of(cls, summary: dict[str, Any], path: Path | str = "the curate summary") -> Selection:
        """The selection of a curate summary (`RunSummary.to_dict()` or its file); `InputError` naming
        `path` when it names none."""
        extra = summary.get("extra") or {}
        try:
            return cls.model_validate({f: extra.get(f) for f in cls.model_fields})
        except ValidationError:
            raise InputError(f"{path} names no threshold, mode or scorer (extra.k, extra.mode, extra.model): "
                             "pass the summary of the curate run that wrote the curated set") from None

    def records(self, scored: Path, exclude: Collection[str] = ()) -> Iterator[ScoredCandidate]:
        """The curated set this selection chose from `scored`, but the candidates in `exclude`."""
        return selected_records(scored, self.k, self.mode, self.model, exclude)


def selected_records(scored: Path, k: float, mode: str, scorer_model: str,
                     exclude: Collection[str] = ()) -> Iterator[ScoredCandidate]:
    """The curated set A_k as scored records: this mode's and scorer's pairs scored k or more, but those
    of the candidates in `exclude`. What `select` writes, and what `Selection.records` (the dataset
    export, the loop's rewrite arm) reads."""
    return (r for r in scored_records(scored, mode, scorer_model, exclude=exclude) if r.score is not None and r.score >= k)


def threshold(scored: Path, cfg: CurateConfig, scorer_model: str, exclude: Collection[str] = ()) -> float:
    """k: cfg.min_prob (combined), cfg.min_score, or the score of the last pair in the top
    cfg.top_fraction (of the pairs not in `exclude`)."""
    if cfg.min_prob is not None:
        if cfg.scorer != "combined":
            raise InputError(f"--min-prob selects by P(good pair): it needs --scorer combined, not {cfg.scorer}")
        return cfg.min_prob
    if cfg.top_fraction is None:
        return cfg.min_score
    ranked = sorted((r.score for r in scored_records(scored, scored_mode(cfg), scorer_model, exclude=exclude)
                     if r.score is not None), reverse=True)
    if not ranked:
        return cfg.min_score
    return ranked[max(1, math.ceil(cfg.top_fraction * len(ranked))) - 1]


def select(scored: Path, out: Path, cfg: CurateConfig, scorer_model: str, summary: RunSummary[CurateExtra],
           histogram: Path | None, errors: LineWriter, exclude: Collection[str] = ()) -> None:
    """Rewrite the curated chat-format set from the scored journal, but the candidates in `exclude`;
    count bands (rubric scores); draw the histogram. Journal lines that are no record are skipped,
    counted and written to `errors`."""
    mode = scored_mode(cfg)
    k = threshold(scored, cfg, scorer_model, exclude)
    lo, hi = 1.0, 5.0
    if cfg.scorer != "rubric":  # a likelihood's scale is the data's
        values = [r.score for r in scored_records(scored, mode, scorer_model, exclude=exclude) if r.score is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
    bins = [0] * HIST_BINS
    bands = dict.fromkeys([*BAND_LABELS, UNPARSED], 0)
    kept = 0
    corrupt = CorruptLines(scored, errors)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    chars = {"all": 0, "kept": 0}
    for rec in scored_records(scored, mode, scorer_model, corrupt, exclude):
        chars["all"] += len(rec.output)
        bands[band_of(rec.score)] += 1
        if rec.score is not None:
            bins[min(HIST_BINS - 1, max(0, int((rec.score - lo) / (hi - lo) * HIST_BINS)))] += 1
    with open(tmp, "w", encoding="utf-8") as dst:
        for rec in selected_records(scored, k, mode, scorer_model, exclude):
            dst.write(tagged_example(rec.instruction, rec.output, AUGMENTED_SYSTEM_PROMPT).model_dump_json() + "\n")
            kept += 1
            chars["kept"] += len(rec.output)
    os.replace(tmp, out)
    total = sum(bands.values())
    extra = summary.extra
    extra.bands = bands if cfg.scorer == "rubric" else None
    extra.selected = kept
    extra.k = k  # whichever of min_score, top_fraction or min_prob chose it
    extra.top_fraction = cfg.top_fraction
    extra.scored_total = total
    extra.corrupt_journal_lines = corrupt.count
    # Summed likelihoods favour long responses: how the kept pairs' lengths compare with all of them.
    extra.mean_chars = MeanChars(kept=round(chars["kept"] / kept, 1) if kept else None,
                                 all=round(chars["all"] / total, 1) if total else None)
    if mode == "free_text":
        extra.parse_rate = round((total - bands[UNPARSED]) / total, 4) if total else None
    if histogram is not None and total:
        from client.plot import score_histogram

        rule = f"top {cfg.top_fraction:.0%}: " if cfg.top_fraction is not None else ""
        score_histogram(bins, lo, hi, k, histogram,
                        f"{scorer_model} ({mode}): {rule}{kept} of {total} pairs >= {k:.3g}")


async def curate(candidates: str | os.PathLike[str], out: str | os.PathLike[str], fanout: FanoutConfig,
                 config: CurateConfig | None = None) -> RunSummary[CurateExtra]:
    """Score every pair of `candidates`, then write A_k (score >= min_score) to `out` as chat JSONL.

    Resumable like `augment`: the scored journal (`<out>.scored.jsonl` unless `config.scored`) keeps
    every finished score; a re-run scores only what is missing and rewrites `out` from the journal.
    Contaminated candidates (`config.decontaminate`) are dropped before scoring, on every run, to
    `<out>.contaminated.jsonl`. The candidates file and the decontamination sets are read first
    (`InputError`, nothing sent), then `out` and the journal are locked for the run (`InputError`
    while another run writes them).
    """
    cfg = config or CurateConfig()
    out = Path(out)
    candidates = Path(candidates)
    check_input(candidates)
    check_scorer(cfg)
    found = decontaminator(cfg)
    scored_path = Path(cfg.scored) if cfg.scored is not None else side_path(out, "scored.jsonl")
    # select() reports the scored journal's lines that are no record, so the journal's opening does not.
    terms = [terms_file(cfg, scored_path)] if cfg.scorer != "rubric" else []
    with (open_run(out, f"curate[{scored_mode(cfg)}]", candidates.stat().st_size, journal=scored_path, locks=terms,
                   fsync=cfg.fsync, progress=cfg.progress, corrupt_lines=False, extra=CurateExtra()) as opened,
          LineWriter(side_path(out, "contaminated.jsonl")) as contaminated):
        summary = opened.summary
        dropped = Contamination(found, contaminated, summary)
        async with Fanout(fanout) as fan:
            model, root = await served_model(fan, cfg.model)
            summary.extra.model, summary.extra.checkpoint = model, cfg.checkpoint or root
            summary.extra.mode = scored_mode(cfg)
            cands = dropped.clean(read_candidates(candidates, opened.errors, summary, cfg.max_field_chars))
            if cfg.shard is not None:
                summary.extra.shard = str(cfg.shard)
            if cfg.scorer == "rubric":
                task = ScoreTask(model, cfg.checkpoint or root, cfg)
                jobs = (Job(task.request(cand), cand, cand.source, pos) for cand, pos in cands)
                await run(task, shard_jobs(jobs, cfg.shard, summary.results), online(fan), opened.journal,
                          opened.failed, summary, opened.progress, fan.max_inflight)
            else:
                await _score_likelihood(cands, fan, model, cfg.checkpoint or root, cfg, opened.journal, scored_path,
                                        opened.failed, summary, opened.progress, fanout)
            summary.extra.retries = fan.retries
        opened.journal.close()
        record_combiner(cfg, out, summary)
        select(scored_path, out, cfg, model, summary, side_path(out, "scores.png") if cfg.histogram else None,
               opened.errors, dropped.ids)
    return summary


def record_combiner(cfg: CurateConfig, out: Path, summary: RunSummary[CurateExtra]) -> None:
    """Copy the combined scorer's fitted combiner beside the scores (`<out>.combiner.json`) and name it,
    and the pairs it was fitted on, in the summary (the dataset card reads them)."""
    if cfg.scorer != "combined" or cfg.calibration is None:
        return
    combiner = Combiner.load(cfg.calibration)
    path = side_path(out, "combiner.json")
    combiner.write(path)
    summary.extra.combiner = CombinerUsed(path=str(path), data=combiner.data, pairs=combiner.pairs,
                                          negatives=combiner.negatives)


def check_scorer(cfg: CurateConfig) -> None:
    """`InputError` for a scorer that lacks what it needs, before anything is sent."""
    if cfg.scorer in ("reverse_pmi", "combined") and cfg.backward_endpoint is None:
        raise InputError(f"--scorer {cfg.scorer} needs --backward-endpoint URL (the backward model's server)")
    if cfg.scorer == "combined":
        if cfg.calibration is None:
            raise InputError("--scorer combined needs --calibration FILE (fit one with `humpback eval calibrate`)")
        Combiner.load(cfg.calibration)
    if cfg.min_prob is not None and cfg.scorer != "combined":
        raise InputError(f"--min-prob selects by P(good pair): it needs --scorer combined, not {cfg.scorer}")


def terms_file(cfg: CurateConfig, scored: Path) -> Path:
    """The likelihood terms' journal of a run whose scored journal is `scored`: `cfg.terms`, else beside it."""
    return Path(cfg.terms) if cfg.terms is not None else side_path(scored, "terms.jsonl")


def backward_fanout(fanout: FanoutConfig, cfg: CurateConfig) -> FanoutConfig | None:
    """The fan-out to the backward model: `fanout`'s settings, `cfg.backward_endpoint`'s server."""
    if cfg.backward_endpoint is None:
        return None
    return fanout.model_copy(update={"endpoints": [cfg.backward_endpoint], "require_version": None})


async def likelihood_scorer(cfg: CurateConfig, fan: Fanout, model: str, checkpoint: str | None,
                            backward: Fanout | None) -> LikelihoodScorer:
    """The likelihood scorer `cfg` asks for: forward terms asked of `fan` (serving `model` from
    `checkpoint`), reverse ones of `backward` (its first listed model)."""
    back = None
    if backward is not None:
        name, root = await served_model(backward, None)
        back = Model(backward, TermTask(name, root))
    combine = Combiner.load(cfg.calibration) if cfg.scorer == "combined" and cfg.calibration is not None else None
    return LikelihoodScorer(cfg.scorer, model, checkpoint, Model(fan, TermTask(model, checkpoint)), back, combine)


async def _score_likelihood(cands: Iterable[tuple[Candidate, int]], fan: Fanout, model: str, checkpoint: str | None,
                            cfg: CurateConfig, journal: Journal, scored_path: Path, failed: LineWriter,
                            summary: RunSummary[CurateExtra], progress: Progress,
                            fanout: FanoutConfig) -> LikelihoodScorer:
    back_cfg = backward_fanout(fanout, cfg)
    async with Fanout(back_cfg) if back_cfg is not None else nullcontext(None) as back:
        scorer = await likelihood_scorer(cfg, fan, model, checkpoint, back)
        await score_online(scorer, _sharded(cands, scorer, cfg, summary), journal, terms_file(cfg, scored_path),
                           failed, summary, progress)
    return scorer


async def likelihood_records(cands: list[Candidate], fan: Fanout, model: str, checkpoint: str | None,
                             cfg: CurateConfig, fanout: FanoutConfig, scored_path: Path) -> list[ScoredCandidate]:
    """The likelihood scores of `cands`, in order, journaled in `scored_path` (its terms beside it, or
    in `cfg.terms`),
    so an interrupted evaluation resumes; `RequestFailed` when some pair could not be scored (the
    others are kept, the failures in `<scored_path>.failed.jsonl`)."""
    summary = RunSummary(extra=CurateExtra())
    failed = LineWriter(side_path(scored_path, "failed.jsonl"))
    journal = Journal(scored_path).open()
    try:
        scorer = await _score_likelihood(((c, 0) for c in cands), fan, model, checkpoint, cfg, journal, scored_path,
                                         failed, summary, Progress(0, scored_path.name, enabled=False), fanout)
    finally:
        journal.close()
        failed.close()
    if summary.failures:
        raise RequestFailed(f"{sum(summary.failures.values())} of {len(cands)} pairs could not be scored "
                            f"({', '.join(summary.failures)}; all in {failed.path}); a re-run asks only for the "
                            "missing ones", 1)
    by_id = {r.custom_id: r for r in scored_records(scored_path, cfg.scorer, model)}
    return [by_id[scorer.score_id(c)] for c in cands]


def _sharded(cands: Iterable[tuple[Candidate, int]], scorer: LikelihoodScorer, cfg: CurateConfig,
             summary: RunSummary) -> Iterator[tuple[Candidate, int]]:
    """The candidates of `cfg.shard`, by the id of their scored record (as `shard_jobs` does by request id)."""
    for cand, pos in cands:
        if in_shard(scorer.score_id(cand), cfg.shard):
            yield cand, pos
        else:
            summary.results["other_shard"] += 1
