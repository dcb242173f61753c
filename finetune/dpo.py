"""`genai-lab finetune --method dpo`: preference tuning of a LoRA adapter with TRL's DPOTrainer.

Data rows are ``{"prompt", "chosen", "rejected"}`` (finetune.data's ``preference`` format):
strings, or (chat style) a prompt that is a list of ``{"role", "content"}`` messages and answers
that are strings or lists of assistant messages. Every row becomes a conversation, so the model's
chat template renders it, as in SFT. The frozen base is the reference policy (the adapter switched
off), so no second model is loaded. The run (checkpoints, adapter/, config.yaml, report.json,
resume) is `finetune.run`'s, as for SFT; the report adds DPO's reward accuracy and margin on
held-out pairs before and after training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from core.atomic import write_text_atomic
from finetune.base_model import load_base_model, load_config, load_tokenizer, pick_device
from finetune.config import FinetuneConfig
from finetune.data import (
    PREFERENCE,
    PreferenceDataError,
    plural,
    read_preferences,
)
from finetune.render import ensure_chat_template
from finetune.report import plot_loss_curve, read_metrics
from finetune.run import (
    Run,
    adapter_meta,
    evaluate_before,
    finish,
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

KEYS = PREFERENCE.signature  # prompt, chosen, rejected
# What TRL logs at each evaluation (prefixed "eval_"): the implicit reward beta * log(pi / ref)
# of each answer, the share of pairs where chosen beats rejected, and the mean gap.
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@dataclass
class PreferenceData:
    tokenizer: object
    template: str  # where the chat template came from: model, default or a file
    train: list[dict]  # {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}
    eval: list[dict]
    max_length: int


# ---------------------------------------------------------------------------------------------
# Data (the rows are read and checked by finetune.data: read_preferences)
# ---------------------------------------------------------------------------------------------


def _check_lengths(path, pairs: list[dict], tokenizer, max_length: int, truncate: bool) -> None:
    """Refuse pairs whose longer answer does not fit max_length (TRL would cut it silently)."""
    if truncate:
        return
    for i, pair in enumerate(pairs):
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=True)
            n = len(ids["input_ids"] if isinstance(ids, dict) else ids)
            if n > max_length:
                raise PreferenceDataError(
                    f"{path}: pair {i + 1}: {key}: {n} tokens with its prompt, over max_length "
                    f"{max_length}; shorten it, raise --max-length or pass --truncate"
                )


def prepare_preferences(cfg: FinetuneConfig, echo=print) -> PreferenceData:
    """Load the tokenizer (not the model), check every pair, split train/eval as SFT does."""
    cfg.validate()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    template = ensure_chat_template(tokenizer, cfg.chat_template)
    max_length = resolve_max_length(cfg, load_config(cfg.model, cfg.trust_remote_code))
    train = read_preferences(cfg.data, cfg.skip_invalid, echo)
    _check_lengths(cfg.data, train, tokenizer, max_length, cfg.truncate)
    rng = random.Random(cfg.seed)
    cap = cfg.max_eval_rows
    if cfg.eval_data:
        held = read_preferences(cfg.eval_data, cfg.skip_invalid, echo)
        _check_lengths(cfg.eval_data, held, tokenizer, max_length, cfg.truncate)
        keep = sorted(rng.sample(range(len(held)), cap)) if cap and len(held) > cap else None
        evals = [held[i] for i in keep] if keep else held
    else:
        if len(train) < 2:
            raise PreferenceDataError(
                f"{cfg.data}: needs at least 2 pairs to hold one out for eval"
            )
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = min(len(train) - 1, max(1, round(cfg.eval_fraction * len(train))))
        n_eval = min(n_eval, cap) if cap else n_eval
        evals = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    echo(f"chat template: {template}")
    echo(f"split: {plural(len(train), 'pair')} for training, {plural(len(evals), 'pair')} for eval")
    return PreferenceData(tokenizer, template, train, evals, max_length)


def _dataset(pairs: list[dict]) -> Dataset:
    return Dataset.from_dict({key: [p[key] for p in pairs] for key in KEYS})


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _rewards(metrics: dict) -> dict:
    """{"accuracy", "margin", "chosen", "rejected"} from an evaluation's eval_rewards/* keys."""
    names = {
        "accuracies": "accuracy",
        "margins": "margin",
        "chosen": "chosen",
        "rejected": "rejected",
    }
    return {names[k.split("/")[1]]: float(metrics[f"eval_{k}"]) for k in REWARDS}


def build_dpo_trainer(run: Run, data: PreferenceData, model, device: str, callbacks):
    """DPOTrainer with the SFT run's schedule, checkpoints and best-by-eval-loss adapter; the
    LoRA adapter is added by TRL (peft_config), so the reference is the base with it off."""
    cfg = run.cfg
    args = DPOConfig(
        **trainer_arguments(cfg, len(data.train), device, run.out_dir, data.max_length),
        beta=cfg.beta,
    )
    lora, targets = lora_config(cfg, model)
    trainer = make_trainer(
        run,
        DPOTrainer,
        args,
        callbacks,
        model=model,
        train_dataset=_dataset(data.train),
        eval_dataset=_dataset(data.eval),
        processing_class=data.tokenizer,
        peft_config=lora,
    )
    return trainer, targets


