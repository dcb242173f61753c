"""The Quantization and LoRA & QLoRA pages: their libraries (quant_view, lora_view) checked against
references (peft, finetune.estimate, torch) and the pages through Streamlit's AppTest."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import load_model
from core.lm.loader import resolve_model_path
from core.lm.sampling import entropy
from core.lm.tokenizer import load_tokenizer
from dashboard.lib.lora import (
    lora_counts,
    lora_factors,
    lora_figure,
    matrix_rank,
    memory_breakdown_table,
    model_table,
)
from dashboard.lib.quantization import (
    divergence_table,
    level_figure,
    level_usage,
    memory_table,
    normalised_weights,
    precision_table,
    scheme_table,
    value_histogram_figure,
)
from finetune.estimate import MODEL_SHAPES, count_parameters, lora_parameter_count
from finetune.quantization import SCHEMES, quantize_weight, weight_matrices

PAGES = Path(__file__).resolve().parent.parent / "dashboard" / "views"


@pytest.fixture(scope="module")
def matrices():
    return weight_matrices(load_model("tutor-base"))


@pytest.fixture(scope="module")
def q_proj(matrices):
    return matrices["model.layers.1.self_attn.q_proj.weight"].float()


# -----------------------------------------------------------------------------
# quant_view


def test_scheme_table_bytes_and_errors(q_proj):
    results = {s: quantize_weight(q_proj, s) for s in SCHEMES}
    table = scheme_table(q_proj, results).set_index("format")
    n = q_proj.numel()
    assert table.loc["fp32", "bytes"] == 4 * n and table.loc["fp16", "bytes"] == 2 * n
    # The shipped weights are fp16 values, so an fp16 copy is exact; bf16 has 3 fewer
    # mantissa bits and is not.
    assert table.loc["fp16", "max |error|"] == 0
    assert table.loc["bf16", "max |error|"] > 0
    nf4 = table.loc["NF4 (4-bit NormalFloat)"]
    assert nf4["bytes"] == results["nf4"].storage_bytes == n // 2 + 4 * (n // 64)
    assert nf4["× smaller than fp32"] == pytest.approx(32 / 4.5)
    assert table["relative error"].is_monotonic_increasing  # fp32 < ... < int8 < NF4 < FP4


def test_level_usage_counts_every_weight_and_nf4_spreads_more_evenly(matrices):
    for weight in list(matrices.values())[:7:3]:
        usage = {s: level_usage(quantize_weight(weight, s)) for s in ("nf4", "fp4")}
        for table in usage.values():
            assert table["weights"].sum() == weight.numel()
            assert table["level"].is_monotonic_increasing and len(table) == 16
        # NF4's levels are quantiles of a normal distribution: on bell-shaped weights their use
        # is closer to uniform (higher entropy) than FP4's.
        shares = {s: torch.tensor(t["weights"].tolist()) / weight.numel() for s, t in usage.items()}
        h = {s: entropy(share) for s, share in shares.items()}
        assert h["nf4"] > h["fp4"]
        assert h["nf4"] > 0.9 * math.log(16)


def test_normalised_weights_round_to_their_stored_level(q_proj):
    q = quantize_weight(q_proj, "nf4", blocksize=64)
    x = normalised_weights(q_proj, q)
    assert x.abs().max() <= 1.0 + 1e-6
    nearest = (x[:, None] - q.levels).abs().argmin(dim=1)
    agree = (q.levels[nearest] - q.levels[q.codes.reshape(-1)]).abs() < 1e-6
    assert agree.float().mean() > 0.999  # only exact ties between two levels may differ


def test_quant_figures_plot_the_data(q_proj):
    results = {s: quantize_weight(q_proj, s) for s in SCHEMES}
    hist = value_histogram_figure(q_proj, results["nf4"], bins=50)
    assert sum(hist.data[0].y) == q_proj.numel() and sum(hist.data[1].y) == q_proj.numel()
    levels = level_figure(q_proj, results)
    level_bars = [t for t in levels.data if t.name.startswith("weights rounded")]
    assert len(level_bars) == 2 and all(sum(t.y) == q_proj.numel() for t in level_bars)


def test_precision_tables(tmp_path):
    tokenizer = load_tokenizer(resolve_model_path("tutor-base"))
    p = torch.softmax(
        torch.randn(tokenizer.vocab_size + 6, generator=torch.Generator().manual_seed(0)), 0
    )
    q = torch.softmax(torch.log(p) + 0.01 * torch.randn(p.numel()), 0)
    probs = {"fp32": p, "nf4": q}
    table = precision_table(probs, tokenizer, top_n=5)
    assert table["fp32"].tolist() == sorted(table["fp32"].tolist(), reverse=True)
    div = divergence_table(probs, {"fp32": 8_000_000, "nf4": 2_000_000}).set_index("precision")
    assert div.loc["fp32", "KL(fp32 ‖ this), nats"] == 0
    assert div.loc["nf4", "KL(fp32 ‖ this), nats"] > 0
    assert div.loc["nf4", "model weights (MB)"] == 2.0


def test_memory_table_reproduces_the_textbook_figures():
    table = memory_table(70e9).set_index("format")["weights (GB)"]
    assert table["fp16 / bf16"] == 140.0
    assert table["fp32"] == 280.0 and table["int8"] == 70.0
    assert table["4-bit (NF4/FP4), fp32 scale per 64 weights"] == pytest.approx(39.375)
    assert 35 < table["4-bit NF4 + double quantization (QLoRA)"] < 36.2


# -----------------------------------------------------------------------------
# lora_view


@pytest.mark.parametrize("rank", [1, 4, 32])
def test_lora_factors_have_the_shapes_and_rank_of_lora(q_proj, rank):
    b, a = lora_factors(q_proj, rank, seed=1)
    d, k = q_proj.shape
    assert b.shape == (d, rank) and a.shape == (rank, k)
    assert matrix_rank(b @ a) == rank
    ratio = float((b @ a).std() / q_proj.std())
    assert 0.3 < ratio < 0.8  # drawn about half as large as W, for a readable picture
    counts = lora_counts(d, k, rank)
    assert counts["lora"] == b.numel() + a.numel()
    with pytest.raises(ValueError, match="rank"):
        lora_factors(q_proj, min(d, k) + 1)


def test_lora_figure_draws_w_b_a_and_their_product(q_proj):
    b, a = lora_factors(q_proj, 4)
    fig = lora_figure(q_proj, b, a)
    shapes = [tuple(map(len, (t.z, t.z[0]))) for t in fig.data]
    d, k = q_proj.shape
    assert shapes == [(d, k), (d, 4), (4, k), (d, k), (d, k)]
    torch.testing.assert_close(torch.as_tensor(fig.data[3].z), b @ a, atol=1e-6, rtol=0)


def test_model_table_uses_the_finetune_estimator_and_agrees_with_peft():
    table = model_table(8).set_index("model")
    assert list(table.index) == list(MODEL_SHAPES)
    for name, config in MODEL_SHAPES.items():
        assert table.loc[name, "parameters"] == count_parameters(config)
        assert table.loc[name, "LoRA trainable"] == lora_parameter_count(config, 8)
    # Reference: peft's own count of trainable parameters on the real tutor.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path("tutor-base"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=8, target_modules=targets))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert table.loc["tutor-base", "LoRA trainable"] == trainable
    assert table.loc["tutor-base", "parameters"] == total - trainable
    # Fewer trainable parameters with fewer targets; more with a higher rank.
    assert (
        model_table(8, ["q_proj", "v_proj"])["LoRA trainable"]
        .lt(table["LoRA trainable"].values)
        .all()
    )
    assert model_table(16)["LoRA trainable"].tolist() == [2 * x for x in table["LoRA trainable"]]


def test_memory_breakdown_orders_the_methods():
    breakdown = memory_breakdown_table(MODEL_SHAPES["Llama-2-7B"], 8).set_index("method")
    total = breakdown["total"]
    assert total["full fine-tune, bf16"] > total["LoRA, bf16 base"] > total["QLoRA, NF4 base"]
    parts = ["weights", "gradients", "optimizer", "activations"]
    assert breakdown[parts].sum(axis=1).tolist() == pytest.approx(total.tolist())
    # QLoRA's 4-bit base: well under a quarter of the 16-bit weights... plus the bf16 embeddings.
    assert (
        breakdown.loc["QLoRA, NF4 base", "weights"]
        < 0.35 * breakdown.loc["LoRA, bf16 base", "weights"]
    )


# -----------------------------------------------------------------------------
# the pages


@pytest.mark.slow
def test_quantization_page_renders_and_reacts_to_its_controls():
    at = AppTest.from_file(str(PAGES / "quantization.py"), default_timeout=120).run()
    assert not at.exception
    bytes_before = at.dataframe[0].value["bytes"].tolist()
    at.selectbox(key="q_matrix").set_value("model.layers.2.mlp.down_proj.weight").run()
    assert not at.exception
    assert at.dataframe[0].value["bytes"].tolist() != bytes_before  # a bigger matrix
    bits = at.dataframe[0].value["bits per weight"].tolist()
    at.checkbox(key="q_double").check().run()
    assert not at.exception
    assert at.dataframe[0].value["bits per weight"].tolist()[-1] < bits[-1]  # scales now 8-bit
    divergence = at.dataframe[1].value.set_index("precision")
    assert divergence["same top token"].all()
    assert (
        divergence.loc["nf4", "model weights (MB)"]
        < divergence.loc["fp32", "model weights (MB)"] / 3
    )
    at.number_input(key="q_params").set_value(7.0).run()
    assert at.dataframe[2].value.set_index("format").loc["fp16 / bf16", "weights (GB)"] == 14.0


@pytest.mark.parametrize(("text", "message"), [("", "empty"), ("x" * 5000, "Long prompt")])
def test_quantization_page_handles_bad_prompts(text, message):
    at = AppTest.from_file(str(PAGES / "quantization.py"), default_timeout=120).run()
    at.text_input(key="q_prompt").set_value(text).run()
    assert not at.exception
    assert any(message in m.value for m in (*at.info, *at.warning))


def test_lora_page_rank_slider_changes_the_counts():
    at = AppTest.from_file(str(PAGES / "lora.py"), default_timeout=60).run()
    assert not at.exception
    trainable = at.dataframe[0].value["LoRA trainable"].tolist()
    metric = next(m.value for m in at.metric if m.label == "Trainable in B and A")
    at.slider(key="lora_rank").set_value(16).run()
    assert not at.exception
    assert at.dataframe[0].value["LoRA trainable"].tolist() == [2 * t for t in trainable]
    assert next(m.value for m in at.metric if m.label == "Trainable in B and A") != metric
    at.multiselect(key="lora_targets").set_value([]).run()
    assert not at.exception
    assert any("at least one" in i.value for i in at.info)
