"""The run report: built from a run folder's stage records, rendered by headless Chromium."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from collections import Counter

import pytest

from humpback.contracts import InputError, RewrittenCandidate, ScoredCandidate, Source, write_jsonl
from humpback.evaluation.metrics import Metric
from humpback.loop.records import (
    AugmentResult, CandidateQuality, ClientSummary, CurateResult, DataFiles, Evaluation, IfevalScores, LossPoint, NllScores,
    PairwiseScores, RewriteResult, ScorerMetrics, StageMetrics, TrainedModel,
)
from humpback.loop.report import render
from humpback.loop.stages import Stages


# Pairs as the demo's backward model writes them for its corpus (Debian documentation prose): the
# fixture's report is the README's picture of one (docs/report.png).
PAIRS = (
    ("How can I delete a git remote?", "To remove a remote, run git remote remove <name>. All remote-tracking "
     "branches and configuration settings for the remote are removed."),
    ("What is the default mode of vi?", "vi starts in command mode: keys move the cursor and edit text. Press i to "
     "insert text before the cursor and Esc to return to command mode."),
    ("How do I make a Perl script read a file line by line?", "Open the file with open(my $fh, '<', $path) and read "
     "it in a while (my $line = <$fh>) loop; chomp removes the trailing newline."),
    ("What does the G_KEEPERR flag do?", "G_KEEPERR tells call_sv not to clear ERRSV: errors raised inside the "
     "callback are appended to $@ instead of replacing it."),
    ("How can I see which Debian package owns a file?", "dpkg -S /path/to/file searches the installed packages' file "
     "lists; apt-file search finds packages that are not installed."),
    ("Why does Django need a SECRET_KEY?", "Django signs cookies, password reset tokens and messages with SECRET_KEY: "
     "anyone who knows it can forge them, so keep it out of version control."),
    ("How do I write a list comprehension in Python?", "A list comprehension builds a list from an iterable: "
     "[x * x for x in range(10) if x % 2] squares the odd numbers below ten. Use <b>x</b> for emphasis in HTML."),
    ("What is a Debian security update?", "Security updates fix vulnerabilities in the packages of a stable release; "
     "they are published on security.debian.org and installed with apt upgrade."),
)


def evaluation(win_rate=0.4, ci=(0.2, 0.6), ifeval=(0.1, 0.2, 0.3, 0.35), nll=(2.5, (2.2, 2.8)),
               informative=True, position_flip_rate=0.25):
    """An `eval_*` record: its win rate, IFEval (prompt strict, prompt loose, instruction strict and
    loose) and held-out NLL (mean, interval; None: not measured)."""
    return Evaluation(
        model="ft:model",
        ifeval=IfevalScores(n=10, prompt_strict=ifeval[0], prompt_loose=ifeval[1], instruction_strict=ifeval[2],
                            instruction_loose=ifeval[3]),
        pairwise=PairwiseScores(n=8, win_rate=win_rate, ci=ci, wins=2, ties=2, losses=4, judge="judge",
                                baseline="baseline", position_flip_rate=position_flip_rate, informative=informative),
        nll=None if nll is None else NllScores(n=5, mean=nll[0], per_token=nll[0], ci=nll[1], perplexity=12.0))


def trained(name, examples=40, losses=()):
    return TrainedModel(job=f"ftjob-{name}", fine_tuned_model=f"ft:{name}", role="scorer", examples=examples,
                        trained_tokens=9000, losses=[LossPoint(step=s, loss=v) for s, v in losses])


def curated(run, t, scored, **changes):
    """A `curate_t` record over the scored journal `scored`."""
    return CurateResult(
        curated=run / "curate" / f"A{t}.jsonl", scored=scored, dataset=run / "curate" / f"A{t}.dataset",
        scorer=f"ft:scorer:m{t - 1}", served_as="scorer", scoring="rubric", mode="logprobs", k=3.5, selected=23 + t,
        scored_total=60, contaminated=2, contaminated_file=run / "curate" / f"A{t}.contaminated.jsonl",
        kept_per_threshold={"3.0": 30, "4.5": 8 * t}, summary=ClientSummary(results={"scored": 60}), **changes)


def make_run(tmp_path, name="run"):
    """A run folder as the loop leaves it: augment's record, stage records and a scored journal per iteration."""
    run = tmp_path / name
    stages = Stages(run)
    rng = random.Random(0)
    stages.run("augment", lambda: AugmentResult(candidates=run / "augment" / "candidates.jsonl", summary=ClientSummary(
        prepare={"documents": 31, "segments": 412, "kept": 190, "dropped_too_short": 222},
        results={"written": 120, "failed": 8},
        quality={"sent": 128, "usable": 120, "usable_rate": 0.9375})))
    for t in (1, 2):
        scored = run / "curate" / f"scored{t}.jsonl"
        write_jsonl(scored, (ScoredCandidate(
            custom_id=f"score-{i}", candidate_id=f"cand-{i}", instruction=PAIRS[i % len(PAIRS)][0],
            output=PAIRS[i % len(PAIRS)][1], source=Source(path="corpus.jsonl", line=i + 1), mode="logprobs",
            score=round(rng.uniform(1, 5), 2), scorer_model="scorer") for i in range(60)))
        stages.run(f"curate_{t}", lambda: curated(run, t, scored))
    for name in ("m0", "m1", "m2"):
        stages.run(f"train_{name}", lambda: trained(name, losses=[(s, 2.0 - 0.1 * s) for s in range(1, 6)]))
        stages.run(f"eval_{name}", evaluation)
    return run


