"""LoRA / QLoRA fine-tuning with TRL's SFTTrainer: check the data, load the frozen base (4-bit for
QLoRA), add adapters, train with evaluation and checkpoints, then write the adapter and a report.

The same code runs on one CPU, one GPU, or under `accelerate launch` on several (DDP): the
Trainer handles the distribution; only rank 0 writes files and prints.

Output folder layout:
    checkpoints/checkpoint-N/   Trainer checkpoints; `COMPLETE` is written last, so a checkpoint
                                cut short by a kill is never resumed from
    adapter/                    adapter_model.safetensors + adapter_config.json + tokenizer +
                                finetune.json (base model, method, stop tokens, sample prompts)
    metrics.jsonl, loss_curve.png, report.md, report.html, report.json, config.yaml
    rejects.jsonl               bad rows with their reasons (--skip-invalid only)
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from core.atomic import atomic_directory
from core.config import save_config
from core.trainer import MetricsLog
from finetune.config import FinetuneConfig
from finetune.dryrun import dry_run
from finetune.estimate import format_bytes
from finetune.inference import ADAPTER_META
from finetune.lint import DatasetCheck, check_file, enforce, issue_lines, report_lines
from finetune.modeling import (
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
from finetune.render import ensure_chat_template
from finetune.report import collect_samples, write_report

COMPLETE = "COMPLETE"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def prepare_data(cfg: FinetuneConfig, echo=print, color: bool = False) -> PreparedData:
    """Load the tokenizer (not the model), check and encode every row, split train/eval."""

    cfg.validate()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    template = ensure_chat_template(tokenizer, cfg.chat_template)
    max_length = resolve_max_length(cfg, load_config(cfg.model, cfg.trust_remote_code))
    files = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
    checks = [
        check_file(f, tokenizer, cfg.format, max_length, cfg.truncate, cfg.train_on_prompt)
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
    if cfg.eval_data:
        train = [e for e, _ in pairs]
        eval_pairs = list(zip(checks[1].examples, checks[1].conversations, strict=True))
    else:
        if len(pairs) < 2:
            raise ValueError(f"{cfg.data}: needs at least 2 usable rows to hold one out for eval")
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = min(len(pairs) - 1, max(1, round(cfg.eval_fraction * len(pairs))))
        eval_pairs = [pairs[i] for i in sorted(order[:n_eval])]
        train = [pairs[i][0] for i in sorted(order[n_eval:])]
    echo(f"split: {len(train)} training rows, {len(eval_pairs)} evaluation rows")
    return PreparedData(
        tokenizer,
        template,
        checks,
        train,
        [e for e, _ in eval_pairs],
        [c for _, c in eval_pairs],
        max_length,
    )


def to_dataset(examples: list):

    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels() for e in examples]}
    )


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


def _trainer_class():

    class FinetuneTrainer(SFTTrainer):
        """SFTTrainer whose checkpoints are marked complete only once fully written."""

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                (folder / COMPLETE).write_text(f"{self.state.global_step}\n")

    return FinetuneTrainer


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------


def _callbacks(out_dir: Path, resume_step: int | None, progress: bool, echo):

    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step) if is_main_process() else None

    class Metrics(TrainerCallback):
        """Each log line (training loss, learning rate, eval loss) as one JSON object."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if metrics is None or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch}
            record.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
            if "eval_loss" in logs:
                record["eval_ppl"] = math.exp(min(logs["eval_loss"], 50.0))
            metrics.write(record)

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if progress and is_main_process():
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not is_main_process() or not logs:
                return
            if "loss" in logs and self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if "eval_loss" in logs:
                loss = logs["eval_loss"]
                line = f"step {state.global_step}: eval loss {loss:.4f}, ppl {math.exp(loss):.3f}"
                (self.bar.write if self.bar is not None else echo)(line)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return [Metrics(), Progress()]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _steps(cfg: FinetuneConfig, n_train: int) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (cfg.batch_size * world)) / cfg.gradient_accumulation)
    return max(1, math.ceil(per_epoch * cfg.epochs))


