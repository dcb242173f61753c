"""The accelerate config files in finetune/accelerate/: each parses with accelerate's own loader
and says how to launch it; cpu_ddp.yaml trains with two processes here; fsdp.yaml turns into the
FSDP2 plugin (full shard, one LlamaDecoderLayer per unit) that its comment promises."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "finetune" / "accelerate"
ALPACA = ROOT / "finetune" / "examples" / "data" / "tutor_alpaca.json"
EXPECTED = {
    "cpu_ddp": (DistributedType.MULTI_GPU, 1, 2),  # torchrun launcher; gloo without GPUs
    "ddp": (DistributedType.MULTI_GPU, 1, 2),
    "multinode": (DistributedType.MULTI_GPU, 2, 16),
    "fsdp": (DistributedType.FSDP, 1, 2),
    "deepspeed_zero3": (DistributedType.DEEPSPEED, 1, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_its_header_says_how_to_launch_it(name):
    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    kind, machines, processes = EXPECTED[name]
    assert (config.distributed_type, config.num_machines, config.num_processes) == (
        kind,
        machines,
        processes,
    )
    header = path.read_text().split("compute_environment:")[0]
    assert f"accelerate launch --config_file finetune/accelerate/{name}.yaml" in header
    assert "-m core finetune" in header
    if name == "multinode":
        assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
    if name == "deepspeed_zero3" and importlib.util.find_spec("deepspeed") is None:
        assert "NOT installed" in header  # the file says it has not been run here


def test_fsdp_config_becomes_a_full_shard_fsdp2_plugin_wrapping_llama_layers(monkeypatch):
    """What accelerate launch would hand the training processes, read back by accelerate's own
    FullyShardedDataParallelPlugin. FSDP cannot be *run* on CPU with accelerate 1.15: its
    AcceleratorState only promotes a run to FSDP on accelerator backends (MULTI_GPU, XPU, NPU ...),
    so under `--config_file fsdp.yaml` on a CPU-only machine the Trainer silently trains with
    plain DDP over gloo (tried: it completes, with unsharded parameters). Hence this check of the
    configuration, and no CPU run that would pretend to test sharding."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIGS / "fsdp.yaml"), "--mixed_precision", "no"]
    args = launch_command_parser().parse_args([*argv, "-m", "core", "finetune"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.slow
def test_cpu_ddp_config_trains_with_two_processes(tmp_path):
    """`accelerate launch --config_file finetune/accelerate/cpu_ddp.yaml`: two processes over gloo,
    each its share of every batch, QLoRA's 4-bit base in each; rank 0 alone writes and prints."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(CONFIGS / "cpu_ddp.yaml"), "--main_process_port", str(free_port())]
    cmd += ["-m", "core", "finetune", "--data", str(ALPACA), "--method", "qlora", "--quiet"]
    cmd += ["--max-steps", "2", "--batch-size", "2", "--num-samples", "0"]
    cmd += ["--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert result.stdout.count("after training: eval loss") == 1
