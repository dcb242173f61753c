"""One fine-tuning run with a TRL trainer, whatever the method: what SFT (`finetune.train`) and
DPO (`finetune.dpo`) share. Each of them supplies its data and its TRL trainer class and config;
this module does the rest, in this order:

1. `start_run`: the resume checks, before any data or model loads (the run folder, its newest
   complete checkpoint, its settings and data against this run's);
2. `record_settings`: config.yaml and fingerprint.json of a fresh run;
3. `run_callbacks`, `trainer_arguments`, `make_trainer`: metrics.jsonl, progress bars, the
   schedule, checkpoints marked complete, the best checkpoint kept;
4. `evaluate_before`, `run_training`: the evaluation before training (or the saved one on resume), then
   training, the final evaluation and the best checkpoint;
5. `save_adapter`, `run_report`, `finish`: the adapter of the best checkpoint and the report.

The same code runs on one CPU, one GPU, or under `accelerate launch` on several (DDP): the
Trainer handles the distribution; only rank 0 writes files and prints.

The adapter is the best checkpoint's by eval loss (not the last one). `--resume` continues only
the run its folder holds: its config.yaml and fingerprint.json are compared with this run's
settings and data, never rewritten.

Output folder layout:
    checkpoints/checkpoint-N/   Trainer checkpoints (the newest and the best); `COMPLETE` is
                                written last, so a checkpoint cut short by a kill is never
                                resumed from; run_totals.json: training loss and time so far
    adapter/                    adapter_model.safetensors + adapter_config.json + tokenizer +
                                finetune.json (base model, method, step, stop tokens, prompts)
    config.yaml, fingerprint.json   the run's settings and its data files' sha256 (first start)
    eval_before.json            the evaluation before training (a resumed run reads it back)
    metrics.jsonl, loss_curve.png, report.md, report.html, report.json
    tensorboard/                event files (report_to: tensorboard)
    rejects.jsonl               bad rows with their reasons (--skip-invalid only)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import PrinterCallback, TrainerState
from transformers.trainer_utils import rotate_checkpoints

from core.atomic import atomic_directory, write_text_atomic
from core.killpoints import killpoint
from core.outputs import claim_output_folder
from core.train.checkpoint import clean_run_folder, refuse_unresumed_checkpoints
from core.train.config import ConfigError, read_yaml_mapping, save_config
from core.train.trainer import MetricsLog
from finetune.base_model import (
    check_target_modules,
    compute_dtype,
    context_length,
    default_target_modules,
    model_label,
)
from finetune.config import FinetuneConfig, report_targets
from finetune.inference import ADAPTER_META

COMPLETE = "COMPLETE"
TOTALS = "run_totals.json"  # in each checkpoint: training loss sum and seconds up to its step
FINGERPRINT = "fingerprint.json"
TARGET_EVALS = 5  # default evaluations per run (at most 6 with the one at the last step)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # TRL's checkpoint folders
# Settings a resumed run may change: how long it trains (a longer max_steps or more epochs), how
# often it logs, evaluates and saves, what it prints and where it reports, the hardware. Every
# other key defines the run and must match; data files are compared by content (fingerprint.json),
# so a moved file is fine and an edited one is not.
RESUME_MAY_CHANGE = frozenset(
    {
        "max_steps", "epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
        "early_stopping_patience", "num_samples", "sample_max_new_tokens", "report_to", "device",
        "gradient_checkpointing", "trust_remote_code", "output_dir", "data", "eval_data",
        "chat_template",
    }
)  # fmt: skip


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_max_length(cfg: FinetuneConfig, model_config) -> int:
    """--max-length, checked against the model's context (default: the context, else 2048)."""
    context = context_length(model_config)
    if cfg.max_length is None:
        return context or 2048
    if context is not None and cfg.max_length > context:
        raise ValueError(
            f"max_length {cfg.max_length} is longer than the model's context ({context})"
        )
    return cfg.max_length


