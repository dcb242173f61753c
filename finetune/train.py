"""LoRA / QLoRA fine-tuning with TRL's SFTTrainer: check the data, load the frozen base (4-bit for
QLoRA), add adapters, train with evaluation and checkpoints, then write the adapter and a report.

What differs from DPO lives here: the rows (checked and encoded by `finetune.lint`, trained on the
answer tokens), the adapters added before the trainer is built, SFTTrainer, the memory estimate
and the samples in the report. The run itself (resume, callbacks, checkpoints, the best adapter,
the output folder) is `finetune.run`'s, shared with `finetune.dpo`.

Overfitting (eval loss rising while training loss falls) is named in the output and in
report.json, and `early_stopping_patience` stops such a run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from datasets.table import InMemoryTable
from peft import get_peft_model, prepare_model_for_kbit_training
from trl import SFTConfig, SFTTrainer

from finetune.base_model import (
    compute_dtype,
    load_base_model,
    load_config,
    load_tokenizer,
    pick_device,
)
from finetune.config import FinetuneConfig, report_targets
from finetune.dryrun import dry_run
from finetune.estimate import format_bytes
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
from finetune.run import (
    Run,
    Trained,
    adapter_meta,
    evaluate_before,
    finish,
    is_main_process,
    lora_config,
    make_trainer,
    record_settings,
    resolve_max_length,
    run_callbacks,
    run_report,
    run_training,
    save_adapter,
    start_run,
    total_steps,
    trainer_arguments,
)


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
# Model and trainer
# ---------------------------------------------------------------------------------------------


def add_adapters(cfg: FinetuneConfig, model, echo=print):
    """Wrap the frozen base in LoRA adapters on the target modules (auto: every linear layer)."""
    lora, targets = lora_config(cfg, model)
    if cfg.method == "qlora":
        # fp32 norms/embeddings and input gradients for the 4-bit base (the QLoRA recipe)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    base = total - trainable
    echo(
        f"LoRA rank {cfg.lora_rank} on {', '.join(targets)}: {trainable:,} trainable parameters, "
        f"{100 * trainable / base:.2f}% of the base model's {base:,}"
    )
    return model, targets


def build_trainer(run: Run, data: PreparedData, model, device: str, callbacks):
    """SFTTrainer on the encoded rows (labels -100 on the tokens not trained on)."""
    cfg = run.cfg
    dtype = compute_dtype(device)
    args = SFTConfig(
        **trainer_arguments(cfg, len(data.train), device, run.out_dir, data.max_length),
        packing=False,
    )
    trainer = make_trainer(
        run,
        SFTTrainer,
        args,
        callbacks,
        model=model,
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.eval),
        processing_class=data.tokenizer,
    )
    if cfg.method == "qlora":
        # TRL casts QLoRA adapters to bf16 (the paper's choice on GPUs); on a CPU the 4-bit
        # layers compute in fp32, and bf16 adapters there are slower and coarser, so the adapters
        # follow the compute dtype. (Plain LoRA keeps peft's fp32 adapters everywhere.)
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return trainer


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def finetune(
    cfg: FinetuneConfig,
    resume: bool = False,
    echo=print,
    progress: bool = True,
    color=False,
    extra_callbacks: tuple = (),
    overwrite: bool = False,
) -> dict:
    """Check the data, train, evaluate before and after, save the best adapter and the report.
    extra_callbacks: more TrainerCallbacks (`genai-lab bench` times the steps with one)."""
    if cfg.method == "dpo":  # finetune.dpo runs it (its own data and trainer)
        raise ValueError(
            "method: dpo runs through finetune.dpo.run_dpo (or `genai-lab finetune --method dpo`)"
        )
    run = start_run(cfg, resume, echo, overwrite)  # before any data is encoded
    say = run.say
    data = prepare_data(cfg, say, color, progress=progress and run.main)
    device = pick_device(cfg.device)
    record_settings(cfg, run.out_dir, run.checkpoint)
    estimate = _estimate(cfg, data, say)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    storage = "4-bit NF4" if cfg.method == "qlora" else "full precision"
    say(f"loading {cfg.model} ({storage}) on {device}")
    model = load_base_model(
        cfg.model, cfg.method == "qlora", device, None, cfg.double_quant, cfg.trust_remote_code
    )
    model, targets = add_adapters(cfg, model, say)

    # PeakMemory first, so the peak is in each record the metrics log writes.
    callbacks = [
        PeakMemory(),
        *run_callbacks(run.out_dir, run.resume_step, progress, say),
        *extra_callbacks,
    ]
    trainer = build_trainer(run, data, model, device, callbacks)
    _announce_schedule(run, trainer, len(data.train), len(data.eval))

    before = evaluate_before(trainer, run)
    loss = before["eval_loss"]
    say(f"before training: eval loss {loss:.4f}, ppl {math.exp(loss):.3f}")
    trained = run_training(trainer, run)
    over = _describe_outcome(run, trained, before)
    if not run.main:
        return {}

    peft_model = trainer.model  # the best checkpoint's adapter (load_best_model_at_end)
    samples = collect_samples(peft_model, data, cfg.num_samples, cfg.sample_max_new_tokens)
    meta = adapter_meta(
        run,
        {"double_quant": cfg.double_quant},
        data.checks[0].format,
        data.template,
        targets,
        trained.best,
        [s["prompt"] for s in samples],
    )
    adapter_dir = save_adapter(peft_model, data.tokenizer, run.out_dir / "adapter", meta)
    memory = _memory_report(estimate, say)
    after = trained.best["eval_loss"]
    state = trained.state
    stopped_early = bool(cfg.early_stopping_patience) and state.global_step < state.max_steps
    report = run_report(
        run,
        trainer,
        trained,
        device,
        adapter_dir,
        before,
        settings={},
        data={
            "stopped_early": stopped_early,
            "train_rows": len(data.train),
            "eval_rows": len(data.eval),
        },
        quality={
            "eval_ppl_before": math.exp(before["eval_loss"]),
            "eval_ppl_after": math.exp(after),
            "eval_loss_change": after / before["eval_loss"] - 1,  # < 0: lower (better)
            "eval_loss_drop": 1 - after / before["eval_loss"],
            "overfitting": over,
        },
        memory=memory,
        extra={"samples": samples},
    )
    return finish(run, report, write_report)


def _estimate(cfg: FinetuneConfig, data: PreparedData, say) -> dict:
    """--dry-run's estimate for this run's longest row and token count (from the config, before
    the model loads), printed in one line."""
    longest = max(len(e.input_ids) for e in data.train + data.eval)
    tokens = sum(len(e.input_ids) for e in data.train + data.eval)
    estimate = dry_run(cfg, lambda *_: None, longest, tokens)
    memory = estimate[estimate["this_run"]]
    say(
        f"estimated training memory: {format_bytes(memory['total'])} (weights "
        f"{format_bytes(memory['weights'])}, activations {format_bytes(memory['activations'])}; "
        f"the whole process on CPU: {format_bytes(estimate['process_peak']['total'])}; "
        "details: --dry-run)"
    )
    return estimate


def _announce_schedule(run: Run, trainer, train_rows: int, eval_rows: int) -> None:
    """When evaluations and checkpoints happen, and where else the metrics go."""
    total = total_steps(run.cfg, train_rows)
    when = (
        "at the end"
        if trainer.args.eval_steps >= total
        else f"every {trainer.args.eval_steps} steps and at the end"
    )
    run.say(
        f"evaluating {eval_rows:,} rows {'' if run.checkpoint else 'before training and '}"
        f"{when} (of {total} steps); "
        f"checkpoints every {min(trainer.args.save_steps, total)} steps"
    )
    if reporting := report_targets(run.cfg.report_to):
        where = (
            f" (tensorboard --logdir {run.out_dir / 'tensorboard'})"
            if "tensorboard" in reporting
            else ""
        )
        run.say(f"metrics also go to {', '.join(reporting)}{where}")


def _describe_outcome(run: Run, trained: Trained, before: dict) -> dict | None:
    """The lines after training: the final eval loss, early stopping, the best checkpoint,
    overfitting, an adapter worse than the base. Returns the overfitting finding (or None)."""
    say, cfg, state = run.say, run.cfg, trained.state
    last, best = trained.last, trained.best
    say(
        f"after training: eval loss {last['eval_loss']:.4f}, ppl {math.exp(last['eval_loss']):.3f} "
        f"(step {state.global_step})"
    )
    if bool(cfg.early_stopping_patience) and state.global_step < state.max_steps:
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
    return over


def _memory_report(estimate: dict, say) -> dict:
    """The estimate beside the measured peak (this process: under DDP each rank has its own;
    rank 0 reports), printed in one line and as report.json's memory keys."""
    memory = estimate[estimate["this_run"]]
    measured = peak_memory()
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
    return {
        "estimated_memory_bytes": memory["total"],
        "estimated_peak_rss_bytes": estimate["process_peak"]["total"],
        "peak_rss_bytes": measured["cpu_peak_rss_bytes"],
        "peak_gpu_memory_bytes": measured["gpu_peak_allocated_bytes"],
    }
