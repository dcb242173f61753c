"""Measured memory: the peak this process actually used, to set beside `finetune/estimate.py`.

`peak_memory()` reads the kernel's high-water mark of the process's resident set (what the OS
had to give it: weights, activations, allocator slack, the Python runtime and its libraries) and,
on CUDA, PyTorch's peak of allocated GPU memory. `PeakMemory` is a Trainer callback that adds
both to every log record, so metrics.jsonl shows when the peak happened (first training step,
first evaluation ...).
"""

from __future__ import annotations

import resource
import sys

import torch
from transformers import TrainerCallback


def peak_memory() -> dict[str, int | None]:
    """{"cpu_peak_rss_bytes", "gpu_peak_allocated_bytes"} of this process so far.

    CPU: the largest resident set of this program so far: on Linux the kernel's high-water mark
    VmHWM from /proc/self/status, because `getrusage(RUSAGE_SELF).ru_maxrss` survives exec, so a
    command started from a large process (a test worker, a notebook) would report its parent's
    peak; elsewhere ru_maxrss (bytes on macOS). It never goes down. GPU:
    `torch.cuda.max_memory_allocated()` (tensors only, without the CUDA context or the caching
    allocator's reserve), None without CUDA. Child processes (data loader workers) are not
    counted."""
    cpu = _vm_hwm()
    if cpu is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu = maxrss if sys.platform == "darwin" else maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"cpu_peak_rss_bytes": int(cpu), "gpu_peak_allocated_bytes": gpu}


def _vm_hwm() -> int | None:
    """VmHWM of /proc/self/status in bytes, or None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory(TrainerCallback):
    """Records the peak in each log record and at the end of training.

    Put it before the callbacks that write logs (metrics.jsonl): Trainer passes the same `logs`
    dict to every callback in order, so the figures added here reach the ones after it. `peak`
    holds the last reading, for the run's report."""

    def __init__(self) -> None:
        self.peak: dict[str, int | None] = {}

    def _read(self) -> dict[str, int | None]:
        self.peak = peak_memory()
        return self.peak

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update({k: v for k, v in self._read().items() if v is not None})

    def on_train_end(self, args, state, control, **kwargs):
        self._read()
