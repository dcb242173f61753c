"""Weight quantization with bitsandbytes, on the CPU: what 8-bit and 4-bit storage does to a model.

Three schemes, all from bitsandbytes (the library behind transformers' ``BitsAndBytesConfig``):

- ``int8``: LLM.int8()'s weight format (``load_in_8bit``): each row of W is divided by its
  absolute maximum and rounded to an integer in [-127, 127]; one fp32 scale per row.
- ``nf4``: QLoRA's 4-bit NormalFloat (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``): blocks of
  64 weights are divided by the block's absolute maximum and rounded to the nearest of 16 fixed
  levels placed at quantiles of a normal distribution; one scale per block.
- ``fp4``: the same blocks, rounded to a 4-bit float (1 sign, 2 exponent bits, 1 mantissa bit).

With double quantization (QLoRA) the per-block fp32 scales are themselves quantized to 8 bits in
blocks of 256, which cuts their cost from 32/64 = 0.5 to 8/64 + 32/(64*256) ~ 0.127 bits per weight.

Everything returns plain tensors and numbers; nothing here draws or imports the UI.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCHEMES = ("int8", "nf4", "fp4")
# Precisions the tutor can be loaded at through transformers' BitsAndBytesConfig.
PRECISIONS = ("fp32", "int8", "nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
DOUBLE_QUANT_BLOCKSIZE = 256  # bitsandbytes quantizes the 4-bit scales in blocks of 256

# Storage bits of one weight, before per-block/per-row constants.
BITS_PER_PARAMETER = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "nf4": 4, "fp4": 4}

_BNB_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """Silence two bitsandbytes log lines that repeat on every CPU call and say nothing wrong:
    8-bit matmuls cast their fp32 inputs to fp16 (by design), and an optional accelerated 4-bit
    kernel package is not installed (the built-in kernel is used)."""
    loggers = [logging.getLogger(name) for name in _BNB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _bnb():
    # Imported lazily (only this module's functions need it), and quietly: the import logs that an
    # optional accelerated CPU kernel package is missing.
    with _quiet_bitsandbytes():
        import bitsandbytes.functional as bnb_functional

    return bnb_functional


# -----------------------------------------------------------------------------
# quantize and dequantize one weight matrix


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix after a quantize -> dequantize round trip, with what was stored."""

    scheme: str  # "int8", "nf4" or "fp4"
    blocksize: int | None  # weights per scale; None for int8 (one scale per row)
    double_quant: bool
    dequantized: Tensor  # fp32, same shape as the input: what the model computes with
    codes: Tensor  # one stored code per weight: int8 values, or 4-bit level indices 0..15
    scales: Tensor  # fp32 absmax per row (int8) or per block (4-bit; after undoing double quant)
    levels: Tensor | None  # the 16 code values in [-1, 1] of a 4-bit scheme; None for int8
    # Stored codes + quantization constants (scales, offset), as bitsandbytes keeps them; the
    # formats' fixed lookup tables (16 or 256 values) are not counted.
    storage_bytes: int

    @property
    def num_parameters(self) -> int:
        return self.dequantized.numel()

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.storage_bytes / self.num_parameters


def quantize_weight(
    weight: Tensor, scheme: str, blocksize: int = 64, double_quant: bool = False
) -> QuantizedWeight:
    """Quantize a 2-D weight matrix with bitsandbytes and dequantize it again (on the CPU).

    ``blocksize`` and ``double_quant`` apply to the 4-bit schemes; int8 always uses one scale per
    row, as ``load_in_8bit`` stores weights.
    """
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})"
        )
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
    w = weight.detach().float().cpu().contiguous()
    if scheme == "int8":
        return _quantize_int8(w)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    return _quantize_4bit(w, scheme, blocksize, double_quant)


def _quantize_int8(w: Tensor) -> QuantizedWeight:
    F = _bnb()
    # threshold=0: every weight is stored in int8, as Linear8bitLt stores its weights (LLM.int8()'s
    # outlier threshold concerns activations, which are quantized at run time).
    codes, row_absmax, _ = F.int8_vectorwise_quant(w, threshold=0.0)
    dequantized = F.int8_vectorwise_dequant(codes, row_absmax).float()
    storage = codes.numel() * codes.element_size() + row_absmax.numel() * row_absmax.element_size()
    return QuantizedWeight(
        "int8", None, False, dequantized, codes, row_absmax.float(), None, storage
    )


def _quantize_4bit(w: Tensor, scheme: str, blocksize: int, double_quant: bool) -> QuantizedWeight:
    F = _bnb()
    # Blocks run over the flattened matrix either way. Quantize it flat: bitsandbytes 0.50's native
    # CPU dequantize kernel cuts blocks row by row and returns wrong values when the blocksize
    # does not divide the row length (e.g. 128 on a 192-wide matrix); flat, it is exact.
    with _quiet_bitsandbytes():
        packed, state = F.quantize_4bit(
            w.reshape(-1), blocksize=blocksize, quant_type=scheme, compress_statistics=double_quant
        )
        dequantized = F.dequantize_4bit(packed, state).float().reshape(w.shape)
    # Two codes per byte, the first in the high nibble.
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[: w.numel()].reshape(w.shape)
    storage = packed.numel() * packed.element_size()
    if state.nested:
        # 8-bit scales, plus the fp32 scale of every 256 of them and one fp32 offset.
        scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        storage += state.absmax.numel() * state.absmax.element_size()
        storage += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
    else:
        scales = state.absmax
        storage += state.absmax.numel() * state.absmax.element_size()
    levels = F.get_4bit_type(scheme, device="cpu")
    return QuantizedWeight(
        scheme, blocksize, double_quant, dequantized, codes.long(), scales.float(), levels, storage
    )


