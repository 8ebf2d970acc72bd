"""A curated set as users load it (`humpback export dataset`): a Hugging Face `datasets` folder
(`save_to_disk`, read back with `datasets.load_from_disk`) with a dataset card, `README.md`.

The rows are the curated pairs, rebuilt from the scored journal with curate's own selection (this
scorer and mode, score >= the k the curate summary reports), so each row keeps what the chat-format
A_k file drops: its score and where its text came from (file, license, title). The card is written
from the run's own records: the curate summary (scorer, k, score bands, decontamination), the augment
summary (backward model and version, every preparation rule with its count) and the data build's
manifest and licenses, where they are given. `datasets` comes with the `trainer` extra; the client
itself does not need it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from client.curate import Selection, contaminated_ids
from client.runner import side_path
from humpback.contracts import AUGMENTED_SYSTEM_PROMPT, HumpbackError, InputError, tagged_example
from humpback.settings import setting


class DatasetFiles(BaseModel):
    """What `humpback export dataset` reads and writes."""

    model_config = ConfigDict(extra="forbid")

    curated: Path = setting(help="the curated set `curate` wrote (A_k, chat JSONL); its summary and scored journal "
                                 "are found beside it unless given")
    out: Path = setting(help="the dataset folder to write (datasets' save_to_disk layout, with README.md)")
    scored: Path | None = setting(None, "the scored journal (default: <curated>.scored.jsonl)")
    summary: Path | None = setting(None, "curate's summary (default: <curated>.summary.json)")
    augment_summary: Path | None = setting(None, "augment's summary of the candidates, for the card's preparation "
                                                 "rules and backward model")
    data_manifest: Path | None = setting(None, "the data build's manifest.json (`humpback data demo|oasst1`), for the "
                                               "card's sources; its LICENSES.md beside it is copied into the card")
    push_to_hub: str | None = setting(None, "also push the dataset and its card to this hub repository (needs the "
                                            "hub to be reachable and a token)")


def _json(path: Path | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(f"{path}: the {what} is not JSON ({exc})") from None


def curated_rows(scored: Path, summary: dict[str, Any], contaminated: set[str] | None = None
                 ) -> list[dict[str, Any]]:
    """The rows of the curated set: curate's selection of the scored journal (see the module doc),
    without the `contaminated` candidates (their scores may be in the journal from an earlier run)."""
    return [{"messages": [m.model_dump() for m in tagged_example(rec.instruction, rec.output,
                                                                AUGMENTED_SYSTEM_PROMPT).messages],
             "score": rec.score, "source": rec.source.path, "license": rec.source.metadata.get("license"),
             "title": rec.source.metadata.get("title")}
            for rec in Selection.of(summary).records(scored, contaminated or set())]


def shareable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` as they may be published: each `source` relative to the folder the sources share (the
    file's name when there is one), never a path of this machine."""
    paths = {r["source"] for r in rows if isinstance(r.get("source"), str) and os.path.isabs(r["source"])}
    if not paths:
        return rows
    root = os.path.commonpath(sorted(paths))
    root = os.path.dirname(root) if root in paths else root
    return [{**r, "source": os.path.relpath(r["source"], root) if r["source"] in paths else r["source"]}
            for r in rows]


def _local_free(value: Any) -> Any:
    """A model's checkpoint as the card shows it: a local folder by its name, a version as it is."""
    return Path(value).name if isinstance(value, str) and os.path.isabs(value) else value


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _k(curate_extra: dict[str, Any]) -> str:
    k = curate_extra.get("k")
    return "-" if k is None else f"{k:.3g}"


SCORINGS = {"logprobs": "on the paper's 5-point rubric", "free_text": "on the paper's 5-point rubric",
            "pmi": "by how much the instruction raises the response's likelihood, log p(y|x) - log p(y)",
            "reverse_pmi": "by how much the response raises the instruction's likelihood under the backward model, "
                           "log p(x|y) - log p(x)",
            "combined": "by P(good pair) from both likelihood signals and the response's length, a calibrated "
                        "logistic regression"}


def _scoring(curate_extra: dict[str, Any]) -> str:
    return SCORINGS.get(str(curate_extra.get("mode")), "on the paper's 5-point rubric")


def _combiner(curate_extra: dict[str, Any]) -> list[str]:
    """The card's lines on the combined scorer's combiner: where its weights are, what it was fitted on."""
    c = curate_extra.get("combiner")
    if not c:
        return []
    negatives = ", ".join(f"{k} {v}" for k, v in c.get("negatives", {}).items())
    return ["", f"The combiner's weights: `{c['path']}`, fitted on {c['pairs']} held-out pairs of `{c['data']}` and "
                f"negatives built from them ({negatives})."]


