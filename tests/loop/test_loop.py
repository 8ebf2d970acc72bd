"""The loop: its side of the trainer (wire models, the deploy route) and how it starts the trainer,
without model servers; then the quick loop end to end on the real servers and the real trainer,
resumed after interruptions between stages and inside them."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from client.curate import CurateConfig
from client.fanout import FanoutConfig
from humpback.contracts import CreateJobRequest, Deployment, JobError, JobFailed, ServeError, TrainingStep
from humpback.evaluation.records import IFEvalRow, NllRow, PairwiseRow
from humpback.loop.config import ServicesConfig
from humpback.loop.records import (
    CalibrationResult, ClientSummary, CurateResult, DataFiles, StageMetrics, TrainedModel,
)
from humpback.loop.services import ensure_servers, ensure_trainer
from humpback.loop.stages import Stages
from humpback.loop.trainer_client import TrainerClient, swaps, training_steps
from services.hotswap import SwapResult, swap_checkpoint
from services.registry import Registry, record_swap
from tests.conftest import MODEL_DIR, humpback
from trainer.api import create_app
from trainer.config import ServiceSettings
from trainer.store import Store, now

TRAINER_PORT = 18100
KEY = "loop-test-key"
# A model a stage is handed but does not reach in the test (it returns before, or talks to `rewrite.url`).
UNUSED_MODEL = TrainedModel(job="unused", fine_tuned_model="ft:unused", role="scorer", examples=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the trainer, as the loop sees it ---------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path: Path) -> tuple[TrainerClient, Store]:
    """The loop's client on the trainer's app in-process (no worker: jobs stay as the test puts them),
    and the trainer's store."""
    settings = ServiceSettings(data_dir=tmp_path / "trainer", api_key=KEY, registry=tmp_path / "registry.json",
                               backward_url="http://127.0.0.1:9", scorer_url="http://127.0.0.1:9")
    app = create_app(settings)
    client = TrainerClient("http://testserver", KEY)
    client.http.close()
    client.http = TestClient(app, base_url="http://testserver/v1", headers={"Authorization": f"Bearer {KEY}"})
    return client, app.state.service.store


def test_trainer_client_reads_the_wire_models(trainer, tmp_path: Path) -> None:
    client, store = trainer
    examples = tmp_path / "train.jsonl"
    examples.write_text('{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\n')
    file = client.upload(examples)
    assert (file.filename, file.bytes) == ("train.jsonl", examples.stat().st_size)
    job = client.create_job(CreateJobRequest(model="scorer", training_file=file.id, suffix="m1",
                                             metadata={"deploy_to": "scorer"}, seed=0))
    assert client.job(job.id) == job and job.status == "queued"

    # Events come back oldest first across the API's pages of 100.
    for i in range(150):
        store.add_event(job.id, f"event {i}", data={"step": i}, type="metrics")
    events = client.events(job.id)
    assert [e.message for e in events] == ["Created fine-tuning job: " + job.id] + [f"event {i}" for i in range(150)]
    assert events[-1].data == {"step": 149} and events[-1].type == "metrics"

    # A succeeded job the scorer serves already: the deploy answers without a swap (no server listens).
    final = tmp_path / "trainer" / "checkpoints" / job.id / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    store.update_job(job.id, export_dir=str(final))
    store.transition(job.id, ("queued",), "succeeded", fine_tuned_model="ft:scorer:humpback:m1:x", finished_at=now())
    record_swap(tmp_path / "registry.json", "scorer", job.id, str(final), "reload", "ft:scorer:humpback:m1:x")
    assert client.wait(job.id, poll=0).fine_tuned_model == "ft:scorer:humpback:m1:x"
    assert client.deploy(job.id, "scorer") == Deployment(
        fine_tuning_job_id=job.id, fine_tuned_model="ft:scorer:humpback:m1:x", role="scorer", swapped=False)
    with pytest.raises(JobFailed, match="trainer answered 502: .*not deployed to backward"):
        client.deploy(job.id, "backward")

    failed = client.create_job(CreateJobRequest(model="scorer", training_file=file.id))
    store.transition(failed.id, ("queued",), "failed", error=JobError(code="training_failed", message="boom"))
    with pytest.raises(JobFailed, match=f"^job {failed.id} failed: training_failed: boom$"):
        client.wait(failed.id, poll=0)