def test_the_report_names_the_combined_scorer_and_its_p_good_threshold(tmp_path):
    """An iteration curated by `combined` (the loop's default): its scoring and k (a P(good pair)) named, its
    scores shown as probabilities, and no rubric bands for it."""
    run = make_run(tmp_path)
    stage = run / "stages" / "curate_2.json"
    record = json.loads(stage.read_text())
    stage.write_text(json.dumps({**record, "scoring": "combined", "k": 0.62}))  # as a run writes it
    page = render(run).read_text()
    assert "Iteration 2: scorer ft:scorer:m1 (combined) scored 60 of them" in page
    assert "kept <b>25 pairs</b> (score >= 0.62) as A_2." in page
    assert "The best-scored pairs of A_2 (P(good pair)):" in page
    assert "The bands are the rubric's; curate_2 scored with combined." in page


def test_report_has_every_section(tmp_path):
    html = render(make_run(tmp_path)).read_text()
    for heading in ("Evaluation per model", "Rewrite ablation", "Self-curation", "Examples per score band", "Training",
                    "Time and throughput per stage"):
        assert heading in html
    assert html.count('src="data:image/png;base64,') == 5  # eval, scores, kept, loss, time
    assert "&lt;b&gt;x&lt;/b&gt;" in html  # examples are escaped, never injected
    assert "0.400 [0.200, 0.600]" in html


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def chromium(tmp_path, *args: str) -> str:
    """Run headless Chromium (skip where `make setup` did not install it); its stdout."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (make setup installs it)")
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, check=True).stdout


def test_report_renders_in_chromium_within_the_page_width(tmp_path):
    """As a user opens it: every image decodes, and no table or figure runs off the page's right edge,
    the widest part (stage metrics, the rewrite ablation) included, in a window narrower than the page."""
    from humpback.evaluation.diversity import plot_verb_objects

    run = make_run(tmp_path)
    add_stage_metrics(run, plot_verb_objects(Counter({("write", "poem"): 3}), tmp_path / "verbs.png"))
    add_rewrite_arm(run)
    report = render(run)
    # The page's images are decoded by the browser: a broken image would have naturalWidth 0.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", (
        "<script>document.title = [...document.images].map(i => i.naturalWidth).join(',') + '|' + "
        "document.documentElement.scrollWidth + ',' + window.innerWidth;</script></body>")))
    dom = chromium(tmp_path, "--window-size=1000,800", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    images, page = dom.split("<title>")[1].split("</title>")[0].split("|")
    widths = [int(w) for w in images.split(",")]
    assert len(widths) == 6 and all(w > 200 for w in widths), widths
    scroll_width, window_width = map(int, page.split(","))
    assert window_width == 1000 and scroll_width <= window_width, (scroll_width, window_width)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots, not a blank page


def test_the_report_leads_with_what_the_run_produced(tmp_path):
    """Before any evaluation: the corpus read, the candidates, each iteration's kept pairs, and the best
    kept pairs with their scores; the title names the run, never the machine's path to it."""
    page = render(make_run(tmp_path)).read_text()
    assert page.index("<h2>What the run produced</h2>") < page.index("<h2>Evaluation per model</h2>")
    section = page.split("<h2>What the run produced</h2>")[1].split("<h2>")[0]
    assert "read 31 corpus documents (190 of their 412 segments kept" in section
    assert "instruction for 128 segments and 120 of them were usable" in section
    assert "Iteration 1: scorer ft:scorer:m0 (rubric) scored 60 of them (2 dropped before as contaminated) and kept " \
           "<b>24 pairs</b> (score >= 3.5) as A_1." in section
    assert "kept <b>25 pairs</b> (score >= 3.5) as A_2." in section
    rows = cells(section)
    assert rows[0] == ["score", "instruction (written by the backward model)", "response (the corpus passage, start)"]
    scores = [float(r[0]) for r in rows[1:]]
    # The last iteration's best, all kept, one per instruction (the fixture repeats its instructions).
    journal = [ScoredCandidate.model_validate_json(line)
               for line in (tmp_path / "run" / "curate" / "scored2.jsonl").read_text().splitlines()]
    best: dict[str, float] = {}
    for r in sorted(journal, key=lambda r: -r.score):
        best.setdefault(r.instruction, r.score)
    assert scores == list(best.values())[:3] and min(scores) >= 3.5
    assert len({r[1] for r in rows[1:]}) == 3
    assert "<title>humpback run run</title>" in page and "<h1>humpback run run</h1>" in page
    assert str(tmp_path) not in page