# ---------------------------------------------------------------------------------------------
# The run folder: where a run starts, and resuming only the same run
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run's folder and where it starts from (`checkpoint` None: a fresh run). `say` prints
    on rank 0 only; `main` is rank 0, the process that writes files."""

    cfg: FinetuneConfig
    out_dir: Path
    checkpoint: Path | None
    say: Callable[..., None]
    main: bool

    @property
    def resume_step(self) -> int | None:
        return checkpoint_step(self.checkpoint) if self.checkpoint else None


def finetune_folder(path: Path) -> bool:
    """Whether a folder is a fine-tuning run's (so a new run may use it): it holds the files a
    run writes first (fingerprint.json, checkpoints/, metrics.jsonl) or a finished adapter."""
    path = Path(path)
    return (
        (path / FINGERPRINT).is_file()
        or (path / "checkpoints").is_dir()
        or (path / "metrics.jsonl").exists()
        or (path / "adapter" / ADAPTER_META).is_file()
    )


def start_run(cfg: FinetuneConfig, resume: bool, echo=print, overwrite: bool = False) -> Run:
    """The run's folder after the resume checks (`resume_checkpoint`), before any data loads.
    A non-empty folder that is not a run's is refused, or with `overwrite` moved aside (never
    deleted: core.outputs)."""
    out_dir = Path(cfg.output_dir)
    main = is_main_process()
    if overwrite and resume:
        raise ConfigError("--overwrite starts afresh and --resume continues: pass one of them")
    if main:
        claim_output_folder(
            out_dir, "finetune", finetune_folder, overwrite=overwrite, flag="--output-dir"
        )
    say = echo if main else (lambda *_: None)
    return Run(cfg, out_dir, resume_checkpoint(cfg, out_dir, resume), say, main)


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a checkpoint-N folder."""
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1))


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoints/checkpoint-N folders marked COMPLETE, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def drop_incomplete_checkpoints(out_dir: Path) -> None:
    """Remove checkpoint folders a kill left half-written (no COMPLETE marker)."""
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if CHECKPOINT.match(p.name) and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)