def build_trainer(cfg, data: PreparedData, model, device: str, out_dir: Path, callbacks):

    total = _steps(cfg, len(data.train))
    every = max(1, total // 5)
    dtype = compute_dtype(device)
    args = SFTConfig(
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
        eval_steps=cfg.eval_steps or every,
        save_strategy="steps",
        save_steps=cfg.save_steps or every,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=data.max_length,
        packing=False,
        report_to="none",
        disable_tqdm=True,  # our Progress callback draws the bar
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
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


def finetune(
    cfg: FinetuneConfig, resume: bool = False, echo=print, progress: bool = True, color=False
) -> dict:
    """Check the data, train, evaluate before and after, save the adapter and the report."""

    out_dir = Path(cfg.output_dir)
    main = is_main_process()
    say = echo if main else (lambda *_: None)
    if main:
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

    data = prepare_data(cfg, say, color)
    device = pick_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(cfg, out_dir / "config.yaml")
    longest = max(len(e.input_ids) for e in data.train + data.eval)
    estimate = dry_run(cfg, lambda *_: None, longest)  # from the config, before loading
    memory = estimate[estimate["this_run"]]
    say(
        f"estimated training memory: {format_bytes(memory['total'])} (weights "
        f"{format_bytes(memory['weights'])}, activations {format_bytes(memory['activations'])}; "
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
    callbacks = _callbacks(out_dir, resume_step, progress, say)
    trainer = build_trainer(cfg, data, model, device, out_dir, callbacks)

    before_file = out_dir / "eval_before.json"
    if checkpoint is None:
        before = trainer.evaluate()
        if main:  # temp + rename: a kill right now must not leave half a file for --resume
            tmp = before_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(before) + "\n")
            os.replace(tmp, before_file)
    else:
        before = json.loads(before_file.read_text())
        say(f"resuming from {checkpoint} (step {resume_step})")
    loss = before["eval_loss"]
    say(f"before training: eval loss {loss:.4f}, ppl {math.exp(loss):.3f}")

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    after = _final_eval(trainer)
    loss = after["eval_loss"]
    say(f"after training: eval loss {loss:.4f}, ppl {math.exp(loss):.3f}")
    if not main:
        return {}

    peft_model = trainer.model
    samples = collect_samples(peft_model, data, cfg.num_samples, cfg.sample_max_new_tokens)
    meta = {
        "base_model": model_label(cfg.model),
        "method": cfg.method,
        "double_quant": cfg.double_quant,
        "format": data.checks[0].format,
        "chat_template": data.template,
        "target_modules": targets,
        "sample_prompts": [s["prompt"] for s in samples],
    }
    adapter_dir = save_adapter(peft_model, data.tokenizer, out_dir / "adapter", meta)
    trainable, total = peft_model.get_nb_trainable_parameters()
    total -= trainable  # the base model's parameters, as --dry-run counts them
    report = {
        "model": cfg.model,
        "method": cfg.method,
        "device": device,
        "processes": trainer.args.world_size,
        "adapter": str(adapter_dir),
        "steps": trainer.state.global_step,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "eval_ppl_before": math.exp(before["eval_loss"]),
        "eval_ppl_after": math.exp(after["eval_loss"]),
        "eval_loss_drop": 1 - after["eval_loss"] / before["eval_loss"],
        "train_loss": result.training_loss,
        "train_seconds": train_seconds,
        "estimated_memory_bytes": memory["total"],
        "peak_gpu_memory_bytes": (
            torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        ),
        "samples": samples,
        "config": asdict(cfg),
    }
    write_report(report, out_dir)
    say(f"adapter: {adapter_dir}; report: {out_dir / 'report.md'}")
    return report


def _final_eval(trainer) -> dict:
    """The evaluation at the last step: the one the trainer just ran, or a new one."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry
    return trainer.evaluate()


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
