"""Checkpoints are Hugging Face folders: `config.json` of a `LlamaForCausalLM`, `model.safetensors`
and the tokenizer files. transformers loads ours, and we load any Llama-family folder it saved.

Weights are read only from safetensors (no pickle, so a downloaded checkpoint cannot run code).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.model import GPT, GPTConfig, rotary_tables

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
# Shipped models by name, most-trained first: "tutor" means the furthest stage that is shipped.
SHIPPED_MODELS = ("tutor-rlhf", "tutor-sft", "tutor-base")
SUPPORTED_MODEL_TYPES = ("llama",)
_ROPE_OK = (None, "default")


class ModelLoadError(ValueError):
    """A model folder that is missing, malformed or not of the Llama family."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name ("tutor", "tutor-base", ...) or a folder -> the folder."""
    name = str(name_or_path)
    if name == "tutor":
        for candidate in SHIPPED_MODELS:
            if (PRETRAINED_DIR / candidate / "config.json").is_file():
                return PRETRAINED_DIR / candidate
        raise ModelLoadError(f"no shipped tutor model found in {PRETRAINED_DIR} (run `make model`)")
    if name in SHIPPED_MODELS:
        path = PRETRAINED_DIR / name
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"shipped model {name!r} is not in {PRETRAINED_DIR}")
        return path
    path = Path(name).expanduser()
    if not path.is_dir():
        known = ", ".join(("tutor", *SHIPPED_MODELS))
        raise ModelLoadError(f"{name}: not a model folder or a shipped model name ({known})")
    return path


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """Map a transformers Llama `config.json` onto our GPTConfig, refusing what we don't implement."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not Llama-family "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _ROPE_OK:
        raise ModelLoadError(f"{source}: rope scaling {rope_type!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    def token_id(key):
        v = hf.get(key)
        return v[0] if isinstance(v, list) else v

    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"{source}: missing key {e.args[0]!r}") from None


def config_to_hf(config: GPTConfig) -> dict:
    """Our config as a transformers `LlamaConfig` dict (validated by transformers itself)."""
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    d = hf.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    return d


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = "pytorch_model.bin" if (folder / "pytorch_model.bin").exists() else "nothing"
        raise ModelLoadError(
            f"{folder}: no model.safetensors (found {found}); only safetensors weights are loaded"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    return tensors


def load_model(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> GPT:
    """Load our GPT from a Hugging Face Llama folder or a shipped model name ("tutor-base")."""
    folder = resolve_model_path(name_or_path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    config = config_from_hf(hf, str(config_file))
    with torch.device("meta"):
        model = GPT(config)
    state = _read_safetensors(folder)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {
        k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: weights do not match the config "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers were created on the meta device: compute the rotary tables for real.
    cos, sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    model.name_or_path = str(folder)
    return model.to(device).eval()


def atomic_directory(path: Path):
    """Context manager: write into a temp folder beside `path`, then swap it into place so a
    crash never leaves a half-written checkpoint under the final name."""
    return _AtomicDir(Path(path))


class _AtomicDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_model(
    model: GPT, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None
) -> Path:
    """Save as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.
    Written to a temp folder and renamed into place, so a crash never leaves half a model."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model_files(model, tmp, tokenizer, dtype)
    return path


def write_model_files(model: GPT, folder: Path, tokenizer=None, dtype: torch.dtype | None = None):
    """config.json + model.safetensors (+ generation config and tokenizer) into `folder`."""
    state = {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            continue  # transformers re-ties it from embed_tokens
        v = v.detach().to("cpu")
        state[k] = (v.to(dtype) if dtype is not None else v).contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    hf = config_to_hf(model.config)
    hf["dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": model.config.eos_token_id,
        "pad_token_id": model.config.pad_token_id,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
