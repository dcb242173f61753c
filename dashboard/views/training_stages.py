"""Training stages: pre-training -> supervised fine-tuning -> RLHF, shown on the shipped tutor
models, plus a human-feedback lab that stores your rankings (core.train.stages.feedback)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from core.content.concepts import concepts_for_page
from core.lm.loader import load_model
from core.lm.tokenizer import load_tokenizer
from dashboard.lib import jobs
from dashboard.lib.training_stages import (
    CURVES,
    TINY_PRESETS,
    answer_changes_table,
    answers_side_by_side,
    candidate_answers,
    curve_figure,
    figures_table,
    fresh_seed,
    pipeline_argv,
    pipeline_curves,
    pipeline_figures,
    pipeline_progress,
    question_error,
    ranked_rewards_table,
    read_metrics,
    retrain_argv,
    retrain_progress,
    retrain_summary,
    save_ranking,
    shipped_stages,
    stored_pairs,
    write_tiny_config,
)
from dashboard.resources import tutor

# Where rankings are stored; tests point it at a temporary file.
FEEDBACK_DB = Path(os.environ.get("GENAI_LAB_FEEDBACK_DB", "runs/feedback.db"))
# Expected failures of a job action or of loading a finished run: one line each, no traceback.
EXPECTED = (jobs.JobError, ValueError, OSError, KeyError)


def answer_cache() -> dict:
    """(label, question, temperature, seed) -> answer, kept for the session: each widget change
    reruns the page, and regenerating three stages' answers took 3-4 s."""
    return st.session_state.setdefault("stage_answers", {})


def load_job(key: str, param: str) -> jobs.Job | None:
    """The job this browser follows: session state, else ?param= in the URL (a reload)."""
    job_id = st.session_state.get(key) or st.query_params.get(param)
    if not job_id or not jobs.valid_id(job_id):
        return None
    try:
        return jobs.Job.load(jobs.jobs_root() / job_id)
    except jobs.JobError as e:
        st.error(str(e))
        return None


def job_controls(job: jobs.Job, key: str, param: str, resume_flag: str | None = None) -> None:
    """Cancel, Resume (the pipeline continues its stages when rerun as it was; the retrain
    needs `resume_flag`) and New run."""
    status = job.status
    c1, c2, c3 = st.columns(3)
    if status in jobs.ACTIVE and c1.button("Cancel", key=f"{key}_cancel"):
        job.cancel()
        st.rerun()
    if status in ("cancelled", "failed") and c2.button("Resume", key=f"{key}_resume"):
        try:
            # The pipeline picks up its checkpoints on a plain rerun: "--config" is already in
            # its argv, so resume() appends nothing.
            job.resume(flag=resume_flag or job.argv[2])
        except jobs.JobError as e:
            st.error(str(e))
        else:
            st.rerun()
    if status not in jobs.ACTIVE and c3.button("New run", key=f"{key}_new"):
        st.session_state.pop(key, None)
        st.query_params.pop(param, None)
        st.rerun()


def job_config(job: jobs.Job) -> Path | None:
    argv = job.argv
    return Path(argv[argv.index("--config") + 1]) if "--config" in argv[:-1] else None


def follow_pipeline(job: jobs.Job) -> None:
    """Status, progress and one curve per quantity of a tiny-pipeline job."""
    st.code(job.display, language="bash", wrap_lines=True)
    status = job.status
    fraction, stage = pipeline_progress(job.output_dir, job_config(job))
    if status == "queued":
        st.info(f"Queued: number {job.queue_position() or '?'} in line (one job runs at a time).")
    elif status == "running":
        st.progress(fraction, text=f"{stage}: {fraction:.0%}")
    elif status == "done":
        st.success("Done: your tutor is trained.")
    elif status == "cancelled":
        st.warning("Cancelled. Resume continues from the finished stages and checkpoints.")
    else:
        error = job.state().get("error") or f"exit code {job.state().get('exit_code')}"
        st.error(f"Failed ({error}). The end of the log is below.")
    for fig in pipeline_curves(job.output_dir):
        st.plotly_chart(fig, width="stretch")
    if status in ("failed", "cancelled"):
        with st.expander("Log (end)"):
            st.code(job.log_tail(2000) or "(empty)", language="text")


@st.fragment(run_every=1.0)
def live_pipeline(job_id: str) -> None:
    """Redrawn every second while the job runs; a full rerun when it ends (results, buttons)."""
    job = jobs.Job.load(jobs.jobs_root() / job_id)
    follow_pipeline(job)
    if not job.active:
        st.rerun()


