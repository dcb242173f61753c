"""PPO (classic RLHF, InstructGPT): each step
  1. rollouts: the policy answers a batch of prompts (sampled, batched through the KV cache);
  2. the reward model scores each finished answer; every token also pays a KL penalty
     −kl_coef · (log π(token) − log π_ref(token)) for drifting from the frozen SFT model;
  3. a value head (on the policy's hidden states) estimates future reward; generalized advantage
     estimation (GAE) turns rewards and values into per-token advantages;
  4. a few epochs of the clipped surrogate objective: the probability ratio π/π_old is clipped to
     [1 − ε, 1 + ε], so no update moves the policy far from the one that sampled the data.

The losses are in core.train.losses; the stage's config and entry point in core.train.stages.rlhf.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from core.lm.chat_format import encode_prompt, stop_ids
from core.lm.generate import sample_batch
from core.lm.model import GPT
from core.train.losses import gae, masked_mean, ppo_losses, token_logprobs, whiten
from core.train.stages.rollouts import (
    answer_mask,
    bucket_by_length,
    score_answers,
    sequence_logprobs,
)
from core.train.trainer import optimizer_step


class PolicyWithValue(nn.Module):
    """The policy GPT plus a value head on its last hidden states (one backbone, two heads)."""

    def __init__(self, policy: GPT) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.policy.hidden_states(input_ids)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1)


def ppo_step(cfg, module: PolicyWithValue, ref, rm, tokenizer, prompts: list[str]):
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
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
        answers, lengths, ended = sample_batch(
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
