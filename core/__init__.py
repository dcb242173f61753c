"""genai-lab core: tokenizer, a Llama-style GPT, sampling, training stages and HF interop.

Public API: `load_model(name_or_path)`, `save_model(model, path, tokenizer=None)`, `GPT`, `GPTConfig`.
"""

from core.lm.loader import ModelLoadError, load_model, save_model
from core.lm.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "ModelLoadError", "load_model", "save_model"]
