"""The quick loop end to end on the real servers and the real trainer, then resumed after
interruptions between stages and inside them."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from humpback.loop.stages import Stages
from services.registry import Registry
from tests.conftest import humpback

pytestmark = pytest.mark.server

TRAINER_PORT = 18100


def run_loop(servers, tmp_path):
    overrides = {
        "services.backward_url": servers.backward_url,
        "services.scorer_url": servers.scorer_url,
        "services.api_key": servers.api_key or "",
        "services.state_dir": str(servers.state_dir),
        "services.trainer_url": f"http://127.0.0.1:{TRAINER_PORT}",
        "services.trainer_data_dir": str(tmp_path / "trainer"),
    }
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    return humpback("run", "--quick", "--out", str(tmp_path / "run"), *args, check=False, timeout=3000)


def lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def trainer_jobs() -> list[str]:
    resp = httpx.get(f"http://127.0.0.1:{TRAINER_PORT}/v1/fine_tuning/jobs", params={"limit": 100}, timeout=30)
    return sorted(job["id"] for job in resp.json()["data"])


@pytest.fixture
def loop_dir(tmp_path):
    yield tmp_path
    pid_file = tmp_path / "trainer" / "trainer.pid"
    if pid_file.is_file():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_quick_loop_end_to_end_then_resume(servers, loop_dir):
    first = run_loop(servers, loop_dir)
    assert first.returncode == 0, first.stderr[-5000:]
    run = loop_dir / "run"
    stages = Stages(run).all()
    expected = {"data", "train_backward", "train_m0", "eval_m0", "augment", "curate_1", "train_m1", "eval_m1",
                "train_uncurated", "eval_uncurated"}
    assert expected <= set(stages), sorted(stages)

    # M_yx serves the backward role, M1 or the control the scorer: every swap went through the registry.
    registry = Registry.load(servers.registry)
    assert registry.roles["backward"].version == stages["train_backward"]["job"]
    assert registry.roles["scorer"].version == stages["train_uncurated"]["job"]

    candidates = lines(stages["augment"]["candidates"])
    assert candidates and all(c["instruction"].strip() for c in candidates)
    assert len({c["custom_id"] for c in candidates}) == len(candidates)
    assert all(c["checkpoint"] == stages["train_backward"]["job"] for c in candidates)
    scored = lines(stages["curate_1"]["scored"])
    assert len(scored) == len(candidates)
    assert all(1.0 <= s["score"] <= 5.0 for s in scored)
    curated = lines(stages["curate_1"]["curated"])
    assert len(curated) == sum(1 for s in scored if s["score"] >= 1.0) > 0  # the quick preset keeps all
    assert all(c["messages"][0]["content"] == "Answer with knowledge from web search." for c in curated)
    assert stages["train_m1"]["examples"] == stages["train_m0"]["examples"] + len(curated)

    for name in ("m0", "m1", "uncurated"):
        ev = stages[f"eval_{name}"]
        assert ev["ifeval"]["n"] == 3 and 0.0 <= ev["ifeval"]["prompt_loose"] <= 1.0
        assert ev["pairwise"]["n"] == 2 and 0.0 <= ev["pairwise"]["win_rate"] <= 1.0
        assert ev["nll"]["mean"] > 0
    assert "data:image/png;base64," in (run / "report.html").read_text()
    assert json.loads((run / "config.json").read_text())["iterations"] == 1

    # Interruptions: between stages (the last two markers gone), inside a training stage (its job was
    # created, the stage never finished), and inside augment (half the journal lost, a torn line).
    jobs_before = trainer_jobs()
    (run / "stages" / "eval_uncurated.json").unlink()
    (run / "stages" / "train_uncurated.json").unlink()
    (run / "stages" / "augment.json").unlink()
    journal = run / "augment" / "candidates.jsonl"
    kept = journal.read_text().splitlines(keepends=True)[: len(candidates) // 2]
    journal.write_text("".join(kept) + '{"custom_id": "torn')

    second = run_loop(servers, loop_dir)
    assert second.returncode == 0, second.stderr[-5000:]
    log = second.stderr
    for name in ("train_backward", "train_m0", "eval_m0", "curate_1", "train_m1", "eval_m1"):
        assert f"stage {name}: done earlier, skipped" in log
    assert trainer_jobs() == jobs_before  # the interrupted training stage waited for its job, started none
    again = Stages(run).all()
    assert again["train_uncurated"]["job"] == stages["train_uncurated"]["job"]
    resumed = [c["custom_id"] for c in lines(journal)]
    assert len(set(resumed)) == len(resumed)  # the torn line repaired, nothing written twice
    assert {json.loads(line)["custom_id"] for line in kept} <= set(resumed)
    # The lost half was sampled again (T=0.7, no seed): a regenerated instruction may come back cut at
    # max_tokens and is then recorded as failed, not as a candidate. None is lost either way.
    failed = lines(journal.with_name("candidates.failed.jsonl")) if journal.with_name("candidates.failed.jsonl").is_file() else []
    assert set(resumed) | {f["custom_id"] for f in failed} == {c["custom_id"] for c in candidates}
    assert again["augment"]["summary"]["results"]["already_done"] == len(kept)
    assert "eval_uncurated" in again
