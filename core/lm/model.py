"""A decoder-only transformer with the Llama architecture, written to be read.

The pieces, in the order a token meets them:
  token embedding -> N x [RMSNorm -> attention (RoPE, grouped-query, causal) -> residual
                          RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head -> logits

Parameter names are exactly those of transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`,
...), so a checkpoint is a plain Hugging Face folder in both directions with no renaming table, and
what you learn here carries over to reading `modeling_llama.py`.

Faster ways to run the same model for inference (one-row products split across the CPU threads,
fused norms, float16 or 4-bit weights) are in core/lm/engines/: they swap a layer or re-pack the
weights, so this file stays the one definition of the forward pass.

Shapes in comments: B = batch, T = new tokens this call, S = all positions attended to (cache + T),
H = query heads, KV = key/value heads, D = head dim, C = hidden size, V = vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2  # < num_attention_heads: grouped-query attention (GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError `key: got X, must be ...` for a shape the model cannot be built
        with, before any tensor is allocated (a config.json from elsewhere, a pre-training
        recipe)."""
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        sizes += ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for key in sizes:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: got {value!r}, must be an integer >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: got {self.num_key_value_heads}, must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"num_attention_heads: got {self.num_attention_heads}, must divide "
                    f"hidden_size ({self.hidden_size})"
                )
            head_dim, key = self.hidden_size // self.num_attention_heads, "hidden_size"
        else:
            head_dim, key = self.head_dim, "head_dim"
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
            raise ValueError(f"head_dim: got {head_dim!r}, must be an even integer >= 2")
        if head_dim % 2:  # rotary embeddings rotate dimensions in pairs
            raise ValueError(
                f"{key}: gives head_dim {head_dim}, which must be even for rotary embeddings"
            )
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key}: got {value!r}, must be a number > 0")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain. No mean, no bias:
    cheaper than LayerNorm and just as good in practice (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Llama does, so fp16/bf16 weights give the same answer.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, D] for rotary position embeddings (RoPE).

    Dimension pair i rotates by angle position * theta^(-2i/D): low dims spin fast (local order),
    high dims slowly (long range). Computed once here instead of on every forward pass.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [max_len, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # Llama's layout: first half / second half pairs
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key vectors x [B, heads, T, D] by their positions' angles (cos/sin [T, D]).
    The dot product of two rotated vectors then depends only on their distance."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated once.

    With the cache, generating token t costs one new row of attention instead of recomputing
    all t rows. Nothing is recomputed, though each new token still attends over every cached
    position, so a step's attention grows with the text (its matmuls with the weights do not).
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, dtype=None, device=None
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        dtype = dtype or torch.float32
        self.keys = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0  # positions filled so far

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, D] after the cached positions; return all of them [B, KV, S, D]."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) under the causal mask, [B, H, T, S] in fp32: the weights that
    scaled_dot_product_attention applies inside without returning them (q [B, H, T, D], k
    [B, KV, S, D], mask/is_causal as passed to it). Masked entries come out exactly 0."""
    H, KV, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // KV, dim=1)  # GQA: query head h reads key/value head h // (H/KV)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
        # Off by default. Set True to keep this layer's attention probabilities [B, H, T, S] in
        # `attention_probs` (the dashboard draws them). SDPA never materialises them, so they are
        # computed a second time, explicitly, only when asked for; the output does not change.
        self.record_attention = False
        self.attention_probs: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # [B, KV, S, D]

        # Causal mask: a token sees itself and what came before. With nothing cached the built-in
        # causal flag does it; a single new token may see everything; a chunk after a cache needs
        # an explicit mask offset by the cached length.
        mask, is_causal = None, False
        if past == 0:
            is_causal = T > 1
        elif T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # GQA: each key/value head serves n_head / n_kv_head query heads (fewer heads to cache).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=KV != H
        )  # [B, H, T, D]
        if self.record_attention:
            self.attention_probs = attention_probabilities(q, k, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: silu(x W_gate) * (x W_up), projected back down. The gate lets each hidden unit
    switch its own signal on or off, which trains better than a plain ReLU MLP (Shazeer, 2020)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: normalise, transform, add back. The residual stream carries the
    token's representation; each block only writes an update into it."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, the stack of blocks and the final norm (transformers calls this `model`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> final-norm hidden states [B, T, C] (rotary tables cos/sin [T, D]
        for these positions)."""
        x = self.embed_tokens(input_ids).to(self.norm.weight.dtype)  # [B, T, C]
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # One matrix both reads tokens in and scores them out: fewer parameters, and in small
            # models it usually helps.
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scale the projections that write into the residual stream by 1/sqrt(2 * layers) so its
        # variance does not grow with depth (GPT-2's trick).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
                nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. With a cache, positions continue after it."""
        return self.head(self.hidden_states(input_ids, cache))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., C] -> logits [..., V] (the vocabulary head)."""
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> the final-norm hidden states [B, T, C] the vocabulary head reads
        (the reward model and PPO's value head read them too)."""
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {start + T}")
        dtype = self.model.norm.weight.dtype  # the activations' (float16 weights keep them fp32)
        cos, sin = (
            self.rope_cos[start : start + T].to(dtype),
            self.rope_sin[start : start + T].to(dtype),
        )
        h = self.model(input_ids, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return h

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        w = self.model.norm.weight  # the activations' dtype (float16 weights keep it fp32)
        return KVCache(
            self.config,
            batch_size,
            max_len or self.config.max_position_embeddings,
            dtype=w.dtype,
            device=w.device,
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight-multiply forward (x3 with the backward pass),
        plus attention's scores and weighted sum over the context (PaLM appendix B convention)."""
        c = self.config
        seq_len = seq_len or c.max_position_embeddings
        # The embedding lookup is free; lm_head is a real matmul even when tied.
        dense = self.num_parameters(exclude_embeddings=True)
        if c.tie_word_embeddings:
            dense += c.vocab_size * c.hidden_size
        # q.k scores and the weighted sum of values: 2 FLOPs each per (head dim x position).
        attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        forward = 2 * dense + attention
        return 3 * forward if training else forward
