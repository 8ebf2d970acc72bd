"""Likelihood scorers for self-curation: how much the instruction raises the likelihood of the
response (forward PMI, IFD) and the response that of the instruction (reverse PMI), computed by the
served models from prompt log-probabilities: one prefill per term, no decoding.

A *term* is the log-probability of a target text as the assistant's turn after a chat prompt, its
tokens as the trainer's completion-only loss sees them (the server's chat template renders the prompt
with its generation header and the whole conversation through `/tokenize`; the target's tokens are
what the conversation adds, end-of-turn included). A pair (x, y) needs:
- `pmi` (under the scorer, the forward model, with the curated set's system prompt):
  log p(y | x) - log p(y), where p(y) is y after an empty instruction;
- `reverse_pmi` (under the backward model, with its prompt): log p(x | y) - log p(x), where p(x) is
  x after an empty response.
An unconditional term depends on one text only, so it is computed once for every pair that shares it
(the terms' journal is keyed by content: a repeated id goes once). Per-token forms divide by the
target's tokens; IFD = PPL(y|x) / PPL(y) = exp(-pmi / |y|) (Li et al. 2024).

Terms go to a resumable journal (`<scored>.terms.jsonl`, or curate's `--terms`), through `client.runner.run` like every
other task, online or from a batch; a pair's signals, once all its terms are in, go to the scored
journal as one `ScoredCandidate` (`mode` is the scorer; `signals` holds every signal computed), so a
re-selection reads them and asks nothing again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from client.extras import CurateExtra
from client.fanout import Fanout
from client.journal import Journal, LineWriter
from client.progress import Progress
from client.runner import Answer, RunSummary, online, run
from client.tasks import Job, Parsed
from humpback.contracts import (
    AUGMENTED_SYSTEM_PROMPT,
    COMPLETIONS_PATH,
    BatchRequest,
    Candidate,
    Failure,
    PromptLogprobsRequest,
    RequestFailed,
    RetryableError,
    ScoredCandidate,
    TokenizeRequest,
    backward_messages,
    content_id,
)

TOKENIZE_PATH = "/tokenize"
LIKELIHOOD_SCORERS = ("pmi", "reverse_pmi", "combined")
# Candidates tokenized at once: each needs up to four terms, each two /tokenize calls (no model work).
CHUNK = 128


# --- prompt log-probabilities from vLLM --------------------------------------------------------

def parse_tokens(data: dict[str, Any]) -> tuple[list[int], int | None]:
    """(token ids, max_model_len) of a `/tokenize` answer."""
    try:
        return [int(t) for t in data["tokens"]], data.get("max_model_len")
    except (KeyError, TypeError, ValueError) as exc:
        raise RetryableError(f"malformed /tokenize answer ({exc!r})") from None


def prompt_logprobs(data: dict[str, Any]) -> list[Any]:
    """The `prompt_logprobs` of a completion: one `{token_id: {"logprob": x}}` (or None) per prompt token."""
    try:
        return list(data["choices"][0]["prompt_logprobs"])
    except (KeyError, IndexError, TypeError) as exc:
        raise RetryableError(f"no prompt_logprobs in the completion ({exc!r})") from None


def response_nll(logprobs: list[Any], ids: list[int], start: int) -> list[float]:
    """-logprob of `ids[start:]` from vLLM's `prompt_logprobs` (one `{token_id: {"logprob": x}}` per id)."""
    if len(logprobs) != len(ids):
        raise RequestFailed(f"prompt_logprobs has {len(logprobs)} entries for {len(ids)} tokens", 1)
    nll = []
    for pos in range(start, len(ids)):
        entry = logprobs[pos] or {}
        info = entry.get(str(ids[pos]))
        if info is None:
            raise RequestFailed(f"prompt_logprobs[{pos}] lacks token {ids[pos]}", 1)
        nll.append(-float(info["logprob"] if isinstance(info, dict) else info))
    return nll


def logprob_body(model: str, ids: list[int]) -> dict[str, Any]:
    """A completion that returns the log-probability of every token of `ids` (one prefill; the one
    generated token is ignored)."""
    return PromptLogprobsRequest(model=model, prompt=ids).body()


