"""Figures and tables for the LoRA & QLoRA page. The counts and the memory model are those of
`finetune.estimate` (the numbers `genai-lab finetune --dry-run` prints); this module only draws."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from dashboard.lib.quantization import GB
from finetune.estimate import MODEL_SHAPES, count_parameters, estimate_memory, lora_parameter_count


def lora_factors(weight: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random stand-ins for trained LoRA factors of ``weight`` (d × k): B (d × r) and A (r × k).

    Real training starts from B = 0 (so BA = 0 and the model is unchanged) and learns both. Here
    both are Gaussian, scaled so that BA's entries are about half as large as W's, which keeps
    the picture readable.
    """
    d, k = weight.shape
    if not (1 <= rank <= min(d, k)):
        raise ValueError(f"rank must be between 1 and min(d, k) = {min(d, k)}, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(d, rank, generator=generator)
    a = torch.randn(rank, k, generator=generator)
    # std(BA) = std(B) * std(A) * sqrt(r) for independent unit Gaussians: sqrt(r).
    target = 0.5 * float(weight.float().std())
    scale = (target / rank**0.5) ** 0.5
    return b * scale, a * scale


def lora_counts(d: int, k: int, rank: int) -> dict[str, int]:
    """Parameters of one d × k layer: full, LoRA (r·(d + k)), and their ratio in percent."""
    full, lora = d * k, rank * (d + k)
    return {"full": full, "lora": lora, "percent": 100.0 * lora / full}


def lora_figure(weight: Tensor, b: Tensor, a: Tensor) -> go.Figure:
    """W (frozen), B, A and the update BA as heatmaps, drawn to scale: B is r columns wide and A
    is r rows tall, against W's d rows and k columns."""
    d, k = weight.shape
    r = b.shape[1]
    delta = b @ a
    limit = float(torch.cat([weight.float().abs().flatten(), delta.abs().flatten()]).max())
    panels = [
        (weight.float(), f"W, frozen ({d} × {k})"),
        (b, f"B ({d} × {r})"),
        (a, f"A ({r} × {k})"),
        (delta, f"ΔW = BA ({d} × {k}, rank {r})"),
        (weight.float() + delta, "W + BA"),
    ]
    # B's true width (r columns) vanishes beside k columns at small ranks; keep it visible.
    widths = [k, max(r, k / 10), k, k, k]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        column_widths=widths,
        subplot_titles=[title for _, title in panels],
        horizontal_spacing=0.03,
    )
    for col, (matrix, _) in enumerate(panels, start=1):
        fig.add_heatmap(
            z=matrix.numpy(),
            zmin=-limit,
            zmax=limit,
            colorscale="RdBu",
            showscale=col == len(panels),
            hovertemplate="row %{y}, col %{x}: %{z:.4f}<extra></extra>",
            row=1,
            col=col,
        )
        # Every panel on W's row scale, top to bottom, so A's r rows look r/d as tall.
        fig.update_yaxes(range=[d - 0.5, -0.5], showticklabels=col == 1, row=1, col=col)
        fig.update_xaxes(showticklabels=False, row=1, col=col)
    fig.update_layout(height=360, margin={"t": 40, "b": 10, "l": 10, "r": 10})
    return fig


def matrix_rank(matrix: Tensor) -> int:
    """Numerical rank, with the tolerance of the matrix's own precision (an fp32 product carries
    fp32 rounding noise, which a float64 tolerance would count as extra directions)."""
    return int(torch.linalg.matrix_rank(matrix))


def model_table(
    rank: int,
    target_modules: list[str] | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    models: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """Per model shape: total and trainable LoRA parameters, and the training memory estimates of
    `finetune.estimate` for a full fine-tune (bf16), LoRA (bf16 base) and QLoRA (NF4 base)."""
    rows = []
    for name, config in (MODEL_SHAPES if models is None else models).items():
        total = count_parameters(config)
        lora = lora_parameter_count(config, rank, target_modules)
        full = estimate_memory(config, "full", batch_size=batch_size, seq_len=seq_len)
        adapters = estimate_memory(config, "lora", rank, batch_size, seq_len, target_modules)
        rows.append(
            {
                "model": name,
                "parameters": total,
                "LoRA trainable": lora,
                "trainable %": 100.0 * lora / total,
                "full fine-tune, bf16 (GB)": full["bf16"]["total"] / GB,
                "LoRA, bf16 base (GB)": adapters["bf16"]["total"] / GB,
                "QLoRA, NF4 base (GB)": adapters["nf4"]["total"] / GB,
            }
        )
    return pd.DataFrame(rows)


def memory_breakdown_table(
    config: dict,
    rank: int,
    target_modules: list[str] | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
) -> pd.DataFrame:
    """Where the memory goes (GB) for one model: weights, gradients, optimizer, activations."""
    full = estimate_memory(config, "full", batch_size=batch_size, seq_len=seq_len)
    adapters = estimate_memory(config, "lora", rank, batch_size, seq_len, target_modules)
    rows = [
        ("full fine-tune, bf16", full["bf16"]),
        ("LoRA, bf16 base", adapters["bf16"]),
        ("QLoRA, NF4 base", adapters["nf4"]),
    ]
    return pd.DataFrame(
        [{"method": label, **{k: v / GB for k, v in row.items()}} for label, row in rows]
    )
