"""Tables and figures for the Quantization page; pure functions of `finetune.quantization` results."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from core.lm.sampling import kl_divergence
from dashboard.lib.next_token import token_labels
from finetune.quantization import (
    QuantizedWeight,
    bits_per_parameter,
    quantization_error,
    weight_memory_bytes,
)

GB = 1e9  # decimal gigabytes, as model sizes are quoted ("a 70B model at fp16 is 140 GB")

SCHEME_NAMES = {
    "int8": "int8 (absmax per row, LLM.int8)",
    "nf4": "NF4 (4-bit NormalFloat)",
    "fp4": "FP4 (4-bit float)",
}


def _float_round_trip(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.detach().to(dtype).float()


def scheme_table(weight: Tensor, results: dict[str, QuantizedWeight]) -> pd.DataFrame:
    """One row per storage format of ``weight``: bits and bytes (codes + scales), size relative to
    fp32, and the error after the round trip. fp16/bf16 rows are plain casts, for reference."""
    w = weight.detach().float()
    n = w.numel()
    rows = [("fp32", 32.0, 4 * n, w), ("fp16", 16.0, 2 * n, _float_round_trip(w, torch.float16))]
    rows.append(("bf16", 16.0, 2 * n, _float_round_trip(w, torch.bfloat16)))
    for scheme, q in results.items():
        label = SCHEME_NAMES[scheme] + (" + double quant" if q.double_quant else "")
        rows.append((label, q.bits_per_parameter, q.storage_bytes, q.dequantized))
    records = []
    for label, bits, nbytes, approx in rows:
        error = quantization_error(w, approx)
        records.append(
            {
                "format": label,
                "bits per weight": bits,
                "bytes": int(nbytes),
                "× smaller than fp32": 4 * n / nbytes,
                "max |error|": error.max_abs,
                "mean |error|": error.mean_abs,
                "relative error": error.relative,
            }
        )
    return pd.DataFrame(records)


def _histogram(values: Tensor, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(values.reshape(-1).numpy(), bins=edges)
    return counts


def value_histogram_figure(weight: Tensor, q: QuantizedWeight, bins: int = 121) -> go.Figure:
    """Histogram of the original weights and of their dequantized values on the same bins.

    Dequantized values can only take a few values per block (16 for 4-bit), so their histogram
    is spiky where the original is smooth.
    """
    w = weight.detach().float()
    limit = float(w.abs().max()) or 1.0
    edges = np.linspace(-limit, limit, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    fig.add_bar(
        x=centres,
        y=_histogram(w, edges),
        name="original (fp32)",
        marker_color="#9ecae1",
        width=edges[1] - edges[0],
    )
    fig.add_scatter(
        x=centres,
        y=_histogram(q.dequantized, edges),
        name=f"after {SCHEME_NAMES[q.scheme]}",
        mode="lines",
        line={"shape": "hvh", "color": "#d62728", "width": 1.5},
    )
    fig.update_layout(
        xaxis={"title": "weight value"},
        yaxis={"title": "number of weights"},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 10, "b": 10},
        height=340,
        bargap=0,
    )
    return fig


def normalised_weights(weight: Tensor, q: QuantizedWeight) -> Tensor:
    """Each weight divided by the absmax of its block, in [-1, 1]: what gets rounded to a level."""
    w = weight.detach().float().reshape(-1)
    if q.blocksize is None:  # int8: one scale per row
        return (weight.detach().float() / q.scales[:, None]).reshape(-1)
    scale = q.scales.repeat_interleave(q.blocksize)[: w.numel()]
    return w / scale


def level_usage(q: QuantizedWeight) -> pd.DataFrame:
    """The 16 levels of a 4-bit scheme in increasing order and how many weights use each."""
    if q.levels is None:
        raise ValueError("level usage is only defined for the 4-bit schemes")
    counts = torch.bincount(q.codes.reshape(-1), minlength=16)
    order = q.levels.argsort()
    return pd.DataFrame(
        {
            "code": order.tolist(),
            "level": q.levels[order].tolist(),
            "weights": counts[order].tolist(),
        }
    )


def level_figure(weight: Tensor, results: dict[str, QuantizedWeight], bins: int = 101) -> go.Figure:
    """For each 4-bit scheme: the weights scaled to [-1, 1] by their block's absmax (grey), the 16
    levels they are rounded to (lines), and how many weights each level receives (bars)."""
    four_bit = [q for q in results.values() if q.levels is not None]
    fig = make_subplots(
        rows=len(four_bit),
        cols=1,
        shared_xaxes=True,
        subplot_titles=[SCHEME_NAMES[q.scheme] for q in four_bit],
        vertical_spacing=0.12,
        specs=[[{"secondary_y": True}] for _ in four_bit],
    )
    edges = np.linspace(-1, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for row, q in enumerate(four_bit, start=1):
        usage = level_usage(q)
        fig.add_bar(
            x=centres,
            y=_histogram(normalised_weights(weight, q), edges),
            marker_color="#cccccc",
            width=edges[1] - edges[0],
            name="weights ÷ their block's absmax (left axis)",
            showlegend=row == 1,
            row=row,
            col=1,
        )
        fig.add_bar(
            x=usage["level"],
            y=usage["weights"],
            marker_color="#d62728",
            width=0.012,
            name="weights rounded to each of the 16 levels (right axis)",
            hovertemplate="level %{x:.4f}: %{y} weights<extra></extra>",
            showlegend=row == 1,
            row=row,
            col=1,
            secondary_y=True,
        )
        fig.update_yaxes(rangemode="tozero", row=row, col=1, secondary_y=True)
    fig.update_layout(
        barmode="overlay",
        bargap=0,
        legend={"orientation": "h", "y": -0.15},
        margin={"t": 30, "b": 10},
        height=260 * len(four_bit),
    )
    fig.update_xaxes(title_text="value / block absmax", row=len(four_bit), col=1)
    return fig


# -----------------------------------------------------------------------------
# a whole model at several precisions


def precision_table(probs: dict[str, Tensor], tokenizer, top_n: int = 8) -> pd.DataFrame:
    """The ``top_n`` most likely next tokens under the first precision (the reference), with
    their probability under each precision."""
    reference = next(iter(probs.values()))
    ids = reference.topk(min(top_n, reference.numel())).indices.tolist()
    table = pd.DataFrame({"token": token_labels(tokenizer, ids)})
    for name, p in probs.items():
        table[name] = [float(p[i]) for i in ids]
    return table


def divergence_table(probs: dict[str, Tensor], weight_bytes: dict[str, int]) -> pd.DataFrame:
    """How far each precision's next-token distribution is from the first (the reference)."""
    names = list(probs)
    reference = probs[names[0]]
    rows = []
    for name in names:
        p = probs[name]
        rows.append(
            {
                "precision": name,
                "model weights (MB)": weight_bytes[name] / 1e6,
                f"KL({names[0]} ‖ this), nats": kl_divergence(reference, p),
                "largest probability change": float((p - reference).abs().max()),
                "same top token": bool(p.argmax() == reference.argmax()),
            }
        )
    return pd.DataFrame(rows)


def precision_figure(table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    colours = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd"]
    for colour, name in zip(colours, [c for c in table.columns if c != "token"], strict=False):
        fig.add_bar(x=table["token"], y=table[name], name=name, marker_color=colour)
    fig.update_layout(
        barmode="group",
        yaxis={"title": "probability of the next token", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 10, "b": 10},
        height=340,
    )
    return fig


# -----------------------------------------------------------------------------
# the calculator

CALCULATOR_FORMATS = [
    ("fp32", "fp32", False),
    ("fp16 / bf16", "fp16", False),
    ("int8", "int8", False),
    ("4-bit (NF4/FP4), fp32 scale per 64 weights", "nf4", False),
    ("4-bit NF4 + double quantization (QLoRA)", "nf4", True),
]


def memory_table(num_parameters: float) -> pd.DataFrame:
    """Bytes of the weights alone at each storage format (1 GB = 10^9 bytes)."""
    rows = []
    for label, dtype, double_quant in CALCULATOR_FORMATS:
        rows.append(
            {
                "format": label,
                "bits per weight": bits_per_parameter(dtype, 64, double_quant),
                "weights (GB)": weight_memory_bytes(num_parameters, dtype, 64, double_quant) / GB,
            }
        )
    return pd.DataFrame(rows)
