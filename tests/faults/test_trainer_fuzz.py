"""Property-based fuzzing of the trainer's HTTP API from its own OpenAPI schema (schemathesis, over
real HTTP to the real service): valid and invalid requests on every operation. None may answer 5xx,
and the job queue must still run afterwards.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.faults.report import FaultRow
from tests.trainer.conftest import TRAINER_KEY, RunningService, make_settings, start_service, upload, wait_for

pytestmark = pytest.mark.fault
AUTH = {"Authorization": f"Bearer {TRAINER_KEY}"}
EXAMPLES = 50  # per operation and generation mode: bounded, so the suite stays a few minutes
STATUSES: Counter[int] = Counter()
SERVER_ERRORS: list[str] = []
STARTED: list[float] = []


@pytest.fixture(scope="module")
def fuzzed_trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    running = start_service(make_settings(tmp_path_factory.mktemp("fuzz") / "trainer"))
    STARTED.append(time.monotonic())
    yield running
    running.stop()


def call(case) -> None:
    response = case.call(headers=AUTH, timeout=60)
    STATUSES[response.status_code] += 1
    if response.status_code >= 500:
        SERVER_ERRORS.append(f"{response.status_code} for {case.as_curl_command()}: {response.text[:300]}")
    assert response.status_code < 500, SERVER_ERRORS[-1]
    if response.status_code >= 400:  # every refusal in OpenAI's error shape
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}, response.text


@pytest.mark.parametrize("mode", list(GenerationMode))
def test_no_request_is_answered_with_a_server_error(fuzzed_trainer: RunningService, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed_trainer.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    for op in operations:
        fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                        derandomize=True, database=None)(given(case=op.as_strategy(generation_mode=mode))(call))
        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, op.label  # an operation without inputs has no invalid request


def test_the_queue_still_runs_after_fuzzing(fuzzed_trainer: RunningService, train_file: Path,
                                            fault_report) -> None:
    assert sum(STATUSES.values()) > 0, "the fuzzing test did not run first"
    assert httpx.get(f"{fuzzed_trainer.url}/health", timeout=5).status_code == 200
    client = fuzzed_trainer.client
    job = client.fine_tuning.jobs.create(model="backward", training_file=upload(client, train_file),
                                         metadata={"preset": "cpu-test", "max_steps": "1"})
    assert wait_for(client, job.id, {"succeeded", "failed", "cancelled"}).status == "succeeded"
    total = sum(STATUSES.values())
    spread = ", ".join(f"{n} x {code}" for code, n in sorted(STATUSES.items()))
    fault_report(FaultRow(
        f"{total} requests generated from the trainer's OpenAPI schema (schemathesis: valid and invalid "
        "bodies, parameters and ids on every operation)",
        f"{spread}; every refusal in OpenAI's error shape", total, "-", "-",
        f"{len(SERVER_ERRORS)} answers 5xx; /health 200 and a job trains afterwards",
        time.monotonic() - STARTED[0]))
