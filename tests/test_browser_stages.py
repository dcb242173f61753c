"""The training-stages page end to end in a real browser: `streamlit run` of the dashboard,
Debian's Chromium through Playwright, real background jobs (`genai-lab pipeline`,
`genai-lab feedback-retrain`), real SQLite and real models.

- The "micro" preset's pipeline, started with the page's Run button, shows a progress bar; a
  reload while it runs re-attaches to the same job (no second job); Cancel stops it mid-run,
  Resume continues it to the end; every stage's curves are drawn, titled, and the PPO tutor is
  there (rlhf/config.json).
- The human-feedback lab: answers sampled and ranked in the page are saved once (saving the same
  ranking again stores no duplicate pairs); the retrain started from the page trains a reward
  model that scores the ranked answers in the order they were ranked, and the page shows each
  answer's reward before and after (checked against the saved reward models, scored here) and
  the tutor's answer before and after (checked against the saved policy, generated here).

The server and its jobs run with OMP_NUM_THREADS=1: the suite runs two pytest workers on two
cores, and two-thread torch ops on a loaded machine were ~100x slower (measured). Screenshots
land in test-artifacts/screenshots/ (browser-stages-*.png).
"""

from __future__ import annotations

import json
import re
import sqlite3
from itertools import combinations
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from core.lm.loader import PRETRAINED_DIR
from dashboard.lib import jobs, training_stages
from tests.browser_support import (
    MAIN,
    PAGE_TIMEOUT_MS,
    SCREENSHOTS,
    StreamlitServer,
    assert_no_exception,
    main_html,
    screenshot,
    wait_for_rerun,
    wait_until_idle,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (PRETRAINED_DIR / "tutor-sft" / "config.json").is_file(), reason="no shipped tutor"
    ),
]

PRESET = "micro (about 30 seconds)"
PIPELINE_S = 240  # the micro pipeline, resumed, on a busy 2-core machine (about 30 s idle)
RETRAIN_S = 240  # the lab's retrain (about 20 s idle)
PROGRESS = '[data-testid="stProgress"]'


# -- the server, one per module ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    app = StreamlitServer(folder, env={"OMP_NUM_THREADS": "1"})
    try:
        app.start()
        yield app
    finally:
        app.stop()
        for job in jobs.list_jobs(folder / "jobs"):  # never leave a job running
            if job.active:
                job.cancel(grace_s=2)


def open_page(browser, server: StreamlitServer):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"{server.url}/training_stages")
    page.wait_for_selector(MAIN)
    wait_until_idle(page)
    assert_no_exception(page)
    return context, page


def job_folders(server: StreamlitServer) -> list[Path]:
    root = server.folder / "jobs"
    return sorted(p for p in root.iterdir() if jobs.valid_id(p.name)) if root.is_dir() else []


def click(page, selector: str) -> None:
    """Click a button and wait for the rerun it triggers to change the page."""
    before = main_html(page)
    page.locator(selector).click()
    wait_for_rerun(page, before)


def wait_for_text(page, text: str, timeout_s: float) -> None:
    page.locator(MAIN).get_by_text(text).first.wait_for(timeout=timeout_s * 1000)
    wait_until_idle(page)


def chart_titles(page) -> list[str]:
    """The titles of the plotly charts plotly has drawn (each scrolled into view first: the
    page draws a chart when it becomes visible)."""
    titles = []
    for chart in page.locator('[data-testid="stPlotlyChart"]').all():
        chart.scroll_into_view_if_needed()
        title = chart.locator(".gtitle")
        title.wait_for(state="attached", timeout=10_000)
        titles.append(title.text_content())
    return titles


# -- 1. the tiny pipeline as a job -----------------------------------------------------------------


def run_in_page(browser, server: StreamlitServer, scenario, name: str) -> None:
    """A scenario on a fresh page: a screenshot if it fails, and never a job left running."""
    context, page = open_page(browser, server)
    try:
        scenario(page, server)
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / f"browser-stages-{name}-failed.png"))
        raise
    finally:
        for job in map(jobs.Job, job_folders(server)):
            if job.active:
                job.cancel(grace_s=2)
        context.close()


def test_pipeline_job_runs_reattaches_cancels_and_resumes_in_the_browser(server, browser):
    run_in_page(browser, server, _pipeline_job, "pipeline")


