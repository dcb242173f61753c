"""Models by name: THE resolver for every model name, folder, adapter and hub id, and loading,
saving and shipping our GPT as Hugging Face folders.

Checkpoints are Hugging Face folders: `config.json` of a `LlamaForCausalLM`, `model.safetensors`
and the tokenizer files. transformers loads ours, and we load any Llama-family folder it saved.
Weights are read only from safetensors (no pickle, so a downloaded checkpoint cannot run code).

`resolve(spec)` is the one place that turns what a user typed (`--model`, `--adapter`, the chat
page's picker) into a `ModelSpec`: which folder or hub id, which adapter, whether our own GPT can
run it. Loading a transformers model or an adapter needs peft/bitsandbytes and lives in finetune;
core only knows where things are.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.atomic import atomic_directory, write_text_atomic
from core.lm.chat_format import stop_ids
from core.lm.embedded import EMBEDDED_MODELS, embedded_folder
from core.lm.engines import prepare
from core.lm.model import GPT, GPTConfig, rotary_tables
from core.lm.tokenizer import load_tokenizer
from core.train.config import ConfigError

PRETRAINED_DIR = Path(__file__).parent.parent / "pretrained"
# Shipped models by name, most-trained first: "tutor" means the furthest stage that is shipped.
SHIPPED_MODELS = ("tutor-rlhf", "tutor-sft", "tutor-base")
# A real instruction model, carried by a PyPI package as GGUF and converted on first use, and the
# demo bot: that model with our LoRA adapter (`make bot` rebuilds it).
FOUNDATION_MODEL = "smollm2-135m-instruct"
BOT_MODEL = "smollm2-tutor"
BOT_ADAPTER = PRETRAINED_DIR / "smollm2-tutor-lora"
SHIPPED_NAMES = ("tutor", *SHIPPED_MODELS, *EMBEDDED_MODELS)
CHAT_TUNED = ("tutor", "tutor-sft", "tutor-rlhf", *EMBEDDED_MODELS, BOT_MODEL)
SUPPORTED_MODEL_TYPES = ("llama",)
_ROPE_OK = (None, "default")
ADAPTER_CONFIG = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
ADAPTER_META = "finetune.json"  # ours: base model, method, quantization of the base
SPEC_HELP = (
    "tutor, tutor-sft, tutor-base, smollm2-135m-instruct, smollm2-tutor, a folder, an adapter "
    "folder, BASE+ADAPTER, a hub id (owner/name) or provider:model"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROVIDER = re.compile(r"^[A-Za-z][\w-]*:(?![/\\])")  # provider:model (not C:\ or a URL)


class ModelLoadError(ValueError):
    """A model folder that is missing, malformed or not of the Llama family."""


class ModelSpecError(ModelLoadError):
    """A model name that is neither shipped, a folder, an adapter, a hub id nor a provider."""


class UnsupportedModelError(ModelLoadError):
    """A well-formed model our GPT does not implement (another architecture, rope scaling,
    activation): transformers runs it instead."""


def pick_device(requested: str = "auto") -> str:
    """THE place a device string is checked (training configs, `load`, finetune): "auto" -> "cuda"
    when torch sees a GPU, else "cpu"; an explicit device must exist on this machine. Checked up
    front, so a typo or a missing GPU fails in one line before any data or model loads, instead
    of as torch's RuntimeError halfway through."""
    text = str(requested).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    cuda = re.fullmatch(r"cuda(?::(\d+))?", text)
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: got {requested!r}, but torch sees no CUDA GPU on this machine; "
                "use cpu (or auto: a GPU when there is one)"
            )
        index = int(cuda.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: got {requested!r}, but this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...)"
            )
        return text
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device: got {requested!r}, but torch sees no Apple GPU (mps)")
        return text
    raise ConfigError(f"device: got {requested!r}, must be {DEVICES}")


@dataclass(frozen=True)
class ModelSpec:
    """What a model name refers to. `source` is a folder or hub id (for a hosted model, the
    `provider:model` string); `adapter` a LoRA adapter folder on top of it."""

    spec: str  # as the user gave it
    source: str
    adapter: str | None = None
    shipped: str | None = None  # the shipped model's name ("tutor" resolves to the furthest stage)
    core: bool = False  # our GPT can run it (a Llama-family folder, no adapter)
    hosted: bool = False  # provider:model, through LangChain (chat only)

    @property
    def local(self) -> bool:
        return not self.hosted and Path(self.source).is_dir()

    @property
    def chat_tuned(self) -> bool:
        """Whether it answers questions (so prompts go through the chat template): the chat
        stages of the tutor, adapters (trained on conversations) and models whose tokenizer has
        a chat template."""
        if self.shipped is not None:
            return self.shipped in CHAT_TUNED
        if self.adapter is not None or self.hosted:
            return True
        config = Path(self.source) / "tokenizer_config.json"
        if config.is_file():
            try:
                return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
            except (OSError, ValueError):
                return False
        return (Path(self.source) / "chat_template.jinja").is_file()

    @property
    def label(self) -> str:
        """How an adapter records its base: shipped names stay names (portable between
        machines), folders become absolute paths, hub ids stay ids."""
        if self.shipped is not None:
            return self.shipped
        path = Path(self.source)
        return str(path.resolve()) if path.is_dir() else self.source


