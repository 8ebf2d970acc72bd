"""`humpback report RUN_DIR`: one self-contained HTML page (plots embedded as PNG) of a run, and
`RUN_DIR/stage_metrics.md`, its stage metrics as Markdown tables."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from humpback.contracts import BAND_LABELS, RewrittenCandidate, ScoredCandidate, band_of
from humpback.evaluation.metrics import Metric
from humpback.evaluation.pairwise import uninformative_text
from humpback.loop.records import (
    AugmentResult, CandidateQuality, CurateResult, Evaluation, NllScores, PairwiseScores, RewriteResult, ScorerMetrics,
    StageMetrics, StageRecord, TrainedModel,
)
from humpback.loop.stages import Stages

Records = dict[str, StageRecord]



def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _img(buf.getvalue())


def _img(png: bytes) -> str:
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _scores(path: Path) -> list[ScoredCandidate]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [r for r in map(ScoredCandidate.model_validate_json, f) if r.score is not None]


# What a curate stage's scores are, by the scoring it records: the histogram's range (None: the
# data's) and the axis label.
SCALES: dict[str, tuple[tuple[float, float] | None, str]] = {
    "rubric": ((1.0, 5.0), "expected rubric score, 1-5"), "combined": ((0.0, 1.0), "P(good pair)"),
    "pmi": (None, "PMI, log p(y|x) - log p(y)"), "reverse_pmi": (None, "reverse PMI, log p(x|y) - log p(x)")}


def score_plot(curates: dict[str, CurateResult]) -> str:
    """The score histogram of every iteration; no figure where no journal holds a score."""
    scored = {name: [r.score for r in _scores(res.scored)] for name, res in curates.items()}
    if not any(scored.values()):
        return ""
    scales = {SCALES[res.scoring] for res in curates.values()}
    span, label = scales.pop() if len(scales) == 1 else (None, "score (iterations on different scales)")
    fig, ax = _figure()
    for name, res in curates.items():
        scores = scored[name]
        bars = ax.hist(scores, bins=20, range=span, alpha=0.55,
                       label=f"{name} (scorer {res.scorer}, {res.scoring}, n={len(scores)})")
        if res.k is not None:  # the k this iteration selected with (min_score or top_fraction)
            ax.axvline(res.k, color=bars[2][0].get_facecolor(), linestyle="--", label=f"{name}: k={res.k:.3g}")
    ax.set_xlabel(label)
    ax.set_ylabel("candidate pairs")
    ax.set_title("Score distribution per iteration")
    ax.legend(fontsize=7)
    return _png(fig)


def kept_plot(curates: dict[str, CurateResult]) -> str:
    fig, ax = _figure()
    names = list(curates)
    thresholds = sorted({k for res in curates.values() for k in res.kept_per_threshold}, key=float)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        kept = curates[name].kept_per_threshold
        ax.bar([j + i * width for j in range(len(thresholds))], [kept.get(k, 0) for k in thresholds], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(thresholds))], [f">= {k}" for k in thresholds])
    ax.set_ylabel("pairs kept")
    ax.set_ylim(bottom=0, top=max([1, *(v for res in curates.values() for v in res.kept_per_threshold.values())]))
    ax.set_title("Kept candidates per threshold k (0 where no bar)")
    ax.legend(fontsize=7)
    return _png(fig)


def _figure(width: float = 7, height: float = 3.6, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height))


def _panel_value(ev: Evaluation, section: str) -> tuple[float, tuple[float, float] | None] | None:
    """A model's value for a panel and its interval; None where it has none, or where it is a win rate
    from a judge marked uninformative (no result: the table says why)."""
    if section == "pairwise":
        return (ev.pairwise.win_rate, ev.pairwise.ci) if ev.pairwise.informative else None
    if section == "ifeval":
        return ev.ifeval.prompt_loose, None
    return (ev.nll.mean, ev.nll.ci) if ev.nll is not None and ev.nll.mean is not None else None


EVAL_PANELS = (("pairwise", "win rate vs baseline"), ("ifeval", "IFEval prompt-level loose"),
               ("nll", "held-out NLL per token (lower is better)"))


def eval_plot(evals: dict[str, Evaluation]) -> str:
    """One panel per metric that some model has a value of (no empty chart: a panel whose every value
    is missing or uninformative is left out, and so is the figure when none is left)."""
    names = list(evals)
    panels = [p for p in EVAL_PANELS if any(_panel_value(evals[n], p[0]) for n in names)]
    if not panels:
        return ""
    fig, axes = _figure(4 * len(panels), 3.6, columns=len(panels))
    for ax, (section, title) in zip(axes if len(panels) > 1 else [axes], panels):
        vals: list[float] = []
        errs: list[list[float]] = [[], []]
        missing = []
        for name in names:
            m = _panel_value(evals[name], section)
            if m is None:
                missing.append(len(vals))
            v, ci = m or (0.0, None)
            lo, hi = ci or (v, v)
            vals.append(v)
            errs[0].append(max(0.0, v - lo))
            errs[1].append(max(0.0, hi - v))
        ax.bar(names, vals, yerr=errs, capsize=4, color="#4c78a8")
        for i in missing:  # a model without a value here (the table says why): no bar, a note in its place
            ax.text(i, 0, "no result", ha="center", va="bottom", rotation=90, fontsize=7)
        ax.set_title(title, fontsize=9)
        if section == "pairwise":  # a rate: the full scale
            ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Evaluation per model (error bars: 95% intervals)")
    return _png(fig)


def time_plot(stages: Records) -> str:
    fig, ax = _figure(7, 0.3 * len(stages) + 1.2)
    names = list(stages)
    ax.barh(names, [stages[n].elapsed_s for n in names], color="#72b7b2")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage")
    return _png(fig)


def loss_plot(trains: dict[str, TrainedModel]) -> str:
    """The training loss of every job that logged one; no figure when none did."""
    curves = {name: [(d.step, d.loss) for d in res.losses] for name, res in trains.items()}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return ""
    fig, ax = _figure()
    for name, points in curves.items():
        ax.plot(*zip(*points), marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per job")
    ax.legend(fontsize=7)
    return _png(fig)


def throughput_rows(stages: Records) -> list[tuple[str, str, str]]:
    rows = []
    for name, res in stages.items():
        elapsed = res.elapsed_s
        if isinstance(res, TrainedModel) and res.trained_tokens:
            rows.append((name, f"{elapsed:.0f} s", f"{res.trained_tokens / elapsed:.0f} training tokens/s" if elapsed else ""))
        elif isinstance(res, AugmentResult | CurateResult):
            n = sum(res.summary.results.values())
            rows.append((name, f"{elapsed:.0f} s", f"{n / elapsed:.2f} records/s" if elapsed else ""))
        else:
            rows.append((name, f"{elapsed:.0f} s", ""))
    return rows


def band_examples(curates: dict[str, CurateResult], per_band: int = 2) -> str:
    if not curates:
        return "<p>No curation yet.</p>"
    name, res = list(curates.items())[-1]
    if res.scoring != "rubric":
        return f"<p>The bands are the rubric's; {html.escape(name)} scored with {html.escape(res.scoring)}.</p>"
    rows = _scores(res.scored)
    out = [f"<p>From {html.escape(name)} (scorer {html.escape(res.scorer)}).</p><div class='wide'><table>"
           "<tr><th>band</th><th>score</th><th>instruction</th><th>output (start)</th></tr>"]
    for label in BAND_LABELS:
        for r in [r for r in rows if band_of(r.score) == label][:per_band]:
            out.append(f"<tr><td>{label}</td><td>{r.score:.2f}</td><td>{html.escape(r.instruction[:300])}</td>"
                       f"<td>{html.escape(r.output[:400])}</td></tr>")
    return "\n".join(out) + "</table></div>"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


EVAL_HEADER = ("model", "win rate [95% CI]", "IFEval prompt strict", "IFEval prompt loose", "IFEval instruction loose",
               "held-out NLL [95% CI]")


def _fmt(value: float | None, ci: tuple[float, float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _win_rate(m: PairwiseScores) -> str:
    return _fmt(m.win_rate, m.ci) if m.informative else uninformative_text(m.position_flip_rate)


def _nll(m: NllScores | None) -> str:
    return "-" if m is None else _fmt(m.mean, m.ci)


def eval_rows(evals: dict[str, Evaluation | None]) -> list[tuple[str, ...]]:
    """A row per model; "-" in each column of a model not evaluated yet (None)."""
    return [(name, *(("-",) * 5 if e is None else (
        _win_rate(e.pairwise), _fmt(e.ifeval.prompt_strict), _fmt(e.ifeval.prompt_loose),
        _fmt(e.ifeval.instruction_loose), _nll(e.nll)))) for name, e in evals.items()]


# --- what the run produced (`augment`, `curate_*`: see humpback.loop.run) --------------------------------

NOT_PRODUCED = "No data produced yet: the run has not reached augment."


def _count(n: int | float | None) -> str:
    return "?" if n is None else f"{n:,}"


def produced_summary(augmented: AugmentResult, curates: dict[str, CurateResult]) -> str:
    """One paragraph: the corpus read, the segments sent, the usable candidates, each iteration's kept pairs."""
    prep, quality = augmented.summary.prepare, augmented.summary.quality
    parts = [f"The backward model read {_count(prep.get('documents'))} corpus documents ({_count(prep.get('kept'))} "
             f"of their {_count(prep.get('segments'))} segments kept by the paper's preparation), wrote an "
             f"instruction for {_count(quality.get('sent'))} segments and {_count(quality.get('usable'))} of them "
             f"were usable: the candidate pairs."]
    for name, res in curates.items():
        k = res.k
        parts.append(f"{html.escape(name.replace('curate_', 'Iteration '))}: "
                     f"scorer {html.escape(res.scorer)} ({html.escape(res.scoring)}) "
                     f"scored {_count(res.scored_total)} of them ({_count(res.contaminated)} dropped "
                     f"before as contaminated) and kept <b>{_count(res.selected)} pairs</b> "
                     f"(score >= {'?' if k is None else f'{k:.3g}'}) as A_{name.removeprefix('curate_')}.")
    return "<p>" + " ".join(parts) + "</p>"


