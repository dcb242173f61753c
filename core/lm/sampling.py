"""Next-token sampling: temperature, top-k and top-p (nucleus) filtering of logits.

The filters follow Hugging Face transformers exactly (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, applied in that order, as ``generate`` does), so a
distribution shown on the dashboard is the one a transformers model would sample from.

    logits --/T--> top-k --> top-p --> softmax --> multinomial

Everything here is a pure function of its inputs (sampling takes an explicit generator or seed),
and works in float32 whatever the model's dtype: half-precision logits divided by a small
temperature overflow (50 / 1e-4 > 65504, the float16 maximum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_NEG_INF = float("-inf")


# -----------------------------------------------------------------------------
# argument checks


def _check_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    # `not (a <= x < b)` rather than `x < a or x >= b` so that nan is rejected too.
    if not (0.0 <= temperature < math.inf):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 means off), got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1] (1 means off), got {top_p}")


# -----------------------------------------------------------------------------
# the settings, as one value every layer passes whole


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and how many: what `genai-lab generate`'s flags, the chat
    models' fields and the dashboard's sliders turn into, and all that the decoding loop
    (core.lm.generate) reads. Checked when made, so a bad value fails before a model loads.

    temperature 0 is greedy; top_k None/0 and top_p None/1.0 are off; repetition_penalty > 1
    makes repeats less likely (None/1.0: off); the same seed gives the same tokens; max_tokens
    caps the answer (None: the caller's default)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_args(self.temperature, self.top_k, self.top_p)
        penalty = self.repetition_penalty
        if penalty is not None and not (
            isinstance(penalty, int | float) and math.isfinite(penalty) and penalty > 0
        ):
            raise ValueError(
                f"repetition_penalty must be a number > 0 (1.0: none), got {penalty!r}"
            )
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with `seed` (None without a seed: torch's global one is used)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Next tokens [B] from logits [B, V] under these settings (no repetition penalty: it
        needs the text so far, which the decoding loop has)."""
        return sample_next_token(logits, self.temperature, self.top_k, self.top_p, generator)


GREEDY = SamplingParams(temperature=0.0)


# -----------------------------------------------------------------------------
# the three filters; each maps float32 logits [..., V] to float32 logits [..., V]


def _apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature; temperature 0 keeps only the argmax (greedy)."""
    if temperature == 0:
        # The T -> 0 limit is all mass on the most likely token. torch.argmax picks the first of
        # tied maxima, the same token sample_next_token returns, so the two always agree.
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(dim=-1, keepdim=True), True)
        return logits.masked_fill(~keep, _NEG_INF)
    # Below the smallest normal float32, T itself would round to 0 (and x / 0 is inf or nan).
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    scaled = logits / temperature  # exactly TemperatureLogitsWarper
    # At extreme temperatures a finite logit can overflow to +-inf (and softmax would give nan).
    # Softmax is shift invariant, so for those rows divide (logits - max) instead: the maximum
    # becomes 0 and nothing overflows upwards. Other rows stay bit-identical to transformers.
    overflow = (scaled.isinf() & logits.isfinite()).any(dim=-1, keepdim=True)
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return torch.where(overflow, shifted, scaled)


def _apply_top_k(logits: Tensor, top_k: int | None) -> Tensor:
    """Keep the k largest logits, plus any tied with the k-th (TopKLogitsWarper)."""
    if not top_k:  # None or 0: off
        return logits
    top_k = min(top_k, logits.size(-1))
    kth_largest = torch.topk(logits, top_k).values[..., -1, None]
    return logits.masked_fill(logits < kth_largest, _NEG_INF)


def _apply_top_p(logits: Tensor, top_p: float | None) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= top_p."""
    if top_p is None or top_p == 1.0:
        # Off. (TopPLogitsWarper(1.0) is not quite a no-op: it drops tokens whose probability
        # underflows to exactly 0; transformers' generate() skips it at 1.0, and so do we.)
        return logits
    # Mirror TopPLogitsWarper operation for operation: the same sort (which decides between tied
    # tokens) and the same softmax/cumsum (which decides tokens right at the boundary).
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Ascending order: drop the low tail whose total mass is <= 1 - top_p ...
    sorted_remove = cumulative_probs <= (1 - top_p)
    # ... but always keep the single most likely token.
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
    return logits.masked_fill(remove, _NEG_INF)


# -----------------------------------------------------------------------------
# public API


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | None) -> Tensor:
    """CTRL's repetition penalty, as transformers' RepetitionPenaltyLogitsProcessor: the logit
    of every token already in `seen` [B, T] (the prompt included) is divided by `penalty` when
    positive and multiplied by it when negative, so > 1 makes repeats less likely (and 1 or
    None changes nothing). logits [B, V] -> [B, V]."""
    if penalty is None or penalty == 1.0:
        return logits
    if not (math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0: none), got {penalty!r}")
    score = logits.gather(-1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, seen, score)


