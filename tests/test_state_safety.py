"""Nothing lost: a kill at any moment (mid data preparation, mid checkpoint write, mid pruning,
mid state-file write) leaves a run folder that the next run cleans up and resumes from
correctly, and the cached data always matches the config that uses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from core.atomic import LEGACY_STALE_SECONDS, clean_stale_temps
from core.lm.tokenizer import load_tokenizer
from core.train.checkpoint import latest_checkpoint, list_checkpoints
from core.train.config import ConfigError
from core.train.stages.pretrain import CACHE_KEY_FILE, PretrainConfig, prepare_data, pretrain

ROOT = Path(__file__).resolve().parent.parent
ATOMIC = ROOT / "core" / "atomic.py"

# Tiny and own-corpus (a small tokenizer trains in milliseconds), one checkpoint per step.
TINY = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "context_length": 32,
    "seq_len": 32,
    "batch_size": 4,
    "max_steps": 3,
    "learning_rate": 0.01,
    "min_learning_rate": 0.001,
    "warmup_steps": 1,
    "eval_every": 100,
    "eval_batches": 2,
    "checkpoint_every": 1,
    "log_every": 1,
    "threads": 1,
}


def corpus(folder: Path, word: str) -> Path:
    """Three small text files all about `word` (so whose data a run used is plain to see)."""
    folder.mkdir()
    for i in range(3):
        text = " ".join(f"The {word} number {j} sits on mat {i}." for j in range(40))
        (folder / f"{i}.txt").write_text(text)
    return folder


def config(corpus_dir: Path, **overrides) -> PretrainConfig:
    return PretrainConfig(**{**TINY, "corpus": str(corpus_dir), **overrides})


def cached_text(out: Path) -> str:
    """The cached training tokens of a run folder, decoded with its cached tokenizer."""
    tokens = load_file(out / "tokens.safetensors")["train"]
    return load_tokenizer(out / "tokenizer").decode(tokens.tolist())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_killed(script: str) -> int:
    """Run `script` (with `atomic` = core/atomic.py, loaded without the heavy core package) in a
    child that SIGKILLs itself where the script says; returns the dead child's pid."""
    prelude = (
        "import importlib.util, os, signal, shutil, sys\n"
        f"spec = importlib.util.spec_from_file_location('atomic', {str(ATOMIC)!r})\n"
        "atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)\n"
        "def die(): os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", prelude + script], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    return proc.pid


# --- cached data is keyed by what it was built from ---------------------------------------------


