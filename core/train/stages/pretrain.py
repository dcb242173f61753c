"""Stage 1, generative pre-training: learn to predict the next token of plain text.

One step = sample `batch_size` random windows of `seq_len + 1` tokens, predict tokens 1..T from
0..T-1, cross-entropy, AdamW. The loop is core.train.trainer's `fit` (the one every stage runs on):
everything a run needs to continue after a crash is in the newest checkpoint, and the batch for
step s is a pure function of (seed, s), so a resumed run sees the very same batches and
reproduces the uninterrupted loss curve.

The tokenizer and token streams are cached in the run folder, each stamped with a key of what it
was built from (a hash of the corpus text, vocab_size, the cache format): a rerun with other data
rebuilds them, and a `--resume` with other data is refused, instead of training on stale tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from core.atomic import atomic_directory, atomic_file, write_text_atomic
from core.content import corpus as corpus_lib
from core.lm.loader import save_model
from core.lm.model import GPT, GPTConfig
from core.lm.tokenizer import (
    SPECIAL_TOKENS,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from core.train.checkpoint import latest_checkpoint, refuse_unresumed_checkpoints
from core.train.config import ConfigError
from core.train.evaluate import mean_loss, next_word_kl
from core.train.losses import lm_loss
from core.train.plots import plot_loss_curve
from core.train.trainer import TrainConfig, clip_and_step, fit

# Bump when tokenizer training or the token layout changes: old caches then rebuild.
CACHE_FORMAT = 1
CACHE_KEY_FILE = "cache_key.json"  # inside the cached tokenizer folder
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from every byte plus the specials


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    # torch.compile the training forward and backward: one graph without breaks, ~1.1x faster
    # steps on a CPU (`genai-lab bench`) after a compilation of ~15-45 s; evaluation stays eager.
    compile: bool = False
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
        """Raise ConfigError `key: got X, must be ...` for the first unusable value."""

        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: got {getattr(self, key)!r}, must be {rule}")

        def finite(key: str) -> bool:
            return math.isfinite(getattr(self, key))

        need(
            self.corpus is None or bool(str(self.corpus).strip()),
            "corpus",
            "a .txt/.md file or a folder of them (null: the bundled corpus)",
        )
        for key in (
            "num_documents",
            "eval_documents",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "context_length",
            "seq_len",
            "grad_accum",
            "batch_size",
            "max_steps",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "log_every",
        ):
            need(getattr(self, key) >= 1, key, ">= 1")
        need(
            self.vocab_size >= MIN_VOCAB,
            "vocab_size",
            f">= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)",
        )
        need(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"a divisor of hidden_size ({self.hidden_size})",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})",
        )
        need(
            (self.hidden_size // self.num_attention_heads) % 2 == 0,
            "hidden_size",
            f"a multiple of 2 x num_attention_heads ({2 * self.num_attention_heads}): "
            "rotary embeddings need an even head size",
        )
        need(
            self.seq_len <= self.context_length,
            "seq_len",
            f"<= context_length ({self.context_length})",
        )
        need(finite("rope_theta") and self.rope_theta > 0, "rope_theta", "> 0")
        need(finite("learning_rate") and self.learning_rate > 0, "learning_rate", "> 0")
        need(
            finite("min_learning_rate") and 0 <= self.min_learning_rate <= self.learning_rate,
            "min_learning_rate",
            f"between 0 and learning_rate ({self.learning_rate})",
        )
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(finite("weight_decay") and self.weight_decay >= 0, "weight_decay", ">= 0")
        for key in ("beta1", "beta2"):
            need(finite(key) and 0 <= getattr(self, key) < 1, key, "in [0, 1)")
        need(finite("grad_clip") and self.grad_clip > 0, "grad_clip", "> 0")
        # 0 would keep every checkpoint (a full disk, not a feature): a resume needs at least one.
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        need(
            self.threads is None or self.threads >= 0,
            "threads",
            ">= 1 (0 or null: torch's default)",
        )
        super().validate()  # the shared keys' own checks (nothing above should leave for them)


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


def load_documents(cfg: PretrainConfig) -> tuple[list[str], list[str], str]:
    """(train documents, eval documents, where they come from in words)."""
    if cfg.corpus is None:
        train_docs = corpus_lib.generate_documents(cfg.num_documents, seed=cfg.corpus_seed)
        eval_docs = corpus_lib.generate_documents(cfg.eval_documents, seed=cfg.corpus_seed + 1)
        source = (
            f"the bundled corpus (num_documents {cfg.num_documents}, eval_documents "
            f"{cfg.eval_documents}, corpus_seed {cfg.corpus_seed})"
        )
        return train_docs, eval_docs, source
    docs = corpus_lib.load_text_corpus(cfg.corpus)
    n_eval = max(1, len(docs) // 10) if len(docs) > 1 else 0
    return docs[n_eval:], docs[:n_eval] or docs, str(Path(cfg.corpus).resolve())


def data_key(cfg: PretrainConfig, train_docs: list[str], eval_docs: list[str], source: str):
    """What the cached tokenizer and tokens are a function of: the documents' exact text (hashed,
    so an edited file or another corpus never reuses a cache), vocab_size and the cache format.
    `source` is for messages only: the same text under another path is the same data."""
    digest = hashlib.sha256()
    for split, docs in (("train", train_docs), ("eval", eval_docs)):
        digest.update(f"{split} {len(docs)}\n".encode())
        for doc in docs:
            raw = doc.encode("utf-8")
            digest.update(len(raw).to_bytes(8, "little") + raw)  # lengths: no ambiguous joins
    return {
        "format": CACHE_FORMAT,
        "corpus_sha256": digest.hexdigest(),
        "vocab_size": cfg.vocab_size,
        "source": source,
    }


def _same(old: dict, new: dict) -> bool:
    return all(old.get(k) == v for k, v in new.items() if k != "source")


def _differences(old: dict, new: dict) -> str:
    """`corpus A (sha256 ...), this run has corpus B (sha256 ...)`-style account, one line."""
    parts = []
    if old.get("corpus_sha256") != new["corpus_sha256"]:
        was = f"{old.get('source', '?')} (sha256 {str(old.get('corpus_sha256'))[:12]})"
        parts.append(f"corpus {was}, this run has {new['source']} "
                     f"(sha256 {new['corpus_sha256'][:12]})")  # fmt: skip
    parts += [
        f"{k} {old.get(k)!r}, this run has {new[k]!r}"
        for k in ("vocab_size", "format")
        if old.get(k) != new[k]
    ]
    return "; ".join(parts)


def _stored_key(path: Path) -> dict | None:
    """The key a cached artifact was stamped with; None if absent, {} if it has none (written by
    older code) or cannot be read (then it cannot be trusted either)."""
    try:
        if path.suffix == ".safetensors":
            if not path.is_file():
                return None
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            return json.loads(meta.get("cache_key", "{}"))
        if not (path / "tokenizer.json").is_file():
            return None
        key_file = path / CACHE_KEY_FILE
        return json.loads(key_file.read_text()) if key_file.is_file() else {}
    except (OSError, ValueError, SafetensorError):
        return {}


def prepare_data(
    cfg: PretrainConfig,
    out_dir: Path,
    resume: bool = False,
    echo: Callable[[str], None] = _say,
):
    """Tokenizer + train/eval token streams, cached in out_dir so a resume reuses them exactly.

    The cache is used only when its key (`data_key`) matches this config's data. Otherwise it is
    rebuilt, with one line saying why; under `resume` (there are checkpoints, trained on the
    cached data) that is refused instead: ValueError naming the file and what differs."""
    tok_dir, data_file = out_dir / "tokenizer", out_dir / "tokens.safetensors"
    train_docs, eval_docs, source = load_documents(cfg)
    key = data_key(cfg, train_docs, eval_docs, source)
    stored = {data_file: _stored_key(data_file), tok_dir: _stored_key(tok_dir)}
    if all(old and _same(old, key) for old in stored.values()):
        data = load_file(data_file)
        return _checked(cfg, load_tokenizer(tok_dir), data["train"], data["eval"])
    differing = [(path, old) for path, old in stored.items() if old and not _same(old, key)]
    if differing:
        path, old = differing[0]  # tokens first; one line, as both are rebuilt together
        if resume:
            raise ValueError(
                f"{path}: built from {_differences(old, key)}; --resume continues on the data "
                "the checkpoints were trained on: restore those settings, or start afresh in "
                "another --output-dir"
            )
        echo(f"{path}: built from {_differences(old, key)}: rebuilding the tokenizer and tokens")
    tokenizer = train_tokenizer(train_docs, vocab_size=cfg.vocab_size)
    train, evals = encode_documents(tokenizer, train_docs), encode_documents(tokenizer, eval_docs)
    if stored[data_file] == {}:  # a cache that does not say what it was built from
        same = False
        with contextlib.suppress(OSError, KeyError, SafetensorError):  # unreadable: not the same
            same = torch.equal(load_file(data_file)["train"], train)
        if resume and not same:
            raise ValueError(
                f"{data_file}: has no record of what it was built from and holds other tokens "
                f"than {source} gives: --resume needs the original corpus"
            )
        if not same and not differing:
            echo(
                f"{data_file}: has no record of what it was built from: rebuilding the "
                "tokenizer and tokens"
            )
    _checked(cfg, tokenizer, train, evals)  # before writing: a too-small corpus caches nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer first, then the tokens: a kill in between leaves a tokens file whose key
    # does not match, so the next run rebuilds both rather than pairing old tokens with a new
    # tokenizer.
    with atomic_directory(tok_dir) as tmp:
        save_tokenizer(tokenizer, tmp)
        (tmp / CACHE_KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
    with atomic_file(data_file) as tmp:
        tensors = {"train": train.contiguous(), "eval": evals.contiguous()}
        save_file(tensors, tmp, metadata={"cache_key": json.dumps(key)})
    return _checked(cfg, tokenizer, train, evals)


def _checked(cfg: PretrainConfig, tokenizer, train: torch.Tensor, evals: torch.Tensor):
    """The seq_len-dependent checks, applied after the cache (seq_len is not part of its key)."""
    if len(train) < cfg.seq_len + 2:
        raise ValueError(
            f"the corpus has only {len(train)} training tokens; need more than seq_len "
            f"({cfg.seq_len}) — add text or lower --seq-len"
        )
    if len(evals) < cfg.seq_len + 2:  # a tiny own corpus: evaluate on the training text
        evals = train
    return tokenizer, train, evals


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = _say,
):
    """Run pre-training; returns the report dict (also written to out_dir/report.json)."""
    cfg.validate()
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Before the data is prepared; this also cleans up after a killed run (see latest_checkpoint).
    has_checkpoint = latest_checkpoint(out_dir) is not None
    refuse_unresumed_checkpoints(out_dir, has_checkpoint, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Only checkpoints tie a run to its cached data: a resume with none may rebuild it.
    tokenizer, train_tokens, eval_tokens = prepare_data(
        cfg, out_dir, resume and has_checkpoint, echo
    )
    # After the data check, so a refused resume leaves the run's config as it was.
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(len(tokenizer), special)).to(cfg.device)  # fit loads a resume
    evals = eval_batches(eval_tokens, cfg)

    forward = torch.compile(model) if cfg.compile else model  # the same parameters

    def train_step(step: int, optimizer) -> dict:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):  # gradients add up over micro-batches
            x, y = batch_for_step(train_tokens, step, micro, cfg)
            loss = lm_loss(forward(x.to(cfg.device)), y.to(cfg.device)) / cfg.grad_accum
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