def filter_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Apply temperature, then top-k, then top-p to logits of shape [..., vocab].

    Returns float32 logits of the same shape with removed tokens set to -inf; at least one token
    per row always survives. ``temperature=0`` is greedy (only the argmax survives),
    ``top_k=None`` or ``0`` and ``top_p=None`` or ``1.0`` switch those filters off. Matches
    transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper.
    """
    _check_args(temperature, top_k, top_p)
    x = logits.float()
    x = _apply_temperature(x, temperature)
    x = _apply_top_k(x, top_k)
    return _apply_top_p(x, top_p)


def probabilities(logits: Tensor) -> Tensor:
    """Softmax over the last dim in float32; -inf logits get probability exactly 0.

    torch's softmax subtracts the row maximum first, so it is stable for huge logits (e.g. at
    low temperature), and exp(-inf) is exactly 0. Each row needs at least one finite logit.
    """
    return torch.softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class SamplingStages:
    """The next-token distribution after each filter, for plotting; all tensors are [vocab]."""

    original: Tensor  # softmax of the raw logits
    after_temperature: Tensor
    after_top_k: Tensor  # renormalised over the top-k survivors
    after_top_p: Tensor  # renormalised over the final survivors: what gets sampled
    kept_top_k: Tensor  # bool: survived temperature (greedy keeps one) and top-k
    kept_top_p: Tensor  # bool: survived every filter (a subset of kept_top_k)

    @property
    def final(self) -> Tensor:
        return self.after_top_p


def sampling_stages(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> SamplingStages:
    """Probability tables before and after each filter for a single position's logits [vocab].

    A token counts as kept while its logit is not -inf, even if its probability underflows to 0.
    ``final`` is exactly ``probabilities(filter_logits(logits, temperature, top_k, top_p))``.
    """
    if logits.dim() != 1:
        raise ValueError(
            f"sampling_stages expects 1-D logits [vocab], got shape {tuple(logits.shape)}"
        )
    _check_args(temperature, top_k, top_p)
    x = logits.float()
    scaled = _apply_temperature(x, temperature)
    top_k_logits = _apply_top_k(scaled, top_k)
    top_p_logits = _apply_top_p(top_k_logits, top_p)
    return SamplingStages(
        original=probabilities(x),
        after_temperature=probabilities(scaled),
        after_top_k=probabilities(top_k_logits),
        after_top_p=probabilities(top_p_logits),
        kept_top_k=top_k_logits > _NEG_INF,
        kept_top_p=top_p_logits > _NEG_INF,
    )


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token id per row from logits [B, V] (or [V]); returns a LongTensor [B] (or []).

    ``temperature=0`` is greedy decoding (argmax, no randomness). Pass a ``generator`` on the
    logits' device to make the draws reproducible.
    """
    _check_args(temperature, top_k, top_p)
    if temperature == 0:
        # Top-k and top-p always keep the most likely token, so they cannot change the argmax.
        return logits.argmax(dim=-1)
    probs = probabilities(filter_logits(logits, temperature, top_k, top_p))
    flat = probs.reshape(-1, probs.size(-1))  # multinomial wants 1-D or 2-D
    return torch.multinomial(flat, num_samples=1, generator=generator).reshape(probs.shape[:-1])


def sample_many(
    logits: Tensor,
    n: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> Tensor:
    """Draw ``n`` independent next tokens from one position's logits [vocab]; returns LongTensor [n].

    The same seed gives the same draws, so a dashboard histogram is reproducible.
    """
    if logits.dim() != 1:
        raise ValueError(f"sample_many expects 1-D logits [vocab], got shape {tuple(logits.shape)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax().repeat(n)
    probs = probabilities(filter_logits(logits, temperature, top_k, top_p))
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    # With replacement = n independent draws (without it, each draw would exclude earlier ones).
    return torch.multinomial(probs, num_samples=n, replacement=True, generator=generator)


def entropy(probs: Tensor) -> float:
    """Shannon entropy in nats of a 1-D probability vector, with 0 * log 0 = 0."""
    if probs.dim() != 1:
        raise ValueError(
            f"entropy expects a 1-D probability vector, got shape {tuple(probs.shape)}"
        )
    # entr(p) = -p log p, defined as 0 at p = 0; float64 so long vocabularies don't lose digits.
    return torch.special.entr(probs.double()).sum().item()


def kl_divergence(p: Tensor, q: Tensor) -> float:
    """KL(p || q) in nats over 1-D probability vectors: sum over p > 0 of p log(p / q).

    Infinite when q puts zero mass on a token that p can produce.
    """
    if p.dim() != 1 or p.shape != q.shape:
        raise ValueError(
            f"kl_divergence expects two 1-D vectors of the same length, got {tuple(p.shape)} "
            f"and {tuple(q.shape)}"
        )
    p, q = p.double(), q.double()
    support = p > 0
    if (q[support] == 0).any():
        return math.inf
    ps, qs = p[support], q[support]
    kl = (ps * (ps.log() - qs.log())).sum().item()
    # KL >= 0 (Gibbs' inequality); rounding can leave a -1e-17 for p == q, which would look odd.
    return max(kl, 0.0)