def shipped_folder(name: str) -> Path:
    """The folder of a shipped name; "tutor" is the most-trained stage that is shipped; an
    embedded model's converted folder (converted on first use)."""
    if name in EMBEDDED_MODELS:
        return embedded_folder(name)
    if name == "tutor":
        for candidate in SHIPPED_MODELS:
            if (PRETRAINED_DIR / candidate / "config.json").is_file():
                return PRETRAINED_DIR / candidate
        raise ModelSpecError(f"no shipped tutor model found in {PRETRAINED_DIR} (run `make model`)")
    path = PRETRAINED_DIR / name
    if not (path / "config.json").is_file():
        raise ModelSpecError(
            f"shipped model {name!r} is not in {PRETRAINED_DIR} (run `make model`)"
        )
    return path


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_weights_file(folder: Path) -> Path:
    """The adapter's adapter_model.safetensors, refusing a folder without one before anything
    reads it: peft would fall back to a pickle (.bin), and unpickling a downloaded file can run
    any code. Only looks at file names (see `check_adapter_weights` for the contents)."""
    weights = Path(folder) / ADAPTER_WEIGHTS
    if weights.is_file():
        return weights
    pickles = [name for name in PICKLE_WEIGHTS if (Path(folder) / name).exists()]
    if pickles:
        raise ModelSpecError(
            f"{folder}: {pickles[0]} is a pickle file, which can run code when loaded; only "
            f"{ADAPTER_WEIGHTS} adapters are loaded (re-save it with peft's save_pretrained, "
            "which writes safetensors)"
        )
    raise ModelSpecError(f"{folder}: no {ADAPTER_WEIGHTS} (only safetensors weights are loaded)")


# A LoRA tensor as peft saves it: `base_model.model.<module>.lora_A.weight` (lora_B; `.bias`
# with lora_bias; `lora_embedding_A`/`_B` on an embedding, with no `.weight`).
_LORA_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<param>weight|bias))?$"
)
_DORA_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_magnitude_vector(?:\.weight)?$"
)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _adapter_config(folder: Path) -> dict:
    config = folder / ADAPTER_CONFIG
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"{folder}: cannot read the adapter's config ({e})") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{config}: expected a JSON object of peft settings")
    return data