def show_retrain_result(summary: dict) -> None:
    """What the retrain changed: each ranked answer's reward before and after, and the
    tutor's answer to each ranked question before and after."""
    st.success(f"Retrained on {summary['pairs']} preference pairs.")
    if summary["ranked"]:
        agree = summary["agreement"]
        st.markdown("**Your ranked answers, scored by the reward model before and after**")
        st.caption(
            "Before: the reward model the retrain starts from (the SFT model with a new score "
            "head, so every answer scores 0). After: the one trained on your rankings. Pairs "
            f"it orders the way you ranked them: {agree.get('before', 0)} of "
            f"{agree.get('total', 0)} before, {agree.get('after', 0)} of "
            f"{agree.get('total', 0)} after."
        )
        st.table(ranked_rewards_table(summary["ranked"]))
    else:
        st.info("This retrain predates the per-answer scores: run a new one to see them.")
    if summary["answers"]:
        st.markdown("**How the tutor's answer changed** (greedy decoding)")
        st.table(answer_changes_table(summary["answers"]))
    with st.expander("Training and held-out figures"):
        st.json({k: summary[k] for k in ("pairs", "reward", "policy")})


def follow_retrain(job: jobs.Job) -> None:
    st.code(job.display, language="bash", wrap_lines=True)
    status = job.status
    if status == "queued":
        st.info(f"Queued: number {job.queue_position() or '?'} in line (one job runs at a time).")
    elif status == "running":
        fraction, what = retrain_progress(job.output_dir, job.argv)
        st.progress(fraction, text=f"Retraining: {what}")
    elif status == "done":
        summary = retrain_summary(job.output_dir)
        if summary is None:
            st.error("The retrain finished but wrote no retrain.json.")
        else:
            show_retrain_result(summary)
    else:
        last = (job.log_tail(300).strip().splitlines() or [""])[-1]
        st.error(f"Retrain {status}: {last}")


@st.fragment(run_every=1.0)
def live_retrain(job_id: str) -> None:
    """Redrawn every second while the retrain runs; a full rerun when it ends."""
    job = jobs.Job.load(jobs.jobs_root() / job_id)
    follow_retrain(job)
    if not job.active:
        st.rerun()


@st.cache_resource(show_spinner="Loading your tutor ...", max_entries=4)
def own_tutor(folder: str):
    """(model, tokenizer) of a finished run's stage folder."""
    return load_model(folder), load_tokenizer(folder)


st.title("Training stages")
notes = concepts_for_page("training_stages")
for concept in notes[:4]:  # the three stages and the reward model, then the rest on demand
    st.markdown(f"**{concept.title}.** {concept.text}")
with st.expander("PPO, DPO and hallucination: " + ", ".join(c.title for c in notes[4:])):
    for concept in notes[4:]:
        st.markdown(f"**{concept.title}.** {concept.text}")

stages = shipped_stages()

# --- the same question to every stage ---------------------------------------------------------
st.subheader("One question, three stages")
question = st.text_input("Ask the tutor", "What is a token?")
c1, c2 = st.columns(2)
temperature = c1.slider("Temperature (0 = greedy)", 0.0, 1.5, 0.0, 0.1)
seed = c2.number_input("Seed", 0, 10_000, 0)
if question.strip():
    models = {label: tutor(name) for name, label in stages}
    try:
        replies = answers_side_by_side(models, question, temperature, int(seed), answer_cache())
    except ValueError as e:  # PromptTooLongError: the question does not fit the context
        st.error(question_error(e))
        replies = {}
    for label, text in replies.items():
        st.markdown(f"**{label}:** {text or '(nothing)'}")
    st.caption(
        "The base model only continues text. SFT taught it the chat format and the answers, and "
        'also a habit of its demonstrations: about 30% of them end with filler ("Well, as I '
        'said, and so on and so on."), so the SFT model pads some answers (try temperature 1 '
        "and a few seeds). The shipped preference pairs rank padded answers lower by a written "
        "rubric (standing in for the people who rank answers in real RLHF; the lab below lets "
        "you be those people), the reward model learned that, and PPO taught the tutor to stop "
        "after the answer, while a KL penalty kept it close to the SFT model."
    )

# --- the pipeline's figures and curves ----------------------------------------------------------
metrics = pipeline_figures()
if metrics:
    st.subheader("Measured on held-out questions")
    st.dataframe(figures_table(metrics))
    rm = metrics["reward_model"]
    st.caption(
        f"Reward model accuracy on {rm['eval_pairs']} held-out preference pairs: "
        f"{rm['eval_accuracy']:.1%}."
    )
st.subheader("Training curves")
for name, label in stages:
    frame = read_metrics(name)
    if not frame.empty:
        st.plotly_chart(curve_figure(frame, CURVES[name], label), width="stretch")

