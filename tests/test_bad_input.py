"""Bad input to every command ends in ONE line `error: ...` naming what is wrong, never a traceback.

A table of cheap cases (bad flags and values, bad config keys, bad files: empty, binary,
truncated safetensors, mismatched config.json, pickle adapters, broken JSON/YAML, missing keys),
each run in this process through typer's runner against the real `genai-lab` app, plus a full
disk (a real ENOSPC from /dev/full, and safetensors' disk-full error while writing a checkpoint)
and `--debug` / GENAI_LAB_DEBUG=1, which do show the traceback.

Usage errors (unknown flag, a value typer rejects) exit 2, click's usage code; every other error
exits 1. Both print the same one-line style.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes
from typer.testing import CliRunner

from core.cli import DEBUG_ENV, build_app
from core.lm.loader import PRETRAINED_DIR

ROOT = Path(__file__).resolve().parent.parent
TUTOR = PRETRAINED_DIR / "tutor-base"
USAGE, FAIL = 2, 1  # exit codes: click's usage errors, everything else
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def app():
    return build_app()


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Every bad file the cases use, built once: the name -> its path."""
    root = tmp_path_factory.mktemp("bad")
    files: dict[str, Path] = {}

    def text(name: str, content: str) -> None:
        files[name.split(".")[0]] = root / name
        (root / name).write_text(content, encoding="utf-8")

    def model(name: str, config: dict | str | None = None, weights: bytes | None = None) -> None:
        folder = root / name
        shutil.copytree(TUTOR, folder)
        if config is not None:
            raw = config if isinstance(config, str) else json.dumps(config)
            (folder / "config.json").write_text(raw)
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        files[name] = folder

    def adapter(name: str, weights: dict[str, bytes], config: str | None = None) -> None:
        folder = root / name
        folder.mkdir()
        meta = {"base_model_name_or_path": "tutor-base", "peft_type": "LORA", "r": 4}
        meta |= {"lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
        (folder / "adapter_config.json").write_text(config or json.dumps(meta))
        for file, content in weights.items():
            (folder / file).write_bytes(content)
        files[name] = folder

    weights = (TUTOR / "model.safetensors").read_bytes()
    hf = json.loads((TUTOR / "config.json").read_text())
    binary = bytes(range(256)) * 16  # NUL, control bytes and invalid UTF-8
    text("empty.jsonl", "")
    files["binary"] = root / "binary.jsonl"
    files["binary"].write_bytes(binary)
    files["binary_txt"] = root / "binary.txt"
    files["binary_txt"].write_bytes(binary)
    files["binary_yaml"] = root / "binary.yaml"
    files["binary_yaml"].write_bytes(binary)
    text("empty_txt.txt", "")
    text("notjson.jsonl", "this is not JSON\nnor is this\n")
    text("sft_nokey.jsonl", json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    text("sft_badrole.jsonl", json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    text("prefs_nokey.jsonl", json.dumps({"prompt": "Hi?", "chosen": "Hello."}) + "\n")
    text("ft_rows.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    text("ft_good.jsonl", "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                  for i in range(4)))  # fmt: skip
    text("ft_txt.txt", "prompt,completion\n")
    text("list_yaml.yaml", "- 1\n- 2\n")
    text("typo_yaml.yaml", "max_stepz: 3\n")
    text("badvalue_yaml.yaml", "batch_size: zero\n")
    text("pipe_typo.yaml", "base_model: tutor-base\nthreds: 2\n")
    text("pipe_section_typo.yaml", "base_model: tutor-base\nsft: {lerning_rate: 1}\n")
    text("pipe_section_value.yaml", "base_model: tutor-base\nrlhf: {minibatches: 0}\n")
    text("pipe_section_scalar.yaml", "base_model: tutor-base\nsft: 3\n")
    text("pipe_threads.yaml", "base_model: tutor-base\nthreads: -1\n")
    recipe = ROOT / "core" / "configs" / "tutor-base.yaml"  # (a relative one is beside the YAML)
    text("pipe_pretrain.yaml", f"pretrain_config: {recipe}\npretrain: {{num_attention_heads: 5}}\n")
    text("ft_yaml.yaml", "lora_rank: [1, 2]\n")
    model("trunc", weights=weights[: len(weights) // 2])
    model("header_only", weights=weights[:100])
    model("mismatch", config={**hf, "hidden_size": 96, "head_dim": 16})
    model("config_garbage", config="{not json")
    model("config_nokey", config={k: v for k, v in hf.items() if k != "hidden_size"})
    model(
        "config_heads",
        config={**hf, "num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": None},
    )
    model("config_vocab", config={**hf, "vocab_size": 0})
    (root / "no_config").mkdir()
    files["no_config"] = root / "no_config"
    adapter("pickle_adapter", {"adapter_model.bin": b"\x80\x04\x95garbage"})
    adapter("no_weights_adapter", {})
    adapter("corrupt_adapter", {"adapter_model.safetensors": weights[:1000]})
    adapter("garbage_adapter", {"adapter_model.safetensors": weights[:1000]}, config="{oops")

    def lora(name: str, tensors: dict[str, list[int]]) -> None:
        """An adapter (r=4 on q_proj of tutor-base) whose safetensors holds these shapes."""
        data = {k: torch.zeros(shape) for k, shape in tensors.items()}
        adapter(name, {"adapter_model.safetensors": safetensors_bytes(data)})

    q = "base_model.model.model.layers.0.self_attn.q_proj"  # tutor-base: 192 -> 192 features
    lora("empty_adapter", {})  # zero tensors: an adapter that would change nothing
    lora("names_adapter", {"model.embed_tokens.weight": [8, 4]})
    lora("target_adapter", {f"{q[:-6]}k_proj.lora_A.weight": [4, 192],
                            f"{q[:-6]}k_proj.lora_B.weight": [64, 4]})  # fmt: skip
    lora("rank_adapter", {f"{q}.lora_A.weight": [8, 192], f"{q}.lora_B.weight": [192, 8]})
    lora("half_adapter", {f"{q}.lora_A.weight": [4, 192]})
    lora("shape_adapter", {f"{q}.lora_A.weight": [4, 96], f"{q}.lora_B.weight": [192, 4]})
    q9 = q.replace("layers.0", "layers.9")  # tutor-base has 4 layers
    lora("layer_adapter", {f"{q9}.lora_A.weight": [4, 192], f"{q9}.lora_B.weight": [192, 4]})
    model("unknown_type", config={**hf, "model_type": "foomodel"})
    model("no_type", config={k: v for k, v in hf.items() if k != "model_type"})
    # A Llama our GPT does not run (gelu), so transformers would load it: pickled weights only.
    model("pickle_model", config={**hf, "hidden_act": "gelu"})
    (files["pickle_model"] / "model.safetensors").unlink()
    (files["pickle_model"] / "pytorch_model.bin").write_bytes(b"\x80\x04\x95garbage")
    model("pickle_core")
    (files["pickle_core"] / "model.safetensors").rename(files["pickle_core"] / "pytorch_model.bin")
    files["data_folder"] = root / "data_folder"
    files["data_folder"].mkdir()
    shutil.copy(files["ft_good"], files["data_folder"] / "train.jsonl")
    (files["data_folder"] / "notes.txt").write_text("not data\n")
    deep = "[" * 100_000 + "]" * 100_000
    text("deep_row.jsonl", '{"prompt": ' + deep + ', "completion": "b"}\n')
    text("deep_array.json", '[{"prompt": ' + deep + ', "completion": "b"}]\n')
    text("long_field.csv", 'prompt,completion\n"' + "x" * 200_000 + '",b\n')
    text("control_char.jsonl", '{"prompt": "a\tb", "completion": "b"}\n')
    foreign = root / "other_app.sqlite"  # another application's database
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.close()
    files["other_app"] = foreign
    lookalike = root / "lookalike.sqlite"  # a table named like LangGraph's, but not its
    with sqlite3.connect(lookalike) as conn:
        conn.execute("CREATE TABLE checkpoints (id INTEGER)")
    conn.close()
    files["lookalike"] = lookalike
    setup = "SmolLM2 plain"  # `bot eval --output` files with what --rescore/--update cannot read
    text("eval_deep.json", deep)
    text("eval_list.json", "[1, 2]")
    text("eval_setup.json", json.dumps({"bogus": {}}))
    text("eval_value.json", json.dumps({setup: 3}))
    answer = {"question": "q", "concept": "ai", "answer": 5, "verdict": "right"}
    text("eval_answer.json", json.dumps({setup: {"seconds": 1, "answers": [answer]}}))
    answer = {**answer, "answer": "a", "concept": "nope"}
    text("eval_concept.json", json.dumps({setup: {"seconds": 1, "answers": [answer]}}))
    figures = {"right_concept": 0, "other_concept": 0, "abstained_out_of_scope": 0}
    huge = json.dumps({setup: {"seconds": 1, **figures, "wrongly_abstained": 0}})
    text(
        "eval_huge.json",
        huge.replace('"wrongly_abstained": 0', '"wrongly_abstained": 1' + "0" * 400),
    )
    return files


def run(app, args: list[str], **kwargs):
    return CliRunner().invoke(app, args, **kwargs)


def assert_one_line_error(result, expected: str, code: int) -> None:
    """Exit `code`, a clean exit (no exception escaped), no traceback or box, and stderr is
    exactly one line `error: ...` containing `expected` (stdout may hold progress before it)."""
    shown = result.output
    assert result.exit_code == code, (result.exit_code, shown)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in shown and "╭" not in shown, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]


# (id, command line, what the error line must contain, exit code). `{name}` is a file from the
# `bad` fixture, `{out}` a fresh folder per case, `{missing}` a path that does not exist.
CASES = [
    # -- usage errors: typer's own checks, in the same one-line style ---------------------------
    ("pretrain-unknown-flag", "pretrain --bogus", "No such option: --bogus", USAGE),
    ("sft-unknown-flag", "sft --bogus", "No such option: --bogus", USAGE),
    ("reward-unknown-flag", "reward --bogus", "No such option: --bogus", USAGE),
    ("rlhf-unknown-flag", "rlhf --bogus", "No such option: --bogus", USAGE),
    ("pipeline-unknown-flag", "pipeline --bogus", "No such option: --bogus", USAGE),
    ("generate-unknown-flag", "generate --prompt hi --bogus", "No such option: --bogus", USAGE),
    ("bench-unknown-flag", "bench --bogus", "No such option: --bogus", USAGE),
    ("finetune-unknown-flag", "finetune --bogus", "No such option: --bogus", USAGE),
    ("merge-unknown-flag", "merge --bogus", "No such option: --bogus", USAGE),
    ("chat-unknown-flag", "chat --bogus", "No such option: --bogus", USAGE),
    ("bot-data-unknown-flag", "bot data --bogus", "No such option: --bogus", USAGE),
    ("bot-ship-unknown-flag", "bot ship --bogus", "No such option: --bogus", USAGE),
    ("bot-eval-unknown-flag", "bot eval --bogus", "No such option: --bogus", USAGE),
    ("unknown-command", "pretrian", "No such command 'pretrian'", USAGE),
    ("bot-unknown-command", "bot evaluate", "No such command 'evaluate'", USAGE),
    ("debug-without-command", "--debug", "Missing command", USAGE),
    ("generate-no-prompt", "generate", "Missing option '--prompt'", USAGE),
    ("merge-no-output", "merge --adapter {pickle_adapter}", "Missing option '--output'", USAGE),
    ("pretrain-steps-not-int", "pretrain --max-steps abc", "'--max-steps'", USAGE),
    ("sft-steps-float", "sft --max-steps 1.5", "'--max-steps'", USAGE),
    ("sft-show-mask-negative", "sft --show-mask -1", "'--show-mask'", USAGE),
    (
        "generate-zero-tokens",
        "generate --prompt hi --max-new-tokens 0",
        "'--max-new-tokens'",
        USAGE,
    ),
    ("generate-top-p-2", "generate --prompt hi --top-p 2", "'--top-p'", USAGE),
    (
        "generate-negative-temperature",
        "generate --prompt hi --temperature -1",
        "'--temperature'",
        USAGE,
    ),
    ("generate-negative-top-k", "generate --prompt hi --top-k -1", "'--top-k'", USAGE),
    ("generate-seed-text", "generate --prompt hi --seed x", "'--seed'", USAGE),
    ("bot-eval-every-0", "bot eval --every 0", "'--every'", USAGE),
    ("bot-eval-max-tokens-0", "bot eval --max-tokens 0", "'--max-tokens'", USAGE),
    ("chat-temperature-text", "chat --temperature warm", "'--temperature'", USAGE),
    # -- pretrain: every value checked before the corpus is read --------------------------------
    (
        "pretrain-checkpoint-every-0",
        "pretrain --set checkpoint_every=0",
        "checkpoint_every: got 0, must be >= 1",
        FAIL,
    ),
    ("pretrain-log-every-0", "pretrain --set log_every=0", "log_every: got 0, must be >= 1", FAIL),
    ("pretrain-eval-every-0", "pretrain --set eval_every=0", "eval_every: got 0", FAIL),
    ("pretrain-threads-negative", "pretrain --set threads=-1", "threads: got -1", FAIL),
    ("pretrain-device-banana", "pretrain --device banana", "device: got 'banana'", FAIL),
    ("pretrain-device-cuda-99", "pretrain --device cuda:99", "device: got 'cuda:99'", FAIL),
    ("pretrain-device-mps", "pretrain --device mps", "device: got 'mps'", FAIL),
    ("pretrain-batch-size-0", "pretrain --batch-size 0", "batch_size: got 0", FAIL),
    ("pretrain-max-steps-0", "pretrain --max-steps 0", "max_steps: got 0", FAIL),
    ("pretrain-lr-negative", "pretrain --learning-rate -1", "learning_rate: got -1.0", FAIL),
    ("pretrain-lr-nan", "pretrain --set learning_rate=nan", "learning_rate: got nan", FAIL),
    ("pretrain-min-lr-above-lr", "pretrain --set min_learning_rate=1", "min_learning_rate", FAIL),
    ("pretrain-warmup-negative", "pretrain --set warmup_steps=-1", "warmup_steps: got -1", FAIL),
    ("pretrain-weight-decay-negative", "pretrain --set weight_decay=-0.1", "weight_decay", FAIL),
    ("pretrain-beta1-1.5", "pretrain --set beta1=1.5", "beta1: got 1.5, must be in [0, 1)", FAIL),
    ("pretrain-grad-clip-0", "pretrain --set grad_clip=0", "grad_clip: got 0.0", FAIL),
    (
        "pretrain-keep-checkpoints-0",
        "pretrain --set keep_checkpoints=0",
        "keep_checkpoints",
        FAIL,
    ),
    ("pretrain-seq-len-0", "pretrain --set seq_len=0", "seq_len: got 0", FAIL),
    ("pretrain-grad-accum-0", "pretrain --set grad_accum=0", "grad_accum: got 0", FAIL),
    (
        "pretrain-heads-not-divisor",
        "pretrain --set num_attention_heads=5",
        "num_attention_heads: got 5",
        FAIL,
    ),
    (
        "pretrain-kv-heads-not-divisor",
        "pretrain --set num_key_value_heads=4",
        "num_key_value_heads: got 4",
        FAIL,
    ),
    ("pretrain-vocab-0", "pretrain --set vocab_size=0", "vocab_size: got 0", FAIL),
    ("pretrain-hidden-0", "pretrain --set hidden_size=0", "hidden_size: got 0", FAIL),
    (
        "pretrain-seq-len-over-context",
        "pretrain --set context_length=64",
        "seq_len: got 128",
        FAIL,
    ),
    ("pretrain-rope-theta-0", "pretrain --set rope_theta=0", "rope_theta: got 0.0", FAIL),
    ("pretrain-typo-key", "pretrain --set lerning_rate=1", "did you mean 'learning_rate'?", FAIL),
    ("pretrain-set-not-int", "pretrain --set max_steps=abc", "--max-steps: expected int", FAIL),
    ("pretrain-set-no-equals", "pretrain --set batch_size", "expected KEY=VALUE", FAIL),
    ("pretrain-config-missing", "pretrain --config {missing}", "config file not found", FAIL),
    ("pretrain-config-binary", "pretrain --config {binary_yaml}", "not valid YAML", FAIL),
    ("pretrain-config-list", "pretrain --config {list_yaml}", "expected a mapping", FAIL),
    ("pretrain-config-typo", "pretrain --config {typo_yaml}", "unknown key 'max_stepz'", FAIL),
    (
        "pretrain-config-bad-value",
        "pretrain --config {badvalue_yaml}",
        "batch_size: expected int, got 'zero'",
        FAIL,
    ),
    ("pretrain-corpus-missing", "pretrain --corpus {missing}", "{missing}", FAIL),
    ("pretrain-corpus-empty", "pretrain --corpus {empty_txt}", "{empty_txt}", FAIL),
    ("pretrain-corpus-binary", "pretrain --corpus {binary_txt}", "not valid UTF-8", FAIL),
    # -- sft ---------------------------------------------------------------------------------------
    ("sft-eval-batch-size-0", "sft --set eval_batch_size=0", "eval_batch_size: got 0", FAIL),
    ("sft-batch-size-0", "sft --set batch_size=0", "batch_size: got 0", FAIL),
    ("sft-threads-negative", "sft --set threads=-2", "threads: got -2", FAIL),
    ("sft-device-banana", "sft --set device=banana", "device: got 'banana'", FAIL),
    ("sft-truncated-weights", "sft --model {trunc}", "{trunc}/model.safetensors: corrupt", FAIL),
    (
        "sft-header-only-weights",
        "sft --model {header_only}",
        "{header_only}/model.safetensors",
        FAIL,
    ),
    (
        "sft-config-mismatch",
        "sft --model {mismatch}",
        "config.json does not match the weights",
        FAIL,
    ),
    ("sft-model-missing", "sft --model {missing}", "unknown model", FAIL),
    ("sft-config-garbage", "sft --model {config_garbage}", "config.json: not valid JSON", FAIL),
    ("sft-config-missing-key", "sft --model {config_nokey}", "missing key 'hidden_size'", FAIL),
    ("sft-train-missing", "sft --train-file {missing}", "{missing}: file not found", FAIL),
    ("sft-train-empty", "sft --train-file {empty}", "{empty}: no rows", FAIL),
    ("sft-train-binary", "sft --train-file {binary}", "{binary}: not a JSON Lines text", FAIL),
    ("sft-train-not-json", "sft --train-file {notjson}", "{notjson}:1: invalid JSON", FAIL),
    ("sft-train-missing-keys", "sft --train-file {sft_nokey}", "missing field", FAIL),
    ("sft-train-bad-role", "sft --train-file {sft_badrole}", "unknown role 'bot'", FAIL),
    ("sft-eval-empty", "sft --eval-file {empty}", "{empty}: no rows", FAIL),
    ("sft-typo-key", "sft --set lerning_rate=1", "did you mean 'learning_rate'?", FAIL),
    ("sft-config-typo", "sft --config {typo_yaml}", "unknown key 'max_stepz'", FAIL),
    # -- reward ------------------------------------------------------------------------------------
    ("reward-batch-size-negative", "reward --set batch_size=-3", "batch_size: got -3", FAIL),
    ("reward-keep-checkpoints-0", "reward --set keep_checkpoints=0", "keep_checkpoints", FAIL),
    ("reward-device-cuda-99", "reward --set device=cuda:99", "device: got 'cuda:99'", FAIL),
    ("reward-train-missing-key", "reward --train-file {prefs_nokey}", "rejected", FAIL),
    (
        "reward-train-binary",
        "reward --train-file {binary}",
        "{binary}: not a JSON Lines text",
        FAIL,
    ),
    ("reward-truncated-weights", "reward --model {trunc}", "{trunc}/model.safetensors", FAIL),
    # -- rlhf --------------------------------------------------------------------------------------
    ("rlhf-method-unknown", "rlhf --method foo", "method must be 'ppo' or 'dpo'", FAIL),
    ("rlhf-ppo-no-reward-model", "rlhf --method ppo", "needs a reward model", FAIL),
    ("rlhf-minibatches-0", "rlhf --method dpo --set minibatches=0", "minibatches: got 0", FAIL),
    (
        "rlhf-batch-not-multiple",
        "rlhf --method dpo --set batch_size=3",
        "must be a multiple of minibatches",
        FAIL,
    ),
    ("rlhf-dpo-beta-0", "rlhf --method dpo --set beta=0", "beta: got 0.0, must be > 0", FAIL),
    (
        "rlhf-ppo-epochs-0",
        "rlhf --reward-model {trunc} --set ppo_epochs=0",
        "ppo_epochs: got 0",
        FAIL,
    ),
    ("rlhf-gamma-2", "rlhf --reward-model {trunc} --set gamma=2", "gamma: got 2.0", FAIL),
    (
        "rlhf-max-new-tokens-0",
        "rlhf --method dpo --set max_new_tokens=0",
        "max_new_tokens",
        FAIL,
    ),
    (
        "rlhf-config-mismatch",
        "rlhf --method dpo --model {mismatch}",
        "config.json does not match the weights",
        FAIL,
    ),
    ("rlhf-train-empty", "rlhf --method dpo --train-file {empty}", "{empty}: no rows", FAIL),
    # -- pipeline: every stage's values checked before the first stage trains ---------------------
    ("pipeline-config-missing", "pipeline --config {missing}", "config file not found", FAIL),
    ("pipeline-config-binary", "pipeline --config {binary_yaml}", "not valid YAML", FAIL),
    ("pipeline-unknown-key", "pipeline --config {pipe_typo}", "unknown key 'threds'", FAIL),
    (
        "pipeline-section-typo",
        "pipeline --config {pipe_section_typo}",
        "sft: unknown key 'lerning_rate'",
        FAIL,
    ),
    (
        "pipeline-section-value",
        "pipeline --config {pipe_section_value}",
        "rlhf: minibatches: got 0, must be >= 1",
        FAIL,
    ),
    (
        "pipeline-section-scalar",
        "pipeline --config {pipe_section_scalar}",
        "sft: expected a mapping",
        FAIL,
    ),
    ("pipeline-threads-negative", "pipeline --config {pipe_threads}", "threads: got -1", FAIL),
    (
        "pipeline-pretrain-heads",
        "pipeline --config {pipe_pretrain}",
        "pretrain: num_attention_heads: got 5",
        FAIL,
    ),
    ("pipeline-base-model-missing", "pipeline --base-model {missing}", "unknown model", FAIL),
    # -- generate ----------------------------------------------------------------------------------
    (
        "generate-truncated-weights",
        "generate --prompt hi --model {trunc}",
        "{trunc}/model.safetensors: corrupt or truncated safetensors file",
        FAIL,
    ),
    (
        "generate-config-mismatch",
        "generate --prompt hi --model {mismatch}",
        "{mismatch}: config.json does not match the weights",
        FAIL,
    ),
    (
        "generate-config-garbage",
        "generate --prompt hi --model {config_garbage}",
        "{config_garbage}/config.json: not valid JSON",
        FAIL,
    ),
    (
        "generate-config-heads",
        "generate --prompt hi --model {config_heads}",
        "num_attention_heads: got 5, must divide hidden_size",
        FAIL,
    ),
    (
        "generate-config-vocab-0",
        "generate --prompt hi --model {config_vocab}",
        "vocab_size: got 0",
        FAIL,
    ),
    (
        "generate-no-config",
        "generate --prompt hi --model {no_config}",
        "has no config.json",
        FAIL,
    ),
    ("generate-model-missing", "generate --prompt hi --model {missing}", "unknown model", FAIL),
    (
        "generate-model-is-file",
        "generate --prompt hi --model {empty}",
        "a file, not a model",
        FAIL,
    ),
    ("generate-model-typo", "generate --prompt hi --model tutr", "unknown model 'tutr'", FAIL),
    ("generate-hosted-model", "generate --prompt hi --model openai:gpt-4o", "local models", FAIL),
    (
        "generate-pickle-adapter",
        "generate --prompt hi --adapter {pickle_adapter}",
        "adapter_model.bin is a pickle file",
        FAIL,
    ),
    (
        "generate-adapter-no-weights",
        "generate --prompt hi --adapter {no_weights_adapter}",
        "no adapter_model.safetensors",
        FAIL,
    ),
    (
        "generate-adapter-missing",
        "generate --prompt hi --adapter {missing}",
        "not a LoRA adapter folder",
        FAIL,
    ),
    (
        "generate-adapter-bad-config",
        "generate --prompt hi --adapter {garbage_adapter}",
        "cannot read the adapter's config",
        FAIL,
    ),
    (
        "generate-corrupt-adapter",
        "generate --prompt hi --adapter {corrupt_adapter}",
        "{corrupt_adapter}/adapter_model.safetensors: corrupt or truncated",
        FAIL,
    ),
    (
        "generate-empty-adapter",
        "generate --prompt hi --adapter {empty_adapter}",
        "{empty_adapter}/adapter_model.safetensors: holds no tensors",
        FAIL,
    ),
    (
        "generate-adapter-not-lora-names",
        "generate --prompt hi --adapter {names_adapter}",
        "tensor 'model.embed_tokens.weight' is not a LoRA weight",
        FAIL,
    ),
    (
        "generate-adapter-other-targets",
        "generate --prompt hi --adapter {target_adapter}",
        "adapts 'k_proj', which adapter_config.json's target_modules (q_proj) does not list",
        FAIL,
    ),
    (
        "generate-adapter-rank-not-r",
        "generate --prompt hi --adapter {rank_adapter}",
        "does not match adapter_config.json's r=4",
        FAIL,
    ),
    (
        "generate-adapter-half-pair",
        "generate --prompt hi --adapter {half_adapter}",
        "q_proj.lora_A.weight' has no lora_B partner",
        FAIL,
    ),
    (
        "generate-adapter-shape-not-base",
        "generate --prompt hi --adapter {shape_adapter}",
        "{shape_adapter}/adapter_model.safetensors: tensor 'base_model.model.model.layers.0."
        "self_attn.q_proj.lora_A.weight' has shape [4, 96], but the base model",
        FAIL,
    ),
    (
        "generate-adapter-layer-not-in-base",
        "generate --prompt hi --adapter {layer_adapter}",
        "adapts the layer 'model.layers.9.self_attn.q_proj', which the base model",
        FAIL,
    ),
    (
        "generate-unknown-model-type",
        "generate --prompt hi --model {unknown_type}",
        "{unknown_type}: config.json's model_type 'foomodel' is unknown to transformers; "
        "supported: llama (our GPT)",
        FAIL,
    ),
    (
        "generate-no-model-type",
        "generate --prompt hi --model {no_type}",
        "{no_type}: config.json has no model_type",
        FAIL,
    ),
    (
        "generate-pickle-model",
        "generate --prompt hi --model {pickle_model}",
        "{pickle_model}/pytorch_model.bin: a pickle file, which can run code when loaded; only "
        "safetensors weights are loaded",
        FAIL,
    ),
    (
        "generate-pickle-core-model",
        "generate --prompt hi --model {pickle_core}",
        "{pickle_core}: no model.safetensors (found pytorch_model.bin)",
        FAIL,
    ),
    (
        "generate-seed-too-big",
        f"generate --model tutor-base --prompt hi --seed {2**64}",
        f"seed must be an integer from 0 to 2**64 - 1, got {2**64}",
        FAIL,
    ),
    (
        "generate-prompt-too-long",
        "generate --model tutor-base --prompt '" + "word " * 200 + "'",
        "context is 128 tokens",
        FAIL,
    ),
    # -- finetune (--check reads the data, --dry-run lints it too) ---------------------------------
    ("finetune-no-data", "finetune --check", "data: no training data", FAIL),
    ("finetune-data-missing", "finetune --check --data {missing}", "dataset file not found", FAIL),
    ("finetune-data-empty", "finetune --check --data {empty}", "{empty}: no rows", FAIL),
    ("finetune-data-binary", "finetune --check --data {binary}", "not a dataset", FAIL),
    ("finetune-data-suffix", "finetune --check --data {ft_txt}", "unsupported file type", FAIL),
    ("finetune-bad-rows", "finetune --check --data {ft_rows}", "1 invalid row", FAIL),
    (
        "finetune-columns-no-value",
        "finetune --check --data {ft_good} --columns output",
        "columns",
        FAIL,
    ),
    (
        "finetune-max-eval-rows-0",
        "finetune --check --data {ft_good} --max-eval-rows 0",
        "max_eval_rows",
        FAIL,
    ),
    (
        "finetune-report-to-bogus",
        "finetune --check --data {ft_good} --report-to bogus",
        "report_to",
        FAIL,
    ),
    (
        "finetune-save-not-multiple-of-eval",
        "finetune --check --data {ft_good} --save-steps 4 --eval-steps 12",
        "save_steps",
        FAIL,
    ),
    (
        "finetune-no-format",
        "finetune --check --data {sft_nokey}",
        "cannot tell the format",
        FAIL,
    ),
    (
        "finetune-method",
        "finetune --check --data {ft_good} --method foo",
        "method: got 'foo'",
        FAIL,
    ),
    (
        "finetune-format",
        "finetune --check --data {ft_good} --format csv",
        "format: got 'csv'",
        FAIL,
    ),
    (
        "finetune-lora-rank-0",
        "finetune --check --data {ft_good} --lora-rank 0",
        "lora_rank: got 0, must be >= 1",
        FAIL,
    ),
    (
        "finetune-lora-rank-text",
        "finetune --check --data {ft_good} --lora-rank abc",
        "--lora-rank: expected int",
        FAIL,
    ),
    (
        "finetune-batch-size-0",
        "finetune --check --data {ft_good} --batch-size 0",
        "batch_size: got 0",
        FAIL,
    ),
    (
        "finetune-eval-fraction",
        "finetune --check --data {ft_good} --eval-fraction 1.5",
        "eval_fraction: got 1.5",
        FAIL,
    ),
    (
        "finetune-dropout-1",
        "finetune --check --data {ft_good} --lora-dropout 1",
        "lora_dropout: got 1.0",
        FAIL,
    ),
    (
        "finetune-lr-negative",
        "finetune --check --data {ft_good} --learning-rate -1",
        "learning_rate: got -1.0",
        FAIL,
    ),
    (
        "finetune-epochs-0",
        "finetune --check --data {ft_good} --epochs 0",
        "epochs: got 0.0",
        FAIL,
    ),
    (
        "finetune-scheduler",
        "finetune --check --data {ft_good} --lr-scheduler zigzag",
        "lr_scheduler: got 'zigzag'",
        FAIL,
    ),
    (
        "finetune-device-banana",
        "finetune --check --data {ft_good} --device banana",
        "device: got 'banana'",
        FAIL,
    ),
    (
        "finetune-device-mps",
        "finetune --check --data {ft_good} --device mps",
        "device: got 'mps', must be auto, cpu, cuda or cuda:N",
        FAIL,
    ),
    (
        "finetune-typo-key",
        "finetune --check --set lora_rnak=4",
        "did you mean 'lora_rank'?",
        FAIL,
    ),
    ("finetune-config-binary", "finetune --check --config {binary_yaml}", "not valid YAML", FAIL),
    (
        "finetune-config-wrong-type",
        "finetune --check --config {ft_yaml}",
        "lora_rank: expected int",
        FAIL,
    ),
    (
        "finetune-truncated-weights",
        "finetune --data {ft_good} --model {trunc} --max-steps 1 --output-dir {out}",
        "{trunc}: cannot load the model (corrupt or truncated",
        FAIL,
    ),
    (
        "finetune-data-folder",
        "finetune --check --data {data_folder}",
        "{data_folder}: a folder, not a dataset file; files in it that look like data: "
        "train.jsonl; pass one of them",
        FAIL,
    ),
    (
        "finetune-columns-missing",
        "finetune --check --data {ft_good} --columns output=answer,instruction=question",
        "columns: output=answer, instruction=question: no columns 'answer', 'question' in the "
        "file (it has: prompt, completion)",
        FAIL,
    ),
    (
        "finetune-deeply-nested-row",
        "finetune --check --data {deep_row}",
        "{deep_row}:1: invalid JSON (nested too deeply",
        FAIL,
    ),
    (
        "finetune-deeply-nested-array",
        "finetune --check --data {deep_array}",
        "{deep_array}:1:2: invalid JSON (row 1 is nested too deeply",
        FAIL,
    ),
    (
        "finetune-csv-field-too-long",
        "finetune --check --data {long_field}",
        "{long_field}:2: not readable as CSV (field larger than field limit",
        FAIL,
    ),
    (
        "finetune-control-character",
        "finetune --check --data {control_char}",
        "invalid JSON (Invalid control character at column 14; a tab or line break inside a "
        "string must be written as \\t or \\n)",
        FAIL,
    ),
    (
        "finetune-unknown-model-type",
        "finetune --dry-run --model {unknown_type}",
        "{unknown_type}: config.json's model_type 'foomodel' is unknown to transformers",
        FAIL,
    ),
    ("dry-run-data-empty", "finetune --dry-run --data {empty}", "{empty}: no rows", FAIL),
    ("dry-run-data-binary", "finetune --dry-run --data {binary}", "not a dataset", FAIL),
    (
        "dry-run-data-missing",
        "finetune --dry-run --data {missing}",
        "dataset file not found",
        FAIL,
    ),
    ("dry-run-bad-rows", "finetune --dry-run --data {ft_rows}", "1 invalid row", FAIL),
    (
        "dry-run-eval-data-empty",
        "finetune --dry-run --data {ft_good} --eval-data {empty}",
        "{empty}: no rows",
        FAIL,
    ),
    ("dry-run-lora-rank-0", "finetune --dry-run --lora-rank 0", "lora_rank: got 0", FAIL),
    (
        "dry-run-device-cuda-99",
        "finetune --dry-run --device cuda:99",
        "device: got 'cuda:99'",
        FAIL,
    ),
    ("dry-run-model-missing", "finetune --dry-run --model {missing}", "unknown model", FAIL),
    (
        "dry-run-target-modules",
        "finetune --dry-run --target-modules c_attn",
        "target module 'c_attn' is not a linear layer",
        FAIL,
    ),
    # -- merge -------------------------------------------------------------------------------------
    (
        "merge-adapter-missing",
        "merge --adapter {missing} --output {out}",
        "not an adapter folder",
        FAIL,
    ),
    (
        "merge-pickle-adapter",
        "merge --adapter {pickle_adapter} --output {out}",
        "adapter_model.bin is a pickle file",
        FAIL,
    ),
    (
        "merge-adapter-no-weights",
        "merge --adapter {no_weights_adapter} --output {out}",
        "no adapter_model.safetensors",
        FAIL,
    ),
    (
        "merge-dtype",
        "merge --adapter {corrupt_adapter} --output {out} --dtype float8",
        "--dtype: got 'float8'",
        FAIL,
    ),
    (
        "merge-device-banana",
        "merge --adapter {corrupt_adapter} --output {out} --device banana",
        "device: got 'banana'",
        FAIL,
    ),
    (
        "merge-corrupt-adapter",
        "merge --adapter {corrupt_adapter} --output {out} --device cpu",
        "{corrupt_adapter}/adapter_model.safetensors: corrupt or truncated",
        FAIL,
    ),
    (
        "merge-empty-adapter",
        "merge --adapter {empty_adapter} --output {out} --device cpu",
        "{empty_adapter}/adapter_model.safetensors: holds no tensors",
        FAIL,
    ),
    (
        "merge-adapter-shape-not-base",
        "merge --adapter {shape_adapter} --output {out} --device cpu",
        "has shape [4, 96], but the base model",
        FAIL,
    ),
    # -- chat --once ---------------------------------------------------------------------------------
    (
        "chat-truncated-weights",
        "chat --model {trunc} --once hi",
        "{trunc}/model.safetensors: corrupt or truncated",
        FAIL,
    ),
    (
        "chat-config-mismatch",
        "chat --model {mismatch} --once hi",
        "config.json does not match the weights",
        FAIL,
    ),
    (
        "chat-pickle-adapter",
        "chat --model {pickle_adapter} --once hi",
        "adapter_model.bin is a pickle file",
        FAIL,
    ),
    (
        "chat-pickle-adapter-on-base",
        "chat --model tutor-base+{pickle_adapter} --once hi",
        "adapter_model.bin is a pickle file",
        FAIL,
    ),
    ("chat-model-missing", "chat --model {missing} --once hi", "unknown model", FAIL),
    (
        "chat-unknown-provider",
        "chat --model nope:model --once hi",
        "not a LangChain provider",
        FAIL,
    ),
    (
        "chat-negative-temperature",
        "chat --model tutor-base --temperature -1 --once hi",
        "temperature",
        FAIL,
    ),
    ("chat-top-p-2", "chat --model tutor-base --top-p 2 --once hi", "top_p", FAIL),
    ("chat-top-k-negative", "chat --model tutor-base --top-k -1 --once hi", "top_k", FAIL),
    ("chat-max-tokens-0", "chat --model tutor-base --max-tokens 0 --once hi", "max_tokens", FAIL),
    (
        "chat-grounding",
        "chat --model tutor-base --grounding bogus --once hi",
        "unknown grounding 'bogus'",
        FAIL,
    ),
    ("chat-empty-message", "chat --model tutor-base --once ''", "empty message", FAIL),
    ("chat-once-and-history", "chat --once hi --history", "do not go together", FAIL),
    (
        "chat-db-binary",
        "chat --db {binary} --once hi",
        "{binary}: cannot open the chat database",
        FAIL,
    ),
    ("chat-db-folder", "chat --db {out} --once hi", "is a folder", FAIL),
    (
        "chat-db-other-application",
        "chat --db {other_app} --history",
        "{other_app}: not a chat database: it holds another application's tables (users); "
        "nothing was changed",
        FAIL,
    ),
    (
        "chat-db-lookalike-table",
        "chat --db {lookalike} --once hi",
        "{lookalike}: not a chat database: its table 'checkpoints' has no columns",
        FAIL,
    ),
    (
        "chat-once-too-long",
        "chat --model tutor-base --once '" + "word " * 200 + "'",
        "the message is 207 tokens; this model reads 128 tokens",
        FAIL,
    ),
    (
        "chat-seed-negative",
        "chat --model tutor-base --seed -1 --once hi",
        "seed must be an integer from 0 to 2**64 - 1, got -1",
        FAIL,
    ),
    (
        "chat-seed-too-big",
        f"chat --model tutor-base --seed {2**64} --once hi",
        f"seed must be an integer from 0 to 2**64 - 1, got {2**64}",
        FAIL,
    ),
    (
        "chat-unknown-model-type",
        "chat --model {unknown_type} --once hi",
        "{unknown_type}: config.json's model_type 'foomodel' is unknown to transformers",
        FAIL,
    ),
    (
        "chat-empty-adapter",
        "chat --model tutor-base+{empty_adapter} --once hi",
        "{empty_adapter}/adapter_model.safetensors: holds no tensors",
        FAIL,
    ),
    (
        "chat-repetition-penalty-negative",
        "chat --model tutor-base --repetition-penalty -1 --once hi",
        "repetition_penalty must be a number > 0",
        FAIL,
    ),
    # -- feedback-retrain ---------------------------------------------------------------------------
    ("feedback-retrain-no-store", "feedback-retrain --db {missing}", "no feedback store yet", FAIL),
    ("feedback-retrain-binary", "feedback-retrain --db {binary}", "{binary}", FAIL),
    # -- bot, bench ---------------------------------------------------------------------------------
    ("bot-ship-missing-run", "bot ship --run {missing}", "no adapter_model.safetensors", FAIL),
    ("bot-eval-setup-9", "bot eval --setup 9", "--setup: got '9', must be 1-4", FAIL),
    ("bot-eval-setup-word", "bot eval --setup two", "--setup: got 'two', must be 1-4", FAIL),
    ("bot-eval-rescore-no-output", "bot eval --rescore", "--rescore needs --output FILE", FAIL),
    (
        "bot-eval-rescore-missing",
        "bot eval --rescore --output {missing}",
        "{missing}: not found; --rescore scores the answers",
        FAIL,
    ),
    ("bot-eval-rescore-folder", "bot eval --rescore --output {out}", "is a folder", FAIL),
    (
        "bot-eval-rescore-deep",
        "bot eval --rescore --output {eval_deep}",
        "{eval_deep}: invalid JSON (nested too deeply",
        FAIL,
    ),
    (
        "bot-eval-rescore-list",
        "bot eval --rescore --output {eval_list}",
        "{eval_list}: expected a JSON object of setup name -> results",
        FAIL,
    ),
    (
        "bot-eval-rescore-setup",
        "bot eval --rescore --output {eval_setup}",
        "{eval_setup}: unknown setup 'bogus'",
        FAIL,
    ),
    (
        "bot-eval-rescore-value",
        "bot eval --rescore --output {eval_value}",
        "{eval_value}: 'SmolLM2 plain': expected an object of results, got a number",
        FAIL,
    ),
    (
        "bot-eval-rescore-answer",
        "bot eval --rescore --output {eval_answer}",
        "{eval_answer}: 'SmolLM2 plain': answers[0].answer: expected a string, got a number",
        FAIL,
    ),
    (
        "bot-eval-rescore-concept",
        "bot eval --rescore --output {eval_concept}",
        "answers[0].concept: got 'nope', must be a concept id",
        FAIL,
    ),
    (
        "bot-eval-update-huge-number",
        "bot eval --update --setup 1 --output {eval_huge}",
        "{eval_huge}: 'SmolLM2 plain': wrongly_abstained: expected a share from 0 to 1",
        FAIL,
    ),
    ("bench-only-unknown", "bench --only nothing", "--only: got 'nothing'", FAIL),
    ("bench-output-folder", "bench --output {out}", "is a folder", FAIL),
]


def _values(case) -> tuple:
    """A case's (id, command, expected, code), whether a plain tuple or a pytest.param."""
    return case if type(case) is tuple else tuple(case.values)


@pytest.mark.parametrize(
    ("case", "command", "expected", "code"),
    [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in CASES],
)
def test_bad_input_is_one_line(app, bad, tmp_path, case, command, expected, code):
    names = {**bad, "out": tmp_path / "out", "missing": tmp_path / "no-such-thing"}
    (tmp_path / "out").mkdir()
    args = shlex.split(command.format(**{k: shlex.quote(str(v)) for k, v in names.items()}))
    if args[0] == "chat" and "--db" not in args:  # never the user's own conversations
        args[1:1] = ["--db", str(tmp_path / "chat.sqlite"), "--no-retrieval"]
    if args[0] in ("pretrain", "sft", "reward", "rlhf", "pipeline") and "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "run")]
    result = run(app, args)
    assert_one_line_error(result, expected.format(**names), code)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training


def test_the_table_covers_every_command_with_100_cases(app):
    """At least 100 cases, and every command of `genai-lab --help` has some."""
    import typer.main

    group = typer.main.get_command(app)
    commands = set(group.commands) - {"bot"} | {f"bot {c}" for c in group.commands["bot"].commands}
    ids = [_values(c)[0] for c in CASES]
    lines = [_values(c)[1] for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)
    covered = {" ".join(line.split()[:2]) if line.startswith("bot") else line.split()[0]
               for line in lines}  # fmt: skip
    assert commands <= covered, commands - covered


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_one_line(app, tmp_path):
    for args in (["pretrain", "--device", "cuda"], ["sft", "--set", "device=cuda"]):
        result = run(app, [*args, "--output-dir", str(tmp_path)])
        assert_one_line_error(result, "device: got 'cuda', but torch sees no CUDA GPU", FAIL)
    result = run(app, ["finetune", "--dry-run", "--device", "cuda"])
    assert_one_line_error(result, "device: got 'cuda', but torch sees no CUDA GPU", FAIL)


# -- a full disk ------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_while_writing_a_file_is_one_line(app, tmp_path):
    """A real ENOSPC: the run's metrics log (appended to, not replaced) is a link to /dev/full,
    where every write fails."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    result = run(app, ["sft", "--output-dir", str(out), "--max-steps", "1"])
    assert_one_line_error(
        result, f"no space left on device while writing {out / 'metrics.jsonl'}", FAIL
    )


def test_disk_full_while_writing_a_checkpoint_is_one_line(app, tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (Rust's io error, os error 28),
    not an OSError; the checkpoint writer's safetensors call fails the way it does then."""
    import core.lm.loader

    def full_disk(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        )

    monkeypatch.setattr(core.lm.loader, "save_file", full_disk)
    rows = [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Bye?", "response": "Bye."}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["sft", "--output-dir", str(out), "--train-file", str(data), "--eval-file", str(data)]
    result = run(app, [*args, "--max-steps", "1", "--quiet", "--set", "batch_size=2"])
    assert_one_line_error(result, "no space left on device while writing", FAIL)
    assert "model.safetensors" in result.stderr
    assert not (out / "checkpoints" / "step_0000001").exists()  # nothing half-written


# -- --debug and GENAI_LAB_DEBUG=1 show the traceback ----------------------------------------------


def test_debug_env_var_lets_the_exception_through(app, tmp_path):
    args = ["pretrain", "--set", "log_every=0", "--output-dir", str(tmp_path)]
    result = run(app, args, env={DEBUG_ENV: "1"})
    assert not isinstance(result.exception, SystemExit)  # the real exception, with its traceback
    shown = "".join(traceback.format_exception(*result.exc_info))
    assert "Traceback" in shown and "log_every: got 0" in shown
    plain = run(app, args)  # and without it, the one line again
    assert_one_line_error(plain, "log_every: got 0", FAIL)


def test_debug_flag_prints_the_traceback():
    """`genai-lab --debug ...` in a real process: Python's own traceback on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "core", "--debug", "generate", "--prompt", "hi", "--model", "tutr"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", DEBUG_ENV: ""},
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ModelSpecError: unknown model 'tutr'" in result.stderr


def test_unexpected_errors_are_one_line_with_their_type(app, tmp_path, monkeypatch):
    """A bug (not a bad input) still prints one line, with its type and the way to see more."""
    import core.commands.generate

    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(core.commands.generate, "resolve", broken)
    result = run(app, ["generate", "--prompt", "hi"])
    assert_one_line_error(result, "KeyError: 'surprise' (run with --debug or GENAI_LAB_DEBUG=1", 1)


def test_another_applications_database_is_left_untouched(app, bad, tmp_path):
    """`chat --db` on another application's SQLite file: refused before any write, the file
    byte for byte as it was and no journal beside it."""
    other = tmp_path / "app.sqlite"
    shutil.copy(bad["other_app"], other)
    before = other.read_bytes()
    for args in (["--history"], ["--once", "hi", "--no-retrieval"]):
        result = run(app, ["chat", "--db", str(other), *args])
        assert_one_line_error(result, f"{other}: not a chat database", FAIL)
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite"]
