"""Does better selection make a better model? Equal-size sets chosen from the same candidates by a
likelihood scorer, by the rubric and at random, each trained the same way, each evaluated on held-out
human pairs, side by side in one run.

    .venv/bin/python bench/bench_selection.py [--segments 96] [--fraction 0.25] [--steps 24]
                                              [--scorer pmi] [--pairs 32] [--prompts 24] [--out runs/bench-selection]

1. the demo's data (`humpback data demo`); two servers of SmolLM2-135M-Instruct (ports 18301/18302);
2. candidates: the first `--segments` prepared passages of the demo corpus backtranslated by the
   untrained model with 3 seed demonstrations (`augment`);
3. the arms: the `--fraction` best-scored candidates by `--scorer` (`combined` is calibrated first
   on the first `--pairs` pairs of the seed's rest), the same number best-scored by the rubric
   (log-probability mode), and the same number drawn at random (seeded); each pair set is trained
   with the seed's pairs, as the loop trains M1, `--steps` steps of 8 with the demo's preset;
4. each trained model: held-out NLL of the human responses (`eval nll` rows, per-pair mean with a 95%
   normal interval, and its per-pair difference from the random arm's with its own) and answers to
   `--prompts` AlpacaEval prompts; the untrained model then judges each arm against the random arm in
   both orders (win rate with its 95% bootstrap interval, and the judge's position-flip rate: its bias;
   a judge flipping on more than half the prompts is reported uninformative).

Everything stays under OUT (journals, trained exports, answers), so a rerun reuses what it has. The
table goes to stdout and OUT/bench_selection.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_quality import SMOLLM, humpback, train, trained  # noqa: E402
from client.augment import AugmentConfig, augment  # noqa: E402
from client.curate import CurateConfig, curate, scored_mode, scored_records  # noqa: E402
from client.fanout import Fanout, FanoutConfig  # noqa: E402
from client.runner import side_path  # noqa: E402
from humpback.contracts import (  # noqa: E402
    AUGMENTED_SYSTEM_PROMPT,
    ChatExample,
    ScoredCandidate,
    SeedPair,
    read_jsonl,
    seed_forward_examples,
    tagged_example,
    write_jsonl,
)
from humpback.data.build import BuildConfig, build_demo  # noqa: E402
from humpback.evaluation.common import GenerationConfig, answer_all, normal_interval, subset  # noqa: E402
from humpback.loop.config import DataConfig, TrainConfig  # noqa: E402

PORTS = {"backward": 18301, "scorer": 18302}
SHOTS = 3


def url(role: str) -> str:
    return f"http://127.0.0.1:{PORTS[role]}"


def best(records: list[ScoredCandidate], k: int) -> list[ScoredCandidate]:
    """The `k` best-scored records (ties broken by candidate id, so every run picks the same)."""
    scored = [r for r in records if r.score is not None]
    return sorted(scored, key=lambda r: (-r.score, r.candidate_id))[:k]  # type: ignore[operator]


def at_random(records: list[ScoredCandidate], k: int, seed: int) -> list[ScoredCandidate]:
    """`k` records drawn with `seed`, in a fixed order first (the journal's order is the arrival order)."""
    ordered = sorted(records, key=lambda r: r.candidate_id)
    return random.Random(f"{seed}:random-arm").sample(ordered, min(k, len(ordered)))


def training_examples(seed: list[SeedPair], chosen: list[ScoredCandidate]) -> list[ChatExample]:
    """The seed's examples and the chosen pairs, tagged as the loop tags A_k for M1."""
    return [*seed_forward_examples(seed), *(tagged_example(r.instruction, r.output, AUGMENTED_SYSTEM_PROMPT)
                                            for r in chosen)]


def nll_interval(nll_means: list[float]) -> tuple[float, tuple[float, float] | None]:
    """(mean per-pair NLL, its 95% normal interval)."""
    return sum(nll_means) / len(nll_means), normal_interval(nll_means)


def paired_difference(arm: dict[int, float], baseline: dict[int, float]) -> tuple[float, tuple[float, float] | None]:
    """(mean of arm - baseline over the held-out pairs both scored, its 95% normal interval). Every arm is
    evaluated on the same pairs, so the per-pair difference removes what the pairs themselves vary by: an
    interval that excludes 0 says the arms differ even where their own intervals overlap."""
    return nll_interval([arm[i] - baseline[i] for i in sorted(arm.keys() & baseline.keys())])


def score(cands: Path, out: Path, cfg: CurateConfig) -> list[ScoredCandidate]:
    asyncio.run(curate(cands, out, FanoutConfig(endpoints=[url("scorer")]), cfg))
    return list(scored_records(side_path(out, "scored.jsonl"), scored_mode(cfg), "scorer"))


def serve(state: Path, scorer: Path) -> None:
    humpback("serve", "down", "--state-dir", str(state))
    humpback("serve", "up", "--state-dir", str(state), "--backward-model", str(SMOLLM), "--scorer-model", str(scorer),
             "--backward-port", str(PORTS["backward"]), "--scorer-port", str(PORTS["scorer"]))


async def evaluate(name: str, pairs: Path, prompts: list[str], out: Path) -> dict[str, object]:
    """Held-out NLL rows and answers of the model the scorer server serves."""
    from humpback.evaluation.nll import run_nll
    from humpback.evaluation.records import NllRow

    fan = FanoutConfig(endpoints=[url("scorer")])
    await run_nll(pairs, out / f"nll_{name}", fan, "scorer", system_prompt=AUGMENTED_SYSTEM_PROMPT)
    per_pair = {r.index: r.nll_mean for r in read_jsonl(out / f"nll_{name}" / "nll.rows.jsonl", NllRow)
                if r.nll_mean is not None}
    async with Fanout(fan) as f:
        answers = await answer_all(f, "scorer", name, prompts, GenerationConfig(max_tokens=192),
                                   out / f"answers_{name}")
    write_jsonl(out / f"answers_{name}.jsonl", answers)
    return {"nll": nll_interval(list(per_pair.values())), "per_pair": per_pair}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=96, help="candidates: passages backtranslated")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of the candidates each arm keeps")
    ap.add_argument("--steps", type=int, default=24, help="training steps of 8 examples, every arm")
    ap.add_argument("--scorer", default="pmi", choices=("pmi", "reverse_pmi", "combined"))
    ap.add_argument("--pairs", type=int, default=32, help="held-out pairs (NLL) and calibration pairs")
    ap.add_argument("--prompts", type=int, default=24, help="AlpacaEval prompts each arm answers for the judge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-selection")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = out / "serve"
    started = time.monotonic()
    data_cfg = DataConfig()
    data = out / "data"
    if not (data / "seed_rest.jsonl").is_file():
        build_demo(BuildConfig(out=data, max_seed=data_cfg.max_seed, max_corpus_docs=data_cfg.max_corpus_docs))
    seed = read_jsonl(data / "seed.jsonl", SeedPair)
    heldout = out / "heldout.jsonl"
    write_jsonl(heldout, read_jsonl(data / "heldout.jsonl", SeedPair)[:args.pairs])
    from humpback.evaluation.pairwise import Contender, PairwiseConfig, load_alpaca, run_pairwise

    every = load_alpaca()  # the subset run_pairwise judges: --prompts of them, drawn with --seed
    prompts = [every[i].instruction for i in subset(len(every), args.prompts, args.seed)]
    arms: dict[str, list[ScoredCandidate]] = {}
    results: dict[str, dict[str, object]] = {}
    judged = {}
    try:
        serve(state, SMOLLM)
        cands = out / "candidates.jsonl"
        # Once an arm has trained, the candidates stay as they are: augment asked again would retry its failed
        # segments, and the arms rebuilt from more candidates would not be those the reused models learned.
        if not any(trained(f"m1_{name}", out) for name in (args.scorer, "rubric", "random")):
            asyncio.run(augment([data / "corpus.jsonl"], cands, FanoutConfig(endpoints=[url("backward")]),
                                AugmentConfig(model="backward", shots=SHOTS, demonstrations=data / "seed.jsonl",
                                              limit=args.segments, progress=False)))
        calibration = None
        if args.scorer == "combined":
            from humpback.evaluation.calibrate import run_calibration

            pairs = out / "calibration.jsonl"
            write_jsonl(pairs, read_jsonl(data / "seed_rest.jsonl", SeedPair)[:args.pairs])
            calibration = out / "combiner.json"
            asyncio.run(run_calibration(pairs, calibration, FanoutConfig(endpoints=[url("scorer")]), url("backward"),
                                        "scorer"))
        likely = score(cands, out / f"curate_{args.scorer}.jsonl", CurateConfig(
            scorer=args.scorer, backward_endpoint=url("backward"), calibration=calibration, top_fraction=args.fraction,
            progress=False, histogram=False))
        rubric = score(cands, out / "curate_rubric.jsonl", CurateConfig(top_fraction=args.fraction, progress=False,
                                                                        histogram=False))
        k = max(1, round(args.fraction * min(len(likely), len(rubric))))
        arms = {args.scorer: best(likely, k), "rubric": best(rubric, k), "random": at_random(rubric, k, args.seed)}
        preset, steps = TrainConfig.model_fields["forward_preset"].default, args.steps
        for name, chosen in arms.items():
            export, minutes = train(f"m1_{name}", training_examples(seed, chosen), out, preset, steps)
            swap = ["serve", "swap", "scorer", str(export), "--version", f"m1-{name}", "--state-dir", str(state)]
            humpback(*swap)
            results[name] = {**asyncio.run(evaluate(name, heldout, prompts, out)), "minutes": minutes}
        humpback("serve", "swap", "scorer", str(SMOLLM), "--version", "judge", "--state-dir", str(state))
        for name in (args.scorer, "rubric"):
            judged[name] = asyncio.run(run_pairwise(
                out / f"judge_{name}_vs_random", Contender(answers=out / f"answers_{name}.jsonl", model=name),
                Contender(answers=out / "answers_random.jsonl", model="random"),
                FanoutConfig(endpoints=[url("scorer")]), "scorer",
                config=PairwiseConfig(limit=args.prompts, seed=args.seed)))
    finally:
        humpback("serve", "down", "--state-dir", str(state))
    lines = [f"# Selection benchmark ({len(arms.get('random', []))} pairs per arm of the candidates, {args.steps} "
             f"steps, {args.pairs} held-out pairs, {args.prompts} judged prompts; "
             f"{(time.monotonic() - started) / 60:.1f} min)", "",
             "| arm | held-out NLL per token, mean over pairs [95%] | NLL minus the random arm's, paired [95%] | "
             "judge win rate vs random [95%] | judge position-flip rate | mean response chars | train min |",
             "|---|---|---|---|---|---|---|"]
    for name, chosen in arms.items():
        nll, ci = results[name]["nll"]  # type: ignore[misc]
        j = judged.get(name)
        win = f"{j.win_rate:.3f} [{j.ci_low:.3f}, {j.ci_high:.3f}]" + ("" if j.informative else " (uninformative)") \
            if j else "-"
        flips = f"{j.position_flip_rate:.2f}" if j else "-"
        chars = sum(len(r.output) for r in chosen) / len(chosen)
        interval = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        paired = "-"
        if name != "random":
            arm, baseline = results[name]["per_pair"], results["random"]["per_pair"]
            diff, dci = paired_difference(arm, baseline)  # type: ignore[arg-type]
            paired = f"{diff:+.4f}" + (f" [{dci[0]:+.4f}, {dci[1]:+.4f}]" if dci else "")
        lines.append(f"| {name} | {nll:.4f} {interval} | {paired} | {win} | {flips} | {chars:.0f} | "
                     f"{results[name]['minutes']:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    (out / "bench_selection.md").write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
