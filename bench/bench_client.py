"""Benchmarks of the augmentation client, measured side by side in one run; prints a markdown table.

    python -m bench.bench_client                       # everything (needs the two CPU servers)
    python -m bench.bench_client --only overhead       # client overhead only (no model needed)

1. augment throughput vs the same model offline (`LLM.chat`, same prompts and sampling), default settings;
2. the same vs the usual `openai.AsyncOpenAI` + semaphore script at concurrency 8 and 64;
3. client overhead against an instant fake server: requests/s on one core (and a bare
   `httpx.AsyncClient` loop beside it), peak RSS over a long stream;
4. curation pairs/s of every scorer, side by side: the rubric in log-probability mode and in free-text
   mode (with its parse rate), and the likelihood scorers pmi, reverse_pmi (the backward server
   serves the reverse terms) and combined (both; its combiner fitted on the candidates' first half,
   a stand-in: the throughput does not depend on the weights), each as a ratio to the logprobs rubric.
5. augment with `--ray local` (every shard a Ray task on this machine's cores) vs the plain client on
   the same segments: wall time, Ray's start and the merge included (`--only ray`; the ray extra).

Every throughput run gets texts tagged with its own run id, so no run reuses another's prefix cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def real_segments(n: int) -> list[str]:
    """`n` prepared segments of real prose: pip's docs (test data) then installed packages' READMEs."""
    sys.path.insert(0, str(ROOT))
    from client.corpus import Corpus
    from client.prepare import Preparer
    from humpback.contracts import Segment, Source

    prep = Preparer()
    out: list[str] = []
    for doc in Corpus(ROOT / "tests" / "client" / "data" / "pip_docs.jsonl"):
        if isinstance(doc, Segment):
            out += [s.text for s in prep(doc)]
    for meta in sorted(SITE.glob("*.dist-info/METADATA")):
        if len(out) >= n:
            break
        body = meta.read_text(encoding="utf-8", errors="replace").partition("\n\n")[2]
        if body.strip():
            out += [s.text for s in prep(Segment(text=body, source=Source(path=str(meta), line=1)))]
    return out[:n]


def tagged(texts: list[str], run: str) -> list[str]:
    return [f"[{run}] {t}" for t in texts]


def write_corpus(texts: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# --- 1. client vs offline ---------------------------------------------------------------------------

def bench_offline(texts: list[str], model_dir: str, max_tokens: int, tmp: Path) -> dict[str, Any]:
    from humpback.contracts import AUGMENT_TEMPERATURE, AUGMENT_TOP_P, backward_messages

    prompts = tmp / "offline_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": backward_messages(t)}) + "\n" for t in texts))
    cmd = [sys.executable, str(ROOT / "bench" / "_offline_generate.py"), "--model", model_dir, "--prompts",
           str(prompts), "--max-tokens", str(max_tokens), "--temperature", str(AUGMENT_TEMPERATURE),
           "--top-p", str(AUGMENT_TOP_P)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if not m:
        raise RuntimeError(f"offline run failed:\n{proc.stderr[-3000:]}")
    r = json.loads(m.group(1))
    return {"n": r["n"], "elapsed": r["elapsed"], "rate": r["n"] / r["elapsed"], "tokens": r["tokens"],
            "tok_rate": r["tokens"] / r["elapsed"]}


def _fanout(url: str) -> Any:
    """The client's settings for `url`, with the servers' key where they have one (HUMPBACK_API_KEY)."""
    from client.fanout import FanoutConfig
    from humpback.contracts import API_KEY_ENV

    return FanoutConfig(endpoints=[url], api_key=os.environ.get(API_KEY_ENV))


def _no_preparation() -> Any:
    """Every text as it is: the throughput runs measure requests, not preparation."""
    from client.prepare import PrepareConfig

    return PrepareConfig(segment=False, min_chars=1, max_chars=10**9, boilerplate=False, repetition=False,
                         dedup_exact=False, dedup_near=False)


async def bench_client(texts: list[str], url: str, model: str, max_tokens: int, tmp: Path, run: str) -> dict[str, Any]:
    from client.augment import AugmentConfig, augment

    corpus = write_corpus(texts, tmp / f"{run}.jsonl")
    t0 = time.perf_counter()
    s = await augment([corpus], tmp / f"{run}.out.jsonl", _fanout(url),
                      AugmentConfig(model=model, max_tokens=max_tokens, progress=False), _no_preparation())
    elapsed = time.perf_counter() - t0
    n = s.results["written"] + s.results["failed"]
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "written": s.results["written"],
            "tokens": s.results["completion_tokens"], "tok_rate": s.results["completion_tokens"] / elapsed,
            "window": list(s.extra.endpoints.values())[0].window}


async def bench_openai(texts: list[str], url: str, model: str, max_tokens: int, concurrency: int) -> dict[str, Any]:
    """The usual script: AsyncOpenAI + asyncio.Semaphore + gather."""
    from openai import AsyncOpenAI

    from humpback.contracts import AUGMENT_TEMPERATURE, AUGMENT_TOP_P, backward_messages

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=3, timeout=600)
    sem = asyncio.Semaphore(concurrency)

    tokens = 0

    async def one(text: str) -> str:
        nonlocal tokens
        async with sem:
            r = await client.chat.completions.create(model=model, messages=backward_messages(text),  # type: ignore[arg-type]
                                                     temperature=AUGMENT_TEMPERATURE, top_p=AUGMENT_TOP_P,
                                                     max_tokens=max_tokens)
            tokens += r.usage.completion_tokens if r.usage else 0
            return r.choices[0].message.content or ""

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(t) for t in texts))
    elapsed = time.perf_counter() - t0
    await client.close()
    return {"n": len(outs), "elapsed": elapsed, "rate": len(outs) / elapsed, "tokens": tokens,
            "tok_rate": tokens / elapsed}


def bench_ray(texts: list[str], url: str, model: str, max_tokens: int, tmp: Path) -> dict[str, Any]:
    """`bench_client`'s run with `--ray local`: a Ray cluster of this machine's cores started for the run,
    one shard per core, merged with merge's proof; the wall time includes all of it."""
    from client import cluster
    from client.augment import AugmentConfig

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (see tests/client/test_cluster.py)
    corpus = write_corpus(texts, tmp / "ray.jsonl")
    t0 = time.perf_counter()
    s = cluster.augment([corpus], tmp / "ray.out.jsonl", _fanout(url),
                        AugmentConfig(model=model, max_tokens=max_tokens, progress=False, ray="local"),
                        _no_preparation())
    elapsed = time.perf_counter() - t0
    n = s.results["written"] + s.results["failed"]
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "written": s.results["written"],
            "shards": s.extra.ray.shards, "missing": s.extra.merge["missing"]}


