"""Benchmark of the model services: cold start, hot-swap stall under load, failed requests, RSS.

    .venv/bin/python bench/bench_serve.py [--concurrency 32]

Starts its own stack on ports 18101/18102 (state in a temp dir), so it measures `humpback serve up`
from nothing, then swaps a perturbed copy of the model into the scorer while N chat requests are in
flight, and compares the stall with what a restart-based swap would cost (the cold start of one
server, measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.hotswap import swap_checkpoint  # noqa: E402
from services.supervisor import process_info  # noqa: E402
from tests.services.helpers import perturbed_checkpoint  # noqa: E402

MODEL = REPO / "models" / "smollm2-135m-instruct"
PORTS = {"backward": 18101, "scorer": 18102}


def humpback(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "humpback", *args], cwd=REPO, check=True)


def rss_gb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e9


async def load_during_swap(url: str, n: int, ckpt: Path, state: Path) -> tuple[float, int, float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        async def one(i: int) -> bool:
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": "scorer", "messages": [{"role": "user", "content": f"Tell me about {i}."}],
                "max_tokens": 64, "ignore_eos": True})
            return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] != "abort"

        start = time.monotonic()
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(2)
        result = await asyncio.to_thread(swap_checkpoint, url, ckpt, role="scorer", version="bench",
                                         registry=state / "registry.json")
        ok = await asyncio.gather(*tasks)
        return result.stall_s, ok.count(False), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "serve"
        t0 = time.monotonic()
        humpback("serve", "up", "--state-dir", str(state), "--backward-port", str(PORTS["backward"]),
                 "--scorer-port", str(PORTS["scorer"]))
        cold = time.monotonic() - t0
        try:
            pids = {name: info["pid"] for name, info in process_info(state).items()}
            rss = {role: rss_gb(pid) for role, pid in pids.items()}
            ckpt = perturbed_checkpoint(MODEL, Path(tmp) / "ckpt")
            stall, failed, wall = asyncio.run(
                load_during_swap(f"http://127.0.0.1:{PORTS['scorer']}", args.concurrency, ckpt, state))
            rss_after = {role: rss_gb(pid) for role, pid in pids.items()}
        finally:
            humpback("serve", "down", "--state-dir", str(state))
    rows = [
        ("cold start, both servers (s)", f"{cold:.1f}"),
        (f"hot-swap stall, {args.concurrency} requests in flight (s)", f"{stall:.2f}"),
        ("failed requests during the swap", str(failed)),
        (f"wall time of the {args.concurrency} requests (s)", f"{wall:.1f}"),
        ("stall / cold start (a restart-based swap)", f"{stall / cold:.3f}"),
        *[(f"RSS {role} (GB, after start / after swap)", f"{rss[role]:.2f} / {rss_after[role]:.2f}") for role in rss],
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric'.ljust(width)}  value\n{'-' * width}  -----")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
