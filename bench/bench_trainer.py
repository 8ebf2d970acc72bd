"""Trainer benchmark: the humpback trainer service against a plain TRL script, side by side in one run.

    .venv/bin/python bench/bench_trainer.py [--steps 4] [--rounds 2] [--role backward] [--no-deploy]

Each round runs one job through the service (the `openai` SDK, as a user would) and one plain TRL
script with the job's resolved settings (same data, LoRA, batch, length, schedule, logging and
checkpoint steps), alternating which goes first. Measured:
- training tokens/s: tokens trained / `train_runtime` of `Trainer.train()`, for both;
- peak RSS of the training process, for both (sampled every 0.1 s);
- time from the end of training to the new weights answering at the server under the job's
  `fine_tuned_model` name (merge + export + validation + swap + alias);
- the request stall during the swap: the server's pause-to-resume time, and the worst latency of
  chat requests kept in flight against the server during the swap, against their latency before.
The servers' base weights are put back at the end.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pydoc
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
import psutil
import uvicorn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.hotswap import swap_checkpoint  # noqa: E402
from trainer.api import create_app  # noqa: E402
from trainer.config import DEFAULT_MODEL_DIR, ServiceSettings  # noqa: E402
from humpback.contracts import API_KEY_ENV, SeedPair, seed_forward_examples, write_jsonl  # noqa: E402

# The plain TRL script: what a user would write by hand with the same settings, no humpback code.
PLAIN_TRL = r'''
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

spec = json.load(open(sys.argv[1]))
rows = []
for line in open(spec["training_file"]):
    msgs = json.loads(line)["messages"]
    rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
torch.manual_seed(spec["seed"])
tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
model = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.bfloat16)
micro = min(spec["micro_batch_size"], spec["batch_size"])
config = SFTConfig(
    output_dir=sys.argv[2], max_steps=spec["max_steps"], per_device_train_batch_size=micro,
    gradient_accumulation_steps=max(1, spec["batch_size"] // micro), learning_rate=spec["learning_rate"],
    lr_scheduler_type="warmup_stable_decay",
    lr_scheduler_kwargs={"num_stable_steps": 0, "num_decay_steps": spec["max_steps"], "decay_type": "linear",
                         "min_lr_ratio": spec["final_lr_ratio"]},
    weight_decay=spec["weight_decay"], max_length=spec["max_length"], bf16=True, use_cpu=True,
    logging_steps=1, save_steps=spec["save_steps"], save_total_limit=2, seed=spec["seed"],
    report_to="none", disable_tqdm=True,
)
peft = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["dropout"],
                  target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                     processing_class=tokenizer, peft_config=peft)
out = trainer.train()
tokens = max(int(h.get("num_tokens", 0)) for h in trainer.state.log_history)
print(json.dumps({"train_runtime": out.metrics["train_runtime"], "trained_tokens": tokens}))
'''


@dataclass
class RunResult:
    tokens_per_s: float
    peak_rss_gb: float


@dataclass
class SwapMeasure:
    to_serving_s: float
    server_stall_s: float
    client_worst_s: float
    failed_requests: int


@dataclass
class Sampler:
    """Peak RSS of this process's descendants whose command line contains `marker`."""

    marker: str
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.1):
            total = 0
            for child in me.children(recursive=True):
                try:
                    if self.marker in " ".join(child.cmdline()):
                        total += child.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)