def resume_checkpoint(cfg: FinetuneConfig, out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from (None: a fresh run), after the checks every method
    makes before any data or model loads: half-written checkpoints dropped, a folder with
    checkpoints needs --resume, --resume needs one, and a resumed run's settings and data must be
    those it started with. What a killed run left half-written (an adapter or report under its
    temp name, a checkpoint without COMPLETE) is cleared first, whether or not this run resumes."""
    if is_main_process():
        clean_run_folder(out_dir)  # core.atomic's temps whose writer is gone
        drop_incomplete_checkpoints(out_dir)
    existing = complete_checkpoints(out_dir)
    refuse_unresumed_checkpoints(out_dir, bool(existing), resume)
    if resume and not existing:
        raise FileNotFoundError(f"{out_dir}: no complete checkpoint to resume from")
    checkpoint = existing[-1] if resume else None
    if checkpoint is not None:
        cfg.validate()
        check_resume(cfg, out_dir)
    return checkpoint


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(cfg: FinetuneConfig) -> dict:
    """What the run's files contain: {key: {"path", "sha256"}} for data, eval_data and the chat
    template (when set)."""
    files = {"data": cfg.data, "eval_data": cfg.eval_data, "chat_template": cfg.chat_template}
    return {
        key: {"path": str(path), "sha256": file_sha256(path)}
        for key, path in files.items()
        if path and Path(path).is_file()
    }


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def check_resume(cfg: FinetuneConfig, out_dir: Path) -> None:
    """Raise ConfigError naming every defining key whose saved value differs from this run's,
    both values, in one line; config.yaml and fingerprint.json are only read. A saved config
    missing keys (cut short, or hand-edited) is refused naming them: what it lacks cannot be
    checked."""
    config_file = out_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"--resume: {config_file} is missing, so this run cannot be checked against the "
            "one it would continue; pass a new --output-dir"
        )
    try:
        saved = read_yaml_mapping(config_file)
    except ConfigError as e:
        raise ConfigError(f"--resume: {e}") from None
    current = asdict(cfg)
    missing = [key for key in current if key not in saved]
    if missing:
        raise ConfigError(
            f"--resume: {config_file} lacks {', '.join(missing)} (cut short or edited), so this "
            "run cannot be checked against the one it would continue; pass a new --output-dir"
        )
    was, now = [], []
    for key, value in current.items():
        if key in RESUME_MAY_CHANGE or saved[key] == value:
            continue
        was.append(f"{key}={_shown(saved[key])}")
        now.append(f"{key}={_shown(value)}")
    fingerprint_file = out_dir / FINGERPRINT
    if fingerprint_file.is_file():
        old = json.loads(fingerprint_file.read_text())
        new = fingerprint(cfg)
        for key in ("data", "eval_data", "chat_template"):
            a, b = old.get(key), new.get(key)
            if (a and a["sha256"]) == (b and b["sha256"]) or (b is None and current[key]):
                continue  # same content, or a missing file that prepare_data names next
            was.append(f"{key}={a['path']} (sha256 {a['sha256'][:12]})" if a else f"{key}=none")
            now.append(f"{key}={b['path']} (sha256 {b['sha256'][:12]})" if b else f"{key}=none")
    if was:
        raise ConfigError(
            f"--resume: {config_file} has {', '.join(was)}, this run has {', '.join(now)}; "
            "pass the same settings or a new --output-dir"
        )


def record_settings(cfg: FinetuneConfig, out_dir: Path, checkpoint: Path | None) -> None:
    """config.yaml and the data fingerprint of a fresh run, atomically; a resumed run keeps the
    settings it started with (never rewritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process() and checkpoint is None:
        save_config(cfg, out_dir / "config.yaml")
        write_text_atomic(out_dir / FINGERPRINT, json.dumps(fingerprint(cfg), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Callbacks: metrics.jsonl, this run's intervals on resume, progress bars
# ---------------------------------------------------------------------------------------------


def run_callbacks(
    out_dir: Path, resume_step: int | None, progress: bool, echo, perplexity: bool = True
) -> list[TrainerCallback]:
    """[Intervals, Metrics, Progress]. perplexity: also log and print exp(eval loss) (SFT's
    cross-entropy; DPO's loss is not one, so its lines show the reward accuracy and margin)."""
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step) if is_main_process() else None

    class Metrics(TrainerCallback):
        """Each log line (training loss, learning rate, eval loss) as one JSON object."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            # transformers' summary of one train() call (train_runtime, and a train_loss of the
            # resumed part only): report.json has the whole run's instead.
            if metrics is None or not logs or "train_runtime" in logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch}
            record.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
            if "eval_loss" in logs and perplexity:
                record["eval_ppl"] = math.exp(min(logs["eval_loss"], 50.0))
            metrics.write(record)

    class Intervals(TrainerCallback):
        """On resume, transformers keeps the checkpoint's logging/eval/save intervals; this
        run's (which may legitimately differ) apply from here on."""

        def on_train_begin(self, args, state, control, **kwargs):
            state.compute_steps(args, state.max_steps)

    class Progress(TrainerCallback):
        bar = None
        eval_bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if progress and is_main_process():
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            # A large evaluation takes minutes: it gets its own bar (before training, too).
            if not (progress and is_main_process()):
                return
            if self.eval_bar is None:
                total = len(eval_dataloader) if eval_dataloader is not None else None
                self.eval_bar = tqdm(total=total, desc="evaluating", leave=False)
            self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, **kwargs):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not is_main_process() or not logs:
                return
            if "eval_loss" in logs:
                self.on_evaluate(args, state, control)  # the bar goes before the line
            if "loss" in logs and self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if "eval_loss" in logs and state.global_step > 0:
                loss = logs["eval_loss"]
                line = f"step {state.global_step}: eval loss {loss:.4f}"
                if perplexity:
                    line += f", ppl {math.exp(loss):.3f}"
                elif "eval_rewards/margins" in logs:  # DPO: is the preference being learned?
                    line += (
                        f", reward accuracy {logs['eval_rewards/accuracies']:.3f}, "
                        f"margin {logs['eval_rewards/margins']:+.4f}"
                    )
                (self.bar.write if self.bar is not None else echo)(line)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return [Intervals(), Metrics(), Progress()]


# ---------------------------------------------------------------------------------------------
# The trainer: schedule, adapters, complete-marked checkpoints
# ---------------------------------------------------------------------------------------------


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    """Optimizer steps of the run: --max-steps, else the epochs over all processes' batches."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (cfg.batch_size * world)) / cfg.gradient_accumulation)
    return max(1, math.ceil(per_epoch * cfg.epochs))


def intervals(cfg: FinetuneConfig, total: int) -> tuple[int, int]:
    """(eval_steps, save_steps): about TARGET_EVALS evaluations per run, a checkpoint at each
    (the best must be an evaluated one); a run of TARGET_EVALS steps or fewer is evaluated
    at its end only (transformers always evaluates and saves the last step)."""
    if cfg.eval_steps:
        every = cfg.eval_steps
    elif cfg.save_steps:
        every = cfg.save_steps
    elif total <= TARGET_EVALS:
        every = total
    else:
        every = math.ceil(total / TARGET_EVALS)
    return every, cfg.save_steps or every


def trainer_arguments(cfg: FinetuneConfig, train_rows: int, device: str, out_dir: Path, max_length):
    """The keyword arguments SFT and DPO runs share (TRL's SFTConfig and DPOConfig both take
    them): schedule, evaluation and checkpoint intervals, best-checkpoint keeping, precision."""
    total = total_steps(cfg, train_rows)
    eval_steps, save_steps = intervals(cfg, total)
    dtype = compute_dtype(device)
    return dict(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # < 1 means a share of the steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        # The best checkpoint by eval loss is never pruned, and its adapter is loaded back at the
        # end: that is the adapter saved, not the last step's.
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=cfg.seed,
        # Explicit: DPOConfig would default to bf16 and gradient checkpointing on.
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=max_length,
        report_to=report_targets(cfg.report_to) or "none",
        disable_tqdm=True,  # our Progress callback draws the bars
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def lora_config(cfg: FinetuneConfig, model) -> tuple[LoraConfig, list[str]]:
    """The LoRA adapters of this run and the modules they go on (auto: every linear layer)."""
    targets = cfg.target_modules or default_target_modules(model)
    check_target_modules(model, targets)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return lora, targets


@contextmanager
def tensorboard_dir(path: Path):
    """TensorBoardCallback reads its folder from this variable when the trainer is built; a
    folder the user set is kept."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)


class _MovedBestCheckpoint(logging.Filter):
    """transformers warns that a resumed state's best checkpoint "does not exist anymore" when
    the path is not a folder as seen from the cwd; ours are relative to the run folder and
    resolved right after (`Resumed`), so the warning would be wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "recorded in the resumed state does not exist" not in record.getMessage()


logging.getLogger("transformers.trainer").addFilter(_MovedBestCheckpoint())


def run_relative(path: str | Path, run_dir: Path) -> str:
    """A path inside the run folder as stored in the run's files: relative to the run folder, so
    the folder can be moved (or was given relative to another cwd) and still resume."""
    return os.path.relpath(path, run_dir)


def marked_trainer(base):
    """`base` (TRL's SFTTrainer or DPOTrainer) with complete-marked checkpoints."""

    class FinetuneTrainer(base):
        """A TRL trainer whose checkpoints are marked complete only once fully written (older
        ones are pruned after that, never before), name their best checkpoint relative to the
        run folder, and carry the training loss and time so far: transformers reports both for
        the last `train()` call only, and restarts its loss sums at a resume. `Resumed` puts
        them back, so a resumed run sums the very same floats as an uninterrupted one."""

        resume_totals: dict | None = None  # run_totals.json of the checkpoint resumed from
        resume_best: str | None = None  # that checkpoint's best checkpoint, as stored
        started: float | None = None  # perf_counter() when this train() call began

        @property
        def prior_seconds(self) -> float:
            return float((self.resume_totals or {}).get("train_seconds", 0.0))

        def _save_checkpoint(self, model, trial):
            limit = self.args.save_total_limit
            self.args.save_total_limit = None  # pruned below, once this checkpoint is complete
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if not self.args.should_save:
                return
            step = self.state.global_step
            checkpoints = Path(self.args.output_dir)
            folder = checkpoints / f"checkpoint-{step}"
            state_file = folder / "trainer_state.json"
            state = json.loads(state_file.read_text())
            if state.get("best_model_checkpoint"):
                state["best_model_checkpoint"] = run_relative(
                    state["best_model_checkpoint"], checkpoints.parent
                )
                write_text_atomic(state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")
            elapsed = time.perf_counter() - self.started if self.started else 0.0
            logged = float(self._total_loss_scalar)
            pending = float(self._tr_loss.item())
            totals = {
                "step": step,
                "train_loss_sum": logged + pending,
                "train_seconds": self.prior_seconds + elapsed,
                # transformers' loss bookkeeping, restored on resume (`Resumed`)
                "loss_logged": logged,
                "loss_pending": pending,
                "last_logged_step": self._globalstep_last_logged,
                # TRL's: tokens trained on, per-step metrics averaged at the next log
                "tokens_seen": getattr(self, "_total_train_tokens", 0),
                "pending_metrics": dict(getattr(self, "_metrics", {}).get("train", {})),
            }
            write_text_atomic(folder / TOTALS, json.dumps(totals) + "\n")
            (folder / COMPLETE).write_text(f"{step}\n")
            rotate_checkpoints(
                output_dir=str(checkpoints),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
            killpoint("after-checkpoint", step)  # tests: killed with a complete checkpoint

    return FinetuneTrainer


class Resumed(TrainerCallback):
    """At the start of a resumed train(): transformers' loss sums as they were at the checkpoint
    (it restarts them at zero), and the best checkpoint, stored relative to the run folder,
    found in this run's checkpoints folder."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        totals = trainer.resume_totals
        if totals is not None:
            trainer._total_loss_scalar = float(totals.get("loss_logged", totals["train_loss_sum"]))
            pending = float(totals.get("loss_pending", 0.0))
            trainer._tr_loss = torch.tensor(pending, device=trainer._tr_loss.device)
            trainer._globalstep_last_logged = int(totals.get("last_logged_step", totals["step"]))
            if "tokens_seen" in totals and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = totals["tokens_seen"]
            if "pending_metrics" in totals and hasattr(trainer, "_metrics"):
                trainer._metrics["train"] = defaultdict(list, totals["pending_metrics"])
        best = best_folder(args, trainer.resume_best)
        if best is not None:
            state.best_model_checkpoint = best


def best_folder(args, stored: str | None) -> str | None:
    """The best checkpoint a saved state names (relative to the run folder, or a path from older
    code), as this run's trainer names it; None when it is gone."""
    if not stored:
        return None
    folder = Path(args.output_dir) / Path(stored).name
    return os.path.join(args.output_dir, folder.name) if folder.is_dir() else None


def make_trainer(run: Run, base, args, callbacks: list, **kwargs):
    """TRL's `base` trainer class with complete-marked checkpoints (`marked_trainer`), early
    stopping when asked, TensorBoard under the run folder, no PrinterCallback (metrics.jsonl
    instead), and the training loss and time of the checkpoint it resumes from. kwargs: what
    the trainer class takes besides args and callbacks (model, datasets, processing_class...)."""
    if run.cfg.early_stopping_patience:
        callbacks = [*callbacks, EarlyStoppingCallback(run.cfg.early_stopping_patience)]
    with tensorboard_dir(run.out_dir / "tensorboard"):
        trainer = marked_trainer(base)(args=args, callbacks=callbacks, **kwargs)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; we keep JSONL instead
    if run.checkpoint is not None:
        trainer.resume_totals = read_totals(run.checkpoint)
        saved = json.loads((run.checkpoint / "trainer_state.json").read_text())
        trainer.resume_best = saved.get("best_model_checkpoint")
        trainer.add_callback(Resumed(trainer))
    return trainer


def read_totals(checkpoint: Path) -> dict:
    """run_totals.json of a checkpoint (zeros for one from before it was written)."""
    if not (checkpoint / TOTALS).is_file():
        step = checkpoint_step(checkpoint)
        return {"step": step, "train_loss_sum": 0.0, "train_seconds": 0.0}
    return json.loads((checkpoint / TOTALS).read_text())


# ---------------------------------------------------------------------------------------------
# Training: before, during, after, and the best checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """What `run_training` leaves: the trainer's state, the whole run's training loss and time (across
    resumes), the last step's evaluation and the best checkpoint's {"step", "eval_loss"}."""

    state: object  # transformers' TrainerState
    train_loss: float
    train_seconds: float
    last: dict
    best: dict


def evaluate_before(trainer, run: Run) -> dict:
    """The evaluation before training: run now and saved for a fresh run; read back (and the
    resume announced) for a resumed one."""
    before_file = run.out_dir / "eval_before.json"
    if run.checkpoint is None:
        before = trainer.evaluate()
        if run.main:  # atomic: a kill right now must not leave half a file for --resume
            write_text_atomic(before_file, json.dumps(before) + "\n")
    else:
        before = json.loads(before_file.read_text())
        run.say(f"resuming from {run.checkpoint} (step {run.resume_step})")
    return before


def run_training(trainer, run: Run) -> Trained:
    """Train (from the run's checkpoint, if any), then evaluate the last step and find the best
    checkpoint, whose adapter the trainer has loaded back. A run killed after its training
    ended (while saving the adapter or the report) resumes from its last checkpoint without
    training: `finished_state` restores what train() would have left."""
    checkpoint = run.checkpoint
    if checkpoint is not None and training_finished(trainer, run):
        run.say(f"training had finished at step {run.resume_step}: saving the adapter and report")
        finished_state(trainer, checkpoint)
        loss_sum = float(trainer.resume_totals["train_loss_sum"])
        train_seconds = trainer.prior_seconds
    else:
        trainer.started = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except pickle.UnpicklingError as e:  # torch refused a checkpoint's optimizer/rng pickle
            raise ValueError(
                f"{checkpoint}: a file in this checkpoint holds more than plain tensors, and only "
                f"those are loaded ({str(e).splitlines()[0]}); resume from another checkpoint "
                "or start a new --output-dir"
            ) from None
        # transformers' own train_loss covers this train() call only; its loss sum, carried
        # over from the checkpoint resumed from (`Resumed`), covers the whole run.
        loss_sum = float(trainer._total_loss_scalar)
        train_seconds = trainer.prior_seconds + time.perf_counter() - trainer.started
    state = trainer.state
    train_loss = loss_sum / max(state.global_step, 1)
    last = final_eval(trainer)
    return Trained(state, train_loss, train_seconds, last, best_checkpoint(trainer, last))


def training_finished(trainer, run: Run) -> bool:
    """Whether the checkpoint resumed from ends the run: at its last step, or stopped early by
    the same plan. (transformers would train one step past the end from there.)"""
    total = total_steps(run.cfg, len(trainer.train_dataset))
    if run.resume_step >= total:
        return True
    saved = json.loads((run.checkpoint / "trainer_state.json").read_text())
    control = saved.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return bool(control.get("should_training_stop")) and saved.get("max_steps") == total


def finished_state(trainer, checkpoint: Path) -> None:
    """What train() leaves at its end, from the run's last checkpoint: its state, the best
    checkpoint's adapter loaded back, and with save_total_limit 1 only the best kept."""
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    state.best_model_checkpoint = best_folder(trainer.args, state.best_model_checkpoint)
    trainer.state = state
    best = state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best is not None:
        trainer._load_best_model()
        if trainer.args.should_save and trainer.args.save_total_limit == 1:
            for folder in Path(trainer.args.output_dir).iterdir():
                if CHECKPOINT.match(folder.name) and folder.name != Path(best).name:
                    shutil.rmtree(folder, ignore_errors=True)


def final_eval(trainer) -> dict:
    """The evaluation at the last step: the one the trainer just ran, or a new one."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry
    return trainer.evaluate()


def best_checkpoint(trainer, last: dict) -> dict:
    """{"step", "eval_loss"} of the checkpoint whose adapter the trainer loaded back at the end
    (the last step's when no best was recorded)."""
    state = trainer.state
    if state.best_model_checkpoint and state.best_metric is not None:
        match = CHECKPOINT.match(Path(state.best_model_checkpoint).name)
        if match:
            return {"step": int(match.group(1)), "eval_loss": float(state.best_metric)}
    return {"step": state.global_step, "eval_loss": float(last["eval_loss"])}


# ---------------------------------------------------------------------------------------------
# The adapter and the report
# ---------------------------------------------------------------------------------------------


def adapter_meta(
    run: Run, settings: dict, fmt: str, template: str, targets, best: dict, prompts: list
) -> dict:
    """finetune.json: what chat and merge need to know about the adapter. settings: the
    method's own keys (double_quant for SFT, beta for DPO)."""
    return {
        "base_model": model_label(run.cfg.model),
        "method": run.cfg.method,
        **settings,
        "format": fmt,
        "chat_template": template,
        "target_modules": targets,
        "step": best["step"],
        "eval_loss": best["eval_loss"],
        "sample_prompts": prompts,
    }


def save_adapter(peft_model, tokenizer, path: Path, meta: dict) -> Path:
    """adapter_model.safetensors + adapter_config.json + tokenizer + finetune.json, atomically."""

    with atomic_directory(path) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        # Record the base as given ("tutor-base" stays a name, portable between machines).
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = meta["base_model"]
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        killpoint("adapter-save")  # tests: killed with the folder not yet renamed in
    killpoint("after-adapter-save")  # tests: killed with the adapter saved, no report yet
    return path


def run_report(
    run: Run,
    trainer,
    trained: Trained,
    device: str,
    adapter_dir: Path,
    before: dict,
    *,
    settings: dict,
    data: dict,
    quality: dict,
    memory: dict,
    extra: dict | None = None,
) -> dict:
    """report.json's content. Keys in this order: what ran (model, method, the method's
    `settings`, device, processes), the adapter and the steps, the `data` counts, the parameters,
    the eval losses and the method's `quality` measures, the training loss and time, `memory`,
    `extra` (SFT's samples), and the config."""
    state = trained.state
    trainable, total = trainer.model.get_nb_trainable_parameters()
    return {
        "model": run.cfg.model,
        "method": run.cfg.method,
        **settings,
        "device": device,
        "processes": trainer.args.world_size,
        "adapter": run_relative(adapter_dir, run.out_dir),  # the run folder can move
        "adapter_step": trained.best["step"],
        "steps": state.global_step,
        "max_steps": state.max_steps,
        **data,
        "trainable_parameters": trainable,
        "total_parameters": total - trainable,  # the base model's, as --dry-run counts them
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": trained.best["eval_loss"],  # the adapter's: the best checkpoint's
        "eval_loss_last": trained.last["eval_loss"],
        **quality,
        "train_loss": trained.train_loss,
        "train_seconds": trained.train_seconds,
        **memory,
        **(extra or {}),
        "config": asdict(run.cfg),
    }


def finish(run: Run, report: dict, write: Callable[[dict, Path], None]) -> dict:
    """Write the report (`write(report, out_dir)`: report.json, the loss curve, report.md...)
    and say where the adapter and the report are."""
    write(report, run.out_dir)
    killpoint("after-report")  # tests: killed with everything written
    run.say(
        f"adapter: {run.out_dir / report['adapter']} (step {report['adapter_step']}); "
        f"report: {run.out_dir / 'report.md'}"
    )
    return report
