"""What the "Inside the transformer" page shows, computed from one forward pass of our GPT:
attention probabilities per layer and head, the residual stream after every block (for the logit
lens), each token's negative log-likelihood (for perplexity), and the tensor shapes met on the way.

Pure functions of a model and token ids; nothing here calls Streamlit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from core.lm.model import GPT, GPTConfig
from core.train.losses import lm_loss
from dashboard.lib.next_token import token_label

# -----------------------------------------------------------------------------
# one forward pass, with everything the page needs kept


@dataclass(frozen=True)
class Capture:
    """What one forward pass over ``ids`` left behind (batch dimension dropped, fp32, CPU)."""

    ids: list[int]
    attention: np.ndarray  # [L, H, T, T]: layer, query head, query position, key position
    residuals: Tensor  # [L + 1, T, C]: the embeddings, then the stream after each block
    nll: np.ndarray  # [T - 1]: -ln p(token t+1 | tokens 0..t), in nats
    shapes: dict[str, tuple[int, ...]]  # module path -> output shape its forward hook saw

    @property
    def num_layers(self) -> int:
        return self.attention.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention.shape[1]


def private_copy(model: GPT) -> GPT:
    """A module tree of our own that shares the weight tensors (nothing is copied but the small
    module objects). The dashboard's model is shared by every page and session; hooks and the
    record flag set on it would fire on, or be overwritten by, their forward passes too."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def capture(model: GPT, ids: list[int]) -> Capture:
    """Run ``model`` once over ``ids`` [T] and keep attention probabilities, the residual stream
    after each block, per-token losses and the output shape of every module of block 0."""
    if not ids:
        raise ValueError("capture needs at least one token")
    model = private_copy(model)
    residuals: list[Tensor] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def keep_stream(module, args, output) -> None:
        residuals.append(output[0].detach().float().cpu())

    def keep_shape(name: str):
        def hook(module, args, output) -> None:
            shapes[name] = tuple(output.shape[1:])

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keep_stream)]
    handles += [layer.register_forward_hook(keep_stream) for layer in model.model.layers]
    first = ("model.embed_tokens", "model.layers.0", "model.norm", "lm_head")
    for name, module in model.named_modules():
        if name in first or name.startswith("model.layers.0."):
            handles.append(module.register_forward_hook(keep_shape(name)))
    for layer in model.model.layers:
        layer.self_attn.record_attention = True
    device = model.model.embed_tokens.weight.device
    try:
        # no_grad, not inference_mode: under inference_mode q/k/v (and gate/up) run as one fused
        # matmul, so the hooks on q_proj, k_proj, ... would never fire. Same maths either way.
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device))[0].float()
    finally:
        for handle in handles:
            handle.remove()
    attention = torch.stack(
        [layer.self_attn.attention_probs[0] for layer in model.model.layers]
    ).cpu()
    targets = torch.tensor([ids[1:]], dtype=torch.long, device=logits.device)
    nll = lm_loss(logits[None, :-1], targets, reduction="none")  # [T - 1]
    return Capture(
        ids=list(ids),
        attention=_read_only(attention.numpy()),
        residuals=torch.stack(residuals),
        nll=_read_only(nll.cpu().numpy()),
        shapes=shapes,
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # cached and shared between sessions: nobody may change it
    return array


def position_labels(tokenizer, ids: list[int]) -> list[str]:
    """'0 <|endoftext|>', '1 The', ...: unique axis labels even when a token repeats."""
    return [f"{i} {token_label(tokenizer, t)}" for i, t in enumerate(ids)]


# -----------------------------------------------------------------------------
# attention


def kv_head(config: GPTConfig, head: int) -> int:
    """The key/value head that query head ``head`` reads (grouped-query attention)."""
    return head // (config.num_attention_heads // config.num_key_value_heads)


def attention_figure(probs: np.ndarray, labels: list[str], layer: int, head: int) -> go.Figure:
    """Heatmap of one head's attention [T, T]: rows the token looking (query), columns the token
    looked at (key). Masked cells (a key after its query) are left empty, not drawn as 0."""
    T = probs.shape[0]
    z = np.where(np.tril(np.ones((T, T), dtype=bool)), probs, np.nan)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "attention weight"},
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>",
            hoverongaps=False,
        )
    )
    size = min(900, max(380, 120 + 16 * T))
    fig.update_layout(
        title=f"Layer {layer + 1}, head {head + 1}: where each token looks",
        xaxis={"title": "key: the token looked at", "tickangle": -60, "type": "category"},
        yaxis={"title": "query: the token looking", "autorange": "reversed", "type": "category"},
        height=size,
        margin={"t": 50, "b": 10},
    )
    return fig