def _curates(stages: Records) -> dict[str, CurateResult]:
    return {n: r for n, r in stages.items() if isinstance(r, CurateResult)}


def kept_examples(curates: dict[str, CurateResult], count: int = 3) -> str:
    """The best-scored pairs the last iteration kept, one per instruction (a generic one, such as "What
    does this mean?", may head several passages), cut for display."""
    name, res = list(curates.items())[-1]
    k = res.k
    best: dict[str, ScoredCandidate] = {}
    for r in sorted(_scores(res.scored), key=lambda r: -r.score):
        if k is None or r.score >= k:
            best.setdefault(r.instruction, r)
    rows = list(best.values())
    if not rows:
        return f"<p>{html.escape(name)} kept no pair.</p>"
    return (f"<p>The best-scored pairs of A_{html.escape(name.removeprefix('curate_'))} "
            f"({html.escape(SCALES[res.scoring][1])}):</p>"
            + _table(("score", "instruction (written by the backward model)", "response (the corpus passage, start)"),
                     [(f"{r.score:.2f}", r.instruction[:300], r.output[:400]) for r in rows[:count]]))


def produced_section(stages: Records) -> str:
    augmented = stages.get("augment")
    if not isinstance(augmented, AugmentResult):
        return f"<p>{NOT_PRODUCED}</p>"
    curates = _curates(stages)
    return produced_summary(augmented, curates) + (kept_examples(curates) if curates else "")


