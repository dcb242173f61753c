"""core/memory.py's `return_freed_memory`: freed memory glibc kept resident is given back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.memory import return_freed_memory, rss_bytes

# A fresh process: what a long-lived test worker has freed before would blur the figures.
_PROBE = """
import json, torch
from core.memory import return_freed_memory, rss_bytes
blocks = [torch.ones(200_000) for _ in range(800)]  # 800 x 0.8 MB, below mmap's threshold
kept = blocks[::2]  # every other one stays: the freed ones sit between them in the heap
del blocks
before = rss_bytes()
trimmed = return_freed_memory()
print(json.dumps({"before": before, "after": rss_bytes(), "trimmed": trimmed}))
"""


@pytest.mark.skipif(rss_bytes() is None or not return_freed_memory(), reason="needs Linux glibc")
def test_freed_memory_is_given_back():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["trimmed"]
    # ~320 MB were freed; glibc kept them resident until asked
    assert figures["before"] - figures["after"] > 200 * 2**20, figures
