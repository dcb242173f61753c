"""`genai-lab bench --against llama.cpp`: SmolLM2 decoding, our GPT beside llama.cpp.

llama.cpp is a measuring stick here, never a dependency: it is installed (llama-cpp-python, built
from source by pip) into an environment of its own under the cache directory, only when this
comparison is asked for, and the comparison is skipped with a message when that fails (offline,
no compiler). `make test` never builds it.

Same weights: the GGUF files are written from the shipped SmolLM2 GGUF (Q4_1) by dequantizing
its tensors, the same numbers our GPT loads (transformers dequantizes that file with the same
`gguf` package): F32 and F16 beside our fp32 and float16 weights (same bits per weight), Q8_0,
and the Q4_1 file itself beside our 4-bit weights (`core.lm.engines.int4`: the same codes, 5 bits per
weight in the layers). Each llama.cpp figure comes from a child process in that environment,
interleaved round by round with ours; medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from pathlib import Path

import torch

from core.atomic import atomic_file
from core.lm.embedded import cache_dir
from core.lm.sampling import SamplingParams

LLAMA_CPP_PACKAGE = "llama-cpp-python"
# Formats written from the shipped file; "Q4_1" is the shipped file as it is.
FORMATS = ("F32", "F16", "Q8_0", "Q4_1")
# Ours at the same bits per weight as a llama.cpp format.
# llama.cpp's format -> ours at the same bits per weight in the layers (the Q4_1 file keeps its
# vocabulary head in Q8_0, 8.5 bits; ours keeps it in float16).
SAME_BITS = {"F32": "ours_fp32", "F16": "ours_fp16", "Q4_1": "ours_int4"}


def environment() -> Path:
    return cache_dir() / "bench" / "llama-cpp"


def env_python() -> Path:
    return environment() / "bin" / "python"


def has_llama_cpp() -> bool:
    python = env_python()
    if not python.is_file():
        return False
    done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, check=False)
    return done.returncode == 0


def install_llama_cpp(echo: Callable[[str], None]) -> str | None:
    """Build llama-cpp-python into `environment()`; None when done, else why not (one line)."""
    folder = environment()
    echo(f"  building {LLAMA_CPP_PACKAGE} into {folder} (once; a C++ build, minutes) ...")
    if not env_python().is_file():
        venv.EnvBuilder(with_pip=True).create(folder)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    argv = [env_python(), "-m", "pip", "install", "--quiet", LLAMA_CPP_PACKAGE]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        return f"pip install {LLAMA_CPP_PACKAGE} failed: {last}"
    return None


def write_gguf_files(source: Path, folder: Path, formats=FORMATS) -> dict[str, Path]:
    """The shipped GGUF rewritten with its tensors in each format (metadata copied), cached in
    `folder` by the source file's size and time; {format: path}."""
    import gguf

    folder.mkdir(parents=True, exist_ok=True)
    stat = source.stat()
    stamp = f"{stat.st_size}-{int(stat.st_mtime)}"
    paths = {}
    for name in formats:
        if name == "Q4_1":
            paths[name] = source
            continue
        path = folder / f"{source.stem.split('.')[0]}.{name}.{stamp}.gguf"
        paths[name] = path
        if path.is_file():
            continue
        qtype = gguf.GGMLQuantizationType[name]
        reader = gguf.GGUFReader(source)
        arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
        with atomic_file(path) as tmp:  # two runs at once each write their own, then rename
            _write_gguf(reader, gguf.GGUFWriter(tmp, arch), name, qtype)
    return paths


def _write_gguf(reader, writer, name: str, qtype) -> None:
    """Copy `reader`'s metadata into `writer` and write its tensors in format `name`."""
    import gguf
    import numpy as np

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
            gguf.Keys.General.ARCHITECTURE,
            gguf.Keys.General.FILE_TYPE,
        ):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[name])
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if values.ndim == 1 or name == "F32":  # norms stay F32, as llama.cpp writes them
            writer.add_tensor(tensor.name, values)
        elif name == "F16":
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Runs in the llama.cpp environment: argv = threads, new_tokens, prefill_len, then paths.
CHILD = r"""
import json, sys, time
import llama_cpp
threads, new_tokens, prefill_len = map(int, sys.argv[1:4])
out = {}
for path in sys.argv[4:]:
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=1024, n_batch=512, verbose=False)
    prompt = [(7 * i + 11) % 10000 + 100 for i in range(32)]
    def decode(prompt, n):
        llm.reset()
        start, first, count = time.perf_counter(), None, 0
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter() - start
            if count == n:
                break
        return first, time.perf_counter() - start
    decode(prompt, 8)  # warm-up
    _, seconds = decode(prompt, new_tokens)
    first, _ = decode([(13 * i + 5) % 10000 + 100 for i in range(prefill_len)], 1)
    out[path] = {"tokens_per_s": new_tokens / seconds, "first_token_s": first}
    del llm
print(json.dumps(out))
"""


