"""`humpback augment|curate|rewrite|batch|merge|export`: thin wrappers over the API.

Every flag is generated (`humpback.settings`) from a field of `FanoutConfig`, `AugmentConfig`,
`CurateConfig`, `RewriteConfig`, `PrepareConfig`, `PreferenceConfig` or of the files models below
(and `client.dataset.DatasetFiles`), which document them; the handlers
import the rest of the client only when run. Their errors end a command in `humpback.cli.main`, with
one line and the exit status of docs/contracts.md "Exit statuses": input that cannot be used (a file
that cannot be read, an output another run holds) with 2 before anything is sent, an output that
cannot be written (a full disk) with 4, its journal whole, a Ray cluster that cannot run the shards
of a `--ray` run (`client.cluster`) with 5.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from client.augment import AugmentConfig
from client.curate import CurateConfig
from client.dataset import DatasetFiles
from client.fanout import FanoutConfig
from client.preferences import PreferenceConfig
from client.prepare import PrepareConfig
from client.rewrite import RewriteConfig
from humpback.contracts import DEFAULT_URLS
from humpback.settings import add_arguments, from_args, setting


class _Files(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusFiles(_Files):
    corpus: list[Path] = setting(help="JSONL, text (either may be .gz) or Parquet files", many="+")
    text_field: str = setting("text", "JSONL/Parquet field holding the text")


class AugmentFiles(CorpusFiles):
    """What `humpback augment` reads and writes."""

    out: Path = setting(help="candidates JSONL (appended; side files next to it)")


class CurateFiles(_Files):
    """What `humpback curate` reads and writes."""

    candidates: Path = setting(help="candidates JSONL (instruction and output fields; .gz allowed)")
    out: Path = setting(help="curated set, chat-format JSONL (rewritten each run)")


class RewriteFiles(_Files):
    """What `humpback rewrite` reads and writes."""

    candidates: Path = setting(help="pairs to rewrite: candidates or any JSONL with instruction and output "
                                    "fields (.gz allowed)")
    out: Path = setting(help="rewritten candidates JSONL (appended; each with its original_output; side files "
                             "next to it)")


class PreferenceFiles(_Files):
    """What `humpback export dpo` reads and writes."""

    scored: list[Path] = setting(help="scored journals (curate's <out>.scored.jsonl): the responses of each "
                                      "instruction across all of them are compared", many="+")
    out: Path = setting(help="preference pairs JSONL, TRL's conversational format (rewritten)")


class ExportAugmentFiles(CorpusFiles):
    """What `humpback batch export augment` reads and writes."""

    out: Path = setting(help="batch requests JSONL, and <out>.meta.jsonl beside it: the segment of each request")


class ExportCurateFiles(_Files):
    """What `humpback batch export curate` reads and writes."""

    candidates: Path = setting(help="candidates JSONL (instruction and output fields; .gz allowed)", flag="corpus")
    out: Path = setting(help="batch requests JSONL, and <out>.meta.jsonl beside it: the candidate of each request")


class ExportRewriteFiles(_Files):
    """What `humpback batch export rewrite` reads and writes."""

    candidates: Path = setting(help="pairs to rewrite: candidates or any JSONL with instruction and output fields")
    out: Path = setting(help="batch requests JSONL, and <out>.meta.jsonl beside it: the pair of each request")


class ImportFiles(_Files):
    """What `humpback batch import` reads and writes."""

    requests: Path = setting(help="the exported requests JSONL (its <requests>.meta.jsonl beside it)")
    results: Path = setting(help="the batch output JSONL")
    out: Path = setting(help="candidates journal (augment, appended) or curated set (curate, rewritten)")


class MergeFiles(_Files):
    """What `humpback merge` reads and writes."""

    shards: list[Path] = setting(help="each shard's output (its --out): candidates, scored candidates or curated "
                                      "sets", cli=False)
    out: Path = setting(help="the merged JSONL (rewritten), each record once; side files next to it")
    corpus: list[Path] | None = setting(None, "the corpus the shards augmented: check that together they hold every "
                                              "request the unsharded run asks for, and list the others in "
                                              "<out>.missing.jsonl (give the shards' preparation flags, --limit, "
                                              "and sampling flags); repeat the flag for each file, so that it "
                                              "cannot swallow the shard outputs")
    text_field: str = setting("text", "JSONL/Parquet field holding the text")


# The fields a batch step uses: the request body is built (and contaminated candidates dropped) at
# export, the answers are read and the set selected at import. The other fields of the config have
# no effect there, so no flag.
EXPORT_AUGMENT = ("model", "max_tokens", "temperature", "top_p", "seed", "shots", "demonstrations")
EXPORT_CURATE = ("model", "scorer", "mode", "backward_endpoint", "calibration", "max_tokens", "temperature",
                 "max_field_chars", "decontaminate", "decontaminate_against")
EXPORT_REWRITE = ("model", "max_tokens", "temperature", "top_p", "max_field_chars")
IMPORT_AUGMENT = ("checkpoint",)
IMPORT_REWRITE = ("checkpoint",)
IMPORT_CURATE = ("mode", "min_score", "top_fraction", "min_prob", "calibration", "model", "checkpoint", "scored",
                 "histogram")
# What makes an augment request's custom_id, and which segments a run takes: `merge --corpus` needs them.
MERGE_AUGMENT = ("model", "max_tokens", "temperature", "top_p", "seed", "shots", "demonstrations", "limit")

# k is either an absolute score or the lowest score of the best-scored fraction.
_K = ("min_score", "top_fraction")


def _except(model: type[BaseModel], keep: Iterable[str]) -> set[str]:
    """The fields of `model` but `keep`: what `add_arguments` excludes to give only `keep` a flag."""
    return set(model.model_fields) - set(keep)


def _files_args(p: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    add_arguments(p, model, required=[name for name, f in model.model_fields.items() if f.is_required()])


def _servers(role: str) -> dict[str, Any]:
    """FanoutConfig's defaults for a command: the local server of its role (backward 8001, scorer 8002)."""
    return {"endpoints": [DEFAULT_URLS[role]]}


