"""`humpback run`: the self-alignment loop end to end, over HTTP to the services.

data -> train M_yx (backward) and M0 (seed) -> hot-swap them into `backward` / `scorer` -> augment
the corpus -> curate with M0 -> train M1 on seed (S_a) + A_k (S_w) -> curate the same candidates with
M1 -> train M2 ... Every model is evaluated; the ablation trains on seed + uncurated candidates of
A_k's size. Each stage records its outputs in RUN_DIR/stages, so a re-run skips finished stages and
resumes the current one (augment/curate journals, trainer jobs by id).
"""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from humpback.loop.config import RunConfig
from humpback.loop.services import ensure_servers, ensure_trainer
from humpback.loop.stages import Stages
from humpback.loop.trainer_client import TrainerClient
from humpback.contracts import (
    AUGMENTED_SYSTEM_PROMPT,
    Candidate,
    ChatExample,
    ScoredCandidate,
    SeedPair,
    seed_backward_examples,
    seed_forward_examples,
    tagged_example,
    write_jsonl,
)
from services.registry import Registry

log = logging.getLogger(__name__)


def read_pairs(path: Path) -> list[SeedPair]:
    with path.open(encoding="utf-8") as f:
        return [SeedPair.model_validate_json(line) for line in f if line.strip()]