class Load:
    """Short chat requests kept in flight against one server, recording each latency."""

    def __init__(self, client: openai.OpenAI, model: str, workers: int = 4) -> None:
        self.client, self.model, self.workers = client, model, workers
        self.latencies: list[float] = []
        self.failed = 0
        self._stop = threading.Event()

    def _one(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
                )
                self.latencies.append(time.perf_counter() - start)
            except openai.APIError:
                self.failed += 1

    def __enter__(self) -> "Load":
        self._threads = [threading.Thread(target=self._one, daemon=True) for _ in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


# Standard-library modules whose documentation makes the training responses: real prose, no download.
MODULES = (
    "abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections colorsys "
    "concurrent configparser contextlib copy csv ctypes dataclasses datetime decimal difflib dis email "
    "enum filecmp fnmatch fractions ftplib functools gc getopt gettext glob gzip hashlib heapq hmac html "
    "http imaplib importlib inspect io ipaddress itertools json keyword linecache locale logging lzma "
    "mailbox math mimetypes multiprocessing netrc numbers operator optparse os pathlib pickle pkgutil "
    "platform plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets select "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string "
    "struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit "
    "token tokenize trace traceback types typing unicodedata unittest urllib uuid warnings wave weakref "
    "xml zipfile zipimport zlib"
).split()


def build_data(path: Path, n: int) -> Path:
    """Seed-like pairs: a question about a module, its documentation (up to 600 characters) as answer."""
    pairs = []
    for name in MODULES:
        doc = pydoc.getdoc(importlib.import_module(name))
        if len(doc) > 300:
            pairs.append(SeedPair.make(f"What does the Python module `{name}` do?", doc[:600], "pydoc", "PSF-2.0"))
        if len(pairs) == n:
            break
    write_jsonl(path, seed_forward_examples(pairs))
    return path


def start_service(settings: ServiceSettings) -> tuple[uvicorn.Server, threading.Thread, openai.OpenAI]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=settings.api_key or "none",
                                         max_retries=0)


def run_humpback(
    client: openai.OpenAI, file_id: str, steps: int, role: str | None, server: openai.OpenAI | None, baseline: float
) -> tuple[RunResult, SwapMeasure | None, str]:
    metadata = {"preset": "cpu-demo", "max_steps": str(steps)}
    if role:
        metadata["deploy_to"] = role
    with Sampler("trainer.train") as rss:
        job = client.fine_tuning.jobs.create(model=role or "backward", training_file=file_id, metadata=metadata)
        finished: dict | None = None
        while finished is None:
            time.sleep(1.0)  # polling the in-process service costs CPU the training would use
            for event in client.fine_tuning.jobs.list_events(job.id, limit=20):
                if event.message.startswith("Training finished in"):
                    finished = event.data
            status = client.fine_tuning.jobs.retrieve(job.id).status
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"job {job.id} {status}: {client.fine_tuning.jobs.retrieve(job.id).error}")
    swap = None
    if role and server is not None:
        with Load(server, role) as load:
            while (done := client.fine_tuning.jobs.retrieve(job.id)).status == "running":
                time.sleep(0.05)
            if done.status != "succeeded":
                raise RuntimeError(f"job {job.id} {done.status}: {done.error}")
            server.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
            serving = time.time()
            time.sleep(1.0)
        deployed = next(e for e in client.fine_tuning.jobs.list_events(job.id, limit=20) if e.message.startswith("Deployed"))
        swap = SwapMeasure(
            to_serving_s=serving - finished["finished_at"],
            server_stall_s=deployed.data["stall_s"],
            client_worst_s=max(load.latencies, default=0.0) - baseline,
            failed_requests=load.failed,
        )
    else:
        while client.fine_tuning.jobs.retrieve(job.id).status == "running":
            time.sleep(0.2)
    result = RunResult(finished["trained_tokens"] / finished["train_runtime"], rss.peak / 2**30)
    return result, swap, job.id


