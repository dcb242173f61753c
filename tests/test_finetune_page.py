"""The Fine-tune page (Streamlit AppTest on the real page script): data checks with one clear
message per bad upload, the row-level report, token preview and estimate. A real fine-tune
started from the page, followed to its adapter and its results, runs in a real browser:
tests/test_browser_chat.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.lib import jobs
from dashboard.lib.finetune_lab import MAX_UPLOAD_BYTES, UploadError, save_upload

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
