"""The run config (defaults, the quick preset, files and overrides) and the stage bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from humpback.loop.config import load_config


def test_defaults_are_the_cpu_demo():
    cfg = load_config()
    assert cfg.iterations == 2
    assert cfg.curate.min_score == 4.5
    assert cfg.data.build_demo and cfg.services.start


def test_quick_shrinks_sizes():
    quick, full = load_config(quick=True), load_config()
    assert quick.iterations == 1
    assert quick.data.max_segments < full.data.max_segments
    assert quick.train.forward_preset == "cpu-test"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("iterations: 3\ncurate:\n  min_score: 4.0\n")
    cfg = load_config(path, overrides=["curate.mode=free_text", "data.max_seed=7", "eval.nll=false"])
    assert (cfg.iterations, cfg.curate.min_score, cfg.curate.mode) == (3, 4.0, "free_text")
    assert cfg.data.max_seed == 7 and cfg.eval.nll is False
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"services": {"api_key": "k"}}))
    assert load_config(json_path).services.api_key == "k"


@pytest.mark.parametrize("override", ["curate.min_scor=4", "curate.mode=loud", "nosection=1"])
def test_bad_values_are_refused(override):
    with pytest.raises(ValidationError):
        load_config(overrides=[override])


def test_override_needs_equals():
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(overrides=["curate.min_score"])


def test_stages_skip_finished_and_count_attempts(tmp_path: Path) -> None:
    from humpback.loop.stages import Stages

    stages = Stages(tmp_path)

    def interrupted() -> dict:
        stages.save_state("s", {"job": "ftjob-1"})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run("s", interrupted)
    calls: list[str] = []
    result = stages.run("s", lambda: calls.append(stages.state("s")["job"]) or {"out": 1})
    assert calls == ["ftjob-1"]  # the second attempt found the first one's progress
    assert result["out"] == 1 and result["attempts"] == 2 and result["since_first_start_s"] >= result["elapsed_s"]
    assert stages.run("s", lambda: {"out": 2})["out"] == 1  # finished: skipped
    assert set(stages.all()) == {"s"}
