"""The training objectives, as small pure functions of tensors. Each is tested against a
reference (transformers' loss, TRL's DPO loss, a loop-by-loop PPO/GAE) in the tests.

- `lm_loss`: next-token cross-entropy, the loss of pre-training and SFT;
- `bradley_terry_loss`: the reward model's pairwise loss;
- `dpo_loss`: DPO, the Bradley-Terry loss of the implicit reward β·log(π/π_ref);
- `gae`, `ppo_losses`, `whiten`: PPO's advantages and clipped objectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.lm.chat_format import IGNORE


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits [B, T, V] against next tokens [B, T]; positions labelled IGNORE
    carry no loss (the prompt in SFT, padding)."""
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction
    )


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected), averaged over pairs (logsigmoid is stable for any gap)."""
    return -F.logsigmoid(chosen - rejected).mean()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for logits [B, T, V] and targets [B, T], in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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
