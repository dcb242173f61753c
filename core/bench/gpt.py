"""`genai-lab bench` for core: our GPT against transformers' LlamaForCausalLM, measured side by
side in one run, same weights, same batch. Timings live here, never in tests.

- training tokens/s (forward + backward + AdamW step), ours / transformers'
- model-FLOPs utilisation: achieved matmul FLOP/s over this machine's measured fp32 matmul peak
- generation tokens/s with the KV cache, ours / `LlamaForCausalLM.generate`
- per-token decode time over a long generation, first vs last 50 tokens (flat with a cache)
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from core.lm.loader import save_model
from core.lm.model import GPT, GPTConfig
from core.lm.sampling import SamplingParams
from core.train.losses import lm_loss

BENCH_CONFIG = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def matmul_peak_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of a square matmul: the roof that MFU is measured against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


# The second training shape of the speed goals: 6 layers of width 256, full multi-head attention.
D256_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def _time_steps(step: Callable[[], None], warmup: int, repeats: int) -> float:
    """Median seconds per call after warm-up (the median shrugs off a noisy neighbour)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _train_step_fn(model, logits_of, batch, targets):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        loss = lm_loss(logits_of(batch), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def training_throughput(
    batch_size: int = 8,
    seq_len: int = 256,
    repeats: int = 5,
    config: dict | None = None,
    rounds: int = 4,
    compiled: bool = False,
) -> dict:
    """Training steps (forward, backward, AdamW) per second, ours and transformers' on the same
    weights and batch, interleaved; with `compiled`, also ours under `torch.compile` (what
    `--set compile=true` runs in pre-training; its compilation is paid in the warm-up)."""
    import copy

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**(config or BENCH_CONFIG))).train()
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    vocab = ours.config.vocab_size
    batch = torch.randint(0, vocab, (batch_size, seq_len))
    targets = torch.randint(0, vocab, (batch_size, seq_len))
    tokens = batch_size * seq_len
    # Interleave the two so a slow patch of the machine hits both alike.
    ours_step = _train_step_fn(ours, ours, batch, targets)
    theirs_step = _train_step_fn(theirs, lambda x: theirs(input_ids=x).logits, batch, targets)
    twin = copy.deepcopy(ours)  # its own weights and optimizer, the same starting point
    twin_step = _train_step_fn(twin, torch.compile(twin), batch, targets) if compiled else None
    t_ours, t_theirs, t_compiled = [], [], []
    for _ in range(rounds):
        t_ours.append(_time_steps(ours_step, warmup=1, repeats=repeats))
        t_theirs.append(_time_steps(theirs_step, warmup=1, repeats=repeats))
        if twin_step is not None:
            t_compiled.append(_time_steps(twin_step, warmup=1, repeats=repeats))
    ours_tps, theirs_tps = tokens / min(t_ours), tokens / min(t_theirs)
    extra = {}
    if t_compiled:
        extra = {
            "ours_compiled_tokens_per_s": tokens / min(t_compiled),
            "compiled_speedup": min(t_theirs) / min(t_compiled),
        }
    return {
        **extra,
        "config": {**(config or BENCH_CONFIG), "batch_size": batch_size, "seq_len": seq_len},
        "parameters": ours.num_parameters(),
        "ours_tokens_per_s": ours_tps,
        "transformers_tokens_per_s": theirs_tps,
        "speedup": ours_tps / theirs_tps,
        "flops_per_token": ours.flops_per_token(seq_len, training=True),
    }


def greedy_kwargs(new_tokens: int) -> dict:
    """transformers `generate` arguments for exactly `new_tokens` greedy tokens (no early stop):
    the same work as our loop's, token for token."""
    return dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )


