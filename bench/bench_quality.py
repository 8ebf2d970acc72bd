"""Quality benchmark: every backward-model and scorer configuration tried on the embedded default,
measured with the stage metrics on the same held-out human pairs, side by side in one run.

    .venv/bin/python bench/bench_quality.py [--pairs 32] [--out runs/bench-quality] [--no-train] [--no-qwen]

It builds the demo's data (`humpback data demo`: seed, held-out pairs, corpus), starts its own two
model servers (ports 18201/18202, state under OUT/serve, so a running demo is not touched) and measures:

- backward configurations with `eval backward` (instruction_nll, rouge_l, usable_rate, distinct_2):
  the untrained SmolLM2-135M-Instruct with the paper's zero-shot prompt and with 3 demonstrations from
  the seed (`augment.shots`); M_yx trained on the paper's examples as the forward models are (the
  demo's 60 seed pairs reversed, the `cpu-demo` preset, 512 tokens, 6 steps of 8, through `python -m
  trainer.train`, the trainer's own training process), with
  both prompts; M_yx trained on more of the seed in shorter examples, as the demo now trains it
  (`train.backward_examples: short`: every seed-side pair whose response has at most 700 characters,
  the `cpu-demo-short` preset, 256 tokens, 12 steps), with both prompts; and
  Qwen2.5-Coder-0.5B-Instruct with both prompts, when `make models-quality` prepared it;
- scorer configurations with `eval scorer`: SmolLM2 untrained, M0 trained as the demo trains it, Qwen
  0.5B, each with every scorer (`--scorer`): the rubric (log-probability mode), pmi, reverse_pmi (the
  backward server's model) and combined (its combiner fitted with `eval calibrate` on the first
  `--pairs` pairs of the seed's rest, `seed_rest.jsonl`: held out of every forward model's training and
  of the evaluated pairs). Columns: auc overall and per negative kind, length_auc (the response's
  length alone), precision_at_r (the share of positives among as many best-scored pairs as there are
  positives: the loop's selection when it keeps as many pairs as are good), precision_at_k (at the
  rubric's 4.5, at P >= 0.5 for combined) and pairs/s (every pair scored over the row's wall time, from
  empty journals: a rerun that reuses them reports no rate).

Every configuration sees the same seeded subset of held-out pairs and the same negatives; each row has
its wall minutes (training separate). `instruction_nll` compares models of one tokenizer only (Qwen's
differs from SmolLM2's). The table goes to stdout and to OUT/bench_quality.md, the metrics to
OUT/bench_quality.json; every measurement's rows and journals stay under OUT/eval/, so a rerun reuses
what it has (delete OUT for a fresh measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.augment import AugmentConfig  # noqa: E402
from client.fanout import FanoutConfig  # noqa: E402
from humpback.contracts import (  # noqa: E402
    QUALITY_MODEL_DIR,
    SeedPair,
    read_jsonl,
    seed_backward_examples,
    seed_forward_examples,
    short_pairs,
    write_jsonl,
)
from humpback.data.build import BuildConfig, build_demo  # noqa: E402
from humpback.evaluation.backward import run_backward_eval  # noqa: E402
from humpback.evaluation.metrics import Metric  # noqa: E402
from humpback.evaluation.scorer import ScorerEvalConfig, run_scorer_eval  # noqa: E402
from humpback.loop.config import DEMO, DataConfig, TrainConfig  # noqa: E402
from trainer.config import PRESETS  # noqa: E402
from trainer.train import TrainSpec  # noqa: E402

SMOLLM = REPO / "models" / "smollm2-135m-instruct"
QWEN = REPO / QUALITY_MODEL_DIR
PORTS = {"backward": 18201, "scorer": 18202}
SHOTS = 3
BACKWARD_COLUMNS = ("instruction_nll", "rouge_l", "usable_rate", "distinct_2")
SCORER_COLUMNS = ("auc", "auc_mismatched", "auc_first_sentence", "auc_passage", "auc_generic", "auc_boilerplate",
                  "length_auc", "precision_at_r", "precision_at_k", "pairs_per_s")
SCORERS = ("rubric", "pmi", "reverse_pmi", "combined")


@dataclass
class Row:
    stage: str  # "backward" or "scorer"
    config: str
    metrics: dict[str, Metric]
    minutes: float
    note: str = ""


def humpback(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "humpback", *args], cwd=REPO, check=True)


def serve_up(state: Path, backward: Path, scorer: Path) -> None:
    humpback("serve", "down", "--state-dir", str(state))
    humpback("serve", "up", "--state-dir", str(state), "--backward-model", str(backward), "--scorer-model",
             str(scorer), "--backward-port", str(PORTS["backward"]), "--scorer-port", str(PORTS["scorer"]))


def url(role: str) -> str:
    return f"http://127.0.0.1:{PORTS[role]}"


def trained(name: str, out: Path) -> bool:
    """Whether `train(name, ..., out, ...)` has finished once: a rerun reuses its export."""
    return (out / name / "export" / "config.json").is_file() and (out / name / "minutes.txt").is_file()


def train(name: str, examples: list, out: Path, preset_name: str, steps: int) -> tuple[Path, float]:
    """Train as the demo's jobs train (a trainer preset, batch 8, `steps` steps) with the trainer's
    training process; returns the merged export and the minutes the training took (kept beside the
    export, so a rerun that reuses it reports them too)."""
    export, timing = out / name / "export", out / name / "minutes.txt"
    if trained(name, out):
        return export, float(timing.read_text())
    (out / name).mkdir(parents=True, exist_ok=True)
    data = out / name / "train.jsonl"
    write_jsonl(data, examples)
    preset = PRESETS[preset_name]
    spec = TrainSpec(**{**preset.model_dump(), "batch_size": 8, "max_steps": steps,
                        "save_steps": min(preset.save_steps, steps)}, base_model=SMOLLM, training_file=data,
                     output_dir=out / name / "train", export_dir=export, seed=0)
    (out / name / "spec.json").write_text(spec.model_dump_json())
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "trainer.train", str(out / name / "spec.json")], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    minutes = (time.monotonic() - start) / 60
    timing.write_text(f"{minutes:.2f}")
    return export, minutes


def swap(state: Path, role: str, checkpoint: Path, version: str) -> None:
    humpback("serve", "swap", role, str(checkpoint), "--version", version, "--state-dir", str(state))


def measure_backward(name: str, pairs: Path, seed: Path, out: Path, limit: int, shots: int, note: str = "") -> Row:
    cfg = AugmentConfig(max_tokens=DEMO["augment"]["max_tokens"], shots=shots, demonstrations=seed if shots else None)
    start = time.monotonic()
    metrics = asyncio.run(run_backward_eval(pairs, out / "eval" / f"backward_{name}.json",
                                            FanoutConfig(endpoints=[url("backward")]), "backward", cfg, limit))
    return Row("backward", name, metrics, (time.monotonic() - start) / 60, note)


def measure_scorer(name: str, pairs: Path, corpus: Path, out: Path, limit: int, note: str = "",
                   calibration_pairs: Path | None = None) -> list[Row]:
    """One row per scorer of the model the scorer server serves (the backward server's for the
    reverse signal); combined's combiner is fitted on `calibration_pairs` first."""
    from client.curate import CurateConfig
    from humpback.evaluation.calibrate import run_calibration

    fan = FanoutConfig(endpoints=[url("scorer")])
    rows = []
    for scorer in SCORERS:
        if scorer == "combined" and calibration_pairs is None:
            continue
        tag = f"{name}_{scorer}".replace(" ", "_")
        calibration = None
        if scorer == "combined":
            calibration = out / "eval" / f"combiner_{tag}.json"
            asyncio.run(run_calibration(calibration_pairs, calibration, fan, url("backward"), "scorer",  # type: ignore[arg-type]
                                        ScorerEvalConfig(corpus=corpus), limit))
        score = CurateConfig(scorer=scorer, backward_endpoint=url("backward"), calibration=calibration)
        start = time.monotonic()
        metrics = asyncio.run(run_scorer_eval(pairs, out / "eval" / f"scorer_{tag}.json", fan, "scorer",
                                              ScorerEvalConfig(corpus=corpus), limit, score=score))
        seconds = time.monotonic() - start
        metrics["pairs_per_s"] = Metric(value=metrics["auc"].n / seconds, ci95=None, n=metrics["auc"].n)
        rows.append(Row("scorer", f"{name}, {scorer}", metrics, seconds / 60, note))
    return rows


