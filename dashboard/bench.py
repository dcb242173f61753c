"""Dashboard figures for `genai-lab bench`: how long each page takes to render, cold (models
loading) and warm (cached), with Streamlit's AppTest running the real page scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from dashboard.navigation import existing_pages, page_path


def page_render_times(repeats: int = 3) -> dict[str, dict[str, float]]:
    from streamlit.testing.v1 import AppTest

    import chat.session  # noqa: F401  (the chat page's package, before AppTest edits sys.path)

    times = {}
    for module, _, _ in existing_pages():
        at = AppTest.from_file(str(page_path(module)), default_timeout=300)
        t = time.perf_counter()
        at.run()
        cold = time.perf_counter() - t
        warm = []
        for _ in range(repeats):
            t = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t)
        failed = bool(at.exception)
        times[module] = {"cold_s": cold, "warm_s": statistics.median(warm), "exception": failed}
    return times


def run_benchmarks(quick: bool = False, echo: Callable[[str], None] = print) -> dict:
    echo("dashboard page render times (Streamlit AppTest, the page script end to end):")
    times = page_render_times(repeats=1 if quick else 3)
    for module, t in times.items():
        flag = "  EXCEPTION" if t["exception"] else ""
        echo(
            f"  {module:16s} first {t['cold_s']:6.2f} s   warm {t['warm_s']:5.2f} s (goal <= 2 s){flag}"
        )
    return {"pages": times}
