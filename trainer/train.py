"""One fine-tuning run with TRL's `SFTTrainer`, run in its own process: `python -m trainer.train SPEC`.

The worker writes a `TrainSpec` JSON file and starts this module; the run reports on the file
descriptor that was stdout as one JSON object per line (stdout itself is pointed at stderr, so
library prints cannot corrupt the stream). These are all the events it emits; the worker records
each as a job event (`stage` by its message) except `exported`, which ends the run:

    {"type": "stage", "message": ..., "data": {...} (optional)}
    {"type": "metrics", **TrainingStep}  (humpback.contracts: step, train_loss, tokens_per_second ...)
    {"type": "eval", "step", "valid_loss"}  (only with a validation file, every save_steps)
    {"type": "checkpoint", "step", "path", "metrics": {...}}
    {"type": "exported", "path", "trained_tokens"}  (rank 0, last)

A separate process means cancel is a kill, and a crash of torch cannot take the API down.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from pydantic import Field

from humpback.contracts import ChatExample, TrainingStep
from trainer.config import Preset


class TrainSpec(Preset):
    """Everything one run needs: the job's preset as the worker resolved it (learning rate scaled, batch
    size and steps decided, so none is left to a rule here), plus the run's files and seed. Not a setting:
    the worker writes it and the training process reads it."""

    base_model: Path = Field(description="the folder fine-tuned from")
    training_file: Path = Field(description="validated chat examples, one per line")
    validation_file: Path | None = Field(None, description="examples evaluated every save_steps, when given")
    output_dir: Path = Field(description="resumable checkpoints (checkpoint-N)")
    export_dir: Path = Field(description="the final merged weights, written atomically")
    seed: int = Field(description="seed of the weights' initialisation and of the data order")
    batch_size: int = Field(description="examples per optimizer step, resolved")
    max_steps: int = Field(description="optimizer steps, resolved")


def read_examples(path: Path) -> list[dict[str, Any]]:
    """TRL conversational prompt-completion rows (loss on the completion only) from a validated file."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(ChatExample.model_validate_json(line).prompt_completion())
    return rows


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` folder (the trainer state is written last)."""
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _emit(stream: IO[str], **event: Any) -> None:
    stream.write(json.dumps(event) + "\n")
    stream.flush()


def run(spec: TrainSpec, events: IO[str]) -> None:
    """Train, write resumable checkpoints, then merge and export the final weights atomically."""
    # Heavy imports here: the service imports this module for `TrainSpec` and `last_checkpoint` only.
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainer.export import export_model

    torch.manual_seed(spec.seed)
    lora = spec.method == "lora"
    dtype = torch.bfloat16 if lora else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if not lora:
        model_kwargs["attention_dropout"] = spec.dropout  # the paper's dropout for full fine-tuning
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, **model_kwargs)

    train = Dataset.from_list(read_examples(spec.training_file))
    evaluation = Dataset.from_list(read_examples(spec.validation_file)) if spec.validation_file else None
    micro = min(spec.micro_batch_size, spec.batch_size)
    # Under data parallelism each rank contributes `micro` examples per pass: keep the job's batch.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = max(1, spec.batch_size // (micro * world))
    config = SFTConfig(
        output_dir=str(spec.output_dir),
        max_steps=spec.max_steps,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=spec.learning_rate,
        # Linear decay from the peak to final_lr_ratio of it, no warmup (paper: 1e-5 -> 9e-6).
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={
            "num_stable_steps": 0,
            "num_decay_steps": spec.max_steps,
            "decay_type": "linear",
            "min_lr_ratio": spec.final_lr_ratio,
        },
        warmup_steps=0,
        weight_decay=spec.weight_decay,
        max_length=spec.max_length,
        completion_only_loss=True,
        packing=False,  # padding-free packing is meant for FlashAttention only
        gradient_checkpointing=spec.gradient_checkpointing,
        bf16=lora,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=spec.save_steps,
        seed=spec.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = (
        LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        if lora
        else None
    )

    class Reporter(TrainerCallback):
        """Streams training loss per step, validation loss and each saved checkpoint to the worker."""

        def __init__(self) -> None:
            self.step_started = time.perf_counter()
            self.base_tokens = 0  # tokens trained before a resume (TRL's counter restarts at 0)
            self.tokens_at_step_start = 0
            self.last: dict[str, Any] = {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.step_started = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "eval_loss" in logs:
                self.last["valid_loss"] = logs["eval_loss"]
                self.last["valid_mean_token_accuracy"] = logs.get("eval_mean_token_accuracy")
                _emit(events, type="eval", step=state.global_step, valid_loss=logs["eval_loss"])
                return
            if "loss" not in logs:
                return
            step_time = time.perf_counter() - self.step_started
            tokens = self.base_tokens + int(logs.get("num_tokens", 0))
            step_tokens = max(0, tokens - self.tokens_at_step_start)
            self.tokens_at_step_start = tokens
            self.last.update(
                step=state.global_step,
                train_loss=logs["loss"],
                train_mean_token_accuracy=logs.get("mean_token_accuracy"),
            )
            _emit(events, type="metrics", **TrainingStep(
                step=state.global_step,
                total_steps=state.max_steps,
                train_loss=logs["loss"],
                train_mean_token_accuracy=logs.get("mean_token_accuracy"),
                learning_rate=logs.get("learning_rate"),
                num_tokens=tokens,
                step_tokens=step_tokens,
                step_time=step_time,
                tokens_per_second=step_tokens / step_time if step_time > 0 else 0.0,
            ).model_dump())

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _emit(events, type="checkpoint", step=state.global_step, path=str(path), metrics=dict(self.last))

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    reporter = Reporter()
    resume = last_checkpoint(spec.output_dir)
    if resume is not None:
        history = json.loads((resume / "trainer_state.json").read_text())["log_history"]
        reporter.base_tokens = max((int(h.get("num_tokens", 0)) for h in history), default=0)
        reporter.tokens_at_step_start = reporter.base_tokens
        _emit(events, type="stage", message=f"Resuming from {resume.name}")
    trainer.add_callback(reporter)
    _emit(events, type="stage", message=f"Training started: {spec.max_steps} steps, batch {spec.batch_size}")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trained_tokens = reporter.tokens_at_step_start
    runtime = output.metrics["train_runtime"]
    _emit(
        events,
        type="stage",
        message=f"Training finished in {runtime:.1f} s; exporting merged weights",
        data={"train_runtime": runtime, "trained_tokens": trained_tokens, "finished_at": time.time()},
    )
    if not trainer.is_world_process_zero():
        return
    model = trainer.model.merge_and_unload() if lora else trainer.model
    export_model(model, tokenizer, spec.export_dir)
    _emit(events, type="exported", path=str(spec.export_dir), trained_tokens=trained_tokens)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainer.train SPEC.json", file=sys.stderr)
        return 2
    spec = TrainSpec.model_validate_json(Path(argv[0]).read_text())
    run(spec, event_stream())
    return 0


def event_stream() -> IO[str]:
    """The events' stream: what was stdout, which is pointed at stderr from here on so that library prints
    cannot corrupt it. Under `accelerate launch` every rank runs this; only rank 0 reports, the others
    stay silent."""
    main_process = os.environ.get("RANK", "0") == "0"
    events = os.fdopen(os.dup(1), "w", buffering=1) if main_process else open(os.devnull, "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


if __name__ == "__main__":
    sys.exit(main())
