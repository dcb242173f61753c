"""Stage 2, supervised fine-tuning (SFT): teach a base model to answer, on example conversations.

A conversation is rendered with the tokenizer's chat template,

    <|user|>\nWhat is a token?<|end|>\n<|assistant|>\nA token is a piece of text.<|end|>\n

and the loss is cross-entropy on the assistant's tokens only (the template marks them with
{% generation %}, so `return_assistant_tokens_mask` gives the mask): the model learns to produce
answers, including when to stop (<|end|>), not to imitate questions. `genai-lab sft --show-mask`
prints which tokens are trained on.

Rows are checked by core.train.data before training starts; the loop is core.train.trainer's `fit`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.lm.chat_format import IGNORE, encode_conversation, pad_batch
from core.lm.loader import load_model, resolve_model_path, save_model
from core.lm.tokenizer import load_tokenizer
from core.train.config import save_config
from core.train.data import DATA_DIR, DatasetError, conversation_messages, load_rows
from core.train.evaluate import mean_loss
from core.train.losses import lm_loss
from core.train.trainer import TrainConfig, fit, optimizer_step, sample_indices


@dataclass
class SFTConfig(TrainConfig):
    model: str = "tutor-base"  # folder or shipped name of the base model
    train_file: str = str(DATA_DIR / "sft_train.jsonl")
    eval_file: str = str(DATA_DIR / "sft_heldout.jsonl")
    skip_invalid: bool = False
    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    eval_batch_size: int = 64


def encode_sft_rows(tokenizer, rows: list[tuple[str, list[dict]]], context: int):
    """[(ids, labels)] with labels = next token where it is an assistant token, else IGNORE."""
    examples = []
    for where, messages in rows:
        ids, mask = encode_conversation(tokenizer, messages)
        while mask and not mask[-1]:  # the newline after the last <|end|> teaches nothing
            ids, mask = ids[:-1], mask[:-1]
        if len(ids) - 1 > context:  # inputs are ids[:-1]
            raise DatasetError(
                f"{where}: messages: {len(ids)} tokens, longer than the model's context of "
                f"{context} tokens"
            )
        labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]
        examples.append((ids[:-1], labels))
    return examples


def sft(
    cfg: SFTConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `cfg.model` on `cfg.train_file`; writes out_dir/final (HF folder) + report.json."""
    cfg.validate()
    out_dir = Path(out_dir)
    rejects = out_dir / "rejects"
    if cfg.skip_invalid:
        rejects.mkdir(parents=True, exist_ok=True)
    train_rows = load_rows(
        cfg.train_file, conversation_messages, cfg.skip_invalid, rejects / "train.jsonl", echo
    )
    eval_rows = load_rows(
        cfg.eval_file, conversation_messages, cfg.skip_invalid, rejects / "eval.jsonl", echo
    )
    folder = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, device=cfg.device)
    context = model.config.max_position_embeddings
    train = encode_sft_rows(tokenizer, train_rows, context)
    evals = encode_sft_rows(tokenizer, eval_rows, context)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    pad = tokenizer.pad_token_id
    size = cfg.eval_batch_size
    eval_batches = [pad_batch(evals[i : i + size], pad) for i in range(0, len(evals), size)]

    def train_step(step: int, optimizer) -> dict:
        batch = [train[i] for i in sample_indices(len(train), cfg.batch_size, cfg.seed, step)]
        ids, labels = pad_batch(batch, pad)
        loss = lm_loss(model(ids.to(cfg.device)), labels.to(cfg.device))
        grad_norm = optimizer_step(model, optimizer, loss, cfg.grad_clip)
        return {"loss": loss.item(), "grad_norm": grad_norm}

    def evaluate() -> dict:
        loss = mean_loss(model, eval_batches, cfg.device)
        return {"eval_loss": loss, "eval_ppl": math.exp(loss)}

    result = fit(model, cfg, out_dir, train_step, evaluate, resume, progress, "sft", tokenizer)
    save_model(model, out_dir / "final", tokenizer=tokenizer)
    report = {
        "stage": "sft",
        "train_examples": len(train),
        "eval_examples": len(evals),
        **result,
        "config": asdict(cfg),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
