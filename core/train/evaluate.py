"""How good is a model? Held-out loss (`mean_loss`), the tutor's key-term accuracy on held-out
questions, and, for the bundled corpus, where we know the exact next-word distribution of every
prefix, KL(true || model) instead of a guess from the loss.
"""

from __future__ import annotations

import math

import torch

from core.content import corpus as corpus_lib
from core.content.tutor_data import contains_key_term
from core.lm.chat_format import IGNORE, encode_prompt
from core.lm.generate import answer
from core.lm.model import GPT
from core.train.losses import lm_loss


@torch.no_grad()
def mean_loss(model: GPT, batches, device: str = "cpu") -> float:
    """Mean next-token loss per target token over (ids [B, T], targets [B, T]) batches; targets
    labelled IGNORE do not count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, targets in batches:
        targets = targets.to(device)
        total += lm_loss(model(ids.to(device)), targets, reduction="sum").item()
        count += (targets != IGNORE).sum().item()
    model.train(was_training)
    return total / max(count, 1)


def key_term_accuracy(model: GPT, tokenizer, rows: list[dict]) -> dict:
    """Share of greedy answers that contain a key term of the reference answer's concept.
    `rows` are bundled SFT rows (with "concept"); the last user turn is the question."""
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


def continuation_ids(tokenizer, prefix: str, word: str) -> list[int]:
    """Token ids that extend `prefix` by `word`, spaced the way the corpus renders it."""
    if word == corpus_lib.END_OF_TEXT:
        return [tokenizer.convert_tokens_to_ids(corpus_lib.END_OF_TEXT)]
    words = corpus_lib.split_words(prefix)
    full = corpus_lib.join_words([*words, word])
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    full_ids = tokenizer.encode(full, add_special_tokens=False)
    if full_ids[: len(prefix_ids)] == prefix_ids:
        return full_ids[len(prefix_ids) :]
    # A merge across the boundary (rare with a whitespace pre-tokenizer): encode the tail alone.
    return tokenizer.encode(full[len(prefix) :], add_special_tokens=False)


@torch.no_grad()
def word_probabilities(model: GPT, tokenizer, prefix: str, words: list[str]) -> dict[str, float]:
    """The model's probability of each candidate next word: the product of its tokens'
    probabilities (chain rule), so words split into several tokens are scored correctly."""
    candidates = {word: continuation_ids(tokenizer, prefix, word) for word in words}
    # A prefix longer than the context keeps its most recent tokens, as generation would.
    room = model.config.max_position_embeddings - max(len(ids) for ids in candidates.values()) + 1
    base = encode_prompt(tokenizer, prefix, chat=False)[-room:]  # a document after BOS
    device = model.model.embed_tokens.weight.device
    logp_next = torch.log_softmax(model(torch.tensor([base], device=device))[0, -1].float(), -1)
    result = {}
    for word, ids in candidates.items():
        logp = logp_next[ids[0]].item()
        if len(ids) > 1:
            seq = torch.tensor([base + ids[:-1]], device=device)
            logps = torch.log_softmax(model(seq)[0, len(base) - 1 :].float(), -1)
            logp = sum(logps[i, t].item() for i, t in enumerate(ids))
        result[word] = math.exp(logp)
    return result


def prefix_kl(model: GPT, tokenizer, prefix: str) -> float:
    """KL(true || model) in nats for the next word after one prefix."""
    truth = corpus_lib.next_word_distribution(prefix)
    model_p = word_probabilities(model, tokenizer, prefix, list(truth))
    return sum(p * (math.log(p) - math.log(max(model_p[w], 1e-30))) for w, p in truth.items())


def next_word_kl(model: GPT, tokenizer, prefixes: list[str]) -> float:
    """Mean KL(true || model) over prefixes of held-out documents."""
    was_training = model.training
    model.eval()
    kls = [prefix_kl(model, tokenizer, p) for p in prefixes]
    model.train(was_training)
    return sum(kls) / len(kls)