def test_a_run_before_augment_says_it_produced_nothing_yet(tmp_path):
    run = tmp_path / "run"
    Stages(run).run("data", lambda: DataFiles(seed=run / "seed.jsonl", corpus=[run / "corpus.jsonl"]))
    page = render(run).read_text()
    assert "No data produced yet: the run has not reached augment." in page
    assert "base64" not in page.split("<h2>Time and throughput per stage</h2>")[0]  # no empty chart


def test_an_uninformative_judge_is_reported_as_such(tmp_path):
    """A win rate from a judge marked uninformative is no result: the table says why instead of showing it."""
    run = make_run(tmp_path)
    Stages(run).run("eval_m3", lambda: evaluation(win_rate=0.5, ci=(0.5, 0.5), position_flip_rate=1.0,
                                                  informative=False))
    html = render(run).read_text()
    assert "judge uninformative (position bias 100%)" in html
    assert "0.500 [0.500, 0.500]" not in html
    assert "0.400 [0.200, 0.600]" in html  # the informative ones are still shown


def _png_width(img: str) -> int:
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(img.split("base64,")[1].split('"')[0]))).width


def test_no_empty_chart(tmp_path):
    """A panel with nothing to draw is left out: the win rate where every judge was uninformative, the
    whole figure where no metric has a value, the loss plot where no job logged a loss."""
    from humpback.loop.report import eval_plot, loss_plot, score_plot

    informative = evaluation()
    biased = evaluation(win_rate=0.5, ci=(0.5, 0.5), position_flip_rate=1.0, informative=False)
    three, two = eval_plot({"m0": informative, "m1": informative}), eval_plot({"m0": biased, "m1": biased})
    assert _png_width(two) < 0.8 * _png_width(three)
    # IFEval always has a value: a figure of that panel alone, no wider than the two-panel one.
    only_ifeval = eval_plot({"m0": evaluation(win_rate=0.5, ci=(0.5, 0.5), position_flip_rate=1.0, informative=False,
                                              nll=None)})
    assert 0 < _png_width(only_ifeval) < _png_width(two)
    assert loss_plot({"m0": trained("m0")}) == ""
    assert score_plot({"curate_1": curated(tmp_path, 1, tmp_path / "gone.jsonl")}) == ""


