"""How big is a fine-tune? Parameter counts and memory, from a model's config alone.

Everything here is arithmetic on a transformers config dict (Llama-family names), so the dashboard
can show a 70B model's numbers without downloading a byte of it. `genai-lab finetune --dry-run`
uses the same memory model with counts taken from the real architecture (`counts_from_model`).

The counts are exact (tests compare them with transformers and peft); the memory figures are an
estimate whose assumptions are listed in `estimate_memory`.
"""

from __future__ import annotations

import json

# The projection names of a Llama-family decoder layer; LoRA targets all of them by default
# (the QLoRA paper's recipe: adapting every linear layer matters more than the rank).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGET_MODULES = (*ATTENTION_MODULES, *MLP_MODULES)

PRECISIONS = ("fp32", "bf16", "int8", "nf4")
BLOCKSIZE_NF4 = 64  # bitsandbytes: one absmax per 64 weights
BLOCKSIZE_DOUBLE_QUANT = 256  # the 8-bit absmaxes are quantized again in blocks of 256


def _tutor_base_shape() -> dict:
    from core.lm.loader import PRETRAINED_DIR

    config = json.loads((PRETRAINED_DIR / "tutor-base" / "config.json").read_text())
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
    )
    return {k: config[k] for k in keys if k in config}


# Published configs (config.json of each model on the Hugging Face Hub), trimmed to the keys that
# determine the parameter count. tests/test_finetune_estimate.py builds each on the meta device
# with transformers and checks the totals: 134,515,008 / 6,738,415,616 / 8,030,261,248 /
# 68,976,648,192.
MODEL_SHAPES: dict[str, dict] = {
    "tutor-base": _tutor_base_shape(),
    "SmolLM2-135M": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "Llama-2-7B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    },
    "Llama-3-8B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    },
    "Llama-2-70B": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    },
}


