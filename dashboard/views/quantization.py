"""Quantization: a real weight matrix of the tutor in int8, NF4 and FP4 (bitsandbytes), the
whole tutor at fp32 / 8-bit / 4-bit on one prompt, and a memory calculator with QLoRA's figures."""

from __future__ import annotations

import streamlit as st

from dashboard.lib.next_token import fit_document_prompt
from dashboard.lib.quantization import (
    GB,
    SCHEME_NAMES,
    divergence_table,
    level_figure,
    memory_table,
    precision_figure,
    precision_table,
    scheme_table,
    value_histogram_figure,
)
from dashboard.resources import tutor
from finetune.quantization import (
    PRECISIONS,
    SCHEMES,
    constant_bits_per_parameter,
    load_hf_model,
    next_token_probabilities,
    quantize_weight,
    stored_weight_bytes,
    weight_matrices,
    weight_memory_bytes,
)

MODEL = "tutor-base"


@st.cache_resource(show_spinner=False)
def quantized(name: str, blocksize: int, double_quant: bool):
    weight = weight_matrices(tutor(MODEL)[0])[name]
    return {s: quantize_weight(weight, s, blocksize, double_quant) for s in SCHEMES}


@st.cache_resource(show_spinner="Loading the tutor at fp32, 8-bit and 4-bit ...")
def models_at_every_precision(double_quant: bool):
    models = {p: load_hf_model(MODEL, p, double_quant=double_quant) for p in PRECISIONS}
    # Sizes before the first forward pass: on CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit
    # weights then (bf16 scales). One pass here, under the cache's lock, so that repacking never
    # races between two visitors.
    sizes = {p: stored_weight_bytes(m) for p, m in models.items()}
    bos = tutor(MODEL)[1].bos_token_id
    for m in models.values():
        next_token_probabilities(m, [bos])
    return models, sizes


@st.cache_data(show_spinner=False, max_entries=32)
def distributions(ids: tuple[int, ...], double_quant: bool):
    models, sizes = models_at_every_precision(double_quant)
    probs = {p: next_token_probabilities(m, list(ids)) for p, m in models.items()}
    return probs, sizes


def matrix_label(name: str) -> str:
    parts = name.removeprefix("model.").removesuffix(".weight").split(".")
    if parts[0] == "layers":
        return f"layer {parts[1]}: {'.'.join(parts[2:])}"
    return ".".join(parts)


st.title("Quantization")
st.markdown(
    "A model's parameters are numbers, usually stored as 16-bit or 32-bit floats. "
    "**Quantization** stores them with fewer bits (8 or 4) and turns them back into floats when "
    "they are used. The model gets 2-8 times smaller, which is often what decides whether it "
    "fits in a GPU's memory at all, at the price of rounding every weight. Whether it also gets "
    "faster depends on the hardware and its kernels: on the CPU this page was built on, the "
    "bitsandbytes layers were slower than plain fp32. Everything below is done by "
    "**bitsandbytes**, the library "
    "behind `BitsAndBytesConfig` in Hugging Face transformers, on a real matrix of our tutor."
)

model, tokenizer = tutor(MODEL)
matrices = weight_matrices(model)

# --- one matrix -------------------------------------------------------------------------------
st.subheader("One weight matrix, three ways")
c1, c2, c3 = st.columns([2, 1, 1])
name = c1.selectbox("Weight matrix", list(matrices), format_func=matrix_label, key="q_matrix")
blocksize = c2.selectbox("4-bit block size", [32, 64, 128, 256], index=1, key="q_blocksize")
double_quant = c3.checkbox(
    "Double quantization", key="q_double", help="Store the 4-bit block scales in 8 bits too."
)
weight = matrices[name]
rows, cols = weight.shape
st.caption(
    f"`{name}`: {rows} × {cols} = {weight.numel():,} weights. The shipped file stores them as "
    "fp16; they are loaded as fp32."
)
st.markdown(
    "- **int8** (what `load_in_8bit=True` stores, from LLM.int8()): each row is divided by its "
    "largest absolute value (*absmax*) and multiplied by 127, then rounded: 255 evenly spaced "
    "levels per row, plus one fp32 scale per row.\n"
    f"- **4-bit** (`load_in_4bit=True`): the weights are cut into blocks of {blocksize}; each "
    "block is divided by its absmax and every value is rounded to the nearest of only 16 "
    "levels. **NF4** (NormalFloat, from the QLoRA paper) places the levels at quantiles of a "
    "normal distribution: close together near 0, where most weights are, and far apart in the "
    "tails. **FP4** is a tiny floating-point format (1 sign, 2 exponent and 1 mantissa bit): "
    "it spends two of its 16 codes on zero (+0 and -0), and leaves no level at all between "
    "±0.005 and ±0.167 of the block's absmax, where many weights lie.\n"
    "- **Double quantization** (QLoRA) stores the per-block scales in 8 bits instead of 32."
)
results = quantized(name, blocksize, double_quant)
table = scheme_table(weight, results)
st.dataframe(
    table,
    hide_index=True,
    column_config={
        "bits per weight": st.column_config.NumberColumn(format="%.3f"),
        "bytes": st.column_config.NumberColumn(format="%d"),
        "× smaller than fp32": st.column_config.NumberColumn(format="%.2f"),
        "max |error|": st.column_config.NumberColumn(format="%.2e"),
        "mean |error|": st.column_config.NumberColumn(format="%.2e"),
        "relative error": st.column_config.NumberColumn(format="percent"),
    },
    key="q_table",
)
st.caption(
    "Bytes count the stored codes and their scales, as bitsandbytes keeps them (not the "
    "formats' fixed tables of 16 or 256 levels). Relative error: "
    "‖W − W_quantized‖ / ‖W‖. fp16 shows no error because the shipped weights already are fp16 "
    "values; bf16 keeps fewer mantissa bits (7 stored, 8 counting the implicit leading 1, "
    "against fp16's 10 and 11) and rounds them."
)