def _fanout_args(p: argparse.ArgumentParser, role: str) -> None:
    add_arguments(p.add_argument_group("servers"), FanoutConfig, defaults=_servers(role))


def _fanout_config(args: argparse.Namespace, role: str) -> FanoutConfig:
    return from_args(FanoutConfig, args, defaults=_servers(role))


def _curate_args(g: Any, exclude: Iterable[str] = (), required: Iterable[str] = ()) -> None:
    """CurateConfig's flags but `exclude`, with `--min-score` and `--top-fraction` mutually exclusive."""
    skip = set(exclude)
    add_arguments(g, CurateConfig, exclude=skip | set(_K), required=required)
    if not set(_K) <= skip:
        add_arguments(g.add_mutually_exclusive_group(), CurateConfig, exclude=_except(CurateConfig, _K) | skip)


def _prepare_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p.add_argument_group("corpus preparation (paper App. E; each rule on by default)"), PrepareConfig)


def _prepare_config(args: argparse.Namespace) -> PrepareConfig:
    # `--no-dedup` has always meant no duplicate removal at all: near-dedup follows it unless given.
    near = {"dedup_near": args.dedup_exact} if "dedup_exact" in vars(args) else {}
    return from_args(PrepareConfig, args, defaults=near)


def _run(coro: Any) -> Any:
    import asyncio

    try:
        import uvloop  # optional: a faster event loop where installed
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _report(summary: Any) -> int:
    """Print the run's summary; exit status 3 when any request failed (a re-run retries them), 2 when
    every input record was refused (the wrong file: nothing was done)."""
    import json

    print(json.dumps(summary.to_dict(), indent=2), file=sys.stderr)
    if summary.input["records"] and summary.input["rejected"] >= summary.input["records"]:
        print(f"humpback: error: every one of the {summary.input['records']} input records was refused "
              "(see the errors file); is it the file this command reads?", file=sys.stderr)
        return 2
    return 3 if summary.results["failed"] else 0


def _augment(args: argparse.Namespace) -> int:
    from client import augment, cluster

    files, cfg = from_args(AugmentFiles, args), from_args(AugmentConfig, args)
    call = (files.corpus, files.out, _fanout_config(args, "backward"), cfg, _prepare_config(args), files.text_field)
    return _report(cluster.augment(*call) if cfg.ray else _run(augment.augment(*call)))


