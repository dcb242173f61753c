"""core/memory.py's `return_freed_memory`: freed memory glibc kept resident is given back."""

from __future__ import annotations

import pytest
import torch

from core.memory import return_freed_memory, rss_bytes


@pytest.mark.skipif(rss_bytes() is None or not return_freed_memory(), reason="needs Linux glibc")
def test_freed_memory_is_given_back():
    # glibc maps a block above its mmap threshold on its own (and unmaps it when freed); freeing
    # one such block raises the threshold to its size, so the blocks below come from the heap.
    big = torch.ones(4_000_000)  # 16 MB
    del big
    blocks = [torch.ones(200_000) for _ in range(800)]  # 800 x 0.8 MB, now below the threshold
    kept = blocks[::2]  # every other one stays: the freed ones sit between them in the heap
    del blocks
    before = rss_bytes()
    assert return_freed_memory()
    # ~320 MB were freed; glibc kept them resident until asked
    assert before - rss_bytes() > 200 * 2**20
    del kept  # (held until here, so the freed blocks sat between live ones)
