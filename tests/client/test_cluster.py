"""Shards on Ray (`--ray`, client/cluster.py): every shard of a run as a task of a real Ray cluster on
this machine (a head and two worker nodes, `ray.cluster_utils.Cluster`, loopback only), merged into
the run's output with merge's proof. Against the real CPU vLLM servers: augment and curate over a few
hundred segments give the plain run's ids; a worker node killed mid-run loses and duplicates nothing;
a driver killed mid-run resumes when run again. The cluster is stopped at the end of every test."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from client.cluster import combined
from client.extras import AugmentExtra, CurateExtra, InstructionQuality, MergeExtra
from client.runner import RunSummary
from client.shard import Shard, in_shard
from humpback.cli import main
from tests.client.conftest import make_text
from tests.client.fake_server import FakeServer
from tests.conftest import REPO, TEST_API_KEY, ServeInfo, humpback

SEGMENTS = 200  # "a few hundred": enough for every shard to run a while, small for 2 CPU cores
SHARD_JOURNAL = re.compile(r"^\d+-of-\d+\.jsonl$")
T = TypeVar("T")


def _ray_env(tmp: Path) -> dict[str, str]:
    """Ray's files in the test's folder, no usage report, and loopback only: Ray otherwise replaces
    127.0.0.1 by the machine's address, for nodes on other machines (its single-machine mode keeps it)."""
    return {"RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Short: Ray's Unix sockets live below it, and a socket path has at most 107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="hbray", dir="/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cluster(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> Iterator[tuple[object, list[object]]]:
    """A Ray cluster of a head and `workers` worker nodes, one CPU each, on 127.0.0.1; shut down whatever happens."""
    pytest.importorskip("ray", reason="the ray extra is not installed: make setup")
    from ray.cluster_utils import Cluster

    for key, value in _ray_env(ray_tmp).items():
        monkeypatch.setenv(key, value)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    try:
        nodes = [c.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(workers)]
        c.wait_for_nodes()
        yield c, nodes
    finally:
        c.shutdown()


@pytest.fixture
def cluster(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, list[object]]]:
    """A head and two worker nodes."""
    yield from _cluster(ray_tmp, monkeypatch, 2)


@pytest.fixture
def head(ray_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, list[object]]]:
    """A cluster of one node."""
    yield from _cluster(ray_tmp, monkeypatch, 0)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line.strip()]


def _failed_ids(out: Path) -> set[str]:
    failed = out.with_name(out.name.removesuffix(".jsonl") + ".failed.jsonl")
    return set(_ids(failed)) if failed.exists() else set()


def _shard_ids(out: Path) -> set[str]:
    """The written and failed ids of every shard of a Ray run of `out`."""
    folder = out.with_name(out.name.removesuffix(".jsonl") + ".shards")
    ids: set[str] = set()
    for journal in folder.iterdir():
        if SHARD_JOURNAL.match(journal.name):
            ids |= set(_ids(journal)) | _failed_ids(journal)
    return ids


def _scored_so_far(out: Path) -> list[int]:
    """The scores each shard of a Ray curate run of `out` has written so far."""
    return [p.read_bytes().count(b"\n") for p in out.parent.glob(out.stem + ".shards/*-of-*.scored.jsonl")]


def _ancestors(pid: int) -> Iterator[int]:
    while pid > 1:
        yield pid
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return


def _holder(path: Path) -> int | None:
    """The process that holds `path` open (a shard's worker keeps its scored journal open), if any."""
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(path):
                return int(fd.parts[2])
        except OSError:
            continue
    return None