def test_the_loop_reads_a_jobs_loss_curve_and_swaps_from_its_events(trainer, tmp_path: Path) -> None:
    """The trainer's events as the loop reads them: the training steps by step (not the validation
    losses), and the hot-swaps (not the other events with data)."""
    client, store = trainer
    examples = tmp_path / "train.jsonl"
    examples.write_text('{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\n')
    job = client.create_job(CreateJobRequest(model="scorer", training_file=client.upload(examples).id))
    steps = [TrainingStep(step=s, total_steps=2, train_loss=2.0 / s, num_tokens=100 * s, step_tokens=100,
                          step_time=0.5, tokens_per_second=200.0) for s in (2, 1)]
    for step in steps:
        store.add_event(job.id, f"Step {step.step}", data=step.model_dump(), type="metrics")
    store.add_event(job.id, "Step 2: validation loss=1.5", data={"step": 2, "valid_loss": 1.5}, type="metrics")
    store.add_event(job.id, "Checkpoint created at step 2", data={"step": 2})
    swap = SwapResult(role="scorer", servers=["scorer"], urls=["http://127.0.0.1:9"], version=job.id, method="reload",
                      checkpoint="/ckpt", served_model="ft:scorer:x", stall_s=0.25)
    store.add_event(job.id, "Deployed to scorer: requests stalled 0.25 s", data=swap.model_dump())
    events = client.events(job.id)
    assert training_steps(events) == steps[::-1]
    assert swaps(events) == [swap]


def test_services_that_do_not_answer_are_not_started_when_told_so(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = ServicesConfig(backward_url=dead, scorer_url=dead, trainer_url=dead, start=False)
    with pytest.raises(ServeError, match=f"model servers at {dead} / {dead} do not answer"):
        ensure_servers(cfg)
    with pytest.raises(ServeError, match=f"the trainer at {dead} does not answer"):
        ensure_trainer(cfg, tmp_path / "logs")


def test_ensure_trainer_starts_the_service_from_its_settings(tmp_path: Path) -> None:
    cfg = ServicesConfig(backward_url="http://127.0.0.1:18091", scorer_url="http://127.0.0.1:18092",
                         trainer_url=f"http://127.0.0.1:{free_port()}", api_key=KEY, state_dir=tmp_path / "serve",
                         trainer_data_dir=tmp_path / "trainer")
    ensure_trainer(cfg, tmp_path / "logs", timeout=120)
    pid = int((tmp_path / "trainer" / "trainer.pid").read_text())
    try:
        settings_file = tmp_path / "logs" / "trainer.settings.json"
        assert settings_file.stat().st_mode & 0o777 == 0o600
        assert KEY not in settings_file.read_text()  # the trainer took it from its environment
        settings = ServiceSettings.model_validate_json(settings_file.read_bytes())
        assert (settings.port, settings.data_dir, settings.registry) == (
            int(cfg.trainer_url.rsplit(":", 1)[1]), tmp_path / "trainer", tmp_path / "serve" / "registry.json")
        assert (settings.backward_url, settings.scorer_url) == (cfg.backward_url, cfg.scorer_url)
        # The run's key guards the trainer it started.
        assert httpx.get(f"{cfg.trainer_url}/v1/fine_tuning/jobs").status_code == 401
        jobs = httpx.get(f"{cfg.trainer_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {KEY}"})
        assert (jobs.status_code, jobs.json()["data"]) == (200, [])
        assert (tmp_path / "trainer" / "trainer.sqlite3").is_file()
        ensure_trainer(cfg, tmp_path / "logs", timeout=1)  # answers already: nothing started
        assert int((tmp_path / "trainer" / "trainer.pid").read_text()) == pid
    finally:
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and b"trainer.api" in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the trainer did not stop"
        time.sleep(0.2)


def test_the_backward_model_learns_from_the_short_pairs_of_the_whole_seed_side(tmp_path: Path) -> None:
    from humpback.contracts import DEMONSTRATION_MAX_CHARS, SeedPair, write_jsonl
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop

    def pair(i: int, chars: int, instruction: str = "Why {i}?") -> SeedPair:
        return SeedPair.make(instruction.format(i=i), "x" * chars, "perlfaq", "Artistic")

    seed = [pair(0, 100), pair(1, DEMONSTRATION_MAX_CHARS + 1), pair(2, 50, "Two\nlines {i}?")]
    rest = [pair(3, 300), pair(4, 2000)]
    write_jsonl(tmp_path / "rest.jsonl", rest)
    data = DataFiles(seed=tmp_path / "seed.jsonl", seed_rest=tmp_path / "rest.jsonl", corpus=[])
    loop = Loop(load_config(), tmp_path / "run")
    assert loop.backward_pairs(data, seed) == [seed[0], rest[0]]
    # A seed given by the user has no rest.
    assert loop.backward_pairs(data.model_copy(update={"seed_rest": None}), seed) == [seed[0]]
    paper = Loop(load_config(overrides=["train.backward_examples=seed"]), tmp_path / "run2")
    assert paper.backward_pairs(data, seed) == seed


