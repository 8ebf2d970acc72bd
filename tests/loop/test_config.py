"""The run config (defaults, the quick preset, files and overrides) and the stage bookkeeping."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from client.augment import AugmentConfig
from client.curate import CurateConfig
from client.rewrite import RewriteConfig
from humpback.contracts import QUALITY_MODEL_DIR
from humpback.loop.cli import RunArgs
from humpback.loop.config import RunConfig, load_config
from humpback.settings import flags, from_args, parser_flags
from tests.subcommand import subcommand
from trainer.config import PRESETS


def test_defaults_are_the_cpu_demo():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.iterations == 2
    assert cfg.curate.min_score == 4.5
    assert cfg.data.build_demo and cfg.services.start


def test_augment_and_curate_are_the_clients_configs_with_the_demo_values():
    cfg = load_config()
    assert isinstance(cfg.augment, AugmentConfig) and isinstance(cfg.curate, CurateConfig)
    assert cfg.augment == AugmentConfig(max_tokens=96)
    assert cfg.curate.top_fraction == 0.25 and CurateConfig().top_fraction is None
    # The loop's scorer is `combined` (it calibrates one each iteration); `humpback curate`'s stays the rubric.
    assert cfg.curate.model_dump(exclude={"thresholds"}) == CurateConfig(top_fraction=0.25,
                                                                         scorer="combined").model_dump()
    assert CurateConfig().scorer == "rubric" and cfg.curate.calibrates()
    assert not load_config(overrides=["curate.calibration=c.json"]).curate.calibrates()
    # A section given in part keeps the demo's other values.
    partial = load_config(overrides=["augment.seed=1", "curate.mode=free_text"])
    assert (partial.augment.seed, partial.augment.max_tokens) == (1, 96)
    assert (partial.curate.mode, partial.curate.top_fraction) == ("free_text", 0.25)
    assert load_config(overrides=["curate.top_fraction=null"]).curate.top_fraction is None  # the paper's rule
    assert load_config(overrides=["augment.temperature=0.2"]).augment.temperature == 0.2


@pytest.mark.parametrize("override", ["curate.top_fraction=0", "curate.top_fraction=1.5"])
def test_top_fraction_is_validated_by_the_clients_config(override):
    with pytest.raises(ValidationError, match="curate.top_fraction"):
        load_config(overrides=[override])


@pytest.mark.parametrize("override", ["augment.model=x", "augment.limit=3", "curate.scored=s.jsonl",
                                      "rewrite.checkpoint=ftjob-1", "rewrite.shard=0/2"])
def test_values_the_loop_sets_per_stage_are_refused(override):
    with pytest.raises(ValidationError, match="set by the loop"):
        load_config(overrides=[override])


def test_the_rewrite_arm_is_the_clients_rewrite_config_on_by_default():
    cfg = load_config()
    assert isinstance(cfg.rewrite, RewriteConfig)
    # The demo's rewriter is the larger instruct model, on a server of its own for the stage.
    assert cfg.rewrite.enabled and cfg.rewrite.url is None and cfg.rewrite.model_dir == QUALITY_MODEL_DIR
    assert cfg.rewrite.model_dump(exclude={"enabled", "url", "api_key", "model_dir", "port"}) == \
        RewriteConfig(max_tokens=768).model_dump()
    quick = load_config(quick=True).rewrite
    # The loop test runs the arm, briefly, with M0 on the scorer server (only `make setup`'s model).
    assert quick.enabled and quick.model_dir is None and quick.max_tokens < cfg.rewrite.max_tokens
    assert load_config(overrides=["rewrite.enabled=false"]).rewrite.enabled is False
    assert load_config(quick=True, overrides=["rewrite.enabled=false"]).rewrite.enabled is False
    # The rewriter's model is the loop's to name on the scorer server; on another server, the user's.
    with pytest.raises(ValidationError, match="rewrite.model names a model of rewrite.url"):
        load_config(overrides=["rewrite.model=scorer"])
    other = load_config(overrides=["rewrite.url=http://aligned:8000", "rewrite.model=big-chat"]).rewrite
    assert (other.url, other.model, other.max_tokens) == ("http://aligned:8000", "big-chat", 768)
    with pytest.raises(ValidationError, match="rewrite.max_tokens"):
        load_config(overrides=["rewrite.max_tokens=0"])


def test_presets_are_the_trainers():
    for name in PRESETS:
        assert load_config(overrides=[f"train.forward_preset={name}"]).train.forward_preset == name
    with pytest.raises(ValidationError, match="backward_preset"):
        load_config(overrides=["train.backward_preset=nope"])


def test_run_flags_are_run_args_fields():
    parser = subcommand("run")
    assert parser_flags(parser) == set(flags(RunArgs)) | {"--no-quick", "--no-check"}
    assert {"--config", "--quick", "--out", "--set"} <= parser_flags(parser)
    assert from_args(RunArgs, parser.parse_args([])) == RunArgs()
    args = from_args(RunArgs, parser.parse_args(["--quick", "--out", "r", "--set", "a.b=1", "--set", "c.d=2"]))
    assert (args.quick, args.out, args.overrides) == (True, Path("r"), ["a.b=1", "c.d=2"])
    assert (args.check, RunArgs().out) == (False, None)  # runs/demo, or runs/CONFIG_NAME


def test_quick_shrinks_sizes():
    quick, full = load_config(quick=True), load_config()
    assert quick.iterations == 1
    assert quick.data.max_segments < full.data.max_segments
    assert quick.train.forward_preset == "cpu-test"
    assert (quick.augment.max_tokens, quick.curate.top_fraction, quick.data.calibration_pairs) == (48, 1.0, 8)


def test_stage_metrics_are_on_by_default_within_the_demos_budget():
    full, quick = load_config(), load_config(quick=True)
    assert full.eval.stage_metrics and quick.eval.stage_metrics
    # The demo's held-out set has ~48 pairs; 16 of them keep the combined scorer's measurement to a minute on 2 cores.
    assert (full.eval.stage_pairs, quick.eval.stage_pairs) == (16, 4)
    off = load_config(overrides=["eval.stage_metrics=false", "eval.stage_pairs=null"])
    assert (off.eval.stage_metrics, off.eval.stage_pairs) == (False, None)
    with pytest.raises(ValidationError, match="eval.stage_pairs"):
        load_config(overrides=["eval.stage_pairs=0"])


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
    from humpback.loop.records import TrainedModel
    from humpback.loop.stages import Stages

    stages = Stages(tmp_path)

    def interrupted() -> TrainedModel:
        stages.save_state("train_m0", job="ftjob-1")
        raise KeyboardInterrupt

    def trained(examples: int) -> TrainedModel:
        return TrainedModel(job=str(stages.state("train_m0").job), fine_tuned_model="ft:m0", role="scorer",
                            examples=examples)

    with pytest.raises(KeyboardInterrupt):
        stages.run("train_m0", interrupted)
    result = stages.run("train_m0", lambda: trained(1))
    assert result.job == "ftjob-1"  # the second attempt found the first one's progress
    assert result.examples == 1 and result.attempts == 2 and result.since_first_start_s >= result.elapsed_s
    assert stages.run("train_m0", lambda: trained(2)).examples == 1  # finished: skipped
    assert set(stages.all()) == {"train_m0"}


def test_the_stack_key_comes_from_the_environment_below_file_and_set(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HUMPBACK_API_KEY", "from-env")
    assert load_config().services.api_key == "from-env"
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text('{"services": {"api_key": "from-file"}}')
    assert load_config(cfg_file).services.api_key == "from-file"
    assert load_config(cfg_file, overrides=["services.api_key=from-set"]).services.api_key == "from-set"


def test_the_saved_config_holds_no_key_and_a_rerun_takes_it_from_the_environment(monkeypatch, tmp_path) -> None:
    from humpback.loop.config import SECRETS
    from humpback.loop.run import Loop

    monkeypatch.setenv("HUMPBACK_API_KEY", "s3cret")
    monkeypatch.setenv("HUMPBACK_REWRITE_API_KEY", "rewriter-s3cret")
    monkeypatch.setenv("HUMPBACK_JUDGE_API_KEY", "judge-s3cret")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = run_dir / "config.json"
    saved.write_text("{}")
    saved.chmod(0o644)  # left by an earlier run, readable by all
    cfg = load_config(overrides=["data.build_demo=false"])
    # The run saves its config first; with no data to build, it stops at the first stage.
    with pytest.raises(ValueError, match="data.seed"):
        Loop(cfg, run_dir).run()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert (cfg.rewrite.api_key, cfg.eval.judge_api_key) == ("rewriter-s3cret", "judge-s3cret")
    assert "s3cret" not in saved.read_text()
    record = RunConfig.model_validate_json(saved.read_text())
    assert (record.services.api_key, record.rewrite.api_key, record.eval.judge_api_key) == (None, None, None)
    assert record.model_dump(exclude=SECRETS) == cfg.model_dump(exclude=SECRETS)
    # Given back as the config of a re-run, the file leaves the keys to the environment.
    again = load_config(saved)
    assert (again.services.api_key, again.rewrite.api_key, again.eval.judge_api_key) == (
        "s3cret", "rewriter-s3cret", "judge-s3cret")


def test_the_client_stages_run_on_the_ray_cluster_the_config_names(tmp_path: Path) -> None:
    """`services.ray` places augment, curate and rewrite on a cluster; a stage's own `ray` beats it; neither
    runs the stage here. (The Ray path itself is tested on a real cluster: tests/client/test_cluster.py.)"""
    from client.fanout import FanoutConfig
    from client.runner import RunSummary
    from humpback.loop.run import Loop

    placed: list[tuple] = []

    def on_ray(*call):
        placed.append(call)
        return RunSummary()

    async def here(*call):
        placed.append(("here", *call))
        return RunSummary()

    call = (["corpus.jsonl"], tmp_path / "out.jsonl", FanoutConfig(endpoints=["http://127.0.0.1:1"]))
    Loop(load_config(overrides=["services.ray=auto"]), tmp_path).client(here, on_ray, *call, AugmentConfig(), None)
    Loop(load_config(overrides=["services.ray=auto"]), tmp_path).client(here, on_ray, *call,
                                                                        CurateConfig(ray="head:6379"))
    Loop(load_config(), tmp_path).client(here, on_ray, *call, RewriteConfig())
    assert [c[3].ray for c in placed[:2]] == ["auto", "head:6379"] and placed[0][4] is None
    assert placed[2][0] == "here" and placed[2][4].ray is None
    assert load_config(overrides=["augment.ray=local", "augment.shards=2"]).augment.shards == 2


def test_branches_run_side_by_side_and_an_error_waits_for_the_others() -> None:
    import threading
    import time

    from humpback.loop.stages import concurrently

    both_started = threading.Barrier(2, timeout=5)  # breaks unless the two run at once

    def branch(value: int) -> int:
        both_started.wait()
        return value

    assert concurrently(lambda: branch(1), lambda: branch(2)) == [1, 2]
    finished: list[str] = []

    def slow() -> None:
        time.sleep(0.2)
        finished.append("slow")

    def failing() -> None:
        raise ValueError("stage failed")

    with pytest.raises(ValueError, match="stage failed"):
        concurrently(failing, slow)
    assert finished == ["slow"]  # raised once the other branch had ended, not before

    # Ctrl-C in this thread is raised at once, while the other branch still runs (a daemon: it ends with the run)
    release = threading.Event()

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        concurrently(interrupted, lambda: release.wait(30))
    assert any(t.name == "branch-1" and t.is_alive() and t.daemon for t in threading.enumerate())
    release.set()
