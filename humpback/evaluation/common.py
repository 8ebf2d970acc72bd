"""What every evaluation shares: how evaluated models are asked, deterministic subsets, output files."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from client.completions import chat_choice
from client.fanout import Fanout
from client.runner import online, open_run, run, side_path
from client.tasks import Item, Job, Task
from humpback.contracts import BatchRequest, ChatRequest, Failure, RecordError, RequestFailed, content_id, json_lines
from humpback.evaluation.records import Answer, JournaledAnswer
from humpback.settings import setting

Record = TypeVar("Record", bound=BaseModel)


class GenerationConfig(BaseModel):
    """How an evaluated model answers a prompt."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = setting(
        256, "cap on each answer (CPU servers are slow; IFEval's 'at least 300 words' instructions need ~600, "
        "so raise it for a real run)")
    temperature: float = setting(0.0, "sampling temperature; 0.0 (greedy) so that reruns of an evaluation agree")
    # The CLI picks it by name (`--system none|seed|augmented`); the text itself is no flag.
    system_prompt: str | None = setting(
        None, "None, or the paper's inference-time tag (SEED_SYSTEM_PROMPT asks for the seed-data style, §2.3)",
        cli=False)


def chat_body(model: str, prompt: str, cfg: GenerationConfig) -> dict[str, Any]:
    messages = [] if cfg.system_prompt is None else [{"role": "system", "content": cfg.system_prompt}]
    messages.append({"role": "user", "content": prompt})
    return ChatRequest(model=model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature).body()


def parse_answer(data: dict[str, Any]) -> tuple[str, str | None]:
    """(text, finish_reason) of a chat completion; aborted or malformed answers are retried."""
    choice, text = chat_choice(data)
    return text, choice.get("finish_reason")


@dataclass(frozen=True)
class AnswerTask:
    """Answer a prompt (a `client.tasks.Task`): ask `model`, served from the weights `checkpoint`,
    as `config` says."""

    model: str
    checkpoint: str | None
    config: GenerationConfig

    def request(self, prompt: str) -> BatchRequest:
        body = chat_body(self.model, prompt, self.config)
        return BatchRequest(custom_id=content_id("answer", body, self.checkpoint), body=body)

    def parse(self, body: dict[str, Any]) -> tuple[str, str | None]:
        return parse_answer(body)

    def record(self, custom_id: str, prompt: str, parsed: tuple[str, str | None]) -> JournaledAnswer:
        text, finish = parsed
        return JournaledAnswer(custom_id=custom_id, answer=Answer(instruction=prompt, output=text,
                                                                  generator=self.model, finish_reason=finish))


async def run_journaled(task: Task[Item, Any], items: Sequence[Item], fan: Fanout, files: Path,
                        record: type[Record]) -> list[Record]:
    """The records of `items`, in order, each asked through `fan` unless the journal
    `<files>.journal.jsonl` holds it already (so an interrupted evaluation resumes where it stopped).

    The evaluation needs every answer: when some request fails for good, the others still finish and
    are kept, the failures go to `<files>.failed.jsonl`, and `RequestFailed` is raised; a re-run asks
    only the failed ones again. The run is a client run (`client.runner.open_run`): `<files>` is
    locked while it runs, and `<files>.summary.json` tells what it did, however it ended.
    """
    requests = [task.request(item) for item in items]
    journal_path = side_path(files, "journal.jsonl")
    with open_run(files, files.name, len(items), journal=journal_path, progress=False,
                  corrupt_lines=False) as opened:
        await run(task, (Job(r, item, None) for r, item in zip(requests, items)), online(fan), opened.journal,
                  opened.failed, opened.summary, opened.progress, fan.max_inflight)
    summary, failed = opened.summary, opened.failed
    if summary.failures:
        with failed.path.open(encoding="utf-8") as f:
            first = Failure.model_validate_json(f.readline())
        raise RequestFailed(f"{sum(summary.failures.values())} of {len(items)} requests failed, the first: "
                            f"{first.reason} (all in {failed.path}; finished answers are kept in {journal_path} "
                            "and a re-run asks only for the missing ones)", first.attempts)
    with journal_path.open(encoding="utf-8") as f:
        done = {rec.custom_id: rec for rec in map(record.model_validate_json, f)}
    return [done[r.custom_id] for r in requests]


async def answer_all(fan: Fanout, model: str, checkpoint: str | None, prompts: Sequence[str], cfg: GenerationConfig,
                     files: Path) -> list[Answer]:
    """Answers to `prompts`, in order, journaled in `<files>.journal.jsonl` (see `run_journaled`)."""
    answered = await run_journaled(AnswerTask(model, checkpoint, cfg), prompts, fan, files, JournaledAnswer)
    return [a.answer for a in answered]


def normal_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The normal-approximation interval for the mean, mean ± z·s/√n; None under two values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def subset(total: int, limit: int | None, seed: int) -> list[int]:
    """`limit` indices out of `total`, drawn with `seed` and kept in file order (all when None)."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def read_answers(path: Path) -> dict[str, Answer]:
    """instruction -> answer, from a JSON list (AlpacaEval's format) or JSONL of `Answer` records."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise RecordError(path, exc.lineno, f"invalid JSON ({exc.msg}); fix it") from None
        where = "item"
    else:
        items, where = list(json_lines(path)), "line"
    answers: dict[str, Answer] = {}
    for n, obj in items:
        try:
            obj.setdefault("generator", path.stem)
            answer = Answer.model_validate({k: obj.get(k) for k in ("instruction", "output", "generator",
                                                                     "finish_reason")})
        except (ValidationError, AttributeError) as exc:
            field = exc.errors()[0]["loc"][0] if isinstance(exc, ValidationError) else None
            raise RecordError(path, n, "not an answer record with string fields 'instruction' and 'output'",
                              field=str(field) if field is not None else None, where=where) from None
        answers[answer.instruction] = answer
    return answers


def write_summary(path: Path, summary: BaseModel) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """A plain left-aligned text table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
