"""4-bit weights (core/lm/engines/int4.py): packing keeps a Q4_1-style weight, the lean decoding step gives
our GPT's logits and tokens, and chat uses it only for weights already on a 4-bit grid.
Speed is in `genai-lab bench` (real_model_decode, --against llama.cpp), never here; SmolLM2's
KL is bounded in tests/test_decode_fast.py."""

from __future__ import annotations

import pytest
import torch

from core.lm.engines.int4 import (
    GROUP,
    ON_GRID,
    Int4GPT,
    on_4bit_grid,
    pack_int4,
    quantize_groups,
    unpack_int4,
    unsupported,
)
from core.lm.generate import GPTStepper, decode, generate, stepper_for
from core.lm.model import GPT, GPTConfig
from core.lm.sampling import SamplingParams


def q4_1_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A weight as a Q4_1 file holds it: per group of 32, code * d + m with codes 0..15 that
    reach both ends, d and m float16 (made bfloat16-exact here, so nothing is rounded)."""
    g = torch.Generator().manual_seed(seed)
    groups = rows * cols // GROUP
    codes = torch.randint(0, 16, (groups, GROUP), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15
    d = (torch.rand(groups, 1, generator=g) * 0.01 + 1e-3).bfloat16().float()
    m = (-8 * d + torch.randn(groups, 1, generator=g) * 1e-3).bfloat16().float()
    return (codes * d + m).reshape(rows, cols)


def test_a_q4_1_weight_packs_to_its_own_values():
    w = q4_1_weight(64, 96, seed=0)
    packed = pack_int4(w)
    assert packed.packed.dtype == torch.uint8 and packed.packed.shape == (64, 48)  # 4 bits each
    assert packed.grid_error < 0.02
    stored = unpack_int4(packed, 96)  # what the kernel multiplies by
    # The kernel returns bfloat16: equal up to its rounding (8 significant bits).
    assert torch.allclose(stored, w, rtol=2**-7, atol=1e-6)


def test_weights_from_gguf_q4_1_get_their_codes_back():
    """Through the gguf package (what reads SmolLM2's file): Q4_1's own quantizer, then its
    dequantizer, then ours. Only the bfloat16 rounding of the float16 scales moves a value."""
    import gguf
    import numpy as np

    w = np.random.default_rng(4).normal(0, 0.05, (64, 128)).astype(np.float32)
    kind = gguf.GGMLQuantizationType.Q4_1
    read = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).copy())
    packed = pack_int4(read)
    assert packed.grid_error < ON_GRID / 2
    assert (unpack_int4(packed, 128) - read).abs().max() < 0.01 * read.abs().max()
    assert quantize_groups(torch.from_numpy(w))[3] > 0.4  # the same weights before Q4_1: off grid


def test_other_weights_are_rounded_to_16_levels_per_group():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    codes, scale, _, grid_error = quantize_groups(w)
    assert codes.min() == 0 and codes.max() == 15
    assert 0.4 < grid_error <= 0.55  # half a step, at most, plus the bfloat16 scales
    stored = unpack_int4(pack_int4(w), 96)
    step = scale.float().repeat_interleave(GROUP, dim=1)
    assert ((stored - w).abs() <= 0.56 * step + 1e-3).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4(torch.randn(16, 40))


def tiny_gpt(seed: int = 0, on_grid: bool = True, **overrides) -> GPT:
    """A small GQA model (4 query heads over 2 key/value heads, tied head); with on_grid, every
    linear weight is first stored the way a 4-bit file would hold it."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = GPT(GPTConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.1)
                if on_grid:
                    module.weight.copy_(unpack_int4(pack_int4(module.weight), module.in_features))
    return model


@pytest.mark.parametrize(
    "shape",
    [
        {},  # GQA, tied head
        {"tie_word_embeddings": False, "num_key_value_heads": 4},  # MHA, a head of its own
        {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "rope_theta": 500.0},
    ],
)
def test_int4_decoding_gives_our_gpts_logits_and_tokens(shape):
    model = tiny_gpt(**shape)
    packed = Int4GPT(model)
    assert packed.grid_error < ON_GRID and on_4bit_grid(model)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = model(ids)[0]  # [T, V], fp32
        scale = reference.abs().max()
        cache = packed.new_cache(12)
        prefilled = packed.forward(ids[0, :7], cache)  # a 7-token prompt, then one at a time
        steps = [packed.forward(ids[0, t : t + 1], cache) for t in range(7, 12)]
        whole = packed.forward(ids[0], packed.new_cache(12))
        chunked_cache = packed.new_cache(12)  # a second chunk after a cached one (masked)
        packed.forward(ids[0, :5], chunked_cache)
        chunked = packed.forward(ids[0, 5:], chunked_cache)
    got = torch.cat([prefilled, *steps])  # positions 6..11
    # bfloat16 activations into the 4-bit products: ~1% of the logits' range
    assert (got - reference[6:]).abs().max() < 0.02 * scale
    assert (whole[0] - reference[-1]).abs().max() < 0.02 * scale
    assert (chunked[0] - reference[-1]).abs().max() < 0.02 * scale
    assert cache.length == chunked_cache.length == 12
    with pytest.raises(ValueError, match="KV cache holds 12 positions"), torch.inference_mode():
        packed.forward(ids[0, :1], cache)


def test_int4_greedy_tokens_follow_the_fp32_model():
    model = tiny_gpt(seed=3)
    packed = Int4GPT(model)
    prompt = torch.tensor([5, 17, 33, 2])
    ours = generate(packed, prompt, sampling=SamplingParams(max_tokens=20, temperature=0.0))
    reference = generate(model, prompt, sampling=SamplingParams(max_tokens=20, temperature=0.0))
    assert len(ours) == 20
    # a random tiny model has near-ties; most greedy picks still agree
    assert sum(a == b for a, b in zip(ours, reference, strict=True)) >= 16
    stepper = stepper_for(packed, 1, 24)
    with torch.inference_mode():
        tokens = [
            int(t)
            for t, _, _ in decode(
                stepper, prompt[None], 20, sampling=SamplingParams(temperature=0.0)
            )
        ]
    assert tokens == ours  # the same loop, the same tokens
    assert isinstance(stepper_for(model, 1, 24), GPTStepper)
    with pytest.raises(ValueError, match="batch size 1"):
        stepper_for(packed, 2, 24)


def test_what_cannot_be_packed_says_why():
    assert "biases" in unsupported(tiny_gpt(attention_bias=True))
    assert "intermediate_size 100" in unsupported(tiny_gpt(on_grid=False, intermediate_size=100))
    # o_proj reads H x D = 80 inputs: not whole groups of 32
    assert "head_dim 80" in unsupported(
        tiny_gpt(on_grid=False, num_attention_heads=5, num_key_value_heads=1)
    )
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        pack_int4(torch.randn(40, 64))
    with pytest.raises(ValueError, match="4-bit decoding: layers with biases"):
        Int4GPT(tiny_gpt(mlp_bias=True))
    off_grid = tiny_gpt(on_grid=False)
    assert not on_4bit_grid(off_grid)
    assert Int4GPT(off_grid).grid_error > ON_GRID
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        Int4GPT(off_grid).new_cache(65)


def test_chat_packs_a_4bit_file_and_casts_other_weights(monkeypatch):
    """load_local_model: the tutor (trained here) gets float16 weights, a model whose weights
    sit on a 4-bit grid gets Int4GPT, and one that is on it only in its first layer (what chat
    looks at before packing) float16 again."""
    import chat.local_model as local_model

    tutor = local_model.load_local_model("tutor-base")[0]
    assert isinstance(tutor, GPT) and tutor.lm_head.weight.dtype == torch.float16
    partly = tiny_gpt()
    with torch.no_grad():
        partly.model.layers[1].mlp.up_proj.weight.normal_(0, 0.1)  # off the grid
    models = {"on-grid": tiny_gpt(), "partly": partly}
    monkeypatch.setattr(local_model, "load", lambda spec, **k: (models[spec], _Tokenizer()))
    monkeypatch.setattr(local_model, "resolve", lambda spec: spec)
    local_model.load_local_model.cache_clear()
    try:
        assert isinstance(local_model.load_local_model("on-grid")[0], Int4GPT)
        assert on_4bit_grid(partly)  # the first layer passes ...
        chosen = local_model.load_local_model("partly")[0]  # ... the whole model does not
        assert isinstance(chosen, GPT) and chosen.lm_head.weight.dtype == torch.float16
    finally:
        local_model.load_local_model.cache_clear()


class _Tokenizer:
    chat_template = "{{ messages }}"
