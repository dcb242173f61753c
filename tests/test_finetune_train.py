"""Fine-tuning end to end on the shipped tutor-base, on CPU: QLoRA learns the example data, the
adapter and the merges are right, generation with an adapter matches transformers, a SIGKILLed
run resumes, and `accelerate launch` runs two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from core.lm.chat_format import encode_prompt, stop_ids
from core.lm.generate import stream_tokens
from core.lm.loader import resolve_model_path
from core.lm.sampling import SamplingParams
from core.train.config import load_config
from finetune.config import FinetuneConfig
from finetune.inference import load_for_generation, stream_generate
from finetune.merge import merge_adapter
from finetune.run import COMPLETE
from finetune.train import finetune

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "finetune" / "examples"
DEMO_CONFIG = EXAMPLES / "configs" / "tutor-qlora.yaml"
ALPACA = EXAMPLES / "data" / "tutor_alpaca.json"
TUTOR = resolve_model_path("tutor-base")
PROMPTS = ["<|user|>\nWhat is LoRA?<|end|>\n<|assistant|>\n", "The cat sat on the"]


@torch.inference_mode()
def logits(model, text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits[0].float()


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """The offline demo: the shipped QLoRA config and example data, cut to 30 steps."""
    out = tmp_path_factory.mktemp("qlora")
    overrides = {"output_dir": str(out), "max_steps": 30, "eval_steps": 15, "save_steps": 15}
    cfg = load_config(FinetuneConfig, DEMO_CONFIG, overrides)
    return finetune(cfg, progress=False, echo=lambda *_: None), out


@pytest.mark.slow
def test_qlora_demo_lowers_eval_loss_and_saves_a_safetensors_adapter(qlora_run):
    report, out = qlora_run
    assert report["method"] == "qlora" and report["device"] == "cpu" and report["steps"] == 30
    assert report["eval_loss_after"] <= 0.8 * report["eval_loss_before"]  # the >= 20% drop
    adapter = out / "adapter"
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        names = list(f.keys())
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "tutor-base"
    )
    assert not list(adapter.glob("*.bin"))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 15, 30]  # before, during
    for name in ("loss_curve.png", "report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["samples"]) == 4
    markdown = (out / "report.md").read_text()
    assert "| reference | base model | fine-tuned |" in markdown
    assert report["samples"][0]["finetuned"] in markdown.replace("<br>", "\n")


@pytest.mark.slow
def test_qlora_merge_onto_dequantized_base_checks_itself(qlora_run, tmp_path):
    _, out = qlora_run
    check = merge_adapter(out / "adapter", tmp_path / "merged", echo=lambda *_: None)
    assert check["method"] == "qlora" and check["tokens_compared"] > 50
    assert check["max_abs_logit_diff"] < 1e-3  # vs the adapter running on the 4-bit base
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config")
    assert json.loads((tmp_path / "merged" / "merge_check.json").read_text()) == check


@pytest.mark.slow
def test_generation_with_an_adapter_matches_transformers_generate(qlora_run):
    _, out = qlora_run
    model, tokenizer = load_for_generation(None, str(out / "adapter"))
    assert isinstance(model, PeftModel)
    ids = encode_prompt(tokenizer, "What is QLoRA?", chat=True)
    stops = stop_ids(tokenizer, model.generation_config)
    ours = list(
        stream_tokens(
            model, ids, stop_ids=stops, sampling=SamplingParams(max_tokens=24, temperature=0.0)
        )
    )
    with torch.inference_mode():
        reference = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stops
        )[0, len(ids) :].tolist()
    if reference and reference[-1] in stops:
        reference = reference[:-1]
    assert ours == reference and ours
    text = "".join(
        stream_generate(
            model, tokenizer, "What is QLoRA?", SamplingParams(0.0, max_tokens=24), chat=True
        )
    )
    assert text == tokenizer.decode(ours, skip_special_tokens=True)


def test_lora_merge_equals_adapter_logits(tmp_path):
    cfg = FinetuneConfig(
        data=str(ALPACA),
        output_dir=str(tmp_path / "run"),
        method="lora",
        max_steps=6,
        learning_rate=1e-2,
        batch_size=4,
        num_samples=1,
        sample_max_new_tokens=4,
    )
    report = finetune(cfg, progress=False, echo=lambda *_: None)
    adapter = tmp_path / "run" / "adapter"
    merge_adapter(adapter, tmp_path / "merged", echo=lambda *_: None)
    from finetune.base_model import load_tokenizer

    tokenizer = load_tokenizer(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(TUTOR, dtype=torch.float32)
    base_logits = [logits(base, p, tokenizer) for p in PROMPTS]
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for prompt, plain in zip(PROMPTS, base_logits, strict=True):
        a, m = logits(with_adapter, prompt, tokenizer), logits(merged, prompt, tokenizer)
        assert (a - m).abs().max() < 1e-4
        assert (a - plain).abs().max() > 1e-2  # the adapter really changes the model
    assert report["steps"] == 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    settings = {"data": str(ALPACA), "method": "lora", "max_steps": 12, "save_steps": 4}
    settings |= {"eval_steps": 4, "logging_steps": 1, "batch_size": 2, "learning_rate": 5e-3}
    settings |= {"num_samples": 1, "sample_max_new_tokens": 4}
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "core", "finetune", *flags, "--quiet", "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob(f"checkpoint-*/{COMPLETE}")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()  # it really died mid-run
    killed_at = max(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoints/*/{COMPLETE}"))
    assert killed_at < 12
    # A checkpoint cut short while being written (no COMPLETE marker) must never be resumed.
    half = out / "checkpoints" / "checkpoint-11"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"truncated")

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 12
    assert not half.exists()
    steps = [m["step"] for m in _metrics(out) if "loss" in m]
    assert steps == list(range(1, 13))  # every step logged once: no gap, no duplicate

    # The resumed run is the run that was never interrupted.
    straight = tmp_path / "straight"
    cfg = load_config(FinetuneConfig, None, {**settings, "output_dir": str(straight)})
    finetune(cfg, progress=False, echo=lambda *_: None)
    losses = [m["loss"] for m in _metrics(straight) if "loss" in m]
    assert [m["loss"] for m in _metrics(out) if "loss" in m] == pytest.approx(losses, rel=1e-4)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 1 and "already has checkpoints: pass --resume" in rerun.stderr


@pytest.mark.slow
def test_accelerate_launch_cpu_flag_runs_one_process(tmp_path):
    """`accelerate launch --cpu` trains in one process; two processes over gloo (DDP, QLoRA) are
    tests/test_finetune_accelerate.py's, through the shipped cpu_ddp.yaml."""
    run = ["finetune", "--data", str(ALPACA), "--batch-size", "2", "--quiet"]
    run += ["--num-samples", "1", "--sample-max-new-tokens", "4"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # accelerate 1.15 starts `--cpu --num_processes N` as ONE process unless MPI is set up
    # (--mpirun_hostfile); its torchrun launcher (--multi_gpu, what cpu_ddp.yaml selects) starts
    # N processes, which on a machine without GPUs train with DDP over gloo.
    out = tmp_path / "cpu"
    cmd = [*launch, "--cpu", "--main_process_port", str(free_port()), "-m", "core", *run]
    cmd += ["--method", "qlora", "--max-steps", "4", "--output-dir", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 1 and report["steps"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert result.stdout.count("after training: eval loss") == 1


@pytest.mark.slow
def test_bench_measures_4bit_footprint_and_lora_vs_full():
    from finetune.bench import run_benchmarks

    lines: list[str] = []
    results = run_benchmarks(quick=True, echo=lines.append)
    assert results["four_bit"]["ratio"] <= 0.3  # SmolLM2-135M shape, NF4 vs fp32
    assert any("-> 0." in line and "4-bit NF4 load" in line for line in lines)
    step = results["training_step"]
    full, lora, qlora = step["full"], step["lora"], step["qlora"]
    assert (
        lora["trainable_parameters"] == qlora["trainable_parameters"] < full["trainable_parameters"]
    )
    assert qlora["weights"] < 0.5 * lora["weights"]
    # what was measured tensor by tensor equals the estimator's arithmetic (fp32 rows) ...
    for figures in (full, lora):
        for part in ("weights", "gradients", "optimizer"):
            assert figures[part] == pytest.approx(figures["estimate"][part], rel=1e-3), part
        # ... and its activation model is within 20% of what autograd saved
        assert 0.8 < figures["activations"] / figures["estimate"]["activations"] < 1.2
    assert results["lora_speedup"] > 0


@pytest.mark.slow
def test_generate_cli_with_adapter_prints_the_adapters_answer(qlora_run):
    _, out = qlora_run
    model, tokenizer = load_for_generation(None, str(out / "adapter"))
    expected = "".join(
        stream_generate(
            model, tokenizer, "What is QLoRA?", SamplingParams(0.0, max_tokens=20), chat=True
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "core", "generate", "--adapter", str(out / "adapter"), "--chat",
         "--prompt", "What is QLoRA?", "--temperature", "0", "--max-new-tokens", "20"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.strip() and expected.strip()
