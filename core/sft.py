"""Stage 2, supervised fine-tuning (SFT): teach a base model to answer, on example conversations.

A conversation is rendered with the tokenizer's chat template,

    <|user|>\\nWhat is a token?<|end|>\\n<|assistant|>\\nA token is a piece of text.<|end|>\\n

and the loss is cross-entropy on the assistant's tokens only (the template marks them with
{% generation %}, so `return_assistant_tokens_mask` gives the mask): the model learns to produce
answers, including when to stop (<|end|>), not to imitate questions. `mask_view` prints which
tokens are trained on.

Data rows are TRL's formats, one JSON object per line: `{"messages": [{"role", "content"}, ...]}`
(system/user/assistant, multi-turn allowed) or `{"prompt": ..., "response": ...}` (or
"completion"). Every row is checked before training starts; a bad one stops the run with
`file:line: field: reason`, or with `skip_invalid` is written to a rejects file and counted.

This module also holds what the later stages share: `TrainConfig` (optimisation and bookkeeping
keys) and `fit`, the resumable training loop around core.pretrain's optimizer, schedule and
metrics log and core.checkpoint's atomic checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.checkpoint import latest_checkpoint, load_module_state, load_training_state
from core.checkpoint import save_checkpoint as save_training_checkpoint
from core.config import save_config
from core.generate import generate
from core.hf import load_model, resolve_model_path, save_model
from core.model import GPT
from core.pretrain import MetricsLog, configure_optimizer, learning_rate
from core.tokenizer import END_OF_TURN, ROLES, load_tokenizer

DATA_DIR = Path(__file__).parent / "data"
IGNORE = -100  # label of positions without loss (cross_entropy's ignore_index)


# ---------------------------------------------------------------------------------------------
# data: reading and validation


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message is `file:line: field: reason`."""


@dataclass
class Row:
    where: str  # "file:line", for error messages
    data: dict


