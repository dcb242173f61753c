"""`genai-lab bench --quick` runs end to end and reports every figure (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from core.lm.engines.int4 import ON_GRID


def test_bench_quick_reports_all_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "core", "bench", "--quick", "--only", "core", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for phrase in ("matmul peak", "training", "model-FLOPs utilisation", "generation", "decode"):
        assert phrase in result.stdout
    data = json.loads(out.read_text())["core"]
    for shape in ("tutor-base", "12M"):
        gen, train = data[shape]["generation"], data[shape]["training"]
        assert train["speedup"] > 0 and gen["speedup"] > 0 and data[shape]["mfu"] > 0
        assert gen["new_tokens"] == 110
    real = data["smollm2"]["decode"]  # fast, plain, fp16, 4-bit, transformers
    assert real["speedup"] > 0 and real["plain_speedup"] > 0 and real["fp16_speedup"] > 0
    assert real["int4_speedup"] > 0 and real["int4_grid_error"] < ON_GRID  # the file's own codes
    assert real["threads"] >= 1 and len(real["load_average"]) == 2 and real["same_tokens"]
    assert 0 <= real["fp16_same_greedy_tokens"] <= 1 and 0 <= real["int4_same_greedy_tokens"] <= 1
    assert set(real["first_token_s"]) == {"ours", "ours_fp16", "ours_int4", "transformers"}
    memory = data["smollm2"]["decode_memory"]  # each in its own process (--quick: one of four)
    assert set(memory) == {"ours_int4"}
    for figures in memory.values():
        assert figures["peak_rss_decoding_bytes"] > 100 * 2**20
    assert "peak resident memory while decoding" in result.stdout
    assert "SmolLM2-135M-Instruct" in result.stdout and "load average" in result.stdout
    info = json.loads(out.read_text())["machine"]  # the CPU and its SIMD sets, beside the figures
    assert info["cpu"] and info["threads"] >= 1 and isinstance(info["simd"], list)
    assert f"machine: {info['cpu']}, SIMD" in result.stdout


def test_cpu_info_reads_the_model_and_simd_sets(tmp_path):
    from core.bench.machine import cpu_info

    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
    )
    assert cpu_info(fake) == ("Example CPU 9000", ["sse4_2", "avx", "avx2", "fma"])
    assert cpu_info(tmp_path / "missing")[1] == []
