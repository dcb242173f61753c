"""What PPO and the evaluation of a chat policy share: sampled answers to a batch of prompts,
their log-probabilities under a model, and their reward-model scores."""

from __future__ import annotations

import torch

from core.lm.chat_format import encode_prompt, pad_sequences, stop_ids
from core.lm.generate import sample_batch
from core.lm.model import GPT
from core.train.losses import token_logprobs
from core.train.stages.reward import RewardModel


def unique_prompts(rows) -> list[str]:
    seen: dict[str, None] = {}
    for _, (prompt, _, _) in rows:
        seen.setdefault(prompt, None)
    return list(seen)


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
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    generator = torch.Generator().manual_seed(seed)
    per_prompt = torch.zeros(len(prompts))
    kls, texts = [], {}
    for _, idx in sorted(bucket_by_length(encoded).items()):
        batch = torch.tensor([encoded[i] for i in idx for _ in range(samples)])
        answers, lengths, _ = sample_batch(
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