def test_sigkill_after_data_prep_then_other_corpus_trains_on_the_new_one(tmp_path):
    a, b = corpus(tmp_path / "a", "cat"), corpus(tmp_path / "b", "dog")
    out = tmp_path / "run"
    never = {"max_steps": 100000, "checkpoint_every": 100000}  # killed long before either
    (tmp_path / "c.yaml").write_text(json.dumps({**TINY, **never}))  # JSON is YAML
    cmd = [sys.executable, "-m", "core", "pretrain", "--config", str(tmp_path / "c.yaml")]
    cmd += ["--corpus", str(a), "--output-dir", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    deadline = time.time() + 120
    while not (out / "tokens.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "cat" in cached_text(out) and latest_checkpoint(out) is None  # killed after data prep

    said: list[str] = []
    pretrain(config(b), out, progress=False, echo=said.append)
    assert "dog" in cached_text(out) and "cat" not in cached_text(out)
    assert len(said) == 1 and str(a) in said[0] and str(b) in said[0] and "rebuilding" in said[0]
    assert json.loads((out / "tokenizer" / CACHE_KEY_FILE).read_text())["source"] == str(b)


def test_resume_on_other_data_is_refused_in_one_line(tmp_path):
    a, b = corpus(tmp_path / "a", "cat"), corpus(tmp_path / "b", "dog")
    out = tmp_path / "run"
    pretrain(config(a, max_steps=2), out, progress=False)
    saved_config = (out / "config.yaml").read_text()
    with pytest.raises(ValueError) as refused:
        pretrain(config(b, max_steps=4), out, resume=True, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "tokens.safetensors" in message
    assert f"corpus {a}" in message and f"this run has {b}" in message
    with pytest.raises(ValueError, match="vocab_size 300, this run has 320"):
        pretrain(config(a, max_steps=4, vocab_size=320), out, resume=True, progress=False)
    assert (out / "config.yaml").read_text() == saved_config  # a refusal changes nothing
    assert "cat" in cached_text(out)
    # The same text under another path is the same data: the resume goes ahead.
    (tmp_path / "a").rename(tmp_path / "a2")
    pretrain(config(tmp_path / "a2", max_steps=3), out, resume=True, progress=False)
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3]


def test_cache_from_older_code_is_checked_by_its_tokens(tmp_path):
    """A cache without a key (written before keys existed) is kept on resume only if the
    corpus gives the very same tokens; otherwise rebuilt (fresh run) or refused (resume)."""
    a, b = corpus(tmp_path / "a", "cat"), corpus(tmp_path / "b", "dog")
    out = tmp_path / "run"
    pretrain(config(a, max_steps=1), out, progress=False)
    data = load_file(out / "tokens.safetensors")
    save_file(data, out / "tokens.safetensors")  # no metadata: as older code wrote it
    (out / "tokenizer" / CACHE_KEY_FILE).unlink()
    with pytest.raises(ValueError, match="no record of what it was built from"):
        pretrain(config(b, max_steps=2), out, resume=True, progress=False)
    said: list[str] = []
    pretrain(config(a, max_steps=2), out, resume=True, progress=False, echo=said.append)
    assert said == [] and (out / "tokenizer" / CACHE_KEY_FILE).is_file()  # now stamped

    fresh = tmp_path / "fresh"
    prepare_data(config(a), fresh)
    save_file(load_file(fresh / "tokens.safetensors"), fresh / "tokens.safetensors")
    (fresh / "tokenizer" / CACHE_KEY_FILE).unlink()
    prepare_data(config(b), fresh, echo=said.append)
    assert len(said) == 1 and "no record" in said[0] and "dog" in cached_text(fresh)


# --- kills during pruning and during writes ---------------------------------------------------


def test_kill_mid_pruning_resumes_from_the_newest_complete_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(corpus(tmp_path / "a", "cat"), max_steps=4, keep_checkpoints=3)
    pretrain(cfg, out, progress=False)
    first = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    step2, step3, step4 = list_checkpoints(out)
    # A real kill mid-pruning of step 2: renamed away, then killed after deleting one file.
    run_killed(
        f"def rmtree(path, *a, **k):\n"
        f"    os.unlink(os.path.join(path, 'model.safetensors')); die()\n"
        f"shutil.rmtree = rmtree\n"
        f"atomic.delete_directory({str(step2)!r})\n"
    )
    assert not step2.exists() and len(list((out / "checkpoints").glob(".deleting-step_*"))) == 1
    # What older code's kill mid-pruning left: the folder under its real name, weights gone.
    (step4 / "model.safetensors").unlink()
    capsys.readouterr()

    assert latest_checkpoint(out) == step3
    assert latest_checkpoint(out) == step3
    err = capsys.readouterr().err
    assert err.count(f"warning: {step4}: incomplete checkpoint (no model.safetensors)") == 1
    assert not list((out / "checkpoints").glob(".deleting-*"))  # cleaned at start-up

    pretrain(replace(cfg, max_steps=5), out, resume=True, progress=False)
    resumed = {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert resumed[4] == pytest.approx(first[4], rel=1e-5)  # continued from step 3's exact state
    assert [p.name for p in list_checkpoints(out)] == [
        "step_0000003",
        "step_0000004",
        "step_0000005",
    ]
    assert (step4 / "model.safetensors").is_file()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_kill_mid_write_leaves_the_old_state_and_is_cleaned_up(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    report = out / "report.json"
    report.write_text('{"old": true}\n')
    dead = run_killed(
        f"with atomic.atomic_file({str(report)!r}) as tmp:\n"
        f"    tmp.write_text('{{\"new\": tr')\n"
        f"    with atomic.atomic_directory({str(out / 'checkpoints' / 'step_0000009')!r}) as d:\n"
        f"        (d / 'model.safetensors').write_bytes(b'half')\n"
        f"        die()\n"
    )
    left = sorted(p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()])
    assert any(n.startswith(f".report.json.tmp-{dead}-") for n in left)
    assert any(n.startswith(f".step_0000009.tmp-{dead}-") for n in left)
    assert json.loads(report.read_text()) == {"old": True}  # the reader sees the old version
    assert latest_checkpoint(out) is None  # the half-written checkpoint is never listed

    # A live writer's temp (this process), and temps from older code (no pid) young and old.
    live = out / f".final.tmp-{os.getpid()}-abcd1234"
    young, old = out / ".metrics.json.tmp-k2j4h5g6", out / ".metrics.json.tmp-a1b2c3d4"
    for path in (live, young, old):
        path.mkdir()
    long_ago = time.time() - LEGACY_STALE_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    latest_checkpoint(out)  # start-up cleanup
    remaining = sorted(p.name for p in out.iterdir()) + sorted(
        p.name for p in (out / "checkpoints").iterdir()
    )
    assert remaining == sorted([live.name, young.name, "checkpoints", "report.json"])


@pytest.mark.parametrize("new_complete", [True, False])
def test_folder_swap_killed_between_renames_is_finished(tmp_path, new_complete):
    """A folder replaced in place (final/, tokenizer/) moves the old one aside, then renames the
    new one in; a kill between the two leaves neither under the real name."""
    dead = run_killed("die()")
    old = tmp_path / f".final.old-{dead}-00aa11bb"
    old.mkdir()
    (old / "v").write_text("old")
    if new_complete:
        new = tmp_path / f".final.tmp-{dead}-xy_z1234"
        new.mkdir()
        (new / "v").write_text("new")
    clean_stale_temps(tmp_path)
    assert (tmp_path / "final" / "v").read_text() == ("new" if new_complete else "old")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


# --- config validation: one line naming the key and the allowed range ---------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("eval_batches", 0, "eval_batches: got 0, must be >= 1"),
        ("keep_checkpoints", 0, "keep_checkpoints: got 0, must be >= 1"),
        ("max_steps", -5, "max_steps: got -5, must be >= 1"),
        ("grad_accum", 0, "grad_accum: got 0, must be >= 1"),
        ("learning_rate", 0.0, "learning_rate: got 0.0, must be > 0"),
        ("learning_rate", float("nan"), "learning_rate: got nan, must be > 0"),
        ("min_learning_rate", 1.0, "min_learning_rate: got 1.0, must be between 0 and"),
        ("vocab_size", 0, "vocab_size: got 0, must be >= 262 (256 bytes + 6 special tokens)"),
        ("num_attention_heads", 5, "num_attention_heads: got 5, must be a divisor of hidden_size"),
        ("num_key_value_heads", 3, "num_key_value_heads: got 3, must be a divisor of"),
        ("hidden_size", 36, "hidden_size: got 36, must be a multiple of 2 x num_attention_heads"),
        ("seq_len", 64, "seq_len: got 64, must be <= context_length (32)"),
        ("warmup_steps", -1, "warmup_steps: got -1, must be >= 0"),
        ("grad_clip", 0.0, "grad_clip: got 0.0, must be > 0"),
        ("beta2", 1.0, "beta2: got 1.0, must be in [0, 1)"),
        ("corpus", " ", "corpus: got ' ', must be a .txt/.md file or a folder of them"),
    ],
)
def test_bad_config_values_name_the_key_and_the_range(tmp_path, key, value, message):
    cfg = PretrainConfig(**{**TINY, key: value})
    with pytest.raises(ConfigError) as error:
        pretrain(cfg, tmp_path / "run", progress=False)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # rejected before anything is written
    PretrainConfig(**TINY).validate()  # the tiny config itself is fine