def add_stage_metrics(run, plot):
    """Stage records as the loop leaves them (`stage_*`), with a skipped one and an unmeasured value."""
    stages = Stages(run)

    def metric(value, lo, hi, n):
        return Metric(value=value, ci95=(lo, hi) if lo is not None else None, n=n)

    stages.run("stage_backward_base", lambda: StageMetrics(model="base", metrics={
        "instruction_nll": metric(3.1, 2.9, 3.3, 32), "rouge_l": metric(0.12, 0.08, 0.16, 32),
        "usable_rate": metric(0.25, 0.125, 0.406, 32), "distinct_2": metric(0.31, 0.22, 0.4, 32)}))
    stages.run("stage_backward_myx", lambda: StageMetrics(model="ft:backward:myx", metrics={
        "instruction_nll": metric(2.4, 2.2, 2.6, 32), "rouge_l": metric(0.2, 0.15, 0.25, 32),
        "usable_rate": metric(0.9, 0.8, 1.0, 32), "distinct_2": metric(0.6, 0.5, 0.7, 32)}))
    for t, auc in ((0, 0.71), (1, 0.64)):
        stages.run(f"stage_scorer_m{t}", lambda: ScorerMetrics(model=f"ft:scorer:m{t}", scoring="pmi", threshold=1.8,
                                                              metrics={
            "auc": metric(auc, auc - 0.1, auc + 0.1, 120), "precision_at_k": metric(None, None, None, 0),
            "mean_score_positive": metric(1.9, 1.8, 2.0, 32)}))
    stages.run("stage_scorer_m2", lambda: ScorerMetrics(model="ft:scorer:m2", scoring="pmi", threshold=1.8,
                                                        skipped="the server was down"))
    stages.run("stage_candidates", lambda: CandidateQuality(model="ft:backward:myx", plot=plot, instructions=128, metrics={
        "usable_rate": metric(0.375, 0.3, 0.45, 128), "unique_root_verbs": metric(9, None, None, 40)},
        rejections={"sent": 128, "usable": 48, "truncated": 70, "empty": 0, "copy": 4, "meta": 6}))


def cells(html_text: str) -> list[list[str]]:
    """The rows of every table of a page, each a list of its cells' text."""
    rows = re.findall(r"<tr>(.*?)</tr>", html_text)
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in rows]