class Loop:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.dir = run_dir.absolute()
        self.stages = Stages(self.dir)
        self.svc = cfg.services
        self.trainer: TrainerClient | None = None

    # --- stages ---------------------------------------------------------------------------------

    def build_data(self) -> dict[str, Any]:
        d = self.cfg.data
        if d.seed is not None and d.corpus:
            return {"seed": str(d.seed), "heldout": str(d.heldout) if d.heldout else None,
                    "corpus": [str(c) for c in d.corpus]}
        if not d.build_demo:
            raise ValueError("data: give data.seed and data.corpus, or set data.build_demo")
        out = self.dir / "data"
        subprocess.run([sys.executable, "-m", "humpback", "data", "demo", "--out", str(out),
                        "--max-seed", str(d.max_seed), "--max-corpus-docs", str(d.max_corpus_docs)], check=True)
        return {"seed": str(out / "seed.jsonl"), "heldout": str(out / "heldout.jsonl"),
                "corpus": [str(out / "corpus.jsonl")]}

    def train(self, name: str, examples: list[ChatExample], base: str, deploy: str, preset: str) -> dict[str, Any]:
        """One fine-tuning job through the trainer service, deployed to `deploy` when it succeeds."""
        assert self.trainer is not None
        state = self.stages.state(name)
        if "job" not in state:
            path = self.dir / "train" / f"{name}.jsonl"
            write_jsonl(path, examples)
            file_id = self.trainer.upload(path)
            metadata = {"deploy_to": deploy, "preset": preset}
            if self.cfg.train.max_steps:
                metadata["max_steps"] = str(self.cfg.train.max_steps)
            job = self.trainer.create_job(base, file_id, suffix=name.removeprefix("train_"), metadata=metadata)
            state = {"job": job["id"], "file": file_id, "examples": len(examples)}
            self.stages.save_state(name, state)  # a re-run waits for this job instead of starting another
        job = self.trainer.wait(state["job"])
        events = self.trainer.events(job["id"])
        steps = [e["data"] for e in events if e.get("type") == "metrics" and e.get("data")]
        swaps = [e["data"]["stall_s"] for e in events if (e.get("data") or {}).get("stall_s") is not None]
        return {"job": job["id"], "fine_tuned_model": job["fine_tuned_model"], "role": deploy,
                "examples": state["examples"], "trained_tokens": job.get("trained_tokens"),
                "swap_stall_s": swaps[-1] if swaps else None,
                "losses": [{"step": d["step"], "loss": d["train_loss"], "tokens_per_second": d.get("tokens_per_second")}
                           for d in sorted(steps, key=lambda d: d["step"])]}

    def deployed(self, model: dict[str, Any]) -> str:
        """Make sure the role's server serves this model (a restart may have reset it); its URL."""
        from services.hotswap import swap_checkpoint

        role = model["role"]
        url = self.svc.backward_url if role == "backward" else self.svc.scorer_url
        registry = self.svc.state_dir.absolute() / "registry.json"
        served = Registry.load(registry).roles.get(role)
        if served is None or served.version != model["job"]:
            ckpt = self.svc.trainer_data_dir.absolute() / "checkpoints" / model["job"] / "final"
            log.info("re-deploying %s to %s", model["fine_tuned_model"], role)
            swap_checkpoint(url, ckpt, role=role, version=model["job"], alias=model["fine_tuned_model"],
                            api_key=self.svc.api_key, registry=registry)
        return url

    def augment(self, data: dict[str, Any], backward: dict[str, Any]) -> dict[str, Any]:
        from client.augment import AugmentConfig, augment
        from client.corpus import Corpus
        from client.fanout import FanoutConfig

        url = self.deployed(backward)
        out = self.dir / "augment" / "candidates.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        corpora = [Corpus(c, text_field=self.cfg.data.text_field) for c in data["corpus"]]
        summary = asyncio.run(augment(
            corpora, out, FanoutConfig(endpoints=[url], api_key=self.svc.api_key),
            AugmentConfig(model="backward", checkpoint=backward["job"], max_tokens=self.cfg.augment.max_tokens,
                          seed=self.cfg.augment.seed, limit=self.cfg.data.max_segments),
        ))
        return {"candidates": str(out), "summary": summary.to_dict()}

    def curate(self, t: int, candidates: str, scorer: dict[str, Any]) -> dict[str, Any]:
        from client.curate import CurateConfig, curate
        from client.fanout import FanoutConfig

        url = self.deployed(scorer)
        out = self.dir / "curate" / f"A{t}.jsonl"
        summary = asyncio.run(curate(
            candidates, out, FanoutConfig(endpoints=[url], api_key=self.svc.api_key),
            CurateConfig(mode=self.cfg.curate.mode, min_score=self.cfg.curate.min_score,
                         top_fraction=self.cfg.curate.top_fraction, model="scorer",
                         checkpoint=scorer["job"], scored=self.dir / "curate" / f"scored{t}.jsonl"),
        ))
        with (self.dir / "curate" / f"scored{t}.jsonl").open(encoding="utf-8") as f:
            scores = [ScoredCandidate.model_validate_json(line).score for line in f]
        kept = {str(k): sum(1 for s in scores if s is not None and s >= k) for k in self.cfg.curate.thresholds}
        return {"curated": str(out), "scored": str(self.dir / "curate" / f"scored{t}.jsonl"),
                "scorer": scorer["fine_tuned_model"], "k": summary.extra.get("min_score"),
                "selected": summary.extra.get("selected"), "kept_per_threshold": kept, "summary": summary.to_dict()}

    def uncurated(self, candidates: str, size: int) -> list[ChatExample]:
        """The ablation's control: candidates of A_k's size drawn without looking at scores."""
        with open(candidates, encoding="utf-8") as f:
            rows = [Candidate.model_validate_json(line) for line in f]
        random.Random(0).shuffle(rows)
        return [tagged_example(r.instruction, r.output, AUGMENTED_SYSTEM_PROMPT) for r in rows[:size]]

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, Any]]:
        cfg = self.cfg
        (self.dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        data = self.stages.run("data", self.build_data)
        seed = read_pairs(Path(data["seed"]))
        ensure_servers(self.svc)
        ensure_trainer(self.svc, self.dir / "logs")
        self.trainer = TrainerClient(self.svc.trainer_url, self.svc.api_key)
        forward_seed = seed_forward_examples(seed)

        backward = self.stages.run("train_backward", lambda: self.train(
            "train_backward", seed_backward_examples(seed), "backward", "backward", cfg.train.backward_preset))
        model = self.stages.run("train_m0", lambda: self.train(
            "train_m0", forward_seed, "scorer", "scorer", cfg.train.forward_preset))
        self.evaluate("m0", model, data)
        cands = self.stages.run("augment", lambda: self.augment(data, backward))["candidates"]
        curated: list[ChatExample] = []
        for t in range(1, cfg.iterations + 1):
            scorer = model
            picked = self.stages.run(f"curate_{t}", lambda: self.curate(t, cands, scorer))
            curated = [ChatExample.model_validate_json(line) for line in open(picked["curated"], encoding="utf-8")]
            model = self.stages.run(f"train_m{t}", lambda: self.train(
                f"train_m{t}", forward_seed + curated, "scorer", "scorer", cfg.train.forward_preset))
            self.evaluate(f"m{t}", model, data)
        if cfg.eval.ablation:
            control = self.stages.run("train_uncurated", lambda: self.train(
                "train_uncurated", forward_seed + self.uncurated(cands, len(curated)), "scorer", "scorer",
                cfg.train.forward_preset))
            self.evaluate("uncurated", control, data)
        return self.stages.all()

    def evaluate(self, name: str, model: dict[str, Any], data: dict[str, Any]) -> None:
        from humpback.loop.evaluate import evaluate_model

        self.stages.run(f"eval_{name}", lambda: evaluate_model(self, name, model, data))
