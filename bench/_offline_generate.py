"""Offline vLLM baseline for bench_client: `LLM.chat` on the same prompts and sampling settings.

Run as a subprocess (the engine spawns processes and holds memory we want back); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL of {'messages': [...]}")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, required=True)
    ap.add_argument("--top-p", type=float, required=True)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams

    convs = [json.loads(x)["messages"] for x in open(a.prompts, encoding="utf-8")]
    llm = LLM(model=a.model, dtype="bfloat16", max_model_len=2048, kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens)
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"n": len(outs), "elapsed": elapsed, "tokens": tokens}), flush=True)