@dataclass(frozen=True)
class QuantizationError:
    """How far the dequantized weights are from the originals."""

    max_abs: float
    mean_abs: float
    relative: float  # ||W - Wq|| / ||W|| (Frobenius norms)


def quantization_error(original: Tensor, dequantized: Tensor) -> QuantizationError:
    if original.shape != dequantized.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(dequantized.shape)}")
    w, q = original.detach().double(), dequantized.detach().double()
    diff = (w - q).abs()
    norm = w.norm().item()
    return QuantizationError(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        relative=(diff.norm().item() / norm) if norm > 0 else 0.0,
    )


def weight_matrices(model: nn.Module) -> dict[str, Tensor]:
    """The weights of a model's nn.Linear layers by parameter name: the ones that transformers'
    BitsAndBytesConfig quantizes. The output head is left out, as transformers keeps it (and the
    embedding it may be tied to) unquantized."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    result = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module_name.split(".")[-1] == "lm_head":
            continue
        if id(module.weight) not in embeddings:
            result[f"{module_name}.weight"] = module.weight.detach()
    return result


# -----------------------------------------------------------------------------
# memory arithmetic


def constant_bits_per_parameter(blocksize: int = 64, double_quant: bool = False) -> float:
    """Extra bits per weight for the block scales of a 4-bit format.

    One fp32 scale per block costs 32 / blocksize bits; double quantization stores an 8-bit scale
    per block plus one fp32 per 256 blocks: 8 / blocksize + 32 / (blocksize * 256).
    (QLoRA's figures: 0.5 and 0.127 bits at blocksize 64.)
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if not double_quant:
        return 32 / blocksize
    return 8 / blocksize + 32 / (blocksize * DOUBLE_QUANT_BLOCKSIZE)


def bits_per_parameter(dtype: str, blocksize: int = 64, double_quant: bool = False) -> float:
    """Storage bits per weight for a dtype, block scales of 4-bit formats included.

    int8's per-row scale (4 bytes per row of thousands of weights) is left out: it is < 0.01 bits
    per weight for a model of any real size.
    """
    if dtype not in BITS_PER_PARAMETER:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(BITS_PER_PARAMETER)})")
    bits = float(BITS_PER_PARAMETER[dtype])
    if dtype in ("nf4", "fp4"):
        bits += constant_bits_per_parameter(blocksize, double_quant)
    return bits


def weight_memory_bytes(
    num_parameters: float, dtype: str, blocksize: int = 64, double_quant: bool = False
) -> float:
    """Bytes to hold a model's weights: parameters x bits per parameter / 8."""
    if not (num_parameters >= 0 and math.isfinite(num_parameters)):
        raise ValueError(f"the number of parameters must be >= 0, got {num_parameters}")
    return num_parameters * bits_per_parameter(dtype, blocksize, double_quant) / 8


# -----------------------------------------------------------------------------
# a whole model at reduced precision (transformers + BitsAndBytesConfig, on the CPU)


def load_hf_model(name_or_path: str = "tutor-base", precision: str = "fp32", double_quant=False):
    """Load a shipped model (or folder) with transformers at fp32, int8, nf4 or fp4.

    The quantized precisions go through ``BitsAndBytesConfig`` exactly as on a GPU: the
    ``nn.Linear`` layers become bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` with quantized
    weights; embeddings and norms stay in fp32; 4-bit layers compute in fp32.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from core.lm.loader import resolve_model_path

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    folder = resolve_model_path(name_or_path)
    kwargs: dict = {"dtype": torch.float32, "local_files_only": True}
    if precision == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif precision in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=precision,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32,
        )
    if "quantization_config" in kwargs:
        kwargs["device_map"] = "cpu"
    with _quiet_bitsandbytes():
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model.eval()


def stored_weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters as stored, the scales of bitsandbytes' layers included
    (a 4-bit weight's per-block scales, an 8-bit weight's per-row scales); buffers excluded."""
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)  # Linear4bit
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
        row_scales = getattr(param, "SCB", None)  # Linear8bitLt
        if row_scales is not None:
            total += row_scales.numel() * row_scales.element_size()
    return total


@torch.inference_mode()
def next_token_probabilities(model, input_ids: list[int]) -> Tensor:
    """The next-token distribution [vocab] (fp32) of a transformers causal LM after input_ids."""
    if not input_ids:
        raise ValueError("input_ids is empty: give at least one token")
    ids = torch.tensor([input_ids], dtype=torch.long)
    with _quiet_bitsandbytes():
        logits = model(input_ids=ids).logits[0, -1]
    return torch.softmax(logits.float(), dim=-1)
