"""Stage 3b, optimise the chat model against preferences: PPO with a reward model, or DPO.

PPO (classic RLHF, InstructGPT) samples answers, scores them with a reward model and takes
clipped policy-gradient steps with a KL penalty to the frozen SFT model (core.train.stages.ppo). DPO
(Rafailov et al., 2023) needs no reward model and no sampling: the policy is its own reward model,
trained with a Bradley-Terry loss on preference pairs (core.train.stages.dpo).

This module holds their config and the stage's entry point. The losses are small pure functions
in core.train.losses, tested against TRL (DPO) and a loop-by-loop reference (PPO, GAE) in
tests/test_rlhf.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.atomic import write_text_atomic
from core.lm.loader import load_model, resolve_model_path, save_model
from core.lm.tokenizer import load_tokenizer
from core.train.config import save_config
from core.train.data import DATA_DIR, load_preference_splits
from core.train.stages.dpo import dpo_eval, dpo_step, encode_pairs
from core.train.stages.ppo import PolicyWithValue, ppo_step
from core.train.stages.reward import load_reward_model
from core.train.stages.rollouts import evaluate_answers, unique_prompts
from core.train.trainer import TrainConfig, fit


@dataclass
class RLHFConfig(TrainConfig):
    method: str = "ppo"  # ppo | dpo
    model: str = "tutor-sft"  # the policy starts here; a frozen copy is the reference
    reward_model: str | None = None  # reward model folder (ppo; also used for evaluation)
    train_file: str = str(DATA_DIR / "prefs_train.jsonl")  # ppo: its prompts; dpo: its pairs
    eval_file: str = str(DATA_DIR / "prefs_heldout.jsonl")  # held-out prompts / pairs
    skip_invalid: bool = False
    max_steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-5
    warmup_steps: int = 5
    eval_every: int = 25
    checkpoint_every: int = 25
    log_every: int = 1  # every PPO step's reward, KL, entropy and clip fraction
    # ppo
    max_new_tokens: int = 72  # the longest bundled answer (50 tokens) plus a filler tail
    ppo_epochs: int = 4
    minibatches: int = 2
    kl_coef: float = 0.05
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    missing_end_penalty: float = 1.0  # subtracted when an answer hits max_new_tokens
    # dpo
    beta: float = 0.1
    # evaluation: sampled answers per held-out prompt
    eval_samples: int = 2

    def validate(self) -> None:
        super().validate()
        if self.method not in ("ppo", "dpo"):
            raise ValueError(f"method must be 'ppo' or 'dpo', got {self.method!r}")
        if self.method == "ppo" and not self.reward_model:
            raise ValueError("ppo needs a reward model: set reward_model (--reward-model PATH)")
        if self.batch_size % self.minibatches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of minibatches "
                f"({self.minibatches})"
            )


def rlhf(
    cfg: RLHFConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    train_pairs: list | None = None,
) -> dict:
    """Run PPO or DPO from cfg.model; writes out_dir/final (HF folder) and report.json.
    `train_pairs` replaces cfg.train_file (the human-feedback store passes its pairs)."""
    cfg.validate()
    out_dir = Path(out_dir)
    train_pairs, eval_rows = load_preference_splits(cfg, out_dir, train_pairs, echo)
    folder = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(cfg.seed)
    ref = load_model(folder, device=cfg.device).requires_grad_(False)
    rm = load_reward_model(cfg.reward_model, cfg.device) if cfg.reward_model else None
    if rm is not None:
        rm.requires_grad_(False)
    eval_prompts = unique_prompts(eval_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    if cfg.method == "ppo":
        module = PolicyWithValue(load_model(folder, device=cfg.device)).to(cfg.device)
        policy = module.policy
        train_step = ppo_step(cfg, module, ref, rm, tokenizer, unique_prompts(train_pairs))
    else:
        module = policy = load_model(folder, device=cfg.device)
        train_step = dpo_step(cfg, policy, ref, tokenizer, train_pairs)
    dpo_evals = encode_pairs(tokenizer, eval_rows, ref)

    def evaluate() -> dict:
        metrics = {}
        if rm is not None:
            result = evaluate_answers(
                policy, ref, rm, tokenizer, eval_prompts, cfg.eval_samples,
                cfg.max_new_tokens, seed=cfg.seed + 1,
            )  # fmt: skip
            metrics.update(eval_reward=result["reward"], eval_kl=result["kl"])
        metrics.update(dpo_eval(policy, dpo_evals, cfg.beta, tokenizer.pad_token_id))
        return metrics

    result = fit(module, cfg, out_dir, train_step, evaluate, resume, progress, cfg.method)
    save_model(policy, out_dir / "final", tokenizer=tokenizer)
    report = {"stage": "rlhf", "method": cfg.method, **result, "config": asdict(cfg)}
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report