def llama_cpp_round(paths: dict[str, Path], new_tokens: int, prefill_len: int) -> dict:
    argv = [env_python(), "-c", CHILD, str(torch.get_num_threads()), str(new_tokens)]
    argv += [str(prefill_len), *map(str, paths.values())]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed: {done.stderr.strip()[-400:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: figures[str(path)] for name, path in paths.items()}


def ours_round(models: dict, new_tokens: int, prefill_len: int) -> dict:
    from core.lm.generate import decode, stepper_for

    prompt = torch.tensor([[(7 * i + 11) % 10000 + 100 for i in range(32)]])
    long_prompt = torch.tensor([[(13 * i + 5) % 10000 + 100 for i in range(prefill_len)]])
    out = {}
    with torch.inference_mode():
        for name, model in models.items():
            start = time.perf_counter()
            stepper = stepper_for(model, 1, prompt.shape[1] + new_tokens)
            for _ in decode(stepper, prompt, new_tokens, sampling=SamplingParams(temperature=0.0)):
                pass
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            stepper = stepper_for(model, 1, prefill_len + 1)
            for _ in decode(stepper, long_prompt, 1, sampling=SamplingParams(temperature=0.0)):
                pass
            first = time.perf_counter() - start
            out[name] = {"tokens_per_s": new_tokens / seconds, "first_token_s": first}
    return out


def against_llama_cpp(
    quick: bool = False, echo: Callable[[str], None] = print, build: bool = True
) -> dict:
    """Decode tokens/s and time to the first token of a 300-token prompt: ours (fp32, float16
    and 4-bit weights) and llama.cpp (F32, F16, Q8_0, Q4_1), interleaved rounds, medians; {} with a
    message when llama.cpp is not there and cannot be built."""
    from core.lm.embedded import EMBEDDED_MODELS, gguf_path
    from core.lm.engines import prepare
    from core.lm.loader import FOUNDATION_MODEL, load_model

    if not has_llama_cpp():
        why = install_llama_cpp(echo) if build else "not installed"
        if why is not None or not has_llama_cpp():
            echo(f"  llama.cpp comparison skipped: {why or 'llama_cpp does not import'}")
            return {}
    new_tokens, prefill_len, rounds = (16, 32, 1) if quick else (256, 300, 3)
    source = gguf_path(EMBEDDED_MODELS[FOUNDATION_MODEL])
    echo("  writing the GGUF files (once) ...")
    paths = write_gguf_files(source, environment().parent / "gguf")
    models = {
        "ours_fp32": prepare(load_model(FOUNDATION_MODEL)),
        "ours_fp16": prepare(load_model(FOUNDATION_MODEL), "fp16"),
        "ours_int4": prepare(load_model(FOUNDATION_MODEL), "int4"),
    }
    ours_round(models, 8, 16)  # warm-up
    load_before = os.getloadavg()[0]
    runs: list[dict] = []
    for _ in range(rounds):
        runs.append({**ours_round(models, new_tokens, prefill_len)})
        runs[-1].update(llama_cpp_round(paths, new_tokens, prefill_len))
    names = list(runs[0])
    figures = {
        name: {
            key: statistics.median(run[name][key] for run in runs)
            for key in ("tokens_per_s", "first_token_s")
        }
        for name in names
    }
    result = {
        "model": FOUNDATION_MODEL,
        "new_tokens": new_tokens,
        "prefill_tokens": prefill_len,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()[0]],
        "figures": figures,
        "same_bits_ratio": {
            fmt: figures[ours]["tokens_per_s"] / figures[fmt]["tokens_per_s"]
            for fmt, ours in SAME_BITS.items()
        },
    }
    echo(
        f"SmolLM2-135M-Instruct against llama.cpp, batch 1, {new_tokens} tokens greedy, "
        f"{result['threads']} threads, load average {load_before:.2f} -> "
        f"{result['load_average'][1]:.2f}, median of {rounds} interleaved rounds:"
    )
    for name in names:
        f = figures[name]
        echo(
            f"  {name:10s} {f['tokens_per_s']:6.1f} tok/s, first token of a {prefill_len}-token "
            f"prompt {f['first_token_s']:.2f} s"
        )
    for fmt, ratio in result["same_bits_ratio"].items():
        echo(f"  same bits per weight: {SAME_BITS[fmt]} / llama.cpp {fmt} = {ratio:.2f}x")
    return result


if __name__ == "__main__":
    print(json.dumps(against_llama_cpp(quick="--quick" in sys.argv), indent=2))
