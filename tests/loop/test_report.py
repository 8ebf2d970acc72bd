"""The run report: built from a run folder's stage records, rendered by headless Chromium."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from humpback.contracts import ScoredCandidate, Source, write_jsonl
from humpback.loop.report import render
from humpback.loop.stages import Stages


def make_run(tmp_path):
    """A run folder as the loop leaves it: stage records and a scored journal per iteration."""
    run = tmp_path / "run"
    stages = Stages(run)
    rng = random.Random(0)
    for t in (1, 2):
        scored = run / "curate" / f"scored{t}.jsonl"
        write_jsonl(scored, (ScoredCandidate(
            custom_id=f"score-{i}", candidate_id=f"cand-{i}", instruction=f"Question {i}?",
            output=f"Answer {i} <b>x</b>", source=Source(path="corpus.jsonl", line=i + 1), mode="logprobs",
            score=round(rng.uniform(1, 5), 2), scorer_model="scorer") for i in range(60)))
        stages.run(f"curate_{t}", lambda: {"scored": str(scored), "scorer": f"m{t - 1}",
                                           "kept_per_threshold": {"3.0": 30, "4.5": 8 * t},
                                           "summary": {"results": {"scored": 60}}})
    for name in ("m0", "m1", "m2"):
        stages.run(f"train_{name}", lambda: {"fine_tuned_model": f"ft:{name}", "examples": 40, "trained_tokens": 9000,
                                             "losses": [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 6)]})
        stages.run(f"eval_{name}", lambda: {
            "ifeval": {"n": 10, "prompt_strict": 0.1, "prompt_loose": 0.2, "instruction_strict": 0.3, "instruction_loose": 0.35},
            "pairwise": {"n": 8, "win_rate": 0.4, "ci": [0.2, 0.6]},
            "nll": {"n": 5, "mean": 2.5, "ci": [2.2, 2.8]}})
    return run


def test_report_has_every_section(tmp_path):
    html = render(make_run(tmp_path)).read_text()
    for heading in ("Evaluation per model", "Self-curation", "Examples per score band", "Training",
                    "Time and throughput per stage"):
        assert heading in html
    assert html.count('src="data:image/png;base64,') == 5  # eval, scores, kept, loss, time
    assert "&lt;b&gt;x&lt;/b&gt;" in html  # examples are escaped, never injected
    assert "0.400 [0.200, 0.600]" in html


def test_report_renders_in_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs it)")
    report = render(make_run(tmp_path))
    # The page's images are decoded by the browser: a broken image would have naturalWidth 0.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>", "<script>document.title = [...document.images].map(i => i.naturalWidth).join(',');</script></body>"))
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    title = dom.split("<title>")[1].split("</title>")[0]
    widths = [int(w) for w in title.split(",")]
    assert len(widths) == 5 and all(w > 200 for w in widths), widths
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # plots, not a blank page
