"""How each model is prompted: the backward prompt, the rubric, the pairwise judge, the tags.

One definition each. The client builds its requests with these functions and the loop builds its
training rows with the same ones, so the backward model sees at inference exactly the prompt it was
trained on, and the scorer is asked exactly one rubric.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from humpback.contracts.records import ChatExample, ChatMessage, SeedPair

# System prompts that tag the origin of each training example (paper §2.3, tagged back-translation).
SEED_SYSTEM_PROMPT = "Answer in the style of an AI Assistant."
AUGMENTED_SYSTEM_PROMPT = "Answer with knowledge from web search."

# Nucleus sampling for self-augmentation (paper §3.1).
AUGMENT_TEMPERATURE = 0.7
AUGMENT_TOP_P = 0.9

SCORE_CHOICES = ("1", "2", "3", "4", "5")

def tagged_example(instruction: str, response: str, system: str | None) -> ChatExample:
    """A forward (instruction -> response) training example, tagged with its origin's system prompt."""
    msgs = [] if system is None else [ChatMessage(role="system", content=system)]
    msgs += [ChatMessage(role="user", content=instruction), ChatMessage(role="assistant", content=response)]
    return ChatExample(messages=msgs)


# --- The backward model M_yx: response -> instruction -------------------------------------------

BACKWARD_SYSTEM_PROMPT = (
    "You write the instruction a user gave to an AI assistant, given only the assistant's response."
)
_BACKWARD_USER_TEMPLATE = (
    "Below is a response. Write the instruction or question it answers. "
    "Reply with the instruction only.\n\nResponse:\n{response}"
)


def backward_messages(response: str, demonstrations: Sequence[SeedPair] = ()) -> list[dict[str, str]]:
    """The chat prompt the backward model sees for one unlabelled segment (inference and training).

    `demonstrations` (see `pick_demonstrations`) go before the segment as earlier turns of the same
    conversation, each a response and the instruction that was its answer: the model is shown the task
    instead of being told it. They are the same for every segment of a run, so every request shares
    one long prefix that vLLM's prefix cache computes once."""
    msgs = [{"role": "system", "content": BACKWARD_SYSTEM_PROMPT}]
    for demo in demonstrations:
        msgs += [{"role": "user", "content": _BACKWARD_USER_TEMPLATE.format(response=demo.response)},
                 {"role": "assistant", "content": demo.instruction}]
    msgs.append({"role": "user", "content": _BACKWARD_USER_TEMPLATE.format(response=response)})
    return msgs


# Demonstrations are read in full by every request: short ones keep the shared prefix small.
DEMONSTRATION_MAX_CHARS = 700


def short_pairs(pairs: Iterable[SeedPair], max_chars: int = DEMONSTRATION_MAX_CHARS) -> list[SeedPair]:
    """The pairs whose response fits `max_chars` and whose instruction is one line, in their order: the
    backward model's demonstrations are drawn from them, and the demo's M_yx learns from them (short
    examples train twice the pairs at the cost of the long ones)."""
    return [p for p in pairs if len(p.response) <= max_chars and "\n" not in p.instruction.strip()]


def pick_demonstrations(pairs: Iterable[SeedPair], k: int,
                        max_chars: int = DEMONSTRATION_MAX_CHARS) -> tuple[SeedPair, ...]:
    """`k` seed pairs to show the backward model: of the `short_pairs`, the first `k` in the order of
    their ids (a hash: deterministic, and as varied in topic as the seed; the seed's file order groups
    pairs by source). Fewer when the seed has fewer such pairs."""
    return tuple(sorted(short_pairs(pairs, max_chars), key=lambda p: p.id)[:k])


def backward_example(instruction: str, response: str) -> ChatExample:
    """A reversed seed pair: the backward model learns to produce `instruction` from `response`."""
    msgs = [ChatMessage(**m) for m in backward_messages(response)]
    msgs.append(ChatMessage(role="assistant", content=instruction))
    return ChatExample(messages=msgs)


def seed_forward_examples(pairs: Iterable[SeedPair]) -> list[ChatExample]:
    """Seed pairs for M0 / M_t: instruction -> response, tagged S_a (paper §2.3)."""
    return [tagged_example(p.instruction, p.response, SEED_SYSTEM_PROMPT) for p in pairs]


