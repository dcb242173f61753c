"""The resident memory this process holds and has held: the kernel's figures, not estimates.

On Linux the peak is VmHWM of /proc/self/status, not `getrusage(RUSAGE_SELF).ru_maxrss`: the
latter survives exec, so a command started from a large process (a test worker, a notebook)
would report its parent's peak. `reset_peak_rss` starts a new high-water mark, so a benchmark
can measure the peak of one phase (decoding) apart from another (loading)."""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """The largest resident set of this process so far (since the last `reset_peak_rss`)."""
    if (hwm := _status_kib("VmHWM")) is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def rss_bytes() -> int | None:
    """The resident set now (None where there is no /proc)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Restart the peak at the current resident set (Linux: "5" to /proc/self/clear_refs).
    False where that is not possible: `peak_rss_bytes` then still counts from the start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def return_freed_memory() -> bool:
    """Hand memory this process has freed back to the system (glibc's `malloc_trim`). Many
    medium-sized temporaries (packing a model's weights makes ~400 MB of them) stay resident
    after they are freed, because glibc keeps them for reuse. True when it was asked (whether
    or not anything was left to give back), False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _status_kib(field: str) -> int | None:
    try:
        with STATUS.open(encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
