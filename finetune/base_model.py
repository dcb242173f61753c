"""Loading the base model for LoRA/QLoRA: where it comes from, how it is quantized, which layers
get adapters.

A model is named by a shipped name ("tutor-base"), a local folder, or a Hugging Face Hub id (only
when online, or when it is already in the local cache). Weights are only read from safetensors,
and remote code only runs with `trust_remote_code`.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from core.lm.loader import (
    SHIPPED_NAMES,
    SUPPORTED_MODEL_TYPES,
    ModelSpecError,
    context_length,
    resolve,
)
from core.lm.loader import pick_device as pick_any_device
from core.train.config import ConfigError

__all__ = ["SHIPPED_NAMES", "ModelSpecError", "context_length"]


def resolve_model(spec: str) -> str:
    """A shipped name or folder -> the folder path; a Hub id -> the id (checked against the
    cache when offline), through core's one resolver. Adapters and hosted models are refused:
    fine-tuning starts from a plain model."""
    resolved = resolve(spec)
    if resolved.adapter is not None:
        raise ModelSpecError(
            f"{spec}: an adapter folder; fine-tune its base model, or merge it first"
        )
    if resolved.hosted:
        raise ModelSpecError(f"{spec}: a hosted model cannot be fine-tuned here")
    return resolved.source


# Weight files of a model folder that are pickles (torch.save): never loaded, since unpickling a
# downloaded file can run any code. transformers would ask for model.safetensors, or torch would
# suggest `weights_only=False`; we name the file instead.
PICKLE_MODEL_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def check_model_folder(folder: str | Path, causal_lm: bool = False, trust_remote_code=False):
    """Refuse a local model folder transformers cannot load, in one line naming the folder,
    before transformers reads it (and warns, then fails with a paragraph): its config.json's
    model_type must be one this transformers knows (with `causal_lm`, one that generates text),
    and (with `causal_lm`) its weights must be safetensors. Hub ids are left to transformers."""
    folder = Path(folder).expanduser()
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        return
    from transformers import __version__ as version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        hf = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ModelSpecError(f"{config}: expected a JSON object of config keys")
    model_type = hf.get("model_type")
    examples = "e.g. gpt2, qwen2, mistral, phi3, gemma"
    supported = (
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (our GPT) and the text-generation "
        f"model types of transformers {version} ({examples})"
    )
    if not (trust_remote_code and hf.get("auto_map")):
        if not isinstance(model_type, str) or not model_type:
            raise ModelSpecError(
                f"{folder}: config.json has no model_type, so transformers cannot tell the "
                f"architecture; {supported}"
            )
        if model_type not in CONFIG_MAPPING_NAMES:
            raise ModelSpecError(
                f"{folder}: config.json's model_type {model_type!r} is unknown to transformers; "
                f"{supported}: check config.json, or upgrade transformers"
            )
        if causal_lm and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelSpecError(
                f"{folder}: config.json's model_type {model_type!r} is not a text-generation "
                f"(causal LM) model; {supported}"
            )
    if causal_lm and not any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    ):
        pickles = [name for name in PICKLE_MODEL_FILES if (folder / name).is_file()]
        if pickles:
            raise ModelSpecError(
                f"{folder / pickles[0]}: a pickle file, which can run code when loaded; only "
                "safetensors weights are loaded (convert it where you trust it: load it and "
                "save_pretrained, which writes model.safetensors)"
            )
        raise ModelSpecError(
            f"{folder}: no model.safetensors (only safetensors weights are loaded)"
        )


def model_label(spec: str) -> str:
    """How an adapter records its base: shipped names stay names (portable between machines),
    folders become absolute paths, Hub ids stay ids."""
    return resolve(spec).label


@contextmanager
def _one_line_errors(spec: str, what: str):
    """Map transformers' multi-paragraph load errors onto one line naming the model: a missing
    or unreadable file (OSError), a corrupt or truncated safetensors file (SafetensorError), a
    config.json whose shapes do not match the weights (RuntimeError from load_state_dict)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, SafetensorError):
            first = f"corrupt or truncated safetensors file: {first}"
        raise ModelSpecError(f"{spec}: cannot load the {what} ({first})") from None
    except RuntimeError as e:
        # torch says "size mismatch"; transformers 5 prints a load report, then raises this.
        if "size mismatch" not in str(e) and "ignore_mismatched_sizes" not in str(e):
            raise
        raise ModelSpecError(
            f"{spec}: config.json does not match the weights (a tensor's shape differs from "
            "what the config says); the two files come from different models"
        ) from None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer of a model, or of a folder holding only tokenizer files (an adapter)."""
    from transformers import AutoTokenizer

    folder = Path(spec).expanduser()
    only_tokenizer = folder.is_dir() and (folder / "tokenizer_config.json").is_file()
    check_model_folder(folder if only_tokenizer else resolve_model(spec), False, trust_remote_code)
    with _one_line_errors(spec, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder) if only_tokenizer else resolve_model(spec),
            trust_remote_code=trust_remote_code,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss anyway
    return tokenizer


def load_config(spec: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    source = resolve_model(spec)
    check_model_folder(source, trust_remote_code=trust_remote_code)
    with _one_line_errors(spec, "config"):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def pick_device(requested: str = "auto") -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; an explicit choice is checked by
    core's one device check. Fine-tuning runs on CPUs and CUDA GPUs only (bitsandbytes)."""
    text = str(requested).strip().lower()
    if text not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", text):
        raise ConfigError(f"device: got {requested!r}, must be auto, cpu, cuda or cuda:N")
    return pick_any_device(text)


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that have it (the QLoRA recipe), fp16 on older GPUs, fp32 on CPU (most CPUs
    multiply bf16 slowly, and the models that fit a CPU are small)."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(dtype: torch.dtype, double_quant: bool = True):
    """4-bit NormalFloat with double quantization: the QLoRA paper's storage format."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def device_map(device: str) -> dict:
    """Where a quantized model is loaded: under DDP, each process its own GPU."""
    if device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": device}


def load_base_model(
    spec: str,
    quantize: bool,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
):
    """The frozen base: 4-bit NF4 (QLoRA) or plain weights in `dtype` (LoRA)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or compute_dtype(device)
    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if quantize:
        kwargs["quantization_config"] = quantization_config(dtype, double_quant)
        kwargs["device_map"] = device_map(device)  # bitsandbytes quantizes while placing weights
    source = resolve_model(spec)
    check_model_folder(source, causal_lm=True, trust_remote_code=trust_remote_code)
    with _one_line_errors(spec, "model"):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantize:
        keep_4bit_layers_differentiable(model)
    else:
        model.to(device)
    return model


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU repacking of 4-bit weights; returns how many layers it touched.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's `Linear4bit.forward` repacks its weight, in
    place and for good, for a fused bf16 inference kernel (`gemv_4bit`) the first time it runs in
    eval mode without gradients, e.g. during the evaluation before training. That kernel has no
    autograd formula: every later training step silently drops the gradient through the frozen
    4-bit layers (PyTorch only warns "an autograd kernel was not registered"), so the adapters
    below the last layer learn from a truncated signal. Without the repacking, bitsandbytes
    dequantizes and multiplies in the compute dtype, with a proper backward pass (and faster on
    training-sized batches). See bitsandbytes/nn/modules.py and autograd/_functions.py.
    """
    touched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer that LoRA could adapt: nn.Linear (bitsandbytes'
    4/8-bit layers subclass it) and GPT-2's Conv1D, excluding the output embedding."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if module is output or name.endswith("lm_head"):
            continue
        if isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            found[name] = (module.weight.shape[0], module.weight.shape[1])
    return found


def default_target_modules(model: nn.Module) -> list[str]:
    """All linear layers of attention and MLP, by their leaf names (q_proj, ..., down_proj for
    Llama; c_attn, c_proj, c_fc for GPT-2), in the order they first appear."""
    names: list[str] = []
    for name in linear_layers(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    if not names:
        raise ValueError("the model has no linear layers that LoRA can adapt")
    return names


def check_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    available = default_target_modules(model)
    for target in targets:
        if target not in available:
            raise ValueError(
                f"target module {target!r} is not a linear layer of this model "
                f"(available: {', '.join(available)})"
            )
    return targets
