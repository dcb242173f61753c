"""LoRA / QLoRA fine-tuning with TRL's SFTTrainer: check the data, load the frozen base (4-bit for
QLoRA), add adapters, train with evaluation and checkpoints, then write the adapter and a report.

The same code runs on one CPU, one GPU, or under `accelerate launch` on several (DDP): the
Trainer handles the distribution; only rank 0 writes files and prints.

The adapter is the best checkpoint's by eval loss (not the last one); overfitting (eval loss
rising while training loss falls) is named in the output and in report.json, and
`early_stopping_patience` stops such a run. `--resume` continues only the run its folder holds:
its config.yaml and fingerprint.json are compared with this run's settings and data, never
rewritten.

Output folder layout:
    checkpoints/checkpoint-N/   Trainer checkpoints (the newest and the best); `COMPLETE` is
                                written last, so a checkpoint cut short by a kill is never
                                resumed from; run_totals.json: training loss and time so far
    adapter/                    adapter_model.safetensors + adapter_config.json + tokenizer +
                                finetune.json (base model, method, step, stop tokens, prompts)
    config.yaml, fingerprint.json   the run's settings and its data files' sha256 (first start)
    metrics.jsonl, loss_curve.png, report.md, report.html, report.json
    tensorboard/                event files (report_to: tensorboard)
    rejects.jsonl               bad rows with their reasons (--skip-invalid only)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml
from datasets import Dataset
from datasets.table import InMemoryTable
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from core.atomic import atomic_directory, write_text_atomic
from core.train.config import ConfigError, save_config
from core.train.trainer import MetricsLog
from finetune.base_model import (
    check_target_modules,
    compute_dtype,
    context_length,
    default_target_modules,
    load_base_model,
    load_config,
    load_tokenizer,
    model_label,
    pick_device,
)
from finetune.config import FinetuneConfig, report_targets
from finetune.dryrun import dry_run
from finetune.estimate import format_bytes
from finetune.inference import ADAPTER_META
from finetune.lint import (
    DatasetCheck,
    check_file,
    enforce,
    issue_lines,
    progress_bar,
    report_lines,
)
from finetune.memory import PeakMemory, peak_memory
from finetune.render import ensure_chat_template
from finetune.report import collect_samples, overfitting, write_report

COMPLETE = "COMPLETE"
TOTALS = "run_totals.json"  # in each checkpoint: training loss sum and seconds up to its step
FINGERPRINT = "fingerprint.json"
TARGET_EVALS = 5  # default evaluations per run (at most 6 with the one at the last step)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
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


@dataclass
class PreparedData:
    tokenizer: object
    template: str  # where the chat template came from: model, default or a file
    checks: list[DatasetCheck]
    train: list  # Encoded
    eval: list  # Encoded
    eval_conversations: list
    max_length: int


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def resolve_max_length(cfg: FinetuneConfig, model_config) -> int:

    context = context_length(model_config)
    if cfg.max_length is None:
        return context or 2048
    if context is not None and cfg.max_length > context:
        raise ValueError(
            f"max_length {cfg.max_length} is longer than the model's context ({context})"
        )
    return cfg.max_length


def prepare_data(
    cfg: FinetuneConfig, echo=print, color: bool = False, progress: bool = False
) -> PreparedData:
    """Load the tokenizer (not the model), check and encode every row, split train/eval.
    progress: a bar while a large file is encoded."""

    cfg.validate()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    template = ensure_chat_template(tokenizer, cfg.chat_template)
    max_length = resolve_max_length(cfg, load_config(cfg.model, cfg.trust_remote_code))
    files = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
    checks = [
        check_file(
            f,
            tokenizer,
            cfg.format,
            max_length,
            cfg.truncate,
            cfg.train_on_prompt,
            columns=cfg.columns,
            roles=cfg.roles,
            progress=progress_bar(f) if progress else None,
        )
        for f in files
    ]
    echo(f"chat template: {template}")
    for check in checks:
        for line in report_lines(check, tokenizer, color):
            echo(line)
    for line in issue_lines(checks):
        echo(line)
    rejects = Path(cfg.output_dir) / "rejects.jsonl" if is_main_process() else None
    enforce(checks, cfg.skip_invalid, rejects, echo)

    train_check = checks[0]
    pairs = list(zip(train_check.examples, train_check.conversations, strict=True))
    cap = cfg.max_eval_rows
    if cfg.eval_data:
        train = [e for e, _ in pairs]
        eval_pairs = list(zip(checks[1].examples, checks[1].conversations, strict=True))
        held = len(eval_pairs)
        if cap and held > cap:  # a seeded sample, in file order
            keep = sorted(random.Random(cfg.seed).sample(range(held), cap))
            eval_pairs = [eval_pairs[i] for i in keep]
        note = (
            f" ({held:,} in {cfg.eval_data}; max_eval_rows {cap})" if held > len(eval_pairs) else ""
        )
    else:
        if len(pairs) < 2:
            raise ValueError(f"{cfg.data}: needs at least 2 usable rows to hold one out for eval")
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        wanted = min(len(pairs) - 1, max(1, round(cfg.eval_fraction * len(pairs))))
        # Every row evaluated costs a forward pass at each evaluation: past the cap, the rows
        # train instead of waiting to be evaluated.
        n_eval = min(wanted, cap) if cap else wanted
        eval_pairs = [pairs[i] for i in sorted(order[:n_eval])]
        train = [pairs[i][0] for i in sorted(order[n_eval:])]
        note = (
            f" (eval_fraction {cfg.eval_fraction:g} would hold out {wanted:,}; max_eval_rows {cap})"
            if wanted > n_eval
            else ""
        )

    def rows(n: int) -> str:
        return f"{n:,} row" if n == 1 else f"{n:,} rows"

    echo(f"split: {rows(len(train))} for training, {rows(len(eval_pairs))} for evaluation{note}")
    return PreparedData(
        tokenizer,
        template,
        checks,
        train,
        [e for e, _ in eval_pairs],
        [c for _, c in eval_pairs],
        max_length,
    )


def to_dataset(examples: list) -> Dataset:
    """The encoded rows as an Arrow-backed dataset, built from the flat int32 ids and masks (no
    list of Python ints per row on the way: ~10x less memory for large files)."""
    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int32, count=len(examples))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int32())
    if len(examples):
        ids = np.concatenate([np.frombuffer(e.input_ids, dtype=np.int32) for e in examples])
        trained = np.concatenate([np.frombuffer(e.trained, dtype=np.uint8) for e in examples])
    else:
        ids, trained = np.zeros(0, np.int32), np.zeros(0, np.uint8)
    labels = np.where(trained.astype(bool), ids, -100).astype(np.int32)
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        }
    )
    return Dataset(InMemoryTable(table))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def complete_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def drop_incomplete_checkpoints(out_dir: Path) -> None:
    """Remove checkpoint folders a kill left half-written (no COMPLETE marker)."""
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if _CHECKPOINT.match(p.name) and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)


def _trainer_class(base=SFTTrainer):
    """`base` (SFTTrainer, or TRL's DPOTrainer for --method dpo) with complete-marked checkpoints."""

    class FinetuneTrainer(base):
        """SFTTrainer whose checkpoints are marked complete only once fully written, and carry
        the training loss and time so far (transformers reports both for the last `train()`
        call only, which after a resume is only the resumed part)."""

        prior_loss_sum = 0.0  # from the checkpoint resumed from
        prior_seconds = 0.0
        started: float | None = None  # perf_counter() when this train() call began

        def segment_loss_sum(self) -> float:
            """Summed per-step training loss of this train() call so far (what transformers
            divides by the steps run in it)."""
            tr_loss = getattr(self, "_tr_loss", None)
            pending = float(tr_loss.item()) if tr_loss is not None else 0.0
            return getattr(self, "_total_loss_scalar", 0.0) + pending

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                step = self.state.global_step
                folder = Path(self.args.output_dir) / f"checkpoint-{step}"
                elapsed = time.perf_counter() - self.started if self.started else 0.0
                totals = {
                    "step": step,
                    "train_loss_sum": self.prior_loss_sum + self.segment_loss_sum(),
                    "train_seconds": self.prior_seconds + elapsed,
                }
                write_text_atomic(folder / TOTALS, json.dumps(totals) + "\n")
                (folder / COMPLETE).write_text(f"{step}\n")

    return FinetuneTrainer


def read_totals(checkpoint: Path | None) -> tuple[float, float]:
    """(summed training loss, seconds) up to a checkpoint; zeros for a fresh start, or for a
    checkpoint from before run_totals.json was written."""
    if checkpoint is None or not (checkpoint / TOTALS).is_file():
        return 0.0, 0.0
    totals = json.loads((checkpoint / TOTALS).read_text())
    return float(totals["train_loss_sum"]), float(totals["train_seconds"])


# ---------------------------------------------------------------------------------------------
# Resume: the same run, or a clear refusal
# ---------------------------------------------------------------------------------------------


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
    both values, in one line; config.yaml and fingerprint.json are only read."""
    config_file = out_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"--resume: {config_file} is missing, so this run cannot be checked against the "
            "one it would continue; pass a new --output-dir"
        )
    try:
        saved = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--resume: {config_file}: not valid YAML ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {config_file}: expected a mapping of key: value")
    current = asdict(cfg)
    was, now = [], []
    for key, value in current.items():
        # A key the saved config lacks was added later: its old meaning is unknown, not wrong.
        if key in RESUME_MAY_CHANGE or key not in saved or saved[key] == value:
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


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------


def _callbacks(out_dir: Path, resume_step: int | None, progress: bool, echo, perplexity=True):

    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step) if is_main_process() else None

    class Metrics(TrainerCallback):
        """Each log line (training loss, learning rate, eval loss) as one JSON object."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if metrics is None or not logs:
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
# Training
# ---------------------------------------------------------------------------------------------


def _steps(cfg: FinetuneConfig, n_train: int) -> int:
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


@contextmanager
def _tensorboard_dir(path: Path):
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


def trainer_arguments(cfg: FinetuneConfig, train_rows: int, device: str, out_dir: Path, max_length):
    """The keyword arguments SFT and DPO runs share (TRL's SFTConfig and DPOConfig both take
    them): schedule, evaluation and checkpoint intervals, best-checkpoint keeping, precision."""
    total = _steps(cfg, train_rows)
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


def build_trainer(cfg, data: PreparedData, model, device: str, out_dir: Path, callbacks):
    dtype = compute_dtype(device)
    args = SFTConfig(
        **trainer_arguments(cfg, len(data.train), device, out_dir, data.max_length), packing=False
    )
    if cfg.early_stopping_patience:
        callbacks = [*callbacks, EarlyStoppingCallback(cfg.early_stopping_patience)]
    with _tensorboard_dir(out_dir / "tensorboard"):
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=to_dataset(data.train),
            eval_dataset=to_dataset(data.eval),
            processing_class=data.tokenizer,
            callbacks=callbacks,
        )

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; we keep JSONL instead
    if cfg.method == "qlora":
        # TRL casts QLoRA adapters to bf16 (the paper's choice on GPUs); on a CPU the 4-bit
        # layers compute in fp32, and bf16 adapters there are slower and coarser, so the adapters
        # follow the compute dtype. (Plain LoRA keeps peft's fp32 adapters everywhere.)
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return trainer


