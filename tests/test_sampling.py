"""Tests for core.lm.sampling, checked against Hugging Face transformers' logits warpers."""

from __future__ import annotations

import itertools
import math

import pytest
import scipy.stats
import torch
from torch import Tensor
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.lm.sampling import (
    SamplingStages,
    entropy,
    filter_logits,
    kl_divergence,
    probabilities,
    sample_many,
    sample_next_token,
    sampling_stages,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny tensor ops: extra intra-op threads only add overhead (badly so when
    another process is busy on the 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TEMPERATURES = [1.0, 0.7, 1.5, 0.01, 1e-3]
TOP_KS = [None, 1, 3, 10, 1000, 5000]  # 1000 == one vocab size below, 5000 > every vocab
TOP_PS = [None, 1.0, 0.95, 0.5, 0.1, 1e-6]


def reference_filter(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> Tensor:
    """transformers' warpers in the order (and with the on/off rules) of generate()."""
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)  # unused by these warpers
    scores = logits
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores


def assert_same_filtered(ours: Tensor, ref: Tensor, msg: str) -> None:
    """Same -inf pattern exactly, and the surviving logits allclose."""
    assert ours.dtype == torch.float32, msg
    assert ours.shape == ref.shape, msg
    assert torch.equal(ours.isneginf(), ref.isneginf()), msg
    kept = ~ref.isneginf()
    assert torch.isfinite(ours[kept]).all(), msg
    torch.testing.assert_close(ours[kept], ref[kept], rtol=1e-6, atol=1e-6, msg=msg)


def random_logits(kind: str, batch: int, vocab: int, gen: torch.Generator) -> Tensor:
    if kind == "normal":
        return torch.randn(batch, vocab, generator=gen) * 3
    if kind == "ties":  # few distinct values, so many exact ties at the top-k / top-p boundary
        return torch.randint(0, 4, (batch, vocab), generator=gen).float()
    if kind == "large":  # LLM-sized logits, the low-temperature stress case
        return torch.randn(batch, vocab, generator=gen) * 50
    raise ValueError(kind)


# -----------------------------------------------------------------------------
# agreement with transformers


@pytest.mark.parametrize("kind", ["normal", "ties", "large"])
@pytest.mark.parametrize("vocab", [2, 7, 50, 1000])
def test_filter_logits_matches_transformers(kind: str, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    n_removed = 0
    for batch in (1, 3, 8):
        logits = random_logits(kind, batch, vocab, gen)
        for t, k, p in itertools.product(TEMPERATURES, TOP_KS, TOP_PS):
            ours = filter_logits(logits, temperature=t, top_k=k, top_p=p)
            ref = reference_filter(logits, t, k, p)
            assert_same_filtered(ours, ref, f"{kind=} {batch=} {vocab=} {t=} {k=} {p=}")
            n_removed += int(ref.isneginf().sum())
    assert n_removed > 0  # the grid really exercised the filters


def test_filter_logits_keeps_leading_dims() -> None:
    logits = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0))
    ours = filter_logits(logits, temperature=0.8, top_k=10, top_p=0.7)
    assert ours.shape == logits.shape
    ref = reference_filter(logits.reshape(6, 40), 0.8, 10, 0.7).reshape(2, 3, 40)
    assert_same_filtered(ours, ref, "3-D input")
    one_row = filter_logits(logits[0, 0], temperature=0.8, top_k=10, top_p=0.7)
    assert_same_filtered(one_row, ref[0, 0], "1-D input")


def test_top_k_keeps_ties_with_kth_value() -> None:
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [False, True, True, False, True]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    # 0.5 < 0.6 <= 0.5 + 0.3: the nucleus is the two most likely tokens.
    assert filter_logits(logits, top_p=0.6).isfinite().tolist() == [True, True, False]
    # A tiny top_p still keeps the most likely token.
    assert filter_logits(logits, top_p=1e-9).isfinite().tolist() == [True, False, False]


def test_off_values_are_identity() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)) * 20
    expected = logits / 0.5
    for k, p in [(None, None), (0, None), (None, 1.0), (0, 1.0), (30, 1.0), (100, None)]:
        assert torch.equal(filter_logits(logits, 0.5, top_k=k, top_p=p), expected), (k, p)


def test_filter_order_is_top_k_before_top_p() -> None:
    # Top-p on the renormalised top-k distribution keeps fewer tokens than on the full one.
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7, 0.0, 0.0, 0.0, 0.0])
    both = filter_logits(logits, top_k=2, top_p=0.5).isfinite()
    assert both.tolist() == [True, False, False, False, False, False, False, False]
    assert filter_logits(logits, top_p=0.5).isfinite().sum() == 3


