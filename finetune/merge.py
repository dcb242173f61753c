"""`genai-lab merge`: fold an adapter into its base and save a standalone transformers folder,
then check the result against the adapter it came from (the "self-checking merge").

LoRA: W' = W + (alpha / r) · B·A on the base weights as trained.
QLoRA: the adapter was trained against the 4-bit weights, so it is merged onto those weights
de-quantized (not onto the original 16-bit ones, which the adapter never saw); the check then
compares the merged model with the adapter running on the 4-bit base.

The merged model is saved in fp32 by default, so the merge itself loses nothing; `--dtype
bfloat16` halves the size and the check reports what that costs.

OUTPUT must be new, empty, or a previous merge's folder (config.json + merge_check.json, which is
replaced); anything else is refused before any model loads, or with `overwrite` moved aside to
OUTPUT.old-TIMESTAMP (core.outputs). The folder takes its name only once it holds the model and
its check, so it never exists without merge_check.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.outputs import claim_output_folder, holds_all
from finetune.inference import load_adapter, read_adapter_meta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FALLBACK_PROMPTS = ("The cat sat on the", "Once upon a time, there was a", "A token is")
CHECK_FILE = "merge_check.json"
# A folder this command wrote (and so may replace): a model config beside its merge check.
merged_folder = holds_all("config.json", CHECK_FILE)


@torch.inference_mode()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(model(input_ids=ids.to(device)).logits[0].float().cpu())
    return out


def logit_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    diffs = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b, strict=True)])
    return {"max_abs_logit_diff": float(diffs.max()), "mean_abs_logit_diff": float(diffs.mean())}


def _dequantized(model):
    """A bitsandbytes 4-bit model with every Linear4bit replaced by nn.Linear holding its
    de-quantized weights in fp32."""
    model = model.dequantize(dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the saved folder must load as a plain model
    return model


def merge_adapter(
    adapter: str | Path,
    output: str | Path,
    base: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    echo=print,
    overwrite: bool = False,
) -> dict:
    """Merge, save atomically, reload the saved folder and compare its logits with the adapter's.
    Returns the check's figures (also written to OUTPUT/merge_check.json). `overwrite` moves a
    non-empty OUTPUT aside first (see the module docstring)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.atomic import clean_stale_temps
    from core.killpoints import killpoint
    from core.lm.loader import atomic_directory, naming_write_errors
    from finetune.base_model import load_base_model, load_tokenizer, pick_device

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: got {dtype!r}, must be one of {', '.join(DTYPES)}")
    meta = read_adapter_meta(adapter)
    base = base or meta.get("base_model")
    if not base:
        raise ValueError(f"{adapter}: the adapter does not name its base model; pass --base")
    quantized = meta.get("method") == "qlora"
    device = pick_device(device)
    output = Path(output)
    # A merge killed mid-save left `.NAME.tmp-PID-*` beside OUTPUT: cleared (its writer is gone).
    clean_stale_temps(output.parent, output.name)
    # Before any model loads: someone else's folder is refused (or moved aside), never replaced.
    claim_output_folder(output, "merge", merged_folder, overwrite=overwrite, flag="--output")
    # The adapter's own tokenizer (its chat template) when it has one, else its base's.
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)
    prompts = list(meta.get("sample_prompts") or []) + list(FALLBACK_PROMPTS)

    def base_model():
        return load_base_model(
            base, quantized, device, torch.float32, meta.get("double_quant", True)
        )

    # 1. The reference: the adapter on the base exactly as it was trained.
    echo(f"loading {base} ({'4-bit NF4' if quantized else 'fp32'}) with the adapter {adapter}")
    reference = load_adapter(PeftModel, base_model(), adapter).eval()
    reference_logits = prompt_logits(reference, tokenizer, prompts)
    del reference

    # 2. The merge, onto de-quantized 4-bit weights for QLoRA.
    model = base_model()
    if quantized:
        model = _dequantized(model)
    merged = load_adapter(PeftModel, model, adapter).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    with atomic_directory(output, own=merged_folder) as tmp, naming_write_errors(output):
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged
        # 3. The check: load what was saved, as anyone would, and compare; written into the
        # folder before it takes its name.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
        check = {
            "adapter": str(adapter),
            "base_model": base,
            "method": meta.get("method", "lora"),
            "dtype": dtype,
            "prompts": len(prompts),
            "tokens_compared": sum(len(x) for x in reference_logits),
            **logit_difference(reference_logits, prompt_logits(reloaded, tokenizer, prompts)),
        }
        del reloaded
        (tmp / CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n")
        killpoint("merge-save")  # tests: killed with the folder not yet renamed in
    what = "de-quantized 4-bit base" if quantized else "base"
    echo(f"merged onto the {what}, saved ({dtype}) to {output}")
    echo(
        f"self-check on {check['prompts']} prompts ({check['tokens_compared']} positions): "
        f"max |logit difference| {check['max_abs_logit_diff']:.2e}, "
        f"mean {check['mean_abs_logit_diff']:.2e}"
    )
    return check