def add_adapters(cfg: FinetuneConfig, model, echo=print):
    """Wrap the frozen base in LoRA adapters on the target modules (auto: every linear layer)."""

    targets = cfg.target_modules or default_target_modules(model)
    check_target_modules(model, targets)
    if cfg.method == "qlora":
        # fp32 norms/embeddings and input gradients for the 4-bit base (the QLoRA recipe)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    base = total - trainable
    echo(
        f"LoRA rank {cfg.lora_rank} on {', '.join(targets)}: {trainable:,} trainable parameters, "
        f"{100 * trainable / base:.2f}% of the base model's {base:,}"
    )
    return model, targets


def resume_checkpoint(cfg: FinetuneConfig, out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from (None: a fresh run), after the checks both trainers
    (SFT here, DPO in finetune/dpo.py) make before any data or model loads: half-written
    checkpoints dropped, a folder with checkpoints needs --resume, --resume needs one, and a
    resumed run's settings and data must be those it started with."""
    if is_main_process():
        drop_incomplete_checkpoints(out_dir)
    existing = complete_checkpoints(out_dir)
    if existing and not resume:
        raise FileExistsError(
            f"{out_dir} already has checkpoints: pass --resume to continue, or pick another "
            "--output-dir"
        )
    if resume and not existing:
        raise FileNotFoundError(f"{out_dir}: no complete checkpoint to resume from")
    checkpoint = existing[-1] if resume else None
    if checkpoint is not None:
        cfg.validate()
        check_resume(cfg, out_dir)
    return checkpoint


def record_settings(cfg: FinetuneConfig, out_dir: Path, checkpoint: Path | None) -> None:
    """config.yaml and the data fingerprint of a fresh run, atomically; a resumed run keeps the
    settings it started with (never rewritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process() and checkpoint is None:
        save_config(cfg, out_dir / "config.yaml")
        write_text_atomic(out_dir / FINGERPRINT, json.dumps(fingerprint(cfg), indent=2) + "\n")


def finetune(
    cfg: FinetuneConfig,
    resume: bool = False,
    echo=print,
    progress: bool = True,
    color=False,
    extra_callbacks: tuple = (),
) -> dict:
    """Check the data, train, evaluate before and after, save the best adapter and the report.
    extra_callbacks: more TrainerCallbacks (`genai-lab bench` times the steps with one)."""
    if cfg.method == "dpo":  # finetune/dpo.py builds on this module, so it is not called here
        raise ValueError(
            "method: dpo runs through finetune.dpo.run_dpo (or `genai-lab finetune --method dpo`)"
        )

    out_dir = Path(cfg.output_dir)
    main = is_main_process()
    say = echo if main else (lambda *_: None)
    checkpoint = resume_checkpoint(cfg, out_dir, resume)  # before any data is encoded

    data = prepare_data(cfg, say, color, progress=progress and main)
    device = pick_device(cfg.device)
    record_settings(cfg, out_dir, checkpoint)
    longest = max(len(e.input_ids) for e in data.train + data.eval)
    tokens = sum(len(e.input_ids) for e in data.train + data.eval)
    estimate = dry_run(cfg, lambda *_: None, longest, tokens)  # from the config, before loading
    memory = estimate[estimate["this_run"]]
    say(
        f"estimated training memory: {format_bytes(memory['total'])} (weights "
        f"{format_bytes(memory['weights'])}, activations {format_bytes(memory['activations'])}; "
        f"the whole process on CPU: {format_bytes(estimate['process_peak']['total'])}; "
        "details: --dry-run)"
    )
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    storage = "4-bit NF4" if cfg.method == "qlora" else "full precision"
    say(f"loading {cfg.model} ({storage}) on {device}")
    model = load_base_model(
        cfg.model, cfg.method == "qlora", device, None, cfg.double_quant, cfg.trust_remote_code
    )
    model, targets = add_adapters(cfg, model, say)

    resume_step = int(_CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint else None
    # PeakMemory first, so the peak is in each record the metrics log writes.
    callbacks = [PeakMemory(), *_callbacks(out_dir, resume_step, progress, say), *extra_callbacks]
    trainer = build_trainer(cfg, data, model, device, out_dir, callbacks)
    trainer.prior_loss_sum, trainer.prior_seconds = read_totals(checkpoint)
    total = _steps(cfg, len(data.train))
    when = (
        "at the end"
        if trainer.args.eval_steps >= total
        else f"every {trainer.args.eval_steps} steps and at the end"
    )
    say(
        f"evaluating {len(data.eval):,} rows {'' if checkpoint else 'before training and '}"
        f"{when} (of {total} steps); "
        f"checkpoints every {min(trainer.args.save_steps, total)} steps"
    )

    if reporting := report_targets(cfg.report_to):
        where = (
            f" (tensorboard --logdir {out_dir / 'tensorboard'})"
            if "tensorboard" in reporting
            else ""
        )
        say(f"metrics also go to {', '.join(reporting)}{where}")

    before_file = out_dir / "eval_before.json"
    if checkpoint is None:
        before = trainer.evaluate()
        if main:  # atomic: a kill right now must not leave half a file for --resume
            write_text_atomic(before_file, json.dumps(before) + "\n")
    else:
        before = json.loads(before_file.read_text())
        say(f"resuming from {checkpoint} (step {resume_step})")
    loss = before["eval_loss"]
    say(f"before training: eval loss {loss:.4f}, ppl {math.exp(loss):.3f}")

    trainer.started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    state = trainer.state
    # transformers' loss and time cover this train() call only; the checkpoint resumed from
    # carries what came before it, so the report covers the whole run.
    steps_run = state.global_step - (resume_step or 0)
    train_loss = (trainer.prior_loss_sum + result.training_loss * steps_run) / max(
        state.global_step, 1
    )
    train_seconds = trainer.prior_seconds + time.perf_counter() - trainer.started
    last = _final_eval(trainer)
    best = _best(trainer, last)
    say(
        f"after training: eval loss {last['eval_loss']:.4f}, ppl {math.exp(last['eval_loss']):.3f} "
        f"(step {state.global_step})"
    )
    stopped_early = bool(cfg.early_stopping_patience) and state.global_step < state.max_steps
    if stopped_early:
        say(
            f"early stopping: no lower eval loss in {cfg.early_stopping_patience} evaluations; "
            f"stopped at step {state.global_step} of {state.max_steps}"
        )
    if best["step"] != state.global_step:
        say(
            f"best checkpoint: step {best['step']}, eval loss {best['eval_loss']:.4f}: the adapter "
            "is that step's, not the last step's"
        )
    over = overfitting(state.log_history)
    if over:
        say(
            f"warning: overfitting: eval loss rose for {over['evals_after_best']} evaluations "
            f"after step {over['best_step']} ({over['best_eval_loss']:.4f} -> "
            f"{over['last_eval_loss']:.4f}) while training loss fell "
            f"({over['train_loss_at_best']:.4f} -> {over['train_loss_last']:.4f}); fewer epochs, "
            "a lower learning rate or --early-stopping-patience"
        )
    if best["eval_loss"] >= before["eval_loss"]:
        say(
            f"warning: no checkpoint beat the base model's eval loss ({before['eval_loss']:.4f}); "
            f"the adapter (step {best['step']}, {best['eval_loss']:.4f}) makes it worse"
        )
    if not main:
        return {}

    peft_model = trainer.model  # the best checkpoint's adapter (load_best_model_at_end)
    samples = collect_samples(peft_model, data, cfg.num_samples, cfg.sample_max_new_tokens)
    meta = {
        "base_model": model_label(cfg.model),
        "method": cfg.method,
        "double_quant": cfg.double_quant,
        "format": data.checks[0].format,
        "chat_template": data.template,
        "target_modules": targets,
        "step": best["step"],
        "eval_loss": best["eval_loss"],
        "sample_prompts": [s["prompt"] for s in samples],
    }
    adapter_dir = save_adapter(peft_model, data.tokenizer, out_dir / "adapter", meta)
    trainable, total = peft_model.get_nb_trainable_parameters()
    total -= trainable  # the base model's parameters, as --dry-run counts them
    after = best["eval_loss"]
    measured = peak_memory()  # this process (under DDP each rank has its own; rank 0 reports)
    gpu = measured["gpu_peak_allocated_bytes"]
    say(
        f"memory: estimated {format_bytes(estimate['process_peak']['total'])}, measured peak "
        f"{format_bytes(measured['cpu_peak_rss_bytes'])} (CPU RSS)"
        + (
            f"; GPU {format_bytes(gpu)} allocated, estimated {format_bytes(memory['total'])}"
            if gpu is not None
            else ""
        )
    )
    report = {
        "model": cfg.model,
        "method": cfg.method,
        "device": device,
        "processes": trainer.args.world_size,
        "adapter": str(adapter_dir),
        "adapter_step": best["step"],
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "stopped_early": stopped_early,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after,  # the adapter's: the best checkpoint's
        "eval_loss_last": last["eval_loss"],
        "eval_ppl_before": math.exp(before["eval_loss"]),
        "eval_ppl_after": math.exp(after),
        "eval_loss_change": after / before["eval_loss"] - 1,  # < 0: lower (better)
        "eval_loss_drop": 1 - after / before["eval_loss"],
        "overfitting": over,
        "train_loss": train_loss,
        "train_seconds": train_seconds,
        "estimated_memory_bytes": memory["total"],
        "estimated_peak_rss_bytes": estimate["process_peak"]["total"],
        "peak_rss_bytes": measured["cpu_peak_rss_bytes"],
        "peak_gpu_memory_bytes": measured["gpu_peak_allocated_bytes"],
        "samples": samples,
        "config": asdict(cfg),
    }
    write_report(report, out_dir)
    say(f"adapter: {adapter_dir} (step {best['step']}); report: {out_dir / 'report.md'}")
    return report


def _final_eval(trainer) -> dict:
    """The evaluation at the last step: the one the trainer just ran, or a new one."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry
    return trainer.evaluate()


def _best(trainer, last: dict) -> dict:
    """{"step", "eval_loss"} of the checkpoint whose adapter the trainer loaded back at the end
    (the last step's when no best was recorded)."""
    state = trainer.state
    if state.best_model_checkpoint and state.best_metric is not None:
        match = _CHECKPOINT.match(Path(state.best_model_checkpoint).name)
        if match:
            return {"step": int(match.group(1)), "eval_loss": float(state.best_metric)}
    return {"step": state.global_step, "eval_loss": float(last["eval_loss"])}


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
    return path
