"""Held-out seed NLL: how likely the model finds the human responses it was not trained on.

For each pair, the server's own chat template renders the prompt (`/tokenize` with `messages` and
`add_generation_prompt`) and the whole conversation; the response tokens are what the conversation
adds after the prompt, end-of-turn tokens included (what the trainer's completion-only loss covers).
One `/v1/completions` call on the conversation's token ids with `prompt_logprobs: 0` and
`max_tokens: 1` returns the log-probability of every prompt token; the NLL of the response tokens,
per token, is the number reported. Lower is better; compare checkpoints only with the same tokenizer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from client.fanout import Fanout, FanoutConfig
from client.likelihood import logprob_body, prompt_logprobs, render, response_nll
from client.runner import served_model
from humpback.contracts import COMPLETIONS_PATH, ChatExample, RecordError, SeedPair, json_lines, write_jsonl
from humpback.evaluation.common import table, write_summary
from humpback.evaluation.records import NllPair, NllRow, NllSummary

def read_seed(path: Path) -> Iterator[NllPair]:
    """Seed pairs from JSONL: humpback's seed records (`humpback data demo|oasst1`), AlpacaEval-style
    `{"instruction", "output"}` rows, or chat rows `{"messages": [...]}` (optional system message, one
    user turn, one assistant turn)."""
    for lineno, obj in json_lines(path):
        try:
            if isinstance(obj, dict) and "messages" in obj:
                msgs = ChatExample.model_validate(obj).messages
                system = msgs[0].content if msgs[0].role == "system" else None
                turns = msgs[1:] if system is not None else msgs
                if len(turns) != 2:
                    raise ValueError("messages: expected one user and one assistant turn")
                pair = NllPair(instruction=turns[0].content, output=turns[1].content, system=system)
            elif isinstance(obj, dict) and "response" in obj:
                seed = SeedPair.model_validate(obj)
                pair = NllPair(instruction=seed.instruction, output=seed.response)
            else:
                pair = NllPair.model_validate(obj)
        except (ValidationError, ValueError) as exc:
            raise RecordError(path, lineno, "not a seed pair ({'instruction', 'output'} or {'messages'}): "
                              f"{' '.join(str(exc).split())}") from None
        yield pair


def _messages(pair: NllPair) -> list[dict[str, str]]:
    msgs = [] if pair.system is None else [{"role": "system", "content": pair.system}]
    return msgs + [{"role": "user", "content": pair.instruction}]


async def pair_nll(fan: Fanout, model: str, index: int, pair: NllPair) -> NllRow:
    return await conversation_nll(fan, model, index, _messages(pair), pair.output, pair.instruction)


async def conversation_nll(fan: Fanout, model: str, index: int, prompt: list[dict[str, str]], output: str,
                           label: str) -> NllRow:
    """NLL of `output` as the assistant's answer to the chat `prompt` (any earlier turns); `label` is
    the row's `instruction`."""
    try:
        ids, start, max_len = await render(fan, model, prompt, output)
    except ValueError as exc:
        raise ValueError(f"seed pair {index}: {exc}") from None
    row = NllRow(index=index, instruction=label, prompt_tokens=start, response_tokens=len(ids) - start)
    if max_len is not None and len(ids) >= max_len:  # the completion's one extra token must fit too
        row.skipped = f"{len(ids)} tokens do not fit max_model_len {max_len}"
        return row
    nll = response_nll(await fan.post(COMPLETIONS_PATH, logprob_body(model, ids), prompt_logprobs), ids, start)
    row.nll_sum = math.fsum(nll)
    row.nll_mean = row.nll_sum / len(nll)
    return row


def summarize(rows: list[NllRow], model: str, checkpoint: str | None, elapsed_s: float = 0.0) -> NllSummary:
    scored = [r for r in rows if r.nll_sum is not None and r.nll_mean is not None]
    tokens = sum(r.response_tokens for r in scored)
    per_token = math.fsum(r.nll_sum for r in scored if r.nll_sum is not None) / tokens if tokens else float("nan")
    return NllSummary(model=model, checkpoint=checkpoint, pairs=len(scored), skipped=len(rows) - len(scored),
                      tokens=tokens, nll_per_token=per_token,
                      nll_per_pair=math.fsum(r.nll_mean for r in scored if r.nll_mean is not None) / len(scored)
                      if scored else float("nan"),
                      perplexity=math.exp(per_token) if tokens else float("nan"), elapsed_s=elapsed_s)


async def run_nll(seed: Path, out: Path, fanout: FanoutConfig, model: str | None = None, limit: int | None = None,
                  system_prompt: str | None = None) -> NllSummary:
    """NLL of the first `limit` pairs of `seed`; `system_prompt` tags pairs that carry none.

    Writes `<out>/nll.rows.jsonl` and `<out>/nll.summary.json`.
    """
    start = time.monotonic()
    pairs = []
    for pair in read_seed(seed):
        if limit is not None and len(pairs) >= limit:
            break
        pairs.append(pair if pair.system is not None or system_prompt is None
                     else pair.model_copy(update={"system": system_prompt}))
    async with Fanout(fanout) as fan:
        name, checkpoint = await served_model(fan, model)
        rows = list(await asyncio.gather(*(pair_nll(fan, name, i, p) for i, p in enumerate(pairs))))
    summary = summarize(rows, name, checkpoint, time.monotonic() - start)
    write_jsonl(out / "nll.rows.jsonl", rows)
    write_summary(out / "nll.summary.json", summary)
    return summary


def format_summary(s: NllSummary) -> str:
    return table([("NLL", "pairs", "skipped", "tokens", "nats/token", "per pair", "perplexity"),
                  (s.model, str(s.pairs), str(s.skipped), str(s.tokens), f"{s.nll_per_token:.4f}",
                   f"{s.nll_per_pair:.4f}", f"{s.perplexity:.2f}")])