# --- human feedback lab ---------------------------------------------------------------------------
st.subheader("Human-feedback lab")
st.markdown(
    "Rank the tutor's answers, best first. Each ranking of n answers gives n(n−1)/2 preference "
    "pairs, the data a reward model and DPO learn from (`core.train.stages.feedback`)."
)
lab_question = st.text_input("Question for ranking", "What is temperature?")
n_answers = st.slider("Answers to rank", 2, 4, 3)
if st.button("Sample answers") and lab_question.strip():
    model, tok = tutor("tutor")
    try:
        # A fresh seed per click: with a fixed one, every click sampled the same answers.
        sampled = candidate_answers(model, tok, lab_question, n_answers, fresh_seed())
        st.session_state["lab"] = (lab_question, sampled)
    except ValueError as e:  # too long: the answers of the last question (if any) stay
        st.error(question_error(e))
if "lab" in st.session_state:
    prompt, answers = st.session_state["lab"]
    for i, text in enumerate(answers):
        st.markdown(f"**{i + 1}.** {text}")
    order = st.multiselect(
        "Your ranking (pick the answers best first)",
        options=list(range(len(answers))),
        format_func=lambda i: f"answer {i + 1}",
    )
    if len(answers) < 2:
        st.info(
            "The tutor gave fewer than two different answers to this question: try another one."
        )
    if st.button("Save ranking", disabled=len(order) != len(answers) or len(answers) < 2):
        kind, message = save_ranking(FEEDBACK_DB, prompt, answers, order)
        getattr(st, kind)(message)  # st.success, st.info or st.error
pairs, notes = stored_pairs(FEEDBACK_DB)
for kind, message in notes:
    getattr(st, kind)(message)  # st.error or st.warning
st.caption(f"{len(pairs)} preference pairs in {FEEDBACK_DB}.")
if pairs:
    st.dataframe([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs[-10:]])

retrain_job = load_job("retrain_job", "retrain_job")
if retrain_job is None:
    if st.button("Retrain from my rankings", disabled=not pairs, key="retrain_run"):
        try:
            retrain_job = jobs.start(
                retrain_argv(FEEDBACK_DB.resolve()), output_flag="--output-dir"
            )
        except EXPECTED as e:
            st.error(f"Cannot start the retrain: {e}")
        else:
            st.session_state["retrain_job"] = retrain_job.id
            st.rerun()
else:
    st.query_params["retrain_job"] = retrain_job.id
    if retrain_job.active:
        live_retrain(retrain_job.id)
    else:
        follow_retrain(retrain_job)
    job_controls(retrain_job, "retrain_job", "retrain_job", resume_flag="--resume")

# --- train your own tiny tutor (last: the tests address the lab's buttons by position) ---------------------------------------------------------------------
# A markdown heading, not st.subheader: the lab stays the last subheader (tests rely on it).
st.markdown("### Train your own tiny tutor")
st.markdown(
    "Run all stages yourself, at toy size: pre-training on a small corpus, SFT, a reward model "
    "and PPO, a few steps each. The page starts the same `genai-lab pipeline` command you could "
    "type, as a background job: reload the page and it is still there."
)
tiny = load_job("stages_job", "stages_job")
if tiny is None:
    preset = st.selectbox("Preset", list(TINY_PRESETS))
    if st.button("Run", type="primary", key="stages_run"):
        try:
            config = write_tiny_config(preset, jobs.jobs_root() / "lab-configs")
            tiny = jobs.start(pipeline_argv(config), output_flag="--output-dir")
        except EXPECTED as e:
            st.error(f"Cannot start the run: {e}")
        else:
            st.session_state["stages_job"] = tiny.id
            st.rerun()
else:
    st.query_params["stages_job"] = tiny.id  # a reload finds the job again
    if tiny.active:
        live_pipeline(tiny.id)
    else:
        follow_pipeline(tiny)
    job_controls(tiny, "stages_job", "stages_job")
    if tiny.status == "done" and (tiny.output_dir / "rlhf" / "config.json").is_file():
        st.markdown(f"**Your tutor against the shipped one** (question: _{question}_)")
        try:
            mine = {"your tiny tutor (PPO)": own_tutor(str(tiny.output_dir / "rlhf"))}
            shipped = {label: tutor(name) for name, label in stages[-1:]}
            both = answers_side_by_side(
                {**mine, **shipped}, question, temperature, int(seed), answer_cache()
            )
        except EXPECTED as e:
            st.error(question_error(e) if isinstance(e, ValueError) else str(e))
            both = {}
        for label, text in both.items():
            st.markdown(f"**{label}:** {text or '(nothing)'}")