def generation_throughput(
    new_tokens: int = 500, prompt_len: int = 16, config: dict | None = None, rounds: int = 3
) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**(config or BENCH_CONFIG))).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_len))

    # Ours: prefill, then one token per step through the cache, timing every step. The model was
    # built outside inference mode, as load_model builds it, so its fused inference weights are
    # made once and reused (core/lm/model.py).
    @torch.inference_mode()
    def ours_generate() -> list[float]:
        cache = ours.new_cache(1, prompt_len + new_tokens)
        logits = ours(prompt, cache=cache)[:, -1]
        step_times = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            token = logits.argmax(-1, keepdim=True)
            logits = ours(token, cache=cache)[:, -1]
            step_times.append(time.perf_counter() - t)
        return step_times

    kwargs = greedy_kwargs(new_tokens)

    ours_generate()  # warm-up
    theirs.generate(prompt, **{**kwargs, "max_new_tokens": 20, "min_new_tokens": 20})
    # Interleave the rounds and keep each side's best, so a slow patch hits both alike.
    ours_s = theirs_s = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        times = ours_generate()
        if (elapsed := time.perf_counter() - t) < ours_s:
            ours_s, step_times = elapsed, times
        t = time.perf_counter()
        out = theirs.generate(prompt, **kwargs)
        theirs_s = min(theirs_s, time.perf_counter() - t)
    assert out.shape[1] == prompt_len + new_tokens
    first, last = step_times[:50], step_times[-50:]
    return {
        "new_tokens": new_tokens,
        "ours_tokens_per_s": new_tokens / ours_s,
        "transformers_tokens_per_s": new_tokens / theirs_s,
        "speedup": theirs_s / ours_s,
        "decode_ms_first_50": 1000 * statistics.mean(first),
        "decode_ms_last_50": 1000 * statistics.mean(last),
    }


