"""`genai-lab finetune --method dpo`: preference tuning of a LoRA adapter with TRL's DPOTrainer.

Data rows are ``{"prompt", "chosen", "rejected"}``: strings, or (chat style) a prompt that is a
list of ``{"role", "content"}`` messages and answers that are strings or lists of assistant
messages. Every row becomes a conversation, so the model's chat template renders it, as in SFT.
The frozen base is the reference policy (the adapter switched off), so no second model is
loaded. The run folder is the SFT one (checkpoints, adapter/, config.yaml, report.json, resume);
the report adds DPO's reward accuracy and margin on held-out pairs before and after training.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import EarlyStoppingCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from core.atomic import write_text_atomic
from finetune.base_model import (
    check_target_modules,
    default_target_modules,
    load_base_model,
    load_config,
    load_tokenizer,
    model_label,
    pick_device,
)
from finetune.config import FinetuneConfig
from finetune.data import ROLES, DataError, Row, plural, read_rows
from finetune.render import ensure_chat_template
from finetune.report import plot_loss_curve, read_metrics

KEYS = ("prompt", "chosen", "rejected")
# What TRL logs at each evaluation (prefixed "eval_"): the implicit reward beta * log(pi / ref)
# of each answer, the share of pairs where chosen beats rejected, and the mean gap.
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class PreferenceDataError(DataError):
    """A preference file that cannot be trained on; one line naming file:line and the key."""


@dataclass
class PreferenceData:
    tokenizer: object
    template: str  # where the chat template came from: model, default or a file
    train: list[dict]  # {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}
    eval: list[dict]
    max_length: int


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _messages(value: object, key: str, answer: bool) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a usable prompt or answer, else (None, reason)."""
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        return [{"role": "assistant" if answer else "user", "content": value}], None
    if not isinstance(value, list) or not value:
        return None, f"must be a non-empty string or a list of messages, got {type(value).__name__}"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            return None, f"message {i}: must be an object with role and content"
        if m["role"] not in ROLES:
            return None, f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return None, f"message {i}: empty content"
        out.append({"role": m["role"], "content": m["content"]})
    if answer and any(m["role"] != "assistant" for m in out):
        return None, "answer messages must all be assistant turns"
    if not answer and out[-1]["role"] != "user":
        return None, f"the last prompt message must be a user turn, got {out[-1]['role']}"
    return out, None


def check_preference_row(row: Row) -> tuple[dict | None, str | None]:
    """(the row as TRL conversational messages, None), or (None, "key: reason")."""
    if not row.ok:
        return None, row.issues[0].reason
    if not isinstance(row.data, dict):
        return None, f"expected an object with {', '.join(KEYS)}"
    pair = {}
    for key in KEYS:
        if key not in row.data:
            return None, f"{key}: missing (a preference row needs {', '.join(KEYS)})"
        pair[key], reason = _messages(row.data[key], key, answer=key != "prompt")
        if reason:
            return None, f"{key}: {reason}"
    if pair["chosen"] == pair["rejected"]:
        return None, "chosen: the same as rejected (a pair must prefer one answer to another)"
    return pair, None


def read_preferences(path: str | Path, skip_invalid: bool = False, echo=print) -> list[dict]:
    """Every usable pair of a .jsonl/.json/.csv/.parquet file; the first bad row stops it
    (PreferenceDataError "file:line: key: reason"), unless skip_invalid drops bad rows."""
    pairs, bad = [], []
    for row in read_rows(path):
        pair, reason = check_preference_row(row)
        if reason:
            bad.append(f"{row.where}: {reason}")
        else:
            pairs.append(pair)
    if bad and not skip_invalid:
        more = f" (and {plural(len(bad) - 1, 'more invalid row')})" if len(bad) > 1 else ""
        raise PreferenceDataError(f"{bad[0]}{more}; fix it, or pass --skip-invalid")
    if bad:
        echo(f"{path}: skipped {plural(len(bad), 'invalid row')}, the first: {bad[0]}")
    if not pairs:
        raise PreferenceDataError(f"{path}: no usable preference rows ({', '.join(KEYS)})")
    return pairs


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
    from finetune.train import resolve_max_length

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


def build_dpo_trainer(cfg, data: PreferenceData, model, device: str, out_dir: Path, callbacks):
    """DPOTrainer with the SFT run's schedule, checkpoints and best-by-eval-loss adapter; the
    LoRA adapter is added by TRL (peft_config), so the reference is the base with it off."""
    from finetune.train import _tensorboard_dir, _trainer_class, trainer_arguments

    args = DPOConfig(
        **trainer_arguments(cfg, len(data.train), device, out_dir, data.max_length), beta=cfg.beta
    )
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
    if cfg.early_stopping_patience:
        callbacks = [*callbacks, EarlyStoppingCallback(cfg.early_stopping_patience)]
    with _tensorboard_dir(out_dir / "tensorboard"):
        trainer = _trainer_class(DPOTrainer)(
            model=model,
            args=args,
            train_dataset=_dataset(data.train),
            eval_dataset=_dataset(data.eval),
            processing_class=data.tokenizer,
            peft_config=lora,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)
    return trainer, targets


