"""Shards on Ray: `humpback augment|curate|rewrite --ray ADDRESS` runs every shard of one run as a
task of a Ray cluster, then merges them into the run's output.

The driver (this process) splits the requests into N shards by content id exactly as `--shard I/N`
does (`client.shard`; N is `--shards`, by default the cluster's CPUs) and runs each as a Ray task:
the same command, on a worker, with `shard=I/N`, against the same endpoints (the role's replicas),
writing its own journal `<out>.shards/I-of-N.jsonl` (and its side files) on storage every node sees.
A task whose worker or node is lost is run again elsewhere (`MAX_RETRIES`) and resumes from its
journal, as does every shard when the driver is run again. Once all have ended, the shards' journals
are joined with `client.merge` (each record once; two different answers to one request refused; for
augment, the proof that they hold every request of the unsharded run), and one summary is returned:
the shards' request counts summed, the input counts once (every shard reads the whole input), the
merge's counts under `extra.merge`. Progress is one bar over the input all shards have read, fed
by a small actor on the driver's node.

Ray is the optional `ray` extra, imported only here and only when a run asks for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from client import augment as augment_mod
from client import curate as curate_mod
from client import rewrite as rewrite_mod
from client.augment import AugmentConfig, load_demonstrations
from client.corpus import check_input, open_corpora
from client.curate import CurateConfig, decontaminator
from client.extras import InstructionQuality, MergeExtra, RayRun
from client.fanout import FanoutConfig
from client.journal import output_lock
from client.merge import merge
from client.prepare import PrepareConfig
from client.progress import relayed
from client.rewrite import RewriteConfig
from client.runner import E, RunSummary, side_path
from client.shard import ClusterSettings, Shard
from humpback.contracts import ClusterError, HumpbackError, InputError

PathLike = str | os.PathLike[str]
Config = TypeVar("Config", bound=ClusterSettings)

# Runs of a shard after its first, when its worker or node dies (Ray's own retry of a lost task).
MAX_RETRIES = 3
# Seconds to wait for the cluster's address to accept a connection.
CONNECT_S = 10.0
# Seconds between two looks of the driver at its shards (the bar's refresh).
POLL_S = 0.5
# Result counts of the whole input, which every shard counts in full: taken once, not summed.
WHOLE_INPUT = ("contaminated",)
INSTALL = "pip install 'humpback[ray]' (from a checkout: pip install -e '.[ray]')"


def _ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError:
        raise InputError(f"--ray needs Ray, the ray extra: {INSTALL}") from None
    return ray


def _reachable(address: str) -> None:
    """Raise `ClusterError` at once when nothing listens at `address` (Ray itself waits a minute or more)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_S).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"--ray {address}: cannot reach the Ray cluster ({exc}); start it (docs/ray.md), or give "
                           "its address as HOST:PORT (the head's GCS port, 6379 by default) or ray://HOST:PORT") from None


@contextmanager
def connected(address: str) -> Iterator[Any]:
    """The `ray` module, connected to the cluster at `address` (`local` starts one of this machine's
    cores) for the block; a session the caller opened is used as it is and left open."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    if address not in ("local", "auto"):
        _reachable(address)
    try:
        if address == "local":  # a new cluster, never one already running here; loopback only: nothing joins it
            ray.init(address="local", include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, logging_level="WARNING")
    except Exception as exc:  # Ray raises bare Exceptions too (a local node that does not start in 30 s)
        raise ClusterError(f"--ray {address}: cannot reach or start the Ray cluster ({exc}); start it (docs/ray.md) "
                           "or give its address") from None
    try:
        yield ray
    finally:
        ray.shutdown()


class Tally:
    """The last position, total and counts each shard's bar reported (a Ray actor on the driver's node)."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple[int, int, dict[str, int]]] = {}

    def report(self, index: int, pos: int, total: int, counts: dict[str, int]) -> None:
        self.shards[index] = (pos, total, counts)

    def snapshot(self) -> dict[int, tuple[int, int, dict[str, int]]]:
        return self.shards