def test_the_stage_metrics_table_shows_each_model_with_intervals(tmp_path):
    from humpback.evaluation.diversity import plot_verb_objects

    plot = plot_verb_objects(Counter({("write", "poem"): 3, ("explain", "code"): 2}), tmp_path / "verbs.png")
    run = make_run(tmp_path)
    add_stage_metrics(run, plot)
    page = render(run).read_text()
    section = page.split("<h2>Stage metrics</h2>")[1].split("<h2>")[0]
    rows = cells(section)
    assert rows[0] == ["stage", "model", "instruction_nll", "rouge_l", "usable_rate", "distinct_2"]
    assert rows[1] == ["backward, base weights", "base", "3.100 [2.900, 3.300] (n=32)", "0.120 [0.080, 0.160] (n=32)",
                       "0.250 [0.125, 0.406] (n=32)", "0.310 [0.220, 0.400] (n=32)"]
    assert rows[2][:3] == ["M_yx", "ft:backward:myx", "2.400 [2.200, 2.600] (n=32)"]
    assert rows[3] == ["stage", "model", "scoring", "threshold", "auc", "precision_at_k", "mean_score_positive"]
    # One row per scorer, in iteration order; an unmeasured value is "-" with its n; a skipped stage says why.
    assert rows[4] == ["scorer M0", "ft:scorer:m0", "pmi", "1.8", "0.710 [0.610, 0.810] (n=120)", "- (n=0)",
                       "1.900 [1.800, 2.000] (n=32)"]
    assert rows[5][:5] == ["scorer M1", "ft:scorer:m1", "pmi", "1.8", "0.640 [0.540, 0.740] (n=120)"]
    assert rows[6] == ["scorer M2", "not measured: the server was down", "pmi", "1.8", "-", "-", "-"]
    assert rows[7:9] == [["stage", "model", "usable_rate", "unique_root_verbs"],
                         ["candidates of augment", "ft:backward:myx", "0.375 [0.300, 0.450] (n=128)", "9 (n=40)"]]
    assert dict(rows[10:]) == {"sent": "128", "usable": "48", "truncated": "70", "empty": "0", "copy": "4", "meta": "6"}
    assert section.count('src="data:image/png;base64,') == 1  # the verbs and objects figure
    # The same tables in Markdown, for the README and the benchmark.
    markdown = (run / "stage_metrics.md").read_text()
    assert "| scorer M0 | ft:scorer:m0 | pmi | 1.8 | 0.710 [0.610, 0.810] (n=120) | - (n=0) |" in markdown
    assert "| candidates of augment | ft:backward:myx | 0.375 [0.300, 0.450] (n=128) | 9 (n=40) |" in markdown


def test_a_run_without_stage_metrics_still_renders(tmp_path):
    run = make_run(tmp_path)
    page = render(run).read_text()
    assert "No stage metrics in this run" in page.split("<h2>Stage metrics</h2>")[1].split("<h2>")[0]
    assert "No stage metrics in this run" in (run / "stage_metrics.md").read_text()
    # Candidates of an augment that sent nothing: no counts table, and no figure whose file is gone.
    Stages(run).run("stage_candidates", lambda: CandidateQuality(
        model="ft:backward:myx", plot=tmp_path / "gone.png", instructions=20, rejections={},
        metrics={"verb_rate": Metric(value=0.5, ci95=(0.4, 0.6), n=20)}))
    section = render(run).read_text().split("<h2>Stage metrics</h2>")[1].split("<h2>")[0]
    assert cells(section) == [["stage", "model", "verb_rate"],
                              ["candidates of augment", "ft:backward:myx", "0.500 [0.400, 0.600] (n=20)"]]
    assert "base64" not in section


def test_a_record_of_an_older_version_names_its_file_and_field(tmp_path):
    """No shims for older runs: a stage record that does not fit its model is one line naming the file and
    the field, not a report with holes."""
    run = make_run(tmp_path)
    stage = run / "stages" / "curate_1.json"
    record = json.loads(stage.read_text())
    del record["scoring"]
    stage.write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"curate_1.json: field scoring: Field required \(a record of an older"):
        render(run)


def add_rewrite_arm(run, evaluated=True):
    """The rewrite arm's records as the loop leaves them: 5 of 6 curated pairs rewritten, M1 trained again."""
    stages = Stages(run)
    rewritten = run / "rewrite" / "A1.rewritten.jsonl"
    write_jsonl(rewritten, (RewrittenCandidate(
        custom_id=f"rw-{i}", candidate_id=f"cand-{i}", instruction=f"Question {i} <i>?</i>",
        output=f"Rewritten answer {i} " + "y" * 500, original_output=f"Web text {i} <script>", model="scorer",
        source=Source(path="corpus.jsonl", line=i + 1)) for i in range(5)))
    stages.run("rewrite_1", lambda: rewrite_arm(run, rewritten, curated=6, rewritten=5))
    stages.run("train_m1_rewritten", lambda: trained("m1_rewritten", examples=39))
    if evaluated:
        stages.run("eval_m1_rewritten", lambda: evaluation(win_rate=0.6, ci=(0.45, 0.75), ifeval=(0.3, 0.4, 0.5, 0.55),
                                                           nll=(2.1, (1.9, 2.3))))