# --- the rewrite ablation (`rewrite_1`, `train_m1_rewritten`, `eval_m1_rewritten`: see humpback.loop.run) -----

NO_REWRITE = ("No rewrite ablation in this run: rewrite.enabled was off (make demo leaves the ablation arms to "
              "make demo-ablations), or the run has not reached it.")


def rewrite_rows(stages: Records, arm: RewriteResult) -> list[tuple[str, ...]]:
    """M1 and M1-rewritten side by side: the A_1 pairs each learnt from, its training examples (seed
    included), then the evaluation table's columns ("-" where a model is not evaluated yet)."""
    rows = []
    for name, label, pairs in (("m1", "M1 (curated originals)", f"{arm.curated} curated"),
                               ("m1_rewritten", "M1-rewritten (curated rewrites)",
                                f"{arm.rewritten} of {arm.curated} rewritten")):
        ev, trained = stages.get(f"eval_{name}"), stages.get(f"train_{name}")
        _, *metrics = eval_rows({name: ev if isinstance(ev, Evaluation) else None})[0]
        rows.append((label, pairs, _plain(trained.examples if isinstance(trained, TrainedModel) else None), *metrics))
    return rows


def rewrite_examples(path: Path, count: int = 3) -> str:
    """The first `count` rewrites beside the responses they came from, cut for display."""
    rows = []
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            rows = [RewrittenCandidate.model_validate_json(line) for line, _ in zip(f, range(count))]
    if not rows:
        return "<p>No pair was rewritten: M1-rewritten learnt from the seed alone.</p>"
    out = ["<div class='wide'><table><tr><th>instruction</th><th>original response (start)</th>"
           "<th>rewritten response (start)</th></tr>"]
    out += [f"<tr><td>{html.escape(r.instruction[:300])}</td><td>{html.escape(r.original_output[:400])}</td>"
            f"<td>{html.escape(r.output[:400])}</td></tr>" for r in rows]
    return "\n".join(out) + "</table></div>"


