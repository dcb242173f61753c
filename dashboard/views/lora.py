"""LoRA & QLoRA: the low-rank update W + BA drawn on a real tutor layer, and what a rank costs in
trainable parameters and training memory for real model shapes (finetune.estimate)."""

from __future__ import annotations

import streamlit as st

from dashboard.lib.lora import (
    lora_counts,
    lora_factors,
    lora_figure,
    matrix_rank,
    memory_breakdown_table,
    model_table,
)
from dashboard.resources import tutor
from finetune.estimate import DEFAULT_TARGET_MODULES, MODEL_SHAPES
from finetune.quantization import weight_matrices

MODEL = "tutor-base"


@st.cache_data(show_spinner=False, max_entries=64)
def layer_picture(name: str, rank: int, seed: int):
    weight = weight_matrices(tutor(MODEL)[0])[name].float()
    b, a = lora_factors(weight, rank, seed)
    return lora_figure(weight, b, a), matrix_rank(b @ a)


st.title("LoRA & QLoRA")
st.markdown(
    "**Full fine-tuning** updates every weight of a pre-trained model, so it needs memory for "
    "the weights, their gradients and the optimizer's state of every one of them. **LoRA** "
    "(Low-Rank Adaptation, Hu et al., 2021) freezes the pre-trained matrix W (d × k) and learns "
    "only a correction made of two thin matrices: B (d × r) and A (r × k), with a small rank r. "
    "The layer computes Wx + (α/r)·BAx. Only B and A are trained: r·(d + k) numbers instead of "
    "d·k. B starts at zero, so training starts from exactly the pre-trained model; afterwards "
    "BA can be added into W, so the fine-tuned model is no slower. On GPT-3 175B the LoRA paper "
    "reports 10,000 times fewer trainable parameters and a third of the GPU memory of full "
    "fine-tuning with Adam. Fine-tuning in any form is **transfer learning**: what the model "
    "learned in pre-training carries over to the new task, so a few hundred examples can "
    "teach what would take billions of tokens from scratch."
)

model, _ = tutor(MODEL)
matrices = weight_matrices(model)

# --- one layer --------------------------------------------------------------------------------
st.subheader("W + BA on one of the tutor's layers")
c1, c2 = st.columns([2, 1])
name = c1.selectbox(
    "Layer",
    list(matrices),
    format_func=lambda n: n.removeprefix("model.").removesuffix(".weight"),
    key="lora_layer",
)
d, k = matrices[name].shape
rank = c2.slider("Rank r", 1, 64, 8, key="lora_rank")
rank_in_layer = min(rank, d, k)
figure, product_rank = layer_picture(name, rank_in_layer, 0)
st.plotly_chart(figure, key="lora_heatmaps")
counts = lora_counts(d, k, rank_in_layer)
m1, m2, m3 = st.columns(3)
m1.metric("Weights in W (frozen)", f"{counts['full']:,}")
m2.metric(
    "Trainable in B and A", f"{counts['lora']:,}", help=f"r·(d + k) = {rank_in_layer}·({d} + {k})"
)
m3.metric("Trainable, as a share of W", f"{counts['percent']:.2f}%")
st.caption(
    f"B and A here are random numbers standing in for trained ones (real training starts with "
    f"B = 0). Their product has rank {product_rank}: however large W is, a rank-{rank_in_layer} "
    "update can only change it along that many directions. The LoRA paper found small ranks "
    "(even 1 to 8) already work well on the tasks it tested. Colours: red negative, blue "
    "positive."
)

# --- real model shapes ------------------------------------------------------------------------
st.subheader("What rank r costs on real models")
targets = st.multiselect(
    "Layers that get adapters (in every decoder layer)",
    list(DEFAULT_TARGET_MODULES),
    default=list(DEFAULT_TARGET_MODULES),
    key="lora_targets",
)
if not targets:
    st.info("Choose at least one kind of layer to put LoRA adapters on.")
else:
    b1, b2 = st.columns(2)
    batch_size = b1.number_input("Batch size", 1, 64, 1, key="lora_batch")
    seq_len = b2.number_input("Sequence length (tokens)", 16, 8192, 512, step=16, key="lora_seq")
    table = model_table(rank, targets, int(batch_size), int(seq_len))
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "parameters": st.column_config.NumberColumn(format="localized"),
            "LoRA trainable": st.column_config.NumberColumn(format="localized"),
            "trainable %": st.column_config.NumberColumn(format="%.4f%%"),
            **{
                c: st.column_config.NumberColumn(format="%.2f")
                for c in table.columns
                if c.endswith("(GB)")
            },
        },
        key="lora_models",
    )
    shape = st.selectbox("Where does the memory go?", list(MODEL_SHAPES), index=2, key="lora_model")
    st.dataframe(
        memory_breakdown_table(MODEL_SHAPES[shape], rank, targets, int(batch_size), int(seq_len)),
        hide_index=True,
        column_config={
            c: st.column_config.NumberColumn(format="%.2f")
            for c in ("weights", "gradients", "optimizer", "activations", "total")
        },
        key="lora_breakdown",
    )
    st.caption(
        "GB = 10⁹ bytes. Estimates from `finetune/estimate.py` (the same numbers as `genai-lab "
        "finetune --dry-run`): AdamW with two fp32 states per trainable parameter, adapters and "
        "their gradients in fp32, activations for the batch without gradient checkpointing, no "
        "framework overhead. A full fine-tune trains every parameter, so every parameter needs "
        "a gradient and optimizer state; LoRA needs them only for the adapters. The full bf16 "
        "column assumes 12 bytes per parameter (bf16 weight 2 + bf16 gradient 2 + two fp32 AdamW "
        "moments 8), with no fp32 master copy; the often-quoted 16 bytes per parameter is "
        "mixed-precision training that keeps fp32 master weights (+4), which would add a third "
        "again to the weights-and-optimizer part."
    )

st.subheader("QLoRA: LoRA on a 4-bit base model")
st.markdown(
    "With LoRA the frozen weights dominate the memory. **QLoRA** (Dettmers et al., 2023) stores "
    "them in 4-bit NormalFloat (NF4) with double-quantized block scales, about 4.127 bits per "
    "weight instead of 16, and dequantizes each layer to 16-bit on the fly for the forward and "
    "backward pass. Gradients flow *through* the frozen quantized weights into the LoRA "
    "adapters, which stay in 16/32-bit; paged optimizers move optimizer state to CPU memory "
    "when the GPU runs short. That is how the paper fine-tunes a 65B model on one 48 GB GPU, "
    "where regular 16-bit fine-tuning needs more than 780 GB. The Quantization page shows what "
    "NF4 does to a real matrix."
)