# -----------------------------------------------------------------------------
# the path of a token: shapes at each step


@dataclass(frozen=True)
class ShapeStep:
    """One step of the forward pass. ``module`` is the path of the module whose output this is
    (block 0 standing for every block), or None for work done inside a forward (a reshape, RoPE,
    the attention itself)."""

    part: str
    step: str
    module: str | None
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    note: str


def shape_steps(config: GPTConfig, T: int) -> list[ShapeStep]:
    """The forward pass of core/lm/model.py on T tokens, step by step, with each output's shape
    (batch dimension dropped), from the model's config."""
    d, V, inner = config.hidden_size, config.vocab_size, config.intermediate_size
    H, KV, D, L = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.num_hidden_layers,
    )
    block = f"each of the {L} blocks"
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    group = H // KV
    gqa = (
        f"GQA: {KV} key/value heads, each shared by {group} query heads"
        if KV < H
        else "one key/value head per query head (no GQA)"
    )
    rows = [
        ("input", "token ids", None, ("T",), (T,), "what the tokenizer produced"),
        (
            "input",
            "token embedding",
            "model.embed_tokens",
            ("T", "d"),
            (T, d),
            f"row `id` of a [{V:,}, {d}] table: the residual stream starts here",
        ),
        (block, "RMSNorm", "model.layers.0.input_layernorm", ("T", "d"), (T, d), "scale only"),
        (block, "q projection", f"{attn}.q_proj", ("T", "H·D"), (T, H * D), "queries"),
        (block, "k projection", f"{attn}.k_proj", ("T", "KV·D"), (T, KV * D), "keys: " + gqa),
        (block, "v projection", f"{attn}.v_proj", ("T", "KV·D"), (T, KV * D), "values"),
        (block, "split q into heads", None, ("H", "T", "D"), (H, T, D), f"{H} heads of {D}"),
        (
            block,
            "split k, v into heads",
            None,
            ("KV", "T", "D"),
            (KV, T, D),
            f"query head h reads key/value head h // {group}",
        ),
        (block, "RoPE on q and k", None, ("H", "T", "D"), (H, T, D), "rotate by position"),
        (
            block,
            "attention weights",
            None,
            ("H", "T", "T"),
            (H, T, T),
            "softmax(q·k / √D), causal mask: each row sums to 1",
        ),
        (block, "weighted sum of values", None, ("H", "T", "D"), (H, T, D), "per head"),
        (block, "concatenate heads", None, ("T", "H·D"), (T, H * D), "heads side by side"),
        (block, "output projection", f"{attn}.o_proj", ("T", "d"), (T, d), "back to width d"),
        (block, "residual add", None, ("T", "d"), (T, d), "stream += attention's update"),
        (
            block,
            "RMSNorm",
            "model.layers.0.post_attention_layernorm",
            ("T", "d"),
            (T, d),
            "scale only",
        ),
        (block, "MLP gate", f"{mlp}.gate_proj", ("T", "I"), (T, inner), f"I = {inner:,}"),
        (block, "MLP up", f"{mlp}.up_proj", ("T", "I"), (T, inner), "SwiGLU: silu(gate) × up"),
        (block, "MLP down", f"{mlp}.down_proj", ("T", "d"), (T, d), "back to width d"),
        (
            block,
            "residual add",
            "model.layers.0",
            ("T", "d"),
            (T, d),
            "stream += MLP's update: the block's output",
        ),
        ("output", "final RMSNorm", "model.norm", ("T", "d"), (T, d), "once, after the last block"),
        (
            "output",
            "lm_head",
            "lm_head",
            ("T", "V"),
            (T, V),
            "a score (logit) per vocabulary token"
            + (" (the embedding table, reused)" if config.tie_word_embeddings else ""),
        ),
    ]
    return [ShapeStep(*row) for row in rows]