def read_jsonl(path: str | Path) -> list[tuple[str, dict | str]]:
    """(file:line, parsed object) per non-blank line, or (file:line, reason) for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    out: list[tuple[str, dict | str]] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((where, f"not valid UTF-8 (byte {e.start})"))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((where, f"invalid JSON ({e.msg}, column {e.colno})"))
            continue
        out.append((where, obj if isinstance(obj, dict) else "expected a JSON object"))
    if not out:
        raise DatasetError(f"{path}: no rows")
    return out


def _text_field(row: dict, key: str) -> str:
    if key not in row:
        raise DatasetError(f"{key}: missing field")
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{key}: empty")
    return value


def conversation_messages(row: dict) -> list[dict]:
    """A row (messages or prompt/response) -> checked chat messages; DatasetError(field: reason)."""
    if "messages" not in row:
        if "prompt" in row and ("response" in row or "completion" in row):
            answer_key = "response" if "response" in row else "completion"
            return [
                {"role": "user", "content": _text_field(row, "prompt")},
                {"role": "assistant", "content": _text_field(row, answer_key)},
            ]
        missing = "messages" if "prompt" not in row else "response"
        raise DatasetError(f"{missing}: missing field (need 'messages', or 'prompt' + 'response')")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError("messages: expected a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DatasetError(f"{field}: expected an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise DatasetError(f"{field}.{key}: missing field")
        if m["role"] not in ROLES:
            raise DatasetError(
                f"{field}.role: unknown role {m['role']!r} (expected {', '.join(ROLES)})"
            )
        if not isinstance(m["content"], str) or not m["content"].strip():
            what = "empty response" if m["role"] == "assistant" else "empty content"
            raise DatasetError(f"{field}.content: {what}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise DatasetError("messages: no assistant message to learn from")
    return clean


def preference_triple(row: dict) -> tuple[str, str, str]:
    """A preference row -> (prompt, chosen, rejected); DatasetError(field: reason)."""
    prompt, chosen, rejected = (_text_field(row, k) for k in ("prompt", "chosen", "rejected"))
    if chosen.strip() == rejected.strip():
        raise DatasetError("chosen: identical to rejected (a pair must differ)")
    return prompt, chosen, rejected


def load_preference_splits(
    cfg, out_dir: Path, train_pairs: list | None, echo: Callable[[str], None] = print
) -> tuple[list, list]:
    """Checked (train, eval) preference triples of a reward/RLHF config (`train_file`, `eval_file`,
    `skip_invalid`); `train_pairs`, when given, replaces the train file (human feedback)."""
    rejects = Path(out_dir) / "rejects"
    if cfg.skip_invalid:
        rejects.mkdir(parents=True, exist_ok=True)
    if train_pairs is None:
        train_pairs = load_rows(
            cfg.train_file, preference_triple, cfg.skip_invalid, rejects / "train.jsonl", echo
        )
    eval_rows = load_rows(
        cfg.eval_file, preference_triple, cfg.skip_invalid, rejects / "eval.jsonl", echo
    )
    return train_pairs, eval_rows


def load_rows(
    path: str | Path,
    check: Callable[[dict], object],
    skip_invalid: bool = False,
    rejects_path: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> list[tuple[str, object]]:
    """Read and check every row before training. The first bad row raises `file:line: reason`;
    with `skip_invalid`, bad rows go to `rejects_path` (JSONL with the reason) and are counted."""
    good, rejects = [], []
    for where, obj in read_jsonl(path):
        try:
            if isinstance(obj, str):
                raise DatasetError(obj)
            good.append((where, check(obj)))
        except DatasetError as e:
            if not skip_invalid:
                raise DatasetError(f"{where}: {e}") from None
            rejects.append({"where": where, "reason": str(e), "row": obj})
    if skip_invalid and rejects:
        rejects_path = Path(rejects_path or Path(path).with_suffix(".rejects.jsonl"))
        rejects_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        echo(f"{path}: kept {len(good)} rows, skipped {len(rejects)} invalid -> {rejects_path}")
    if not good:
        raise DatasetError(f"{path}: no valid rows")
    return good


# ---------------------------------------------------------------------------------------------
# tokenisation and batching


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask (1 = trained on) from the chat template."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The chat-rendered prompt ending in `<|assistant|>\\n`, ready for the answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    return list(out["input_ids"])


def stop_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]


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


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad to the longest example: ids [B, T] (pad_id) and labels [B, T] (IGNORE)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def sample_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Batch rows for `step`: a pure function of (seed, step), so a resumed run sees the same."""
    rng = random.Random(seed * 1_000_003 + step)
    return [rng.randrange(n) for _ in range(batch_size)]


