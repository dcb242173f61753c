"""Trying a fine-tuned model: load a transformers base with its adapter, the one way everywhere
(`genai-lab generate`, `merge`, `chat` and the dashboard all come here).

An adapter folder written by `genai-lab finetune` knows its base model, how it was quantized when
trained (a QLoRA adapter runs on the same 4-bit base it was trained on) and the chat template it
was trained with. Generation itself is core's one decoding loop (core.generate).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.chat_format import encode_prompt, ensure_chat_template, stop_ids
from core.generate import generate, stream_text, stream_tokens
from core.models import ADAPTER_META, ModelSpec, ModelSpecError, resolve
from core.models import read_adapter_meta as read_meta
from finetune.modeling import load_base_model, load_tokenizer, pick_device

__all__ = ["ADAPTER_META", "load_for_generation", "load_spec", "read_adapter_meta"]


def read_adapter_meta(adapter: str | Path) -> dict:
    """The adapter's base model and training method; refuses folders without safetensors
    weights (peft would fall back to a pickle)."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}: no adapter_model.safetensors (only safetensors weights are loaded)"
        )
    return read_meta(folder)


def load_spec(spec: ModelSpec, device: str = "auto"):
    """(model, tokenizer) of a resolved spec: a transformers model, with its adapter if any.
    core.models.load calls this for everything our GPT does not run (entry point
    `genai_lab.loaders`)."""
    device = pick_device(device)
    if spec.adapter is None:
        tokenizer = load_tokenizer(spec.source)
        return load_base_model(spec.source, quantize=False, device=device).eval(), tokenizer
    from peft import PeftModel  # (peft imports accelerate and bitsandbytes: only when needed)

    meta = read_adapter_meta(spec.adapter)
    quantize = meta.get("method") == "qlora"
    base_model = load_base_model(
        spec.source, quantize, device, double_quant=meta.get("double_quant", True)
    )
    peft_model = PeftModel.from_pretrained(base_model, spec.adapter, is_trainable=False)
    # The adapter folder holds the tokenizer with the exact template used in training.
    has_tokenizer = (Path(spec.adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(spec.adapter if has_tokenizer else spec.source)
    ensure_chat_template(tokenizer)
    return peft_model.eval(), tokenizer


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
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    chat: bool = False,
) -> Iterator[str]:
    """Text pieces as they are generated (never half a UTF-8 character)."""
    if chat:
        ensure_chat_template(tokenizer)
    tokens = stream_tokens(
        model,
        encode_prompt(tokenizer, prompt, chat),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=stop_ids(tokenizer, model.generation_config),
    )
    yield from stream_text(tokenizer, tokens)


def complete(model, tokenizer, prompt_text: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of an already rendered prompt (for reports and checks)."""
    ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    tokens = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_ids=stop_ids(tokenizer, model.generation_config),
    )
    return tokenizer.decode(tokens, skip_special_tokens=True)
