"""`humpback run --check` and the check `humpback run` makes first, without model servers: the config and
its files, the base model the servers and the trainer serve (a fake server answering /v1/models, the
trainer's own app), one line per problem and exit 2, and no traceback for a config that cannot be
loaded. The check against the real servers: tests/loop/test_examples.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from humpback.cli import main
from humpback.contracts import InputError
from humpback.loop.config import load_config
from humpback.loop.preflight import preflight
from tests.loop.test_loop import free_port
from trainer.api import create_app
from trainer.config import ServiceSettings


def write_lines(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def own_data(tmp_path: Path) -> dict[str, Path]:
    """A seed with one bad line among Alpaca and chat pairs, a held-out set and a text corpus."""
    seed = write_lines(tmp_path / "seed.jsonl", *({"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}
                                                  for i in range(5)), '{"instruction": "cut off',
                       {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
    heldout = write_lines(tmp_path / "heldout.jsonl", {"instruction": "Held?", "response": "Out."})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A paragraph of my own text. " * 40 + "\n\nAnother one. " * 40 + "\n")
    return {"seed": seed, "heldout": heldout, "corpus": [str(corpus)]}


def isolated(**data: object) -> list[str]:
    """Overrides: the given data, and services on ports nothing answers (other tests' servers stay out)."""
    ports = [free_port() for _ in range(3)]
    return [f"data.{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in data.items()] + [
        f"services.backward_url=http://127.0.0.1:{ports[0]}", f"services.scorer_url=http://127.0.0.1:{ports[1]}",
        f"services.trainer_url=http://127.0.0.1:{ports[2]}"]


def test_own_data_passes_with_its_bad_line_as_a_warning_and_a_plan(own_data, tmp_path: Path) -> None:
    check = preflight(load_config(quick=True, overrides=isolated(**own_data)),
                      tmp_path / "run")
    assert check.problems == []
    assert [w for w in check.warnings if w.startswith(f"{own_data['seed']} line 6: invalid JSON")]
    # 6 seed pairs, all under data.max_seed (the quick preset): none left to calibrate the combined scorer on, said before the run.
    assert "0 calibration pairs (data.calibration_pairs 8) from the 0 seed pairs past data.max_seed: the combined " \
           "scorer cannot be calibrated and each iteration curates with pmi (lower data.max_seed or give more seed " \
           "pairs)" in check.warnings
    plan = dict(check.plan)
    assert "held-out 1 pairs" in plan["data"] and "seed 6 pairs" in plan["data"]
    assert plan["stages"].startswith("18: data -> ") and "min" in plan["estimate"]
    assert "stage_backward_myx -> calibrate_1 -> curate_1" in plan["stages"]  # the loop's order
    assert all("started by the run" in plan[n] for n in ("backward", "scorer", "trainer"))
    assert "resumes" not in plan
    (tmp_path / "run" / "stages").mkdir(parents=True)
    (tmp_path / "run" / "stages" / "data.json").write_text("{}")
    again = dict(preflight(load_config(quick=True, overrides=isolated(**own_data)), tmp_path / "run").plan)
    assert again["resumes"].endswith("1 of 18 stages done earlier are skipped")


def test_every_problem_is_one_line_with_its_fix_and_nothing_starts(own_data, tmp_path: Path, capsys) -> None:
    taken = free_port()
    args = ["run", "--quick", "--out", str(tmp_path / "run"),
            *(x for o in isolated(seed=tmp_path / "missing.jsonl", heldout=own_data["heldout"],
                                  corpus=[str(tmp_path / "none.txt")]) for x in ("--set", o)),
            "--set", f"services.base_model={tmp_path}", "--set", "rewrite.model_dir=/nowhere",
            "--set", f"rewrite.port={taken}"]
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        assert main(args) == 2
        out = capsys.readouterr().out
    problems = [p for p in out.split("problems (")[1].splitlines()[1:] if p.startswith("  ")]
    assert len(problems) == 5, out
    assert any(p.startswith("  data.seed: ") and "missing.jsonl: no such file" in p for p in problems)
    assert any(p.startswith("  data.corpus: ") and "none.txt: no such file" in p for p in problems)
    assert any(p.startswith(f"  services.base_model: {tmp_path} holds no config.json") for p in problems)
    assert any(p.startswith("  rewrite.model_dir: /nowhere is no folder") for p in problems)
    assert any(p.startswith(f"  rewrite.port {taken} is taken") for p in problems)
    assert "the run did not start" in out and not (tmp_path / "run").exists()


def test_a_config_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  seed: [\n")
    for config, expected in ((tmp_path / "nope.yaml", "nope.yaml: no such file"),
                             (bad, "bad.yaml line 3: invalid YAML")):
        assert main(["run", "--check", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert main(["run", "--check", "--set", "curate.min_scor=1"]) == 2
    assert "curate.min_scor: Extra inputs are not permitted" in capsys.readouterr().err
    with pytest.raises(InputError) as shown:  # --debug: the traceback, the missing file's under it
        main(["run", "--check", "--debug", "--config", str(tmp_path / "nope.yaml")])
    assert isinstance(shown.value.__cause__, FileNotFoundError)


class _Models(BaseHTTPRequestHandler):
    root = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = {"object": "list", "data": [{"id": role, "object": "model", "root": self.root, "parent": None}
                                           for role in ("backward", "scorer")]}
        data = b"" if self.path == "/health" else json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serving_other_model() -> Iterator[str]:
    """A server that answers /health and lists /models/other-7b as the backward and scorer model."""
    handler = type("Other", (_Models,), {"root": "/models/other-7b"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_servers_serving_another_model_are_refused(serving_other_model: str, own_data, tmp_path: Path,
                                                   capsys) -> None:
    url = serving_other_model
    overrides = [*isolated(**own_data), f"services.backward_url={url}",
                 f"services.scorer_url={url}", "services.base_model=/models/mine-7b"]
    problems = preflight(load_config(quick=True, overrides=overrides), tmp_path / "run").problems
    for role in ("backward", "scorer"):
        assert (f"the {role} server at {url} serves /models/other-7b as {role!r}, but services.base_model is "
                "/models/mine-7b: set services.base_model to /models/other-7b") in " ".join(problems)
    assert main(["run", "--quick", "--out", str(tmp_path / "run"), *(x for o in overrides for x in ("--set", o))]) == 2
    assert "serves /models/other-7b" in capsys.readouterr().out and not (tmp_path / "run").exists()
    same = [*overrides[:-1], "services.base_model=/models/other-7b"]
    assert not [p for p in preflight(load_config(quick=True, overrides=same), tmp_path / "run").problems
                if " serves " in p]


def test_the_trainer_lists_the_base_models_it_fine_tunes(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path / "trainer", backward_model=tmp_path / "a", scorer_model=tmp_path / "b",
                               registry=tmp_path / "registry.json")
    with TestClient(create_app(settings)) as client:
        models = client.get("/v1/models").json()
    assert {m["id"]: m["root"] for m in models["data"]} == {"backward": str(tmp_path / "a"),
                                                             "scorer": str(tmp_path / "b")}


def test_the_rewriter_and_the_judge_must_answer_with_their_model(serving_other_model: str, own_data,
                                                                 tmp_path: Path) -> None:
    url, dead = serving_other_model, f"http://127.0.0.1:{free_port()}"
    overrides = [*isolated(**own_data), f"rewrite.url={url}", "rewrite.model=big-chat", f"eval.judge_url={dead}",
                 "eval.judge_model=judge"]
    problems = preflight(load_config(quick=True, overrides=overrides), tmp_path / "run").problems
    assert f"rewrite.url {url} serves ['backward', 'scorer'], not 'big-chat': correct the model name" in problems
    assert [p for p in problems if p.startswith(f"eval.judge_url {dead} does not answer GET /v1/models")]
    fine = [*overrides[:-3], "rewrite.model=scorer", "eval.judge_url=null"]
    assert not [p for p in preflight(load_config(quick=True, overrides=fine), tmp_path / "run").problems
                if p.startswith(("rewrite", "eval"))]


def test_a_port_just_left_by_a_server_is_free_and_a_listening_one_is_not() -> None:
    # The server side closes first, as uvicorn does at shutdown: its end of the connection waits in
    # TIME_WAIT, which refused a plain bind (a run started right after `make down` was turned away).
    import socket

    from humpback.loop.preflight import port_free

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    assert not port_free(port)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()
    listener.close()
    assert client.recv(1) == b""  # the server's FIN: its side is now in TIME_WAIT
    client.close()
    assert port_free(port)


def test_the_check_asks_the_rewriter_and_the_judge_with_their_own_keys(own_data, tmp_path: Path) -> None:
    """`run --check` lists the models of `rewrite.url` and `eval.judge_url` (recording servers) with their
    own keys, the stack's set: the rewriter's key to the rewriter, no header to a judge without one."""
    from tests.client.fake_server import FakeServer

    rewriter, judge = FakeServer(model="big-chat").start(), FakeServer(model="judge").start()
    try:
        overrides = [*isolated(**own_data), "services.api_key=stack-key", f"rewrite.url={rewriter.url}",
                     "rewrite.model=big-chat", "rewrite.api_key=rewriter-key", f"eval.judge_url={judge.url}",
                     "eval.judge_model=judge"]
        problems = preflight(load_config(quick=True, overrides=overrides), tmp_path / "run").problems
    finally:
        rewriter.stop()
        judge.stop()
    assert not [p for p in problems if p.startswith(("rewrite", "eval"))]
    assert rewriter.requests["/v1/models"] == 1 and judge.requests["/v1/models"] == 1
    assert dict(rewriter.authorizations) == {"Bearer rewriter-key": 1}
    assert dict(judge.authorizations) == {None: 1}