def rewrite_arm(run, rewritten_file, curated, rewritten, failures=None):
    """A `rewrite_1` record: `curated` pairs sent, `rewritten` back (rewritten by M0 on the scorer server)."""
    return RewriteResult(candidates=run / "rewrite" / "A1.candidates.jsonl", rewritten_file=rewritten_file,
                         rewriter="scorer", rewriter_checkpoint="ftjob-m0", curated=curated, rewritten=rewritten,
                         not_rewritten=curated - rewritten, summary=ClientSummary(failures=failures or {}))


def rewrite_part(page: str) -> str:
    return page.split("<h2>Rewrite ablation</h2>")[1].split("<h2>")[0]


def test_the_rewrite_ablation_shows_both_m1s_side_by_side_with_examples(tmp_path):
    run = make_run(tmp_path)
    add_rewrite_arm(run)
    page = render(run).read_text()
    section = rewrite_part(page)
    rows = cells(section)
    assert rows[0] == ["model", "A_1 pairs", "training examples", "win rate [95% CI]", "IFEval prompt strict",
                       "IFEval prompt loose", "IFEval instruction loose", "held-out NLL [95% CI]"]
    assert rows[1] == ["M1 (curated originals)", "6 curated", "40", "0.400 [0.200, 0.600]", "0.100", "0.200", "0.350",
                       "2.500 [2.200, 2.800]"]
    assert rows[2] == ["M1-rewritten (curated rewrites)", "5 of 6 rewritten", "39", "0.600 [0.450, 0.750]", "0.300",
                       "0.400", "0.550", "2.100 [1.900, 2.300]"]
    assert "scorer (ftjob-m0)" in section and "left out (1 of 6)" in section
    # Three examples, each escaped and cut for display.
    assert rows[3] == ["instruction", "original response (start)", "rewritten response (start)"]
    assert len(rows) == 7
    assert rows[4][:2] == ["Question 0 &lt;i&gt;?&lt;/i&gt;", "Web text 0 &lt;script&gt;"]
    assert rows[4][2].startswith("Rewritten answer 0 ") and len(rows[4][2]) == 400
    assert "<script>" not in page
    # M1-rewritten is a model of the evaluation table too, as the control is.
    assert "<td>m1_rewritten</td>" in page.split("<h2>Evaluation per model</h2>")[1].split("<h2>")[0]


def test_the_rewrite_ablation_before_its_evaluation_or_without_the_arm(tmp_path):
    run = make_run(tmp_path)
    assert "No rewrite ablation in this run" in rewrite_part(render(run).read_text())
    add_rewrite_arm(run, evaluated=False)
    rows = cells(rewrite_part(render(run).read_text()))
    assert rows[2] == ["M1-rewritten (curated rewrites)", "5 of 6 rewritten", "39", "-", "-", "-", "-", "-"]


def test_a_rewrite_arm_whose_rewrites_all_failed_says_why(tmp_path):
    run = make_run(tmp_path)
    rewritten = run / "rewrite" / "A1.rewritten.jsonl"
    rewritten.parent.mkdir(parents=True)
    rewritten.write_text("")
    Stages(run).run("rewrite_1", lambda: rewrite_arm(
        run, rewritten, curated=12, rewritten=0, failures={"rewrite truncated at max_tokens": 12}))
    section = rewrite_part(render(run).read_text())
    assert "left out (12 of 12; rewrite truncated at max_tokens: 12)" in section
    assert "No pair was rewritten: M1-rewritten learnt from the seed alone." in section
    assert cells(section)[2][:2] == ["M1-rewritten (curated rewrites)", "0 of 12 rewritten"]