def _fmt(r: dict) -> str:
    return f"reward accuracy {r['accuracy']:.3f}, margin {r['margin']:+.4f}"


def run_dpo(
    cfg: FinetuneConfig, resume: bool = False, echo=print, progress: bool = True, color=False
) -> dict:
    """Check the pairs, train the adapter with DPO, evaluate before and after, save the best
    adapter and report.json / report.md (with the rewards on held-out pairs)."""
    from finetune.train import (
        _CHECKPOINT,
        _best,
        _callbacks,
        _final_eval,
        _steps,
        is_main_process,
        read_totals,
        record_settings,
        resume_checkpoint,
        save_adapter,
    )

    out_dir = Path(cfg.output_dir)
    main = is_main_process()
    say = echo if main else (lambda *_: None)
    checkpoint = resume_checkpoint(cfg, out_dir, resume)

    data = prepare_preferences(cfg, say)
    device = pick_device(cfg.device)
    record_settings(cfg, out_dir, checkpoint)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    say(f"loading {cfg.model} (full precision) on {device}; beta {cfg.beta:g}")
    model = load_base_model(cfg.model, False, device, None, trust_remote_code=cfg.trust_remote_code)

    resume_step = int(_CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint else None
    # DPO's eval loss is -log sigmoid(margin), not a cross-entropy: no perplexity is printed.
    callbacks = _callbacks(out_dir, resume_step, progress, say, perplexity=False)
    trainer, targets = build_dpo_trainer(cfg, data, model, device, out_dir, callbacks)
    trainable, total_params = trainer.model.get_nb_trainable_parameters()
    say(f"LoRA rank {cfg.lora_rank} on {', '.join(targets)}: {trainable:,} trainable parameters")
    trainer.prior_loss_sum, trainer.prior_seconds = read_totals(checkpoint)
    total = _steps(cfg, len(data.train))
    say(f"evaluating {plural(len(data.eval), 'pair')}; {total} steps")

    before_file = out_dir / "eval_before.json"
    if checkpoint is None:
        before = trainer.evaluate()
        if main:  # atomic: a kill right now must not leave half a file for --resume
            write_text_atomic(before_file, json.dumps(before) + "\n")
    else:
        before = json.loads(before_file.read_text())
        say(f"resuming from {checkpoint} (step {resume_step})")
    say(f"before training: DPO loss {before['eval_loss']:.4f}, {_fmt(_rewards(before))}")

    trainer.started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    state = trainer.state
    steps_run = state.global_step - (resume_step or 0)
    train_loss = (trainer.prior_loss_sum + result.training_loss * steps_run) / max(
        state.global_step, 1
    )
    train_seconds = trainer.prior_seconds + time.perf_counter() - trainer.started
    last = _final_eval(trainer)
    best = _best(trainer, last)
    # The rewards of the adapter kept (the best checkpoint's, loaded back at the end).
    after_metrics = next(
        (
            h
            for h in state.log_history
            if h.get("step") == best["step"] and "eval_rewards/margins" in h
        ),
        last,
    )
    before_r, after_r = _rewards(before), _rewards(after_metrics)
    say(f"after training: DPO loss {best['eval_loss']:.4f}, {_fmt(after_r)} (step {best['step']})")
    if after_r["margin"] <= before_r["margin"]:
        say(
            "warning: the reward margin on held-out pairs did not grow; the adapter learned no preference"
        )
    if not main:
        return {}

    peft_model = trainer.model
    meta = {
        "base_model": model_label(cfg.model),
        "method": cfg.method,
        "beta": cfg.beta,
        "format": "preference",
        "chat_template": data.template,
        "target_modules": targets,
        "step": best["step"],
        "eval_loss": best["eval_loss"],
        "sample_prompts": [],
    }
    adapter_dir = save_adapter(peft_model, data.tokenizer, out_dir / "adapter", meta)
    report = {
        "model": cfg.model,
        "method": cfg.method,
        "beta": cfg.beta,
        "device": device,
        "processes": trainer.args.world_size,
        "adapter": str(adapter_dir),
        "adapter_step": best["step"],
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "trainable_parameters": trainable,
        "total_parameters": total_params - trainable,
        "eval_loss_before": before["eval_loss"],  # DPO loss; log(2) = 0.693 with no adapter
        "eval_loss_after": best["eval_loss"],
        "eval_loss_last": last["eval_loss"],
        "rewards_before": before_r,
        "rewards_after": after_r,
        "train_loss": train_loss,
        "train_seconds": train_seconds,
        "peak_gpu_memory_bytes": (
            torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        ),
        "config": asdict(cfg),
    }
    write_dpo_report(report, out_dir)
    say(f"adapter: {adapter_dir} (step {best['step']}); report: {out_dir / 'report.md'}")
    return report


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
