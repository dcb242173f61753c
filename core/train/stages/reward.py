"""Stage 3a, the reward model: read a prompt and an answer, output one number, a score.

It is the GPT backbone (initialised from the SFT model, so it already "understands" the chat
format) with the vocabulary head replaced by a scalar head, read at the last token of the
answer (its <|end|>): with causal attention only that position has seen the whole text.

Training data are pairs (prompt, chosen, rejected) where a person preferred `chosen`. The
Bradley-Terry model says P(chosen preferred) = σ(r(chosen) − r(rejected)), so the loss is

    loss = −log σ(r_chosen − r_rejected)

The course notes call this "binary classification", and it is exactly that: logistic regression
on the question "is the first answer of this pair the preferred one?", with the logit being the
difference of the two scores. Only differences matter, so the scores have no fixed zero; accuracy
is the share of held-out pairs where the chosen answer scores higher.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.atomic import atomic_directory, write_text_atomic
from core.lm.chat_format import encode_answer, pad_sequences
from core.lm.loader import load_model, resolve_model_path, write_model_files
from core.lm.model import GPT
from core.lm.tokenizer import load_tokenizer
from core.train.config import save_config
from core.train.data import DATA_DIR, DatasetError, load_preference_splits
from core.train.losses import bradley_terry_loss
from core.train.trainer import TrainConfig, fit, optimizer_step, sample_indices

HEAD_FILE = "score_head.safetensors"
REWARD_CONFIG = "reward_config.json"


def last_positions(lengths: torch.Tensor) -> torch.Tensor:
    return (lengths - 1).clamp(min=0)


class RewardModel(nn.Module):
    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.score.weight)  # start neutral: every answer scores 0
        nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B] -> scores [B] at each row's last token."""
        h = self.backbone.hidden_states(input_ids)
        last = h[torch.arange(len(lengths), device=h.device), last_positions(lengths)]
        return self.score(last).squeeze(-1)

    @torch.no_grad()
    def score_texts(self, tokenizer, prompts: list[str], responses: list[str]) -> torch.Tensor:
        ids = [encode_answer(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
        context = self.backbone.config.max_position_embeddings
        ids = [x[:context] for x in ids]
        batch, lengths = pad_sequences(ids, tokenizer.pad_token_id)
        device = self.score.weight.device
        return self(batch.to(device), lengths.to(device)).float().cpu()


def save_reward_model(rm: RewardModel, path: str | Path, tokenizer=None) -> Path:
    """A folder: the backbone as a Hugging Face Llama folder + the score head + reward_config."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model_files(rm.backbone, tmp, tokenizer)
        save_file({k: v.detach().cpu().contiguous() for k, v in rm.score.state_dict().items()},
                  tmp / HEAD_FILE)  # fmt: skip
        (tmp / REWARD_CONFIG).write_text(
            json.dumps({"score_position": "last token (<|end|> of the answer)"}, indent=2) + "\n"
        )
    return path


def load_reward_model(path: str | Path, device: str = "cpu") -> RewardModel:
    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise ValueError(f"{path}: not a reward model folder (no {HEAD_FILE})")
    rm = RewardModel(load_model(path, device=device))
    rm.score.load_state_dict(load_file(path / HEAD_FILE))
    return rm.to(device).eval()


def encode_preferences(tokenizer, rows, context: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for where, (prompt, chosen, rejected) in rows:
        pair = (
            encode_answer(tokenizer, prompt, chosen),
            encode_answer(tokenizer, prompt, rejected),
        )
        longest = max(len(x) for x in pair)
        if longest > context:
            raise DatasetError(
                f"{where}: chosen/rejected: {longest} tokens with the prompt, longer than the "
                f"model's context of {context} tokens"
            )
        out.append(pair)
    return out


def pair_scores(rm: RewardModel, pairs, pad_id: int, device: str):
    """Scores of the chosen and rejected answers of `pairs`, in one batch."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    ids, lengths = pad_sequences(seqs, pad_id)
    scores = rm(ids.to(device), lengths.to(device))
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def preference_accuracy(rm: RewardModel, pairs, pad_id: int, device: str, batch: int = 64):
    rm.eval()
    correct, loss, margins = 0, 0.0, 0.0
    for i in range(0, len(pairs), batch):
        chosen, rejected = pair_scores(rm, pairs[i : i + batch], pad_id, device)
        correct += (chosen > rejected).sum().item()
        loss += bradley_terry_loss(chosen, rejected).item() * len(chosen)
        margins += (chosen - rejected).sum().item()
    n = len(pairs)
    return {"eval_accuracy": correct / n, "eval_loss": loss / n, "eval_margin": margins / n}


@dataclass
class RewardConfig(TrainConfig):
    model: str = "tutor-sft"  # the backbone starts from this (usually the SFT model)
    train_file: str = str(DATA_DIR / "prefs_train.jsonl")
    eval_file: str = str(DATA_DIR / "prefs_heldout.jsonl")
    skip_invalid: bool = False
    max_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 5e-4
    min_learning_rate: float = 5e-5
    warmup_steps: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50


def train_reward_model(
    cfg: RewardConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    train_pairs: list[tuple[str, tuple[str, str, str]]] | None = None,
) -> dict:
    """Train a reward model; writes out_dir/final (reward model folder) and report.json.
    `train_pairs` replaces cfg.train_file (the human-feedback store passes its pairs)."""
    cfg.validate()
    out_dir = Path(out_dir)
    train_pairs, eval_rows = load_preference_splits(cfg, out_dir, train_pairs, echo)
    folder = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(cfg.seed)
    rm = RewardModel(load_model(folder, device=cfg.device)).to(cfg.device)
    context = rm.backbone.config.max_position_embeddings
    train = encode_preferences(tokenizer, train_pairs, context)
    evals = encode_preferences(tokenizer, eval_rows, context)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    pad = tokenizer.pad_token_id

    def train_step(step: int, optimizer) -> dict:
        batch = [train[i] for i in sample_indices(len(train), cfg.batch_size, cfg.seed, step)]
        chosen, rejected = pair_scores(rm, batch, pad, cfg.device)
        loss = bradley_terry_loss(chosen, rejected)
        grad_norm = optimizer_step(rm, optimizer, loss, cfg.grad_clip)
        accuracy = (chosen > rejected).float().mean().item()
        return {"loss": loss.item(), "accuracy": accuracy, "grad_norm": grad_norm}

    def evaluate() -> dict:
        return preference_accuracy(rm, evals, pad, cfg.device)

    result = fit(rm, cfg, out_dir, train_step, evaluate, resume, progress, "reward")
    save_reward_model(rm, out_dir / "final", tokenizer=tokenizer)
    report = {
        "stage": "reward",
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        **result,
        "config": asdict(cfg),
    }
    if not math.isfinite(report["eval_loss"]):
        raise ValueError("reward model training diverged (eval loss is not finite)")
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    return report
