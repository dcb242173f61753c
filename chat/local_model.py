"""`ChatLocalModel`: a LangChain chat model over any local model: our from-scratch GPT (the tutor,
any Llama folder) or a transformers model with or without a LoRA adapter.

One path for all of them: messages are rendered by core.lm.chat_format (the tokenizer's chat
template), generated token by token by core.lm.generate (the one decoding loop, with a per-answer
seed) and streamed as `AIMessageChunk`s. An answer is at most `max_tokens` long, DEFAULT_MAX_TOKENS
when none is asked for: a model that never ends its turn stops there, not at the context's end. Each chunk can carry the model's top alternatives for its
tokens (the dashboard's "why this token" view), and the last chunk carries `usage_metadata`.
Models are loaded by core.lm.loader.load (a QLoRA adapter on the 4-bit base it was trained on).
Closing the stream stops the model: no token is computed after the reader stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import Field

from core.lm.chat_format import encode_prompt, stop_ids
from core.lm.engines import prepare
from core.lm.generate import generation_config, model_context, stream_steps, stream_text
from core.lm.loader import load, resolve
from core.lm.sampling import SamplingParams

# Per-call overrides accepted by invoke/stream (e.g. `model.invoke(msgs, temperature=0)`).
_CALL_OPTIONS = (
    "temperature",
    "top_k",
    "top_p",
    "max_tokens",
    "seed",
    "repetition_penalty",
    "top_alternatives",
)
FALLBACK_CONTEXT = 2048  # for a transformers config that names no context length
# Answer length when no max_tokens is given. Without a bound, a model stuck in a loop (SmolLM2
# repeating one sentence) runs to the end of its context: 8k tokens of the same line. 512 tokens
# (~380 words) is longer than any answer the shipped bots are trained to give.
DEFAULT_MAX_TOKENS = 512


@lru_cache(maxsize=4)
def load_local_model(spec: str, device: str = "cpu"):
    """(model, tokenizer) of a local model spec (shipped name, folder, adapter, BASE+ADAPTER),
    loaded once per process."""
    lm, tokenizer = load(resolve(spec), device=device)
    if not tokenizer.chat_template:
        raise ValueError(f"{spec}: the tokenizer has no chat template, so it cannot chat")
    # Chat only decodes, batch 1: on a CPU, weights read from a 4-bit file (SmolLM2 as shipped)
    # go back to their own 4-bit codes (~2x the float16 tokens/s); any other weights (the tutor,
    # the demo bot's merged adapter) become float16 (half the bytes per token). The choice is
    # core.lm.engines.prepare's; `genai-lab bench --only core` measures both.
    return prepare(lm, "auto"), tokenizer


def context_window(lm, tokenizer) -> int:
    """Tokens the model reads, prompt and answer together."""
    n = model_context(lm)
    if n is None:
        limit = tokenizer.model_max_length
        n = limit if limit < 1_000_000 else FALLBACK_CONTEXT
    return int(n)


def message_dicts(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> chat-template dicts (system/user/assistant, text only)."""
    out = []
    for message in messages:
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, ChatMessage) and message.role in ("system", "user", "assistant"):
            role = message.role
        else:
            raise ValueError(
                f"{type(message).__name__} is not supported: this model reads system, "
                "user and assistant messages only (no tools)"
            )
        if isinstance(message.content, list) and any(
            not isinstance(b, str) and b.get("type") != "text" for b in message.content
        ):
            raise ValueError("this model reads text only (a message has non-text content)")
        out.append({"role": role, "content": message.text})
    return out


def prompt_ids(tokenizer, messages: list[BaseMessage]) -> list[int]:
    """Token ids of the rendered conversation, ending with the assistant header."""
    if not messages:
        raise ValueError("no messages to answer")
    return encode_prompt(tokenizer, message_dicts(messages))