def test_the_calibration_pairs_are_held_out_of_every_training_set_and_the_evaluation(tmp_path: Path) -> None:
    """The user's own seed: the data stage moves `data.calibration_pairs` pairs of the seed side's rest to
    calibration.jsonl; M0's seed, M_yx's short pairs and the held-out pairs hold none of them."""
    from humpback.contracts import SeedPair, read_jsonl
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop

    seed_file, heldout_file, corpus = tmp_path / "seed.jsonl", tmp_path / "heldout.jsonl", tmp_path / "corpus.txt"
    seed_file.write_text("".join(json.dumps({"instruction": f"Why {i}?", "response": f"Because {i}."}) + "\n"
                                 for i in range(30)))
    heldout_file.write_text("".join(json.dumps({"instruction": f"How {i}?", "response": f"So {i}."}) + "\n"
                                    for i in range(3)))
    corpus.write_text("A passage.\n")
    loop = Loop(load_config(overrides=[f"data.seed={seed_file}", f"data.heldout={heldout_file}",
                                       f"data.corpus=[\"{corpus}\"]", "data.max_seed=20",
                                       "data.calibration_pairs=6"]), tmp_path / "run")
    data = loop.build_data()
    assert data.calibration == tmp_path / "run" / "data" / "calibration.jsonl"
    assert data.calibration_pairs == 6
    ids = {name: {p.id for p in read_jsonl(getattr(data, name), SeedPair)}
           for name in ("seed", "seed_rest", "heldout", "calibration")}
    seed = read_jsonl(data.seed, SeedPair)
    trained = {p.id for p in seed} | {p.id for p in loop.backward_pairs(data, seed)}
    assert len(ids["calibration"]) == 6 and not ids["calibration"] & (trained | ids["heldout"])
    # Moved, not copied: the seed side is the 30 pairs still, 20 of them M0's.
    assert (len(ids["seed"]), len(ids["seed_rest"])) == (20, 4)
    assert len(ids["seed"] | ids["seed_rest"] | ids["calibration"]) == 30


def test_without_calibration_pairs_the_loop_curates_with_pmi_after_one_warning(tmp_path: Path, caplog) -> None:
    """A seed with no pair past data.max_seed leaves nothing to calibrate on: calibrate_t records why and
    curate_t scores with pmi; with a combiner, curate_t scores with it; a given combiner needs no stage."""
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop

    loop = Loop(load_config(), tmp_path / "run")
    assert loop.cfg.curate.scorer == "combined" and loop.cfg.curate.calibrates()
    with caplog.at_level("WARNING"):
        fallback = loop.calibrate(1, UNUSED_MODEL, UNUSED_MODEL, DataFiles(seed=tmp_path / "seed.jsonl", corpus=[]))
    assert fallback.combiner is None and fallback.fallback == "pmi"
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"calibrate_1: the combined scorer cannot be calibrated, curating with pmi: {fallback.reason}"]
    assert loop.scoring(fallback).scorer == "pmi" and loop.scoring(fallback).backward_endpoint is None
    fitted = loop.scoring(CalibrationResult(combiner=tmp_path / "combiner1.json"))
    assert (fitted.scorer, fitted.calibration) == ("combined", tmp_path / "combiner1.json")
    assert fitted.backward_endpoint == loop.cfg.services.backward_url  # the reverse signal: M_yx's server


# --- stage metrics, without servers ---------------------------------------------------------------


def test_the_base_backward_model_is_measured_only_while_it_is_served(tmp_path: Path) -> None:
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop

    loop = Loop(load_config(overrides=[f"services.state_dir={tmp_path / 'serve'}"]), tmp_path / "run")
    assert loop.base_backward_weights() is None  # no registry: a server just started on its base weights
    registry = tmp_path / "serve" / "registry.json"
    record_swap(registry, "backward", "base", "/models/base", "reload", "backward")
    assert loop.base_backward_weights() is None
    # An earlier run's M_yx still served: measuring now would credit it to the base model.
    record_swap(registry, "backward", "ftjob-old", "/ckpt/old", "reload", "ft:backward:old")
    assert loop.base_backward_weights() == "the backward server serves ftjob-old, not its base weights"
    record_swap(registry, "backward", "base", "/models/base", "reload", "backward")
    # Resumed after M_yx's job was created: the trainer may have deployed it at any moment since.
    loop.stages.save_state("train_backward", job="ftjob-1")
    assert "M_yx's training job was started" in loop.base_backward_weights()