def _pipeline_job(page, server: StreamlitServer) -> None:
    earlier = job_folders(server)
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset")
    choose(page, box, PRESET)
    wait_until_idle(page)
    click(page, ".st-key-stages_run button")

    # Started: one job, its id in the URL, a progress bar.
    page.locator(PROGRESS).first.wait_for()
    (folder,) = [f for f in job_folders(server) if f not in earlier]
    job = jobs.Job(folder)
    assert f"stages_job={job.id}" in page.url
    assert job.status in jobs.ACTIVE
    assert job.argv[:2] == ["genai-lab", "pipeline"]
    assert Path(job.argv[3]).name == "micro-pipeline.yaml"  # the preset chosen in the page

    # A reload re-attaches to the running job: still one job, progress still shown.
    page.reload()
    page.wait_for_selector(MAIN)
    page.locator(PROGRESS).first.wait_for()
    wait_until_idle(page)
    assert_no_exception(page)
    assert job_folders(server) == sorted([*earlier, folder])
    assert f"stages_job={job.id}" in page.url
    assert page.locator(".st-key-stages_run").count() == 0  # no Run button: a job is followed
    # The bar (redrawn every second) moves once pre-training logs its first steps.
    bar = page.locator(PROGRESS).first
    expect(bar).to_contain_text(re.compile(r"(base|sft|reward|rlhf): [1-9]\d*%"), timeout=60_000)
    assert job.status == "running", job.log_tail()

    # Cancel mid-run, then Resume to the end.
    click(page, ".st-key-stages_job_cancel button")
    wait_for_text(page, "Cancelled.", 30)
    assert job.status == "cancelled"
    assert (job.output_dir / "runs" / "base" / "metrics.jsonl").is_file()  # it had started
    assert not (job.output_dir / "rlhf" / "config.json").is_file()  # and stopped mid-run
    click(page, ".st-key-stages_job_resume button")
    wait_for_text(page, "Done: your tutor is trained.", PIPELINE_S)
    page.locator(".st-key-stages_job_new button").wait_for()  # the full rerun after the end
    wait_until_idle(page)
    assert_no_exception(page)
    assert job.status == "done", job.log_tail()
    assert job.state().get("resumed") is True
    assert job_folders(server) == sorted([*earlier, folder])  # resumed in place, no 2nd job
    starts = [x for x in job.log_path.read_text().splitlines() if x.startswith("[base]")]
    assert len(starts) == 2, starts  # the pipeline ran twice in the same folder

    # Every stage ran to its model folder; the curves are drawn and titled.
    out = job.output_dir
    for stage in ("base", "sft", "reward", "rlhf"):
        assert (out / stage / "config.json").is_file(), stage
    assert (out / "report.md").is_file()
    assert training_stages.pipeline_progress(out, Path(job.argv[3])) == (1.0, "done")
    titles = chart_titles(page)
    for title in ("base: loss", "base: eval_loss", "sft: loss", "reward: loss", "rlhf: reward"):
        assert title in titles, titles
    wait_for_text(page, "Your tutor against the shipped one", 60)
    assert "your tiny tutor (PPO):" in page.locator(MAIN).inner_text()
    screenshot(page, SCREENSHOTS / "browser-stages-pipeline.png")


# -- 2. the human-feedback lab ------------------------------------------------------------------


def test_feedback_ranked_in_the_browser_moves_the_rewards_and_is_stored_once(server, browser):
    run_in_page(browser, server, _feedback, "feedback")


def open_list(page, box, option) -> None:
    """Click a select box until `option` shows in its list (a click that lands while the page
    is still settling may not open it)."""
    for _ in range(5):
        box.click()
        try:
            option.wait_for(state="visible", timeout=5_000)
            return
        except PlaywrightTimeoutError:
            page.keyboard.press("Escape")
    raise AssertionError(f"the list of {box} never opened")


def choose(page, box, name: str) -> None:
    option = page.get_by_role("option", name=name, exact=True)
    open_list(page, box, option)
    option.click(timeout=15_000)


def close_dropdown(page) -> None:
    """Escape, and wait until no option is shown (an option clicked while the list closes is
    detached under the click)."""
    page.keyboard.press("Escape")
    page.get_by_role("option").first.wait_for(state="hidden")


def read_table(table) -> list[dict]:
    """An st.table's rows as {column: cell text} (the index column left out)."""
    header = table.locator("thead th").all_inner_texts()
    rows = []
    for row in table.locator("tbody tr").all():
        cells = row.locator("td").all_inner_texts()
        rows.append(dict(zip(header[-len(cells) :], cells, strict=True)))
    return rows


def same_text(a: str, b: str) -> bool:
    return a.split() == b.split()


