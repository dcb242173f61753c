"""Stage 3b, optimise the chat model against preferences: PPO with a reward model, or DPO.

PPO (classic RLHF, InstructGPT): each step
  1. rollouts: the policy answers a batch of prompts (sampled, batched through the KV cache);
  2. the reward model scores each finished answer; every token also pays a KL penalty
     −kl_coef · (log π(token) − log π_ref(token)) for drifting from the frozen SFT model;
  3. a value head (on the policy's hidden states) estimates future reward; generalized advantage
     estimation (GAE) turns rewards and values into per-token advantages;
  4. a few epochs of the clipped surrogate objective: the probability ratio π/π_old is clipped to
     [1 − ε, 1 + ε], so no update moves the policy far from the one that sampled the data.

DPO (Rafailov et al., 2023) needs no reward model and no sampling: for a preferred and a rejected
answer to the same prompt, loss = −log σ(β · ((log π(chosen) − log π_ref(chosen)) −
(log π(rejected) − log π_ref(rejected)))). It is the Bradley-Terry loss of a reward model whose
reward is β · log(π/π_ref): the policy is its own reward model.

The loss functions are small pure functions, tested against TRL (DPO) and a loop-by-loop
reference (PPO, GAE) in tests/test_rlhf.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.config import save_config
from core.hf import load_model, resolve_model_path, save_model
from core.model import GPT
from core.reward import (
    RewardModel,
    encode_pair,
    hidden_states,
    load_reward_model,
    pad_sequences,
)
from core.sampling import sample_next_token
from core.sft import (
    DATA_DIR,
    DatasetError,
    TrainConfig,
    fit,
    load_preference_splits,
    optimizer_step,
    prompt_ids,
    sample_indices,
    stop_ids,
)
from core.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------
# the losses (pure functions of tensors)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss from summed answer log-probabilities [B]; returns (mean loss, chosen
    implicit rewards, rejected implicit rewards), rewards being β · log(π/π_ref)."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over answer tokens [B, R] (mask: 1 = a real token).

    δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, with V = 0 after the answer ends.
    Returns (advantages, returns = advantages + values), both 0 on masked positions."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = (
            values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, 0])
        )
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def ppo_losses(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    values_new: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float,
) -> dict[str, torch.Tensor]:
    """The clipped surrogate policy loss and the clipped value loss, averaged over real tokens.

    policy: max(−A·ratio, −A·clip(ratio, 1 ± ε)), the pessimistic of the two, so moving the
    ratio beyond the clip range earns nothing. value: ½ max((V − R)², (V_clipped − R)²)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    values_clipped = values_old + torch.clamp(
        values_new - values_old, -clip_range_value, clip_range_value
    )
    value_loss = 0.5 * masked_mean(
        torch.maximum((values_new - returns) ** 2, (values_clipped - returns) ** 2), mask
    )
    return {"policy_loss": policy_loss, "value_loss": value_loss, "clip_fraction": clip_fraction}


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalise to mean 0, std 1 over the real tokens (PPO's usual advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# ---------------------------------------------------------------------------------------------
# models and sampling


class PolicyWithValue(nn.Module):
    """The policy GPT plus a value head on its last hidden states (one backbone, two heads)."""

    def __init__(self, policy: GPT) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden_states(self.policy, input_ids)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits [B, T, V] and targets [B, T], in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_answers(
    model: GPT,
    prompts: torch.Tensor,
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample answers for a batch of prompts of equal length [B, P] through one KV cache.

    (Our GPT has no attention mask, so a batch holds prompts of one token length rather than
    padded ones.) Returns answers [B, R] (pad after the end), lengths [B] (counting the stop
    token) and ended [B] (a stop token was produced)."""
    B, P = prompts.shape
    budget = min(max_new_tokens, model.config.max_position_embeddings - P)
    if budget <= 0:
        raise ValueError(f"prompt of {P} tokens leaves no room to answer")
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(B, P + budget)
    logits = model(prompts.to(device), cache=cache)[:, -1]
    stop_t = torch.tensor(stop, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    tokens = []
    for step in range(budget):
        token = sample_next_token(logits, temperature, generator=generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        lengths += (~done).long()
        is_stop = torch.isin(token, stop_t) & ~done
        ended |= is_stop
        done |= is_stop
        if done.all() or step == budget - 1:
            break
        logits = model(token.unsqueeze(1), cache=cache)[:, -1]
    return torch.stack(tokens, dim=1).cpu(), lengths.cpu(), ended.cpu()


def bucket_by_length(prompts: list[list[int]]) -> dict[int, list[int]]:
    """Prompt indices grouped by token length (one batch = one length, see sample_answers)."""
    buckets: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        buckets.setdefault(len(ids), []).append(i)
    return buckets


def answer_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()


def sequence_logprobs(model: GPT, prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [B, R] of `answers` after `prompts` (equal-length prompts)."""
    seq = torch.cat([prompts, answers], dim=1)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1 :]
    return token_logprobs(logits, answers)


@torch.no_grad()
def evaluate_answers(
    policy: GPT,
    ref: GPT,
    rm: RewardModel,
    tokenizer,
    prompts: list[str],
    samples: int,
    max_new_tokens: int,
    seed: int,
) -> dict:
    """Sample `samples` answers per prompt; mean reward-model score and KL(policy ‖ ref) per
    answer (Σ log π − log π_ref over its tokens, an unbiased estimate), plus per-prompt means and
    the sampled answers' texts (a list per prompt)."""
    policy.eval()
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    generator = torch.Generator().manual_seed(seed)
    per_prompt = torch.zeros(len(prompts))
    kls, texts = [], {}
    for _, idx in sorted(bucket_by_length(encoded).items()):
        batch = torch.tensor([encoded[i] for i in idx for _ in range(samples)])
        answers, lengths, _ = sample_answers(
            policy, batch, max_new_tokens, stop_ids(tokenizer), tokenizer.pad_token_id, generator
        )
        mask = answer_mask(lengths, answers.shape[1])
        kl = ((sequence_logprobs(policy, batch, answers) - sequence_logprobs(ref, batch, answers))
              * mask).sum(1)  # fmt: skip
        scores = score_answers(rm, batch, answers, lengths, tokenizer.pad_token_id)
        kls.append(kl)
        for j, i in enumerate(idx):
            per_prompt[i] = scores[j * samples : (j + 1) * samples].mean()
            texts[i] = [
                tokenizer.decode(a[:n], skip_special_tokens=True).strip()
                for a, n in zip(
                    answers[j * samples : (j + 1) * samples],
                    lengths[j * samples : (j + 1) * samples],
                    strict=True,
                )
            ]
    return {
        "reward": per_prompt.mean().item(),
        "kl": torch.cat(kls).mean().item(),
        "per_prompt_reward": per_prompt.tolist(),
        "answers": [texts[i] for i in range(len(prompts))],
    }


def score_answers(rm, prompts: torch.Tensor, answers, lengths, pad_id: int) -> torch.Tensor:
    seqs = [
        [*p.tolist(), *a[:n].tolist()] for p, a, n in zip(prompts, answers, lengths, strict=True)
    ]
    ids, seq_lengths = pad_sequences(seqs, pad_id)
    device = rm.score.weight.device
    return rm(ids.to(device), seq_lengths.to(device)).float().cpu()


# ---------------------------------------------------------------------------------------------
# the stage


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


def unique_prompts(rows) -> list[str]:
    seen: dict[str, None] = {}
    for _, (prompt, _, _) in rows:
        seen.setdefault(prompt, None)
    return list(seen)


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
        train_step = _ppo_step(cfg, module, ref, rm, tokenizer, unique_prompts(train_pairs))
    else:
        module = policy = load_model(folder, device=cfg.device)
        train_step = _dpo_step(cfg, policy, ref, tokenizer, train_pairs)
    dpo_evals = _encode_dpo(tokenizer, eval_rows, ref)

    def evaluate() -> dict:
        metrics = {}
        if rm is not None:
            result = evaluate_answers(
                policy, ref, rm, tokenizer, eval_prompts, cfg.eval_samples,
                cfg.max_new_tokens, seed=cfg.seed + 1,
            )  # fmt: skip
            metrics.update(eval_reward=result["reward"], eval_kl=result["kl"])
        metrics.update(_dpo_eval(policy, dpo_evals, cfg.beta, tokenizer.pad_token_id))
        return metrics

    result = fit(module, cfg, out_dir, train_step, evaluate, resume, progress, cfg.method)
    save_model(policy, out_dir / "final", tokenizer=tokenizer)
    report = {"stage": "rlhf", "method": cfg.method, **result, "config": asdict(cfg)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ppo_step(cfg: RLHFConfig, module: PolicyWithValue, ref, rm, tokenizer, prompts: list[str]):
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    buckets = bucket_by_length(encoded)
    lengths_list = sorted(buckets)
    stop, pad = stop_ids(tokenizer), tokenizer.pad_token_id

    def train_step(step: int, optimizer) -> dict:
        # 1. rollouts: prompts of one length, drawn by (seed, step) so a resume repeats them
        rng = random.Random(cfg.seed * 1_000_003 + step)
        bucket = buckets[rng.choice(lengths_list)]
        batch = torch.tensor([encoded[rng.choice(bucket)] for _ in range(cfg.batch_size)])
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        module.eval()
        answers, lengths, ended = sample_answers(
            module.policy, batch, cfg.max_new_tokens, stop, pad, generator
        )
        mask = answer_mask(lengths, answers.shape[1])
        P = batch.shape[1]
        seq = torch.cat([batch, answers], dim=1)
        with torch.no_grad():
            logits, values = module(seq[:, :-1])
            logp_old = token_logprobs(logits[:, P - 1 :], answers)
            values_old = values[:, P - 1 :] * mask
            logp_ref = sequence_logprobs(ref, batch, answers)
            scores = score_answers(rm, batch, answers, lengths, pad)
            scores = scores - cfg.missing_end_penalty * (~ended).float()
        # 2. rewards: the KL penalty on every token, the score on the last one
        kl = (logp_old - logp_ref) * mask
        rewards = -cfg.kl_coef * kl
        last = (lengths - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        # 3. advantages
        advantages, returns = gae(rewards, values_old, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        # 4. clipped updates
        module.train()
        stats: dict[str, float] = {}
        size = cfg.batch_size // cfg.minibatches
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=generator)
            for start in range(0, cfg.batch_size, size):
                mb = order[start : start + size]
                logits, values = module(seq[mb, :-1])
                logits, values = logits[:, P - 1 :], values[:, P - 1 :]
                logp = token_logprobs(logits, answers[mb])
                losses = ppo_losses(
                    logp, logp_old[mb], advantages[mb], values, values_old[mb], returns[mb],
                    mask[mb], cfg.clip_range, cfg.clip_range_value,
                )  # fmt: skip
                loss = losses["policy_loss"] + cfg.vf_coef * losses["value_loss"]
                optimizer_step(module, optimizer, loss, cfg.grad_clip)
                if epoch == 0 and start == 0:  # entropy of the sampling policy, first minibatch
                    probs = torch.softmax(logits.float(), -1)
                    entropy = -(probs * torch.log_softmax(logits.float(), -1)).sum(-1)
                    stats["entropy"] = masked_mean(entropy, mask[mb]).item()
                for k, v in losses.items():
                    stats[k] = stats.get(k, 0.0) + v.item() / (cfg.ppo_epochs * cfg.minibatches)
        return {
            "reward": scores.mean().item(),
            "kl": kl.sum(1).mean().item(),
            "answer_tokens": lengths.float().mean().item(),
            **stats,
        }

    return train_step


def _encode_dpo(tokenizer, rows, ref: GPT) -> list[dict]:
    """Per pair: chosen/rejected ids, where the answer starts, and the reference log-probs
    (the reference is frozen, so they are computed once)."""
    context = ref.config.max_position_embeddings
    out = []
    for where, (prompt, chosen, rejected) in rows:
        start = len(prompt_ids(tokenizer, prompt))
        c, r = encode_pair(tokenizer, prompt, chosen), encode_pair(tokenizer, prompt, rejected)
        if max(len(c), len(r)) > context:
            raise DatasetError(
                f"{where}: chosen/rejected: longer than the model's context of {context} tokens"
            )
        out.append({"chosen": c, "rejected": r, "start": start})
    for i in range(0, len(out), 64):
        chunk = out[i : i + 64]
        with torch.no_grad():
            lp_c, lp_r = _pair_logprobs(ref, chunk, tokenizer.pad_token_id)
        for item, c, r in zip(chunk, lp_c, lp_r, strict=True):
            item["ref_chosen"], item["ref_rejected"] = c.item(), r.item()
    return out


def _pair_logprobs(model: GPT, items: list[dict], pad_id: int):
    """Summed answer log-probs of chosen and rejected answers [B] each, in one batch."""
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    starts = torch.tensor([it["start"] for it in items] * 2)
    ids, lengths = pad_sequences(seqs, pad_id)
    device = model.model.embed_tokens.weight.device
    logp = token_logprobs(model(ids[:, :-1].to(device)), ids[:, 1:].to(device)).cpu()
    positions = torch.arange(1, ids.shape[1]).unsqueeze(0)  # position of each predicted token
    mask = (positions >= starts.unsqueeze(1)) & (positions < lengths.unsqueeze(1))
    summed = (logp * mask).sum(1)
    return summed[: len(items)], summed[len(items) :]


def _dpo_step(cfg: RLHFConfig, policy: GPT, ref: GPT, tokenizer, pairs):
    encoded = _encode_dpo(tokenizer, pairs, ref)
    pad = tokenizer.pad_token_id

    def train_step(step: int, optimizer) -> dict:
        batch = [encoded[i] for i in sample_indices(len(encoded), cfg.batch_size, cfg.seed, step)]
        chosen, rejected = _pair_logprobs(policy, batch, pad)
        loss, r_c, r_r = dpo_loss(
            chosen,
            rejected,
            torch.tensor([b["ref_chosen"] for b in batch]),
            torch.tensor([b["ref_rejected"] for b in batch]),
            cfg.beta,
        )
        grad_norm = optimizer_step(policy, optimizer, loss, cfg.grad_clip)
        return {
            "loss": loss.item(),
            "reward_accuracy": (r_c > r_r).float().mean().item(),
            "reward_margin": (r_c - r_r).mean().item(),
            "grad_norm": grad_norm,
        }

    return train_step


@torch.no_grad()
def _dpo_eval(policy: GPT, encoded: list[dict], beta: float, pad_id: int) -> dict:
    """DPO loss and implicit-reward accuracy on held-out pairs (for both methods: it shows
    whether the policy now prefers the chosen answers more than the reference did)."""
    policy.eval()
    losses, correct = [], 0
    for i in range(0, len(encoded), 64):
        chunk = encoded[i : i + 64]
        chosen, rejected = _pair_logprobs(policy, chunk, pad_id)
        loss, r_c, r_r = dpo_loss(
            chosen,
            rejected,
            torch.tensor([b["ref_chosen"] for b in chunk]),
            torch.tensor([b["ref_rejected"] for b in chunk]),
            beta,
        )
        losses.append(loss.item() * len(chunk))
        correct += (r_c > r_r).sum().item()
    return {
        "eval_dpo_loss": sum(losses) / len(encoded),
        "eval_pref_accuracy": correct / len(encoded),
    }