def _worker_shard_under_way(out: Path, workers: list, at_least: int) -> tuple[object, Path, int] | None:
    """A worker node whose shard is still running (its worker holds the scored journal open) and has
    scored `at_least`: its node, journal and count. The shards start seconds apart on two cores and
    each lasts a few seconds, so one chosen once all had begun might be done, its kill interrupting
    nothing."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
    for journal in out.parent.glob(out.stem + ".shards/*-of-*.scored.jsonl"):
        count = journal.read_bytes().count(b"\n")
        if count < at_least or (pid := _holder(journal.resolve())) is None:
            continue
        node = next((raylets[p] for p in _ancestors(pid) if p in raylets), None)
        if node is not None:
            return node, journal, count
    return None


def _held(lock: Path) -> bool:
    """Whether a live process holds the output lock `lock` (a killed one leaves the file, not the lock)."""
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _summary(out: Path) -> dict:
    return json.loads(out.with_name(out.name.removesuffix(".jsonl") + ".summary.json").read_text())


# --- without a model: settings, errors, and a local cluster against the fake server ---------------------


def test_the_shards_summaries_combine_into_the_runs(tmp_path: Path) -> None:
    """`combined` keeps what the shards share, sums their retries, names the cluster and the merge,
    and drops each shard's own name; curate's selection (its last, local step) is copied over it;
    the file holds only the fields set."""
    shards = []
    for i, retries in enumerate((2, 3)):
        s = RunSummary(extra=CurateExtra(model="scorer", mode="logprobs", shard=f"{i}/2", retries=retries,
                                         repaired_bytes=0, contaminated=None))
        s.results.update(written=5 + i, other_shard=6 - i)
        shards.append(s)
    merged = RunSummary(extra=MergeExtra(missing=["a"]))
    merged.results.update(written=11, duplicates=0)
    total = combined(shards, merged, "local")
    selected = RunSummary(extra=CurateExtra(selected=4, k=0.5, retries=0, repaired_bytes=7, bands=None))
    total.extra.copy_from(selected.extra, drop=("retries", "repaired_bytes"))
    total.write(tmp_path / "run.summary.json")
    extra = _summary(tmp_path / "run.jsonl")["extra"]
    assert extra == {"repaired_bytes": 0, "model": "scorer", "retries": 5, "contaminated": None, "mode": "logprobs",
                     "bands": None, "selected": 4, "k": 0.5,
                     "ray": {"address": "local", "shards": 2, "written": [5, 6]},
                     "merge": {"written": 11, "duplicates": 0, "missing_ids": ["a"]}}
    assert total.results["written"] == 11 and "other_shard" not in total.results


def test_the_shards_instruction_quality_is_summed() -> None:
    """augment's quality of a cluster run: every count summed, the rate of all the shards' requests."""
    shards = [RunSummary(extra=AugmentExtra(), quality=InstructionQuality(
        sent=sent, usable=usable, truncated=1, empty=0, copy=i, meta=0, resampled=2, rescued=1,
        usable_rate=usable / sent)) for i, (sent, usable) in enumerate([(10, 9), (30, 15)])]
    total = combined(shards, RunSummary(extra=MergeExtra()), "local")
    assert total.to_dict()["quality"] == {"sent": 40, "usable": 24, "truncated": 2, "empty": 0, "copy": 1, "meta": 0,
                                          "resampled": 4, "rescued": 2, "usable_rate": 0.6}



def test_ray_and_shard_settings_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": make_text(0)}) + "\n")
    argv = ["augment", "--corpus", str(corpus), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert main([*argv, "--ray", "local", "--shard", "0/2"]) == 2
    assert "give --shards N, not --shard I/N" in capsys.readouterr().err
    assert main([*argv, "--shards", "2"]) == 2
    assert "give --ray ADDRESS too" in capsys.readouterr().err


def test_a_missing_ray_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ModuleNotFoundError
    cands = tmp_path / "cands.jsonl"
    cands.write_text(json.dumps({"instruction": "Why?", "output": make_text(0)}) + "\n")
    out = tmp_path / "curated.jsonl"
    assert main(["curate", "--candidates", str(cands), "--out", str(out), "--ray", "auto", "--no-decontaminate"]) == 2
    err = capsys.readouterr().err
    assert "humpback: error: --ray needs Ray, the ray extra: pip install 'humpback[ray]'" in err
    assert "Traceback" not in err and not out.exists()


def test_an_unreachable_cluster_is_exit_status_5(tmp_path: Path, ray_tmp: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed: make setup")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": make_text(0)}) + "\n")
    r = humpback("augment", "--corpus", str(corpus), "--out", str(tmp_path / "o.jsonl"), "--no-progress",
                 "--ray", "127.0.0.1:1", check=False, timeout=120, env=_ray_env(ray_tmp))
    assert r.returncode == 5, r.stderr[-2000:]
    assert "cannot reach the Ray cluster" in r.stderr and "Traceback" not in r.stderr


def test_a_local_cluster_runs_the_shards_and_merges_them(tmp_path: Path, ray_tmp: Path, head) -> None:
    """`--ray local` (a cluster of this machine's cores, started for the run) against the fake server: the
    merged output is the plain run's, each shard did its own requests; on a running cluster, a re-run
    resumes every shard (nothing asked again), and rewrite runs there too."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": make_text(i)}) + "\n" for i in range(40)))
    fake = FakeServer().start()
    try:
        common = ["--corpus", str(corpus), "--endpoint", fake.url]
        humpback("augment", *common, "--out", str(tmp_path / "plain.jsonl"), "--no-progress")
        asked = fake.requests["/v1/chat/completions"]
        out = tmp_path / "ray" / "cands.jsonl"
        r = humpback("augment", *common, "--out", str(out), "--ray", "local", "--shards", "3", check=False,
                     timeout=300, env=_ray_env(ray_tmp))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "augment on ray (3 shards)" in r.stderr and "shards_done=3/3" in r.stderr  # one bar over all
        assert fake.requests["/v1/chat/completions"] - asked == 40  # each request asked by one shard only
        assert sorted(out.read_text().splitlines()) == sorted((tmp_path / "plain.jsonl").read_text().splitlines())
        summary = _summary(out)
        assert summary["results"]["written"] == 40 and "other_shard" not in summary["results"]
        assert summary["input"]["records"] == 40  # the input once, though every shard read it
        assert summary["extra"]["merge"]["expected"] == 40 and summary["extra"]["merge"]["missing"] == 0
        assert summary["extra"]["ray"]["shards"] == 3 and sum(summary["extra"]["ray"]["written"]) == 40
        for i, journal in enumerate(sorted(out.parent.glob("cands.shards/*-of-3.jsonl"))):
            assert all(in_shard(cid, Shard(i, 3)) for cid in _ids(journal))
        again = humpback("augment", *common, "--out", str(out), "--ray", head[0].address, "--shards", "3", check=False,
                         timeout=300, env=_ray_env(ray_tmp))
        assert again.returncode == 0, again.stderr[-3000:]
        assert fake.requests["/v1/chat/completions"] - asked == 40
        assert _summary(out)["results"]["skipped_done"] == 40 and len(_ids(out)) == 40
        # rewrite the candidates on the cluster: one rewrite per pair, merged once.
        rewritten = tmp_path / "ray" / "rewritten.jsonl"
        r = humpback("rewrite", "--candidates", str(out), "--out", str(rewritten), "--endpoint", fake.url,
                     "--no-progress", "--ray", head[0].address, check=False, timeout=300, env=_ray_env(ray_tmp))
        assert r.returncode == 0, r.stderr[-3000:]
        assert {json.loads(x)["candidate_id"] for x in rewritten.read_text().splitlines()} == set(_ids(out))
        assert _summary(rewritten)["extra"]["merge"]["written"] == 40
    finally:
        fake.stop()


