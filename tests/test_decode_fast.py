"""The fp32 engine (core/lm/engines/fast.py: one-row products split across threads, one-op
norms) gives the plain model's numbers, and float16 weights (`engines.prepare(m, "fp16")`, what chat runs)
cost a bounded KL divergence on real text, smaller than bfloat16's.
Timings are in `genai-lab bench` (core/bench/gpt.py, `real_model_decode`), never here."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from core.lm.engines import fast as fast_layers
from core.lm.generate import decode, generate, stepper_for
from core.lm.loader import FOUNDATION_MODEL, PRETRAINED_DIR, load, load_model
from core.lm.sampling import SamplingParams


@pytest.fixture(scope="module")
def tutor():
    return load("tutor-base")


def _logits(model, ids, fast: bool) -> torch.Tensor:
    (fast_layers.install if fast else fast_layers.uninstall)(model)
    try:
        with torch.inference_mode():
            return model(ids)
    finally:
        fast_layers.install(model)


def _greedy_plain(model, ids, n: int) -> list[int]:
    """Greedy tokens from the plain model (the fast layers taken out) through the decoding loop's
    stepper, which installs nothing."""
    fast_layers.uninstall(model)
    try:
        with torch.inference_mode():
            stepper = stepper_for(model, 1, ids.shape[0] + n)
            return [
                int(t)
                for t, _, _ in decode(
                    stepper, ids[None], n, sampling=SamplingParams(temperature=0.0)
                )
            ]
    finally:
        fast_layers.install(model)


def test_fast_path_gives_the_plain_paths_logits_and_tokens(tutor):
    model, tokenizer = tutor
    ids = torch.tensor([tokenizer.encode("Lily went to the park with her dog and")])
    with torch.no_grad():
        reference = model(ids)  # the training path
    assert torch.equal(_logits(model, ids, fast=False), reference)  # off: op for op the same
    assert (_logits(model, ids, fast=True) - reference).abs().max() < 1e-4
    with torch.inference_mode():  # one token at a time through the cache, as decoding runs
        cache = model.new_cache(1, ids.shape[1])
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], 1)
    assert (steps - reference).abs().max() < 1e-4
    fast = generate(model, ids[0], sampling=SamplingParams(max_tokens=30, temperature=0.0))
    assert fast_layers.installed(model)  # the loader and the decoding loop install them
    assert _greedy_plain(model, ids[0], 30) == fast


def test_a_hooked_layer_runs_as_a_module_and_its_hook_fires(tutor):
    model, _ = tutor
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
    try:
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]))
    finally:
        hook.remove()
    assert seen == [1]


def _heldout_text_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    rows = (PRETRAINED_DIR.parent / "content" / "data" / "bot_heldout.jsonl").read_text()
    text = " ".join(json.loads(line)["question"] for line in rows.splitlines()[:40])
    ids = tokenizer.encode(text)[:n_tokens]
    assert len(ids) == n_tokens
    return torch.tensor([ids])


def _cast_kl(model, ids, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(fp32 || weights cast to dtype) and top-1 agreement of next-token dists
    (`model` keeps its fp32 weights: the cast is made on a copy). One token at a time: prefill
    widens the weights back to fp32, while decoding also rounds each product's input to dtype."""
    with torch.no_grad():
        exact = model(ids).float().log_softmax(-1)[0]  # the plain fp32 path
    cast = fast_layers.cast_weights(copy.deepcopy(model), dtype)
    with torch.inference_mode():  # token by token through the cache, as chat decodes
        cache = cast.new_cache(1, ids.shape[1])
        steps = [cast(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])]
        approx = torch.cat(steps, 1).float().log_softmax(-1)[0]
    kl = (exact.exp() * (exact - approx)).sum(-1)
    return kl, (exact.argmax(-1) == approx.argmax(-1)).float().mean()


def _int4_kl(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """`_cast_kl` for the model's 4-bit form (`core.lm.engines.int4.Int4GPT`), token by token."""
    from core.lm.engines.int4 import ON_GRID, Int4GPT

    with torch.no_grad():
        exact = model(ids).float().log_softmax(-1)[0]
    packed = Int4GPT(model)
    assert packed.grid_error < ON_GRID  # the file's codes came back
    with torch.inference_mode():
        cache = packed.new_cache(ids.shape[1])
        steps = [packed.forward(ids[0, t : t + 1], cache) for t in range(ids.shape[1])]
        approx = torch.cat(steps).log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1)
    return kl, (exact.argmax(-1) == approx.argmax(-1)).float().mean()


def test_cast_weights_cost_a_small_kl_on_held_out_text(tutor):
    """The tutor model on held-out stories it was not trained on (another seed). Measured:
    float16 KL mean ~3e-7 nats/token (max ~5e-6), bfloat16 ~2e-5 (max ~3e-4); every top-1 token
    unchanged."""
    from core.content.corpus import generate_documents

    model, tokenizer = tutor
    text = " ".join(generate_documents(8, seed=987_654))
    ids = torch.tensor([tokenizer.encode(text)[:128]])
    kl16, agree16 = _cast_kl(model, ids, torch.float16)
    klbf, agreebf = _cast_kl(model, ids, torch.bfloat16)
    assert 0 < kl16.mean() < 5e-5 and kl16.max() < 1e-3  # > 0: the weights really were cast
    assert 0 < klbf.mean() < 5e-4 and klbf.max() < 5e-3
    assert kl16.mean() < klbf.mean() / 4  # three more mantissa bits
    assert agree16 > 0.98 and agreebf > 0.95


@pytest.mark.slow
def test_float16_and_4bit_weights_cost_a_small_kl_on_smollm2():
    """SmolLM2 on 128 tokens of held-out questions. Measured: float16 KL mean ~1e-5 nats/token
    (max ~4e-5; the text's own loss is ~3-4 nats), 99-100% of top-1 tokens unchanged; bfloat16 ~8e-4
    and 92-93%. (Slow only for loading.)"""
    from transformers import AutoTokenizer

    from core.lm.loader import resolve

    model = load_model(FOUNDATION_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(resolve(FOUNDATION_MODEL).source)
    ids = _heldout_text_ids(tokenizer, 128)
    kl16, agree16 = _cast_kl(model, ids, torch.float16)
    assert 0 < kl16.mean() < 2e-4 and kl16.max() < 2e-3
    assert agree16 > 0.97
    # 4-bit weights (core.lm.engines.int4, what chat runs for SmolLM2): the shipped file's own Q4_1 codes,
    # so only bfloat16 (the activations into each product, the scales) differs. Measured: KL mean
    # ~3e-4 nats/token (max ~2e-3), ~97% of top-1 tokens unchanged.
    kl4, agree4 = _int4_kl(model, ids)
    assert 0 < kl4.mean() < 1e-3 and kl4.max() < 1e-2
    assert agree4 > 0.93