def _curate(args: argparse.Namespace) -> int:
    from client import cluster, curate

    files, cfg = from_args(CurateFiles, args), from_args(CurateConfig, args)
    call = (files.candidates, files.out, _fanout_config(args, "scorer"), cfg)
    return _report(cluster.curate(*call) if cfg.ray else _run(curate.curate(*call)))


def _export_augment(args: argparse.Namespace) -> int:
    from client import batch

    files, cfg = from_args(ExportAugmentFiles, args), from_args(AugmentConfig, args)
    return _report(batch.export_augment(files.corpus, files.out, cfg.model, cfg, _prepare_config(args),
                                        text_field=files.text_field))


def _export_curate(args: argparse.Namespace) -> int:
    from client import batch

    files, cfg = from_args(ExportCurateFiles, args), from_args(CurateConfig, args)
    fanout = _fanout_config(args, "scorer") if cfg.scorer != "rubric" else None
    return _report(batch.export_curate(files.candidates, files.out, cfg.model, cfg, fanout))


def _export_rewrite(args: argparse.Namespace) -> int:
    from client import batch

    files, cfg = from_args(ExportRewriteFiles, args), from_args(RewriteConfig, args)
    return _report(batch.export_rewrite(files.candidates, files.out, cfg.model, cfg))


def _import_rewrite(args: argparse.Namespace) -> int:
    from client import batch

    files, cfg = from_args(ImportFiles, args), from_args(RewriteConfig, args)
    return _report(batch.import_rewrite(files.requests, files.results, files.out, checkpoint=cfg.checkpoint))


def _import_augment(args: argparse.Namespace) -> int:
    from client import batch

    files, cfg = from_args(ImportFiles, args), from_args(AugmentConfig, args)
    return _report(batch.import_augment(files.requests, files.results, files.out, checkpoint=cfg.checkpoint))


def _import_curate(args: argparse.Namespace) -> int:
    from client import batch

    files = from_args(ImportFiles, args)
    return _report(batch.import_curate(files.requests, files.results, files.out, from_args(CurateConfig, args)))


def _merge(args: argparse.Namespace) -> int:
    """Print the merge's summary; exit status 3 when it does not prove the merged file is the unsharded
    run's (a shard or requests missing, failed requests, records that do not belong)."""
    import json

    from client.merge import merge, proven

    files = from_args(MergeFiles, args, shards=args.shards)
    # Only the augment settings merge has flags for: `args.shards` is the shard outputs, not AugmentConfig.shards.
    unsharded = from_args(AugmentConfig, args, exclude=_except(AugmentConfig, MERGE_AUGMENT))
    summary = merge(files.shards, files.out, files.corpus, unsharded, _prepare_config(args), text_field=files.text_field)
    print(json.dumps(summary.to_dict(), indent=2), file=sys.stderr)
    return 0 if proven(summary) else 3


def _rewrite(args: argparse.Namespace) -> int:
    from client import cluster, rewrite

    files, cfg = from_args(RewriteFiles, args), from_args(RewriteConfig, args)
    call = (files.candidates, files.out, _fanout_config(args, "scorer"), cfg)
    return _report(cluster.rewrite(*call) if cfg.ray else _run(rewrite.rewrite(*call)))


def _export_dpo(args: argparse.Namespace) -> int:
    import json

    from client.preferences import export_dpo

    files = from_args(PreferenceFiles, args)
    summary = export_dpo(files.scored, files.out, from_args(PreferenceConfig, args))
    print(json.dumps(summary.to_dict(), indent=2), file=sys.stderr)
    return 0