# --- a real cluster (head + two worker nodes) against the real CPU vLLM servers ------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "humpback", *args]


def _env(ray_tmp: Path) -> dict[str, str]:
    return {**os.environ, **_ray_env(ray_tmp), "HUMPBACK_API_KEY": TEST_API_KEY}


def _augment_argv(servers: ServeInfo, corpus: Path, out: Path) -> list[str]:
    # Greedy decoding: a request's answer, and so whether it is usable, does not depend on the run. Short
    # segments and answers keep the run short on 2 busy cores: many instructions are cut at the cap and
    # fail (each in a failures file), which the id checks count as answered, not lost.
    return ["augment", "--corpus", str(corpus), "--out", str(out), "--endpoint", servers.backward_url,
            "--model", servers.backward_model, "--temperature", "0", "--max-tokens", "12", "--min-chars", "100",
            "--no-progress"]


def _curate_argv(servers: ServeInfo, pairs: Path, out: Path) -> list[str]:
    # One token per request, every request a record: the runs the kills interrupt.
    return ["curate", "--candidates", str(pairs), "--out", str(out), "--endpoint", servers.scorer_url,
            "--model", servers.scorer_model, "--no-decontaminate", "--min-score", "3", "--no-histogram",
            "--no-progress"]


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("ray_corpus") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": make_text(i, 250)}) + "\n" for i in range(SEGMENTS)))
    return corpus


