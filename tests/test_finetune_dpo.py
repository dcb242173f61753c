"""`genai-lab finetune --method dpo`: a LoRA adapter trained with TRL's DPOTrainer on the
shipped preference pairs learns to prefer the chosen answers of held-out pairs; bad preference
rows fail in one line naming file:line and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.train.config import ConfigError
from finetune.config import FinetuneConfig
from finetune.data import PreferenceDataError, read_preferences

ROOT = Path(__file__).parents[1]
PREFS = ROOT / "core" / "content" / "data"


def _pairs(name: str, rule: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (PREFS / name).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["rule"] == rule][:n]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_dpo_raises_the_held_out_reward_margin(tmp_path):
    from finetune.dpo import run_dpo as finetune

    # One kind of pair (rude rejected answers), so 6 steps have a consistent preference to learn;
    # the eval pairs come from the held-out file (other prompts).
    train = _write(tmp_path / "train.jsonl", _pairs("prefs_train.jsonl", "rude", 24))
    held = _write(tmp_path / "eval.jsonl", _pairs("prefs_heldout.jsonl", "rude", 8))
    out = tmp_path / "run"
    cfg = FinetuneConfig(
        method="dpo",
        data=str(train),
        eval_data=str(held),
        output_dir=str(out),
        max_steps=6,
        eval_steps=6,
        batch_size=4,
        learning_rate=5e-4,
        report_to="none",
        device="cpu",
    )
    report = finetune(cfg, progress=False)
    before, after = report["rewards_before"], report["rewards_after"]
    assert before["margin"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the reference
    assert after["margin"] > before["margin"]
    assert after["accuracy"] > before["accuracy"]
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter" / "ref").exists()  # only the trained adapter is saved
    saved = json.loads((out / "report.json").read_text())
    assert saved["method"] == "dpo" and saved["beta"] == 0.1
    assert json.loads((out / "adapter" / "finetune.json").read_text())["method"] == "dpo"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi?", "chosen": "Hello."}, "bad.jsonl:2: rejected: missing"),
        ({"prompt": "Hi?", "chosen": " ", "rejected": "Go away."}, "bad.jsonl:2: chosen: empty"),
        ({"prompt": "Hi?", "chosen": "Hey.", "rejected": "Hey."}, "bad.jsonl:2: chosen: the same"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "bad.jsonl:2: prompt: empty"),
        ("{not json", "bad.jsonl:2: invalid JSON"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "bad.jsonl:2: prompt: the last prompt message must be a user turn",
        ),
    ],
)
def test_bad_preference_rows_fail_in_one_line(tmp_path, row, message):
    good = {"prompt": "What is AI?", "chosen": "The study of...", "rejected": "No."}
    path = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(PreferenceDataError) as info:
        read_preferences(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    # --skip-invalid drops the row and keeps the good one
    assert len(read_preferences(path, skip_invalid=True, echo=lambda *_: None)) == 1


def test_chat_style_pairs_are_accepted(tmp_path):
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is AI?"},
        ],
        "chosen": [{"role": "assistant", "content": "Machines doing clever tasks."}],
        "rejected": "No.",
    }
    (pair,) = read_preferences(_write(tmp_path / "chat.jsonl", [row]))
    assert pair["prompt"][-1]["role"] == "user"
    assert pair["rejected"] == [{"role": "assistant", "content": "No."}]


def test_dpo_config_checks():
    with pytest.raises(ConfigError, match="beta: got 0"):
        FinetuneConfig(method="dpo", data="x.jsonl", beta=0.0).validate()
    with pytest.raises(ConfigError, match="format: got 'alpaca'"):
        FinetuneConfig(method="dpo", data="x.jsonl", format="alpaca").validate()


def test_cli_check_reads_preference_pairs():
    from typer.testing import CliRunner

    from core.cli import build_app

    data = PREFS / "prefs_heldout.jsonl"
    ok = CliRunner().invoke(
        build_app(), ["finetune", "--method", "dpo", "--check", "--data", str(data)]
    )
    assert ok.exit_code == 0, ok.output
    assert "pairs for training" in ok.output and "data check passed" in ok.output


def test_dpo_resume_continues_the_run_and_refuses_other_settings(tmp_path):
    from finetune.dpo import run_dpo as finetune
    from finetune.run import complete_checkpoints

    train = _write(tmp_path / "train.jsonl", _pairs("prefs_train.jsonl", "rude", 16))
    held = _write(tmp_path / "eval.jsonl", _pairs("prefs_heldout.jsonl", "rude", 4))
    out = tmp_path / "run"
    settings = dict(
        method="dpo", data=str(train), eval_data=str(held), output_dir=str(out), eval_steps=2,
        logging_steps=1, batch_size=4, learning_rate=5e-4, report_to="none", device="cpu",
    )  # fmt: skip
    first = finetune(FinetuneConfig(**settings, max_steps=2), progress=False, echo=lambda *_: None)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    saved = (out / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="beta"):  # another beta is another run
        finetune(FinetuneConfig(**settings, max_steps=4, beta=0.5), resume=True, progress=False)
    report = finetune(
        FinetuneConfig(**settings, max_steps=4), resume=True, progress=False, echo=lambda *_: None
    )
    assert report["steps"] == 4 and (out / "config.yaml").read_bytes() == saved
    assert "checkpoint-4" in [p.name for p in complete_checkpoints(out)]
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in m]
    assert steps == [1, 2, 3, 4]  # the resumed run logs on from step 3, nothing twice
    assert report["train_seconds"] > first["train_seconds"]
