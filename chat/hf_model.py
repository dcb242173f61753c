"""Transformers causal LMs, with or without a LoRA adapter, as LangChain chat models:
`ChatHuggingFace` over a `HuggingFacePipeline`, prompts rendered by the tokenizer's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by every backend; temperature 0 is greedy."""

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    config = Path(adapter) / ADAPTER_CONFIG
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: cannot read it ({e})") from None
    if not base:
        raise ValueError(f"{config}: no base_model_name_or_path; use BASE+{adapter}")
    return base


def load_transformers_chat(base: str, adapter: str | None = None, sampling: Sampling = Sampling()):
    """(ChatHuggingFace, context window, tokenizer) for a local transformers model folder,
    optionally with a peft LoRA adapter on top. Nothing is downloaded.

    The base is loaded in fp32 (for the CPU), also under a QLoRA adapter: the adapter then runs
    on the unquantized weights, which differ from the 4-bit ones it was trained on by the
    quantization error only."""
    import torch
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from core.hf import resolve_model_path

    folder = resolve_model_path(base)
    # An adapter folder written by `genai-lab finetune` holds the tokenizer with the exact chat
    # template it was trained with; that one wins over the base model's.
    has_own = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            adapter if has_own else folder, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"{folder}: not a loadable transformers model ({_first_line(e)})"
        ) from None
    if not tokenizer.chat_template:
        raise ValueError(f"{folder}: the tokenizer has no chat template, so it cannot chat")
    if adapter is not None:
        from peft import PeftModelForCausalLM

        try:
            model = PeftModelForCausalLM.from_pretrained(model, str(adapter))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(
                f"{adapter}: not a LoRA adapter for {folder} ({_first_line(e)})"
            ) from None
    model.eval()

    from chat.chain import answer_budget
    from chat.core_model import stop_token_ids

    if sampling.seed is not None:
        # transformers samples from the global generator: seeded once here, so only the first
        # answer is reproducible (our own models seed every answer).
        torch.manual_seed(sampling.seed)
    greedy = sampling.temperature == 0
    generate_kwargs = {
        "do_sample": not greedy,
        "max_new_tokens": answer_budget(_context_window(model, tokenizer), sampling.max_tokens),
        "eos_token_id": stop_token_ids(tokenizer, model.generation_config),
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }
    if not greedy:
        generate_kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or 0)
        generate_kwargs["top_p"] = sampling.top_p if sampling.top_p is not None else 1.0
    # return_full_text=False: ChatHuggingFace does not strip the prompt from the output.
    pipe = pipeline(
        "text-generation",
        model=model,
        tokenizer=tokenizer,
        return_full_text=False,
        **generate_kwargs,
    )
    name = str(folder) if adapter is None else f"{folder}+{adapter}"
    llm = HuggingFacePipeline(pipeline=pipe, model_id=name)
    chat = ChatHuggingFace(llm=llm, tokenizer=tokenizer, model_id=name)
    return chat, _context_window(model, tokenizer), tokenizer


def _context_window(model, tokenizer) -> int:
    config = model.config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n is None:
        n = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 2048
    return int(n)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
