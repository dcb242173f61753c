"""Autoregressive generation, the one decoding loop: feed the prompt once, then one token at a
time through the model's key/value cache, sampling each token with core.lm.sampling.

Every model goes through `decode`: our GPT (its KVCache), any transformers causal LM with or
without an adapter (`past_key_values`), one sequence streamed token by token or a batch of
rollouts for PPO. What differs between them is a small *stepper* with two methods, `prefill(ids)`
and `step(tokens)`, each returning the next-token logits [B, V].

The caller picks the grad mode: streaming runs under `torch.inference_mode()` with our GPT's
fast layers (core/lm/engines, installed by `stream_logits`), PPO's rollouts under
`torch.no_grad()` (the plain path training uses, op for op).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from core.lm.chat_format import encode_prompt
from core.lm.chat_format import stop_ids as default_stop_ids
from core.lm.engines import prepare
from core.lm.engines.int4 import Int4Cache, Int4GPT
from core.lm.loader import context_length
from core.lm.model import GPT
from core.lm.sampling import SamplingParams, apply_repetition_penalty, probabilities


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass(frozen=True)
class GenerationStep:
    """One generated token with what the model was choosing between (for "why this token")."""

    token_id: int
    probability: float  # of the chosen token, under the raw (temperature 1) distribution
    top_ids: list[int]  # the most likely tokens before any filter, best first
    top_probabilities: list[float]


# ---------------------------------------------------------------------------------------------
# steppers: how one model family runs a prefill and one decoding step


class GPTStepper:
    """Our GPT with its preallocated KV cache, sized to the request (prompt + budget)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int, use_cache: bool = True):
        self.model = model
        self.cache = model.new_cache(batch_size, max_len) if use_cache else None
        self.ids: torch.Tensor | None = None  # the whole text, when running without the cache

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids = ids
        # Only the last position's scores are needed: the vocabulary head over every prompt
        # position would cost T times more (for SmolLM2 and a 300-token prompt, ~10 GFLOP).
        hidden = self.model.hidden_states(ids, cache=self.cache)  # [B, T, C]
        return self.model.head(hidden[:, -1])  # [B, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.model(tokens.view(-1, 1), cache=self.cache)[:, -1]
        # Without the cache every step re-reads the whole text (quadratic work; for teaching).
        self.ids = torch.cat([self.ids, tokens.view(-1, 1)], dim=1)
        return self.model(self.ids)[:, -1]


class Int4Stepper:
    """Our GPT with 4-bit weights (`core.lm.engines.int4`): one sequence, always through its cache."""

    def __init__(self, model: Int4GPT, batch_size: int, max_len: int) -> None:
        if batch_size != 1:
            raise ValueError("4-bit decoding runs one sequence at a time (batch size 1)")
        self.model = model
        self.cache: Int4Cache = model.new_cache(max_len)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.forward(ids[0], self.cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward(tokens.view(-1), self.cache)


class HFStepper:
    """Any transformers causal LM (a PeftModel too), through its `past_key_values`."""

    def __init__(self, model) -> None:
        self.model = model
        self.past = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        # logits_to_keep=1: the vocabulary head runs on the last position only (see GPTStepper).
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens.view(-1, 1), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()


def model_device(model) -> torch.device:
    if isinstance(model, Int4GPT):
        return torch.device("cpu")
    return next(model.parameters()).device


def model_context(model) -> int | None:
    return context_length(model.config)


def stepper_for(model, batch_size: int, max_len: int, use_cache: bool = True):
    if isinstance(model, GPT):
        return GPTStepper(model, batch_size, max_len, use_cache)
    if isinstance(model, Int4GPT):  # always cached: without it, the same tokens, only slower
        return Int4Stepper(model, batch_size, max_len)
    return HFStepper(model)


def decode(
    stepper,
    ids: torch.Tensor,
    budget: int,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    stop_ids: Iterable[int] = (),
    pad_id: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[bool]]]:
    """The decoding loop over prompts ids [B, P]. Yields per step (tokens [B], the logits [B, V]
    they were sampled from, which rows produced a stop token now). A finished row keeps being
    fed `pad_id` (batched rollouts); the loop ends when every row has stopped or after `budget`
    tokens, and never runs the model for a token nobody will sample. `sampling`'s repetition
    penalty (> 1: fewer repeats) applies to every token of the prompt and the answer so far;
    its seed is the caller's to turn into `generator` (a batch shares one)."""
    penalty = sampling.repetition_penalty
    stop = set(stop_ids)
    done = [False] * ids.shape[0]
    done_t = None
    seen = ids  # [B, P + step]: what the repetition penalty looks at
    logits = stepper.prefill(ids)  # the whole prompt in one pass
    for step in range(budget):
        if penalty not in (None, 1.0):
            logits = apply_repetition_penalty(logits, seen, penalty)
        tokens = sampling.pick(logits, generator)
        if done_t is not None and pad_id is not None:
            tokens = torch.where(done_t, torch.full_like(tokens, pad_id), tokens)
        values = tokens.tolist()
        stopped = [not d and t in stop for t, d in zip(values, done, strict=True)]
        yield tokens, logits, stopped
        if any(stopped):
            done = [d or s for d, s in zip(done, stopped, strict=True)]
            done_t = torch.tensor(done, device=tokens.device)
        if all(done) or step == budget - 1:
            return
        if penalty not in (None, 1.0):
            seen = torch.cat([seen, tokens.view(-1, 1)], dim=1)
        logits = stepper.step(tokens)