def run_shard(command: Callable[..., Awaitable[RunSummary]], args: tuple[Any, ...], tally: Any,
              index: int) -> RunSummary:
    """One shard, on a worker: `command(*args)` with its bar relayed to the driver's `tally`."""
    with relayed(lambda pos, total, counts: tally.report.remote(index, pos, total, counts)):
        return asyncio.run(command(*args))


def shard_outputs(out: Path, count: int) -> list[Path]:
    """Where the `count` shards of the run that writes `out` keep their journals."""
    folder = side_path(out, "shards")
    return [folder / f"{i}-of-{count}.jsonl" for i in range(count)]


def shard_config(config: Config, shard: Shard | None, **update: Any) -> Config:
    """`config` for one shard run on a worker (`shard`), or for the driver's own step after the merge
    (None): no cluster, no bar of its own."""
    return config.model_copy(update={"ray": None, "shards": None, "shard": shard, "progress": False, **update})


def _show(bar: tqdm, reports: dict[int, tuple[int, int, dict[str, int]]], count: int, finished: int) -> None:
    if reports:
        bar.total = count * max(total for _, total, _ in reports.values())
        bar.n = sum(pos for pos, _, _ in reports.values())
    counts: Counter[str] = Counter()
    for _, _, c in reports.values():
        counts.update(c)
    bar.set_postfix({"shards_done": f"{finished}/{count}", **counts}, refresh=False)
    bar.refresh()


def _reports(ray: Any, tally: Any) -> dict[int, tuple[int, int, dict[str, int]]]:
    """What the shards' bars reported; nothing when the tally cannot answer (the bar is no reason to stop)."""
    try:
        return ray.get(tally.snapshot.remote(), timeout=10)
    except ray.exceptions.RayError:
        return {}


def _outcome(ray: Any, ref: Any, shard: Shard) -> RunSummary:
    """The summary of a finished shard task; a humpback error it raised is raised as itself (the
    command's own message and exit status), any other failure as `ClusterError`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, HumpbackError):
            raise cause from None
        raise ClusterError(f"shard {shard} failed: {cause or exc}; a re-run resumes it") from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"shard {shard} was lost {MAX_RETRIES + 1} times ({type(exc).__name__}: {exc}); "
                           "a re-run resumes it") from None


def run_shards(settings: ClusterSettings, out: Path, desc: str, command: Callable[..., Awaitable[RunSummary]],
               args_of: Callable[[Shard, Path], tuple[Any, ...]]) -> tuple[list[Path], list[RunSummary]]:
    """Run `command(*args_of(shard, journal))` for every shard of the run that writes `out`, as Ray
    tasks of the cluster `settings.ray`; their journals and summaries, in shard order. The first
    shard that fails for good cancels the others and raises (their journals keep what they did)."""
    assert settings.ray is not None
    with output_lock(side_path(out, "shards")), connected(settings.ray) as ray:
        count = settings.shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
        outs = shard_outputs(out, count)
        outs[0].parent.mkdir(parents=True, exist_ok=True)
        here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
        tally = ray.remote(num_cpus=0)(Tally).options(scheduling_strategy=here).remote()
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(run_shard)
        refs = {task.remote(command, args_of(Shard(i, count), outs[i]), tally, i): Shard(i, count)
                for i in range(count)}
        summaries: dict[int, RunSummary] = {}
        pending = list(refs)
        bar = tqdm(desc=f"{desc} on ray ({count} shards)", unit="B", unit_scale=True, unit_divisor=1024,
                   disable=not getattr(settings, "progress", True), dynamic_ncols=True)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in done:
                    summaries[refs[ref].index] = _outcome(ray, ref, refs[ref])
                _show(bar, _reports(ray, tally), count, len(summaries))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            bar.close()
    return outs, [summaries[i] for i in range(count)]


def combined(summaries: Sequence[RunSummary[E]], merged: RunSummary[MergeExtra], address: str) -> RunSummary[E]:
    """One summary of a run from its shards' and its merge's: requests counted once per shard (summed),
    the input once (each shard read all of it), the merge's counts in `extra.merge`."""
    first = summaries[0]
    total = RunSummary(input=first.input, rejected=first.rejected, prepare=first.prepare, extra=type(first.extra)())
    for s in summaries:
        total.results.update(s.results)
        total.failures.update(s.failures)
        total.elapsed_s = max(total.elapsed_s, s.elapsed_s)
    total.results.pop("other_shard", None)
    for key in WHOLE_INPUT:
        if key in first.results:
            total.results[key] = first.results[key]
    qualities = [s.quality for s in summaries if s.quality is not None]
    if qualities:
        total.quality = InstructionQuality.summed(qualities)
    total.extra.copy_from(first.extra, drop=("shard", "endpoints", "retries"))
    total.extra.retries = sum(s.extra.retries or 0 for s in summaries)
    total.extra.ray = RayRun(address=address, shards=len(summaries), written=[s.results["written"] for s in summaries])
    total.extra.merge = {**merged.results, **{f"{k}_ids": getattr(merged.extra, k) for k in ("missing", "unexpected")
                                              if k in merged.extra.model_fields_set}}
    return total