def rewrite_section(stages: Records) -> str:
    arm = stages.get("rewrite_1")
    if not isinstance(arm, RewriteResult):
        return f"<p>{NO_REWRITE}</p>"
    rewriter = f"{arm.rewriter} ({arm.rewriter_checkpoint})"
    # Why rewrites failed (cut at max_tokens, empty): the rewriter's summary counts each reason.
    reasons = ", ".join(f"{why}: {n}" for why, n in arm.summary.failures.items())
    parts = [f"<p>M1 trained on the seed and the curated A_1, against the same with A_1's responses rewritten by "
             f"{html.escape(rewriter)}; a pair whose rewrite failed is left out ({arm.not_rewritten} of "
             f"{arm.curated}{html.escape(f'; {reasons}' if reasons else '')}).</p>",
             _table(("model", "A_1 pairs", "training examples", *EVAL_HEADER[1:]), rewrite_rows(stages, arm)),
             rewrite_examples(arm.rewritten_file)]
    return "\n".join(parts)


# --- stage metrics (`stage_*` records: see humpback.loop.run) ------------------------------------------

STAGE_TABLES = (
    ("Backward model on held-out pairs (eval backward: instruction_nll lower is better, the others higher)",
     "stage_backward_"),
    ("Scorer on held-out pairs and negatives built from them (eval scorer; threshold: the k its iteration "
     "selected with, at which precision_at_k and recall_at_k count)", "stage_scorer_"),
)


def metric_cell(m: Metric | None) -> str:
    """A `Metric` as "value [lo, hi] (n=N)"; "-" where nothing was measured (or a stage did not measure it)."""
    if m is None:
        return "-"
    n = f"(n={m.n})"
    if m.value is None:
        return f"- {n}"
    ci = m.ci95
    shown = str(int(m.value)) if ci is None and float(m.value).is_integer() else f"{m.value:.3f}"
    return f"{shown} [{ci[0]:.3f}, {ci[1]:.3f}] {n}" if ci else f"{shown} {n}"


def _stage_label(name: str) -> str:
    what = name.removeprefix("stage_")
    labels = {"backward_base": "backward, base weights", "backward_myx": "M_yx", "candidates": "candidates of augment"}
    return labels.get(what) or "scorer " + what.removeprefix("scorer_").upper()


def _stage_order(name: str) -> tuple[int, str]:
    """base before M_yx, then scorers by iteration (M10 after M2)."""
    tail = name.rsplit("_", 1)[-1]
    return (0 if tail == "base" else int(tail[1:]) + 1 if tail[1:].isdigit() else 1), name


def stage_rows(records: dict[str, StageMetrics]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, rows) of stage records: one row per record, one column per metric any of them has; a
    scorer's scoring and threshold before the metrics. A skipped stage says why in its model column."""
    metrics: list[str] = []
    for res in records.values():
        metrics += [m for m in res.metrics if m not in metrics]
    scorers = all(isinstance(res, ScorerMetrics) for res in records.values())
    rows = []
    for name in sorted(records, key=_stage_order):
        res = records[name]
        model = f"not measured: {res.skipped}" if res.skipped else res.model
        extra = (res.scoring, _plain(res.threshold)) if isinstance(res, ScorerMetrics) else ()
        rows.append((_stage_label(name), model, *extra, *(metric_cell(res.metrics.get(m)) for m in metrics)))
    return ("stage", "model", *(("scoring", "threshold") if scorers else ()), *metrics), rows