def seed_backward_examples(pairs: Iterable[SeedPair]) -> list[ChatExample]:
    """Reversed seed pairs for M_yx: response -> instruction, in the prompt the client uses at inference."""
    return [backward_example(p.instruction, p.response) for p in pairs]


# --- Response rewriting (back-and-forth translation, Nguyen et al. 2024) -------------------------

REWRITE_SYSTEM_PROMPT = "You are a helpful AI assistant."
# The instruction comes after the fixed part, so every rewrite request of a run shares the prefix.
_REWRITE_TEMPLATE = (
    "Below is an instruction and a text from the web that answers it. Rewrite the text as an AI "
    "assistant's answer to the instruction: keep its facts, details and code, leave out what does not "
    "help answer the instruction (navigation, cross-references, asides about the document itself), and "
    "write clearly, in the assistant's own voice. Reply with the rewritten answer only.\n\n"
    "Instruction:\n{instruction}\n\nText:\n{text}"
)


def rewrite_messages(instruction: str, text: str) -> list[dict[str, str]]:
    """The chat prompt an aligned model sees to rewrite web `text` into an answer to `instruction`:
    conditioned on both, as back-and-forth translation does, so the facts stay the text's."""
    return [
        {"role": "system", "content": REWRITE_SYSTEM_PROMPT},
        {"role": "user", "content": _REWRITE_TEMPLATE.format(instruction=instruction, text=text)},
    ]


# --- Self-curation: the paper's 5-point rubric (Table 1 of v1) -----------------------------------

RUBRIC = """Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person's perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful."""

# The mode-specific request comes right after the rubric, before the pair, so every scoring prompt
# of a run shares one long prefix and vLLM's prefix cache serves it once.
_FORMAT_FREE_TEXT = (
    'Please first provide a brief reasoning you used to derive the rating score, and then write '
    '"Score: <rating>" in the last line.'
)
_FORMAT_CHOICE = "Reply with the score alone: one digit from 1 to 5."

ScoreMode = Literal["logprobs", "free_text"]


def rubric_messages(instruction: str, answer: str, mode: ScoreMode = "logprobs") -> list[dict[str, str]]:
    """The chat prompt the scorer sees for one (instruction, answer) pair."""
    fmt = _FORMAT_CHOICE if mode == "logprobs" else _FORMAT_FREE_TEXT
    return [
        {
            "role": "user",
            "content": f"{RUBRIC}\n\n{fmt}\n\nInstruction:\n{instruction}\n\nAnswer:\n{answer}",
        }
    ]


_SCORE_RE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5])(?:\.\d+)?\s*(?:/\s*5)?", re.IGNORECASE)


def parse_free_text_score(text: str) -> int | None:
    """The rating of a free-text answer ("... Score: 4"), or None when it states none.

    The last "Score: N" wins (models restate the scale before concluding); a lone digit 1-5 on the
    last non-empty line is accepted too.
    """
    matches = _SCORE_RE.findall(text)
    if matches:
        return int(matches[-1])
    lines = [ln.strip(" *.#") for ln in text.strip().splitlines() if ln.strip()]
    if lines and lines[-1] in SCORE_CHOICES:
        return int(lines[-1])
    return None


# --- The pairwise judge (evaluation) ---------------------------------------------------------------

JUDGE_CHOICES = ("1", "2")
JUDGE_SYSTEM_PROMPT = "You are a fair judge of AI assistants. You compare two answers to the same instruction."
_JUDGE_TEMPLATE = """Which answer follows the instruction better? Judge helpfulness, correctness, relevance and clarity; ignore length and the order in which the answers are shown.

# Instruction
{instruction}

# Answer 1
{first}

# Answer 2
{second}

Reply with the number of the better answer: 1 or 2."""


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + " [...]"


def judge_messages(instruction: str, first: str, second: str, max_chars: int) -> list[dict[str, str]]:
    """The chat prompt the judge sees for one ordering of two answers; each answer is cut to
    `max_chars` (ending "[...]") so that both fit a small judge's context."""
    user = _JUDGE_TEMPLATE.format(instruction=instruction, first=_clip(first, max_chars),
                                  second=_clip(second, max_chars))
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]