def real_model_decode(
    new_tokens: int = 256,
    prompt_len: int = 32,
    rounds: int = 5,
    name: str | None = None,
    warmup: bool = True,
    prefill_len: int = 300,
) -> dict:
    """Batch-1 greedy decoding of a real model (SmolLM2-135M-Instruct): our GPT through core's
    one decoding loop, fp32 with the fast layers (`core.lm.engines.fast`) and without (the plain
    model), with float16 weights (`engines.prepare(model, "fp16")`, what the demo bot runs) and
    with 4-bit weights
    (`core.lm.engines.int4.Int4GPT`, what chat runs for SmolLM2 itself), against transformers' `generate`
    in fp32 on the same weights. All five run interleaved, round after round, and each figure is
    the median over the rounds (the load average is reported with it: on a shared machine a
    neighbour's burst slows whichever run it lands on). Interleaved with them: the time to the
    first token of a `prefill_len`-token prompt, ours (fp32, float16 and 4-bit weights) and
    transformers'."""
    import os

    from transformers import AutoModelForCausalLM

    from core.lm.engines import fast as fast_layers
    from core.lm.engines import prepare
    from core.lm.engines.int4 import Int4GPT
    from core.lm.generate import decode, stepper_for
    from core.lm.loader import FOUNDATION_MODEL, load_model, resolve

    name = name or FOUNDATION_MODEL
    ours, ours_fp16 = prepare(load_model(name)), prepare(load_model(name), "fp16")
    ours_int4 = prepare(load_model(name), "int4")
    theirs = AutoModelForCausalLM.from_pretrained(resolve(name).source, dtype=torch.float32)
    theirs = theirs.eval()
    prompt = torch.randint(
        0, ours.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)
    )

    @torch.inference_mode()
    def ours_generate(model: GPT | Int4GPT, fast: bool = True) -> list[int]:
        if isinstance(model, GPT) and not fast:
            fast_layers.uninstall(model)  # the plain model: what training runs, op for op
        stepper = stepper_for(model, 1, prompt_len + new_tokens)
        tokens = [
            int(t)
            for t, _, _ in decode(
                stepper, prompt, new_tokens, sampling=SamplingParams(temperature=0.0)
            )
        ]
        if isinstance(model, GPT):
            fast_layers.install(model)
        return tokens

    # Time to the first token of a long prompt: prefill, then the first token.
    long_prompt = torch.randint(
        0, ours.config.vocab_size, (1, prefill_len), generator=torch.Generator().manual_seed(1)
    )

    @torch.inference_mode()
    def ours_first_token(model: GPT | Int4GPT) -> list[int]:
        stepper = stepper_for(model, 1, prefill_len + 1)
        return [
            int(t)
            for t, _, _ in decode(stepper, long_prompt, 1, sampling=SamplingParams(temperature=0.0))
        ]

    kwargs = greedy_kwargs(new_tokens)
    runs = {
        "ours_fast": lambda: ours_generate(ours),
        "ours_plain": lambda: ours_generate(ours, fast=False),
        "ours_fp16": lambda: ours_generate(ours_fp16),
        "ours_int4": lambda: ours_generate(ours_int4),
        "transformers": lambda: theirs.generate(prompt, **kwargs)[0, prompt_len:].tolist(),
        "first_ours": lambda: ours_first_token(ours),
        "first_ours_fp16": lambda: ours_first_token(ours_fp16),
        "first_ours_int4": lambda: ours_first_token(ours_int4),
        "first_transformers": lambda: theirs.generate(long_prompt, **greedy_kwargs(1))[
            0, prefill_len:
        ].tolist(),
    }
    for run in runs.values() if warmup else ():
        run()
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    tokens: dict[str, list[int]] = {}
    for _ in range(rounds):
        for key, run in runs.items():
            t = time.perf_counter()
            tokens[key] = run()
            seconds[key].append(time.perf_counter() - t)
    first = {key: statistics.median(seconds.pop(key)) for key in list(seconds) if "first" in key}
    tps = {key: new_tokens / statistics.median(s) for key, s in seconds.items()}

    def agree(key: str) -> float:  # greedy tokens equal to the fp32 model's, as a fraction
        same = sum(a == b for a, b in zip(tokens[key], tokens["ours_fast"], strict=True))
        return same / new_tokens

    return {
        "model": name,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()[0]],
        "ours_fast_tokens_per_s": tps["ours_fast"],
        "ours_plain_tokens_per_s": tps["ours_plain"],
        "ours_fp16_tokens_per_s": tps["ours_fp16"],
        "ours_int4_tokens_per_s": tps["ours_int4"],
        "transformers_tokens_per_s": tps["transformers"],
        "speedup": tps["ours_fast"] / tps["transformers"],
        "plain_speedup": tps["ours_plain"] / tps["transformers"],
        "fp16_speedup": tps["ours_fp16"] / tps["transformers"],
        "int4_speedup": tps["ours_int4"] / tps["transformers"],
        "same_tokens": tokens["ours_fast"] == tokens["ours_plain"],
        "fp16_same_greedy_tokens": agree("ours_fp16"),
        "int4_same_greedy_tokens": agree("ours_int4"),
        "int4_grid_error": ours_int4.grid_error,
        "prefill_tokens": prefill_len,
        "first_token_s": {key.removeprefix("first_"): value for key, value in first.items()},
    }


DECODE_MEMORY_VARIANTS = ("ours", "ours_fp16", "ours_int4", "transformers")


def decode_memory_run(variant: str, name: str, new_tokens: int, prompt_len: int = 32) -> dict:
    """In this process: load `name` as `variant`, then decode `new_tokens` greedily, batch 1, and
    return the resident memory after loading and the peak while decoding (the high-water mark is
    restarted after the load, so a loader's transient copies do not count)."""
    from core.lm.generate import generate
    from core.lm.loader import load_model, resolve
    from core.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    if variant == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve(name).source, dtype=torch.float32)
    else:
        from core.lm.engines import prepare

        precision = {"ours": "fp32", "ours_fp16": "fp16", "ours_int4": "int4"}[variant]
        model = prepare(load_model(name), precision)  # int4: the fp32 model is dropped here
    import gc

    gc.collect()
    loaded, reset = rss_bytes(), reset_peak_rss()
    prompt = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if variant == "transformers":
            model.eval().generate(prompt, **greedy_kwargs(new_tokens))
        else:
            generate(
                model, prompt[0], sampling=SamplingParams(max_tokens=new_tokens, temperature=0.0)
            )
    return {
        "variant": variant,
        "rss_after_load_bytes": loaded,
        "peak_rss_decoding_bytes": peak_rss_bytes(),
        "peak_is_decoding_only": reset,
    }