def measured_shapes(steps: list[ShapeStep], cap: Capture) -> list[str]:
    """The shape the forward pass really produced at each step, where it can be seen from
    outside: a module's output (a forward hook), or the recorded attention weights."""
    seen = []
    for s in steps:
        if s.module is not None:
            shape = cap.shapes.get(s.module)
        elif s.step == "attention weights":
            shape = tuple(cap.attention.shape[1:])
        elif s.step == "token ids":
            shape = (len(cap.ids),)
        else:
            shape = None
        seen.append("" if shape is None else f"[{', '.join(map(str, shape))}]")
    return seen


def shape_table(steps: list[ShapeStep], cap: Capture | None = None) -> pd.DataFrame:
    """The steps for the page: symbolic and actual shapes, one token's slice of them and, with a
    capture, the shapes the forward pass really produced."""

    def token_slice(step: ShapeStep) -> str:
        # One token is one position: drop the (first) T axis; its attention row keeps the keys.
        dims, shape = list(step.dims), list(step.shape)
        i = dims.index("T")
        del dims[i], shape[i]
        return "one id" if not shape else f"[{', '.join(map(str, shape))}]"

    table = pd.DataFrame(
        {
            "part": [s.part for s in steps],
            "step": [s.step for s in steps],
            "shape": [f"[{', '.join(s.dims)}]" for s in steps],
            "here": [f"[{', '.join(map(str, s.shape))}]" for s in steps],
            "one token's slice": [token_slice(s) for s in steps],
            "module": [_module_label(s.module) for s in steps],
            "what happens": [s.note for s in steps],
        }
    )
    if cap is not None:
        table.insert(4, "measured", measured_shapes(steps, cap))
    return table


def _module_label(module: str | None) -> str:
    """Block 0's module path written for any block: model.layers.i.mlp.up_proj."""
    if module is None:
        return ""
    if module == "model.layers.0" or module.startswith("model.layers.0."):
        return "model.layers.i" + module.removeprefix("model.layers.0")
    return module


# -----------------------------------------------------------------------------
# the logit lens


def layer_names(num_layers: int) -> list[str]:
    return ["embedding", *(f"block {i}" for i in range(1, num_layers + 1))]


@torch.inference_mode()
def lens_probabilities(model: GPT, residuals: Tensor) -> Tensor:
    """Softmax of final norm + lm_head applied to each residual [..., C] -> [..., V]: what the
    model would predict if the stream stopped there. For the last block's output this is
    exactly the model's own prediction."""
    weight = model.lm_head.weight
    h = model.model.norm(residuals.to(weight.device, weight.dtype))
    return model.lm_head(h).float().softmax(dim=-1).cpu()


@dataclass(frozen=True)
class Lens:
    """The logit lens at one position."""

    table: pd.DataFrame  # layer, top token, top probability, final token's rank and probability
    final_token: str  # what the model finally predicts there


def logit_lens(model: GPT, tokenizer, cap: Capture, position: int) -> Lens:
    """For each layer, the top-1 token the stream at ``position`` would give, and the rank and
    probability of the model's final top-1 token."""
    probs = lens_probabilities(model, cap.residuals[:, position])  # [L + 1, V]
    final = int(probs[-1].argmax())
    final_p = probs[:, final]
    top_p, top_id = probs.max(dim=-1)
    ranks = (probs > final_p[:, None]).sum(dim=-1) + 1
    table = pd.DataFrame(
        {
            "layer": layer_names(cap.num_layers),
            "top token": [token_label(tokenizer, i) for i in top_id.tolist()],
            "top probability": top_p.tolist(),
            "rank of final": ranks.tolist(),
            "probability of final": final_p.tolist(),
        }
    )
    return Lens(table, token_label(tokenizer, final))


