"""The chat and fine-tune pages end to end in a real browser: `streamlit run` of the dashboard,
Debian's Chromium through Playwright, a real background job, real SQLite and real models.

One test, because its parts share the slow things (the server's imports and models, and the
fine-tune job, which runs while the chat is tried):

- a fine-tune started from the page (an uploaded file, tutor-base, 2 steps) runs to its adapter,
  and the page, reloaded from its URL, shows the results;
- the tutor answers and the conversation appears in the sidebar; in the same conversation a long
  answer of SmolLM2 streams (its text grows over several observations) and the Stop button ends
  the model within 1 s (the server's CPU goes idle, no more text arrives, the part shown is
  saved); export downloads the conversation as JSON and markdown; the conversation survives a
  restart of the server;
- the chat page's model picker lists the fine-tuned adapter, and the page answers with it.

Screenshots land in test-artifacts/screenshots/ (browser-chat-*.png).
"""

from __future__ import annotations

import json
import os
import re
import time
from itertools import pairwise
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import expect

from chat.conversations import ChatStore
from dashboard.lib import jobs
from tests.browser_support import (
    MAIN,
    PAGE_TIMEOUT_MS,
    SCREENSHOTS,
    StreamlitServer,
    assert_no_exception,
    screenshot,
    wait_until_idle,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "finetune" / "examples" / "data" / "tutor_chat.jsonl"
SLOW_MODEL = "smollm2-135m-instruct"  # 8k tokens of context, a few tokens/s: a stop to measure
SLOW_LABEL = "smollm2-135m-instruct: SmolLM2 as it comes"
QUESTION = "What is a token?"
LONG_QUESTION = "Write a long essay about the history of computers, with many details."
TUNED_QUESTION = "What does LoRA train?"
TUTOR = "tutor: ours from scratch, most-trained stage (reads 128 tokens)"  # its picker label
JOB_S = 240  # the fine-tune job, start to adapter, on a busy 2-core machine
IDLE = 0.05  # CPU seconds per second that count as idle (measured: under 0.02)


# -- helpers -------------------------------------------------------------------------------------


def server_cpu(server: StreamlitServer) -> float:
    """CPU seconds (user + system) the server process and its children have used so far. The
    fine-tune job's processes are left out: the job runs in a session of its own (it survives
    the server) and is not the chat."""
    process = psutil.Process(server.process.pid)
    session = os.getsid(process.pid)
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            if os.getsid(child.pid) == session and child.status() != psutil.STATUS_ZOMBIE:
                total += sum(child.cpu_times()[:2])
        except (psutil.Error, OSError):  # ended in between
            continue
    return total


def open_page(context, url: str):
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector(MAIN)
    wait_until_idle(page)
    assert_no_exception(page)
    return page


def sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def main_text(page) -> str:
    return page.locator(MAIN).inner_text()


def picker(page):
    return sidebar(page).locator('[data-testid="stSelectbox"]').filter(has_text="Model")


def picker_options(page) -> list[str]:
    """The labels the chat page's model picker offers (the list is opened and closed)."""
    picker(page).click()
    options = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    return options


def choose_model(page, label: str, key: str) -> None:
    """Pick a model by its label; returns once the rerun that loads it is over (the URL names
    the picker's choice, `key`, from then on)."""
    picker(page).click()
    page.keyboard.type(label)  # the list filters as one types (clicking an option off-screen
    page.keyboard.press("Enter")  # can scroll the sidebar, which closes the list)
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('model') === '{key}'")
    wait_until_idle(page)


def ask(page, text: str) -> None:
    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill(text)
    box.press("Enter")


def messages(page):
    return page.locator('[data-testid="stChatMessage"]')


def answer_text(page) -> str:
    """The text of the last chat message ("" while it has none)."""
    if messages(page).count() == 0:
        return ""
    text = messages(page).last.locator('[data-testid="stMarkdown"]').first
    try:
        return text.inner_text(timeout=1000).rstrip("▌").strip()
    except Exception:  # re-rendered in between
        return ""


def plain(text: str) -> str:
    """Text without markdown's marks (list markers too: a rendered list shows none) and with
    single spaces: an answer as saved and as the page renders it compare equal."""
    text = re.sub(r"(?m)^\s*(\d+[.)]|[-*+])\s+", "", text)
    return " ".join(re.sub(r"[*_#`>\\]", "", text).split())


def settled(text: str) -> str:
    """The part of a streamed answer's rendering that later renderings start with: a last line
    that is only a list number or marker ("1", "2.", "-") becomes a list item, shown without it,
    once the item's text arrives."""
    lines = text.split("\n")
    if re.fullmatch(r"\s*(\d+[.)]?|[-*+])\s*", lines[-1]):
        lines = lines[:-1]
    return "\n".join(lines).rstrip()


def query(page, name: str) -> str | None:
    return page.evaluate(f"() => new URLSearchParams(location.search).get('{name}')")


def sidebar_threads(page) -> list[str]:
    """The labels of the sidebar's conversation buttons."""
    buttons = sidebar(page).locator('[data-testid="stButton"] button').all_inner_texts()
    return [b for b in buttons if "New chat" not in b]


def download(page, name: str) -> str:
    with page.expect_download() as info:
        page.locator('[data-testid="stDownloadButton"]').filter(has_text=name).click()
    return Path(info.value.path()).read_text(encoding="utf-8")


@pytest.fixture
def server(tmp_path):
    app = StreamlitServer(tmp_path / "server")
    app.folder.mkdir()
    app.start()
    try:
        yield app
    finally:
        app.stop()
        for job in jobs.list_jobs(app.folder / "jobs"):
            if job.active:
                job.cancel(grace_s=1)


# -- the test ------------------------------------------------------------------------------------


def test_fine_tune_then_chat_stream_stop_export_restart(server, browser, tmp_path):
    laps: list[float] = []  # when each numbered part started (the times are printed at the end)
    data = tmp_path / "my_rows.jsonl"
    data.write_text("".join(ROWS.read_text(encoding="utf-8").splitlines(True)[:12]))
    store = ChatStore(server.folder / "chat.sqlite")
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    try:
        laps.append(time.perf_counter())
        # 1. Fine-tune from the page: upload a file, 2 steps, Run. The job runs on its own.
        tune = open_page(context, f"{server.url}/finetune_lab")
        tune.locator('[data-testid="stRadio"]').get_by_text("Upload a file", exact=True).click()
        wait_until_idle(tune)
        tune.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(data))
        expect(
            tune.get_by_text("my_rows.jsonl: 12 rows, format messages: 12 usable")
        ).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        wait_until_idle(tune)
        steps = tune.get_by_label("Max steps", exact=True)
        steps.fill("2")
        steps.press("Enter")
        shown_command = tune.locator(MAIN)  # the command the page will run
        expect(shown_command).to_contain_text("--max-steps 2 ", timeout=PAGE_TIMEOUT_MS)
        wait_until_idle(tune)
        run = tune.get_by_role("button", name="Run", exact=True)
        run.click()
        tune.wait_for_url(re.compile(r"[?&]job="))
        job_id = query(tune, "job")
        wait_until_idle(tune)
        assert_no_exception(tune)
        # One click, one job, with the settings shown; no second run while it goes.
        expect(run).to_be_disabled(timeout=PAGE_TIMEOUT_MS)
        assert [j.id for j in jobs.list_jobs(server.folder / "jobs")] == [job_id]
        job = jobs.Job.load(server.folder / "jobs" / job_id)
        assert job.argv[:4] == ["genai-lab", "finetune", "--model", "tutor-base"]
        assert job.argv[job.argv.index("--max-steps") + 1] == "2"
        assert job.argv[job.argv.index("--data") + 1].endswith("-my_rows.jsonl")
        tune.close()  # (its progress, redrawn every second, would keep the server busy)

        laps.append(time.perf_counter())
        # 2. Chat: the tutor answers a question; the conversation is listed in the sidebar.
        chat = open_page(context, f"{server.url}/chat?model=tutor")
        assert "Model tutor" in main_text(chat)
        sidebar(chat).get_by_text("off", exact=True).click()  # no concept notes (MiniLM)
        sidebar(chat).get_by_text("Token inspector", exact=True).click()
        wait_until_idle(chat)
        ask(chat, QUESTION)
        expect(messages(chat)).to_have_count(2, timeout=PAGE_TIMEOUT_MS)
        wait_until_idle(chat)
        assert_no_exception(chat)
        thread = query(chat, "thread")
        first = store.messages(thread)
        assert [m.type for m in first] == ["human", "ai"] and first[0].text == QUESTION
        assert first[1].text.strip() and plain(answer_text(chat)) == plain(first[1].text)
        assert "tokens/s" in messages(chat).last.inner_text()
        assert any(t.startswith(QUESTION) for t in sidebar_threads(chat)), sidebar_threads(chat)

        laps.append(time.perf_counter())
        # 3. A long answer from a bigger model, in the same conversation, streams: its text
        # grows as it comes.
        choose_model(chat, SLOW_LABEL, SLOW_MODEL)
        assert f"Model {SLOW_MODEL} (core)" in main_text(chat)
        ask(chat, LONG_QUESTION)
        expect(messages(chat)).to_have_count(
            4, timeout=PAGE_TIMEOUT_MS
        )  # the question and the answer (empty at first)
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while len(seen) < 4:
            assert time.monotonic() < deadline, f"the answer did not stream: {seen}"
            text = answer_text(chat)
            if text and text not in seen[-1:]:
                seen.append(text)
            chat.wait_for_timeout(50)
        assert all(len(a) < len(b) and b.startswith(settled(a)) for a, b in pairwise(seen)), seen
        assert chat.get_by_text("(stopped)").count() == 0

        laps.append(time.perf_counter())
        # 4. Stop. While the model generates, the server computes ...
        stop = chat.get_by_role("button", name="Stop")
        before = server_cpu(server)
        chat.wait_for_timeout(1000)
        generating = server_cpu(server) - before
        assert generating > 3 * IDLE, f"{generating:.2f} CPU s in 1 s: is it generating?"
        shown = answer_text(chat)
        stop.click()
        clicked = time.perf_counter()
        series = []  # (seconds since the click, server CPU seconds)
        while not series or series[-1][0] < 2.0:
            series.append((time.perf_counter() - clicked, server_cpu(server)))
            chat.wait_for_timeout(50)
        # ... and from 1 s after the click on it is idle: no more tokens are computed.
        at_1s = next(cpu for t, cpu in series if t >= 1.0)
        after = series[-1][1] - at_1s
        assert after <= IDLE * (series[-1][0] - 1.0) + 0.02, (
            f"{after:.2f} CPU s from 1 to 2 s after Stop ({generating:.2f} while generating): "
            f"{[(round(t, 2), round(cpu - before, 2)) for t, cpu in series]}"
        )
        busy = max((t for (t, a), (_, b) in pairwise(series) if b - a > 0.01), default=0.0)
        print(f"Stop: the server's CPU busy until {busy:.2f} s after the click")
        wait_until_idle(chat)
        assert_no_exception(chat)
        expect(chat.get_by_text("(stopped)")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        final = answer_text(chat)  # at most the token in flight after what was shown
        assert final.startswith(settled(seen[-1])) and len(final) <= len(shown) + 30, (shown, final)
        assert query(chat, "thread") == thread
        saved = store.messages(thread)
        assert [m.text for m in saved[:3]] == [QUESTION, first[1].text, LONG_QUESTION]
        stopped = saved[3]
        assert len(saved) == 4 and stopped.response_metadata.get("interrupted") is True
        assert plain(stopped.text) == plain(final)  # the part shown is what was saved
        chat.wait_for_timeout(1000)
        assert answer_text(chat) == final and store.messages(thread)[3].text == stopped.text

        laps.append(time.perf_counter())
        # 5. Export: the conversation as saved, in JSON and in markdown.
        sidebar(chat).get_by_text("This conversation").click()
        exported = json.loads(download(chat, "JSON"))
        assert exported["thread"] == thread
        assert [(m["type"], m["data"]["content"]) for m in exported["messages"]] == [
            (m.type, m.text) for m in saved
        ]
        assert exported["messages"][3]["data"]["response_metadata"]["interrupted"] is True
        markdown = download(chat, "Markdown")
        assert markdown.startswith(f"# {QUESTION}")
        for m in saved:
            heading = "## You" if m.type == "human" else "## Assistant"
            assert f"{heading}\n\n{m.text.strip()}\n" in markdown

        laps.append(time.perf_counter())
        # 6. A restart of the server keeps the conversation (the tutor: a quick reload).
        choose_model(chat, TUTOR, "tutor")
        server.stop()
        server.start()
        chat.reload()
        chat.wait_for_selector(MAIN)
        wait_until_idle(chat)
        assert_no_exception(chat)
        assert query(chat, "thread") == thread
        assert any(t.startswith(QUESTION) for t in sidebar_threads(chat)), sidebar_threads(chat)
        texts = messages(chat).all_inner_texts()
        assert len(texts) == 4 and LONG_QUESTION in texts[2] and final in texts[3], texts
        assert QUESTION in texts[0]
        expect(messages(chat).last.get_by_text("(stopped)")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        sidebar(chat).get_by_text("off", exact=True).click()  # a new session: notes off again

        laps.append(time.perf_counter())
        # 7. The fine-tune's adapter is in the picker, and the page answers with it.
        deadline = time.monotonic() + JOB_S
        while job.active:
            assert time.monotonic() < deadline, job.log_tail()
            time.sleep(0.5)
        assert job.status == "done", job.log_tail()
        assert (job.output_dir / "adapter" / "adapter_model.safetensors").is_file()
        sidebar(chat).get_by_role("button", name="New chat").click()  # (a run fills the picker)
        chat.wait_for_function(f"() => !location.search.includes('thread={thread}')")
        wait_until_idle(chat)
        label = next((o for o in picker_options(chat) if job_id in o), None)
        assert label == f"fine-tuned tutor-base on my_rows.jsonl (job {job_id})", label
        choose_model(chat, label, job_id)  # the URL names the job, never a server path
        adapter = job.output_dir / "adapter"
        expect(chat.locator(MAIN)).to_contain_text(
            f"Model {adapter} (transformers)", timeout=PAGE_TIMEOUT_MS
        )
        ask(chat, TUNED_QUESTION)
        expect(messages(chat)).to_have_count(2, timeout=PAGE_TIMEOUT_MS)
        wait_until_idle(chat)
        assert_no_exception(chat)
        tuned_thread = query(chat, "thread")
        assert tuned_thread != thread
        tuned = store.messages(tuned_thread)
        assert [m.type for m in tuned] == ["human", "ai"] and tuned[1].text.strip()
        assert tuned[1].response_metadata["model"] == str(adapter)
        assert plain(answer_text(chat)) == plain(tuned[1].text)
        assert "tokens/s" in messages(chat).last.inner_text()
        threads = sidebar_threads(chat)
        assert any(t.startswith(TUNED_QUESTION) for t in threads), threads
        screenshot(chat, SCREENSHOTS / "browser-chat.png")

        laps.append(time.perf_counter())
        # 8. The fine-tune page, opened from its URL, shows the job's results.
        tune = open_page(context, f"{server.url}/finetune_lab?job={job_id}")
        expect(tune.get_by_text(f"Job {job_id} finished.")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        expect(tune.get_by_text("Eval loss", exact=True)).to_be_visible(timeout=PAGE_TIMEOUT_MS)
        expect(tune.locator('[data-testid="stPlotlyChart"]')).to_have_count(
            1, timeout=PAGE_TIMEOUT_MS
        )
        expect(tune.get_by_role("button", name="Download the adapter (zip)")).to_be_visible(
            timeout=PAGE_TIMEOUT_MS
        )
        expect(tune.get_by_text(f"genai-lab chat --model {adapter}")).to_be_visible(
            timeout=PAGE_TIMEOUT_MS
        )
        link = tune.get_by_role("link", name="Chat with this adapter")
        assert link.get_attribute("href").rsplit("/", 1)[-1] == f"chat?model={job_id}"
        screenshot(tune, SCREENSHOTS / "browser-chat-finetune.png")
    except BaseException:
        print(server.log_tail())
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for i, page in enumerate(context.pages):
            page.screenshot(path=str(SCREENSHOTS / f"browser-chat-failed-{i}.png"), full_page=True)
        raise
    finally:
        context.close()
        store.close()
    laps.append(time.perf_counter())
    parts = ", ".join(f"{i}: {b - a:.1f}" for i, (a, b) in enumerate(pairwise(laps), 1))
    print(f"the browser chat test took {laps[-1] - laps[0]:.1f} s (parts, in s: {parts})")
