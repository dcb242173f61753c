"""One factory for every model the chatbot can talk to, from a spec string:

tutor              the most-trained shipped tutor (rlhf > sft > base)
tutor-sft, ...     a shipped stage by name
PATH               a model folder: our GPT if core can load it (Llama family), else transformers
PATH+ADAPTER       a transformers base model with a peft LoRA adapter on top
ADAPTER            an adapter folder alone: its base is read from adapter_config.json
provider:model     a hosted model through `init_chat_model` (needs its package and API key)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage

from chat.hf_model import Sampling, adapter_base, is_adapter_folder, load_transformers_chat

SPEC_HELP = "tutor, tutor-sft, tutor-base, PATH, PATH+ADAPTER or provider:model"

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


class ModelSpecError(ValueError):
    """A model spec that names nothing we can load."""


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
        """Whether answers can carry each token's top alternatives (our own models only)."""
        return self.kind == "core"


def load_chat_model(spec: str, sampling: Sampling | None = None) -> ChatBackend:
    """Resolve a model spec (see the module docstring) into a ready chat model."""
    import torch

    from core.hf import SHIPPED_MODELS  # (imports torch: only when a model is really loaded)
    from core.sampling import filter_logits

    sampling = sampling or Sampling()
    # core's argument checks, so a bad setting fails here with core's message, for every backend
    filter_logits(torch.zeros(1), sampling.temperature, sampling.top_k, sampling.top_p)
    if sampling.max_tokens is not None and sampling.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {sampling.max_tokens}")
    spec = spec.strip()
    if not spec:
        raise ModelSpecError(f"empty model spec (expected {SPEC_HELP})")
    if spec == "tutor" or spec in SHIPPED_MODELS:
        return _core(spec, spec, sampling)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_adapter_folder(path):
            return _transformers(spec, adapter_base(path), str(path), sampling)
        from chat.core_model import is_core_folder

        if is_core_folder(path):
            return _core(spec, str(path), sampling)
        return _transformers(spec, str(path), None, sampling)
    if "+" in spec:
        base, adapter = spec.rsplit("+", 1)
        if not (Path(adapter).expanduser() / "adapter_config.json").is_file():
            raise ModelSpecError(f"{spec}: {adapter!r} is not a LoRA adapter folder")
        if base != "tutor" and base not in SHIPPED_MODELS and not Path(base).expanduser().is_dir():
            raise ModelSpecError(f"{spec}: base model {base!r} is not a folder or shipped name")
        return _transformers(spec, base, str(Path(adapter).expanduser()), sampling)
    if ":" in spec:
        return _provider(spec, sampling)
    raise ModelSpecError(f"unknown model {spec!r}: not a folder (expected {SPEC_HELP})")


def _core(spec: str, name: str, sampling: Sampling) -> ChatBackend:
    from chat.core_model import ChatCoreGPT

    model = ChatCoreGPT(
        model=name,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
    )
    gpt, _ = model.load()  # fail now, with the folder's own error, rather than mid-chat
    return ChatBackend(
        spec=spec,
        kind="core",
        chat_model=model,
        context_window=gpt.config.max_position_embeddings,
        count_tokens=model.count_tokens,
        max_tokens=sampling.max_tokens,
    )


def _transformers(spec: str, base: str, adapter: str | None, sampling: Sampling) -> ChatBackend:
    from chat.core_model import prompt_ids

    model, context, tokenizer = load_transformers_chat(base, adapter, sampling)
    return ChatBackend(
        spec=spec,
        kind="transformers",
        chat_model=model,
        context_window=context,
        count_tokens=lambda messages: len(prompt_ids(tokenizer, messages)),
        max_tokens=sampling.max_tokens,
    )


def _provider(spec: str, sampling: Sampling) -> ChatBackend:
    from langchain.chat_models import init_chat_model
    from langchain.chat_models.base import _BUILTIN_PROVIDERS
    from langchain_core.messages.utils import count_tokens_approximately

    provider, model_name = spec.split(":", 1)
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