async def render(fan: Fanout, model: str, prompt: list[dict[str, str]], target: str) -> tuple[list[int], int, int | None]:
    """(token ids of the conversation `prompt` + `target` as the assistant's turn, where `target`'s
    tokens start, max_model_len), by the server's chat template. `ValueError` when the template does
    not render the conversation as the prompt followed by the target."""
    (prompt_ids, max_len), (ids, _) = await asyncio.gather(
        fan.post(TOKENIZE_PATH, TokenizeRequest(model=model, messages=prompt, add_generation_prompt=True).body(),
                 parse_tokens),
        fan.post(TOKENIZE_PATH, TokenizeRequest(model=model, add_generation_prompt=False,
                                                messages=[*prompt, {"role": "assistant", "content": target}]).body(),
                 parse_tokens))
    if ids[:len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise ValueError("the chat template does not render the conversation as the prompt followed by the response, "
                         "so the response tokens cannot be told apart")
    return ids, len(prompt_ids), max_len


# --- terms ----------------------------------------------------------------------------------------

class Term(BaseModel):
    """log p(target | prompt) to compute, with its rendering once tokenized (`ids`, `start`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[dict[str, str]]
    target: str
    ids: list[int] = []
    start: int = 0


class TermLogprob(BaseModel):
    """A line of the terms' journal: log p(target | prompt) summed over the target's `tokens` (the id
    names the model and its weights)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    logprob: float
    tokens: int


def forward_terms(cand: Candidate) -> tuple[Term, Term]:
    """(y after x, y after an empty instruction), under the system prompt the curated set is trained with."""
    def prompt(x: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": AUGMENTED_SYSTEM_PROMPT}, {"role": "user", "content": x}]
    return Term(prompt=prompt(cand.instruction), target=cand.output), Term(prompt=prompt(""), target=cand.output)


def reverse_terms(cand: Candidate) -> tuple[Term, Term]:
    """(x after y, x after an empty response), under the backward model's prompt."""
    return (Term(prompt=backward_messages(cand.output), target=cand.instruction),
            Term(prompt=backward_messages(""), target=cand.instruction))


@dataclass(frozen=True)
class TermTask:
    """The log-probability of a term's target (a `client.tasks.Task` over tokenized terms), asked of
    `model`; the id is the term's content, the model and its weights (`checkpoint`)."""

    model: str
    checkpoint: str | None

    def custom_id(self, term: Term) -> str:
        return content_id("term", self.model, self.checkpoint, term.prompt, term.target)

    def request(self, term: Term) -> BatchRequest:
        return BatchRequest(custom_id=self.custom_id(term), url=COMPLETIONS_PATH, body=logprob_body(self.model, term.ids))

    def parse(self, body: dict[str, Any]) -> list[Any]:
        return prompt_logprobs(body)

    def record(self, custom_id: str, term: Term, parsed: list[Any]) -> TermLogprob:
        nll = response_nll(parsed, term.ids, term.start)
        return TermLogprob(custom_id=custom_id, logprob=-math.fsum(nll), tokens=len(nll))


# --- signals --------------------------------------------------------------------------------------

def pmi_signals(prefix: str, cond: TermLogprob, uncond: TermLogprob) -> dict[str, float]:
    """PMI, its per-token form and IFD of one direction, with the target's length in tokens."""
    pmi = cond.logprob - uncond.logprob
    per_token = pmi / cond.tokens
    return {prefix: pmi, f"{prefix}_per_token": per_token, f"{prefix.replace('pmi', 'ifd')}": math.exp(-per_token),
            f"{prefix}_target_tokens": float(cond.tokens), f"{prefix}_logp_conditional": cond.logprob,
            f"{prefix}_logp_unconditional": uncond.logprob}


@dataclass(frozen=True)
class Model:
    """A served model the terms of one direction are asked of (`fan` None: answered from a batch)."""

    fan: Fanout | None
    task: TermTask


class ScorerSpec(BaseModel):
    """What a batch export records beside its requests (`<requests>.likelihood.json`), so the import
    scores the pairs from the terms as the export asked them."""

    model_config = ConfigDict(extra="forbid")

    scorer: str
    model: str
    checkpoint: str | None
    backward_model: str | None = None
    backward_checkpoint: str | None = None


class LikelihoodScorer:
    """Scores candidates with `scorer` ("pmi", "reverse_pmi" or "combined"): the forward terms are
    asked of `forward` (the scorer), the reverse ones of `backward` (the backward model); the records
    name the scorer `model` at `checkpoint`. `combine` turns a pair's signals into its score (None:
    the scorer's own signal)."""

    def __init__(self, scorer: str, model: str, checkpoint: str | None, forward: Model | None,
                 backward: Model | None, combine: Callable[[dict[str, float]], float] | None = None) -> None:
        if scorer not in LIKELIHOOD_SCORERS:
            raise ValueError(f"unknown likelihood scorer {scorer!r}")
        if scorer != "reverse_pmi" and forward is None:
            raise ValueError(f"--scorer {scorer} needs the scorer's endpoint")
        if scorer != "pmi" and backward is None:
            raise ValueError(f"--scorer {scorer} needs --backward-endpoint (the backward model's server)")
        self.scorer = scorer
        self.model = model
        self.checkpoint = checkpoint
        self.forward = forward if scorer != "reverse_pmi" else None
        self.backward = backward if scorer != "pmi" else None
        self.combine = combine

    def spec(self) -> ScorerSpec:
        back = self.backward.task if self.backward is not None else None
        return ScorerSpec(scorer=self.scorer, model=self.model, checkpoint=self.checkpoint,
                          backward_model=back.model if back else None, backward_checkpoint=back.checkpoint if back else None)

    @classmethod
    def from_spec(cls, spec: ScorerSpec, combine: Callable[[dict[str, float]], float] | None) -> LikelihoodScorer:
        """The scorer a batch export used, its terms answered from the batch."""
        back = None if spec.backward_model is None else Model(None, TermTask(spec.backward_model,
                                                                              spec.backward_checkpoint))
        return cls(spec.scorer, spec.model, spec.checkpoint, Model(None, TermTask(spec.model, spec.checkpoint)), back,
                   combine)

    def directions(self, cand: Candidate) -> list[tuple[Model, str, tuple[Term, Term]]]:
        out = []
        if self.forward is not None:
            out.append((self.forward, "pmi", forward_terms(cand)))
        if self.backward is not None:
            out.append((self.backward, "reverse_pmi", reverse_terms(cand)))
        return out

    def score_id(self, cand: Candidate) -> str:
        """The scored record's id: the scorer, the ids of every term it reads and the combiner (another
        calibration scores again, from the same terms)."""
        ids = [m.task.custom_id(t) for m, _, terms in self.directions(cand) for t in terms]
        return content_id("likelihood", self.scorer, ids, repr(self.combine))

    def jobs(self, cand: Candidate) -> list[tuple[Model, Term]]:
        return [(m, t) for m, _, terms in self.directions(cand) for t in terms]

    def signals(self, cand: Candidate, done: dict[str, TermLogprob]) -> dict[str, float] | None:
        """Every signal of `cand` from the terms in `done`; None while one is missing."""
        out: dict[str, float] = {}
        for m, prefix, (cond, uncond) in self.directions(cand):
            c, u = done.get(m.task.custom_id(cond)), done.get(m.task.custom_id(uncond))
            if c is None or u is None:
                return None
            out.update(pmi_signals(prefix, c, u))
        return out

    def record(self, cand: Candidate, signals: dict[str, float]) -> ScoredCandidate:
        # combined without a combiner: the signals alone, to fit one on (`humpback eval calibrate`)
        score = self.combine(signals) if self.combine is not None else signals.get(self.scorer)
        return ScoredCandidate(custom_id=self.score_id(cand), candidate_id=cand.custom_id, instruction=cand.instruction,
                               output=cand.output, source=cand.source, mode=self.scorer, score=score, signals=signals,
                               scorer_model=self.model, scorer_checkpoint=self.checkpoint)


def read_terms(path: Path) -> dict[str, TermLogprob]:
    """custom_id -> term of a terms' journal (lines that are no record are skipped: the journal's
    own repair reports them)."""
    out: dict[str, TermLogprob] = {}
    if path.exists():
        with open(path, "rb") as src:
            for line in src:
                try:
                    rec = TermLogprob.model_validate_json(line)
                except ValueError:
                    continue
                out[rec.custom_id] = rec
    return out


async def tokenized(model: Model, term: Term) -> Term | str:
    """`term` with its rendering, or why it cannot be scored (too long, a template that hides the
    response)."""
    assert model.fan is not None, "terms are tokenized by their model's server"
    try:
        ids, start, max_len = await render(model.fan, model.task.model, term.prompt, term.target)
    except ValueError as exc:
        return str(exc)
    if max_len is not None and len(ids) >= max_len:  # the completion's one extra token must fit too
        return f"{len(ids)} tokens do not fit max_model_len {max_len}"
    return term.model_copy(update={"ids": ids, "start": start})


async def score_online(scorer: LikelihoodScorer, cands: Iterable[tuple[Candidate, int]], scored: Journal,
                       terms: Path, failed: LineWriter, summary: RunSummary[CurateExtra], progress: Progress) -> None:
    """Score every candidate not yet in the `scored` journal: ask each missing term (tokenized by its
    model's server, then one prefill) into the `terms` journal, then append the pair's record to
    `scored`. A term that fails, or cannot be asked, fails its pair (to `failed`; asked again on the
    next run)."""
    with Journal(terms) as journal:
        done = read_terms(terms)
        it = iter(cands)
        while chunk := list(islice(it, CHUNK)):
            await _score_chunk(scorer, chunk, scored, journal, done, failed, summary, progress)


async def _score_chunk(scorer: LikelihoodScorer, chunk: list[tuple[Candidate, int]], scored: Journal,
                       journal: Journal, done: dict[str, TermLogprob], failed: LineWriter,
                       summary: RunSummary[CurateExtra], progress: Progress) -> None:
    todo = [(c, pos) for c, pos in chunk if scorer.score_id(c) not in scored.done]
    summary.results["skipped_done"] += len(chunk) - len(todo)
    jobs, unusable = await term_jobs(scorer, (c for c, _ in todo), set(done))
    by_model: dict[int, tuple[Model, list[Job[Term]]]] = {}
    for m, job in jobs:
        by_model.setdefault(id(m), (m, []))[1].append(job)
    term_summary = RunSummary()
    quiet = Progress(0, "terms", enabled=False)
    # The two directions' servers work at once (combined asks both).
    await asyncio.gather(*(run(m.task, model_jobs, remembering(online(m.fan), done), journal, failed, term_summary,
                               quiet, m.fan.max_inflight)
                           for m, model_jobs in by_model.values() if m.fan is not None))
    summary.extra.terms_asked = (summary.extra.terms_asked or 0) + term_summary.results["written"]
    append_scores(scorer, todo, scored, done, unusable, failed, summary, progress)


async def term_jobs(scorer: LikelihoodScorer, cands: Iterable[Candidate], skip: set[str]
                    ) -> tuple[list[tuple[Model, Job[Term]]], dict[str, str]]:
    """(the job of every term of `cands` whose id is not in `skip`, once each, with the model that
    answers it; why each term that cannot be asked cannot). The ids of both go into `skip`."""
    wanted: dict[str, tuple[Model, Term]] = {}
    for cand in cands:
        for m, t in scorer.jobs(cand):
            cid = m.task.custom_id(t)
            if cid not in skip:
                wanted.setdefault(cid, (m, t))
    skip.update(wanted)
    rendered = await asyncio.gather(*(tokenized(m, t) for m, t in wanted.values()))
    jobs, unusable = [], {}
    for (cid, (m, _)), term in zip(wanted.items(), rendered):
        if isinstance(term, str):
            unusable[cid] = term
        else:
            jobs.append((m, Job(m.task.request(term), term, None)))
    return jobs, unusable


def remembering(answer: Answer, done: dict[str, TermLogprob]) -> Answer:
    """`answer`, keeping each term it records in `done` as well (the pairs are scored from it)."""

    async def remember(request: BatchRequest, parse: Any) -> Parsed:
        rec = await answer(request, parse)
        done[rec.custom_id] = rec
        return rec

    return remember


def append_scores(scorer: LikelihoodScorer, todo: Iterable[tuple[Candidate, int]], scored: Journal,
                   done: dict[str, TermLogprob], unusable: dict[str, str], failed: LineWriter, summary: RunSummary,
                   progress: Progress) -> None:
    """Append the record of each candidate of `todo` whose terms are all in `done` to `scored`; a
    candidate with a missing term fails, with the reason of `unusable` where one of its terms has one."""
    for cand, pos in todo:
        sid = scorer.score_id(cand)
        if sid in scored.done:  # a candidate repeated in the input
            summary.results["skipped_done"] += 1
            continue
        signals = scorer.signals(cand, done)
        if signals is None:
            ids = [m.task.custom_id(t) for m, t in scorer.jobs(cand)]
            reason = next((unusable[i] for i in ids if i in unusable), "a term of the pair was not answered")
            summary.failures[reason.split(":")[0][:80]] += 1
            failed.write(Failure(custom_id=sid, source=cand.source, reason=reason, attempts=1).model_dump_json())
            progress.advance(pos, failed=1)
            continue
        scored.done.add(sid)
        scored.append(scorer.record(cand, signals).model_dump_json())
        summary.results["written"] += 1
        progress.advance(pos, done=1)