def _targets(config: dict, module: str) -> bool:
    """Whether `module` is one of adapter_config.json's target_modules, the way peft matches
    them: a list of names (a module's name or its last parts), or a regular expression."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear" or config.get("target_parameters"):
        return True  # nothing to check against (peft picks the layers itself)
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return True
    if not isinstance(targets, list):
        return True  # not peft's layout: peft itself will say so
    return any(module == t or module.endswith(f".{t}") for t in targets if isinstance(t, str))


def _saved_whole(config: dict, module: str) -> bool:
    """Whether `module` is a layer the adapter saves whole (modules_to_save)."""
    kept = config.get("modules_to_save") or []
    kept = kept if isinstance(kept, list) else [kept]
    parts = module.split(".")
    return any(
        isinstance(m, str) and (m in parts or module.endswith(f".{m}") or module == m) for m in kept
    )


def _rank(config: dict, module: str) -> int | None:
    """The rank adapter_config.json gives a module (rank_pattern, else r); None if unknown."""
    patterns = config.get("rank_pattern") or {}
    if not isinstance(patterns, dict):
        return None
    for pattern, r in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                return r if isinstance(r, int) else None
        except re.error:
            return None
    r = config.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _listed(config: dict) -> str:
    targets = config.get("target_modules")
    if isinstance(targets, list):
        return ", ".join(map(str, targets))
    return str(targets)


def check_adapter_weights(
    folder: str | Path, layers: dict[str, tuple[int, int]] | None = None, base: str = ""
) -> None:
    """Refuse an adapter that cannot be what it claims, before peft reads it (peft loads any
    file, silently leaving out what does not fit: an adapter that changes nothing). From the
    safetensors header only: it has tensors, each named as peft names LoRA weights, for a layer
    adapter_config.json targets, lora_A and lora_B in pairs of its rank r. With `layers` (a base
    model's {layer name: (in_features, out_features)}, see finetune.inference) each tensor must
    also fit its layer: lora_A is [r, in_features], lora_B [out_features, r]. One line naming the
    file and the first wrong tensor."""
    folder = Path(folder)
    config = _adapter_config(folder)
    weights = adapter_weights_file(folder)
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                part = f.get_slice(key)
                shapes[key] = (list(part.get_shape()), part.get_dtype())
    except SafetensorError as e:
        raise ModelSpecError(
            f"{weights}: corrupt or truncated safetensors file ({e}); copy or train it again"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{weights}: cannot read it ({e}); copy or train it again") from None
    if not shapes:
        raise ModelSpecError(
            f"{weights}: holds no tensors, so the adapter would change nothing; train it again "
            "or copy the whole adapter folder"
        )
    pairs: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for name in sorted(shapes):
        shape, dtype = shapes[name]
        lora, dora = _LORA_TENSOR.match(name), _DORA_TENSOR.match(name)
        if lora is None and dora is None:
            if "trainable_tokens_delta" in name and config.get("trainable_token_indices"):
                continue
            module = name.removeprefix("base_model.model.").rsplit(".", 1)[0]
            if _saved_whole(config, module):
                continue
            raise ModelSpecError(
                f"{weights}: tensor {name!r} is not a LoRA weight (peft names them "
                "base_model.model.<layer>.lora_A.weight and .lora_B.weight); this file is not a "
                "peft LoRA adapter: train or copy the adapter again"
            )
        module = (lora or dora).group("module")
        if not _targets(config, module):
            raise ModelSpecError(
                f"{weights}: tensor {name!r} adapts {module.rsplit('.', 1)[-1]!r}, which "
                f"{ADAPTER_CONFIG}'s target_modules ({_listed(config)}) does not list; the two "
                "files come from different adapters: copy the adapter folder again"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ModelSpecError(
                f"{weights}: tensor {name!r} is {dtype}, not floating point; train or copy the "
                "adapter again"
            )
        if lora is not None and lora.group("param") != "bias":
            if len(shape) < 2:
                raise ModelSpecError(
                    f"{weights}: tensor {name!r} has shape {shape}, a LoRA weight is a matrix; "
                    "train or copy the adapter again"
                )
            pairs.setdefault(module, {})[lora.group("kind")[-1]] = (name, shape)
    for module, pair in pairs.items():
        if len(pair) < 2:
            ((kind, (name, _)),) = pair.items()
            other = "lora_B" if kind == "A" else "lora_A"
            raise ModelSpecError(
                f"{weights}: tensor {name!r} has no {other} partner for {module!r}; the file is "
                "incomplete: train or copy the adapter again"
            )
        (a_name, a), (b_name, b) = pair["A"], pair["B"]
        r = _rank(config, module)
        if a[0] != b[1] or (r is not None and a[0] != r):
            expected = f"adapter_config.json's r={r}" if r is not None else f"{b_name!r}"
            raise ModelSpecError(
                f"{weights}: tensor {a_name!r} has shape {a} and {b_name!r} {b}: their rank "
                f"({a[0]} and {b[1]}) does not match {expected}; the two files come from "
                "different adapters: copy the adapter folder again"
            )
        if layers is None:
            continue
        on = f" ({base})" if base else ""
        if module not in layers:
            raise ModelSpecError(
                f"{weights}: tensor {a_name!r} adapts the layer {module!r}, which the base "
                f"model{on} does not have; the adapter was trained on another model: pass the "
                "base it was trained on"
            )
        fan_in, fan_out = layers[module]
        if a[1] != fan_in or b[0] != fan_out:
            name, shape, want = (
                (a_name, a, f"[{a[0]}, {fan_in}] (r, in_features)")
                if a[1] != fan_in
                else (b_name, b, f"[{fan_out}, {b[1]}] (out_features, r)")
            )
            raise ModelSpecError(
                f"{weights}: tensor {name!r} has shape {shape}, but the base model{on} has "
                f"{module!r} with in_features {fan_in} and out_features {fan_out}, which needs "
                f"{want}; the adapter was trained on another model: pass the base it was "
                "trained on"
            )


def read_adapter_meta(adapter: str | Path) -> dict:
    """An adapter folder's base model and training method: our finetune.json, else what peft's
    adapter_config.json says (a LoRA adapter from elsewhere)."""
    folder = Path(adapter)
    try:
        if (folder / ADAPTER_META).is_file():
            return json.loads((folder / ADAPTER_META).read_text(encoding="utf-8"))
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"{folder}: cannot read the adapter's config ({e})") from None
    return {"base_model": config.get("base_model_name_or_path"), "method": "lora"}


def is_core_folder(path: str | Path) -> bool:
    """Whether our GPT can load this folder (Llama family), judged from its config.json. A
    config.json that is broken (not JSON, a Llama config with a missing key or an impossible
    shape) raises ModelLoadError naming it, rather than being handed to transformers, which
    would fill the gaps with defaults (a 7B shape) and fail much later, or not at all."""
    config = Path(path) / "config.json"
    try:
        hf = json.loads(config.read_text(encoding="utf-8"))
    except OSError:
        return False
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{config}: expected a JSON object of config keys")
    try:
        config_from_hf(hf, str(config))
    except UnsupportedModelError:
        return False
    return True


def resolve(spec: str | Path, adapter: str | Path | None = None) -> ModelSpec:
    """Turn a model name into a ModelSpec (see SPEC_HELP); `adapter` puts an adapter on top.
    Nothing is loaded or downloaded; errors are one line naming what was given."""
    text = str(spec).strip() if spec is not None else ""
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if not is_adapter_folder(adapter_dir):
            raise ModelSpecError(f"{adapter}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
        check_adapter_weights(adapter_dir)  # its files, before any base model loads
        if not text:
            text = read_adapter_meta(adapter_dir).get("base_model") or ""
            if not text:
                raise ModelSpecError(
                    f"{adapter}: the adapter does not name its base model; pass --model"
                )
        base = resolve(text)
        if base.adapter is not None or base.hosted:
            raise ModelSpecError(f"{text}: an adapter needs a plain base model under it")
        return ModelSpec(str(spec or adapter), base.source, str(adapter_dir), base.shipped)
    if not text:
        raise ModelSpecError(f"empty model spec (expected {SPEC_HELP})")
    if text == BOT_MODEL:
        if not is_adapter_folder(BOT_ADAPTER):
            raise ModelSpecError(
                f"{BOT_MODEL}: its adapter is not in {BOT_ADAPTER} (run `make bot`)"
            )
        return replace(resolve(FOUNDATION_MODEL, adapter=BOT_ADAPTER), spec=text, shipped=text)
    if text in SHIPPED_NAMES:
        folder = shipped_folder(text)
        shipped = text if text in EMBEDDED_MODELS else folder.name
        return ModelSpec(text, str(folder), shipped=shipped, core=True)
    path = Path(text).expanduser()
    if path.is_dir():
        if is_adapter_folder(path):
            return replace(resolve("", adapter=path), spec=text)
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{text}: folder has no config.json (not a transformers model)")
        return ModelSpec(text, str(path), core=is_core_folder(path))
    if "+" in text:
        base, adapter_part = text.rsplit("+", 1)
        return replace(resolve(base, adapter=adapter_part), spec=text)
    if path.exists():
        raise ModelSpecError(f"{text}: a file, not a model folder (expected {SPEC_HELP})")
    if _HUB_ID.match(text):
        from huggingface_hub import is_offline_mode, try_to_load_from_cache

        if is_offline_mode() and not isinstance(try_to_load_from_cache(text, "config.json"), str):
            raise ModelSpecError(
                f"{text}: not in the local Hugging Face cache, and downloads are off "
                "(HF_HUB_OFFLINE=1); download it once online, or pass a local folder"
            )
        return ModelSpec(text, text)
    if _PROVIDER.match(text):
        return ModelSpec(text, text, hosted=True)
    raise ModelSpecError(f"unknown model {text!r}: nothing by that name (expected {SPEC_HELP})")


def load(spec: ModelSpec | str, device: str = "cpu"):
    """(model, tokenizer) ready to generate. Our GPT runs what it can (shipped tutors, Llama
    folders); anything else (other architectures, adapters, hub ids) goes to the loader another
    package registers in the `genai_lab.loaders` entry-point group (finetune's, with peft and
    bitsandbytes), so core needs neither."""
    spec = resolve(spec) if isinstance(spec, str) else spec
    if spec.hosted:
        raise ModelSpecError(f"{spec.spec}: a hosted model, not a local one")
    device = pick_device(device)
    if spec.core:
        folder = Path(spec.source)
        # Ready to generate: the fp32 engine (fast layers; training numbers unchanged).
        return prepare(load_model(folder, device=device)), load_tokenizer(folder)
    loaders = {e.name: e for e in entry_points(group="genai_lab.loaders")}
    if "transformers" not in loaders:
        raise ModelSpecError(f"{spec.spec}: loading it needs the finetune package (not installed)")
    return loaders["transformers"].load()(spec, device=device)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name or a model folder -> the folder (for code that reads files)."""
    spec = resolve(name_or_path)
    if spec.adapter is not None or not spec.local:
        raise ModelSpecError(f"{name_or_path}: expected a shipped model name or a model folder")
    return Path(spec.source)


def context_length(config) -> int | None:
    """Positions a model reads, from our GPTConfig or any transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """Map a transformers Llama `config.json` onto our GPTConfig, refusing what we don't implement."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not Llama-family "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in _ROPE_OK:
        raise UnsupportedModelError(f"{source}: rope scaling {rope_type!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
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
    except (TypeError, ValueError) as e:  # GPTConfig's checks: name the file they came from
        raise ModelLoadError(f"{source}: {e}") from None


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
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = "pytorch_model.bin" if (folder / "pytorch_model.bin").exists() else "nothing"
        raise ModelLoadError(
            f"{folder}: no model.safetensors (found {found}); only safetensors weights are loaded"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{path}: weight file not found (listed in {index.name})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise ModelLoadError(
                f"{path}: corrupt or truncated safetensors file ({e}); copy or download it again"
            ) from None
    return tensors


def load_model(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> GPT:
    """Load our GPT from a Hugging Face Llama folder or a shipped model name ("tutor-base")."""
    spec = resolve(name_or_path)
    if spec.adapter is not None or not spec.local:
        raise ModelLoadError(f"{name_or_path}: our GPT loads Llama-family model folders only")
    folder = Path(spec.source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    config_from_hf(
        hf, str(config_file)
    )  # an unsupported model is named before its weights are read
    model = gpt_from_weights(hf, _read_safetensors(folder), str(folder), dtype)
    model.name_or_path = str(folder)
    return model.to(device).eval()


def gpt_from_weights(hf: dict, state: dict, source: str, dtype: torch.dtype = torch.float32) -> GPT:
    """Our GPT from a transformers Llama config (as a dict) and its state dict, checked key by key
    and shape by shape (`source` names them in errors). The tensors are taken as they are, not
    copied: a merged adapter's model becomes ours at no memory cost (finetune.inference)."""
    config = config_from_hf(hf, f"{source}/config.json")
    with torch.device("meta"):
        model = GPT(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {
        k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: weights do not match the config "
            f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k in sorted(expected) if tuple(state[k].shape) != shapes[k]]
    if wrong:
        k = wrong[0]
        raise ModelLoadError(
            f"{source}: config.json does not match the weights ({len(wrong)} tensors differ, "
            f"e.g. {k}: config.json gives {list(shapes[k])}, model.safetensors has "
            f"{list(state[k].shape)}); the two files come from different models"
        )
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers were created on the meta device: compute the rotary tables for real.
    cos, sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model


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
    with naming_write_errors(folder / "model.safetensors"):
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    hf = config_to_hf(model.config)
    hf["dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    with naming_write_errors(folder / "config.json"):
        (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    # With its tokenizer, a chat model's folder lists the end of a turn (<|end|>) as an end too,
    # so plain transformers `generate` stops after the answer instead of running into filler.
    eos = stop_ids(tokenizer, model.config) if tokenizer is not None else model.config.eos_token_id
    gen = {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": model.config.pad_token_id,
    }
    with naming_write_errors(folder / "generation_config.json"):
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        with naming_write_errors(folder):
            tokenizer.save_pretrained(folder)


@contextmanager
def naming_write_errors(path: Path) -> Iterator[None]:
    """A failed write says which file: OSErrors get `path` as their filename, and safetensors'
    Rust errors (it reports a full disk as SafetensorError "No space left on device") become
    the OSError they stand for, so the CLI prints "no space left on device while writing PATH"."""
    try:
        yield
    except SafetensorError as e:
        text = str(e)
        code = errno.ENOSPC if "No space left" in text or "os error 28" in text else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else text, str(path)) from e
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def ship_model(final_dir: Path, name: str, report: dict) -> Path:
    """Copy a trained model into the package as fp16 (half the bytes, same answers to ~1e-3)."""
    model = load_model(final_dir)
    dest = PRETRAINED_DIR / name
    save_model(model, dest, tokenizer=load_tokenizer(final_dir), dtype=torch.float16)
    write_text_atomic(dest / "training_report.json", json.dumps(report, indent=2) + "\n")
    metrics = Path(final_dir).parent / "metrics.jsonl"
    if metrics.exists():
        shutil.copy(metrics, dest / "metrics.jsonl")
    return dest