# -----------------------------------------------------------------------------
# greedy and numerical edge cases


def test_temperature_zero_is_greedy() -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(2))
    argmax = logits.argmax(dim=-1)
    filtered = filter_logits(logits, temperature=0, top_k=5, top_p=0.3)
    assert (filtered.isfinite().sum(dim=-1) == 1).all()
    assert torch.equal(filtered.argmax(dim=-1), argmax)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, temperature=0, generator=gen), argmax)
    assert torch.equal(sample_many(logits[3], 50, temperature=0), argmax[3].repeat(50))
    stages = sampling_stages(logits[3], temperature=0)
    assert stages.final[argmax[3]] == 1.0 and stages.kept_top_p.sum() == 1


def test_greedy_ties_pick_one_token_consistently() -> None:
    logits = torch.tensor([1.0, 5.0, 5.0, 0.0])
    assert filter_logits(logits, temperature=0).isfinite().tolist() == [False, True, False, False]
    assert sample_next_token(logits, temperature=0).item() == 1


@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 1e-6, 1e-40, 1e-50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_temperature_is_finite(temperature: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 500, generator=gen) * 50).to(dtype)
    filtered = filter_logits(logits, temperature=temperature, top_k=50, top_p=0.9)
    assert filtered.dtype == torch.float32
    kept = filtered.isfinite()
    assert kept.any(dim=-1).all()
    assert not filtered.isnan().any() and not filtered.isposinf().any()
    probs = probabilities(filtered)
    assert not probs.isnan().any()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(4))
    # At such temperatures the argmax takes (essentially) all the mass.
    assert torch.equal(probs.argmax(dim=-1), logits.float().argmax(dim=-1))
    tokens = sample_next_token(logits, temperature, 50, 0.9, generator=gen)
    assert kept.gather(-1, tokens[:, None]).all()


def test_probabilities_maps_neg_inf_to_zero() -> None:
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf], [1e4, 0.0, -math.inf, -1e4]])
    probs = probabilities(logits)
    assert probs.dtype == torch.float32
    assert (probs[logits.isneginf()] == 0).all()
    torch.testing.assert_close(probs[0, [0, 2]], torch.softmax(torch.tensor([0.0, 1.0]), dim=0))
    assert probs[1, 0] == 1.0


# -----------------------------------------------------------------------------
# sampling


def test_sample_many_matches_final_distribution() -> None:
    logits = torch.randn(20, generator=torch.Generator().manual_seed(4)) * 2
    settings = {"temperature": 0.8, "top_k": 10, "top_p": 0.9}
    stages = sampling_stages(logits, **settings)
    n = 20_000
    draws = sample_many(logits, n, **settings, seed=123)
    assert draws.shape == (n,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=20).double() / n
    p = stages.final.double()
    # Each frequency is within 5 standard errors of its probability (p = 0 means never drawn).
    tolerance = 5 * (p * (1 - p) / n).sqrt() + 1e-12
    assert ((freq - p).abs() <= tolerance).all(), (freq, p)
    assert stages.kept_top_p.sum() >= 2  # the check was about a real distribution
    # A chi-square goodness-of-fit test over the kept tokens agrees.
    kept = stages.kept_top_p
    counts = torch.bincount(draws, minlength=20)[kept].numpy()
    expected = p[kept] / p[kept].sum() * counts.sum()  # chisquare wants equal totals exactly
    assert scipy.stats.chisquare(counts, expected.numpy()).pvalue > 1e-3


def test_sample_next_token_matches_final_distribution() -> None:
    logits = torch.randn(12, generator=torch.Generator().manual_seed(5))
    n = 20_000
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits.expand(n, -1), 1.3, None, 0.8, generator=gen)
    freq = torch.bincount(tokens, minlength=12).double() / n
    p = sampling_stages(logits, 1.3, None, 0.8).final.double()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_sampled_tokens_are_always_kept() -> None:
    gen = torch.Generator().manual_seed(6)
    for t, k, p in itertools.product([0.5, 1.0, 2.0], [None, 1, 5], [None, 0.3, 0.9]):
        logits = torch.randn(64, 100, generator=gen) * 3
        kept = filter_logits(logits, t, k, p).isfinite()
        tokens = sample_next_token(logits, t, k, p, generator=gen)
        assert tokens.shape == (64,) and tokens.dtype == torch.long
        assert kept.gather(-1, tokens[:, None]).all(), (t, k, p)
        draws = sample_many(logits[0], 500, t, k, p, seed=7)
        assert kept[0, draws].all(), (t, k, p)