def test_stage_metrics_are_recorded_as_stages_against_a_fake_server(tmp_path: Path) -> None:
    """The loop's calls of `eval backward` and `eval scorer`, on a fake that writes one question for every
    response and rates every pair 3."""
    from humpback.loop.config import load_config
    from humpback.loop.evaluate import measure_scorer
    from humpback.loop.run import Loop
    from tests.evaluation.fake_stage_server import StageFake

    pairs = tmp_path / "heldout.jsonl"
    pairs.write_text("".join(json.dumps({"instruction": f"Question {i}?", "response": f"Answer {i}. More."}) + "\n"
                             for i in range(6)))
    server = StageFake(write=lambda prompt: "How do I list the files?").start()
    try:
        cfg = load_config(overrides=[f"services.backward_url={server.url}", "eval.stage_pairs=4",
                                     f"services.state_dir={tmp_path / 'serve'}"])
        loop = Loop(cfg, tmp_path / "run")
        data = DataFiles(seed=tmp_path / "seed.jsonl", heldout=pairs, corpus=[])
        loop.measure_base_backward(data)
        base = loop.stages.result("stage_backward_base")
        assert isinstance(base, StageMetrics) and base.out is not None
        assert base.model == "base" and base.model_dump(mode="json")["metrics"] == json.loads(base.out.read_text())
        assert base.metrics["rouge_l"].n == 4
        assert base.metrics["distinct_2"].value == pytest.approx(1 / 4)  # one question, 4 times
        loop.stages.save_state("train_backward", job="ftjob-1")
        loop.measure_base_backward(data)  # recorded: never measured again
        assert loop.stages.result("stage_backward_base") == base
        # positives, mismatched, first sentences, generic instructions, boilerplate responses
        for threshold, kept in ((3.0, 4 + 4 + 4 + 4 + 4), (3.5, 0)):
            res = measure_scorer(FanoutConfig(endpoints=[server.url]), "fake", "ft:fake", pairs,
                                 tmp_path / f"scorer{threshold}.json", None, threshold, 4, CurateConfig())
            assert res.threshold == threshold and res.metrics["precision_at_k"].n == kept
    finally:
        server.stop()
    off = Loop(load_config(overrides=["eval.stage_metrics=false"]), tmp_path / "off")
    off.measure_base_backward(data)
    assert off.stages.all() == {}


def test_curation_is_decontaminated_against_the_held_out_pairs_and_the_control_too(tmp_path: Path) -> None:
    from humpback.contracts import Candidate, Source, write_jsonl
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop

    extra = tmp_path / "extra.jsonl"
    loop = Loop(load_config(overrides=[f"curate.decontaminate_against={json.dumps([str(extra)])}"]), tmp_path / "run")
    # The configured sets, then the run's held-out pairs (none where the run has none).
    heldout = tmp_path / "heldout.jsonl"
    data = DataFiles(seed=tmp_path / "seed.jsonl", heldout=heldout, corpus=[])
    assert loop.decontamination_sets(data) == [extra, heldout]
    assert loop.decontamination_sets(data.model_copy(update={"heldout": None})) == [extra]
    # The ablation's control never draws what curation dropped: A_k cannot hold it either.
    candidates = tmp_path / "candidates.jsonl"
    write_jsonl(candidates, [Candidate(custom_id=f"c{i}", instruction=f"Question {i}?", output="...", model="backward",
                                       source=Source(path="corpus.jsonl", line=i + 1)) for i in range(4)])
    control = loop.uncurated(candidates, 10, {"c1", "c3"})
    assert sorted(ex.messages[1].content for ex in control) == ["Question 0?", "Question 2?"]


def curated_a1(tmp_path: Path) -> CurateResult:
    """curate_1's record over six scored pairs, as the rewrite stage reads it: k 3.0, by `scorer`."""
    from humpback.contracts import ScoredCandidate, Source, write_jsonl

    scored = tmp_path / "scored1.jsonl"
    write_jsonl(scored, [ScoredCandidate(
        custom_id=f"s{i}", candidate_id=f"c{i}", instruction=f"Question {i}?", output=f"Web text {i}.",
        source=Source(path="corpus.jsonl", line=i + 1), mode="logprobs", score=score, scorer_model=scorer)
        for i, (score, scorer) in enumerate([(4.0, "scorer"), (1.5, "scorer"), (3.0, "scorer"), (4.5, "other"),
                                             (5.0, "scorer"), (3.5, "scorer")])])
    return CurateResult(
        curated=tmp_path / "A1.jsonl", scored=scored, dataset=tmp_path / "A1.dataset", scorer="ft:scorer:m0",
        served_as="scorer", scoring="rubric", mode="logprobs", k=3.0, selected=3, scored_total=6,
        kept_per_threshold={}, contaminated=1, contaminated_file=tmp_path / "A1.contaminated.jsonl",
        summary=ClientSummary())


