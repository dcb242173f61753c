"""genai-lab core: the language-model library (core.lm), training (core.train), the tutor's
content (core.content), benchmarks (core.bench) and the `genai-lab` command line (core.cli).

Public API: `load_model(name_or_path)`, `save_model(model, path, tokenizer=None)`, `GPT`,
`GPTConfig`. They are imported on first use, so the torch-free modules (core.atomic,
core.userdata) can be imported without loading torch (the dashboard's job runner does).
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "GPT": "core.lm.model",
    "GPTConfig": "core.lm.model",
    "ModelLoadError": "core.lm.loader",
    "load_model": "core.lm.loader",
    "save_model": "core.lm.loader",
}
__all__ = ["GPT", "GPTConfig", "ModelLoadError", "load_model", "save_model"]  # = _PUBLIC


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'core' has no attribute {name!r}")