shown = st.radio(
    "Histogram after",
    list(SCHEMES),
    format_func=lambda s: SCHEME_NAMES[s],
    horizontal=True,
    index=1,
    key="q_hist_scheme",
)
st.plotly_chart(value_histogram_figure(weight, results[shown]), key="q_hist")
st.markdown(
    "Inside each 4-bit block, every weight is divided by the block's absmax (so it lies in "
    "[-1, 1]) and rounded to the nearest of the 16 levels drawn below (red bars: how many "
    "weights each level receives). NF4 spreads the weights over its levels far more evenly "
    "than FP4, which is why its error is smaller at the same size:"
)
st.plotly_chart(level_figure(weight, results), key="q_levels")

# --- the whole model --------------------------------------------------------------------------
st.subheader("The whole tutor at fp32, 8-bit and 4-bit")
st.markdown(
    "Here the tutor is loaded by transformers itself, four times: in fp32, and with "
    "`BitsAndBytesConfig(load_in_8bit=True)` or `load_in_4bit=True` (NF4 or FP4), exactly as "
    "one would on a GPU, running on this CPU. Every linear layer becomes a bitsandbytes layer "
    "with quantized weights; the embedding (which is also the output layer here) and the norms "
    "stay in fp32. The 8-bit layers follow LLM.int8(): the activations are rounded to int8 as "
    "well, except feature columns with outliers (|x| ≥ 6), which are multiplied in 16-bit. The "
    "4-bit layers dequantize their weights and multiply in fp32 or, on CPUs with AVX-512 BF16 "
    "instructions, use a fused kernel that computes in bfloat16."
)
prompt_text = st.text_input("Prompt", value="The cat sat on the", key="q_prompt")
if not prompt_text.strip():
    st.info("The prompt is empty: showing the prediction for the start of a document.")
prompt = fit_document_prompt(
    tokenizer, prompt_text, max_tokens=model.config.max_position_embeddings
)
if prompt.message:
    st.warning(prompt.message)
probs, sizes = distributions(tuple(prompt.ids), double_quant)
st.plotly_chart(precision_figure(precision_table(probs, tokenizer)), key="q_precisions")
st.dataframe(
    divergence_table(probs, sizes),
    hide_index=True,
    column_config={
        "model weights (MB)": st.column_config.NumberColumn(format="%.2f"),
        "KL(fp32 ‖ this), nats": st.column_config.NumberColumn(format="%.2e"),
        "largest probability change": st.column_config.NumberColumn(format="%.4f"),
    },
    key="q_divergence",
)
st.caption(
    "Model weights: every parameter as stored, with the quantization scales. The embedding "
    "(1,576 × 192 ≈ 0.3M parameters, 1.2 MB in fp32) is not quantized, which is why the "
    "4-bit model is not 8 times smaller: in a large model the linear layers dominate."
)

# --- the calculator ---------------------------------------------------------------------------
st.subheader("How much memory do the weights need?")
st.markdown(
    "Memory for the weights = number of parameters × bytes per parameter. A 70-billion-"
    "parameter model in fp16 (2 bytes each) needs 140 GB; in 4 bits (half a byte) about 35 GB, "
    "plus the block scales. Running it needs more on top (activations and the KV cache), and "
    "training far more (see the LoRA page)."
)
billions = st.number_input(
    "Parameters (billions)",
    min_value=0.001,
    max_value=2000.0,
    value=70.0,
    step=1.0,
    key="q_params",
)
st.dataframe(
    memory_table(billions * 1e9),
    hide_index=True,
    column_config={
        "bits per weight": st.column_config.NumberColumn(format="%.3f"),
        "weights (GB)": st.column_config.NumberColumn(format="%.2f"),
    },
    key="q_memory",
)
dq_saving = constant_bits_per_parameter(64) - constant_bits_per_parameter(64, double_quant=True)
saved_65b = (weight_memory_bytes(65e9, "nf4") - weight_memory_bytes(65e9, "nf4", 64, True)) / GB
st.caption(
    f"1 GB = 10⁹ bytes. Block scales: one fp32 per 64 weights is {constant_bits_per_parameter(64)} "
    f"bits per weight; double quantization brings it to "
    f"{constant_bits_per_parameter(64, True):.3f} (8 bits per block plus one fp32 per 256 "
    f"blocks), saving {dq_saving:.3f} bits per weight, {saved_65b:.2f} GB for a 65B model."
)
st.markdown(
    "**What the QLoRA paper reports** (Dettmers, Pagnoni, Holtzman and Zettlemoyer, "
    "*QLoRA: Efficient Finetuning of Quantized LLMs*, 2023):\n"
    "- Fine-tuning LLaMA 65B in regular 16-bit needs more than 780 GB of GPU memory; with QLoRA "
    "(a frozen NF4 base model plus LoRA adapters) it fits on a single 48 GB GPU, while matching "
    "16-bit fine-tuning's task performance.\n"
    "- Double quantization saves about 0.37 bits per parameter, roughly 3 GB for a 65B model "
    "(the calculator above gives the same).\n"
    "- Their best Guanaco model, fine-tuned this way, reached 99.3% of ChatGPT's performance "
    "level on the Vicuna benchmark after 24 hours of fine-tuning on one GPU."
)