@pytest.fixture(scope="module")
def pairs(segments: Path) -> Path:
    """A candidates file of a pair per segment, for curate."""
    out = segments.with_name("pairs.jsonl")
    texts = [json.loads(line)["text"] for line in segments.read_text().splitlines()]
    out.write_text("".join(json.dumps({"instruction": f"What does {t.split(':')[0].lower()} say?", "output": t})
                           + "\n" for t in texts))
    return out


@pytest.fixture(scope="module")
def plain_curated(servers: ServeInfo, pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The curate run without Ray that every Ray run must match: its curated set (scored journal beside it)."""
    out = tmp_path_factory.mktemp("ray_plain") / "A.jsonl"
    r = humpback(*_curate_argv(servers, pairs, out), check=False, env={"HUMPBACK_API_KEY": TEST_API_KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _scored(curated: Path) -> Path:
    return curated.with_name(curated.name.removesuffix(".jsonl") + ".scored.jsonl")


def _run_until(argv: list[str], out: Path, env: dict[str, str], ready: Callable[[], T | None],
               what: str) -> tuple[subprocess.Popen, T]:
    """The CLI started on `argv`, returned with what `ready()` gave once it gave something (polled)."""
    log = out.with_name("driver.log")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(_cli(*argv), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 240
    while (found := ready()) is None:
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no progress in 240 s"
        time.sleep(0.05)
    return proc, found


def _run_until_scored(argv: list[str], out: Path, env: dict[str, str], shards: int,
                      at_least: int) -> subprocess.Popen:
    """The curate CLI started, returned once each of its `shards` shards has written `at_least` scores
    (mid-run: every shard has a journal to resume from)."""
    def ready() -> bool | None:
        done = _scored_so_far(out)
        return True if len(done) == shards and min(done) >= at_least else None

    return _run_until(argv, out, env, ready, f"{at_least} scores per shard")[0]


def _check_curated(out: Path, plain: Path) -> dict:
    """The Ray run's scored journal holds every score of the plain run once (0 lost, 0 duplicated)."""
    ids = _ids(_scored(out))
    assert len(ids) == len(set(ids)) == SEGMENTS
    assert set(ids) == set(_ids(_scored(plain)))
    summary = _summary(out)
    assert summary["extra"]["merge"]["duplicates"] == 0 and summary["extra"]["merge"]["written"] == SEGMENTS
    assert summary["extra"]["scored_total"] == SEGMENTS and summary["input"]["records"] == SEGMENTS
    return summary


@pytest.mark.server
def test_augment_and_curate_on_a_cluster_give_the_plain_runs_ids(servers: ServeInfo, cluster, segments: Path,
                                                                 pairs: Path, plain_curated: Path,
                                                                 tmp_path: Path, ray_tmp: Path) -> None:
    c, _ = cluster
    plain = tmp_path / "plain.jsonl"
    here = subprocess.run(_cli(*_augment_argv(servers, segments, plain)), cwd=REPO, env=_env(ray_tmp),
                          capture_output=True, text=True, timeout=300)
    assert here.returncode in (0, 3), here.stderr[-3000:]
    out = tmp_path / "cands.jsonl"
    r = subprocess.run(_cli(*_augment_argv(servers, segments, out), "--ray", c.address, "--shards", "4"), cwd=REPO,
                       env=_env(ray_tmp), capture_output=True, text=True, timeout=300)
    assert r.returncode == here.returncode, r.stderr[-3000:]
    ids = _ids(out)
    assert len(ids) == len(set(ids))  # 0 duplicated
    assert set(ids) == set(_ids(plain))  # greedy: the same requests gave candidates
    assert set(ids) | _shard_ids(out) == set(_ids(plain)) | _failed_ids(plain)  # 0 lost
    summary = _summary(out)
    merge = summary["extra"]["merge"]
    assert (merge["expected"], merge["missing"], merge["unexpected"]) == (SEGMENTS, len(_failed_ids(plain)), 0)
    assert merge["missing_failed"] == merge["missing"]  # every request not in the output failed, and says why
    assert summary["results"].get("written", 0) == len(ids) and summary["extra"]["ray"]["shards"] == 4
    assert summary["input"]["records"] == SEGMENTS

    on_ray = subprocess.run(_cli(*_curate_argv(servers, pairs, tmp_path / "A.jsonl"), "--ray", c.address), cwd=REPO,
                            env=_env(ray_tmp), capture_output=True, text=True, timeout=300)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    summary = _check_curated(tmp_path / "A.jsonl", plain_curated)
    assert summary["extra"]["ray"]["shards"] == 3  # the cluster's CPUs
    assert summary["results"]["written"] == SEGMENTS
    # The same set selected (up to float noise of batched scoring right at the threshold).
    assert abs(summary["extra"]["selected"] - _summary(plain_curated)["extra"]["selected"]) <= 2


@pytest.mark.server
def test_a_worker_node_killed_mid_run_loses_and_duplicates_nothing(servers: ServeInfo, cluster, pairs: Path,
                                                                  plain_curated: Path, tmp_path: Path,
                                                                  ray_tmp: Path) -> None:
    c, workers = cluster
    out = tmp_path / "A.jsonl"
    argv = [*_curate_argv(servers, pairs, out), "--ray", c.address, "--shards", "3"]
    proc, (node, journal, at_kill) = _run_until(argv, out, _env(ray_tmp),
                                                lambda: _worker_shard_under_way(out, workers, at_least=4),
                                                "a worker's shard was under way")
    try:
        c.remove_node(node)  # its shard dies with it and runs again on another node
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out.with_name("driver.log").read_text()[-3000:]
    summary = _check_curated(out, plain_curated)
    # The lost shard resumed from the journal it had written before the kill: what it had is not asked again.
    assert at_kill < journal.read_bytes().count(b"\n")  # the kill interrupted that shard
    assert summary["results"]["already_done"] >= at_kill - 1  # less a line the kill may have torn
    assert summary["results"]["written"] + summary["results"]["already_done"] == SEGMENTS


@pytest.mark.server
def test_a_killed_driver_resumes_every_shard_when_run_again(servers: ServeInfo, cluster, pairs: Path,
                                                            plain_curated: Path, tmp_path: Path,
                                                            ray_tmp: Path) -> None:
    c, _ = cluster
    out = tmp_path / "A.jsonl"
    argv = [*_curate_argv(servers, pairs, out), "--ray", c.address, "--shards", "3"]
    proc = _run_until_scored(argv, out, _env(ray_tmp), shards=3, at_least=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Ray ends a dead driver's tasks; each shard's lock goes with its worker.
    deadline = time.monotonic() + 60
    while any(map(_held, out.parent.glob("A.shards/*.lock"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    before = sum(p.read_bytes().count(b"\n") for p in out.parent.glob("A.shards/*-of-3.scored.jsonl"))
    again = subprocess.run(_cli(*argv), cwd=REPO, env=_env(ray_tmp), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = _check_curated(out, plain_curated)
    assert summary["results"]["already_done"] == before > 0  # nothing scored before the kill was asked again
    assert summary["results"]["written"] == SEGMENTS - before
