"""The "Inside the transformer" page: its library (dashboard/lib/inside.py) against
transformers' own Llama on the shipped tutor, and the page itself through Streamlit's AppTest."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import load_model
from core.lm.loader import resolve_model_path
from core.lm.model import GPT, GPTConfig
from core.lm.tokenizer import load_tokenizer
from dashboard.lib.inside import (
    capture,
    lens_grid,
    lens_probabilities,
    logit_lens,
    measured_shapes,
    perplexity,
    private_copy,
    shape_steps,
    shape_table,
)
from dashboard.lib.next_token import fit_document_prompt

PAGE = Path(__file__).resolve().parent.parent / "dashboard" / "views" / "inside.py"
TEXT = "The cat sat on the mat. The dog sat on the rug, and the cat saw the dog."


@pytest.fixture(scope="module")
def folder():
    return resolve_model_path("tutor-base")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return fit_document_prompt(tokenizer, TEXT, max_tokens=128).ids


@pytest.fixture(scope="module")
def cap(model, ids):
    return capture(model, ids)


@pytest.fixture(scope="module")
def reference(folder, ids):
    """transformers' LlamaForCausalLM on the same folder and tokens: eager attention returns its
    probabilities; labels=input_ids makes it compute the language-modelling loss."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32, local_files_only=True
    ).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        return hf(x, labels=x, output_attentions=True)


def test_attention_probabilities_match_transformers(cap, reference, model):
    ours = torch.from_numpy(cap.attention.copy())  # [L, H, T, T]
    theirs = torch.stack([a[0] for a in reference.attentions])
    assert ours.shape == theirs.shape == (4, model.config.num_attention_heads, *ours.shape[2:])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[:-1]), atol=1e-5, rtol=0)
    T = ours.shape[-1]
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (ours[..., above] == 0).all()  # the causal mask: exactly zero, not merely small