def test_the_rewrite_arm_rewrites_the_curated_pairs_and_trains_on_those_it_got(tmp_path: Path) -> None:
    """`rewrite_1` on a fake rewriter that answers one pair with nothing: A_1 as curate selected it (its
    threshold, its scorer and mode, no contaminated pair) is rewritten, and the failed pair left out."""
    from humpback.contracts import AUGMENTED_SYSTEM_PROMPT
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop
    from tests.evaluation.fake_stage_server import StageFake

    picked = curated_a1(tmp_path)
    server = StageFake(write=lambda prompt: "" if "Question 2?" in prompt else "Rewritten: " + prompt[-12:]).start()
    try:
        loop = Loop(load_config(overrides=[f"rewrite.url={server.url}", "rewrite.progress=false"]), tmp_path / "run")
        arm = loop.stages.run("rewrite_1", lambda: loop.rewrite(picked, UNUSED_MODEL, {"c5"}))
    finally:
        server.stop()
    selected = [json.loads(line)["custom_id"] for line in arm.candidates.read_text().splitlines()]
    assert selected == ["c0", "c2", "c4"]  # score >= k, by this scorer, not contaminated
    assert (arm.curated, arm.rewritten, arm.not_rewritten) == (3, 2, 1)
    assert arm.summary.results["failed"] == 1
    pairs = loop.rewritten_pairs(arm)
    assert [[m.content for m in ex.messages][:2] for ex in pairs] == [
        [AUGMENTED_SYSTEM_PROMPT, "Question 0?"], [AUGMENTED_SYSTEM_PROMPT, "Question 4?"]]
    assert all(ex.messages[2].content.startswith("Rewritten: ") for ex in pairs)


# --- servers the stack does not own get their own key, never the stack's ------------------------------


@pytest.mark.parametrize("own_key", ["rewriter-key", None])
def test_the_rewriter_at_rewrite_url_gets_its_own_key_never_the_stacks(tmp_path: Path, own_key: str | None) -> None:
    """A recording server at `rewrite.url`, the stack's key set: every request of the rewrite stage carries
    `rewrite.api_key`, or no Authorization header where it is unset."""
    from humpback.loop.config import load_config
    from humpback.loop.run import Loop
    from tests.evaluation.fake_stage_server import StageFake

    picked = curated_a1(tmp_path)
    server = StageFake(write=lambda prompt: "Rewritten: " + prompt[-12:]).start()
    try:
        overrides = [f"rewrite.url={server.url}", "rewrite.progress=false", f"services.api_key={KEY}",
                     f"rewrite.api_key={json.dumps(own_key)}"]
        loop = Loop(load_config(overrides=overrides), tmp_path / "run")
        arm = loop.stages.run("rewrite_1", lambda: loop.rewrite(picked, UNUSED_MODEL, set()))
    finally:
        server.stop()
    assert arm.rewritten == 4 and server.requests["/v1/chat/completions"] == 4
    assert set(server.authorizations) == {f"Bearer {own_key}" if own_key else None}


@pytest.mark.parametrize("own_key", ["judge-key", None])
def test_the_judge_at_judge_url_gets_its_own_key_never_the_stacks(tmp_path: Path, own_key: str | None) -> None:
    """Recording servers as the evaluated model (the stack's, sent its key) and as `eval.judge_url`: the
    judge gets `eval.judge_api_key`, or no Authorization header where it is unset."""
    from humpback.loop.config import EvalSection
    from humpback.loop.evaluate import evaluate_model
    from tests.evaluation.fake_eval_server import EvalFake

    model, judge = EvalFake().start(), EvalFake().start()
    try:
        cfg = EvalSection(judge_url=judge.url, judge_model="fake", judge_api_key=own_key, ifeval_limit=2,
                          pairwise_limit=2, nll=False)
        result = evaluate_model(FanoutConfig(endpoints=[model.url], api_key=KEY), "fake", "m0", cfg, tmp_path / "eval")
    finally:
        model.stop()
        judge.stop()
    assert result.pairwise.n == 2 and judge.requests["/v1/chat/completions"] == 4
    assert set(model.authorizations) == {f"Bearer {KEY}"}
    assert set(judge.authorizations) == {f"Bearer {own_key}" if own_key else None}


def test_candidate_quality_counts_usable_instructions_and_their_diversity(tmp_path: Path) -> None:
    from humpback.contracts import Candidate, Source, write_jsonl
    from humpback.loop.evaluate import candidate_quality

    candidates = tmp_path / "candidates.jsonl"
    texts = ["Write a poem about the sea.", "Explain the code below.", "Write a poem about rain.", "What is Perl?"]
    write_jsonl(candidates, [Candidate(custom_id=f"c{i}", instruction=t, output="...", model="backward",
                                       source=Source(path="corpus.jsonl", line=i + 1)) for i, t in enumerate(texts)])
    quality = {"sent": 10, "usable": 4, "truncated": 5, "empty": 0, "copy": 0, "meta": 1, "resampled": 6,
               "rescued": 0, "usable_rate": 0.4}
    result = candidate_quality("ft:backward", candidates, quality, tmp_path / "report" / "verbs.png")
    metrics = result.metrics
    assert metrics["usable_rate"].value == pytest.approx(0.4) and metrics["usable_rate"].n == 10
    assert metrics["usable_rate"].ci95 is not None
    lo, hi = metrics["usable_rate"].ci95
    assert lo < 0.4 < hi
    assert metrics["verb_rate"].value == pytest.approx(0.75) and metrics["verb_rate"].n == 4
    assert metrics["unique_root_verbs"].value == 2  # write, explain
    assert result.rejections == {k: v for k, v in quality.items() if k != "usable_rate"}
    assert result.plot.read_bytes().startswith(b"\x89PNG")
    # An augment that sent nothing: diversity only.
    nothing = candidate_quality("ft:backward", candidates, {}, tmp_path / "report" / "verbs2.png")
    assert "usable_rate" not in nothing.metrics and nothing.rejections == {}


