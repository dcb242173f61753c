"""finetune.quantization: bitsandbytes int8 / NF4 / FP4 round trips on the CPU, byte counts, the memory
arithmetic behind QLoRA's figures, and the tutor loaded through BitsAndBytesConfig."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core import load_model
from core.lm.loader import resolve_model_path
from core.lm.tokenizer import load_tokenizer
from finetune.quantization import (
    PRECISIONS,
    bits_per_parameter,
    constant_bits_per_parameter,
    load_hf_model,
    next_token_probabilities,
    quantization_error,
    quantize_weight,
    stored_weight_bytes,
    weight_matrices,
    weight_memory_bytes,
)

# The 16 NF4 levels as published with QLoRA (bitsandbytes' table), and FP4's (1 sign, 2 exponent,
# 1 mantissa bit, bias 2, normalised by its largest value 12): written out here, independently.
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
FP4_MAGNITUDES = [0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]


@pytest.fixture(scope="module")
def tutor():
    return load_model("tutor-base")


@pytest.fixture(scope="module")
def gate(tutor):
    return weight_matrices(tutor)["model.layers.0.mlp.gate_proj.weight"].float()


def _gaussian(rows=256, cols=384, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_weight_matrices_are_the_linear_layers_transformers_quantizes(tutor):
    matrices = weight_matrices(tutor)
    config = tutor.config
    assert len(matrices) == 7 * config.num_hidden_layers  # q k v o gate up down per layer
    assert not any("embed" in n or "lm_head" in n for n in matrices)
    modules = dict(tutor.named_modules())
    for name, weight in matrices.items():
        assert isinstance(modules[name.removesuffix(".weight")], nn.Linear)
        assert weight.dim() == 2


@pytest.mark.parametrize(("scheme", "levels"), [("nf4", NF4_LEVELS), ("fp4", None)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_4bit_values_lie_on_the_16_levels_times_the_block_absmax(gate, scheme, levels, blocksize):
    if levels is None:
        levels = sorted({s * m / 12 for m in FP4_MAGNITUDES for s in (1, -1)})
    levels = torch.tensor(levels)
    q = quantize_weight(gate, scheme, blocksize=blocksize)
    blocks = gate.reshape(-1, blocksize)
    # Without double quantization the scale is exactly the block's absolute maximum.
    torch.testing.assert_close(q.scales, blocks.abs().amax(dim=1), rtol=0, atol=0)
    normalised = q.dequantized.reshape(-1, blocksize) / q.scales[:, None]
    distance_to_grid = (normalised[..., None] - levels).abs().min(dim=-1).values
    assert distance_to_grid.max() < 1e-6
    # The stored code indexes the level, and it is a nearest level to the normalised weight.
    torch.testing.assert_close(
        q.levels[q.codes].reshape(-1, blocksize), normalised, atol=1e-6, rtol=0
    )
    x = blocks / q.scales[:, None]
    chosen = (x - normalised).abs()
    best = (x[..., None] - levels).abs().min(dim=-1).values
    assert (chosen <= best + 1e-6).all()


def test_int8_matches_absmax_rounding_and_its_error_bound(gate):
    q = quantize_weight(gate, "int8")
    row_absmax = gate.abs().amax(dim=1)
    torch.testing.assert_close(q.scales, row_absmax, rtol=0, atol=0)
    reference = torch.round(gate * (127 / row_absmax[:, None]))
    assert torch.equal(q.codes.to(torch.float32), reference)
    assert q.codes.abs().max() == 127
    # Rounding to a grid of step absmax/127 is off by at most half a step.
    bound = (row_absmax / 127 / 2)[:, None]
    assert ((q.dequantized - gate).abs() <= bound * (1 + 1e-5) + 1e-9).all()


def test_storage_bytes_count_codes_and_scales(gate):
    n = gate.numel()
    rows = gate.shape[0]
    assert quantize_weight(gate, "int8").storage_bytes == n + 4 * rows
    assert quantize_weight(gate, "nf4").storage_bytes == n // 2 + 4 * n // 64
    blocks = n // 64
    double = quantize_weight(gate, "nf4", double_quant=True)
    assert double.storage_bytes == n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    assert abs(double.bits_per_parameter - bits_per_parameter("nf4", 64, True)) < 0.01
    # Double-quantized scales are close to, not equal to, the block absmax.
    exact = gate.reshape(-1, 64).abs().amax(dim=1)
    assert 0 < (double.scales - exact).abs().max() < 0.01 * exact.max()


def test_nf4_beats_fp4_and_int8_beats_both_on_bell_shaped_weights(gate):
    for weight in (gate, _gaussian()):
        errors = {}
        for scheme in ("int8", "nf4", "fp4"):
            errors[scheme] = quantization_error(weight, quantize_weight(weight, scheme).dequantized)
        assert errors["int8"].relative < errors["nf4"].relative < errors["fp4"].relative
        assert errors["int8"].mean_abs < errors["nf4"].mean_abs < errors["fp4"].mean_abs


def test_quantization_error_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    q = torch.tensor([[1.5, -2.0], [0.5, -0.5]])
    err = quantization_error(w, q)
    assert err.max_abs == 0.5
    assert err.mean_abs == 0.25
    assert err.relative == pytest.approx(math.sqrt(0.5) / math.sqrt(5.25))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(3), "nf4"), "2-D"),
        ((torch.zeros(4, 64), "int4"), "unknown quantization scheme"),
        ((torch.zeros(4, 64, dtype=torch.int32), "nf4"), "floating-point"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        quantize_weight(*args)


def test_bad_blocksize_is_a_clear_error(gate):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_weight(gate, "nf4", blocksize=100)


def test_memory_arithmetic_reproduces_the_published_figures():
    assert weight_memory_bytes(70e9, "fp16") == 140e9  # 70B parameters x 2 bytes
    assert weight_memory_bytes(70e9, "int8") == 70e9
    assert weight_memory_bytes(70e9, "nf4") == pytest.approx(70e9 * 4.5 / 8)
    # QLoRA: fp32 scale per 64 weights = 0.5 bits; double quantization 8/64 + 32/(64*256) = 0.127
    assert constant_bits_per_parameter(64) == 0.5
    assert constant_bits_per_parameter(64, double_quant=True) == pytest.approx(0.127, abs=5e-4)
    saving = constant_bits_per_parameter(64) - constant_bits_per_parameter(64, True)
    assert saving == pytest.approx(0.373, abs=5e-4)  # "0.37 bits per parameter"
    saved_gb = (weight_memory_bytes(65e9, "nf4") - weight_memory_bytes(65e9, "nf4", 64, True)) / 1e9
    assert saved_gb == pytest.approx(3.0, abs=0.05)  # "approximately 3 GB for a 65B model"
    with pytest.raises(ValueError, match="unknown dtype"):
        bits_per_parameter("fp8")
    with pytest.raises(ValueError, match=">= 0"):
        weight_memory_bytes(-1, "fp16")


@pytest.fixture(scope="module")
def models_by_precision():
    return {p: load_hf_model("tutor-base", p) for p in PRECISIONS}


def test_bitsandbytes_config_quantizes_every_linear_layer_on_cpu(models_by_precision):
    import bitsandbytes as bnb

    expected = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit}
    for precision, layer_type in expected.items():
        layers = models_by_precision[precision].model.layers
        assert all(isinstance(layer.mlp.down_proj, layer_type) for layer in layers)
        assert all(isinstance(layer.self_attn.q_proj, layer_type) for layer in layers)


def test_stored_bytes_at_each_precision(models_by_precision, tutor):
    total = sum(p.numel() for p in tutor.parameters())
    linear = sum(w.numel() for w in weight_matrices(tutor).values())
    rows = sum(w.shape[0] for w in weight_matrices(tutor).values())
    rest = total - linear  # embedding (= output head) and norms stay fp32
    assert stored_weight_bytes(models_by_precision["fp32"]) == 4 * total
    assert stored_weight_bytes(models_by_precision["int8"]) == 4 * rest + linear + 4 * rows
    for precision in ("nf4", "fp4"):
        expected = 4 * rest + linear // 2 + 4 * (linear // 64)
        assert stored_weight_bytes(models_by_precision[precision]) == expected


def test_quantized_tutors_predict_almost_the_same_next_token(models_by_precision, tutor):
    folder = resolve_model_path("tutor-base")
    tokenizer = load_tokenizer(folder)
    ids = [
        tokenizer.bos_token_id,
        *tokenizer.encode("The cat sat on the", add_special_tokens=False),
    ]
    probs = {p: next_token_probabilities(m, ids) for p, m in models_by_precision.items()}
    # Reference: our own GPT on the same weights gives the fp32 distribution.
    with torch.no_grad():
        ours = torch.softmax(tutor(torch.tensor([ids]))[0, -1], dim=-1)
    torch.testing.assert_close(probs["fp32"], ours, atol=1e-5, rtol=1e-4)
    for precision, p in probs.items():
        assert p.sum().item() == pytest.approx(1.0, abs=1e-4)
        assert p.argmax() == ours.argmax()
        tv = 0.5 * (p - ours).abs().sum().item()
        assert tv < 0.1, precision
    # 8-bit stays closer to fp32 than 4-bit does.
    tv = {p: 0.5 * (probs[p] - ours).abs().sum().item() for p in ("int8", "nf4", "fp4")}
    assert tv["int8"] < tv["nf4"]
    with pytest.raises(ValueError, match="empty"):
        next_token_probabilities(models_by_precision["fp32"], [])
    with pytest.raises(ValueError, match="unknown precision"):
        load_hf_model("tutor-base", "int4")
