"""One factory for every model the chatbot can talk to, from a spec string (core.lm.loader.resolve
reads it, the one resolver):

tutor              the most-trained shipped tutor (rlhf > sft > base)
tutor-sft, ...     a shipped stage by name
PATH               a model folder: our GPT if core can load it (Llama family), else transformers
PATH+ADAPTER       a model with a peft LoRA adapter on top
ADAPTER            an adapter folder alone: its base is read from the adapter's config
owner/name         a Hugging Face Hub id already in the local cache
provider:model     a hosted model through `init_chat_model` (needs its package and API key)

Every local model is a `ChatLocalModel` (core's one decoding loop); hosted ones are LangChain's.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from langchain.chat_models import init_chat_model
from langchain.chat_models.base import _BUILTIN_PROVIDERS
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.messages.utils import count_tokens_approximately

from chat.local_model import (
    DEFAULT_MAX_TOKENS,
    ChatLocalModel,
    context_window,
)
from core.lm.loader import (
    BOT_ADAPTER,
    BOT_MODEL,
    SPEC_HELP,
    ModelSpec,
    ModelSpecError,
    is_adapter_folder,
    resolve,
)
from core.lm.sampling import SamplingParams

__all__ = [
    "CHAT_SAMPLING",
    "DEFAULT_MAX_TOKENS",
    "SPEC_HELP",
    "ChatBackend",
    "ModelSpecError",
    "SamplingParams",
    "load_chat_model",
]

# API keys of common providers, checked before the (network) client is built. Providers not
# listed here report a missing key themselves when they are created.
PROVIDER_KEYS = {
    "anthropic": "ANTHROPIC_API_KEY",
    "cohere": "COHERE_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "fireworks": "FIREWORKS_API_KEY",
    "google_genai": "GOOGLE_API_KEY",
    "groq": "GROQ_API_KEY",
    "mistralai": "MISTRAL_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "perplexity": "PPLX_API_KEY",
    "together": "TOGETHER_API_KEY",
    "xai": "XAI_API_KEY",
}
# Context window assumed for a hosted model whose profile does not say (a conservative size).
DEFAULT_HOSTED_CONTEXT = 8192


# The chat's default settings: a little randomness, answers of at most DEFAULT_MAX_TOKENS tokens
# on local models when max_tokens is None (hosted ones: the provider's limit).
CHAT_SAMPLING = SamplingParams(temperature=0.7)


@dataclass
class ChatBackend:
    """A chat model plus what the chain needs to fit a conversation into it."""

    spec: str
    kind: Literal["core", "transformers", "provider"]
    chat_model: BaseChatModel
    context_window: int  # tokens the model reads, prompt and answer together
    count_tokens: Callable[[list[BaseMessage]], int]  # prompt tokens of a message list
    max_tokens: int | None = None  # answer length limit, if one was asked for

    @property
    def token_inspector(self) -> bool:
        """Whether answers can carry each token's top alternatives (every local model)."""
        return self.kind != "provider"


def default_chat_model() -> str:
    """The best measured bot (README, `genai-lab bot eval`): SmolLM2 + notes + our adapter when
    the adapter is shipped, else the from-scratch tutor."""
    return BOT_MODEL if is_adapter_folder(BOT_ADAPTER) else "tutor"


def load_chat_model(spec: str, sampling: SamplingParams | None = None) -> ChatBackend:
    """Resolve a model spec (see the module docstring) into a ready chat model. `sampling` was
    checked when it was made (SamplingParams), so a bad setting has already failed."""
    sampling = sampling or CHAT_SAMPLING
    resolved = resolve(spec)
    if resolved.hosted:
        return _provider(resolved.spec, sampling)
    return _local(resolved, sampling)


def _local(resolved: ModelSpec, sampling: SamplingParams) -> ChatBackend:
    model = ChatLocalModel(
        model=resolved.spec,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
    )
    lm, tokenizer = model.load()  # fail now, with the folder's own error, rather than mid-chat
    return ChatBackend(
        spec=resolved.spec,
        kind="core" if resolved.core else "transformers",
        chat_model=model,
        context_window=context_window(lm, tokenizer),
        count_tokens=model.count_tokens,
        max_tokens=sampling.max_tokens,
    )


def _provider(spec: str, sampling: SamplingParams) -> ChatBackend:
    provider, model_name = spec.split(":", 1)  # resolve() checked the provider:model shape
    provider = provider.replace("-", "_").lower()
    if provider not in _BUILTIN_PROVIDERS:
        raise ModelSpecError(
            f"unknown model {spec!r}: not a folder, and {provider!r} is not a LangChain provider "
            f"(known: {', '.join(sorted(_BUILTIN_PROVIDERS))})"
        )
    if not model_name:
        raise ModelSpecError(f"{spec}: no model name after '{provider}:'")
    if sampling.seed is not None:
        raise ModelSpecError(f"{spec}: a sampling seed works with local models only")
    if sampling.repetition_penalty not in (None, 1.0):
        # providers name theirs differently (frequency/presence penalties), with other meanings
        raise ModelSpecError(f"{spec}: repetition_penalty works with local models only")
    package = _BUILTIN_PROVIDERS[provider][0].split(".")[0]
    missing = []
    if importlib.util.find_spec(package) is None:
        missing.append(
            f"the {package.replace('_', '-')} package (pip install {package.replace('_', '-')})"
        )
    key = PROVIDER_KEYS.get(provider)
    if key and not os.environ.get(key):
        missing.append(f"the {key} environment variable")
    if missing:
        raise ModelSpecError(f"{spec}: needs {' and '.join(missing)}")
    options = {"temperature": sampling.temperature}
    optional = {"top_k": sampling.top_k, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
    options.update({k: v for k, v in optional.items() if v is not None})
    try:
        model = init_chat_model(spec, **options)
    except Exception as e:  # providers raise anything from ImportError to their own errors
        text = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ModelSpecError(f"{spec}: {text}") from None
    profile = getattr(model, "profile", None) or {}
    return ChatBackend(
        spec=spec,
        kind="provider",
        chat_model=model,
        context_window=int(profile.get("max_input_tokens") or DEFAULT_HOSTED_CONTEXT),
        count_tokens=count_tokens_approximately,
        max_tokens=sampling.max_tokens,
    )