def _dims(config: dict) -> tuple[int, int, int, int, int, int]:
    try:
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        vocab = config["vocab_size"]
    except KeyError as e:
        raise ValueError(f"model config: missing key {e.args[0]!r}") from None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return hidden, inter, layers, heads * head_dim, kv_heads * head_dim, vocab


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer."""
    hidden, inter, _, q_dim, kv_dim, _ = _dims(config)
    return {
        "q_proj": (hidden, q_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def count_parameters(config: dict) -> int:
    """Total parameters of a Llama-family causal LM (embeddings, layers, norms, LM head)."""
    hidden, _, layers, q_dim, kv_dim, vocab = _dims(config)
    shapes = linear_shapes(config)
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * hidden  # + two RMSNorm weights
    if config.get("attention_bias"):
        per_layer += q_dim + 2 * kv_dim + hidden
    if config.get("mlp_bias"):
        per_layer += 2 * shapes["gate_proj"][1] + hidden
    embeddings = vocab * hidden
    lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * hidden
    return embeddings + layers * per_layer + hidden + lm_head


def quantizable_parameters(config: dict) -> int:
    """Weights that bitsandbytes quantizes: every decoder linear layer (not embeddings, norms or
    the LM head, which stay in 16 bits)."""
    _, _, layers, _, _, _ = _dims(config)
    return layers * sum(i * o for i, o in linear_shapes(config).values())


def lora_parameter_count(config: dict, rank: int, target_modules: list[str] | None = None) -> int:
    """Trainable LoRA parameters: rank × (in + out) for each targeted linear layer (A is
    rank × in, B is out × rank). None targets all seven projections."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    shapes = linear_shapes(config)
    targets = list(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown target module {unknown[0]!r} (known: {', '.join(shapes)})")
    _, _, layers, _, _, _ = _dims(config)
    return layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def activation_elements_per_token(config: dict, method: str) -> float:
    """Values autograd keeps per token for the backward pass (without gradient checkpointing),
    with memory-efficient attention (no seq_len² score matrix).

    Per decoder layer ≈ a·hidden + 4·intermediate + 2·kv_dim: the norms' inputs, q/k/v,
    the attention output, and the SwiGLU gate, up, activation and product. a = 8 for a full
    fine-tune; 6.25 with LoRA, where frozen linear layers need not keep their inputs. Fitted to
    the tensors autograd actually saves in transformers' Llama (test_finetune_estimate.py
    measures them with `saved_tensors_hooks`)."""
    hidden, inter, layers, _, kv_dim, _ = _dims(config)
    a = 8.0 if method == "full" else 6.25
    return layers * (a * hidden + 4 * inter + 2 * kv_dim)


def memory_breakdown(
    total_params: int,
    quantizable_params: int,
    trainable_params: int,
    method: str,
    activation_values: float,
    logit_values: float,
) -> dict[str, dict[str, int] | None]:
    """Bytes per precision from counts; see `estimate_memory` for the assumptions."""
    rest = total_params - quantizable_params
    nf4_bytes = 0.5 + 1 / BLOCKSIZE_NF4 + 4 / (BLOCKSIZE_NF4 * BLOCKSIZE_DOUBLE_QUANT)
    frozen_bytes = {
        "fp32": total_params * 4,
        "bf16": total_params * 2,
        "int8": quantizable_params * 1 + rest * 2,
        "nf4": quantizable_params * nf4_bytes + rest * 2,
    }
    table: dict[str, dict[str, int] | None] = {}
    for precision in PRECISIONS:
        act_bytes = 4 if precision == "fp32" else 2
        if method == "full":
            if precision in ("int8", "nf4"):
                table[precision] = None  # quantized weights cannot be trained directly
                continue
            weights, gradients = frozen_bytes[precision], total_params * act_bytes
        else:
            # LoRA: frozen base + adapters kept in fp32 (peft's default), fp32 gradients
            weights = frozen_bytes[precision] + trainable_params * 4
            gradients = trainable_params * 4
        row = {
            "weights": int(weights),
            "gradients": int(gradients),
            "optimizer": int(trainable_params * 8),  # AdamW: two fp32 moments
            "activations": int(activation_values * act_bytes + logit_values * 4),
        }
        row["total"] = sum(row.values())
        table[precision] = row
    return table


def estimate_memory(
    config: dict,
    method: str = "lora",
    rank: int = 8,
    batch_size: int = 1,
    seq_len: int = 512,
    target_modules: list[str] | None = None,
) -> dict:
    """Training memory in bytes, per precision of the frozen weights.

    Returns ``{"fp32": row, "bf16": row, "int8": row, "nf4": row, ...}`` where each row is
    ``{"weights", "gradients", "optimizer", "activations", "total"}`` in bytes, plus
    ``total_parameters``, ``trainable_parameters``, ``trainable_percent`` and the arguments.
    For ``method="full"`` the int8 and nf4 rows are None: quantized weights cannot be trained.

    Assumptions (documented, not measured on your hardware):
    - weights: fp32 = 4 bytes, bf16 = 2. int8 and nf4 quantize only the decoder's linear layers
      (1 byte, or ½ byte plus the double-quantized block constants of bitsandbytes NF4); the
      embeddings, norms and LM head stay in bf16, as bitsandbytes leaves them.
    - method "lora"/"qlora" (the same table; QLoRA is its nf4 row): adapters and their gradients
      in fp32; method "full": gradients in the compute precision (fp32 row: fp32, else bf16).
    - optimizer: AdamW, two fp32 states per trainable parameter (8 bytes).
    - activations: batch_size × seq_len × `activation_elements_per_token` values in the compute
      precision (fp32 row: 4 bytes, else bf16), plus the fp32 log-probabilities of the loss
      (batch_size × seq_len × vocab × 4 bytes). No gradient checkpointing; memory-efficient
      attention. Framework overhead (CUDA context, allocator caching) is not included: for a
      CPU process's peak, runtime and transients included, see `estimate_process_peak`.
    """
    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"method must be lora, qlora or full, got {method!r}")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError("batch_size and seq_len must be positive")
    total = count_parameters(config)
    trainable = total if method == "full" else lora_parameter_count(config, rank, target_modules)
    tokens = batch_size * seq_len
    table = memory_breakdown(
        total,
        quantizable_parameters(config),
        trainable,
        "full" if method == "full" else "lora",
        activation_values=tokens * activation_elements_per_token(config, method),
        logit_values=tokens * config["vocab_size"],
    )
    return {
        **table,
        "method": method,
        "rank": rank,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_percent": 100.0 * trainable / total,
    }


# ---------------------------------------------------------------------------------------------
# The whole process on CPU: what `ru_maxrss` (finetune/memory.py) will report
# ---------------------------------------------------------------------------------------------
# `memory_breakdown` counts the tensors a step needs. A CPU run's peak resident set also holds the
# Python runtime and its libraries, the checkpoint pages the weights are read from, transient
# buffers of the forward/backward pass and the encoded dataset. Measured here (Linux x86-64,
# 2 cores, torch CPU wheels, transformers 5, bitsandbytes 0.50), see CALIBRATION below.

# `python -c "import torch, transformers, peft"`: 439,048 KiB "Maximum resident set size"
# (/usr/bin/time -v). Adding accelerate, datasets, bitsandbytes and Trainer: 528,176 KiB.
IMPORT_RSS_BYTES = 439_048 * 1024
# The rest of a `genai-lab finetune` process that does not grow with the model: accelerate,
# datasets, bitsandbytes, the CLI, the tokenizer, Trainer and its thread pools. Fitted to the two
# tutor-base runs, whose model tensors are under 20 MiB (their peaks: 645 and 640 MiB).
TRAINER_RSS_BYTES = 190 * 2**20
# Peak activation memory / the autograd-saved values of `activation_elements_per_token` plus one
# fp32 copy of the logits. The backward pass holds gradients of those tensors while they are
# still alive, the loss keeps log-probabilities and their gradient (B x T x vocab each), and
# CPU memory freed between steps of different lengths is not returned to the OS (glibc heap).
# Fitted to the SmolLM2-135M LoRA run (972 MiB of transients over 323 MiB estimated); the
# evaluation pass runs without gradients and stays below it.
TRANSIENT_FACTOR = 3.0
# Encoded rows held in memory: input_ids and labels as Python lists (an 8-byte pointer and a
# 28-byte int object per token: token ids above 256 are not cached) plus the Arrow copy in the
# `datasets.Dataset` Trainer reads (8 bytes each).
DATASET_BYTES_PER_TOKEN = 2 * (8 + 28) + 2 * 8

