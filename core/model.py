"""A decoder-only transformer with the Llama architecture, written to be read.

The pieces, in the order a token meets them:
  token embedding -> N x [RMSNorm -> attention (RoPE, grouped-query, causal) -> residual
                          RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head -> logits

Parameter names are exactly those of transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`,
...), so a checkpoint is a plain Hugging Face folder in both directions with no renaming table, and
what you learn here carries over to reading `modeling_llama.py`.

Inference fast path: under `torch.inference_mode()` (generation, the dashboard, chat) q/k/v and
gate/up each run as one matrix multiply over concatenated copies of their weights, every weight
(the vocabulary head too) is multiplied from a copy stored transposed, [in, out], and RMSNorm is
one fused op. Decoding one token is a chain of matrix-vector products that read every weight
once, and PyTorch's fp32 `x @ W.T` with W stored [out, in] is its slow case on CPU; fewer, larger
products over the transposed layout make each token cheaper (`genai-lab bench` measures it).
The copies are cached and rebuilt whenever a weight changes; training and `no_grad` code take the
plain path, so training runs are bit-for-bit what they were. `GPT.set_fast_inference(False)`
gives inference the plain path too; `weights_dtype=torch.bfloat16` there keeps the copies in
bf16 (lossy, bounded in tests/test_decode_fast.py).

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
        fast = torch.is_inference_mode_enabled() and getattr(self, "fast_inference", True)
        if fast and x.dtype == torch.float32:
            # One fused op instead of seven (decoding runs 61 norms per token); same numbers.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
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


def fused_weights(owner: nn.Module, linears: list[nn.Module], name: str = "in") -> tuple | None:
    """(weight, bias) of `linears` stacked along the output dim and stored transposed, [in, out]
    (so `x @ weight` is the matmul), cached on `owner` under `name`; or None when the fast path
    does not apply (gradients on, `fast_inference` off, a layer is not a plain nn.Linear, e.g.
    after quantization, or a layer has hooks that must see it run). The cache key is each
    weight's storage and version counter, so an in-place update (an optimizer step,
    load_state_dict) or a move to another device rebuilds it.

    Why transposed: for one token (decoding) the product is a matrix-vector one, and PyTorch's
    (MKL's) fp32 `x @ W.T` over a weight stored [out, in] is its slow case on CPU, while `x @ Wt`
    over the same numbers stored [in, out] streams them faster (SmolLM2 on a 2-core Zen 4:
    ~1.25-1.4x more tokens/s; `genai-lab bench` measures it). Sums may run in another order, so
    logits can differ from the plain path by float rounding (~1e-4 at most), not more."""
    if not torch.is_inference_mode_enabled() or not getattr(owner, "fast_inference", True):
        return None
    if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in linears):
        return None
    dtype = getattr(owner, "inference_dtype", None) or linears[0].weight.dtype
    tensors = [t for m in linears for t in (m.weight, m.bias) if t is not None]
    if any(t.is_inference() for t in tensors):  # made in inference mode: no version counter
        return _stack(linears, dtype)
    weights = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype) for m in linears)
    key = (dtype, *weights)
    key += tuple((m.bias.data_ptr(), m.bias._version) for m in linears if m.bias is not None)
    fused = owner.__dict__.setdefault("_fused", {})  # plain attribute: not in the state dict
    cached = fused.get((name, dtype))  # one slot per dtype: switching back and forth is free
    if cached is None or cached[0] != key:
        cached = fused[name, dtype] = (key, *_stack(linears, dtype))
    return cached[1], cached[2]


def _stack(
    linears: list[nn.Linear], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight for m in linears]).t().to(dtype).contiguous()  # [in, out]
    return weight, None if linears[0].bias is None else torch.cat([m.bias for m in linears])


def linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a weight stored transposed ([in, out], from `fused_weights`). A weight kept
    in another dtype (`GPT.set_fast_inference(weights_dtype=...)`) multiplies the input cast
    to it, and the product is cast back: the activations keep their dtype."""
    cast = weight_t.dtype != x.dtype
    y = (x.to(weight_t.dtype) @ weight_t).to(x.dtype) if cast else x @ weight_t
    return y if bias is None else y + bias


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
        fused = fused_weights(self, [self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:  # inference: one matmul for q, k, v and one rotation for q and k
            qkv = linear_t(x, *fused).view(B, T, H + 2 * KV, D).transpose(1, 2)
            qk = apply_rotary(qkv[:, : H + KV], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
        else:
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
        out = fused_weights(self, [self.o_proj], "out")
        return self.o_proj(y) if out is None else linear_t(y, *out)


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
        fused = fused_weights(self, [self.gate_proj, self.up_proj])
        if fused is not None:  # inference: gate and up in one matmul
            gate, up = linear_t(x, *fused).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
            down = fused_weights(self, [self.down_proj], "out")
            return self.down_proj(hidden) if down is None else linear_t(hidden, *down)
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
        x = self.embed_tokens(input_ids)  # [B, T, C]
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
        """Final-norm hidden states [..., C] -> logits [..., V] (the vocabulary head; under
        inference mode through its transposed copy, see `fused_weights`)."""
        fused = fused_weights(self, [self.lm_head], "head")
        return self.lm_head(h) if fused is None else linear_t(h, *fused)

    def set_fast_inference(self, on: bool = True, weights_dtype: torch.dtype | None = None) -> GPT:
        """Inference mode's fast path (on by default): fused q/k/v and gate/up, weights stored
        transposed, one-op norms; same numbers as the plain path up to float rounding. Off:
        inference runs the plain path that training and `no_grad` take, op for op, slower.

        `weights_dtype=torch.bfloat16` keeps the inference copies of the weights in bfloat16
        (half the bytes to read per token; on a 2-core Zen 4 it measured no faster than fp32,
        `genai-lab bench` shows it) while activations, norms, attention and the cache stay in
        the model's dtype. That is lossy:
        tests/test_decode_fast.py bounds the KL divergence it costs. None: the weights' own
        dtype (exact fp32 for an fp32 model). The copies are rebuilt only when a weight or this
        setting changes."""
        for module in self.modules():
            module.fast_inference = on
            module.inference_dtype = weights_dtype
        return self

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
        cos = self.rope_cos[start : start + T].to(self.model.embed_tokens.weight.dtype)
        sin = self.rope_sin[start : start + T].to(self.model.embed_tokens.weight.dtype)
        h = self.model(input_ids, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return h

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        w = self.model.embed_tokens.weight
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
