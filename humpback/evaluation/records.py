"""The evaluation's on-disk records: one pydantic model per row or summary format.

Rows go to `<out>/<eval>.rows.jsonl` as they are computed; the summary to `<out>/<eval>.summary.json`.
Each request's answer goes first to a resumable journal, `<out>/<eval>.<what>.journal.jsonl`, keyed
by the request's `custom_id`: a `JournaledAnswer` or a `Verdict`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Answer(_Record):
    """One model answer in AlpacaEval's format, so answer files are interchangeable with its tools."""

    instruction: str
    output: str
    generator: str
    finish_reason: str | None = None


class JournaledAnswer(_Record):
    """A line of an answers journal: the answer to the request `custom_id`."""

    custom_id: str
    answer: Answer


class Verdict(_Record):
    """A line of the judge's journal: its verdict on one ordering of two answers (request `custom_id`).

    `choice`: the answer it chose, as shown ("1" first, "2" second); `p_first`: its probability that
    the answer shown first is better.
    """

    custom_id: str
    choice: Literal["1", "2"]
    p_first: float


class IFEvalPrompt(_Record):
    """One IFEval prompt: the instruction ids it checks and the keyword arguments of each checker."""

    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


class IFEvalRow(_Record):
    """One scored IFEval response: per-instruction verdicts, strict and loose."""

    key: int
    prompt: str
    instruction_id_list: list[str]
    response: str
    finish_reason: str | None = None
    strict: list[bool]
    loose: list[bool]


class Accuracy(_Record):
    """Strict and loose accuracy over `n` prompts or instructions."""

    n: int
    strict: float
    loose: float


class IFEvalSummary(_Record):
    model: str
    checkpoint: str | None = None
    system_prompt: str | None = None
    max_tokens: int | None = None
    prompt_level: Accuracy
    instruction_level: Accuracy
    per_instruction: dict[str, Accuracy]
    truncated: int = Field(0, description="responses cut by max_tokens (finish_reason 'length')")
    elapsed_s: float = 0.0


class PairwiseRow(_Record):
    """One AlpacaEval prompt judged in both orders.

    `p_a_first` / `p_a_second`: the judge's probability that A is better with A shown first / second;
    `a_won_first` / `a_won_second`: its (greedy) verdicts; `score`: their mean (1 win, 0.5 tie, 0 loss).
    """

    index: int
    dataset: str
    instruction: str
    output_a: str
    output_b: str
    p_a_first: float
    p_a_second: float
    a_won_first: bool
    a_won_second: bool
    score: float


class PairwiseSummary(_Record):
    model_a: str
    model_b: str
    judge_model: str
    judge_checkpoint: str | None = None
    n: int
    wins: int = Field(description="prompts A won in both orders")
    ties: int = Field(description="prompts with one win each: the order decided")
    losses: int
    win_rate: float = Field(description="mean per-prompt score, ties counted half")
    ci_low: float
    ci_high: float
    ci_level: float
    ci_method: str
    soft_win_rate: float = Field(description="mean judge probability that A is better, both orders")
    first_position_rate: float = Field(description="share of verdicts for the response shown first (0.5 = no bias)")
    position_flip_rate: float = Field(description="share of prompts whose verdict flips with the order: the judge "
                                      "picked the same position in both (= ties / n)")
    flip_ci_low: float
    flip_ci_high: float
    informative: bool = Field(description="false when the judge cannot be trusted: position_flip_rate above "
                              "max_flip_rate, or no prompt with the same verdict in both orders")
    elapsed_s: float = 0.0


class NllPair(_Record):
    """What NLL is measured on: a prompt (optional system message, one instruction) and the human
    response, read from a seed file, an AlpacaEval-style `{"instruction", "output"}` row or a chat row."""

    instruction: str
    output: str
    system: str | None = None


class NllRow(_Record):
    """Negative log-likelihood (nats) of one human response given its prompt; `skipped` says why none."""

    index: int
    instruction: str
    prompt_tokens: int
    response_tokens: int
    nll_sum: float | None = None
    nll_mean: float | None = None
    skipped: str | None = None


class NllSummary(_Record):
    model: str
    checkpoint: str | None = None
    pairs: int
    skipped: int
    tokens: int
    nll_per_token: float = Field(description="sum of NLL over all response tokens / their number")
    nll_per_pair: float = Field(description="mean over pairs of each pair's per-token NLL")
    perplexity: float = Field(description="exp(nll_per_token)")
    elapsed_s: float = 0.0


class HeldoutPair(_Record):
    """A held-out human pair the stage metrics are measured on: instruction x and response y, read
    from `line` (1-based) of the pairs file."""

    line: int
    instruction: str
    response: str

    @field_validator("instruction", "response")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        return v


class BackwardRow(_Record):
    """One held-out pair under the backward model (`eval backward`): the instruction it wrote for the
    response, and how that compares with the human one.

    `issue`: why the generated instruction is unusable (`client.instructions.ISSUE_KINDS`), None when
    usable; `nll_mean`: per-token NLL of the human instruction (None, with `skipped`, when the
    conversation does not fit the server's context)."""

    line: int
    instruction: str
    generated: str
    finish_reason: str | None = None
    issue: str | None = None
    rouge_l: float
    instruction_tokens: int
    nll_sum: float | None = None
    nll_mean: float | None = None
    skipped: str | None = None


class ScorerRow(_Record):
    """One pair the scorer rated (`eval scorer`): a held-out pair (`kind` "positive") or a negative
    built from the pair on `line` of the pairs file ("mismatched", "first_sentence", "passage",
    "generic", "boilerplate"), with its score (the rubric's expected score, or a likelihood scorer's)
    and, for a likelihood scorer, every signal computed."""

    line: int
    kind: str
    instruction: str
    output: str
    score: float
    signals: dict[str, float] | None = None