# --- 3. overhead ------------------------------------------------------------------------------------

def _wait_listening(port: int, timeout: float = 60.0) -> None:
    """Wait until the fake server accepts connections (a fixed sleep is too short on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def bench_overhead(n: int, tmp: Path) -> dict[str, Any]:
    """The real CLI in a subprocess pinned to core 0, the fake server pinned to core 1."""
    sys.path.insert(0, str(ROOT))
    from tests.client.fake_server import free_port

    corpus = tmp / "overhead.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(n):  # distinct ~700-character segments, cheap to generate
            f.write(json.dumps({"text": f"Segment {i}. " + f"Line {i} of a synthetic web page. " * 21}) + "\n")
    port = free_port()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = {cpus[-1]}, {cpus[0]}
    server = subprocess.Popen([sys.executable, "-m", "tests.client.fake_server", "--port", str(port)], cwd=ROOT,
                              preexec_fn=lambda: os.sched_setaffinity(0, server_cpu))
    try:
        _wait_listening(port)
        out = tmp / "overhead.out.jsonl"
        # Exact dedup on (it is part of the default stream path); near dedup and the repetition rule off:
        # they are corpus preparation, measured separately below.
        cmd = [sys.executable, "-m", "humpback", "augment", "--corpus", str(corpus), "--out", str(out),
               "--endpoint", f"http://127.0.0.1:{port}", "--no-progress", "--no-near-dedup",
               "--no-repetition-filter", "--fsync", "interval"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: os.sched_setaffinity(0, client_cpu))
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        summary = json.loads((tmp / "overhead.out.summary.json").read_text())
        written = summary["results"].get("written", 0)
        cpu = usage.ru_utime + usage.ru_stime
        # The same server and core for a bare httpx loop, 64 in flight (requests only, no corpus).
        bare_n = min(n, 200_000)
        bare = json.loads(subprocess.run(
            [sys.executable, str(ROOT / "bench" / "_bare_http.py"), "--url", f"http://127.0.0.1:{port}", "-n",
             str(bare_n)], cwd=ROOT, check=True, capture_output=True, text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, client_cpu)).stdout)
        return {"n": n, "written": written, "elapsed": elapsed, "client_s": summary["elapsed_s"],
                "rate": written / summary["elapsed_s"], "cpu_rate": written / cpu, "peak_rss_mb": usage.ru_maxrss / 1024,
                "cpu_s": cpu, "rc": os.waitstatus_to_exitcode(status),
                "bare_n": bare_n, "bare_cpu_rate": bare_n / bare["cpu_s"]}
    finally:
        server.terminate()
        server.wait()


def bench_prepare(n: int) -> dict[str, Any]:
    """Preparation cost per segment with every rule on (near-dedup MinHash included), one core."""
    import random

    from client.prepare import Preparer
    from humpback.contracts import Segment, Source

    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(5000)]

    def text() -> str:  # distinct, non-repetitive ~1,200-character prose, so every rule runs in full
        sents = [" ".join(rng.choices(vocab, k=12)).capitalize() + "." for _ in range(12)]
        return " ".join(sents)

    prep = Preparer()
    docs = [Segment(text=text(), source=Source(path="x", line=i)) for i in range(n)]
    t0 = time.perf_counter()
    kept = sum(1 for d in docs for _ in prep(d))
    return {"n": n, "kept": kept, "rate": n / (time.perf_counter() - t0)}


# --- 4. curation ------------------------------------------------------------------------------------

async def bench_curate(cands: Path, url: str, model: str, scorer: str, n: int, tmp: Path,
                       backward: str | None = None, calibration: Path | None = None) -> dict[str, Any]:
    """Curate the first `n` candidates with `scorer` ("logprobs" and "free_text": the rubric's modes)."""
    from client.curate import CurateConfig, curate

    few = tmp / f"cands_{scorer}.jsonl"
    few.write_text("".join(cands.read_text().splitlines(keepends=True)[:n]))
    rubric = scorer in ("logprobs", "free_text")
    cfg = CurateConfig(model=model, scorer="rubric" if rubric else scorer, mode=scorer if rubric else "logprobs",
                       backward_endpoint=backward, calibration=calibration, top_fraction=None if rubric else 0.25,
                       progress=False, histogram=False, decontaminate=False)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    s = await curate(few, tmp / f"curated_{scorer}.jsonl", _fanout(url), cfg)
    elapsed = time.perf_counter() - t0
    return {"n": s.extra.scored_total, "elapsed": elapsed, "rate": s.extra.scored_total / elapsed,
            "parse_rate": s.extra.parse_rate, "failed": s.results.get("failed", 0)}


def stand_in_combiner(path: Path) -> Path:
    """A combiner with fixed weights (the summed forward PMI and 5 x log length, the issue's best row):
    what `combined` costs does not depend on its weights."""
    sys.path.insert(0, str(ROOT))
    from client.calibration import FEATURES, Combiner

    Combiner(features=list(FEATURES), mean=[0.0] * len(FEATURES), scale=[1.0] * len(FEATURES),
             coef=[1.0, 0.0, 0.0, 0.0, 5.0], intercept=0.0, data="bench stand-in", pairs=0, negatives={},
             pair_ids=[], scorer_model="scorer", backward_endpoint="").write(path)
    return path


def wait_healthy(url: str, timeout: float = 600) -> None:
    """Servers on a shared machine get restarted: wait for /health before each measurement."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} is not healthy")


def served_root(url: str) -> str:
    """The weights folder the server serves (the offline run must load the same)."""
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["root"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="augment,overhead,curate",
                    help="comma list of: augment, overhead, curate, ray (the ray extra)")
    ap.add_argument("--segments", type=int, default=200, help="real segments per throughput run")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--overhead-n", type=int, default=1_000_000, help="segments streamed through the fake server")
    ap.add_argument("--curate-n", type=int, default=64, help="pairs per curation scorer")
    ap.add_argument("--backward", default="http://127.0.0.1:8001")
    ap.add_argument("--scorer", default="http://127.0.0.1:8002")
    ap.add_argument("--model-dir", default=None, help="offline model (default: what the backward server serves)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    a = ap.parse_args()
    only = set(a.only.split(","))
    rows: list[tuple[str, str, str]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if only & {"augment", "curate", "ray"}:
            texts = real_segments(a.segments)
        if "augment" in only:
            wait_healthy(a.backward)
            model_dir = a.model_dir or served_root(a.backward)
            raw["client"] = asyncio.run(bench_client(tagged(texts, "client"), a.backward, "backward",
                                                     a.max_tokens, tmp, "client"))
            print("client", raw["client"], flush=True)
            wait_healthy(a.backward)
            raw["openai64"] = asyncio.run(bench_openai(tagged(texts, "oai64"), a.backward, "backward", a.max_tokens, 64))
            print("openai64", raw["openai64"], flush=True)
            wait_healthy(a.backward)
            raw["openai8"] = asyncio.run(bench_openai(tagged(texts, "oai8"), a.backward, "backward", a.max_tokens, 8))
            print("openai8", raw["openai8"], flush=True)
            raw["offline"] = bench_offline(tagged(texts, "offline"), model_dir, a.max_tokens, tmp)
            raw["offline"]["model_dir"] = model_dir
            print("offline", raw["offline"], flush=True)
            c, ct = raw["client"]["rate"], raw["client"]["tok_rate"]
            rows.append(("augment: humpback client (defaults): segments/s, tokens/s", f"{c:.2f}, {ct:.0f}", "1.00"))
            for key, name in (("offline", "offline `LLM.chat`"), ("openai64", "AsyncOpenAI + semaphore(64)"),
                              ("openai8", "AsyncOpenAI + semaphore(8)")):
                r = raw[key]
                rows.append((f"augment: {name}: segments/s, tokens/s", f"{r['rate']:.2f}, {r['tok_rate']:.0f}",
                             f"client/{key} = {c / r['rate']:.2f} (segments), {ct / r['tok_rate']:.2f} (tokens)"))
        if "overhead" in only:
            raw["overhead"] = o = bench_overhead(a.overhead_n, tmp)
            raw["prepare"] = p = bench_prepare(20_000)
            rows += [
                (f"overhead: requests per client CPU-second, instant fake server ({o['n']:,} segments)",
                 f"{o['cpu_rate']:,.0f}", f"target >= 2,000; client/httpx = {o['cpu_rate'] / o['bare_cpu_rate']:.2f}"),
                (f"overhead: bare `httpx.AsyncClient` loop, 64 in flight, same core and server "
                 f"({o['bare_n']:,} requests)",
                 f"{o['bare_cpu_rate']:,.0f}", ""),
                ("overhead: requests/s wall clock, client pinned to one core", f"{o['rate']:,.0f}", ""),
                (f"overhead: peak RSS over the {o['n']:,}-segment stream (MB)", f"{o['peak_rss_mb']:.0f}",
                 "target < 300"),
                ("prepare: segments/s with every rule on (near-dedup incl.), one core", f"{p['rate']:,.0f}", ""),
            ]
        if "curate" in only:
            cands = tmp / "cands.jsonl"
            if "client" not in raw:
                asyncio.run(bench_client(tagged(texts, "cur"), a.backward, "backward", a.max_tokens, tmp, "cur"))
                cands = tmp / "cur.out.jsonl"
            else:
                cands = tmp / "client.out.jsonl"
            wait_healthy(a.scorer)
            combiner = stand_in_combiner(tmp / "combiner.json")
            for scorer in ("logprobs", "free_text", "pmi", "reverse_pmi", "combined"):
                wait_healthy(a.scorer)
                raw[scorer] = asyncio.run(bench_curate(cands, a.scorer, "scorer", scorer, a.curate_n, tmp, a.backward,
                                                       combiner))
                print(scorer, raw[scorer], flush=True)
            lp = raw["logprobs"]
            for scorer, name in (("logprobs", "rubric, log-probability mode"), ("free_text", "rubric, free-text mode"),
                                 ("pmi", "pmi (forward)"), ("reverse_pmi", "reverse_pmi (backward model)"),
                                 ("combined", "combined (both)")):
                r = raw[scorer]
                note = f"parse rate {r['parse_rate']:.0%}" if r["parse_rate"] is not None else f"failed {r['failed']}"
                rows.append((f"curate: {name} pairs/s", f"{r['rate']:.2f}",
                             f"{scorer}/logprobs = {r['rate'] / lp['rate']:.2f}; {note}"))
        if "ray" in only:
            wait_healthy(a.backward)  # the plain client, then the same segments (tagged anew) on Ray, back to back
            raw["ray_plain"] = p = asyncio.run(bench_client(tagged(texts, "rayplain"), a.backward, "backward",
                                                            a.max_tokens, tmp, "rayplain"))
            print("ray_plain", p, flush=True)
            wait_healthy(a.backward)
            raw["ray"] = r = bench_ray(tagged(texts, "ray"), a.backward, "backward", a.max_tokens, tmp)
            print("ray", r, flush=True)
            rows += [
                (f"ray: augment, plain client: wall s ({p['n']} segments)", f"{p['elapsed']:.1f}", ""),
                (f"ray: augment `--ray local`, {r['shards']} shards, Ray's start and the merge included: wall s",
                 f"{r['elapsed']:.1f}", f"ray/plain = {r['elapsed'] / p['elapsed']:.2f} (target <= 1.15)"),
            ]
    print("\n| measurement | value | ratio / target |\n|---|---|---|")
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")
    print("\nraw: " + json.dumps(raw))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