class _StopStrings:
    """Cuts streamed text at the first stop string. Holds back a tail that could still become a
    stop string, so nothing after a stop sequence is ever shown."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.text = ""  # everything seen so far
        self.shown = 0  # characters already released
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
            default=0,
        )
        return self._release(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.shown : end]
        self.shown = max(self.shown, end)
        return out


class ChatLocalModel(BaseChatModel):
    """Chat with a local model: `ChatLocalModel(model="tutor", temperature=0.7)`.

    `model` is a shipped name (`tutor`, `tutor-sft`, `tutor-base`), a model folder whose tokenizer
    has a chat template, an adapter folder or BASE+ADAPTER. The weights are loaded on first use
    and shared per process.
    """

    model: str = "tutor"
    """Shipped model name, folder, adapter folder or BASE+ADAPTER."""
    temperature: float = 0.7
    """0 is greedy decoding."""
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    """New tokens at most; None: DEFAULT_MAX_TOKENS (or until the model ends its turn or the
    context is full, whichever comes first)."""
    repetition_penalty: float | None = None
    """Logits of tokens already in the prompt or answer are divided by this (> 1 discourages
    repeats; CTRL's penalty, as transformers' `repetition_penalty`); None or 1.0: off."""
    stop: list[str] | None = None
    """Stop strings: the answer is cut before the first one."""
    seed: int | None = None
    """Sampling seed; the same seed gives the same answer."""
    top_alternatives: int = Field(default=0, ge=0)
    """If > 0, each chunk's `response_metadata["tokens"]` lists, per generated token, its
    probability and this many most likely alternatives."""
    streaming: bool = False
    """Use the streaming path for `invoke` too (results are identical either way)."""
    device: str = "cpu"

    @property
    def _llm_type(self) -> str:
        return "genai-lab-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="genai-lab",
            ls_model_name=kwargs.get("model", self.model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    # -------------------------------------------------------------------------------------------

    def load(self):
        """(model, tokenizer), loaded once per process and spec."""
        return load_local_model(self.model, self.device)

    @property
    def context_window(self) -> int:
        return context_window(*self.load())

    def count_tokens(self, messages: list[BaseMessage]) -> int:
        """Prompt tokens of these messages (with the assistant header a reply would add)."""
        return len(prompt_ids(self.load()[1], messages))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # One code path: the answer is the joined stream, so invoke == "".join(stream).
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS))
        if unknown:
            raise ValueError(
                f"unsupported option(s) {', '.join(unknown)} (known: {', '.join(_CALL_OPTIONS)})"
            )
        opts = {k: kwargs.get(k, getattr(self, k)) for k in _CALL_OPTIONS}
        sampling = SamplingParams(  # checked here, before the model loads
            temperature=opts["temperature"],
            top_k=opts["top_k"],
            top_p=opts["top_p"],
            repetition_penalty=opts["repetition_penalty"],
            seed=opts["seed"],
            max_tokens=opts["max_tokens"],
        )
        limit = sampling.max_tokens or DEFAULT_MAX_TOKENS
        sampling = replace(sampling, max_tokens=limit)
        lm, tokenizer = self.load()
        ids = prompt_ids(tokenizer, messages)
        context = context_window(lm, tokenizer)
        steps = stream_steps(
            lm,
            ids,
            sampling,
            top_n=max(opts["top_alternatives"], 1),
            stop_ids=stop_ids(tokenizer, generation_config(lm)),
        )
        # stream_text turns ids into safe text pieces; `pending` remembers which generated
        # steps each piece came from, so every step lands in exactly one chunk.
        pending: list = []
        generated = 0

        def token_ids():
            nonlocal generated
            for step in steps:
                pending.append(step)
                generated += 1
                yield step.token_id

        cut = _StopStrings((stop or []) + (self.stop or []))
        pieces = stream_text(tokenizer, token_ids())
        try:
            for piece in pieces:
                chunk = self._chunk(cut.feed(piece), pending, tokenizer, opts)
                pending.clear()
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
                if cut.stopped:
                    break
        finally:
            pieces.close()  # stops the model when the caller stops reading
        full = generated >= limit or len(ids) + generated >= context
        last = self._chunk(cut.flush(), pending, tokenizer, opts)
        last.message.chunk_position = "last"
        last.message.usage_metadata = {
            "input_tokens": len(ids),
            "output_tokens": generated,
            "total_tokens": len(ids) + generated,
        }
        last.message.response_metadata.update(
            model_name=self.model,
            finish_reason="length" if full and not cut.stopped else "stop",
        )
        if run_manager:
            run_manager.on_llm_new_token(last.text, chunk=last)
        yield last

    def _chunk(self, text: str, steps: list, tokenizer, opts: dict) -> ChatGenerationChunk:
        metadata: dict[str, Any] = {}
        if opts["top_alternatives"] > 0:
            metadata["tokens"] = [token_info(tokenizer, s) for s in steps]
        return ChatGenerationChunk(message=AIMessageChunk(content=text, response_metadata=metadata))


def token_info(tokenizer, step) -> dict[str, Any]:
    """One generated token and its most likely alternatives, as plain JSON data."""
    return {
        "token_id": step.token_id,
        "token": tokenizer.decode([step.token_id]),
        "probability": step.probability,
        "alternatives": [
            {"token_id": i, "token": tokenizer.decode([i]), "probability": p}
            for i, p in zip(step.top_ids, step.top_probabilities, strict=True)
        ],
    }
