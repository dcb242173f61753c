"""Trying a fine-tuned model: load a base with its adapter, and stream text from it.

`genai-lab generate --model BASE --adapter DIR` uses these two functions. An adapter folder
written by `genai-lab finetune` knows its base model, how it was quantized when trained (a QLoRA
adapter is run on the same 4-bit base) and the chat template it was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from core.generate import PromptTooLongError, stream_text
from core.sampling import sample_next_token

ADAPTER_META = "finetune.json"


def read_adapter_meta(adapter: str | Path) -> dict:
    """The adapter's base model and training method (finetune.json, else peft's config)."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}: no adapter_model.safetensors (only safetensors weights are loaded)"
        )
    meta_file = folder / ADAPTER_META
    if meta_file.is_file():
        return json.loads(meta_file.read_text(encoding="utf-8"))
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return {"base_model": config.get("base_model_name_or_path"), "method": "lora"}


def load_for_generation(model: str | None, adapter: str | None = None, device: str = "auto"):
    """(model, tokenizer) ready to generate. With an adapter, `model` may be None: the base the
    adapter was trained on is used, quantized as it was in training."""
    from finetune.modeling import load_base_model, load_tokenizer, pick_device
    from finetune.render import ensure_chat_template

    device = pick_device(device)
    if adapter is None:
        if model is None:
            raise ValueError("give a model, an adapter, or both")
        tokenizer = load_tokenizer(model)
        return load_base_model(model, quantize=False, device=device).eval(), tokenizer
    from peft import PeftModel

    meta = read_adapter_meta(adapter)
    base = model or meta.get("base_model")
    if not base:
        raise ValueError(f"{adapter}: the adapter does not name its base model; pass --model")
    quantize = meta.get("method") == "qlora"
    base_model = load_base_model(
        base, quantize, device, double_quant=meta.get("double_quant", True)
    )
    peft_model = PeftModel.from_pretrained(base_model, str(adapter), is_trainable=False)
    # The adapter folder holds the tokenizer with the exact template used in training.
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    ensure_chat_template(tokenizer)
    return peft_model.eval(), tokenizer


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A user turn through the chat template, or plain text after BOS (as the text format
    trains)."""
    if chat:
        from finetune.render import ensure_chat_template

        ensure_chat_template(tokenizer)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


@torch.inference_mode()
def stream_token_ids(
    model,
    input_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Iterable[int] = (),
) -> Iterator[int]:
    """New token ids one at a time through the model's KV cache (any transformers causal LM,
    with or without an adapter), sampled with core.sampling."""
    from finetune.modeling import context_length

    if not input_ids:
        raise ValueError("the prompt is empty: give at least one token")
    context = context_length(model.config) or len(input_ids) + max_new_tokens
    if len(input_ids) >= context:
        raise PromptTooLongError(
            f"prompt has {len(input_ids)} tokens; the model's context is {context} tokens"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = set(stop_ids)
    out = model(input_ids=torch.tensor([input_ids], device=device), use_cache=True)
    budget = min(max_new_tokens, context - len(input_ids))
    for step in range(budget):
        token = sample_next_token(out.logits[:, -1].float(), temperature, top_k, top_p, generator)
        token_id = int(token[0])
        if token_id in stop:
            return
        yield token_id
        if step == budget - 1:
            return
        out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)


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
    from finetune.render import stop_token_ids

    ids = prompt_ids(tokenizer, prompt, chat)
    tokens = stream_token_ids(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids(tokenizer)
    )
    yield from stream_text(tokenizer, tokens)


def complete(model, tokenizer, prompt_text: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of an already rendered prompt (for reports and checks)."""
    from finetune.render import stop_token_ids

    ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    tokens = list(
        stream_token_ids(model, ids, max_new_tokens, 0.0, stop_ids=stop_token_ids(tokenizer))
    )
    return tokenizer.decode(tokens, skip_special_tokens=True)