def augment(corpus: Sequence[PathLike], out: PathLike, fanout: FanoutConfig, config: AugmentConfig,
            prepare: PrepareConfig | None = None, text_field: str = "text") -> RunSummary:
    """`client.augment.augment` on the cluster `config.ray`, merged into `out` with the proof that the
    shards hold every request of the unsharded run (`extra.merge`: `expected`, `missing`, of them
    `missing_failed` named in a shard's failures)."""
    out = Path(out)
    paths = [c.path for c in open_corpora(corpus, text_field)]  # every file checked before a task starts
    load_demonstrations(config)
    outs, summaries = run_shards(config, out, "augment", augment_mod.augment, lambda shard, journal: (
        paths, journal, fanout, shard_config(config, shard), prepare, text_field))
    merged = merge(outs, out, paths, shard_config(config, None), prepare, text_field)
    total = combined(summaries, merged, config.ray or "")
    total.write(side_path(out, "summary.json"))
    return total


def curate(candidates: PathLike, out: PathLike, fanout: FanoutConfig, config: CurateConfig) -> RunSummary:
    """`client.curate.curate` on the cluster `config.ray`: the shards score, their scored journals are
    merged into the run's, and A_k is selected here from all the scores at once (a local curate run
    whose every score is done: it sends nothing)."""
    out, candidates = Path(out), Path(candidates)
    check_input(candidates)
    decontaminator(config)  # every set read before a task starts
    scored = Path(config.scored) if config.scored is not None else side_path(out, "scored.jsonl")
    # Each shard keeps its terms beside its own scored journal: the shards run at once, and a journal has one writer.
    outs, summaries = run_shards(config, out, f"curate[{config.mode}]", curate_mod.curate, lambda shard, journal: (
        candidates, journal, fanout, shard_config(config, shard, scored=None, terms=None, histogram=False)))
    merged = merge([side_path(o, "scored.jsonl") for o in outs], scored)
    selected = asyncio.run(curate_mod.curate(candidates, out, fanout, shard_config(
        config, None, scored=scored, progress=config.progress)))
    total = combined(summaries, merged, config.ray or "")
    total.extra.copy_from(selected.extra, drop=("retries", "repaired_bytes"))
    total.write(side_path(out, "summary.json"))
    return total


def rewrite(candidates: PathLike, out: PathLike, fanout: FanoutConfig, config: RewriteConfig) -> RunSummary:
    """`client.rewrite.rewrite` on the cluster `config.ray`, merged into `out`."""
    out, candidates = Path(out), Path(candidates)
    check_input(candidates)
    outs, summaries = run_shards(config, out, "rewrite", rewrite_mod.rewrite, lambda shard, journal: (
        candidates, journal, fanout, shard_config(config, shard)))
    total = combined(summaries, merge(outs, out), config.ray or "")
    total.write(side_path(out, "summary.json"))
    return total