def _export_dataset(args: argparse.Namespace) -> int:
    import json

    from client.dataset import export_dataset

    print(json.dumps(export_dataset(from_args(DatasetFiles, args)), indent=2), file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add `augment`, `curate`, `rewrite`, `batch`, `merge` and `export` to the `humpback` command."""
    p = sub.add_parser("augment", help="self-augmentation: one instruction per corpus segment (resumable)",
                       description="Stream a corpus through the backward model; re-run the same command to resume.")
    _files_args(p, AugmentFiles)
    add_arguments(p.add_argument_group("generation"), AugmentConfig)
    _fanout_args(p, "backward")
    _prepare_args(p)
    p.set_defaults(func=_augment)

    p = sub.add_parser("curate", help="self-curation: score candidates and select A_k (resumable)")
    _files_args(p, CurateFiles)
    _curate_args(p.add_argument_group("scoring and selection of A_k"))
    _fanout_args(p, "scorer")
    p.set_defaults(func=_curate)

    p = sub.add_parser("rewrite", help="rewrite each pair's text as an assistant's answer with an aligned model "
                                       "(back-and-forth translation; resumable)")
    _files_args(p, RewriteFiles)
    add_arguments(p.add_argument_group("generation"), RewriteConfig)
    _fanout_args(p, "scorer")
    p.set_defaults(func=_rewrite)

    p = sub.add_parser("export", help="curated data as users load it: preference pairs, a datasets folder")
    xsub = p.add_subparsers(dest="export_command", required=True)
    x = xsub.add_parser("dpo", help="chosen/rejected pairs from scored responses to the same instruction")
    _files_args(x, PreferenceFiles)
    add_arguments(x.add_argument_group("pairs"), PreferenceConfig)
    x.set_defaults(func=_export_dpo)
    x = xsub.add_parser("dataset", help="a curated set as a Hugging Face datasets folder with a dataset card")
    _files_args(x, DatasetFiles)
    x.set_defaults(func=_export_dataset)

    p = sub.add_parser("batch", help="OpenAI batch JSONL: export requests, import results")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    export = bsub.add_parser("export", help="write batch request lines (for `vllm run-batch` or a hosted batch API)")
    kinds = export.add_subparsers(dest="kind", required=True)
    e = kinds.add_parser("augment", help="one backtranslation request per kept corpus segment")
    _files_args(e, ExportAugmentFiles)
    add_arguments(e, AugmentConfig, exclude=_except(AugmentConfig, EXPORT_AUGMENT), required=["model"])
    _prepare_args(e)
    e.set_defaults(func=_export_augment)
    e = kinds.add_parser("curate", help="one scoring request per candidate (the rubric), or one log-probability "
                                        "request per distinct term (a likelihood scorer: the servers' /tokenize "
                                        "renders them)")
    _files_args(e, ExportCurateFiles)
    _curate_args(e, exclude=_except(CurateConfig, EXPORT_CURATE), required=["model"])
    _fanout_args(e, "scorer")
    e.set_defaults(func=_export_curate)
    e = kinds.add_parser("rewrite", help="one rewriting request per pair")
    _files_args(e, ExportRewriteFiles)
    add_arguments(e, RewriteConfig, exclude=_except(RewriteConfig, EXPORT_REWRITE), required=["model"])
    e.set_defaults(func=_export_rewrite)

    imp = bsub.add_parser("import", help="turn batch results into candidates (augment), a curated set (curate) or "
                                         "rewrites (rewrite)")
    kinds = imp.add_subparsers(dest="kind", required=True)
    i = kinds.add_parser("augment", help="append the answers to a candidates journal")
    _files_args(i, ImportFiles)
    add_arguments(i, AugmentConfig, exclude=_except(AugmentConfig, IMPORT_AUGMENT))
    i.set_defaults(func=_import_augment)
    i = kinds.add_parser("curate", help="append the scores to the scored journal and select A_k")
    _files_args(i, ImportFiles)
    _curate_args(i, exclude=_except(CurateConfig, IMPORT_CURATE))
    i.set_defaults(func=_import_curate)
    i = kinds.add_parser("rewrite", help="append the rewrites to a rewritten-candidates journal")
    _files_args(i, ImportFiles)
    add_arguments(i, RewriteConfig, exclude=_except(RewriteConfig, IMPORT_REWRITE))
    i.set_defaults(func=_import_rewrite)

    p = sub.add_parser("merge", help="join the outputs of `--shard I/N` runs and check that none is missing",
                       description="Join the shards' outputs into one JSONL, each record once (two different "
                                   "records under one custom_id are refused); with --corpus, list the requests "
                                   "of the unsharded augment run that no shard holds (exit status 3). --model "
                                   "unset: the one model the shards' records name.")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD_OUTPUT",  # positional: no flag to generate
                   help=MergeFiles.model_fields["shards"].description)
    _files_args(p, MergeFiles)
    add_arguments(p.add_argument_group("the unsharded run (with --corpus)"), AugmentConfig,
                  exclude=_except(AugmentConfig, MERGE_AUGMENT))
    _prepare_args(p)
    p.set_defaults(func=_merge)
