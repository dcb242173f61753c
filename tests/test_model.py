"""Our GPT is the same function as transformers' LlamaForCausalLM, and its KV cache changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from core import GPT, GPTConfig, ModelLoadError, load_model, save_model
from core.lm.engines import prepare
from core.lm.engines.fast import cast_weights
from core.lm.generate import PromptTooLongError, generate, stream_steps
from core.lm.sampling import SamplingParams

CONFIGS = [
    # (hidden, heads, kv_heads, layers, tied, head_dim, bias)
    (64, 4, 4, 2, True, None, False),  # plain multi-head attention
    (64, 4, 2, 2, False, None, False),  # GQA, untied
    (96, 6, 1, 3, True, None, False),  # multi-query attention
    (64, 4, 2, 2, True, 32, True),  # head_dim != hidden/heads, biases (Qwen-like)
]


def random_gpt(hidden, heads, kv, layers, tied, head_dim=None, bias=False, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=101,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = GPT(cfg)
    # Large random weights (and non-trivial norm gains) so any wiring mistake shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model.eval()


@pytest.mark.parametrize("spec", CONFIGS)
def test_logits_match_transformers_llama(tmp_path, spec):
    ours = random_gpt(*spec)
    save_model(ours, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(reference, LlamaForCausalLM)
    ids = torch.randint(0, 101, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        reloaded = load_model(tmp_path)(ids)
        direct = ours(ids)
    with torch.inference_mode():  # the fast layers (core.lm.engines.fast)
        fast = prepare(ours)(ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert (direct - expected).abs().max().item() <= 1e-4
    assert (fast - expected).abs().max().item() <= 1e-4
    assert (reloaded - expected).abs().max().item() <= 1e-4


def test_loads_folder_saved_by_transformers(tmp_path):
    cfg = LlamaConfig(
        vocab_size=77,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    reference = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.3)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 77, (2, 20))
    with torch.no_grad():
        diff = (ours(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert ours.num_parameters() == reference.num_parameters()


def test_kv_cache_gives_same_logits_as_full_pass():
    model = random_gpt(64, 4, 2, 2, True)
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2)
        pieces = [model(ids[:, :10], cache=cache), model(ids[:, 10:11], cache=cache)]
        pieces.append(model(ids[:, 11:25], cache=cache))  # a chunk after a cache: offset mask
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(25, 30)]
    assert cache.length == 30
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)


def test_fast_inference_follows_weight_updates_and_copies_no_weight():
    model = prepare(random_gpt(64, 4, 2, 2, False, bias=True))
    ids = torch.randint(0, 101, (2, 12))
    keys = set(model.state_dict())
    with torch.inference_mode():
        before = model(ids)
    assert set(model.state_dict()) == keys
    for module in model.modules():  # nothing cached beside the weights
        assert not any(isinstance(v, torch.Tensor | tuple) for v in vars(module).values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # an in-place update of every weight
    model(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.bias.add_(1.0)  # and one more by hand
        plain = model(ids)
    with torch.inference_mode():
        after = model(ids)
    assert (after - before).abs().max() > 0.1  # the update shows ...
    assert torch.allclose(after, plain, atol=1e-5)  # ... and the fast path equals the plain one


@pytest.mark.parametrize("threads", [2, 3])
def test_one_row_products_split_across_threads_match_f_linear(threads):
    """Decoding's one-row products run as one bmm over a slice of the rows per thread (the
    slices are views); with 3 threads 1024 rows do not split evenly and F.linear runs instead."""
    from core.lm.engines.fast import SPLIT_MIN_WEIGHTS, FastLinear

    layer = FastLinear(SPLIT_MIN_WEIGHTS // 1024, 1024, bias=True)
    x = torch.randn(1, 1, layer.in_features)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            fast = layer(x)
            profile_ops = _ops_run(lambda: layer(x))
    finally:
        torch.set_num_threads(old)
    assert fast.shape == (1, 1, 1024)
    assert torch.allclose(fast, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
    assert ("aten::bmm" in profile_ops) == (threads == 2)


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {event.name for event in prof.events()}


def test_cast_weights_stores_linear_weights_in_float16_and_keeps_activations():
    model = random_gpt(64, 4, 2, 2, True, seed=3)
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        exact = model(ids)
    prepare(model, "fp16")
    assert model.lm_head.weight.dtype == torch.float16  # tied: the embedding with it
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    assert model.model.norm.weight.dtype == torch.float32
    with torch.inference_mode():
        cache = model.new_cache(1, 10)
        assert cache.keys[0].dtype == torch.float32
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(10)], 1)
        whole = model(ids)
    assert steps.dtype == whole.dtype == torch.float32
    # Rounded (logits span ~10), not broken, whether a product takes one row (decoding: the
    # input rounded to float16) or several (prefill: the weight widened to fp32).
    assert 0 < (whole - exact).abs().max() < 0.1 and 0 < (steps - exact).abs().max() < 0.1


def test_greedy_generation_same_with_and_without_cache():
    model = random_gpt(64, 4, 2, 2, False, seed=5)
    prompt = [1, 2, 3, 4, 5]
    with_cache = generate(model, prompt, sampling=SamplingParams(max_tokens=40, temperature=0.0))
    without = generate(
        model, prompt, use_cache=False, sampling=SamplingParams(max_tokens=40, temperature=0.0)
    )
    assert len(with_cache) == 40
    assert with_cache == without
    assert len(set(with_cache)) > 1  # a degenerate model repeating one token would prove little


def test_sampled_generation_same_with_and_without_cache():
    model = random_gpt(64, 4, 2, 2, True, seed=6)
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=11, max_tokens=30)
    assert generate(model, [7, 8], sampling) == generate(model, [7, 8], sampling, use_cache=False)


def test_generation_stops_at_context_and_stop_ids():
    model = random_gpt(64, 4, 2, 2, True)
    out = generate(model, list(range(60)), sampling=SamplingParams(max_tokens=50, temperature=0.0))
    assert len(out) == 4  # 60 prompt tokens + 4 new = the 64-token context
    first = generate(model, [1, 2], sampling=SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert (
        generate(
            model, [1, 2], stop_ids=[first], sampling=SamplingParams(max_tokens=5, temperature=0.0)
        )
        == []
    )
    with pytest.raises(PromptTooLongError, match="context is 64 tokens"):
        generate(model, list(range(64)), sampling=SamplingParams(max_tokens=1))


def test_parameter_and_flop_counts():
    model = random_gpt(64, 4, 2, 2, True)
    c = model.config
    per_layer = (
        c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
        + 3 * c.hidden_size * c.intermediate_size
        + 2 * c.hidden_size
    )
    expected = c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
    assert model.num_parameters() == expected
    fwd = model.flops_per_token(seq_len=64, training=False)
    dense = expected - c.hidden_size * (2 * c.num_hidden_layers + 1)  # norms are not matmuls
    assert fwd == pytest.approx(2 * dense + 4 * c.num_hidden_layers * c.hidden_size * 64, rel=0.01)
    assert model.flops_per_token(64, training=True) == 3 * fwd


def test_context_overflow_is_a_clear_error():
    model = random_gpt(64, 4, 2, 1, True)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_non_llama_folder_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not Llama-family"):
        load_model(tmp_path)


def test_pickle_weights_are_never_loaded(tmp_path):
    model = random_gpt(64, 4, 2, 1, True)
    save_model(model, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_model(tmp_path)


def test_missing_folder_and_mismatched_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(tmp_path / "nope")
    save_model(random_gpt(64, 4, 2, 1, True), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weights do not match"):
        load_model(tmp_path)


def test_save_is_atomic_and_overwrites(tmp_path):
    a, b = random_gpt(64, 4, 2, 1, True, seed=1), random_gpt(64, 4, 2, 1, True, seed=2)
    save_model(a, tmp_path / "m")
    save_model(b, tmp_path / "m")
    ids = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "m")(ids), b(ids), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left behind


def test_stream_steps_report_the_chosen_token_and_alternatives():
    model = random_gpt(64, 4, 2, 2, True, seed=8)
    steps = list(
        stream_steps(
            model, [3, 4, 5], top_n=4, sampling=SamplingParams(max_tokens=10, temperature=0.0)
        )
    )
    assert [s.token_id for s in steps] == generate(
        model, [3, 4, 5], sampling=SamplingParams(max_tokens=10, temperature=0)
    )
    for s in steps:
        assert s.top_ids[0] == s.token_id  # greedy picks the most likely token
        assert s.probability == pytest.approx(s.top_probabilities[0])
        assert s.top_probabilities == sorted(s.top_probabilities, reverse=True)
        assert len(s.top_ids) == 4 and 0 < sum(s.top_probabilities) <= 1 + 1e-6


def test_the_training_forward_traces_as_one_graph_for_torch_compile():
    """`--set compile=true` (pre-training) compiles the model: the training forward must trace
    as one graph, with no break, also with the fast layers installed (a run that decodes a sample
    installs them; their inference checks must stay out of the trace's way)."""
    model = random_gpt(64, 4, 2, 2, True, seed=1).train()
    ids = torch.randint(0, 101, (2, 12))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    explained = torch._dynamo.explain(prepare(model))(ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_cast_weights_refuses_a_dtype_that_is_not_floating_point():
    model = random_gpt(64, 4, 2, 2, True, seed=2)
    with pytest.raises(ValueError, match=r"torch\.int8 is not a floating-point dtype"):
        cast_weights(model, torch.int8)
    assert model.lm_head.weight.dtype == torch.float32  # nothing changed
