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

from core.losses import lm_loss
from core.model import GPT, GPTConfig
from core.models import save_model

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
) -> dict:
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
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(_time_steps(ours_step, warmup=1, repeats=repeats))
        t_theirs.append(_time_steps(theirs_step, warmup=1, repeats=repeats))
    ours_tps, theirs_tps = tokens / min(t_ours), tokens / min(t_theirs)
    return {
        "config": {**(config or BENCH_CONFIG), "batch_size": batch_size, "seq_len": seq_len},
        "parameters": ours.num_parameters(),
        "ours_tokens_per_s": ours_tps,
        "transformers_tokens_per_s": theirs_tps,
        "speedup": ours_tps / theirs_tps,
        "flops_per_token": ours.flops_per_token(seq_len, training=True),
    }


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
    # made once and reused (core/model.py).
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

    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )

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


def tutor_config() -> dict:
    """The shipped tutor-base shape (the model the dashboard and `generate` actually run)."""
    from core.models import PRETRAINED_DIR, config_from_hf

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
    for name, config in setups.items():
        if quick:
            train = training_throughput(
                batch_size=2, seq_len=32, repeats=1, config=config, rounds=1
            )
            gen = generation_throughput(new_tokens=110, config=config, rounds=1)
        elif name == "tutor-base":
            train = training_throughput(batch_size=32, seq_len=128, config=config)
            gen = generation_throughput(config=config)
        else:
            train = training_throughput(batch_size=8, seq_len=256, config=config)
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
    return results