def test_capture_leaves_the_shared_model_untouched_and_its_output_unchanged(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        before = model(x)
    capture(model, ids)
    attn = model.model.layers[0].self_attn
    assert attn.record_attention is False and attn.attention_probs is None
    assert not any(m._forward_hooks for m in model.modules())
    # Recording does not change the maths either.
    copy = private_copy(model)
    assert copy.lm_head.weight is model.lm_head.weight  # weights shared, not copied
    for layer in copy.model.layers:
        layer.self_attn.record_attention = True
    with torch.no_grad():
        assert torch.equal(copy(x), before)


def test_logit_lens_last_layer_is_the_models_own_prediction(model, tokenizer, cap, ids):
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()
    probs = lens_probabilities(model, cap.residuals[-1])
    torch.testing.assert_close(probs, logits.softmax(-1), atol=1e-5, rtol=0)
    lens = logit_lens(model, tokenizer, cap, len(ids) - 1)
    last = lens.table.iloc[-1]
    assert list(lens.table["layer"]) == ["embedding", "block 1", "block 2", "block 3", "block 4"]
    assert last["rank of final"] == 1
    assert math.isclose(last["top probability"], float(logits[-1].softmax(-1).max()), abs_tol=1e-5)
    assert (lens.table["rank of final"] >= 1).all()
    grid = lens_grid(model, tokenizer, cap, [len(ids) - 2, len(ids) - 1])
    assert len(grid) == 5 * 2
    final = grid[(grid["layer"] == "block 4") & (grid["position"] == len(ids) - 1)]
    assert final["top token"].item() == last["top token"]


def test_perplexity_is_exp_of_transformers_loss(cap, reference, ids):
    score = perplexity(cap.nll)
    assert score.num_tokens == len(ids) - 1
    assert math.isclose(score.value, math.exp(reference.loss.item()), rel_tol=1e-5)
    assert perplexity(np.array([], dtype=np.float32)) is None


def _hooked_shapes(model: GPT, ids: list[int]) -> dict[str, tuple[int, ...]]:
    """Every module's output shape (batch dropped), recorded by our own forward hooks."""
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:  # returns None: the output stays as it is
            shapes[name] = tuple(output.shape[1:])

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():  # the plain path: q_proj, k_proj, ... each run (and are hooked)
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@pytest.mark.parametrize("which", ["tutor-base", "odd config"])
def test_shapes_follow_the_config_and_match_the_forward_pass(which, model, ids):
    if which == "odd config":  # untied, head_dim set explicitly, one KV head: nothing hard-coded
        config = GPTConfig(
            vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=6, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        model, ids = GPT(config).eval(), [3, 1, 4, 1, 5, 9, 2]
    T = len(ids)
    steps = shape_steps(model.config, T)
    hooked = _hooked_shapes(model, ids)
    with_module = [s for s in steps if s.module is not None]
    assert len(with_module) >= 12
    for step in with_module:
        assert hooked[step.module] == step.shape, step
        # the same module in every block has the same shape
        last = step.module.replace(".0", f".{model.config.num_hidden_layers - 1}", 1)
        assert hooked[last] == step.shape
    c = model.config
    by_name = {s.step: s.shape for s in steps}
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    assert by_name["split q into heads"] == (H, T, D)
    assert by_name["split k, v into heads"] == (KV, T, D)
    assert math.prod(by_name["split q into heads"]) == math.prod(by_name["q projection"])
    assert math.prod(by_name["split k, v into heads"]) == math.prod(by_name["k projection"])
    cap = capture(model, ids)
    assert by_name["attention weights"] == cap.attention.shape[1:]
    table = shape_table(steps, cap)
    measured = measured_shapes(steps, cap)
    assert all(m == h for m, h in zip(measured, table["here"], strict=True) if m)
    assert table["one token's slice"].iloc[-1] == f"[{c.vocab_size}]"


# -----------------------------------------------------------------------------
# the page


def _array(data) -> np.ndarray:
    """A plotly figure's array: plotly 6 sends numpy data base64-encoded with its dtype."""
    if isinstance(data, dict):
        flat = np.frombuffer(base64.b64decode(data["bdata"]), dtype=data["dtype"])
        return flat.reshape([int(n) for n in str(data["shape"]).split(",")])
    return np.array(data, dtype=float)


def test_page_shows_the_attention_heatmap_lens_and_perplexity():
    at = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not at.exception
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heatmap = charts[0]
    assert heatmap["data"][0]["type"] == "heatmap"
    assert heatmap["layout"]["title"]["text"].startswith("Layer 1, head 1")
    z = _array(heatmap["data"][0]["z"])
    assert np.isnan(z[np.triu_indices_from(z, 1)]).all()  # the causal mask: empty upper triangle
    assert not np.isnan(z[np.tril_indices_from(z)]).any()
    assert any("causal mask" in c.value for c in at.caption)
    assert any(c["layout"]["title"]["text"].startswith("Logit lens") for c in charts)
    assert {m.label for m in at.metric} >= {"Perplexity", "Tokens scored"}

    at.slider(key="in_layer_tutor-base").set_value(4).run()
    at.selectbox(key="in_head_tutor-base").set_value(5).run()
    assert not at.exception
    title = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"]
    assert title.startswith("Layer 4, head 6")

    at.select_slider(key="in_position").set_value(2).run()
    assert not at.exception
    at.text_area(key="in_prompt").set_value("").run()  # only <|endoftext|>: nothing to score
    assert not at.exception and at.info


@pytest.mark.slow
def test_page_runs_on_the_real_model():
    at = AppTest.from_file(str(PAGE), default_timeout=300).run()
    at.radio(key="in_model").set_value("smollm2-135m-instruct").run()
    assert not at.exception
    assert at.slider(key="in_layer_smollm2-135m-instruct").max == 30
    here = at.dataframe[0].value.set_index("step")["here"]
    assert here["split q into heads"].startswith("[9, ")  # 9 heads of 64
    assert here["split k, v into heads"].startswith("[3, ")  # GQA: 3 key/value heads
    assert here["lm_head"].endswith(", 49152]")