def _plain(value: float | int | str | None) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def stage_tables(stages: Records) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """(title, header, rows) of each stage-metrics table of a run, in the report's order; none for a run
    with `eval.stage_metrics` off."""
    tables = []
    for title, prefix in STAGE_TABLES:
        records = {n: r for n, r in stages.items() if n.startswith(prefix) and isinstance(r, StageMetrics)}
        if records:
            tables.append((title, *stage_rows(records)))
    cand = stages.get("stage_candidates")
    if isinstance(cand, CandidateQuality):
        tables.append(("Candidates (usable_rate: usable / segments sent; the others: diversity of their instructions)",
                       *stage_rows({"stage_candidates": cand})))
        if cand.rejections:
            tables.append(("Candidates: augment's counts (each rejection kind; resampled: extra requests, rescued: "
                           "segments a resample saved)", ("count", "value"),
                           [(k, str(v)) for k, v in cand.rejections.items()]))
    return tables


CELLS = "Each cell: value [95% bootstrap interval] (n: items measured); - where nothing was measured."
NO_STAGES = "No stage metrics in this run: it was recorded before they existed, or with eval.stage_metrics off."


def stage_section(stages: Records) -> str:
    tables = stage_tables(stages)
    if not tables:
        return f"<p>{NO_STAGES}</p>"
    parts = [f"<p>{CELLS}</p>"] + [f"<h3>{html.escape(title)}</h3>" + _table(header, rows)
                                   for title, header, rows in tables]
    cand = stages.get("stage_candidates")
    if isinstance(cand, CandidateQuality) and cand.plot.is_file():
        parts.append("<h3>Root verbs and their direct objects of the candidates' instructions</h3>"
                     + _img(cand.plot.read_bytes()))
    return "\n".join(parts)


def stage_markdown(run_dir: Path, stages: Records) -> str:
    tables = stage_tables(stages)
    parts = [f"# Stage metrics of {run_dir.name}", "", CELLS if tables else NO_STAGES, ""]
    for title, header, rows in tables:
        parts += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        parts.append("")
    return "\n".join(parts)


# A table wider than the page (the stage metrics have a column per metric) scrolls inside its box
# (`.wide`); the page itself never runs off its right edge.
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
.wide{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}td{overflow-wrap:break-word;max-width:40em}
h2{margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:15px;margin-top:1.4em}img{max-width:100%;height:auto}"""


def render(run_dir: Path) -> Path:
    stages = Stages(run_dir).all()
    curates = _curates(stages)
    evals = {n.removeprefix("eval_"): r for n, r in stages.items() if isinstance(r, Evaluation)}
    trains = {n.removeprefix("train_"): r for n, r in stages.items() if isinstance(r, TrainedModel)}
    # The run folder's name, not its path: the page is read on other machines too.
    name = html.escape(run_dir.name)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>humpback run {name}</title>"
             f"<style>{CSS}</style></head><body><h1>humpback run {name}</h1>"]
    parts.append("<h2>What the run produced</h2>" + produced_section(stages))
    parts.append("<h2>Evaluation per model</h2>")
    if evals:
        parts.append(_table(EVAL_HEADER, eval_rows(evals)))
        parts.append(eval_plot(evals))
    else:
        parts.append("<p>No evaluation yet.</p>")
    parts.append("<h2>Rewrite ablation</h2>" + rewrite_section(stages))
    parts.append("<h2>Stage metrics</h2>" + stage_section(stages))
    parts.append("<h2>Self-curation</h2>")
    if curates:
        parts += [score_plot(curates), kept_plot(curates)]
    parts.append("<h2>Examples per score band</h2>" + band_examples(curates))
    if trains:
        parts.append("<h2>Training</h2>" + loss_plot(trains))
        parts.append(_table(("job", "fine-tuned model", "examples", "trained tokens"),
                            [(n, r.fine_tuned_model, r.examples, r.trained_tokens)
                             for n, r in trains.items()]))
    parts.append("<h2>Time and throughput per stage</h2>" + time_plot(stages))
    parts.append(_table(("stage", "time", "throughput"), throughput_rows(stages)))
    parts.append("</body></html>")
    (run_dir / "stage_metrics.md").write_text(stage_markdown(run_dir, stages), encoding="utf-8")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