def _fmt(r: dict) -> str:
    return f"reward accuracy {r['accuracy']:.3f}, margin {r['margin']:+.4f}"


def run_dpo(
    cfg: FinetuneConfig,
    resume: bool = False,
    echo=print,
    progress: bool = True,
    color=False,
    overwrite: bool = False,
) -> dict:
    """Check the pairs, train the adapter with DPO, evaluate before and after, save the best
    adapter and report.json / report.md (with the rewards on held-out pairs)."""
    run = start_run(cfg, resume, echo, overwrite)
    say = run.say
    data = prepare_preferences(cfg, say)
    device = pick_device(cfg.device)
    record_settings(cfg, run.out_dir, run.checkpoint)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    say(f"loading {cfg.model} (full precision) on {device}; beta {cfg.beta:g}")
    model = load_base_model(cfg.model, False, device, None, trust_remote_code=cfg.trust_remote_code)

    # DPO's eval loss is -log sigmoid(margin), not a cross-entropy: no perplexity is printed.
    callbacks = run_callbacks(run.out_dir, run.resume_step, progress, say, perplexity=False)
    trainer, targets = build_dpo_trainer(run, data, model, device, callbacks)
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    say(f"LoRA rank {cfg.lora_rank} on {', '.join(targets)}: {trainable:,} trainable parameters")
    total = total_steps(cfg, len(data.train))
    say(f"evaluating {plural(len(data.eval), 'pair')}; {total} steps")

    before = evaluate_before(trainer, run)
    say(f"before training: DPO loss {before['eval_loss']:.4f}, {_fmt(_rewards(before))}")
    trained = run_training(trainer, run)
    best = trained.best
    # The rewards of the adapter kept (the best checkpoint's, loaded back at the end).
    after_metrics = next(
        (
            h
            for h in trained.state.log_history
            if h.get("step") == best["step"] and "eval_rewards/margins" in h
        ),
        trained.last,
    )
    before_r, after_r = _rewards(before), _rewards(after_metrics)
    say(f"after training: DPO loss {best['eval_loss']:.4f}, {_fmt(after_r)} (step {best['step']})")
    if after_r["margin"] <= before_r["margin"]:
        say(
            "warning: the reward margin on held-out pairs did not grow; the adapter learned no preference"
        )
    if not run.main:
        return {}

    meta = adapter_meta(run, {"beta": cfg.beta}, PREFERENCE.name, data.template, targets, best, [])
    adapter_dir = save_adapter(trainer.model, data.tokenizer, run.out_dir / "adapter", meta)
    report = run_report(
        run,
        trainer,
        trained,
        device,
        adapter_dir,
        before,  # DPO loss; log(2) = 0.693 with no adapter
        settings={"beta": cfg.beta},
        data={"train_pairs": len(data.train), "eval_pairs": len(data.eval)},
        quality={"rewards_before": before_r, "rewards_after": after_r},
        memory={
            "peak_gpu_memory_bytes": (
                torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
            )
        },
    )
    return finish(run, report, write_dpo_report)


def write_dpo_report(report: dict, out_dir: Path) -> None:
    """report.json, loss_curve.png and report.md (rewards before / after) in out_dir."""
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    metrics = read_metrics(out_dir / "metrics.jsonl")
    title = f"dpo on {report['model']} (beta {report['beta']:g})"
    plot_loss_curve(metrics, out_dir / "loss_curve.png", title, report["adapter_step"])
    b, a = report["rewards_before"], report["rewards_after"]
    rows = [
        ("base model", report["model"]),
        ("method", f"dpo (LoRA), beta {report['beta']:g}, on {report['device']}"),
        ("pairs (train / eval)", f"{report['train_pairs']} / {report['eval_pairs']}"),
        ("steps", f"{report['steps']} (adapter: step {report['adapter_step']})"),
        ("training time", f"{report['train_seconds']:.1f} s"),
        ("eval DPO loss", f"{report['eval_loss_before']:.4f} → {report['eval_loss_after']:.4f}"),
        ("reward accuracy", f"{b['accuracy']:.3f} → {a['accuracy']:.3f}"),
        ("reward margin", f"{b['margin']:+.4f} → {a['margin']:+.4f}"),
        ("reward chosen / rejected", f"{a['chosen']:+.4f} / {a['rejected']:+.4f} (after)"),
    ]
    lines = ["# DPO fine-tuning report", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "![loss curve](loss_curve.png)", ""]
    write_text_atomic(out_dir / "report.md", "\n".join(lines) + "\n")


def check_preferences(cfg: FinetuneConfig, echo=print) -> None:
    """`--check` for DPO: the pairs, their lengths and the split, without loading the model."""
    prepare_preferences(cfg, echo)