def run_plain(spec_path: Path, workdir: Path) -> RunResult:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "plain_trl.py"
    script.write_text(PLAIN_TRL)
    with Sampler("plain_trl.py") as rss:
        out = subprocess.run(
            [sys.executable, str(script), str(spec_path), str(workdir / "plain-out")],
            capture_output=True, text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return RunResult(data["trained_tokens"] / data["train_runtime"], rss.peak / 2**30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (batch 8, cpu-demo preset)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--role", choices=("backward", "scorer"), default="backward", help="server to deploy to")
    parser.add_argument("--no-deploy", action="store_true", help="train only; no server needed")
    parser.add_argument("--backward-url", default="http://127.0.0.1:8001")
    parser.add_argument("--scorer-url", default="http://127.0.0.1:8002")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help="the stack's key (trainer and servers)")
    parser.add_argument("--registry", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=REPO / DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    role = None if args.no_deploy else args.role

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    data = build_data(work / "train.jsonl", args.examples)
    settings = ServiceSettings(
        data_dir=work / "service", backward_url=args.backward_url, scorer_url=args.scorer_url,
        api_key=args.api_key, registry=args.registry,
        backward_model=args.model_dir, scorer_model=args.model_dir,
    )
    uv, thread, client = start_service(settings)
    server = None
    baseline = 0.0
    if role:
        server = openai.OpenAI(base_url=f"{settings.role_url(role)}/v1", api_key=args.api_key or "none", max_retries=0)
        with Load(server, role) as probe:
            while len(probe.latencies) < 16:
                time.sleep(0.1)
        baseline = statistics.median(probe.latencies)
    with data.open("rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id

    rows: list[tuple[RunResult, RunResult, SwapMeasure | None]] = []
    spec_path: Path | None = None
    try:
        for r in range(args.rounds):
            hb = swap = plain = None
            for which in (("humpback", "plain") if r % 2 == 0 or spec_path is None else ("plain", "humpback")):
                if which == "humpback":
                    hb, swap, job_id = run_humpback(client, file_id, args.steps, role, server, baseline)
                    spec_path = settings.data_dir / "checkpoints" / job_id / "spec.json"
                else:
                    assert spec_path is not None
                    plain = run_plain(spec_path, work / f"plain-{r}")
            assert hb is not None and plain is not None
            rows.append((hb, plain, swap))
            print(f"round {r + 1}: humpback {hb.tokens_per_s:.1f} tok/s, plain TRL {plain.tokens_per_s:.1f} tok/s", flush=True)
    finally:
        uv.should_exit = True
        thread.join(60)
        if role:
            try:
                swap_checkpoint(
                    settings.role_url(role), args.model_dir, role=role, version="base",
                    api_key=args.api_key, registry=args.registry,
                )
            except Exception as exc:  # report, without hiding why the run itself stopped
                print(f"could not put the base weights back into {role}: {exc}", file=sys.stderr)

    spec = json.loads(spec_path.read_text()) if spec_path else {}
    print(f"\nSettings: {args.examples} examples, {spec.get('max_steps')} steps, batch {spec.get('batch_size')}, "
          f"max_length {spec.get('max_length')}, LoRA r{spec.get('lora_r')} all-linear, bf16, CPU\n")
    print(f"{'round':<7}{'humpback tok/s':>16}{'plain tok/s':>13}{'ratio':>8}{'humpback RSS GB':>17}{'plain RSS GB':>14}{'RSS ratio':>11}")
    for i, (hb, plain, _) in enumerate(rows, 1):
        print(f"{i:<7}{hb.tokens_per_s:>16.1f}{plain.tokens_per_s:>13.1f}{hb.tokens_per_s / plain.tokens_per_s:>8.3f}"
              f"{hb.peak_rss_gb:>17.2f}{plain.peak_rss_gb:>14.2f}{hb.peak_rss_gb / plain.peak_rss_gb:>11.3f}")
    ratios = [hb.tokens_per_s / plain.tokens_per_s for hb, plain, _ in rows]
    print(f"{'median':<7}{'':>16}{'':>13}{statistics.median(ratios):>8.3f}   (target >= 0.95)")
    swaps = [s for _, _, s in rows if s is not None]
    if swaps:
        print(f"\nHot-swap into {role} ({settings.role_url(role)}), baseline request latency {baseline:.2f} s:")
        print(f"{'round':<7}{'train end -> serving s':>24}{'server stall s':>16}{'worst extra latency s':>23}{'failed':>8}")
        for i, s in enumerate(swaps, 1):
            print(f"{i:<7}{s.to_serving_s:>24.2f}{s.server_stall_s:>16.2f}{s.client_worst_s:>23.2f}{s.failed_requests:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
