"""The one training loop every stage runs on: `fit` steps a stage's `train_step` with the
learning-rate schedule, JSONL metrics, periodic evaluation, atomic checkpoints and resume after a
kill. Pre-training, SFT, the reward model, PPO and DPO differ only in their `train_step` and
`evaluate`, and in their config's defaults (each stage's config extends TrainConfig).

Batches are a pure function of (seed, step), so a resumed run sees the very same batches and
reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.atomic import write_text_atomic
from core.lm.loader import load_model, pick_device
from core.lm.model import GPT
from core.train.checkpoint import (
    latest_checkpoint,
    load_module_state,
    load_training_state,
    refuse_unresumed_checkpoints,
)
from core.train.checkpoint import save_checkpoint as save_training_checkpoint
from core.train.config import ConfigError


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping keys of every stage (a stage's config extends it and sets its
    own defaults)."""

    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ConfigError `key: got X, must be ...` for the first unusable value, before any
        data or model is loaded. The rules go by key name, so a stage's own keys (SFT's
        eval_batch_size, PPO's minibatches, ...) are checked here too. Resolves device "auto"
        to the device this machine has."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, (ok, rule) in _RULES.items():
            if key in values and values[key] is not None and not ok(values[key]):
                raise ConfigError(f"{key}: got {values[key]!r}, must be {rule}")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"min_learning_rate: got {self.min_learning_rate!r}, must be between 0 and "
                f"learning_rate ({self.learning_rate!r})"
            )
        self.device = pick_device(self.device)


def _at_least(low: float) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and v >= low


def _above(low: float) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and v > low


def _within(low: float, high: float) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and low <= v <= high


# key -> (check, what the message says it must be); None values are skipped (optional keys).
_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{
        key: (_at_least(1), ">= 1")
        for key in (
            "max_steps",
            "batch_size",
            "eval_every",
            "checkpoint_every",
            "log_every",
            # 0 would keep every checkpoint (a full disk, not a feature); a resume needs one.
            "keep_checkpoints",
            "eval_batch_size",  # SFT
            "ppo_epochs",  # RLHF
            "minibatches",
            "max_new_tokens",
            "eval_samples",
        )
    },
    "threads": (_at_least(0), ">= 1 (0 or null: torch's default)"),
    "learning_rate": (_above(0), "> 0"),
    "min_learning_rate": (_at_least(0), ">= 0"),
    "warmup_steps": (_at_least(0), ">= 0"),
    "weight_decay": (_at_least(0), ">= 0"),
    "beta1": (lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (_above(0), "> 0"),
    # RLHF: PPO's coefficients and DPO's beta
    "kl_coef": (_at_least(0), ">= 0"),
    "clip_range": (_above(0), "> 0"),
    "clip_range_value": (_above(0), "> 0"),
    "vf_coef": (_at_least(0), ">= 0"),
    "gamma": (_within(0, 1), "in [0, 1]"),
    "lam": (_within(0, 1), "in [0, 1]"),
    "missing_end_penalty": (_at_least(0), ">= 0"),
    "beta": (_above(0), "> 0"),
}


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_learning_rate` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_learning_rate + cosine * (cfg.learning_rate - cfg.min_learning_rate)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms' gains and embeddings' rows
    toward zero only hurts (nanoGPT does the same split)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), foreach=True
    )


def sample_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Batch rows for `step`: a pure function of (seed, step), so a resumed run sees the same."""
    rng = random.Random(seed * 1_000_003 + step)
    return [rng.randrange(n) for _ in range(batch_size)]


def optimizer_step(module, optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, clip, step, zero; returns the gradient norm before clipping."""
    loss.backward()
    return clip_and_step(module, optimizer, grad_clip)


def clip_and_step(module, optimizer, grad_clip: float) -> float:
    """Clip the accumulated gradients, step, zero; returns the gradient norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics JSONL. A line torn by a kill mid-write (only the last can be)
    is dropped with a warning instead of making the log unreadable."""
    records = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: dropped a torn metrics line", stacklevel=2)
    return records


class MetricsLog:
    """Append-only JSONL of metrics; on resume, lines after the checkpoint's step are dropped so
    the curve has no duplicated or orphaned points."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            # A failed write() (a full disk) carries no file name: give it one for the message.
            raise OSError(e.errno, e.strerror, str(self.path)) from e


def fit(
    module: torch.nn.Module,
    cfg: TrainConfig,
    out_dir: Path,
    train_step: Callable[[int, torch.optim.Optimizer], dict],
    evaluate: Callable[[], dict],
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    tokenizer=None,
    tokens_per_step: int | None = None,
) -> dict:
    """Run `train_step(step, optimizer) -> metrics` for steps [start, max_steps) with the LR
    schedule, JSONL metrics, evaluation, atomic checkpoints and resume. Returns the last
    evaluation (with `train_seconds`). `module` holds every trained parameter; with
    `tokens_per_step`, logged records also carry the training throughput."""
    out_dir = Path(out_dir)
    ckpt = latest_checkpoint(out_dir)
    refuse_unresumed_checkpoints(out_dir, ckpt is not None, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    module.train()
    if ckpt is not None:
        if isinstance(module, GPT):
            module.load_state_dict(load_model(ckpt, device=cfg.device).state_dict())
        else:
            load_module_state(ckpt, module)
    optimizer = configure_optimizer(module, cfg)
    start, elapsed_before = 0, 0.0
    if ckpt is not None:
        state = load_training_state(ckpt, optimizer)
        start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    log = MetricsLog(out_dir / "metrics.jsonl", start if ckpt is not None else None)
    t0 = time.perf_counter()
    if start == 0:
        log.write({"step": 0, **evaluate()})
    last_eval: dict = {}
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    )
    for step in bar:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        module.train()
        record = {"step": step + 1, "lr": lr, **train_step(step, optimizer)}
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_eval = evaluate()
            record.update(last_eval)
        if done % cfg.log_every == 0 or done == cfg.max_steps or last_eval.keys() & record.keys():
            record["elapsed_s"] = round(elapsed_before + time.perf_counter() - t0, 3)
            if tokens_per_step:
                seconds = time.perf_counter() - t0
                record["tokens_per_s"] = round((done - start) * tokens_per_step / seconds, 1)
            log.write(record)
            shown = {k: v for k, v in record.items() if k not in ("step", "lr", "elapsed_s")}
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(shown.items())[:4]})
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            elapsed = elapsed_before + time.perf_counter() - t0
            save_training_checkpoint(
                out_dir,
                done,
                module,
                optimizer,
                {"elapsed_s": elapsed},
                tokenizer,
                keep=cfg.keep_checkpoints,
            )
    bar.close()
    module.eval()
    if not last_eval:  # resumed at the end: nothing ran
        last_eval = evaluate()
    return {**last_eval, "train_seconds": round(elapsed_before + time.perf_counter() - t0, 1)}
