"""Autoregressive generation: feed the prompt once, then one token at a time through the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from core.model import GPT
from core.sampling import probabilities, sample_next_token


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass(frozen=True)
class GenerationStep:
    """One generated token with what the model was choosing between (for "why this token")."""

    token_id: int
    probability: float  # of the chosen token, under the raw (temperature 1) distribution
    top_ids: list[int]  # the most likely tokens before any filter, best first
    top_probabilities: list[float]


@torch.inference_mode()
def stream_steps(
    model: GPT,
    input_ids: list[int] | torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
    top_n: int = 5,
) -> Iterator[GenerationStep]:
    """Like `stream_tokens`, but each item also carries the model's top alternatives."""
    for token_id, logits in _generate(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, use_cache
    ):
        probs = probabilities(logits.float())
        top = probs.topk(min(top_n, probs.numel()))
        yield GenerationStep(
            token_id=token_id,
            probability=float(probs[token_id]),
            top_ids=top.indices.tolist(),
            top_probabilities=top.values.tolist(),
        )


@torch.inference_mode()
def stream_tokens(
    model: GPT,
    input_ids: list[int] | torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one by one (batch of one). Stops at a stop id (not yielded), after
    `max_new_tokens`, or when the context window is full.

    Without the cache every step re-reads the whole text (quadratic work); with it, each step
    processes only the newest token. Both give the same tokens (tested).
    """
    for token_id, _ in _generate(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, use_cache
    ):
        yield token_id


@torch.inference_mode()
def _generate(
    model: GPT,
    input_ids,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop_ids: Iterable[int],
    use_cache: bool,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The decoding loop: yields (token id, the raw logits [V] it was sampled from)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    context = model.config.max_position_embeddings
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if ids.shape[1] >= context:
        raise PromptTooLongError(
            f"prompt has {ids.shape[1]} tokens; the model's context is {context} tokens "
            f"(at most {context - 1} leave room for an answer)"
        )
    device = model.model.embed_tokens.weight.device
    ids = ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = set(stop_ids)
    budget = min(max_new_tokens, context - ids.shape[1])

    cache = model.new_cache(1, context) if use_cache else None
    logits = model(ids, cache=cache)[:, -1]  # prefill: the whole prompt in one pass
    for step in range(budget):
        token = sample_next_token(logits, temperature, top_k, top_p, generator=generator)
        token_id = int(token.reshape(-1)[0])
        if token_id in stop:
            return
        yield token_id, logits[0]
        if step == budget - 1:
            return  # no forward pass for a token nobody will sample
        next_ids = token.reshape(1, 1).to(device)
        if use_cache:
            logits = model(next_ids, cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, next_ids], dim=1)
            logits = model(ids)[:, -1]


def generate(model: GPT, input_ids: list[int] | torch.Tensor, **kwargs) -> list[int]:
    """All new tokens of `stream_tokens` as a list."""
    return list(stream_tokens(model, input_ids, **kwargs))


def stream_text(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of token ids into text pieces. Decodes the whole answer so far and yields
    the new suffix, holding back while a multi-byte character is only partly generated."""
    ids: list[int] = []
    shown = ""
    for token_id in token_ids:
        ids.append(token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for its next byte
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown) :]
            shown = text
    final = tokenizer.decode(ids, skip_special_tokens=True)
    if final != shown and final.startswith(shown):
        yield final[len(shown) :]
