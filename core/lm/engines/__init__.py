"""Engines: faster ways to run the same model for inference, chosen in one place (`prepare`).

    fp32  our GPT with its fast layers (engines/fast.py): the same numbers up to float rounding;
          what the decoding loop runs by default
    fp16  the same, with the weights stored in float16 (half the bytes per token; lossy within
          the bounds tests/test_decode_fast.py checks)
    int4  4-bit weights and a lean batch-1 step (engines/int4.py): for weights already on a 4-bit
          grid (SmolLM2 as its GGUF file ships), ~2x float16's tokens/s
    auto  what chat runs on a CPU: int4 where the weights sit on a 4-bit grid, else fp16

The model definition stays in core/lm/model.py; fast.py swaps two of its layers and int4.py
re-packs its weights for a step written for speed (the one other forward implementation).
`genai-lab bench --only core` measures each against transformers and llama.cpp.
"""

from __future__ import annotations

import torch

from core.lm.engines import fast
from core.lm.engines.int4 import ON_GRID, Int4GPT, on_4bit_grid
from core.lm.model import GPT

PRECISIONS = ("fp32", "fp16", "int4", "auto")


def prepare(model, precision: str = "fp32"):
    """The model to run inference with at `precision` (see the module docstring). Our GPT is
    changed in place for fp32/fp16 (layers swapped, weights cast); int4 returns a new Int4GPT.
    Any other model (transformers, an Int4GPT already) is returned as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}, must be one of {', '.join(PRECISIONS)}")
    if not isinstance(model, GPT):
        return model
    on_cpu = model.model.norm.weight.device.type == "cpu"
    if precision == "auto":
        if not on_cpu:
            return fast.install(model)
        if on_4bit_grid(model):
            packed = Int4GPT(model)
            if packed.grid_error < ON_GRID:
                return packed
        precision = "fp16"
    if precision == "int4":
        return Int4GPT(model)
    if precision == "fp16":
        return fast.cast_weights(model, torch.float16)
    return fast.install(model)
