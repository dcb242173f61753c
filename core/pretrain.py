"""Stage 1, generative pre-training: learn to predict the next token of plain text.

One step = sample `batch_size` random windows of `seq_len + 1` tokens, predict tokens 1..T from
0..T-1, cross-entropy, AdamW. Everything a run needs to continue after a crash is in the newest
checkpoint, and the batch for step s is a pure function of (seed, s), so a resumed run sees the
very same batches and reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from core import corpus as corpus_lib
from core.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from core.config import save_config
from core.hf import atomic_directory, load_model, save_model
from core.model import GPT, GPTConfig
from core.plots import plot_loss_curve
from core.tokenizer import encode_documents, load_tokenizer, save_tokenizer, train_tokenizer


@dataclass
class PretrainConfig:
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
    # optimisation
    seq_len: int = 128
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 2000
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 16
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None  # torch CPU threads; None = torch's default
    device: str = "cpu"

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
        if self.seq_len > self.context_length:
            raise ValueError(
                f"seq_len ({self.seq_len}) is longer than context_length ({self.context_length})"
            )
        for key in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_learning_rate` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_learning_rate + cosine * (cfg.learning_rate - cfg.min_learning_rate)


def batch_for_step(
    tokens: torch.Tensor, step: int, micro: int, cfg: PretrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, micro-step), drawn from a generator seeded by both, so the
    sequence of batches is the same whether or not the run was interrupted."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
    starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    windows = torch.stack([tokens[s : s + cfg.seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: torch.Tensor, cfg: PretrainConfig) -> list[torch.Tensor]:
    """Fixed, non-overlapping eval windows (the same at every evaluation)."""
    n = min(cfg.eval_batches * cfg.batch_size, (len(tokens) - 1) // (cfg.seq_len + 1))
    if n == 0:
        raise ValueError(f"eval split has {len(tokens)} tokens: fewer than one window")
    windows = tokens[: n * (cfg.seq_len + 1)].view(n, cfg.seq_len + 1)
    return list(windows.split(cfg.batch_size))


@torch.no_grad()
def evaluate_loss(model: GPT, batches: list[torch.Tensor], device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for w in batches:
        w = w.to(device)
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def configure_optimizer(model: GPT, cfg: PretrainConfig) -> torch.optim.AdamW:
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


class MetricsLog:
    """Append-only JSONL of metrics; on resume, lines after the checkpoint's step are dropped so
    the curve has no duplicated or orphaned points."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True):
    """Run pre-training; returns the report dict (also written to out_dir/report.json)."""
    cfg.validate()
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = latest_checkpoint(out_dir) if resume else None
    if not resume and latest_checkpoint(out_dir) is not None:
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
    if ckpt is not None:
        model = load_model(ckpt, device=cfg.device)
    else:
        model = GPT(cfg.model_config(len(tokenizer), special)).to(cfg.device)
    model.train()
    optimizer = configure_optimizer(model, cfg)
    start_step, elapsed_before = 0, 0.0
    if ckpt is not None:
        state = load_training_state(ckpt, optimizer)
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    log = MetricsLog(out_dir / "metrics.jsonl", start_step if ckpt is not None else None)
    evals = eval_batches(eval_tokens, cfg)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    t0 = time.perf_counter()
    bar = tqdm(
        range(start_step, cfg.max_steps),
        initial=start_step,
        total=cfg.max_steps,
        desc="pretrain",
        disable=not progress,
        dynamic_ncols=True,
    )
    if start_step == 0:
        log.write({"step": 0, "eval_loss": evaluate_loss(model, evals, cfg.device)})
    for step in bar:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = batch_for_step(train_tokens, step, micro, cfg)
            x, y = x.to(cfg.device), y.to(cfg.device)
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        record = {"step": done, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm}
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            record["eval_loss"] = evaluate_loss(model, evals, cfg.device)
            record["eval_ppl"] = math.exp(record["eval_loss"])
        if done % cfg.log_every == 0 or "eval_loss" in record:
            elapsed = elapsed_before + time.perf_counter() - t0
            record["elapsed_s"] = round(elapsed, 3)
            record["tokens_per_s"] = round(
                (done - start_step) * tokens_per_step / (time.perf_counter() - t0), 1
            )
            log.write(record)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=record["tokens_per_s"])
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            elapsed = elapsed_before + time.perf_counter() - t0
            save_checkpoint(
                out_dir,
                done,
                model,
                optimizer,
                {"elapsed_s": elapsed},
                tokenizer,
                keep=cfg.keep_checkpoints,
            )
    bar.close()

    final_dir = out_dir / "final"
    save_model(model, final_dir, tokenizer=tokenizer)
    report = {
        "steps": cfg.max_steps,
        "train_seconds": round(elapsed_before + time.perf_counter() - t0, 1),
        "tokens_seen": cfg.max_steps * tokens_per_step,
        "parameters": model.num_parameters(),
        "final_eval_loss": evaluate_loss(model, evals, cfg.device),
        "threads": torch.get_num_threads(),
        "config": asdict(cfg),
    }
    report["final_eval_ppl"] = math.exp(report["final_eval_loss"])
    if cfg.corpus is None:
        from core.evaluate import next_word_kl

        report["next_word_kl"] = next_word_kl(
            model.eval(), tokenizer, corpus_lib.held_out_prefixes(500)
        )
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png", title="pre-training")
    return report