def _budget(model, prompt_len: int, max_new_tokens: int) -> int:
    context = model_context(model) or prompt_len + max_new_tokens
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if prompt_len >= context:
        raise PromptTooLongError(
            f"prompt has {prompt_len} tokens; the model's context is {context} tokens "
            f"(at most {context - 1} leave room for an answer)"
        )
    return min(max_new_tokens, context - prompt_len)


# ---------------------------------------------------------------------------------------------
# one sequence, streamed


DEFAULT_MAX_TOKENS = 64  # an answer's length when `sampling.max_tokens` is None


@torch.inference_mode()
def stream_logits(
    model,
    input_ids: list[int] | torch.Tensor,
    sampling: SamplingParams = SamplingParams(),
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(token id, the raw logits [V] it was sampled from) one by one, for a batch of one. Stops
    at a stop id (not yielded), after `sampling.max_tokens` (DEFAULT_MAX_TOKENS when None), or
    when the context window is full. `model` is our GPT, its 4-bit form or a transformers causal
    LM; the same seed gives the same tokens."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    budget = _budget(model, ids.shape[1], sampling.max_tokens or DEFAULT_MAX_TOKENS)
    device = model_device(model)
    ids = ids.to(device)
    model = prepare(model)  # our GPT: the fast layers (no-op for any other model)
    stepper = stepper_for(model, 1, ids.shape[1] + budget, use_cache)
    for tokens, logits, stopped in decode(
        stepper, ids, budget, sampling, sampling.generator(device), stop_ids
    ):
        if stopped[0]:
            return
        yield int(tokens[0]), logits[0]


def stream_tokens(
    model,
    input_ids: list[int] | torch.Tensor,
    sampling: SamplingParams = SamplingParams(),
    **kwargs,
) -> Iterator[int]:
    """New token ids one by one (see `stream_logits` for the arguments).

    Without the cache (`use_cache=False`) every step re-reads the whole text (quadratic work);
    with it, each step processes only the newest token. Both give the same tokens (tested).
    """
    for token_id, _ in stream_logits(model, input_ids, sampling, **kwargs):
        yield token_id


def stream_steps(
    model,
    input_ids: list[int] | torch.Tensor,
    sampling: SamplingParams = SamplingParams(),
    top_n: int = 5,
    **kwargs,
) -> Iterator[GenerationStep]:
    """Like `stream_tokens`, but each item also carries the model's top alternatives."""
    for token_id, logits in stream_logits(model, input_ids, sampling, **kwargs):
        probs = probabilities(logits.float())
        top = probs.topk(min(top_n, probs.numel()))
        yield GenerationStep(
            token_id=token_id,
            probability=float(probs[token_id]),
            top_ids=top.indices.tolist(),
            top_probabilities=top.values.tolist(),
        )


def generate(
    model,
    input_ids: list[int] | torch.Tensor,
    sampling: SamplingParams = SamplingParams(),
    **kwargs,
) -> list[int]:
    """All new tokens of `stream_tokens` as a list."""
    return list(stream_tokens(model, input_ids, sampling, **kwargs))


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


def answer(
    model,
    tokenizer,
    question: str | list[dict],
    sampling: SamplingParams = SamplingParams(temperature=0.0, max_tokens=60),
) -> str:
    """A chat model's reply to a question or conversation (greedy by default), stopping at the
    end of its turn."""
    ids = encode_prompt(tokenizer, question)
    new = generate(
        model, ids, sampling, stop_ids=default_stop_ids(tokenizer, generation_config(model))
    )
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def generation_config(model):
    """Where a model lists its end-of-answer ids: transformers' generation config, else the
    model config (ours, and transformers models without one)."""
    return getattr(model, "generation_config", None) or model.config


# ---------------------------------------------------------------------------------------------
# a batch of rollouts (PPO)


@torch.no_grad()
def sample_batch(
    model: GPT,
    prompts: torch.Tensor,
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    sampling: SamplingParams = SamplingParams(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample answers for a batch of prompts of equal length [B, P] through one KV cache.
    (Our GPT has no attention mask, so a batch holds prompts of one token length rather than
    padded ones.) Returns answers [B, R] (pad after the end), lengths [B] (counting the stop
    token) and ended [B] (a stop token was produced). Runs under the caller's grad mode."""
    B, P = prompts.shape
    budget = min(max_new_tokens, model.config.max_position_embeddings - P)
    if budget <= 0:
        raise ValueError(f"prompt of {P} tokens leaves no room to answer")
    device = model_device(model)
    stepper = GPTStepper(model, B, P + budget)
    ended = [False] * B
    lengths = [0] * B
    tokens = []
    for step_tokens, _, stopped in decode(
        stepper, prompts.to(device), budget, sampling, generator=generator, stop_ids=stop,
        pad_id=pad_id,
    ):  # fmt: skip
        tokens.append(step_tokens)
        lengths = [n + (not e) for n, e in zip(lengths, ended, strict=True)]
        ended = [e or s for e, s in zip(ended, stopped, strict=True)]
    return (
        torch.stack(tokens, dim=1).cpu(),
        torch.tensor(lengths),
        torch.tensor(ended),
    )
