"""`genai-lab bench` for finetune: measured, side by side in one run.

- memory of a 4-bit NF4 load (bitsandbytes, double quantization) vs an fp32 load of the same
  randomly initialised SmolLM2-135M-shaped model, built locally (nothing is downloaded);
- one training step of LoRA vs a full fine-tune (and QLoRA) on the same model and batch: step
  time, and memory for weights, gradients, AdamW state and saved activations, counted tensor by
  tensor, next to `estimate_memory`'s prediction.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from finetune.estimate import DEFAULT_TARGET_MODULES, MODEL_SHAPES, estimate_memory, format_bytes
from finetune.modeling import load_base_model


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's tensors: parameters and buffers (shared ones once) plus the
    block constants of bitsandbytes 4-bit layers, which are neither."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        extra = [state.absmax, state.code]
        if getattr(state, "state2", None) is not None:
            extra += [state.state2.absmax, state.state2.code]
        for t in extra:
            if torch.is_tensor(t):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def build_model_folder(shape: dict, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama of this shape, saved as a transformers folder (bf16)."""

    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def four_bit_footprint(shape_name: str = "SmolLM2-135M", compare_fp32_rest: bool = True) -> dict:
    """Memory of the same weights loaded in fp32 and in 4-bit NF4 (linear layers; embeddings and
    norms in bf16, as in QLoRA; and, for comparison, with those kept in fp32)."""

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(MODEL_SHAPES[shape_name], Path(tmp))
        fp32 = model_bytes(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
        nf4 = model_bytes(load_base_model(str(folder), True, "cpu", torch.bfloat16))
        result = {"shape": shape_name, "fp32_bytes": fp32, "nf4_bytes": nf4, "ratio": nf4 / fp32}
        if compare_fp32_rest:
            rest = model_bytes(load_base_model(str(folder), True, "cpu", torch.float32))
            result.update(nf4_fp32_rest_bytes=rest, ratio_fp32_rest=rest / fp32)
    return result


class _StepProbe:
    """One model's training step, timed, with the bytes of its weights, gradients, AdamW state
    and the activations autograd saves, counted tensor by tensor."""

    def __init__(self, model, batch: torch.Tensor) -> None:
        self.model, self.batch, self.times = model, batch, []
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-5)
        self.saved: dict[int, int] = {}
        self.step(record=True)  # warm-up, and the activation count

    def step(self, record: bool = False) -> None:
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                self.saved[ptr] = t.untyped_storage().nbytes()
            return t

        started = time.perf_counter()
        if record:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = self.model(input_ids=self.batch, labels=self.batch).loss
        else:
            loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers to count them
        if not record:
            self.times.append(time.perf_counter() - started)

    def figures(self) -> dict:
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return {
            "step_seconds": statistics.median(self.times),
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "weights": model_bytes(self.model),
            "gradients": sum(p.grad.nbytes for p in self.trainable if p.grad is not None),
            "optimizer": sum(t.nbytes for t in state if t.dim() > 0),  # not the step counters
            "activations": sum(self.saved.values()),
        }


def lora_vs_full(shape_name: str, batch_size: int, seq_len: int, repeats: int) -> dict:
    """Full fine-tuning, LoRA and QLoRA (r=8, all linear layers) on the same weights and batch,
    fp32 compute, steps interleaved so a noisy neighbour slows all three alike."""

    shape = MODEL_SHAPES[shape_name]
    torch.manual_seed(0)
    batch = torch.randint(0, shape["vocab_size"], (batch_size, seq_len))

    def lora(model):
        config = LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGET_MODULES))
        return get_peft_model(model, config).train()

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(shape, Path(tmp))
        full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        quantized = load_base_model(str(folder), True, "cpu", torch.float32)
        quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
        probes = {
            "full": _StepProbe(full, batch),
            "lora": _StepProbe(lora(base), batch),
            "qlora": _StepProbe(lora(quantized), batch),
        }
    for _ in range(repeats):
        for probe in probes.values():
            probe.step()
    results = {}
    for method, probe in probes.items():
        results[method] = probe.figures()
        est = estimate_memory(shape, "full" if method == "full" else "lora", 8, batch_size, seq_len)
        results[method]["estimate"] = est["nf4" if method == "qlora" else "fp32"]
    return {"shape": shape_name, "batch_size": batch_size, "seq_len": seq_len, **results}


def run_benchmarks(quick: bool = False, echo: Callable[[str], None] = print) -> dict:
    threads = torch.get_num_threads()
    echo(f"finetune benchmarks: torch {torch.__version__}, {threads} CPU threads")
    foot = four_bit_footprint("SmolLM2-135M", compare_fp32_rest=not quick)
    echo(
        f"4-bit NF4 load of a SmolLM2-135M-shaped model: {format_bytes(foot['nf4_bytes'])} vs "
        f"fp32 {format_bytes(foot['fp32_bytes'])} -> {foot['ratio']:.3f}x (goal <= 0.3x)"
    )
    if "ratio_fp32_rest" in foot:
        echo(
            f"  (embeddings and norms kept in fp32 instead of bf16: {foot['ratio_fp32_rest']:.3f}x)"
        )
    if quick:
        step = lora_vs_full("tutor-base", batch_size=4, seq_len=64, repeats=2)
    else:
        step = lora_vs_full("SmolLM2-135M", batch_size=2, seq_len=128, repeats=3)
    echo(
        f"one training step, {step['shape']} shape, batch {step['batch_size']}x{step['seq_len']}, "
        "fp32 compute (memory measured; [estimate]: its QLoRA row assumes bf16 for the "
        "unquantized weights and activations, as on a GPU):"
    )
    for method in ("full", "lora", "qlora"):
        f, est = step[method], step[method]["estimate"]
        parts = [
            f"{name} {format_bytes(f[name])} [{format_bytes(est[name])}]"
            for name in ("weights", "gradients", "optimizer", "activations")
        ]
        echo(
            f"  {method:<5} {f['step_seconds'] * 1000:8.0f} ms/step, "
            f"{f['trainable_parameters']:,} trainable; " + ", ".join(parts)
        )
    full, lora = step["full"], step["lora"]
    speedup = full["step_seconds"] / lora["step_seconds"]
    saved = 1 - sum(lora[k] for k in ("weights", "gradients", "optimizer")) / sum(
        full[k] for k in ("weights", "gradients", "optimizer")
    )
    echo(
        f"  LoRA vs full: {speedup:.2f}x step speed, {100 * saved:.0f}% less memory for weights, "
        "gradients and optimizer state"
    )
    return {"four_bit": foot, "training_step": step, "lora_speedup": speedup}