def stored(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT prompt, responses, ranking FROM comparisons").fetchall()


def _feedback(page, server: StreamlitServer) -> None:
    db = server.folder / "feedback.db"
    before_jobs = job_folders(server)
    picker = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Your ranking")
    answer_options = page.get_by_role("option", name=re.compile(r"^answer \d$"))
    for _ in range(3):  # the tutor may give fewer than 3 different answers: sample again
        click(page, 'button:has-text("Sample answers")')
        open_list(page, picker, answer_options.first)
        offered = answer_options.count()
        close_dropdown(page)
        if offered == 3:
            break
    assert offered == 3, offered
    order = [2, 0, 1]  # answer 3 best, then 1, then 2: not the order they were shown in
    for i in order:
        before = main_html(page)
        choose(page, picker, f"answer {i + 1}")
        wait_for_rerun(page, before)
        close_dropdown(page)

    # Saved once: the same ranking saved again stores nothing (no duplicate pairs).
    click(page, 'button:has-text("Save ranking")')
    wait_for_text(page, "Saved. The store now holds 1 comparisons.", 30)
    rows = stored(db)
    assert len(rows) == 1
    prompt, responses, ranking = rows[0][0], json.loads(rows[0][1]), json.loads(rows[0][2])
    assert ranking == order and len(responses) == 3
    click(page, 'button:has-text("Save ranking")')
    wait_for_text(page, "Already saved as comparison 1; nothing added.", 30)
    assert len(stored(db)) == 1
    assert page.locator(MAIN).get_by_text(f"3 preference pairs in {db}").count() == 1

    # Retrain from the page, then read what it shows.
    click(page, ".st-key-retrain_run button")
    # The page follows the job once it has started: its Cancel (or, done, New run) button.
    page.locator(".st-key-retrain_job_cancel, .st-key-retrain_job_new").first.wait_for()
    (folder,) = [f for f in job_folders(server) if f not in before_jobs]
    job = jobs.Job(folder)
    assert job.argv[:2] == ["genai-lab", "feedback-retrain"]
    wait_for_text(page, "Your ranked answers, scored by the reward model", RETRAIN_S)
    # The fragment that followed the job saw it end and reran the whole page: its New run
    # button is drawn by that full run, after both tables.
    page.locator(".st-key-retrain_job_new button").wait_for()
    page.locator('[data-testid="stTable"] table').nth(1).wait_for()
    wait_until_idle(page)
    assert_no_exception(page)
    assert job.status == "done", job.log_tail()
    rewards_table, answers_table = page.locator('[data-testid="stTable"] table').all()
    shown = read_table(rewards_table)
    ranked = [responses[i] for i in order]  # best first
    assert len(shown) == 3
    assert all(same_text(r["answer"], a) for r, a in zip(shown, ranked, strict=True)), shown
    assert {r["question"] for r in shown} == {prompt}
    assert [int(r["your rank"]) for r in shown] == [1, 2, 3]
    before = [float(r["reward before"]) for r in shown]
    after = [float(r["reward after"]) for r in shown]

    # The page shows real scores: the models the retrain started from and ended with, here.
    import torch

    from core.lm.chat_format import encode_answer
    from core.lm.generate import answer
    from core.lm.loader import load_model, resolve_model_path
    from core.lm.tokenizer import load_tokenizer
    from core.train.stages.reward import RewardModel, load_reward_model

    torch.set_num_threads(1)
    folder = resolve_model_path("tutor-sft")
    tok, sft = load_tokenizer(folder), load_model(folder).eval()
    rm = load_reward_model(job.output_dir / "reward" / "final")
    mine = rm.score_texts(tok, [prompt] * 3, ranked).tolist()
    start = RewardModel(sft).eval().score_texts(tok, [prompt] * 3, ranked).tolist()
    assert after == pytest.approx(mine, abs=2e-3)
    assert before == pytest.approx(start, abs=2e-3)

    # The reward model now orders the ranked answers the way they were ranked: every pair's
    # margin (better minus worse) grew, and is positive. Two answers the reward model reads as
    # the same tokens (cut at its context alike) can only tie: they must tie, the rest must order.
    context = rm.backbone.config.max_position_embeddings
    reads = [encode_answer(tok, prompt, a)[:context] for a in ranked]
    for better, worse in combinations(range(3), 2):
        if reads[better] == reads[worse]:
            assert after[better] == pytest.approx(after[worse], abs=1e-4), after
            continue
        assert after[better] - after[worse] > before[better] - before[worse], (before, after)
        assert after[better] > after[worse], after
    assert after[0] > after[2], after  # the best above the worst, whatever ties

    # ...and the tutor's answer before (the SFT tutor) and after (the DPO policy).
    policy = load_model(job.output_dir / "policy" / "final").eval()
    (changed,) = read_table(answers_table)
    replies = [answer(model, tok, prompt) for model in (sft, policy)]
    assert changed["question"] == prompt
    assert same_text(changed["before (SFT tutor)"], replies[0]), (changed, replies)
    assert same_text(changed["after (policy trained on your rankings)"], replies[1]), replies
    assert changed["changed"] == ("no" if replies[0] == replies[1] else "yes")
    screenshot(page, SCREENSHOTS / "browser-stages-feedback.png")
