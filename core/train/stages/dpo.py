"""DPO (Rafailov et al., 2023) needs no reward model and no sampling: for a preferred and a
rejected answer to the same prompt, loss = −log σ(β · ((log π(chosen) − log π_ref(chosen)) −
(log π(rejected) − log π_ref(rejected)))). It is the Bradley-Terry loss of a reward model whose
reward is β · log(π/π_ref): the policy is its own reward model.

The loss is core.train.losses.dpo_loss (tested against TRL); the stage's config and entry point are in
core.train.stages.rlhf.
"""

from __future__ import annotations

import torch

from core.lm.chat_format import encode_answer, encode_prompt, pad_sequences
from core.lm.generate import model_device
from core.lm.model import GPT
from core.train.data import DatasetError
from core.train.losses import dpo_loss, token_logprobs
from core.train.trainer import optimizer_step, sample_indices


def encode_pairs(tokenizer, rows, ref: GPT) -> list[dict]:
    """Per pair: chosen/rejected ids, where the answer starts, and the reference log-probs
    (the reference is frozen, so they are computed once)."""
    context = ref.config.max_position_embeddings
    out = []
    for where, (prompt, chosen, rejected) in rows:
        start = len(encode_prompt(tokenizer, prompt))
        c, r = encode_answer(tokenizer, prompt, chosen), encode_answer(tokenizer, prompt, rejected)
        if max(len(c), len(r)) > context:
            raise DatasetError(
                f"{where}: chosen/rejected: longer than the model's context of {context} tokens"
            )
        out.append({"chosen": c, "rejected": r, "start": start})
    for i in range(0, len(out), 64):
        chunk = out[i : i + 64]
        with torch.no_grad():
            lp_c, lp_r = pair_logprobs(ref, chunk, tokenizer.pad_token_id)
        for item, c, r in zip(chunk, lp_c, lp_r, strict=True):
            item["ref_chosen"], item["ref_rejected"] = c.item(), r.item()
    return out


def pair_logprobs(model: GPT, items: list[dict], pad_id: int):
    """Summed answer log-probs of chosen and rejected answers [B] each, in one batch."""
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    starts = torch.tensor([it["start"] for it in items] * 2)
    ids, lengths = pad_sequences(seqs, pad_id)
    device = model_device(model)
    logp = token_logprobs(model(ids[:, :-1].to(device)), ids[:, 1:].to(device)).cpu()
    positions = torch.arange(1, ids.shape[1]).unsqueeze(0)  # position of each predicted token
    mask = (positions >= starts.unsqueeze(1)) & (positions < lengths.unsqueeze(1))
    summed = (logp * mask).sum(1)
    return summed[: len(items)], summed[len(items) :]


def dpo_step(cfg, policy: GPT, ref: GPT, tokenizer, pairs):
    encoded = encode_pairs(tokenizer, pairs, ref)
    pad = tokenizer.pad_token_id

    def train_step(step: int, optimizer) -> dict:
        batch = [encoded[i] for i in sample_indices(len(encoded), cfg.batch_size, cfg.seed, step)]
        chosen, rejected = pair_logprobs(policy, batch, pad)
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
def dpo_eval(policy: GPT, encoded: list[dict], beta: float, pad_id: int) -> dict:
    """DPO loss and implicit-reward accuracy on held-out pairs (for both methods: it shows
    whether the policy now prefers the chosen answers more than the reference did)."""
    policy.eval()
    losses, correct = [], 0
    for i in range(0, len(encoded), 64):
        chunk = encoded[i : i + 64]
        chosen, rejected = pair_logprobs(policy, chunk, pad_id)
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
