"""Bare-HTTP baseline for bench_client's overhead: the usual `httpx.AsyncClient` loop, 64 in flight,
POSTing one fixed chat body to the fake server; no corpus, no records, no journal. Run pinned to one
core as a subprocess; prints one JSON line with its CPU seconds."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource

import httpx


async def run(url: str, n: int, concurrency: int) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "Segment. " + "A line of a web page. " * 30}],
            "temperature": 0.7, "top_p": 0.9, "max_tokens": 256}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    left = iter(range(n))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker() -> None:  # `concurrency` workers, not n tasks: 200k live tasks slow the GC
            for _ in left:
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    asyncio.run(run(a.url, a.n, a.concurrency))
    u = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"n": a.n, "cpu_s": u.ru_utime + u.ru_stime}))