def test_sampling_is_reproducible() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(8))
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(1))
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(sample_many(logits[0], 200, seed=3), sample_many(logits[0], 200, seed=3))
    assert not torch.equal(sample_many(logits[0], 200, seed=3), sample_many(logits[0], 200, seed=4))


def test_sample_next_token_1d_returns_scalar() -> None:
    token = sample_next_token(torch.tensor([0.0, 10.0, 0.0]), top_k=1)
    assert token.shape == () and token.dtype == torch.long and token.item() == 1


# -----------------------------------------------------------------------------
# sampling_stages


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 20, None), (1.5, None, 0.8), (0.5, 10, 0.6), (0.01, 50, 0.95)],
)
def test_sampling_stages_are_distributions(
    temperature: float, top_k: int | None, top_p: float | None
) -> None:
    logits = torch.randn(200, generator=torch.Generator().manual_seed(9)) * 4
    stages = sampling_stages(logits, temperature, top_k, top_p)
    assert isinstance(stages, SamplingStages)
    tables = [stages.original, stages.after_temperature, stages.after_top_k, stages.after_top_p]
    for table in tables:
        assert table.shape == (200,) and table.dtype == torch.float32
        assert (table >= 0).all()
        torch.testing.assert_close(table.sum(), torch.tensor(1.0))
    assert stages.kept_top_k.dtype == torch.bool and stages.kept_top_p.dtype == torch.bool
    assert (stages.after_top_k[~stages.kept_top_k] == 0).all()
    assert (stages.after_top_p[~stages.kept_top_p] == 0).all()
    assert not (stages.kept_top_p & ~stages.kept_top_k).any()  # top-p only removes more
    torch.testing.assert_close(stages.original, torch.softmax(logits, dim=0))
    torch.testing.assert_close(stages.after_temperature, torch.softmax(logits / temperature, dim=0))
    assert stages.final is stages.after_top_p
    # The final table is what filter_logits + probabilities (i.e. sampling) uses.
    filtered = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(stages.final, probabilities(filtered))
    assert torch.equal(stages.kept_top_p, filtered.isfinite())
    if top_k is not None:
        assert stages.kept_top_k.sum() == top_k  # random logits: no ties
    # Renormalising keeps ratios: survivors are scaled up by the same factor.
    ratio = stages.after_top_p[stages.kept_top_p] / stages.after_temperature[stages.kept_top_p]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))


def test_sampling_stages_rejects_batches() -> None:
    with pytest.raises(ValueError, match="1-D"):
        sampling_stages(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="1-D"):
        sample_many(torch.zeros(2, 5), 3)


# -----------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    logits = torch.randn(2, 10)
    for fn in (filter_logits, sample_next_token):
        with pytest.raises(ValueError, match=match):
            fn(logits, **kwargs)
    for fn in (sampling_stages, lambda x, **kw: sample_many(x, 5, **kw)):
        with pytest.raises(ValueError, match=match):
            fn(logits[0], **kwargs)


# -----------------------------------------------------------------------------
# entropy and KL divergence


def test_entropy() -> None:
    p = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    assert entropy(p) == pytest.approx(scipy.stats.entropy(p.numpy()))
    assert entropy(p) == pytest.approx(1.75 * math.log(2))  # 1.75 bits
    assert entropy(torch.full((8,), 1 / 8)) == pytest.approx(math.log(8))
    assert entropy(torch.tensor([0.0, 1.0, 0.0])) == 0.0  # 0 * log 0 = 0, not nan
    probs = torch.softmax(torch.randn(100, generator=torch.Generator().manual_seed(10)), dim=0)
    expected = torch.distributions.Categorical(probs=probs).entropy().item()
    assert entropy(probs) == pytest.approx(expected, rel=1e-5)


def test_kl_divergence() -> None:
    gen = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(50, generator=gen), dim=0)
    q = torch.softmax(torch.randn(50, generator=gen), dim=0)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=p), torch.distributions.Categorical(probs=q)
    ).item()
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(p, q) == pytest.approx(scipy.stats.entropy(p.numpy(), q.numpy()))
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, q) != pytest.approx(kl_divergence(q, p))  # not symmetric


def test_kl_divergence_zero_mass() -> None:
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    # Tokens p never produces don't count: only log(0.5 / 0.25) = log 2 remains.
    assert kl_divergence(p, q) == pytest.approx(math.log(2))
    assert kl_divergence(q, p) == math.inf  # q can produce a token p rules out
    with pytest.raises(ValueError, match="same length"):
        kl_divergence(p, q[:2])
