"""`humpback run`: the self-alignment loop end to end, over HTTP to the services.

data -> train M_yx (backward) and M0 (seed) -> hot-swap them into `backward` / `scorer` -> augment
the corpus -> curate with M0 -> train M1 on seed (S_a) + A_k (S_w) -> curate the same candidates with
M1 -> train M2 ... Every model is evaluated; the ablation trains on seed + uncurated candidates of
A_k's size. Curation first drops the candidates that share a 13-word n-gram with an evaluation prompt
or a held-out pair (`client.decontaminate`); the control never draws them either. With
`rewrite.enabled`, the rewrite arm has an aligned model (`rewrite.url`, else `rewrite.model_dir` on a
server of its own for the stage, else M0 on the scorer server right after it curated A_1) rewrite
A_1's responses (`client.rewrite`), then trains M1 again on seed + the rewritten pairs and evaluates
it beside M1. With `eval.stage_metrics`, the stages are measured
against held-out human pairs too (`stage_*`, the same seeded subset each time): the backward model
before training and M_yx after it (`eval backward`), each model when it has served as the scorer
(`eval scorer`), and the candidates (usable rate, diversity). Each stage records its outputs in
RUN_DIR/stages, so a re-run skips finished stages and resumes the current one (augment/curate/rewrite
journals, trainer jobs by id).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from client import cluster
from client.augment import AugmentConfig, augment
from client.curate import (
    CurateConfig, contaminated_ids, curate, scored_mode, scored_records, selected_records,
)
from client.dataset import DatasetFiles, export_dataset
from client.fanout import FanoutConfig
from client.rewrite import rewrite
from client.runner import RunSummary, side_path
from humpback.contracts import (
    AUGMENTED_SYSTEM_PROMPT,
    Candidate,
    ChatExample,
    HumpbackError,
    InputError,
    CreateJobRequest,
    RewrittenCandidate,
    Role,
    SeedPair,
    read_jsonl,
    seed_backward_examples,
    seed_forward_examples,
    short_pairs,
    tagged_example,
    write_jsonl,
)
from humpback.data.build import BuildConfig, build_demo, format_table
from humpback.data.pairs import import_pairs, split_calibration
from humpback.evaluation.calibrate import run_calibration
from humpback.evaluation.scorer import ScorerEvalConfig
from humpback.loop.config import SECRETS, RunConfig
from humpback.loop.evaluate import candidate_quality, evaluate_model, measure_backward, measure_scorer
from humpback.loop.records import (
    AugmentResult, CalibrationResult, CurateResult, DataFiles, LossPoint, RewriteResult, StageMetrics,
    StageRecord, TrainedModel,
)
from humpback.loop.services import ensure_servers, ensure_trainer, serving
from humpback.loop.stages import Stages, concurrently
from humpback.loop.trainer_client import TrainerClient, swaps, training_steps
from services.hotswap import role_servers
from services.registry import Registry, write_private

log = logging.getLogger(__name__)
# The served name of the rewrite arm's own server (`rewrite.model_dir`).
REWRITER = "rewriter"



def save_config(cfg: RunConfig, path: Path) -> None:
    """The resolved config, for the record: without the API keys, readable by this user only.

    The keys are left out rather than masked: given back as `--config`, a file value beats
    `HUMPBACK_API_KEY`, so a mask would be sent as the key. A re-run takes the keys where the first run
    did (the environment, its config file, `--set`), never from here."""
    write_private(path, cfg.model_dump_json(indent=2, exclude=SECRETS))


class Loop:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.dir = run_dir.absolute()
        self.stages = Stages(self.dir)
        self.svc = cfg.services
        self.trainer: TrainerClient | None = None

    # --- stages ---------------------------------------------------------------------------------

    def build_data(self) -> DataFiles:
        data = self.import_data()
        out = self.dir / "data" / "calibration.jsonl"
        assert data.seed_rest is not None  # the build and the import both write one
        moved = split_calibration(data.seed_rest, out, self.cfg.data.calibration_pairs)
        log.info("data: %d calibration pairs in %s", moved, out)
        return data.model_copy(update={"calibration": out if moved else None, "calibration_pairs": moved})

    def import_data(self) -> DataFiles:
        d = self.cfg.data
        problem = d.problem()
        if problem is not None:
            raise InputError(problem)
        if d.seed is not None:
            data = DataFiles.model_validate({**import_pairs(d.seed, d.heldout, self.dir / "data", d.max_seed),
                                             "corpus": d.corpus})
            assert data.pairs is not None
            log.info("data: %s", ", ".join(f"{n} {k}" for k, n in data.pairs.model_dump().items()))
            return data
        result = build_demo(BuildConfig(out=self.dir / "data", max_seed=d.max_seed, max_corpus_docs=d.max_corpus_docs))
        log.info("data built in %s:\n%s", result.out, format_table(result))
        return DataFiles(seed=result.out / "seed.jsonl", heldout=result.out / "heldout.jsonl",
                         seed_rest=result.out / "seed_rest.jsonl", corpus=[result.out / "corpus.jsonl"])

    def backward_pairs(self, data: DataFiles, seed: list[SeedPair]) -> list[SeedPair]:
        """What M_yx learns from (`train.backward_examples`): the seed, or the short pairs of the seed
        and of the rest of the seed side (`seed_rest.jsonl`, where the build wrote one)."""
        if self.cfg.train.backward_examples == "seed":
            return seed
        rest = data.seed_rest
        return short_pairs([*seed, *(read_jsonl(rest, SeedPair) if rest and rest.is_file() else [])])

    def train(self, name: str, examples: list[ChatExample], base: str, deploy: Role, preset: str,
              max_steps: int | None = None) -> TrainedModel:
        """One fine-tuning job through the trainer service, deployed to `deploy` when it succeeds; its
        steps are `max_steps`, else `train.max_steps`, else the preset's."""
        assert self.trainer is not None
        state = self.stages.state(name)
        if state.job is None or state.examples is None:
            path = self.dir / "train" / f"{name}.jsonl"
            write_jsonl(path, examples)
            file_id = self.trainer.upload(path).id
            metadata = {"deploy_to": deploy, "preset": preset}
            steps = max_steps or self.cfg.train.max_steps
            if steps:
                metadata["max_steps"] = str(steps)
            job = self.trainer.create_job(CreateJobRequest(
                model=base, training_file=file_id, suffix=name.removeprefix("train_"), metadata=metadata, seed=0))
            # A re-run waits for this job instead of starting another.
            state = self.stages.save_state(name, job=job.id, file=file_id, examples=len(examples))
        assert state.job is not None and state.examples is not None
        job = self.trainer.wait(state.job)
        events = self.trainer.events(job.id)
        swapped = swaps(events)
        assert job.fine_tuned_model is not None  # a job that succeeded names its model
        return TrainedModel(job=job.id, fine_tuned_model=job.fine_tuned_model, role=deploy, examples=state.examples,
                            trained_tokens=job.trained_tokens, swap_stall_s=swapped[-1].stall_s if swapped else None,
                            losses=[LossPoint(step=s.step, loss=s.train_loss, tokens_per_second=s.tokens_per_second)
                                    for s in training_steps(events)])

    def servers(self, role: str) -> list[str]:
        """The URLs of `role`'s servers: the configured one and the replicas the registry records with it."""
        url = self.svc.backward_url if role == "backward" else self.svc.scorer_url
        return list(role_servers(role, url, self.svc.registry).values())

    def deployed(self, model: TrainedModel) -> FanoutConfig:
        """Have the trainer make the role's servers serve this model (a restart may have put the base
        weights back); how to reach them: every replica, each request naming the model's version (the
        job id), so no answer comes from other weights."""
        assert self.trainer is not None
        role = model.role
        deployment = self.trainer.deploy(model.job, role)
        if deployment.swapped:
            log.info("re-deployed %s to %s (requests stalled %.2f s)", deployment.fine_tuned_model, role,
                     deployment.stall_s)
        return FanoutConfig(endpoints=self.servers(role), api_key=self.svc.api_key, require_version=model.job)

    def client(self, local: Callable[..., Awaitable[RunSummary]], on_ray: Callable[..., RunSummary],
               *call: Any) -> RunSummary:
        """A stage's client command, `call` its arguments (the config fourth): run here, or with `on_ray`
        on the Ray cluster the stage's config names (`augment.ray`, ...), else `services.ray`."""
        config = call[3]
        address = config.ray or self.svc.ray
        if address is None:
            return asyncio.run(local(*call))
        return on_ray(*call[:3], config.model_copy(update={"ray": address}), *call[4:])

    def augment_config(self, data: DataFiles) -> AugmentConfig:
        """The run's augment settings; with `augment.shots` and no `augment.demonstrations`, the
        demonstrations come from the run's seed (never its held-out pairs, which measure the model)."""
        cfg = self.cfg.augment
        if cfg.shots and cfg.demonstrations is None:
            cfg = cfg.model_copy(update={"demonstrations": data.seed})
        return cfg

    def augment(self, data: DataFiles, backward: TrainedModel) -> AugmentResult:
        fan = self.deployed(backward)
        out = self.dir / "augment" / "candidates.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        config = self.augment_config(data).model_copy(
            update={"model": "backward", "checkpoint": backward.job, "limit": self.cfg.data.max_segments})
        summary = self.client(augment, cluster.augment, [str(c) for c in data.corpus], out, fan, config, None,
                              self.cfg.data.text_field)
        return AugmentResult.from_summary(out, summary)

    def decontamination_sets(self, data: DataFiles) -> list[Path]:
        """The sets curate decontaminates against besides the shipped evaluation prompts: the
        configured ones and the run's held-out pairs, which measure the models (`eval nll`, the stage
        metrics) and so must not be trained on."""
        against = list(self.cfg.curate.decontaminate_against)
        if data.heldout:
            against.append(data.heldout)
        return against

    def reverse_signal(self, cfg: CurateConfig) -> dict[str, str]:
        """The backward model serves the reverse likelihood signal (`cfg.scorer` reverse_pmi or
        combined) of every iteration, unless `curate.backward_endpoint` names another server."""
        if cfg.scorer in ("reverse_pmi", "combined") and cfg.backward_endpoint is None:
            return {"backward_endpoint": self.servers("backward")[0]}
        return {}

    def calibrate(self, t: int, scorer: TrainedModel, backward: TrainedModel, data: DataFiles) -> CalibrationResult:
        """Iteration t's combiner (`eval calibrate`): the current scorer's and backward model's signals on
        the calibration pairs and negatives built from them. Where it cannot be fitted (no or too few
        pairs), one warning and no combiner: that iteration curates with `pmi`."""
        out = self.dir / "curate" / f"combiner{t}.json"
        if not data.calibration:
            reason = "no calibration pairs (data.calibration_pairs; the seed side has no pairs past data.max_seed)"
        else:
            backward_url = self.cfg.curate.backward_endpoint or self.deployed(backward).endpoints[0]
            try:
                combiner = asyncio.run(run_calibration(
                    data.calibration, out, self.deployed(scorer), backward_url, "scorer",
                    ScorerEvalConfig(corpus=self.passage_corpus(data)), terms=self.terms, checkpoint=scorer.job))
            except (HumpbackError, ValueError) as e:  # a fit that fails (one class, ...) is a ValueError
                reason = str(e)
            else:
                return CalibrationResult(combiner=out, pairs=combiner.pairs, negatives=combiner.negatives,
                                         coef=dict(zip(combiner.features, combiner.coef, strict=True)))
        log.warning("calibrate_%d: the combined scorer cannot be calibrated, curating with pmi: %s", t, reason)
        return CalibrationResult(combiner=None, fallback="pmi", reason=reason)

    def calibrated(self, t: int, scorer: TrainedModel, backward: TrainedModel, data: DataFiles
                   ) -> CalibrationResult | None:
        """Iteration t's calibrate stage, where the run's scorer is calibrated (None where it is not)."""
        if not self.cfg.curate.calibrates():
            return None
        return self.stages.run(f"calibrate_{t}", lambda: self.calibrate(t, scorer, backward, data))

    @property
    def terms(self) -> Path:
        """The likelihood terms' journal of the whole run: every iteration's calibration, curation and scorer
        measurement asks the same backward model (M_yx) of the same text, so its terms are asked once."""
        return self.dir / "curate" / "terms.jsonl"

    def scoring(self, calibrated: CalibrationResult | None) -> CurateConfig:
        """How iteration t scores (`calibrated`: its calibrate stage, None where it has none): the run's curate
        settings, with the iteration's combiner or, where none was fitted, `pmi`."""
        cfg = self.cfg.curate
        if calibrated is not None:
            combiner = calibrated.combiner
            cfg = cfg.model_copy(update={"calibration": combiner} if combiner else {"scorer": "pmi"})
        return cfg.model_copy(update={**self.reverse_signal(cfg), "terms": self.terms})

    def curate(self, t: int, candidates: Path, scorer: TrainedModel, data: DataFiles,
               score: CurateConfig) -> CurateResult:
        fan = self.deployed(scorer)
        out = self.dir / "curate" / f"A{t}.jsonl"
        scored = self.dir / "curate" / f"scored{t}.jsonl"
        config = score.model_copy(update={"model": "scorer", "checkpoint": scorer.job, "scored": scored,
                                          "decontaminate_against": self.decontamination_sets(data)})
        summary = self.client(curate, cluster.curate, candidates, out, fan, config)
        # The curated set's own reader: a corrupt journal line is skipped here as `select` skipped it,
        # and so is a contaminated candidate's score.
        contaminated = side_path(out, "contaminated.jsonl")
        dropped = contaminated_ids(contaminated)
        scores = [r.score for r in scored_records(scored, scored_mode(config), "scorer", exclude=dropped)]
        kept = {str(k): sum(1 for s in scores if s is not None and s >= k)
                for k in self.cfg.curate.kept_thresholds(config.scorer)}
        manifest = data.seed.parent / "manifest.json"
        dataset = export_dataset(DatasetFiles(
            curated=out, out=out.with_name(f"A{t}.dataset"), scored=scored,
            augment_summary=side_path(candidates, "summary.json"),
            data_manifest=manifest if manifest.is_file() else None))
        return CurateResult.from_summary(
            summary, curated=out, scored=scored, dataset=dataset["out"], scorer=scorer.fine_tuned_model,
            scoring=config.scorer, calibration=config.calibration, kept_per_threshold=kept,
            contaminated_file=contaminated)

    def curated_candidates(self, picked: CurateResult, contaminated: Collection[str], out: Path) -> int:
        """A_t as a candidates file, for `rewrite`; the number of pairs. Curate's own selection from its
        scored journal (this scorer and mode, score >= k, no contaminated candidate), so that each pair
        keeps its candidate id and source, which the chat-format A_t drops."""
        # The backward model's name is not in the scored journal: empty, as curate reads a pair without one.
        return write_jsonl(out, (
            Candidate(custom_id=r.candidate_id, instruction=r.instruction, output=r.output, source=r.source, model="")
            for r in selected_records(picked.scored, picked.k, picked.mode, picked.served_as, contaminated)))

    def rewrite(self, picked: CurateResult, scorer: TrainedModel, contaminated: Collection[str]) -> RewriteResult:
        """A_1's responses rewritten by `rewrite.url`, else by the model of `rewrite.model_dir` on a server
        of its own for the stage, else by `scorer` (M0, which curated A_1) on the scorer server. A pair
        whose rewrite fails (cut at max_tokens, empty) is left out of the arm and counted."""
        cfg = self.cfg.rewrite
        pairs = self.dir / "rewrite" / "A1.candidates.jsonl"
        out = self.dir / "rewrite" / "A1.rewritten.jsonl"
        curated = self.curated_candidates(picked, contaminated, pairs)
        if cfg.url is not None:
            summary = self.client(rewrite, cluster.rewrite, pairs, out,
                                  FanoutConfig(endpoints=[cfg.url], api_key=cfg.api_key), cfg)
        elif cfg.model_dir is not None:
            with serving(self.svc, REWRITER, cfg.model_dir, cfg.port) as url:
                summary = self.client(rewrite, cluster.rewrite, pairs, out,
                                      FanoutConfig(endpoints=[url], api_key=self.svc.api_key),
                                      cfg.model_copy(update={"model": REWRITER}))
        else:
            summary = self.client(rewrite, cluster.rewrite, pairs, out, self.deployed(scorer),
                                  cfg.model_copy(update={"model": "scorer", "checkpoint": scorer.job}))
        return RewriteResult.from_summary(summary, pairs, out, curated, len(read_jsonl(out, RewrittenCandidate)))

    def rewritten_pairs(self, rewritten: RewriteResult) -> list[ChatExample]:
        """The rewrite arm's A_1: the pairs whose rewrite succeeded, tagged as curated pairs are, so that
        the two M1s differ by their responses alone."""
        return [tagged_example(r.instruction, r.output, AUGMENTED_SYSTEM_PROMPT)
                for r in read_jsonl(rewritten.rewritten_file, RewrittenCandidate)]

    def uncurated(self, candidates: Path, size: int, exclude: Collection[str] = ()) -> list[ChatExample]:
        """The ablation's control: candidates of A_k's size drawn without looking at scores, but not
        those in `exclude` (the contaminated ones, which A_k cannot hold either: the two sets differ
        by the scores alone)."""
        rows = [r for r in read_jsonl(candidates, Candidate) if r.custom_id not in exclude]
        random.Random(0).shuffle(rows)
        return [tagged_example(r.instruction, r.output, AUGMENTED_SYSTEM_PROMPT) for r in rows[:size]]

    def evaluate(self, name: str, model: TrainedModel, data: DataFiles) -> None:
        self.stages.run(f"eval_{name}", lambda: evaluate_model(
            self.deployed(model), model.role, model.fine_tuned_model, self.cfg.eval, self.dir / "eval" / name,
            data.heldout))

    # --- stage metrics (`eval.stage_metrics`) ---------------------------------------------------

    def _heldout(self, data: DataFiles) -> Path | None:
        if not self.cfg.eval.stage_metrics:
            return None
        if not data.heldout:
            log.info("no held-out pairs (data.heldout): the backward model and the scorers are not measured")
            return None
        return data.heldout

    def base_backward_weights(self) -> str | None:
        """Why the backward server may not serve its base weights now (None when it does): once M_yx's
        job exists the trainer may have deployed it, and the registry names what an earlier run left."""
        if self.stages.result("train_backward") or self.stages.state("train_backward").job is not None:
            return ("M_yx's training job was started before this stage ran (the run began with an older version "
                    "or with eval.stage_metrics off)")
        served = Registry.load(self.svc.registry).servers.get("backward")
        if served is not None and served.version != "base":
            return f"the backward server serves {served.version}, not its base weights"
        return None

    def measure_base_backward(self, data: DataFiles) -> None:
        """The untrained backward model, measured before `train_backward` and recorded as a stage, so
        that a resumed run never measures M_yx in its place."""
        heldout = self._heldout(data)
        if heldout is None:
            return

        def run() -> StageMetrics:
            reason = self.base_backward_weights()
            if reason is not None:
                log.warning("the base backward model is not measured: %s", reason)
                return StageMetrics(model="base", skipped=reason)
            return measure_backward(
                FanoutConfig(endpoints=self.servers("backward"), api_key=self.svc.api_key), "backward", "base",
                heldout, self.dir / "eval" / "stages" / "backward_base.json", self.augment_config(data),
                self.cfg.eval.stage_pairs)

        self.stages.run("stage_backward_base", run)

    def measure_backward_model(self, backward: TrainedModel, data: DataFiles) -> None:
        heldout = self._heldout(data)
        if heldout is None:
            return
        self.stages.run("stage_backward_myx", lambda: measure_backward(
            self.deployed(backward), backward.role, backward.fine_tuned_model, heldout,
            self.dir / "eval" / "stages" / "backward_myx.json", self.augment_config(data), self.cfg.eval.stage_pairs))

    def passage_corpus(self, data: DataFiles) -> Path | None:
        """Where `eval scorer` and `eval calibrate` draw `passage` negatives: the run's first corpus. They
        read its "text" field: another field would yield no passage."""
        return data.corpus[0] if self.cfg.data.text_field == "text" else None

    def measure_scorer(self, name: str, scorer: TrainedModel, k: float | None, data: DataFiles,
                       score: CurateConfig) -> None:
        """`scorer` (served as the scorer of an iteration that scored as `score` says and selected with
        threshold `k`) on held-out pairs, its `passage` negatives from the run's first corpus."""
        heldout = self._heldout(data)
        if heldout is None:
            return
        threshold = k if k is not None else score.min_score
        self.stages.run(f"stage_scorer_{name}", lambda: measure_scorer(
            self.deployed(scorer), scorer.role, scorer.fine_tuned_model, heldout,
            self.dir / "eval" / "stages" / f"scorer_{name}.json", self.passage_corpus(data), threshold,
            self.cfg.eval.stage_pairs, score.model_copy(update={"checkpoint": scorer.job})))

    def measure_candidates(self, augmented: AugmentResult, backward: TrainedModel) -> None:
        if not self.cfg.eval.stage_metrics:
            return
        self.stages.run("stage_candidates", lambda: candidate_quality(
            backward.fine_tuned_model, augmented.candidates, augmented.summary.quality,
            self.dir / "report" / "candidates_verb_objects.png"))

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, StageRecord]:
        cfg = self.cfg
        save_config(cfg, self.dir / "config.json")
        data = self.stages.run("data", self.build_data)
        seed = read_jsonl(data.seed, SeedPair)
        scorer_ready = ensure_servers(self.svc)
        ensure_trainer(self.svc, self.dir / "logs")
        self.trainer = TrainerClient(self.svc.trainer_url, self.svc.api_key)
        forward_seed = seed_forward_examples(seed)

        self.measure_base_backward(data)
        backward = self.stages.run("train_backward", lambda: self.train(
            "train_backward", seed_backward_examples(self.backward_pairs(data, seed)), "backward", "backward",
            cfg.train.backward_preset, cfg.train.backward_max_steps))
        # The scorer's server, started once the backward one answered, got ready meanwhile.
        scorer_ready()
        model = self.stages.run("train_m0", lambda: self.train(
            "train_m0", forward_seed, "scorer", "scorer", cfg.train.forward_preset))

        def backward_side() -> AugmentResult:
            augmented = self.stages.run("augment", lambda: self.augment(data, backward))
            # Measured while each model is served anyway: M_yx after augment, each scorer after its curation.
            self.measure_candidates(augmented, backward)
            self.measure_backward_model(backward, data)
            return augmented

        def scorer_side() -> CalibrationResult | None:
            self.evaluate("m0", model, data)
            return self.calibrated(1, model, backward, data) if cfg.iterations else None

        # Augment asks the backward server, M0's evaluation and calibration the scorer's: side by side.
        augmented, calibrated = concurrently(backward_side, scorer_side)
        cands = augmented.candidates
        curated: list[ChatExample] = []
        contaminated: set[str] = set()
        rewritten: RewriteResult | None = None
        for t in range(1, cfg.iterations + 1):
            scorer = model
            if t > 1:
                calibrated = self.calibrated(t, scorer, backward, data)
            score = self.scoring(calibrated)
            picked = self.stages.run(f"curate_{t}", lambda: self.curate(t, cands, scorer, data, score))
            contaminated = contaminated_ids(picked.contaminated_file)
            self.measure_scorer(f"m{t - 1}", scorer, picked.k, data, score)
            if t == 1 and cfg.rewrite.enabled:  # while M0 still serves as the scorer: no swap when it rewrites
                rewritten = self.stages.run("rewrite_1", lambda: self.rewrite(picked, scorer, contaminated))
            curated = read_jsonl(picked.curated, ChatExample)
            model = self.stages.run(f"train_m{t}", lambda: self.train(
                f"train_m{t}", forward_seed + curated, "scorer", "scorer", cfg.train.forward_preset))
            self.evaluate(f"m{t}", model, data)
        if rewritten is not None:  # after the iterations, which would otherwise swap M1 back in for curate_2
            m1_rewritten = self.stages.run("train_m1_rewritten", lambda: self.train(
                "train_m1_rewritten", forward_seed + self.rewritten_pairs(rewritten), "scorer", "scorer",
                cfg.train.forward_preset))
            self.evaluate("m1_rewritten", m1_rewritten, data)
        if cfg.eval.ablation:
            control = self.stages.run("train_uncurated", lambda: self.train(
                "train_uncurated", forward_seed + self.uncurated(cands, len(curated), contaminated), "scorer", "scorer",
                cfg.train.forward_preset))
            self.evaluate("uncurated", control, data)
        return self.stages.all()