def cell(m: Metric | None) -> str:
    if m is None or m.value is None:
        return "-"
    return f"{m.value:.3f} [{m.ci95[0]:.3f}, {m.ci95[1]:.3f}]" if m.ci95 else f"{m.value:.3f}"


def table(rows: list[Row], stage: str, columns: tuple[str, ...]) -> str:
    picked = [r for r in rows if r.stage == stage]
    n = max((m.n for r in picked for m in r.metrics.values()), default=0)
    lines = [f"| {stage} configuration | " + " | ".join(columns) + " | minutes | note |",
             "|---|" + "---|" * (len(columns) + 2)]
    for r in picked:
        lines.append(f"| {r.config} | " + " | ".join(cell(r.metrics.get(c)) for c in columns)
                     + f" | {r.minutes:.1f} | {r.note} |")
    return "\n".join(lines) + f"\n\n(n = {n} items at most per cell; 95% bootstrap intervals)\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32, help="held-out pairs measured (a seeded subset)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-quality")
    ap.add_argument("--no-train", action="store_true", help="skip M_yx and M0 (each ~4 min of training)")
    ap.add_argument("--no-qwen", action="store_true", help="skip Qwen2.5-Coder-0.5B-Instruct even if prepared")
    ap.add_argument("--only", choices=("backward", "scorer"), default=None, help="measure one stage's rows only")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = out / "serve"

    data_cfg = DataConfig()
    data = out / "data"
    if not (data / "seed_rest.jsonl").is_file():
        build_demo(BuildConfig(out=data, max_seed=data_cfg.max_seed, max_corpus_docs=data_cfg.max_corpus_docs))
    pairs, seed, corpus = data / "heldout.jsonl", data / "seed.jsonl", data / "corpus.jsonl"
    seed_pairs = read_jsonl(seed, SeedPair)
    rows: list[Row] = []

    def backward(*a: Any, **k: Any) -> list[Row]:
        return [measure_backward(*a, **k)] if args.only in (None, "backward") else []

    def scorer_rows(*a: Any, **k: Any) -> list[Row]:
        return measure_scorer(*a, **k) if args.only in (None, "scorer") else []

    started = time.monotonic()
    try:
        serve_up(state, SMOLLM, SMOLLM)
        rows += backward("smollm2-135m base, zero-shot (paper prompt)", pairs, seed, out, args.pairs, 0)
        rows += backward(f"smollm2-135m base, {SHOTS}-shot", pairs, seed, out, args.pairs, SHOTS)
        calibration = out / "data" / "calibration.jsonl"
        write_jsonl(calibration, read_jsonl(data / "seed_rest.jsonl", SeedPair)[:args.pairs])
        rows += scorer_rows("smollm2-135m base", pairs, corpus, out, args.pairs, calibration_pairs=calibration)
        if not args.no_train:
            # The paper's examples: the demo's 60 seed pairs reversed, as the forward models see them.
            paper, long_steps = TrainConfig.model_fields["forward_preset"].default, TrainConfig.model_fields["max_steps"].default
            myx, minutes = train("myx", seed_backward_examples(seed_pairs), out, paper, long_steps)
            swap(state, "backward", myx, "myx")
            note = f"{len(seed_pairs)} seed pairs, {PRESETS[paper].max_length} tokens, {long_steps} steps; trained {minutes:.1f} min"
            rows += backward("M_yx (paper examples), zero-shot", pairs, seed, out, args.pairs, 0, note)
            rows += backward(f"M_yx (paper examples), {SHOTS}-shot", pairs, seed, out, args.pairs, SHOTS)
            # More of the seed in shorter examples: the demo's M_yx now (train.backward_examples "short").
            short_preset = TrainConfig.model_fields["backward_preset"].default
            short_steps = TrainConfig.model_fields["backward_max_steps"].default
            short = short_pairs([*seed_pairs, *read_jsonl(data / "seed_rest.jsonl", SeedPair)])
            myx_short, minutes = train("myx_short", seed_backward_examples(short), out, short_preset, short_steps)
            swap(state, "backward", myx_short, "myx-short")
            note = (f"{len(short)} short seed pairs, {PRESETS[short_preset].max_length} tokens, {short_steps} steps; "
                    f"trained {minutes:.1f} min")
            rows += backward("M_yx (short examples), zero-shot", pairs, seed, out, args.pairs, 0, note)
            rows += backward(f"M_yx (short examples), {SHOTS}-shot", pairs, seed, out, args.pairs, SHOTS)
            m0, minutes = train("m0", seed_forward_examples(seed_pairs), out, paper, long_steps)
            swap(state, "scorer", m0, "m0")
            rows += scorer_rows("M0 (demo training)", pairs, corpus, out, args.pairs,
                                   f"{len(seed_pairs)} seed pairs, {long_steps} steps; trained {minutes:.1f} min",
                                   calibration)
        if not args.no_qwen and (QWEN / "humpback-manifest.json").is_file():
            serve_up(state, QWEN, QWEN)
            rows += backward("qwen2.5-coder-0.5b base, zero-shot", pairs, seed, out, args.pairs, 0)
            rows += backward(f"qwen2.5-coder-0.5b base, {SHOTS}-shot", pairs, seed, out, args.pairs,
                                         SHOTS)
            rows += scorer_rows("qwen2.5-coder-0.5b base", pairs, corpus, out, args.pairs,
                                   calibration_pairs=calibration)
        elif not args.no_qwen:
            print(f"{QWEN} is not prepared (make models-quality): Qwen configurations skipped", file=sys.stderr)
    finally:
        humpback("serve", "down", "--state-dir", str(state))
    report = (f"# Quality benchmark ({args.pairs} held-out pairs, {(time.monotonic() - started) / 60:.1f} min)\n\n"
              + "\n".join(table(rows, stage, columns) for stage, columns in (("backward", BACKWARD_COLUMNS),
                                                                               ("scorer", SCORER_COLUMNS))
                          if any(r.stage == stage for r in rows)))
    print(report)
    (out / "bench_quality.md").write_text(report, encoding="utf-8")
    (out / "bench_quality.json").write_text(json.dumps(
        [{"stage": r.stage, "config": r.config, "minutes": r.minutes, "note": r.note,
          "metrics": {k: m.model_dump(mode="json") for k, m in r.metrics.items()}} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
