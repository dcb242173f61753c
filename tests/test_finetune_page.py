"""The Fine-tune page (Streamlit AppTest on the real page script): data checks with one clear
message per bad upload, the row-level report, token preview and estimate, and one real
fine-tune of tutor-base started from the page, followed to its adapter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.lib import jobs
from dashboard.lib.finetune_view import MAX_UPLOAD_BYTES, UploadError, save_upload

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "dashboard" / "views" / "finetune_lab.py"
BROKEN = ROOT / "finetune" / "examples" / "data" / "broken.jsonl"


@pytest.fixture
def jobs_root(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "jobs"
    monkeypatch.setenv(jobs.JOBS_ENV, str(folder))  # never the user's data folder
    yield folder
    for job in jobs.list_jobs(folder):
        if job.active:
            job.cancel(grace_s=1)


def page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=120).run()


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.radio(key="ft_source").set_value("Upload a file").run()
    return at.file_uploader(key="ft_upload").set_value((name, data, "text/plain")).run()


@pytest.mark.parametrize(
    "name, data, says",
    [
        ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), "latin1.jsonl:1: not UTF-8"),
        ("rows.jsonl", b'{"question": "a", "reply": "b"}\n', "rows.jsonl"),
        ("empty.csv", b"\n\n", "empty.csv: the file is empty"),
    ],
)
def test_a_bad_upload_gets_one_clear_message_and_no_run(jobs_root, name, data, says):
    at = upload(page(), name, data)
    assert not at.exception
    assert len(at.error) == 1 and says in at.error[0].value
    assert at.button(key="ft_run").disabled


def test_too_large_or_wrong_kind_of_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(UploadError, match=r"over the page's 20 MB limit"):
        save_upload("big.jsonl", b"x" * (MAX_UPLOAD_BYTES + 1), tmp_path)
    with pytest.raises(UploadError, match=r"notes.txt: not a dataset file"):
        save_upload("notes.txt", b"hello", tmp_path)


def test_the_bundled_example_shows_the_token_preview_and_the_estimate(jobs_root):
    at = page()
    assert not at.exception and not at.error
    assert "141 rows, format messages: 141 usable" in at.success[0].value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Trainable parameters"] == "108,544"  # LoRA r=8 on tutor-base, as --dry-run
    at.select_slider(key="ft_rank").set_value(16).run()
    assert {m.label: m.value for m in at.metric}["Trainable parameters"] == "217,088"
    previews = [c.value for c in at.code if "«" in c.value]
    assert previews and "<|assistant|>\n«" in previews[0]
    command = next(c.value for c in at.code if c.value.startswith("genai-lab finetune"))
    assert "--model tutor-base" in command and "--lora-rank 16" in command
    assert not at.button(key="ft_run").disabled


def test_the_broken_example_lists_each_bad_row_with_its_line(jobs_root):
    at = page()
    at.selectbox(key="ft_example").set_value("broken.jsonl").run()
    assert not at.exception
    assert len(at.error) == 1 and "with errors" in at.error[0].value
    report = next(c.value for c in at.code if "broken.jsonl:2:" in c.value)
    assert "broken.jsonl:3:" in report
    assert at.button(key="ft_run").disabled


def test_an_unknown_model_folder_is_one_message(jobs_root, tmp_path):
    at = page()
    at.selectbox(key="ft_model").set_value("a local folder…").run()
    at.text_input(key="ft_model_path").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception
    assert len(at.error) == 1 and "nowhere" in at.error[0].value
    assert at.button(key="ft_run").disabled


@pytest.mark.slow
def test_a_fine_tune_started_on_the_page_runs_to_its_adapter(jobs_root):
    at = page()
    at.number_input(key="ft_steps").set_value(2)
    at.number_input(key="ft_batch").set_value(8).run()
    at.button(key="ft_run").click().run()
    assert not at.exception
    job_id = at.session_state["ft_job"]
    assert at.query_params["job"] == job_id
    # One click, one job; and no second click while it runs: Run is disabled until it ends.
    at.run()
    assert at.button(key="ft_run").disabled
    assert [job.id for job in jobs.list_jobs(jobs_root)] == [job_id]
    job = jobs.Job.load(jobs_root / job_id)
    assert job.argv[:2] == ["genai-lab", "finetune"] and "--max-steps" in job.argv
    deadline = time.monotonic() + 120
    while job.active:
        assert time.monotonic() < deadline, job.log_tail()
        time.sleep(0.5)
    assert job.status == "done", job.log_tail()
    assert (job.output_dir / "adapter" / "adapter_model.safetensors").is_file()
    # A reloaded page (a fresh session) finds the job from the URL and shows the results.
    fresh = AppTest.from_file(str(PAGE), default_timeout=120)
    fresh.query_params["job"] = job_id
    fresh.run()
    assert not fresh.exception
    assert fresh.get("download_button")
    assert any(c.value.startswith("genai-lab chat --model ") for c in fresh.code)
    assert any(m.label == "Eval loss" for m in fresh.metric)
    assert fresh.get("plotly_chart")