def decode_memory(
    name: str | None = None, new_tokens: int = 256, variants=DECODE_MEMORY_VARIANTS
) -> dict:
    """`decode_memory_run` for each variant, each in a fresh process (its own peak, nothing
    shared with the others): {variant: figures}."""
    import subprocess
    import sys

    from core.lm.loader import FOUNDATION_MODEL

    name = name or FOUNDATION_MODEL
    results = {}
    for variant in variants:
        argv = [sys.executable, "-m", "core.bench.gpt", "decode-memory", variant, name]
        done = subprocess.run([*argv, str(new_tokens)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"decode memory, {variant}: {done.stderr.strip()[-500:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def tutor_config() -> dict:
    """The shipped tutor-base shape (the model the dashboard and `generate` actually run)."""
    from core.lm.loader import PRETRAINED_DIR, config_from_hf

    config_file = PRETRAINED_DIR / "tutor-base" / "config.json"
    cfg = config_from_hf(json.loads(config_file.read_text())).to_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg.pop(key)
    cfg["max_position_embeddings"] = 1024  # room for the 500-token decode test
    return cfg


def run_benchmarks(quick: bool = False, echo: Callable[[str], None] = print) -> dict:
    threads = torch.get_num_threads()
    echo(f"core benchmarks: torch {torch.__version__}, {threads} CPU threads, fp32")
    peak = matmul_peak_flops(seconds=0.3 if quick else 2.0)
    echo(f"  fp32 matmul peak (1024x1024): {peak / 1e9:.1f} GFLOP/s")
    results: dict = {"matmul_peak_flops": peak}
    setups = {"tutor-base": tutor_config(), "12M": BENCH_CONFIG}
    if not quick:
        setups["6L-d256"] = D256_CONFIG
    for name, config in setups.items():
        if quick:
            train = training_throughput(
                batch_size=2, seq_len=32, repeats=1, config=config, rounds=1
            )
            gen = generation_throughput(new_tokens=110, config=config, rounds=1)
        elif name == "tutor-base":
            train = training_throughput(batch_size=32, seq_len=128, config=config, compiled=True)
            gen = generation_throughput(config=config)
        elif name == "6L-d256":
            train = training_throughput(batch_size=8, seq_len=128, config=config, compiled=True)
            gen = generation_throughput(config=config)
        else:
            train = training_throughput(batch_size=8, seq_len=256, config=config, compiled=True)
            gen = generation_throughput(config=config)
        # Shared machines change speed over minutes: measure the roof again right after the
        # training run and keep the best seen, so MFU is never inflated by a slow first reading.
        peak = max(peak, matmul_peak_flops(seconds=0.3 if quick else 1.0))
        results["matmul_peak_flops"] = peak
        mfu = train["ours_tokens_per_s"] * train["flops_per_token"] / peak
        results[name] = {"training": train, "mfu": mfu, "generation": gen}
        echo(f"{name} shape ({train['parameters'] / 1e6:.2f}M parameters):")
        echo(
            f"  training, batch {train['config']['batch_size']}x{train['config']['seq_len']}: "
            f"ours {train['ours_tokens_per_s']:.0f} tok/s, transformers "
            f"{train['transformers_tokens_per_s']:.0f} tok/s -> {train['speedup']:.2f}x "
            "(goal >= 1.1x)"
        )
        if "compiled_speedup" in train:
            echo(
                f"  training under torch.compile (--set compile=true): ours "
                f"{train['ours_compiled_tokens_per_s']:.0f} tok/s -> "
                f"{train['compiled_speedup']:.2f}x transformers"
            )
        echo(
            f"  model-FLOPs utilisation: {100 * mfu:.0f}% of the best matmul peak seen so far, "
            f"{peak / 1e9:.1f} GFLOP/s (goal >= 60%)"
        )
        echo(
            f"  generation, {gen['new_tokens']} tokens greedy with KV cache: ours "
            f"{gen['ours_tokens_per_s']:.0f} tok/s, transformers generate "
            f"{gen['transformers_tokens_per_s']:.0f} tok/s -> {gen['speedup']:.2f}x (goal >= 3x)"
        )
        echo(
            f"  decode time per token: first 50 {gen['decode_ms_first_50']:.2f} ms, "
            f"last 50 {gen['decode_ms_last_50']:.2f} ms"
        )
    if quick:
        real = real_model_decode(new_tokens=4, prompt_len=8, rounds=1, warmup=False, prefill_len=16)
        memory = decode_memory(new_tokens=4, variants=("ours_int4",))  # one fresh process
    else:
        real, memory = real_model_decode(), decode_memory()
    results["smollm2"] = {"decode": real, "decode_memory": memory}
    echo(
        f"SmolLM2-135M-Instruct, batch 1, {real['new_tokens']} tokens greedy, "
        f"{real['threads']} threads, load average {real['load_average'][0]:.2f} -> "
        f"{real['load_average'][1]:.2f}, median of {real['rounds']} interleaved rounds:"
    )
    echo(
        f"  decode, fp32: ours {real['ours_fast_tokens_per_s']:.1f} tok/s (fast inference "
        f"path), ours {real['ours_plain_tokens_per_s']:.1f} tok/s (plain path), transformers "
        f"generate {real['transformers_tokens_per_s']:.1f} tok/s -> {real['speedup']:.2f}x "
        f"(plain {real['plain_speedup']:.2f}x)"
    )
    echo(
        f"  decode, float16 weights (what the demo bot runs; lossy, KL bounded in tests): ours "
        f"{real['ours_fp16_tokens_per_s']:.1f} tok/s -> {real['fp16_speedup']:.2f}x transformers "
        f"fp32 (goal >= 2x); {100 * real['fp16_same_greedy_tokens']:.0f}% of greedy tokens "
        "the same as fp32"
    )
    echo(
        f"  decode, 4-bit weights (5 bits/weight like GGUF Q4_1; SmolLM2's own Q4_1 codes, "
        f"grid error {real['int4_grid_error']:.3f} step): ours {real['ours_int4_tokens_per_s']:.1f}"
        f" tok/s -> {real['int4_speedup']:.2f}x transformers fp32; "
        f"{100 * real['int4_same_greedy_tokens']:.0f}% of greedy tokens the same as fp32"
    )
    first = real["first_token_s"]
    echo(
        f"  time to first token, {real['prefill_tokens']}-token prompt: ours fp32 "
        f"{first['ours']:.2f} s, ours float16 weights {first['ours_fp16']:.2f} s, ours 4-bit "
        f"{first['ours_int4']:.2f} s, transformers {first['transformers']:.2f} s"
    )
    labels = {
        "ours": "ours fp32",
        "ours_fp16": "ours float16",
        "ours_int4": "ours 4-bit",
        "transformers": "transformers",
    }
    echo(
        "  peak resident memory while decoding (fresh process each): "
        + ", ".join(
            f"{labels[k]} {v['peak_rss_decoding_bytes'] / 2**20:.0f} MiB" for k, v in memory.items()
        )
    )
    return results


if __name__ == "__main__":  # one decode_memory_run in a fresh process, for decode_memory
    import sys

    variant_arg, name_arg, tokens_arg = sys.argv[2:5]
    print(json.dumps(decode_memory_run(variant_arg, name_arg, int(tokens_arg))))
