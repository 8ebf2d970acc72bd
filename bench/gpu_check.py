"""The trainer's jobs on a GPU, checked in minutes: `bench/gpu_check.sh` runs this (see there).

For each method the trainer has (LoRA in bf16, full fine-tuning in fp32: trainer/train.py), one job of
the trainer's own code (`trainer.train.run`, the process the service starts) on the demo model, each in
a process of its own so its peak memory is its own; then its exported, merged weights are loaded back
and asked for a few tokens. Prints one table: steps, tokens trained, training seconds, tokens/s, peak
memory, the merge-and-export time and whether the export loads and generates.

    python bench/gpu_check.py [--device cuda|cpu] [--steps 20] [--max-length 512] [--batch 8] [--model DIR]

Where the model folder holds no weights (a machine the 269 MB of weights did not travel to), the demo
model's architecture is built from its config.json with random weights: tokens/s and memory are the
model's, the loss is not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from humpback.contracts import (  # noqa: E402
    DEFAULT_MODEL_DIR, SEED_SYSTEM_PROMPT, ChatExample, tagged_example, write_jsonl,
)
from trainer.config import PRESETS  # noqa: E402

METHODS = {"lora": "paper-lora", "full": "paper"}


def examples(n: int) -> list[ChatExample]:
    """`n` chat examples whose responses are the repository's documentation paragraphs (real prose of
    varied length), each asked to be explained: throughput needs real token counts, not a good loss."""
    paragraphs = [p.strip() for doc in sorted((REPO / "docs").glob("*.md"))
                  for p in doc.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 300]
    return [tagged_example(f"Explain this part of the humpback documentation ({i}).", paragraphs[i % len(paragraphs)],
                           SEED_SYSTEM_PROMPT) for i in range(n)]


def base_model(folder: Path, out: Path) -> tuple[Path, str]:
    """The folder to fine-tune, and where its weights came from."""
    if any(folder.glob("*.safetensors")):
        return folder, "trained weights"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out, "random weights (config.json only)"


def job(spec_path: Path) -> int:
    """One training run (the trainer's), then its peak memory as the last event line."""
    import resource

    import torch

    from trainer.train import TrainSpec, event_stream, run

    spec = TrainSpec.model_validate_json(spec_path.read_text())
    events = event_stream()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run(spec, events)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    events.write(json.dumps({"type": "peak_memory", "bytes": peak}) + "\n")
    events.flush()
    return 0


def load_back(folder: Path, device: str) -> str:
    """Whether the exported folder loads with transformers and generates, as a server would use it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is a whale?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(device)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return "yes" if out.shape[-1] > ids["input_ids"].shape[-1] else "no tokens"


def check(args: argparse.Namespace) -> list[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    model, weights = base_model(args.model, work / "base")
    data = work / "train.jsonl"
    write_jsonl(data, examples(args.batch * args.steps))
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    for method, preset in METHODS.items():
        spec = PRESETS[preset].model_dump() | {
            "base_model": str(model), "training_file": str(data), "output_dir": str(work / method / "ckpt"),
            "export_dir": str(work / method / "final"), "seed": 0, "batch_size": args.batch,
            "micro_batch_size": args.batch, "max_steps": args.steps, "max_length": args.max_length,
            "save_steps": args.steps}
        spec_path = work / f"{method}.json"
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__)), "--job", str(spec_path)], env=env,
                              capture_output=True, text=True)
        wall, ended = time.perf_counter() - started, time.time()
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not any(e["type"] == "exported" for e in events):
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append({"method": method, "error": f"exit {proc.returncode}"})
            continue
        finished = next(e for e in events if e.get("message", "").startswith("Training finished"))["data"]
        metrics = [e for e in events if e["type"] == "metrics"]
        peak = next(e["bytes"] for e in events if e["type"] == "peak_memory")
        loaded = load_back(work / method / "final", "cuda" if args.device == "cuda" else "cpu")
        rows.append({"method": method, "dtype": "bf16" if method == "lora" else "fp32", "steps": len(metrics),
                     "tokens": finished["trained_tokens"], "train_s": finished["train_runtime"],
                     "tokens_per_s": finished["trained_tokens"] / finished["train_runtime"],
                     "peak_gib": peak / 2**30, "export_s": ended - finished["finished_at"],
                     "wall_s": wall, "loss_first": metrics[0]["train_loss"], "loss_last": metrics[-1]["train_loss"],
                     "export_loads": loaded})
    print(table(rows, args, weights))
    return rows


def table(rows: list[dict[str, object]], args: argparse.Namespace, weights: str) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    head = ("method", "dtype", "steps", "tokens", "train s", "tokens/s", "peak GiB", "merge+export s", "job wall s",
            "loss first->last", "export loads")
    lines = [f"trainer jobs on {device}: {args.model.name} ({weights}), batch {args.batch} x <= {args.max_length} "
             f"tokens, torch {torch.__version__}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['method']} | {r['dtype']} | {r['steps']} | {r['tokens']} | {r['train_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | {r['export_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['loss_first']:.2f}->{r['loss_last']:.2f} | {r['export_loads']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each job")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example")
    parser.add_argument("--model", type=Path, default=REPO / DEFAULT_MODEL_DIR)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # one job, in its own process
    args = parser.parse_args()
    if args.job:
        return job(args.job)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu to check everything else", file=sys.stderr)
            return 2
    rows = check(args)
    return 0 if rows and all("error" not in r and r["export_loads"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
