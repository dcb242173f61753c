"""The training-stages labs (the page end to end, jobs included, is tests/test_browser_stages.py):
the tiny pipeline presets, cached stage answers, fresh samples for
ranking, and the feedback-retrain command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.lm.loader import PRETRAINED_DIR
from dashboard.lib import jobs, training_stages

needs_tutor = pytest.mark.skipif(
    not (PRETRAINED_DIR / "tutor-sft" / "config.json").is_file(), reason="no shipped tutor"
)
PAGE = Path(__file__).resolve().parents[1] / "dashboard" / "views" / "training_stages.py"


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "jobs"
    monkeypatch.setenv(jobs.JOBS_ENV, str(folder))  # never the user's data folder
    return folder


def _params(command: str) -> set[str]:
    import typer

    from core.cli import build_app

    group = typer.main.get_command(build_app())
    return {opt for p in group.commands[command].params for opt in p.opts}


@pytest.mark.parametrize("preset", list(training_stages.TINY_PRESETS))
def test_tiny_preset_gives_a_valid_pipeline_command(tmp_path, preset):
    from core.commands.training import _check_pipeline_values
    from core.train.stages.pipeline import load_pipeline_config

    config = training_stages.write_tiny_config(preset, tmp_path)
    argv = training_stages.pipeline_argv(config)
    assert argv[:2] == ["genai-lab", "pipeline"]
    flags = {a for a in argv if a.startswith("--")} | {"--output-dir"}  # the job adds it
    assert flags <= _params("pipeline")
    cfg = load_pipeline_config(config)  # keys and types, as the command loads them
    _check_pipeline_values(cfg, tmp_path / "out")  # every stage's values
    assert cfg.dpo is None and cfg.pretrain["max_steps"] <= 150
    # Every stage evaluates on cut-down held-out files, not the full bundled ones.
    for section in (cfg.sft, cfg.reward, cfg.rlhf):
        assert Path(section["eval_file"]).parent == tmp_path


def test_retrain_argv_names_real_flags(tmp_path):
    argv = training_stages.retrain_argv(tmp_path / "feedback.db", 3, 2)
    assert argv[:2] == ["genai-lab", "feedback-retrain"]
    assert {a for a in argv if a.startswith("--")} | {"--output-dir"} <= _params("feedback-retrain")


def test_feedback_retrain_without_a_store_is_one_line(tmp_path):
    from core.cli import build_app

    result = CliRunner().invoke(
        build_app(), ["feedback-retrain", "--db", str(tmp_path / "none.db"), "--output-dir", "x"]
    )
    assert result.exit_code != 0
    assert "no feedback store yet" in result.output and "Traceback" not in result.output


@needs_tutor
def test_stage_answers_are_cached_per_question_temperature_and_seed():
    from dashboard.resources import tutor

    models = {"sft": tutor("tutor-sft")}
    cache: dict = {}
    before = training_stages.ANSWER_CALLS["count"]
    first = training_stages.answers_side_by_side(models, "What is a token?", 1.0, 3, cache)
    assert training_stages.ANSWER_CALLS["count"] == before + 1
    again = training_stages.answers_side_by_side(models, "What is a token?", 1.0, 3, cache)
    assert again == first and training_stages.ANSWER_CALLS["count"] == before + 1  # not regenerated
    training_stages.answers_side_by_side(models, "What is a token?", 1.0, 4, cache)  # new seed
    assert training_stages.ANSWER_CALLS["count"] == before + 2


@needs_tutor
def test_two_sample_clicks_give_different_answers(tmp_path, monkeypatch, root):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GENAI_LAB_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    at = AppTest.from_file(str(PAGE), default_timeout=120)
    at.run()
    assert not at.exception
    sample = next(b for b in at.button if b.label == "Sample answers")
    sample.click().run()
    first = at.session_state["lab"][1]
    calls = training_stages.ANSWER_CALLS["count"]
    next(b for b in at.button if b.label == "Sample answers").click().run()
    second = at.session_state["lab"][1]
    assert not at.exception
    assert first != second  # a fresh seed per click
    # The three stages' answers above were served from the cache on both reruns: only the
    # sampled candidates called the model.
    assert training_stages.ANSWER_CALLS["count"] - calls <= 4 * len(second)


def test_pipeline_progress_and_curves_read_the_run_folder(tmp_path):
    out = tmp_path / "out"
    (out / "base").mkdir(parents=True)
    (out / "base" / "config.json").write_text("{}")
    runs = out / "runs" / "sft"
    runs.mkdir(parents=True)
    runs.joinpath("metrics.jsonl").write_text(
        '{"step": 4, "loss": 2.0}\n{"step": 8, "loss": 1.5, "eval_loss": 1.7}\n{"step": 9, "lo'
    )  # the last line is still being written
    config = training_stages.write_tiny_config("tiny (about 1 minute)", tmp_path / "cfg")
    fraction, stage = training_stages.pipeline_progress(out, config)
    assert stage == "sft" and fraction == pytest.approx(2 / 4)  # base done, sft 8/8 steps
    titles = [f.layout.title.text for f in training_stages.pipeline_curves(out)]
    assert titles == ["sft: loss", "sft: eval_loss"]


def test_retrain_progress_and_summary_read_the_job_folder(tmp_path):
    argv = training_stages.retrain_argv(tmp_path / "feedback.db", reward_steps=4, policy_steps=2)
    out = tmp_path / "out"
    assert training_stages.retrain_progress(out, argv) == (0.0, "reward model")
    (out / "reward").mkdir(parents=True)
    (out / "reward" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 2, "loss": 0.5}\n{"st')
    assert training_stages.retrain_progress(out, argv) == (pytest.approx(0.5 / 3), "reward model")
    (out / "reward" / "final").mkdir()
    (out / "policy" / "final").mkdir(parents=True)
    assert training_stages.retrain_progress(out, argv) == (
        pytest.approx(2 / 3),
        "scoring your answers",
    )
    assert training_stages.retrain_summary(out) is None  # not finished: no retrain.json yet

    ranked = [
        {"comparison": 1, "prompt": "q", "rank": 1, "answer": "good", "before": 0.0, "after": 1.25},
        {"comparison": 1, "prompt": "q", "rank": 2, "answer": "bad", "before": 0.0, "after": -0.5},
    ]
    report = {
        "pairs": 1,
        "reward": {"eval_accuracy": 0.5, "config": {"model": "tutor-sft"}, "done": True},
        "policy": {"eval_dpo_loss": 0.69},
        "measured": {
            "ranked": ranked,
            "pairs": {"total": 1, "before": 0, "after": 1},
            "answers": [{"prompt": "q", "before": "same", "after": "same"}],
        },
    }
    (out / "retrain.json").write_text(json.dumps(report))
    assert training_stages.retrain_progress(out, argv) == (1.0, "done")
    summary = training_stages.retrain_summary(out)
    assert summary["reward"] == {"eval_accuracy": 0.5}  # numbers only
    assert summary["agreement"] == {"total": 1, "before": 0, "after": 1}
    table = training_stages.ranked_rewards_table(summary["ranked"])
    assert table.to_dict("records")[0] == {
        "question": "q", "your rank": 1, "answer": "good",
        "reward before": "+0.000", "reward after": "+1.250", "change": "+1.250",
    }  # fmt: skip
    assert table["change"].tolist() == ["+1.250", "-0.500"]
    changes = training_stages.answer_changes_table(summary["answers"])
    assert changes["changed"].tolist() == ["no"]

    del report["measured"]  # written before the per-answer scores existed: still readable
    (out / "retrain.json").write_text(json.dumps(report))
    old = training_stages.retrain_summary(out)
    assert old["ranked"] == [] and old["answers"] == [] and old["pairs"] == 1
