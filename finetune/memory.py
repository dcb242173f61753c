"""Measured memory: the peak this process actually used, to set beside `finetune/estimate.py`.

`peak_memory()` reads the kernel's high-water mark of the process's resident set (what the OS
had to give it: weights, activations, allocator slack, the Python runtime and its libraries) and,
on CUDA, PyTorch's peak of allocated GPU memory. `PeakMemory` is a Trainer callback that adds
both to every log record, so metrics.jsonl shows when the peak happened (first training step,
first evaluation ...).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from core.memory import peak_rss_bytes


def peak_memory() -> dict[str, int | None]:
    """{"cpu_peak_rss_bytes", "gpu_peak_allocated_bytes"} of this process so far.

    CPU: the largest resident set of this program so far (`core.memory.peak_rss_bytes`: the
    kernel's high-water mark, not ru_maxrss, which survives exec). It never goes down. GPU:
    `torch.cuda.max_memory_allocated()` (tensors only, without the CUDA context or the caching
    allocator's reserve), None without CUDA. Child processes (data loader workers) are not
    counted."""
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"cpu_peak_rss_bytes": peak_rss_bytes(), "gpu_peak_allocated_bytes": gpu}


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
