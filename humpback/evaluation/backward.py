"""`humpback eval backward`: how well the backward model M_yx recovers the instructions of held-out
human pairs (x, y) from their responses y.

- `instruction_nll`: NLL of the human x per token (its end-of-turn tokens included) given y, under
  the backward prompt: the conversation `backward_messages(y)` (with augment's demonstrations, when
  `--shots` asks for them) with x as the assistant turn, read with the held-out NLL's chain
  (`nll.conversation_nll`: `/tokenize`, then `prompt_logprobs`); summed over pairs and divided by
  their tokens. Lower is better.
- `rouge_l`: mean ROUGE-L F1 (PyPI `rouge-score`, Porter stemming) of one generated instruction
  against x. The instruction is asked exactly as `augment` asks it (`AugmentTask`'s request:
  augment's sampling, T=0.7, top-p 0.9 by default); journaled, so a rerun reuses them.
- `usable_rate`: share of generated instructions with no issue (`client.instructions`: not cut at
  the token cap, not empty, no copy of the response, no meta-answer about "the response").
- `distinct_2`: distinct word bigrams / all word bigrams over the generated instructions; a model
  that writes one question for everything scores near 0.

Generated instructions are journaled beside `--out` as they arrive
(`<out>.generations.journal.jsonl`), so an interrupted run resumes; the rows go to `<out>.rows.jsonl`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rouge_score import rouge_scorer

from client.augment import AugmentConfig, AugmentTask, load_demonstrations
from client.fanout import Fanout, FanoutConfig
from client.instructions import instruction_issue
from client.runner import served_model
from humpback.contracts import BatchRequest, Segment, Source, backward_messages, content_id, write_jsonl
from humpback.evaluation.common import parse_answer, run_journaled, subset
from humpback.evaluation.metrics import (
    Metric,
    beside,
    distinct_2,
    mean_metric,
    ratio_metric,
    read_pairs,
    write_metrics,
)
from humpback.evaluation.nll import conversation_nll
from humpback.evaluation.records import Answer, BackwardRow, HeldoutPair, JournaledAnswer


@dataclass(frozen=True)
class BackwardTask:
    """Ask the backward model for the instruction of a held-out pair's response (a `client.tasks.Task`),
    with augment's request; the answer is kept whatever its finish, to be judged."""

    augment: AugmentTask
    pairs: Path

    def request(self, pair: HeldoutPair) -> BatchRequest:
        req = self.augment.request(Segment(text=pair.response, source=Source(path=str(self.pairs), line=pair.line)))
        # Keyed by the served weights too: a swapped checkpoint under the same name is asked again.
        return BatchRequest(custom_id=content_id("eval-backward", req.body, self.augment.checkpoint), body=req.body)

    def parse(self, body: dict[str, Any]) -> tuple[str, str | None]:
        return parse_answer(body)

    def record(self, custom_id: str, pair: HeldoutPair, parsed: tuple[str, str | None]) -> JournaledAnswer:
        text, finish = parsed
        # As an answers journal has it: asked with the response, answered with an instruction.
        return JournaledAnswer(custom_id=custom_id, answer=Answer(instruction=pair.response, output=text,
                                                                  generator=self.augment.model, finish_reason=finish))


def backward_metrics(rows: list[BackwardRow], seed: int = 0) -> dict[str, Metric]:
    scored = [r for r in rows if r.nll_sum is not None]
    return {
        "instruction_nll": ratio_metric([r.nll_sum for r in scored if r.nll_sum is not None],
                                        [r.instruction_tokens for r in scored], seed),
        "rouge_l": mean_metric([r.rouge_l for r in rows], seed),
        "usable_rate": mean_metric([r.issue is None for r in rows], seed),
        "distinct_2": distinct_2([r.generated for r in rows], seed),
    }


async def run_backward_eval(pairs_path: Path, out: Path, fanout: FanoutConfig, model: str | None = None,
                            generation: AugmentConfig | None = None, limit: int | None = None,
                            seed: int = 0) -> dict[str, Metric]:
    """The backward metrics of the served `model` on the held-out pairs of `pairs_path` (a `limit`
    subset drawn with `seed`), written to `out` (JSON) with the rows beside it.

    `generation` sets how instructions are sampled (augment's settings, its per-request `seed`
    included: unset by default, as CPU servers refuse one); `seed` draws the subset and seeds the
    bootstrap.
    """
    pairs = read_pairs(pairs_path)
    pairs = [pairs[i] for i in subset(len(pairs), limit, seed)]
    gen = generation or AugmentConfig()
    demonstrations = load_demonstrations(gen)
    async with Fanout(fanout) as fan:
        name, root = await served_model(fan, model)
        task = BackwardTask(AugmentTask(name, root, gen, demonstrations), pairs_path)
        answers, nll_rows = await asyncio.gather(
            run_journaled(task, pairs, fan, beside(out, "generations"), JournaledAnswer),
            asyncio.gather(*(conversation_nll(fan, name, p.line, backward_messages(p.response, task.augment.demonstrations),
                                              p.instruction, p.response) for p in pairs)))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = []
    for pair, journaled, nll_row in zip(pairs, answers, nll_rows):
        text, finish = journaled.answer.output, journaled.answer.finish_reason
        rows.append(BackwardRow(
            line=pair.line, instruction=pair.instruction, generated=text, finish_reason=finish,
            issue=instruction_issue(text, pair.response, finish),
            rouge_l=scorer.score(pair.instruction, text)["rougeL"].fmeasure,
            instruction_tokens=nll_row.response_tokens, nll_sum=nll_row.nll_sum, nll_mean=nll_row.nll_mean,
            skipped=nll_row.skipped))
    write_jsonl(beside(out, "rows.jsonl"), rows)
    metrics = backward_metrics(rows, seed)
    write_metrics(out, metrics)
    return metrics
