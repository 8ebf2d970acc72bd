"""Reading OpenAI chat-completion responses: the one place that knows their shape.

A malformed body or an aborted generation is a RetryableError (the fan-out retries it); what the
answer means is each caller's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from humpback.contracts import RetryableError


def chat_choice(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(first choice, its message text) of a chat completion."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as exc:
        raise RetryableError(f"malformed completion ({exc!r})") from None
    if choice.get("finish_reason") == "abort":
        raise RetryableError("generation aborted by the server")
    return choice, text


def choice_mass(choice: dict[str, Any], labels: Iterable[str]) -> dict[str, float]:
    """Probability of each label as the first token, from the choice's top log-probabilities
    (constrained choice puts them on the allowed labels). All zero when none were returned."""
    try:
        top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
    except (IndexError, TypeError, AttributeError) as exc:
        raise RetryableError(f"malformed logprobs ({exc!r})") from None
    mass = dict.fromkeys(labels, 0.0)
    for entry in top:
        tok = str(entry.get("token", "")).strip()
        if tok in mass and entry.get("logprob") is not None:
            mass[tok] += math.exp(float(entry["logprob"]))
    return mass