# Estimate vs measured peak RSS, with the command that produced each measurement (data
# finetune/examples/data/tutor_alpaca.json, 16 rows; HF_HUB_OFFLINE=1):
#   /usr/bin/time -v genai-lab finetune --model M --method X --data ...tutor_alpaca.json \
#       --max-steps 3 --batch-size 4 --max-length 128 --num-samples 0 --quiet --output-dir D
# tests/test_finetune_estimate.py checks each estimate is within 30% of the measured peak.
# Longest row 43 tokens (tutor-base), 60 (SmolLM2). Estimate / measured:
#   tutor-base LoRA  657 / 645 MiB (+2%)   SmolLM2-135M LoRA   2,140 / 2,153 MiB (-1%)
#   tutor-base QLoRA 659 / 640 MiB (+3%)   SmolLM2-135M QLoRA  2,299 / 2,319 MiB (-1%)
# (Before this model the printed estimate was the tensor total: 19, 9, 874 and 328 MiB.) The
# runtime and TRANSIENT_FACTOR were fitted to three of these runs, so only the QLoRA SmolLM2 one
# is a check; another: a 140-step QLoRA SmolLM2 run, batch 4, measured 3.4 GB where the tensor
# total said 524.5 MiB (longest row ~124 tokens): this model says 3.5 GB. Not yet measured:
# rows of 512+ tokens, where TRANSIENT_FACTOR is an extrapolation.
CALIBRATION = {
    # (model, method): measured "Maximum resident set size" in KiB
    ("tutor-base", "lora"): 660_376,
    ("tutor-base", "qlora"): 655_164,
    ("smollm2-135m-instruct", "lora"): 2_204_364,
    ("smollm2-135m-instruct", "qlora"): 2_374_812,
}


def estimate_process_peak(
    total_params: int,
    quantizable_params: int,
    trainable_params: int,
    method: str,
    activation_values: float,
    logit_values: float,
    dataset_tokens: int = 0,
) -> dict[str, int]:
    """Peak resident memory of a `genai-lab finetune` process on CPU, in bytes, by part:
    ``{"runtime", "weights", "gradients", "optimizer", "activations", "dataset", "total"}``.

    On CPU everything computes in fp32 (finetune/base_model.py `compute_dtype`), whatever the
    storage of the frozen weights. Weights: transformers 5 memory-maps the safetensors file and
    keeps the mapping, so the pages of an fp32 checkpoint stay resident (LoRA uses them in place:
    total × 4 bytes); QLoRA adds the NF4 linear layers and an fp32 copy of the rest (embeddings,
    norms) to those pages (measured: 1,078 MiB resident after loading SmolLM2-135M in 4 bits,
    555 MiB of it file pages). Activations: fp32, × TRANSIENT_FACTOR. For a GPU run compare
    `memory_breakdown`'s total with torch.cuda.max_memory_allocated instead (not calibrated).
    """
    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"method must be lora, qlora or full, got {method!r}")
    rest = total_params - quantizable_params
    nf4_bytes = 0.5 + 1 / BLOCKSIZE_NF4 + 4 / (BLOCKSIZE_NF4 * BLOCKSIZE_DOUBLE_QUANT)
    weights = total_params * 4
    if method == "qlora":
        weights += quantizable_params * nf4_bytes + rest * 4
    if method != "full":
        weights += trainable_params * 4  # the fp32 adapters
    row = {
        "runtime": IMPORT_RSS_BYTES + TRAINER_RSS_BYTES,
        "weights": int(weights),
        "gradients": int(trainable_params * 4),
        "optimizer": int(trainable_params * 8),  # AdamW: two fp32 moments
        "activations": int(TRANSIENT_FACTOR * (activation_values + logit_values) * 4),
        "dataset": int(dataset_tokens * DATASET_BYTES_PER_TOKEN),
    }
    row["total"] = sum(row.values())
    return row


def counts_from_model(model, target_modules: list[str]) -> dict[str, int]:
    """Exact counts from an instantiated model of any architecture (the meta device is fine):
    total parameters (tied tensors once), the linear weights bitsandbytes would quantize, and
    LoRA parameters per unit of rank for `target_modules`."""
    from finetune.base_model import linear_layers

    linears = linear_layers(model)
    targeted = [s for name, s in linears.items() if name.rsplit(".", 1)[-1] in target_modules]
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "quantizable": sum(i * o for i, o in linears.values()),
        "lora_per_rank": sum(i + o for i, o in targeted),
    }


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units, named as such: the dashboard's GB are 10^9 bytes);
    None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
