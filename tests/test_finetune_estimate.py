"""The estimator's counts against transformers and peft, and its activation figure against the
tensors autograd really keeps."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from finetune.estimate import (
    DEFAULT_TARGET_MODULES,
    MODEL_SHAPES,
    activation_elements_per_token,
    count_parameters,
    estimate_memory,
    lora_parameter_count,
)

PUBLISHED = {  # total parameters of the released checkpoints
    "SmolLM2-135M": 134_515_008,
    "Llama-2-7B": 6_738_415_616,
    "Llama-3-8B": 8_030_261_248,
    "Llama-2-70B": 68_976_648_192,
}


def meta_model(shape: dict):
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_parameter_count_matches_transformers(name):
    model = meta_model(MODEL_SHAPES[name])
    assert count_parameters(MODEL_SHAPES[name]) == sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert count_parameters(MODEL_SHAPES[name]) == PUBLISHED[name]


def test_tutor_base_shape_is_read_from_the_shipped_model():
    from core import load_model

    assert count_parameters(MODEL_SHAPES["tutor-base"]) == load_model("tutor-base").num_parameters()


@pytest.mark.parametrize(
    ("name", "rank", "targets"),
    [
        ("Llama-2-7B", 8, None),
        ("Llama-2-7B", 16, ["q_proj", "v_proj"]),
        ("SmolLM2-135M", 4, ["k_proj", "down_proj"]),
        ("tutor-base", 8, None),
    ],
)
def test_lora_count_matches_peft(name, rank, targets):
    model = meta_model(MODEL_SHAPES[name])
    lora = LoraConfig(r=rank, target_modules=targets or list(DEFAULT_TARGET_MODULES))
    trainable, _ = get_peft_model(model, lora).get_nb_trainable_parameters()
    assert lora_parameter_count(MODEL_SHAPES[name], rank, targets) == trainable


def test_llama_2_7b_lora_rank_8_is_the_familiar_figure():
    # The number every QLoRA tutorial prints for Llama-2-7B with all linear layers at r=8.
    assert lora_parameter_count(MODEL_SHAPES["Llama-2-7B"], 8) == 19_988_480


def test_memory_table_is_consistent():
    shape = MODEL_SHAPES["Llama-2-7B"]
    est = estimate_memory(shape, method="qlora", rank=8, batch_size=1, seq_len=512)
    assert set(est) >= {"fp32", "bf16", "int8", "nf4", "trainable_parameters"}
    for precision in ("fp32", "bf16", "int8", "nf4"):
        row = est[precision]
        assert row["total"] == sum(
            row[k] for k in ("weights", "gradients", "optimizer", "activations")
        )
        assert row["optimizer"] == 8 * est["trainable_parameters"]  # AdamW, two fp32 states
    # weights shrink with the precision: 7B in fp32 is ~27 GB, in NF4 ~4 GB
    weights = [est[p]["weights"] for p in ("fp32", "bf16", "int8", "nf4")]
    assert weights == sorted(weights, reverse=True)
    assert 26e9 < weights[0] < 28e9 and 3.5e9 < weights[3] < 4.5e9
    full = estimate_memory(shape, method="full")
    assert full["int8"] is None and full["nf4"] is None  # quantized weights are not trainable
    assert full["bf16"]["optimizer"] == 8 * count_parameters(shape)
    with pytest.raises(ValueError, match="unknown target module 'c_attn'"):
        lora_parameter_count(shape, 8, ["c_attn"])
    with pytest.raises(ValueError, match="missing key 'vocab_size'"):
        count_parameters({k: v for k, v in shape.items() if k != "vocab_size"})


@pytest.mark.parametrize("method", ["lora", "full"])
def test_activation_estimate_matches_saved_tensors(method):
    """Count the bytes autograd saves for backward in one forward pass of a real (small) Llama,
    and compare with the estimate."""
    shape = {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 256,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=list(DEFAULT_TARGET_MODULES)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch, seq = 2, 64
    ids = torch.randint(0, shape["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    measured = sum(saved.values())
    tokens = batch * seq
    fp32 = 4 * tokens * (activation_elements_per_token(shape, method) + shape["vocab_size"])
    estimated = estimate_memory(shape, method=method, batch_size=batch, seq_len=seq)["fp32"]
    assert estimated["activations"] == fp32
    assert 0.8 < fp32 / measured < 1.2, (fp32, measured)
