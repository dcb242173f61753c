"""Stage 1, generative pre-training: learn to predict the next token of plain text.

One step = sample `batch_size` random windows of `seq_len + 1` tokens, predict tokens 1..T from
0..T-1, cross-entropy, AdamW. The loop is core.trainer's `fit` (the one every stage runs on):
everything a run needs to continue after a crash is in the newest checkpoint, and the batch for
step s is a pure function of (seed, s), so a resumed run sees the very same batches and
reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.atomic import atomic_directory, write_text_atomic
from core.checkpoint import latest_checkpoint
from core.config import save_config
from core.content import corpus as corpus_lib
from core.evaluate import mean_loss, next_word_kl
from core.losses import lm_loss
from core.model import GPT, GPTConfig
from core.models import save_model
from core.plots import plot_loss_curve
from core.tokenizer import encode_documents, load_tokenizer, save_tokenizer, train_tokenizer
from core.trainer import TrainConfig, clip_and_step, fit


@dataclass
class PretrainConfig(TrainConfig):
    # data
    corpus: str | None = None  # None: the bundled generator; else a .txt/.md file or a folder
    num_documents: int = 40000  # bundled corpus size
    corpus_seed: int = 0
    eval_documents: int = 2000  # bundled: generated with another seed; own text: held out
    vocab_size: int = 2048
    # model (Llama architecture)
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    context_length: int = 128
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    # optimisation (TrainConfig's other keys keep their defaults)
    seq_len: int = 128
    grad_accum: int = 1
    batch_size: int = 32
    max_steps: int = 2000
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 1337
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 16
    checkpoint_every: int = 250

    def model_config(self, vocab_size: int, special: dict) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.context_length,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            **special,
        )

    def validate(self) -> None:
        super().validate()
        if self.seq_len > self.context_length:
            raise ValueError(
                f"seq_len ({self.seq_len}) is longer than context_length ({self.context_length})"
            )
        for key in ("grad_accum", "seq_len", "eval_batches"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def batch_for_step(
    tokens: torch.Tensor, step: int, micro: int, cfg: PretrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, micro-step), drawn from a generator seeded by both, so the
    sequence of batches is the same whether or not the run was interrupted."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
    starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    windows = torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def eval_batches(
    tokens: torch.Tensor, cfg: PretrainConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping eval windows as (inputs, targets) (the same at every evaluation)."""
    n = min(cfg.eval_batches * cfg.batch_size, (len(tokens) - 1) // (cfg.seq_len + 1))
    if n == 0:
        raise ValueError(f"eval split has {len(tokens)} tokens: fewer than one window")
    windows = tokens[: n * (cfg.seq_len + 1)].view(n, cfg.seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(cfg.batch_size)]


def prepare_data(cfg: PretrainConfig, out_dir: Path):
    """Tokenizer + train/eval token streams, cached in out_dir so a resume reuses them exactly."""
    tok_dir, data_file = out_dir / "tokenizer", out_dir / "tokens.safetensors"
    if (tok_dir / "tokenizer.json").is_file() and data_file.is_file():
        data = load_file(data_file)
        return load_tokenizer(tok_dir), data["train"], data["eval"]
    if cfg.corpus is None:
        train_docs = corpus_lib.generate_documents(cfg.num_documents, seed=cfg.corpus_seed)
        eval_docs = corpus_lib.generate_documents(cfg.eval_documents, seed=cfg.corpus_seed + 1)
    else:
        docs = corpus_lib.load_text_corpus(cfg.corpus)
        n_eval = max(1, len(docs) // 10) if len(docs) > 1 else 0
        train_docs, eval_docs = docs[n_eval:], docs[:n_eval] or docs
    tokenizer = train_tokenizer(train_docs, vocab_size=cfg.vocab_size)
    train, evals = encode_documents(tokenizer, train_docs), encode_documents(tokenizer, eval_docs)
    if len(train) < cfg.seq_len + 2:
        raise ValueError(
            f"the corpus has only {len(train)} training tokens; need more than seq_len "
            f"({cfg.seq_len}) — add text or lower --seq-len"
        )
    if len(evals) < cfg.seq_len + 2:  # a tiny own corpus: evaluate on the training text
        evals = train
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_directory(tok_dir) as tmp:
        save_tokenizer(tokenizer, tmp)
    tmp_file = data_file.with_suffix(".tmp")
    save_file({"train": train.contiguous(), "eval": evals.contiguous()}, tmp_file)
    os.replace(tmp_file, data_file)
    return tokenizer, train, evals


def pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True):
    """Run pre-training; returns the report dict (also written to out_dir/report.json)."""
    cfg.validate()
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not resume and latest_checkpoint(out_dir) is not None:  # before the data is prepared
        raise FileExistsError(
            f"{out_dir} already has checkpoints: pass --resume to continue, or pick another "
            "--output-dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    tokenizer, train_tokens, eval_tokens = prepare_data(cfg, out_dir)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(len(tokenizer), special)).to(cfg.device)  # fit loads a resume
    evals = eval_batches(eval_tokens, cfg)

    def train_step(step: int, optimizer) -> dict:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):  # gradients add up over micro-batches
            x, y = batch_for_step(train_tokens, step, micro, cfg)
            loss = lm_loss(model(x.to(cfg.device)), y.to(cfg.device)) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        return {"loss": loss_sum, "grad_norm": clip_and_step(model, optimizer, cfg.grad_clip)}

    def evaluate() -> dict:
        loss = mean_loss(model, evals, cfg.device)
        return {"eval_loss": loss, "eval_ppl": math.exp(loss)}

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    result = fit(
        model, cfg, out_dir, train_step, evaluate, resume, progress, "pretrain", tokenizer,
        tokens_per_step=tokens_per_step,
    )  # fmt: skip
    save_model(model, out_dir / "final", tokenizer=tokenizer)
    report = {
        "steps": cfg.max_steps,
        "train_seconds": result["train_seconds"],
        "tokens_seen": cfg.max_steps * tokens_per_step,
        "parameters": model.num_parameters(),
        "final_eval_loss": result["eval_loss"],
        "threads": torch.get_num_threads(),
        "config": asdict(cfg),
    }
    report["final_eval_ppl"] = math.exp(report["final_eval_loss"])
    if cfg.corpus is None:
        report["next_word_kl"] = next_word_kl(
            model.eval(), tokenizer, corpus_lib.held_out_prefixes(500)
        )
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png", title="pre-training")
    return report