def lens_grid(model: GPT, tokenizer, cap: Capture, positions: list[int]) -> pd.DataFrame:
    """Top-1 token and its probability for each (layer, position): long format."""
    rows = []
    names = layer_names(cap.num_layers)
    for layer, stream in enumerate(cap.residuals):  # one layer at a time: [P, V] stays small
        top_p, top_id = lens_probabilities(model, stream[positions]).max(dim=-1)
        for position, p, i in zip(positions, top_p.tolist(), top_id.tolist(), strict=True):
            rows.append((names[layer], position, token_label(tokenizer, i), p))
    return pd.DataFrame(rows, columns=["layer", "position", "top token", "top probability"])


def lens_grid_figure(grid: pd.DataFrame, labels: list[str]) -> go.Figure:
    """Layers (rows, embedding at the bottom) by positions: colour the top-1 probability, text
    the top-1 token."""
    layers = list(dict.fromkeys(grid["layer"]))
    positions = list(dict.fromkeys(grid["position"]))
    z = grid.pivot(index="layer", columns="position", values="top probability")
    text = grid.pivot(index="layer", columns="position", values="top token")
    z, text = z.loc[layers, positions], text.loc[layers, positions]
    x = [labels[p] for p in positions]
    fig = go.Figure(
        go.Heatmap(
            z=z.to_numpy(),
            x=x,
            y=layers,
            text=text.to_numpy(),
            texttemplate="%{text}",
            textfont={"size": 12},
            colorscale="Greens",
            zmin=0,
            zmax=1,
            colorbar={"title": "top-1 probability"},
            hovertemplate="%{y}, after %{x}<br>top: %{text} (%{z:.3f})<extra></extra>",
        )
    )
    fig.update_layout(
        title="Logit lens: each layer's top-1 guess for the next token",
        xaxis={"title": "position (the guess is for the token after it)", "type": "category"},
        yaxis={"title": "layer", "type": "category"},
        height=max(320, 90 + 22 * len(layers)),
        margin={"t": 50, "b": 10},
    )
    return fig


def final_token_figure(lens: Lens) -> go.Figure:
    """The final prediction's probability and rank at every layer, one axis each."""
    t = lens.table
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    fig.add_scatter(
        x=t["layer"], y=t["probability of final"], mode="lines+markers", name="probability",
        row=1, col=1,
    )  # fmt: skip
    fig.add_scatter(
        x=t["layer"], y=t["rank of final"], mode="lines+markers", name="rank", row=2, col=1
    )
    fig.update_yaxes(title_text="probability", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="rank (1 = top)", type="log", autorange="reversed", row=2, col=1)
    fig.update_xaxes(title_text="layer", type="category", row=2, col=1)
    fig.update_layout(
        title=f"How early the final prediction {lens.final_token!r} emerges",
        showlegend=False,
        height=460,
        margin={"t": 50, "b": 10},
    )
    return fig


# -----------------------------------------------------------------------------
# perplexity


@dataclass(frozen=True)
class Perplexity:
    value: float  # exp(mean NLL)
    mean_nll: float  # nats per token
    num_tokens: int  # tokens scored (all but the first, which has nothing before it)


def perplexity(nll: np.ndarray) -> Perplexity | None:
    """exp of the mean negative log-likelihood per token, or None when nothing was scored."""
    if nll.size == 0:
        return None
    mean = float(np.mean(nll, dtype=np.float64))
    return Perplexity(math.exp(mean), mean, int(nll.size))


def surprisal_figure(cap: Capture, labels: list[str]) -> go.Figure:
    """-ln p of each token given the ones before it (the first token is not scored)."""
    fig = go.Figure(
        go.Bar(
            x=labels[1:],
            y=cap.nll,
            marker_color="#d62728",
            hovertemplate="%{x}: %{y:.2f} nats<extra></extra>",
        )
    )
    fig.update_layout(
        title="Surprise of each token: −ln p(token | the tokens before it)",
        xaxis={"title": "token", "tickangle": -60, "type": "category"},
        yaxis={"title": "negative log-likelihood (nats)", "rangemode": "tozero"},
        height=360,
        margin={"t": 50, "b": 10},
    )
    return fig