def dataset_card(name: str, rows: list[dict[str, Any]], curate: dict[str, Any], augment: dict[str, Any],
                 manifest: dict[str, Any], licenses: str | None) -> str:
    """The card's Markdown (with the hub's YAML header), from the records named in the module doc."""
    cx, ax = curate.get("extra", {}), augment.get("extra", {})
    licenses_used = sorted({str(r["license"]) for r in rows if r.get("license")})
    parts = ["---", "license: other", "task_categories:", "- text-generation", "language:", "- en",
             "tags:", "- instruction-backtranslation", "- humpback", "---", "", f"# {name}", "",
             f"{len(rows)} instruction-response pairs made by instruction backtranslation (Li et al., 2023, "
             "\"Self-Alignment with Instruction Backtranslation\") with humpback: a backward model wrote the "
             f"instruction each unlabelled text answers, a scorer rated every pair ({_scoring(cx)}), "
             f"and the pairs scored at least k = {_k(cx)} were kept. Each row holds `messages` (system "
             f"prompt \"{AUGMENTED_SYSTEM_PROMPT}\", the instruction, the text), its `score`, and the `source` file, "
             "`license` and `title` of its text.", "", "## Sources and licenses", ""]
    by_source = Counter((r["source"], r.get("license")) for r in rows)
    parts.append(_table(("source file", "license", "rows"),
                        [(s, lic or "not given", n) for (s, lic), n in by_source.most_common()]))
    if manifest.get("sources"):
        parts += ["", "Data build (`manifest.json`):", "",
                  _table(("source", "files", "parsed", "kept", "dropped"),
                         [(s, c.get("files"), c.get("parsed"), c.get("kept"),
                           ", ".join(f"{k} {v}" for k, v in c.get("dropped", {}).items()) or "-")
                          for s, c in manifest["sources"].items()])]
    if licenses:
        parts += ["", licenses.replace("# Licenses of the data sources", "### Licenses of the data sources")]
    parts += ["", "## Preparation", ""]
    prepare = augment.get("prepare") or {}
    parts.append(_table(("rule", "segments"), sorted(prepare.items())) if prepare
                 else "No augment summary was given: the preparation counts are not recorded here.")
    parts += ["", "## Decontamination", ""]
    contaminated = cx.get("contaminated")
    parts.append(_table(("reference set", "candidates dropped"), sorted(contaminated.items())) if contaminated
                 else f"Candidates dropped as contaminated: {curate.get('results', {}).get('contaminated', 0)}.")
    parts += ["", "## Models and selection", "",
              _table(("role", "model", "version"),
                     [(who, x.get("model", "-"), _local_free(x.get("checkpoint", "-")))
                      for who, x in (("backward (wrote the instructions)", ax), ("scorer (rated the pairs)", cx))]), "",
              f"Scoring mode `{cx.get('mode')}`; threshold k = {_k(cx)}"
              + (f" (the best-scored {cx['top_fraction']:.0%})" if cx.get("top_fraction") else "")
              + f"; kept {cx.get('selected')} of {cx.get('scored_total')} scored pairs.",
              *_combiner(cx),
              "", "## Score distribution", "",
              _table(("score band", "pairs"), list((cx.get("bands") or {}).items())) if cx.get("bands")
              else "A likelihood score has no rubric bands."]
    if licenses_used:
        parts += ["", "Licenses of the kept rows: " + ", ".join(licenses_used) + "."]
    return "\n".join(parts) + "\n"


def export_dataset(files: DatasetFiles) -> dict[str, Any]:
    """Write the dataset folder and its card; push them when `files.push_to_hub` names a repository."""
    try:
        import datasets
    except ImportError:
        raise InputError("`humpback export dataset` needs the `datasets` library: pip install -e '.[trainer]'") from None
    curated = files.curated
    scored = files.scored or side_path(curated, "scored.jsonl")
    summary = _json(files.summary or side_path(curated, "summary.json"), "curate summary")
    if not scored.is_file():
        raise InputError(f"{scored}: no scored journal (pass --scored)")
    rows = shareable(curated_rows(scored, summary, contaminated_ids(side_path(curated, "contaminated.jsonl"))))
    manifest = _json(files.data_manifest, "data manifest")
    lic = files.data_manifest.parent / "LICENSES.md" if files.data_manifest else None
    card = dataset_card(curated.stem, rows, summary, _json(files.augment_summary, "augment summary"), manifest,
                        lic.read_text(encoding="utf-8") if lic is not None and lic.is_file() else None)
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"messages": [], "score": [], "source": [], "license": [], "title": []})
    ds.save_to_disk(os.fspath(files.out))
    (files.out / "README.md").write_text(card, encoding="utf-8")
    result = {"rows": len(rows), "out": str(files.out), "card": str(files.out / "README.md")}
    if files.push_to_hub:
        try:
            ds.push_to_hub(files.push_to_hub)
            from huggingface_hub import HfApi

            HfApi().upload_file(path_or_fileobj=str(files.out / "README.md"), path_in_repo="README.md",
                                repo_id=files.push_to_hub, repo_type="dataset")
        except Exception as exc:  # the hub's client raises many kinds: offline, no token, no rights
            raise HumpbackError(f"could not push to the hub repository {files.push_to_hub!r} ({type(exc).__name__}: "
                                f"{exc}); the dataset is saved in {files.out}") from None
        result["pushed"] = files.push_to_hub
    return result
