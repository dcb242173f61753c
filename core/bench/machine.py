"""The machine a benchmark ran on, printed beside every figure: the CPU model, the SIMD
instruction sets that decide which kernels run (PyTorch's int4 and float16 CPU kernels are much
faster with AVX-512 than with AVX2 alone), the threads and the library versions. Read from
/proc/cpuinfo (Linux) and torch; nothing is measured here."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# The instruction sets that change which kernels PyTorch and llama.cpp pick, in rising order.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")  # fmt: skip


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """(model name, the SIMD_FLAGS it has), from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, [f for f in SIMD_FLAGS if f in flags]


def machine() -> dict:
    """What `genai-lab bench` reports beside its figures."""
    model, simd = cpu_info()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {
        "cpu": model,
        "simd": simd,
        "torch_cpu_kernels": capability,  # the SIMD level PyTorch dispatches its kernels to
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def describe(info: dict) -> str:
    """One line: `machine: AMD EPYC, SIMD avx2 fma avx512f ... (PyTorch kernels: AVX512), 2
    threads, torch 2.13.0`."""
    simd = " ".join(info["simd"]) or "none listed"
    return (
        f"machine: {info['cpu']}, SIMD {simd} (PyTorch kernels: {info['torch_cpu_kernels']}), "
        f"{info['threads']} threads, torch {info['torch']}"
    )