def mask_view(tokenizer, ids: list[int], mask: list[int]) -> str:
    """The rendered conversation with trained-on tokens in [brackets] (the SFT debug view)."""
    parts = []
    for token_id, m in zip(ids, mask, strict=True):
        piece = tokenizer.decode([token_id]).replace("\n", "\\n")
        parts.append(f"[{piece}]" if m else piece)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# the shared, resumable training loop


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping keys shared by the sft, reward and rlhf stages."""

    max_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    device: str = "cpu"

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def optimizer_step(module, optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, clip, step, zero; returns the gradient norm before clipping."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def fit(
    module: torch.nn.Module,
    cfg: TrainConfig,
    out_dir: Path,
    train_step: Callable[[int, torch.optim.Optimizer], dict],
    evaluate: Callable[[], dict],
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    tokenizer=None,
) -> dict:
    """Run `train_step(step, optimizer) -> metrics` for steps [start, max_steps) with the LR
    schedule, JSONL metrics, evaluation, atomic checkpoints and resume. Returns the last
    evaluation (with `train_seconds`). `module` holds every trained parameter."""
    out_dir = Path(out_dir)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(
            f"{out_dir} already has checkpoints: pass --resume to continue, or pick another "
            "--output-dir"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    module.train()
    if ckpt is not None:
        if isinstance(module, GPT):
            module.load_state_dict(load_model(ckpt, device=cfg.device).state_dict())
        else:
            load_module_state(ckpt, module)
    optimizer = configure_optimizer(module, cfg)
    start, elapsed_before = 0, 0.0
    if ckpt is not None:
        state = load_training_state(ckpt, optimizer)
        start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    log = MetricsLog(out_dir / "metrics.jsonl", start if ckpt is not None else None)
    t0 = time.perf_counter()
    if start == 0:
        log.write({"step": 0, **evaluate()})
    last_eval: dict = {}
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    )
    for step in bar:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        module.train()
        record = {"step": step + 1, "lr": lr, **train_step(step, optimizer)}
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_eval = evaluate()
            record.update(last_eval)
        if done % cfg.log_every == 0 or done == cfg.max_steps or last_eval.keys() & record.keys():
            record["elapsed_s"] = round(elapsed_before + time.perf_counter() - t0, 3)
            log.write(record)
            shown = {k: v for k, v in record.items() if k not in ("step", "lr", "elapsed_s")}
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(shown.items())[:4]})
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            elapsed = elapsed_before + time.perf_counter() - t0
            save_training_checkpoint(
                out_dir,
                done,
                module,
                optimizer,
                {"elapsed_s": elapsed},
                tokenizer,
                keep=cfg.keep_checkpoints,
            )
    bar.close()
    module.eval()
    if not last_eval:  # resumed at the end: nothing ran
        last_eval = evaluate()
    return {**last_eval, "train_seconds": round(elapsed_before + time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# answering and the key-term figure


@torch.inference_mode()
def answer(
    model: GPT,
    tokenizer,
    question: str | list[dict],
    max_new_tokens: int = 60,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str:
    """The model's reply to a user question (greedy by default), stopping at <|end|>."""
    ids = prompt_ids(tokenizer, question)
    new = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        stop_ids=stop_ids(tokenizer),
    )
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def key_term_accuracy(model: GPT, tokenizer, rows: list[dict]) -> dict:
    """Share of greedy answers that contain a key term of the reference answer's concept.
    `rows` are bundled SFT rows (with "concept"); the last user turn is the question."""
    from core.tutor_data import contains_key_term

    hits, samples = [], []
    for row in rows:
        reply = answer(model, tokenizer, row["messages"][:-1])
        hits.append(contains_key_term(reply, row["concept"]))
        if len(samples) < 5:
            question = row["messages"][-2]["content"]
            samples.append({"question": question, "answer": reply, "ok": hits[-1]})
    return {
        "key_term_accuracy": sum(hits) / len(rows),
        "prompts": len(rows),
        "hits": hits,  # one bool per row, to compare two models question by question
        "samples": samples,
    }


def bundled_rows(name: str) -> list[dict]:
    """Rows of a bundled JSONL file in core/data (with their extra "concept" field)."""
    path = DATA_DIR / name
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# the stage


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


@torch.no_grad()
def sft_eval_loss(model: GPT, examples, pad_id: int, batch_size: int, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, labels = pad_batch(examples[i : i + batch_size], pad_id)
        logits = model(ids.to(device))
        total += F.cross_entropy(
            logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += (labels != IGNORE).sum().item()
    return total / max(count, 1)


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

    def train_step(step: int, optimizer) -> dict:
        batch = [train[i] for i in sample_indices(len(train), cfg.batch_size, cfg.seed, step)]
        ids, labels = pad_batch(batch, pad)
        logits = model(ids.to(cfg.device))
        loss = F.cross_entropy(
            logits.flatten(0, 1), labels.to(cfg.device).flatten(), ignore_index=IGNORE
        )
        grad_norm = optimizer_step(model, optimizer, loss, cfg.grad_clip)
        return {"loss": loss.item(), "grad_norm": grad_norm}

    def evaluate() -> dict:
        loss = sft_eval_loss(model, evals, pad, cfg.eval_batch_size, cfg.device)
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
