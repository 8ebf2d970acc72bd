"""Root verbs and their direct objects, read by spaCy's parser, and the diversity metrics on known sets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from humpback.evaluation import diversity

# 25 distinct imperative verbs, each with its own noun object.
VERBS = ("write translate summarize describe explain generate create list compose design find classify rewrite "
         "suggest name calculate identify compare edit plan convert draft outline recommend sort").split()
OBJECTS = ("poem sentence article process rule story recipe reason letter logo error text paragraph book company sum "
           "mistake product essay trip number email plan movie list").split()
DIVERSE = [f"{v.capitalize()} a {o} for me." for v, o in zip(VERBS, OBJECTS)]


@pytest.mark.parametrize(("instruction", "expected"), [
    ("Write a poem about the sea.", ("write", "poem")),
    ("Please write a poem about the sea.", ("write", "poem")),
    ("Can you give me three tips for staying healthy?", ("give", "tip")),  # lemmatized
    ("Describe the process of making bread and list the ingredients.", ("describe", "process")),
    ("Explain how photosynthesis works.", ("explain", None)),  # a clause, not a noun, is its object
    ("Write a poem. Then explain it.", ("write", "poem")),  # the first sentence only
    ("What is the capital of France?", (None, None)),  # the root is the auxiliary "is": no verb
    ("", (None, None)),
])
def test_root_verb_and_its_direct_object(instruction: str, expected: tuple[str | None, str | None]) -> None:
    assert next(diversity.parse([instruction])) == expected


def test_verb_object_pairs_count_only_instructions_with_both() -> None:
    pairs = diversity.verb_object_pairs(["Write a poem.", "Write a story.", "Please write a poem about cats.",
                                         "Explain how tides work.", "What is love?"])
    assert pairs == Counter({("write", "poem"): 2, ("write", "story"): 1})


def test_metrics_tell_a_diverse_set_from_a_repetitive_one() -> None:
    diverse = diversity.diversity_metrics(DIVERSE + ["What is love?"] * 5)
    assert (diverse["verb_rate"].value, diverse["verb_rate"].n) == (pytest.approx(25 / 30), 30)
    lo, hi = diverse["verb_rate"].ci95
    assert lo < 25 / 30 < hi
    assert {k: (diverse[k].value, diverse[k].n) for k in ("unique_root_verbs", "unique_verb_object")} == \
        {"unique_root_verbs": (25, 25), "unique_verb_object": (25, 25)}
    assert diverse["unique_root_verbs"].ci95 is None
    assert diverse["top20_verb_share"].value == pytest.approx(0.8)
    lo, hi = diverse["top20_verb_share"].ci95
    assert lo < 0.8 < hi < 1.0

    # The loop's failure mode: the same generic question for every passage.
    same = diversity.diversity_metrics(["How can I help you?"] * 20 + ["Write a poem."] * 10)
    assert (same["unique_root_verbs"].value, same["unique_verb_object"].value) == (2, 1)
    assert (same["top20_verb_share"].value, same["top20_verb_share"].ci95) == (1.0, (1.0, 1.0))


def test_metrics_of_nothing_are_empty() -> None:
    metrics = {name: m.model_dump() for name, m in diversity.diversity_metrics([]).items()}
    assert metrics == {"verb_rate": {"value": None, "ci95": None, "n": 0},
                       "unique_root_verbs": {"value": 0, "ci95": None, "n": 0},
                       "unique_verb_object": {"value": 0, "ci95": None, "n": 0},
                       "top20_verb_share": {"value": None, "ci95": None, "n": 0}}


def test_plot_draws_the_top_verbs(tmp_path: Path) -> None:
    from PIL import Image

    pairs = diversity.verb_object_pairs(DIVERSE + ["Write a story.", "Write a song.", "Write a haiku.",
                                                   "Write an essay.", "Write a limerick.", "Write a poem."])
    few = diversity.plot_verb_objects(Counter(dict(pairs.most_common(3))), tmp_path / "few.png")
    path = diversity.plot_verb_objects(pairs, tmp_path / "plots" / "verbs.png")
    image = Image.open(path)
    assert image.format == "PNG"
    # One bar per verb, at most 20: the figure grows with the rows drawn.
    assert image.height > Image.open(few).height + 200


def test_a_missing_pipeline_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    diversity._nlp.cache_clear()
    monkeypatch.setattr(diversity, "SPACY_MODEL", "no_such_pipeline")
    try:
        with pytest.raises(ModuleNotFoundError, match=r"'no_such_pipeline' is not installed: pip install"):
            diversity.verb_object_pairs(["Write a poem."])
    finally:
        diversity._nlp.cache_clear()