# --- the quick loop on the real stack -------------------------------------------------------------


def stack_overrides(servers, tmp_path) -> dict[str, str]:
    """The `services` values that point a run at the test stack and at a trainer of its own."""
    return {
        "services.backward_url": servers.backward_url,
        "services.scorer_url": servers.scorer_url,
        "services.api_key": servers.api_key or "",
        "services.state_dir": str(servers.state_dir),
        "services.trainer_url": f"http://127.0.0.1:{TRAINER_PORT}",
        "services.trainer_data_dir": str(tmp_path / "trainer"),
    }


def run_loop(servers, tmp_path):
    args = [a for k, v in stack_overrides(servers, tmp_path).items() for a in ("--set", f"{k}={v}")]
    return humpback("run", "--quick", "--out", str(tmp_path / "run"), *args, check=False, timeout=3000)


def lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def trainer_jobs(servers) -> list[str]:
    resp = httpx.get(f"http://127.0.0.1:{TRAINER_PORT}/v1/fine_tuning/jobs", params={"limit": 100},
                     headers=servers.headers, timeout=30)
    return sorted(job["id"] for job in resp.json()["data"])


def records(path: Path, model):
    with path.open(encoding="utf-8") as f:
        return [model.model_validate_json(line) for line in f]


@pytest.fixture
def loop_dir(tmp_path):
    yield tmp_path
    pid_file = tmp_path / "trainer" / "trainer.pid"
    if pid_file.is_file():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass


def recorded(run: Path) -> dict[str, dict]:
    """Each stage record of a run, read through its model (`humpback.loop.records`), as its JSON."""
    return {name: record.model_dump(mode="json") for name, record in Stages(run).all().items()}


