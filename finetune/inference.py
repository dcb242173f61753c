"""Trying a fine-tuned model: load a transformers base with its adapter, the one way everywhere
(`genai-lab generate`, `merge`, `chat` and the dashboard all come here).

An adapter folder written by `genai-lab finetune` knows its base model, how it was quantized when
trained (a QLoRA adapter runs on the same 4-bit base it was trained on) and the chat template it
was trained with. Generation itself is core's one decoding loop (core.lm.generate).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.lm.chat_format import encode_prompt, ensure_chat_template, stop_ids
from core.lm.generate import generate, stream_text, stream_tokens
from core.lm.loader import (
    ADAPTER_META,
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    UnsupportedModelError,
    adapter_weights_file,
    check_adapter_weights,
    gpt_from_weights,
    resolve,
)
from core.lm.loader import read_adapter_meta as read_meta
from core.lm.sampling import SamplingParams
from finetune.base_model import load_base_model, load_tokenizer, pick_device

__all__ = ["ADAPTER_META", "load_adapter", "load_for_generation", "load_spec", "read_adapter_meta"]


def read_adapter_meta(adapter: str | Path) -> dict:
    """The adapter's base model and training method; refuses folders without safetensors
    weights (peft would fall back to a pickle). The tensors themselves are checked against the
    base model by `load_adapter`."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json)")
    adapter_weights_file(folder)  # a pickle (.bin) is refused by name, before peft sees it
    return read_meta(folder)


def layer_shapes(model) -> dict[str, tuple[int, int]]:
    """{layer name: (in_features, out_features)} of every layer LoRA can adapt (linear layers,
    bitsandbytes' 4/8-bit ones included; GPT-2's Conv1D; embeddings as (vocabulary, width)), named
    as peft names them in an adapter file (without its `base_model.model.` prefix)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            found[name] = (module.weight.shape[0], module.weight.shape[1])
        elif isinstance(module, nn.Embedding):
            found[name] = (module.num_embeddings, module.embedding_dim)
    return found


def load_adapter(peft_model_class, base_model, adapter: str | Path, **kwargs):
    """`PeftModel.from_pretrained` with its failures as one line naming the adapter's file: a
    corrupt or truncated adapter_model.safetensors, or an adapter trained on another model
    (its shapes do not fit this base)."""
    from safetensors import SafetensorError

    weights = Path(adapter) / "adapter_model.safetensors"
    # Before peft reads it: peft loads whatever fits and silently leaves out the rest, so an
    # empty file or one for other layers would give an adapter that changes nothing.
    base = getattr(base_model, "name_or_path", "") or ""
    check_adapter_weights(adapter, layer_shapes(base_model), base=str(base))
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated attributes: their notices are not the user's
            # concern (the same filter as `genai-lab finetune`'s).
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            return peft_model_class.from_pretrained(base_model, str(adapter), **kwargs)
    except SafetensorError as e:
        raise ModelSpecError(
            f"{weights}: corrupt or truncated safetensors file ({e}); copy or train it again"
        ) from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise ModelSpecError(
            f"{weights}: the adapter's shapes do not fit this base model (trained on another "
            "model?); pass the base it was trained on"
        ) from None


def load_spec(spec: ModelSpec, device: str = "auto"):
    """(model, tokenizer) of a resolved spec: a transformers model, with its adapter if any.
    core.lm.loader.load calls this for everything our GPT does not run (entry point
    `genai_lab.loaders`)."""
    device = pick_device(device)
    with _no_progress_bars():
        return _load_spec(spec, device)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No "Loading weights" bar from transformers while loading for generation: it would land
    in the middle of `generate`'s or `chat`'s output (and before an error's one line)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_spec(spec: ModelSpec, device: str):
    if spec.adapter is None:
        tokenizer = load_tokenizer(spec.source)
        return load_base_model(spec.source, quantize=False, device=device).eval(), tokenizer
    from peft import PeftModel  # (peft imports accelerate and bitsandbytes: only when needed)

    meta = read_adapter_meta(spec.adapter)
    quantize = meta.get("method") == "qlora"
    base_model = load_base_model(
        spec.source, quantize, device, double_quant=meta.get("double_quant", True)
    )
    peft_model = load_adapter(PeftModel, base_model, spec.adapter, is_trainable=False)
    if not quantize:
        # Generation only: fold B @ A into the base weights once, so each token costs one matmul
        # per layer instead of three (the demo bot on 2 CPU cores: 14.4 -> 17.4 tokens/s). A 4-bit
        # base cannot take the merge without de-quantising, so QLoRA adapters stay separate.
        # A merged Llama-family model then runs as our GPT (core's fast decoding path).
        peft_model = our_gpt(peft_model.merge_and_unload(), spec.spec)
    # The adapter folder holds the tokenizer with the exact template used in training.
    has_tokenizer = (Path(spec.adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(spec.adapter if has_tokenizer else spec.source)
    ensure_chat_template(tokenizer)
    return peft_model.eval(), tokenizer


def our_gpt(model, source: str):
    """A merged Llama-family transformers model as our GPT (same tensors, no copy), so a merged
    adapter decodes through core's fast inference path like the shipped models (the demo bot:
    `genai-lab bench --only chat`); other architectures stay as they are."""
    if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return model
    try:
        gpt = gpt_from_weights(model.config.to_dict(), model.state_dict(), source)
    except (ModelLoadError, UnsupportedModelError):
        return model  # something our GPT does not implement (rope scaling, biases, ...)
    gpt.generation_config = model.generation_config  # its stop tokens
    gpt.name_or_path = getattr(model, "name_or_path", source)
    return gpt.to(next(model.parameters()).device).eval()


def load_for_generation(model: str | None, adapter: str | None = None, device: str = "auto"):
    """(model, tokenizer) ready to generate. With an adapter, `model` may be None: the base the
    adapter was trained on is used, quantized as it was in training."""
    if adapter is None and model is None:
        raise ValueError("give a model, an adapter, or both")
    spec = resolve(model or "", adapter=adapter) if adapter else resolve(model)
    if spec.hosted:
        raise ModelSpecError(f"{spec.spec}: a hosted model, not a local one")
    return load_spec(spec, device)


def stream_generate(
    model,
    tokenizer,
    prompt: str,
    sampling: SamplingParams = SamplingParams(temperature=0.8, max_tokens=64),
    chat: bool = False,
) -> Iterator[str]:
    """Text pieces as they are generated (never half a UTF-8 character)."""
    if chat:
        ensure_chat_template(tokenizer)
    tokens = stream_tokens(
        model,
        encode_prompt(tokenizer, prompt, chat),
        sampling,
        stop_ids=stop_ids(tokenizer, model.generation_config),
    )
    yield from stream_text(tokenizer, tokens)


def complete(model, tokenizer, prompt_text: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of an already rendered prompt (for reports and checks)."""
    ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    tokens = generate(
        model,
        ids,
        stop_ids=stop_ids(tokenizer, model.generation_config),
        sampling=SamplingParams(max_tokens=max_new_tokens, temperature=0.0),
    )
    return tokenizer.decode(tokens, skip_special_tokens=True)
