"""A run SIGKILLed at any point resumes to exactly the uninterrupted run: the kill points of
core/killpoints.py ($GENAI_LAB_KILL_AT) cut a real subprocess at a chosen moment, the same command
with --resume finishes it, and the outcome is compared bit for bit with a run never killed (the
trained tensors, every report figure but wall times and memory peaks, every metrics line).

Slow tier: each case is two or three training runs in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from core.killpoints import ENV

ROOT = Path(__file__).parents[1]
ALPACA = ROOT / "finetune" / "examples" / "data" / "tutor_alpaca.json"
KILLED = -9  # a Popen return code: killed by SIGKILL
# Wall times, throughput and memory peaks: never equal between two runs.
VARYING = ("seconds", "runtime", "per_second", "elapsed", "tokens_per_s", "peak", "preparation")

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def steady(record: dict) -> dict:
    """A report or metrics record without what differs between any two runs."""
    return {
        k: steady(v) if isinstance(v, dict) else v
        for k, v in record.items()
        if not any(word in k for word in VARYING)
    }


def metrics(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [steady(json.loads(line)) for line in lines]


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        assert (x[key] - y[key]).abs().max().item() == 0, key  # max |diff| 0


def leftovers(folder: Path) -> list[str]:
    """Temp names (core.atomic's) anywhere in a run folder: none may survive a resume."""
    return [str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp-" in p.name or
            ".old-" in p.name or p.name.startswith(".deleting-")]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# genai-lab finetune (TRL's SFTTrainer): a relative --output-dir, moved between kill and resume

FINETUNE = [
    "-m", "core", "finetune", "--data", str(ALPACA), "--output-dir", "run", "--max-steps", "4",
    "--eval-steps", "2", "--logging-steps", "3", "--learning-rate", "5e-3", "--num-samples", "1",
    "--quiet",
]  # fmt: skip
# Checkpoints at steps 2 and 4, losses logged at step 3: the checkpoint at step 2 holds a loss
# not yet logged, which a resume must carry on with.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("straight")
    result = run(FINETUNE, cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "run"


@pytest.mark.parametrize(
    "kill_at",
    [
        "after-checkpoint@2",  # mid-training, right after a complete checkpoint
        "adapter-save",  # during the final adapter save (its temp folder is left behind)
        "after-adapter-save",  # after the final save, before the report
        "after-report",  # after everything
    ],
)
def test_finetune_killed_anywhere_resumes_to_the_uninterrupted_run(
    uninterrupted, tmp_path, kill_at
):
    (tmp_path / "first").mkdir()
    killed = run(FINETUNE, tmp_path / "first", kill_at)
    assert killed.returncode == KILLED, killed.stderr
    # The run folder moves (a relative --output-dir, resumed from elsewhere): nothing it stored
    # may name the old place.
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "first" / "run", tmp_path / "moved" / "run")
    resumed = run([*FINETUNE, "--resume"], tmp_path / "moved")
    assert resumed.returncode == 0, resumed.stderr
    out = tmp_path / "moved" / "run"

    a = json.loads((uninterrupted / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert b["steps"] == a["steps"] == 4 and b["max_steps"] == 4
    assert steady(b) == steady(a)  # every figure: losses, adapter step, samples, config...
    assert b["adapter"] == "adapter"  # relative to the run folder
    assert_same_tensors(
        uninterrupted / "adapter" / "adapter_model.safetensors",
        out / "adapter" / "adapter_model.safetensors",
    )
    assert metrics(out) == metrics(uninterrupted)  # each step once, the same values
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    for name in names:
        if name.startswith("checkpoint-"):
            assert_same_tensors(
                uninterrupted / "checkpoints" / name / "adapter_model.safetensors",
                out / "checkpoints" / name / "adapter_model.safetensors",
            )
            state = json.loads((out / "checkpoints" / name / "trainer_state.json").read_text())
            best = state["best_model_checkpoint"]
            assert best is None or best.startswith("checkpoints/checkpoint-"), best
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# genai-lab pretrain and sft (core/train/trainer.py `fit`): during a checkpoint save, during the
# final save

PRETRAIN = {
    "num_documents": 1500,
    "eval_documents": 100,
    "vocab_size": 700,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "context_length": 32,
    "seq_len": 32,
    "batch_size": 8,
    "max_steps": 30,
    "learning_rate": 0.01,
    "min_learning_rate": 0.001,
    "warmup_steps": 5,
    "eval_every": 10,
    "eval_batches": 4,
    "checkpoint_every": 10,
    "log_every": 1,
    "threads": 1,
}  # fmt: skip (tests/test_pretrain.py's TINY, shorter)


def pretrain_args(folder: Path, *more: str) -> list[str]:
    config = folder.parent / "c.yaml"
    config.write_text(yaml.safe_dump(PRETRAIN))
    return ["-m", "core", "pretrain", "--config", str(config), "--output-dir", str(folder),
            "--quiet", *more]  # fmt: skip


SFT = """
import json, sys
from pathlib import Path
from core.train.stages.sft import SFTConfig, sft
folder = Path(sys.argv[1])
rows = [{"messages": [{"role": "user", "content": f"What is {w}?"},
                      {"role": "assistant", "content": f"{w.capitalize()} is a word."}]}
        for w in ("a token", "a cat", "the sun", "water")]
data = folder.parent.parent / "rows.jsonl"  # one file for every run: the same config
data.write_text("".join(json.dumps(r) + "\\n" for r in rows))
cfg = SFTConfig(train_file=str(data), eval_file=str(data), max_steps=6, batch_size=4,
                warmup_steps=1, eval_every=3, checkpoint_every=2, log_every=1,
                learning_rate=3e-3, threads=1)
sft(cfg, folder, resume="--resume" in sys.argv, progress=False)
"""  # tests/test_sft.py's tiny_data and config


def sft_args(folder: Path, *more: str) -> list[str]:
    return ["-c", SFT, str(folder), *more]


STAGES = {"pretrain": (pretrain_args, 30, 20), "sft": (sft_args, 6, 4)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_fit_killed_while_saving_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, stage):
    args, last, middle = STAGES[stage]
    (tmp_path / "a").mkdir()
    straight = run(args(tmp_path / "a" / "run"), tmp_path)
    assert straight.returncode == 0, straight.stderr
    expected = tmp_path / "a" / "run"
    for kill_at in (f"checkpoint-save@{middle}", f"checkpoint-save@{last}"):  # mid-run, final
        folder = tmp_path / kill_at.replace("@", "-") / "run"
        folder.parent.mkdir()
        killed = run(args(folder), tmp_path, kill_at)
        assert killed.returncode == KILLED, killed.stderr
        assert any(".tmp-" in p.name for p in (folder / "checkpoints").iterdir())
        resumed = run(args(folder, "--resume"), tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert metrics(folder) == metrics(expected), kill_at
        assert_same_tensors(expected / "final" / "model.safetensors",
                            folder / "final" / "model.safetensors")  # fmt: skip
        a = json.loads((expected / "report.json").read_text())
        b = json.loads((folder / "report.json").read_text())
        a["config"].pop("output_dir", None), b["config"].pop("output_dir", None)
        assert steady(b) == steady(a), kill_at
        ckpts = sorted(p.name for p in (folder / "checkpoints").iterdir())
        assert ckpts == sorted(p.name for p in (expected / "checkpoints").iterdir())
        for name in ckpts:
            assert_same_tensors(expected / "checkpoints" / name / "optimizer.safetensors",
                                folder / "checkpoints" / name / "optimizer.safetensors")  # fmt: skip
        assert leftovers(folder) == []


# ---------------------------------------------------------------------------------------------
# genai-lab merge: during the save

MERGE_KILL_POINT = 'killpoint("merge-save")' in (ROOT / "finetune" / "merge.py").read_text()


@pytest.mark.skipif(
    not MERGE_KILL_POINT, reason="finetune/merge.py has no merge-save kill point yet"
)
def test_merge_killed_while_saving_reruns_to_the_same_model(uninterrupted, tmp_path):
    adapter = uninterrupted / "adapter"

    def merge(folder: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
        folder.mkdir()
        args = ["-m", "core", "merge", "--adapter", str(adapter), "--output", "merged"]
        return run([*args, "--device", "cpu"], folder, kill_at)

    straight = merge(tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    killed = merge(tmp_path / "b", "merge-save")
    assert killed.returncode == KILLED, killed.stderr
    assert not (tmp_path / "b" / "merged").exists()  # never half a folder under its name
    assert any(".tmp-" in p.name for p in (tmp_path / "b").iterdir())
    again = run(
        ["-m", "core", "merge", "--adapter", str(adapter), "--output", "merged", "--device", "cpu"],
        tmp_path / "b",
    )
    assert again.returncode == 0, again.stderr
    expected, out = tmp_path / "a" / "merged", tmp_path / "b" / "merged"
    assert_same_tensors(expected / "model.safetensors", out / "model.safetensors")
    check_a = json.loads((expected / "merge_check.json").read_text())
    assert json.loads((out / "merge_check.json").read_text()) == check_a
    assert leftovers(tmp_path / "b") == []  # the killed merge's temp folder is cleared