@pytest.mark.server
def test_quick_loop_end_to_end_then_resume(servers, loop_dir):
    # The servers outlive each test: put the backward one back on its base weights, which the run measures
    # before training M_yx.
    swap_checkpoint(servers.backward_url, MODEL_DIR, role="backward", version="base", api_key=servers.api_key,
                    registry=servers.registry)
    first = run_loop(servers, loop_dir)
    assert first.returncode == 0, first.stderr[-5000:]
    run = loop_dir / "run"
    stages = recorded(run)
    expected = {"data", "stage_backward_base", "train_backward", "train_m0", "eval_m0", "augment", "stage_candidates",
                "stage_backward_myx", "calibrate_1", "curate_1", "stage_scorer_m0", "rewrite_1", "train_m1", "eval_m1",
                "train_m1_rewritten", "eval_m1_rewritten", "train_uncurated", "eval_uncurated"}
    assert expected <= set(stages), sorted(stages)

    # M_yx serves the backward role, M1 or the control the scorer: every swap went through the registry.
    registry = Registry.load(servers.registry)
    assert registry.servers["backward"].version == stages["train_backward"]["job"]
    assert registry.servers["scorer"].version == stages["train_uncurated"]["job"]
    assert registry.servers["scorer"].aliases == [stages["train_uncurated"]["fine_tuned_model"]]
    assert stages["train_backward"]["swap_stall_s"] > 0

    candidates = lines(stages["augment"]["candidates"])
    failed_path = Path(stages["augment"]["candidates"]).with_name("candidates.failed.jsonl")
    failed_first = {f["custom_id"] for f in lines(failed_path)} if failed_path.is_file() else set()
    assert candidates and all(c["instruction"].strip() for c in candidates)
    assert len({c["custom_id"] for c in candidates}) == len(candidates)
    assert all(c["checkpoint"] == stages["train_backward"]["job"] for c in candidates)
    scored = lines(stages["curate_1"]["scored"])
    # The loop's default scorer: `combined`, its combiner fitted by calibrate_1 on the calibration split
    # (the quick preset's 8 pairs) with M0 and M_yx, before curate_1 scored with it.
    calibrated = stages["calibrate_1"]
    assert calibrated["combiner"] == stages["curate_1"]["calibration"], calibrated
    combiner = json.loads(Path(calibrated["combiner"]).read_text())
    calibration = lines(run / "data" / "calibration.jsonl")
    assert combiner["pairs"] == calibrated["pairs"] == len(calibration) == 8
    assert combiner["pair_ids"] and combiner["scorer_model"] == "scorer"
    assert stages["curate_1"]["scoring"] == "combined" and stages["stage_scorer_m0"]["scoring"] == "combined"
    # One terms' journal for the run (calibration, curation, the scorer's measurement): no term asked twice.
    terms = [t["custom_id"] for t in lines(run / "curate" / "terms.jsonl")]
    assert terms and len(set(terms)) == len(terms)
    assert [p.relative_to(run) for p in run.rglob("*terms*.jsonl")] == [Path("curate/terms.jsonl")]
    # Candidates that overlap an evaluation prompt or a held-out pair are set aside unscored.
    contaminated = stages["curate_1"]["contaminated"]
    contaminated_file = Path(stages["curate_1"]["contaminated_file"])
    assert contaminated == (len(lines(contaminated_file)) if contaminated_file.is_file() else 0)
    assert len(scored) == len(candidates) - contaminated
    for s in scored:  # P(good pair) from both directions' signals, by M0 and M_yx
        assert (s["mode"], s["scorer_checkpoint"]) == ("combined", stages["train_m0"]["job"])
        assert 0 <= s["score"] <= 1 and {"pmi", "reverse_pmi"} <= set(s["signals"])
    assert stages["curate_1"]["kept_per_threshold"] == {
        str(k): sum(s["score"] >= k for s in scored) for k in (0.5, 0.7, 0.8, 0.9)}
    curated = lines(stages["curate_1"]["curated"])
    assert len(curated) == len(scored) > 0  # the quick preset keeps all (top_fraction 1)
    assert all(c["messages"][0]["content"] == "Answer with knowledge from web search." for c in curated)
    # ... and the same set as a `datasets` folder, with its card.
    import datasets

    published = datasets.load_from_disk(stages["curate_1"]["dataset"])
    assert [row["messages"] for row in published] == [c["messages"] for c in curated]
    card = (Path(stages["curate_1"]["dataset"]) / "README.md").read_text()
    assert "## Decontamination" in card and "perlfaq" in card  # the data build's sources and licenses
    assert stages["train_m1"]["examples"] == stages["train_m0"]["examples"] + len(curated)
    # The rewrite arm: M0 (on the scorer server) rewrote A_1; M1 again on the seed and the rewrites it got.
    arm = stages["rewrite_1"]
    rewrites = lines(arm["rewritten_file"])
    assert arm["curated"] == len(curated) and arm["rewritten"] == len(rewrites)
    assert arm["rewritten"] + arm["not_rewritten"] == len(curated)
    assert {r["candidate_id"] for r in rewrites} <= {s["candidate_id"] for s in scored}
    assert all(r["checkpoint"] == stages["train_m0"]["job"] and r["original_output"] for r in rewrites)
    assert stages["train_m1_rewritten"]["examples"] == stages["train_m0"]["examples"] + len(rewrites)

    # Each model's numbers are those of its rows on disk.
    for name in ("m0", "m1", "m1_rewritten", "uncurated"):
        ev, out = stages[f"eval_{name}"], run / "eval" / name
        ifeval = records(out / "ifeval.rows.jsonl", IFEvalRow)
        assert ev["ifeval"]["n"] == len(ifeval) == 3
        assert ev["ifeval"]["prompt_loose"] == sum(all(r.loose) for r in ifeval) / 3
        pairwise = records(out / "pairwise.rows.jsonl", PairwiseRow)
        assert ev["pairwise"]["n"] == len(pairwise) == 2
        assert ev["pairwise"]["win_rate"] == pytest.approx(statistics.fmean(r.score for r in pairwise))
        assert ev["pairwise"]["wins"] + ev["pairwise"]["ties"] + ev["pairwise"]["losses"] == 2
        nll = [r.nll_mean for r in records(out / "nll.rows.jsonl", NllRow) if r.nll_mean is not None]
        assert ev["nll"]["n"] == len(nll) == 4
        assert ev["nll"]["mean"] == pytest.approx(statistics.fmean(nll))
        half = 1.959964 * statistics.stdev(nll) / len(nll) ** 0.5
        assert ev["nll"]["ci"] == pytest.approx([ev["nll"]["mean"] - half, ev["nll"]["mean"] + half], rel=1e-5)
    # Stage metrics: the quick preset measures 4 held-out pairs; each record is its `eval` output.
    base, myx, scorer = stages["stage_backward_base"], stages["stage_backward_myx"], stages["stage_scorer_m0"]
    assert (base["model"], myx["model"]) == ("base", stages["train_backward"]["fine_tuned_model"])
    assert scorer["model"] == stages["train_m0"]["fine_tuned_model"]
    for record in (base, myx, scorer):
        assert record["metrics"] == json.loads(Path(record["out"]).read_text())
    for record in (base, myx):
        assert set(record["metrics"]) == {"instruction_nll", "rouge_l", "usable_rate", "distinct_2"}
        assert record["metrics"]["rouge_l"]["n"] == 4
    # Base and M_yx answered from their own journals, so neither took the other's instructions.
    assert len(lines(Path(base["out"]).with_name("backward_base.generations.journal.jsonl"))) == 4
    assert len(lines(Path(myx["out"]).with_name("backward_myx.generations.journal.jsonl"))) == 4
    assert scorer["threshold"] == stages["curate_1"]["k"] == min(s["score"] for s in scored)
    assert scorer["metrics"]["mean_score_positive"]["n"] == 4 and "mean_score_passage" in scorer["metrics"]
    assert {"signal_auc_pmi", "signal_auc_reverse_pmi"} <= set(scorer["metrics"])  # the report's per iteration
    cand, quality = stages["stage_candidates"], stages["augment"]["summary"]["quality"]
    assert cand["rejections"]["sent"] == quality["sent"] and cand["rejections"]["usable"] == len(candidates)
    assert cand["metrics"]["usable_rate"]["value"] == pytest.approx(quality["usable_rate"])
    assert cand["metrics"]["verb_rate"]["n"] == len(candidates)
    report = (run / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 6  # the candidates' verbs and objects among them
    assert "<h2>Rewrite ablation</h2>" in report and "<td>M1-rewritten (curated rewrites)</td>" in report
    assert "<td>scorer M0</td>" in report and "| M_yx |" in (run / "stage_metrics.md").read_text()
    assert "<th>scoring</th>" in report and "<th>signal_auc_reverse_pmi</th>" in report and "<td>combined</td>" in report
    assert json.loads((run / "config.json").read_text())["iterations"] == 1

    # Interruptions: between stages (the last two markers gone), inside a training stage (its job was
    # created, the stage never finished), and inside augment (half the journal lost, a torn line); and
    # the backward server restarted on its base weights, so M_yx must be deployed again.
    jobs_before = trainer_jobs(servers)
    (run / "stages" / "eval_uncurated.json").unlink()
    (run / "stages" / "train_uncurated.json").unlink()
    (run / "stages" / "augment.json").unlink()
    journal = run / "augment" / "candidates.jsonl"
    kept = journal.read_text().splitlines(keepends=True)[: len(candidates) // 2]
    journal.write_text("".join(kept) + '{"custom_id": "torn')
    swap_checkpoint(servers.backward_url, MODEL_DIR, role="backward", version="base", api_key=servers.api_key,
                    registry=servers.registry)

    second = run_loop(servers, loop_dir)
    assert second.returncode == 0, second.stderr[-5000:]
    log = second.stderr
    for name in ("stage_backward_base", "train_backward", "train_m0", "eval_m0", "stage_backward_myx", "calibrate_1",
                 "curate_1",
                 "stage_scorer_m0", "rewrite_1", "train_m1", "eval_m1", "train_m1_rewritten", "eval_m1_rewritten"):
        assert f"stage {name}: done earlier, skipped" in log
    assert trainer_jobs(servers) == jobs_before  # the interrupted training stage waited for its job, started none
    assert f"re-deployed {stages['train_backward']['fine_tuned_model']} to backward" in log
    assert Registry.load(servers.registry).servers["backward"].version == stages["train_backward"]["job"]
    again = recorded(run)
    assert again["train_uncurated"]["job"] == stages["train_uncurated"]["job"]
    resumed = [c["custom_id"] for c in lines(journal)]
    assert len(set(resumed)) == len(resumed)  # the torn line repaired, nothing written twice
    assert {json.loads(line)["custom_id"] for line in kept} <= set(resumed)
    # The lost half was sampled again (T=0.7, no seed), and the first run's failures were retried: a
    # regenerated instruction may come back cut at max_tokens and is then recorded as failed, and a
    # retried one may now succeed. Every segment is accounted for once either way: none lost, none twice.
    failed = lines(failed_path) if failed_path.is_file() else []
    assert set(resumed) | {f["custom_id"] for f in failed} == {c["custom_id"] for c in candidates} | failed_first
    assert not set(resumed) & {f["custom_id"] for f in failed}
    assert again["augment"]["summary"]["results"]["already_done"] == len(kept)
    assert "eval_uncurated" in again


@pytest.mark.server
def test_the_rewriter_is_served_for_the_stage_alone(model_dir: Path, tmp_path: Path) -> None:
    """`rewrite.model_dir`: a server of its own, under the served name `rewriter`, up for the block and
    gone after it; what an interrupted run left of it is stopped before."""
    from humpback.loop.services import serving
    from services.supervisor import health, rpc

    svc = ServicesConfig(state_dir=tmp_path / "serve", api_key="k")
    with serving(svc, "rewriter", model_dir, 18403) as url:
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["rewriter"]
        assert rpc(tmp_path / "serve-rewriter") is not None
    assert not health(url) and rpc(tmp_path / "serve-rewriter") is None
