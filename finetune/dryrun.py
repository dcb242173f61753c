"""`genai-lab finetune --dry-run`: what a run would train and how much memory it would need,
from the model's config alone. The model is built on PyTorch's meta device (shapes, no data),
so a 70B model costs nothing to inspect and no weights are downloaded. The config is validated
as for a run (`genai-lab finetune --dry-run` also lints `--data` first: finetune/cli.py)."""

from __future__ import annotations

import torch

from finetune.config import FinetuneConfig
from finetune.estimate import (
    PRECISIONS,
    activation_elements_per_token,
    counts_from_model,
    estimate_process_peak,
    format_bytes,
    memory_breakdown,
)

LABELS = {"fp32": "fp32", "bf16": "bf16", "int8": "8-bit", "nf4": "4-bit NF4"}


def shape_of(config) -> dict:
    """The Llama-style numbers the activation estimate needs, from any transformers config."""
    text = config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    return {
        "hidden_size": hidden,
        "intermediate_size": getattr(text, "intermediate_size", None) or 4 * hidden,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or hidden // heads,
        "vocab_size": text.vocab_size,
    }


def data_lengths(cfg: FinetuneConfig, echo=print) -> tuple[int, int]:
    """(longest row, all rows' tokens) of --data (and --eval-data) under the model's tokenizer
    and chat template, as a run would encode them: the estimate then pads batches to the data's
    longest row instead of assuming max_length. Loads the tokenizer only (no weights)."""
    from finetune.base_model import load_tokenizer
    from finetune.lint import check_file
    from finetune.render import ensure_chat_template

    try:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # a folder with a config.json alone, say
        echo(f"no tokenizer to measure the rows ({e}); batches sized to max_length")
        return 0, 0
    ensure_chat_template(tokenizer, cfg.chat_template)
    lengths = []
    for path in [cfg.data] + ([cfg.eval_data] if cfg.eval_data else []):
        check = check_file(
            path, tokenizer, cfg.format, None, False, cfg.train_on_prompt, cfg.columns, cfg.roles
        )
        lengths += [len(e.input_ids) for e in check.examples]
    if not lengths:
        return 0, 0
    cap = cfg.max_length or max(lengths)
    longest = min(max(lengths), cap)  # longer rows are truncated (or rejected) at max_length
    echo(
        f"tokens per row under the model's tokenizer: longest {max(lengths)}, "
        f"{sum(lengths):,} in all (the estimate pads batches to {longest})"
    )
    return longest, sum(min(n, cap) for n in lengths)


def dry_run(
    cfg: FinetuneConfig, echo=print, seq_len: int | None = None, dataset_tokens: int = 0
) -> dict:
    """Print and return the estimate. `seq_len` defaults to max_length (or the model's context,
    capped at 2048); a run passes its longest row, which is as far as padding goes, and the
    tokens of its encoded rows (`dataset_tokens`, held in memory during training)."""
    from transformers import AutoModelForCausalLM

    from finetune.base_model import (
        check_target_modules,
        context_length,
        default_target_modules,
        load_config,
        pick_device,
    )

    cfg.validate(require_data=False)  # the same checks as a run, except that data is optional
    config = load_config(cfg.model, cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    targets = cfg.target_modules or default_target_modules(model)
    check_target_modules(model, targets)
    counts = counts_from_model(model, targets)
    trainable = counts["lora_per_rank"] * cfg.lora_rank
    seq_len = seq_len or cfg.max_length or min(context_length(config) or 2048, 2048)
    tokens = cfg.batch_size * seq_len
    shape = shape_of(config)
    table = memory_breakdown(
        counts["total"],
        counts["quantizable"],
        trainable,
        "lora",
        activation_values=tokens * activation_elements_per_token(shape, "lora"),
        logit_values=tokens * shape["vocab_size"],
    )
    device = pick_device(cfg.device) if cfg.device != "auto" else "cpu"
    chosen = "nf4" if cfg.method == "qlora" else ("fp32" if device == "cpu" else "bf16")
    percent = 100 * trainable / counts["total"]
    echo(f"{cfg.model}: {config.model_type}, {counts['total']:,} parameters")
    echo(f"LoRA rank {cfg.lora_rank} on {', '.join(targets)}")
    echo(f"trainable: {trainable:,} parameters ({percent:.3f}% of the model)")
    echo(f"estimated training memory, batch {cfg.batch_size} x {seq_len} tokens, AdamW:")
    header = f"  {'frozen weights':<12} {'weights':>10} {'gradients':>10} {'optimizer':>10}"
    echo(header + f" {'activations':>12} {'total':>10}")
    for precision in PRECISIONS:
        row = table[precision]
        mark = "  <- this run" if precision == chosen else ""
        echo(
            f"  {LABELS[precision]:<12} {format_bytes(row['weights']):>10} "
            f"{format_bytes(row['gradients']):>10} {format_bytes(row['optimizer']):>10} "
            f"{format_bytes(row['activations']):>12} {format_bytes(row['total']):>10}{mark}"
        )
    peak = estimate_process_peak(
        counts["total"],
        counts["quantizable"],
        trainable,
        cfg.method,
        activation_values=tokens * activation_elements_per_token(shape, "lora"),
        logit_values=tokens * shape["vocab_size"],
        dataset_tokens=dataset_tokens,
    )
    echo(
        f"on CPU, the whole process's peak (RSS): {format_bytes(peak['total'])} (runtime "
        f"{format_bytes(peak['runtime'])}, weights {format_bytes(peak['weights'])}, "
        f"activations {format_bytes(peak['activations'])})"
    )
    echo("  (estimates: see finetune/estimate.py for the assumptions; no weights were loaded)")
    return {
        "model": cfg.model,
        "total_parameters": counts["total"],
        "trainable_parameters": trainable,
        "trainable_percent": percent,
        "target_modules": targets,
        "batch_size": cfg.batch_size,
        "seq_len": seq_len,
        "this_run": chosen,
        "process_peak": peak,  # CPU runs: comparable with finetune.memory.peak_memory()
        **table,
    }
