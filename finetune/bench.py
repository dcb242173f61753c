"""`genai-lab bench` for finetune: measured, side by side in one run.

- memory of a 4-bit NF4 load (bitsandbytes, double quantization) vs an fp32 load of the same
  randomly initialised SmolLM2-135M-shaped model, built locally (nothing is downloaded);
- one training step of LoRA vs a full fine-tune (and QLoRA) on the same model and batch: step
  time, and memory for weights, gradients, AdamW state and saved activations, counted tensor by
  tensor, next to `estimate_memory`'s prediction.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback

from finetune.base_model import load_base_model
from finetune.estimate import DEFAULT_TARGET_MODULES, MODEL_SHAPES, estimate_memory, format_bytes


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
    results = {"four_bit": foot, "training_step": step, "lora_speedup": speedup}
    if quick:
        echo("fine-tuning step time vs peft + TRL defaults: skipped in --quick (minutes)")
        return results
    load = os.getloadavg()[0]
    echo(
        "fine-tuning SmolLM2-135M-Instruct on this CPU, batch 4 of finetune/examples chat rows "
        f"({threads} threads, load average {load:.1f} before):"
    )
    cpu = cpu_step_times(echo=echo)
    cpu["load_average"] = (load, os.getloadavg()[0])
    for variant, about in STEP_VARIANTS.items():
        f = cpu[variant]
        echo(
            f"  {variant:<5} {f['step_seconds']:6.2f} s/step, {f['tokens_per_second']:6.1f} "
            f"tokens/s, peak {format_bytes(f['peak_rss_bytes'])}, {f['speed_vs_trl']:.2f}x TRL "
            f"defaults' speed  ({about})"
        )
    results["cpu_finetune"] = cpu
    return results


# ---------------------------------------------------------------------------------------------
# Fine-tuning on a CPU: our command against plain peft + TRL defaults, on the real model

STEP_DATA = Path(__file__).parent / "examples" / "data" / "tutor_chat.jsonl"
STEP_VARIANTS = {
    "lora": "genai-lab finetune: LoRA r 8 on every linear layer, fp32",
    "qlora": "genai-lab finetune --method qlora: the same on an NF4 base, fp32 compute",
    "trl": "peft + TRL defaults: LoraConfig(task_type) = r 8 on q_proj, v_proj; SFTConfig = "
    "bf16 autocast, gradient checkpointing",
}


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (forward, backward, update), nothing around them."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def step_time_run(variant: str, model: str, steps: int, batch_size: int, out: Path) -> dict:
    """One training run of `variant` (STEP_VARIANTS) in this process: its step times, the mean
    tokens per row of the data under the model's chat template, and the process's peak memory."""
    from finetune.base_model import load_tokenizer, resolve_model
    from finetune.config import FinetuneConfig
    from finetune.lint import check_file
    from finetune.memory import peak_memory
    from finetune.render import ensure_chat_template

    tokenizer = load_tokenizer(model)
    ensure_chat_template(tokenizer)
    check = check_file(STEP_DATA, tokenizer)
    row_tokens = statistics.fmean(len(e.input_ids) for e in check.examples)
    timer = StepTimer()
    if variant in ("lora", "qlora"):
        from finetune.train import finetune

        cfg = FinetuneConfig(
            model=model, data=str(STEP_DATA), method=variant, batch_size=batch_size,
            max_steps=steps, output_dir=str(out), num_samples=0, report_to="none", device="cpu",
            max_eval_rows=4,
        )  # fmt: skip
        finetune(cfg, echo=lambda *_: None, progress=False, extra_callbacks=(timer,))
    elif variant == "trl":
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        rows = [json.loads(line) for line in STEP_DATA.read_text().splitlines() if line.strip()]
        args = SFTConfig(
            output_dir=str(out), use_cpu=True, per_device_train_batch_size=batch_size,
            max_steps=steps, report_to="none", save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=resolve_model(model),
            args=args,
            train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
            peft_config=LoraConfig(task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        trainer.train()
    else:
        raise ValueError(f"variant: got {variant!r}, must be one of {', '.join(STEP_VARIANTS)}")
    return {
        "variant": variant,
        "step_seconds": timer.seconds,
        "row_tokens": row_tokens,
        "peak_rss_bytes": peak_memory()["cpu_peak_rss_bytes"],
    }


def cpu_step_times(
    model: str = "smollm2-135m-instruct",
    steps: int = 5,
    batch_size: int = 4,
    rounds: int = 2,
    echo: Callable[[str], None] = print,
) -> dict:
    """Each variant trained `rounds` times, interleaved (lora, qlora, trl, lora, ...), each run in
    a fresh process (its own peak memory, no warm caches from the others). Per variant: the
    median step time over every run's steps after its first (the first pays one-time set-up),
    tokens/s, peak RSS; and each variant's speed relative to peft + TRL defaults."""
    import subprocess
    import sys

    runs: dict[str, list[dict]] = {v: [] for v in STEP_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for variant in STEP_VARIANTS:
                out = Path(tmp) / f"{variant}-{r}"
                argv = [sys.executable, "-m", "finetune.bench", variant, model, str(steps)]
                argv += [str(batch_size), str(out)]
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{variant}: {done.stderr.strip().splitlines()[-1:]}")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                echo(f"  ran {variant} ({r + 1}/{rounds})")
    results = {}
    for variant, done in runs.items():
        seconds = [s for run in done for s in run["step_seconds"][1:]]
        step = statistics.median(seconds)
        results[variant] = {
            "step_seconds": step,
            "tokens_per_second": batch_size * done[0]["row_tokens"] / step,
            "peak_rss_bytes": max(run["peak_rss_bytes"] for run in done),
        }
    for variant in results:
        results[variant]["speed_vs_trl"] = (
            results["trl"]["step_seconds"] / (results[variant]["step_seconds"])
        )
    return {"model": model, "batch_size": batch_size, "steps": steps, "rounds": rounds, **results}


if __name__ == "__main__":  # one step_time_run in a fresh process, for cpu_step_times
    import sys

    variant_arg, model_arg, steps_arg, batch_arg, out_arg = sys.argv[1:6]
    figures = step_time_run(variant_arg, model_arg, int(steps_arg), int(batch_arg), Path(out_arg))
    print(json.dumps(figures))
