"""Fine-tune: LoRA / QLoRA on your own data from the browser. The page checks the data, shows
what will be trained and what it costs, and starts the same `genai-lab finetune` command a user
could type, as a background job (dashboard.lib.jobs) that survives a reload; then it follows the
job and shows the report and the adapter."""

from __future__ import annotations

import shlex
from contextlib import suppress
from pathlib import Path

import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from core.lm.loader import ModelLoadError
from core.train.config import ConfigError
from dashboard.lib import jobs
from dashboard.lib.finetune_lab import (
    MODELS,
    UploadError,
    build_argv,
    chat_command,
    check_data,
    estimate,
    examples,
    formats_markdown,
    loss_figure,
    read_report,
    save_upload,
    token_previews,
    upload_label,
    zip_folder,
)
from finetune.data import SUFFIXES, DataError
from finetune.estimate import format_bytes

LOCAL = "a local folder…"
# Expected failures, shown as one line each (a traceback is never shown).
EXPECTED = (UploadError, DataError, ConfigError, ModelLoadError, ValueError, OSError)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_check(path: str, mtime: float, shown: str):
    return check_data(Path(path), shown)


@st.cache_data(show_spinner="Rendering the first rows with the model's chat template…")
def cached_previews(path: str, mtime: float, model: str, max_length: int) -> list[str]:
    return token_previews(Path(path), model, max_length)


@st.cache_data(show_spinner=False, max_entries=256)
def cached_estimate(model: str, method: str, rank: int, batch: int, seq_len: int) -> dict:
    return estimate(model, method, rank, batch, seq_len)


def current_job() -> jobs.Job | None:
    """The job this browser follows: session state, else ?job= in the URL (a reload)."""
    job_id = st.session_state.get("ft_job") or st.query_params.get("job")
    if not job_id or not jobs.valid_id(job_id):
        return None
    try:
        job = jobs.Job.load(jobs.jobs_root() / job_id)
    except jobs.JobError:
        return None
    st.session_state["ft_job"] = job_id
    return job


def follow(job: jobs.Job) -> None:
    """A job's status, progress, loss curve and log; when it ends, its results."""
    state = job.state()
    status = state["status"]
    progress = job.progress()
    if status == "queued":
        st.info(f"Job {job.id} is waiting: position {job.queue_position() or 1} in the queue.")
    elif status == "running":
        total = progress.total or "?"
        st.progress(progress.fraction, text=f"Job {job.id}: step {progress.step} of {total}")
    elif status == "done":
        st.success(f"Job {job.id} finished.")
    elif status == "cancelled":
        st.warning(f"Job {job.id} was cancelled at step {progress.step}.")
    else:
        why = state.get("error") or f"exit code {state.get('exit_code')}"
        st.error(f"Job {job.id} failed ({why}); the end of its log is below.")
    st.caption("Command:")
    st.code(job.display, language="bash", wrap_lines=True)
    metrics = job.metrics()
    if any("loss" in m or "eval_loss" in m for m in metrics):
        st.plotly_chart(loss_figure(metrics), key="ft_loss")
    with st.expander("Log", expanded=status == "failed"):
        st.code(job.log_tail() or "(nothing yet)", language="text")


def actions(job: jobs.Job) -> None:
    status = job.status
    c1, c2 = st.columns(2)
    if status in jobs.ACTIVE and c1.button("Cancel", key="ft_cancel"):
        job.cancel()
        st.rerun()
    if status in ("cancelled", "failed") and c1.button("Resume", key="ft_resume"):
        try:
            job.resume()
        except jobs.JobError as e:
            st.error(str(e))
        else:
            st.rerun()
    if status not in jobs.ACTIVE and c2.button("New run", key="ft_new"):
        st.session_state.pop("ft_job", None)
        st.query_params.pop("job", None)
        st.rerun()


@st.fragment(run_every=1.0)
def live(job_id: str) -> None:
    """Redrawn every second while the job is queued or running; a full rerun when it ends, so
    the results and the buttons appear."""
    job = jobs.Job.load(jobs.jobs_root() / job_id)
    follow(job)
    if not job.active:
        st.rerun()


def results(job: jobs.Job) -> None:
    report = read_report(job.output_dir)
    adapter = job.output_dir / "adapter"
    if report is None or not adapter.is_dir():
        return
    st.subheader("Base vs fine-tuned")
    m1, m2, m3 = st.columns(3)
    m1.metric(
        "Eval loss",
        f"{report['eval_loss_after']:.4f}",
        f"{report['eval_loss_after'] - report['eval_loss_before']:+.4f}",
        delta_color="inverse",
    )
    m2.metric("Eval perplexity", f"{report['eval_ppl_after']:.3f}")
    m3.metric("Training time", f"{report['train_seconds']:.1f} s")
    for sample in report.get("samples", []):
        with st.container(border=True):
            st.markdown("**Prompt**")
            st.code(sample["prompt"], language="text", wrap_lines=True)
            b, f = st.columns(2)
            b.markdown("**Base model**")
            b.text(sample["base"])
            f.markdown("**Fine-tuned**")
            f.text(sample["finetuned"])
            st.caption(f"Reference: {sample['reference']}")
    st.download_button(
        "Download the adapter (zip)",
        data=zip_folder(adapter),
        file_name=f"adapter-{job.id}.zip",
        mime="application/zip",
        key="ft_download",
    )
    st.markdown("Chat with it: the Chat page's model picker lists it, or in a terminal:")
    with suppress(StreamlitPageNotFoundError):  # (this page run on its own, in tests)
        st.page_link(
            "views/chat.py",
            label="Chat with this adapter",
            icon=":material/chat:",
            query_params={"model": job.id},
        )
    st.code(chat_command(job.output_dir), language="bash")


st.title("Fine-tune")
st.markdown(
    "Train a LoRA or QLoRA adapter on your own examples. The page checks every row, shows which "
    "tokens the model learns from, estimates the cost, and then runs the same `genai-lab "
    "finetune` command you could type in a terminal, as a background job: you can reload the "
    "page or close it and come back. One job runs at a time; others wait their turn."
)

job = current_job()
if job is not None:
    st.query_params["job"] = job.id  # a reload finds the job again
    st.subheader("Your run")
    if job.active:
        live(job.id)
    else:
        follow(job)
        results(job)
    actions(job)
    st.divider()

# --- 1. data ------------------------------------------------------------------------------------
st.subheader("1. Data")
source = st.radio("Dataset", ["Bundled example", "Upload a file"], horizontal=True, key="ft_source")
with st.expander("Data formats (detected from the columns)"):
    st.markdown(formats_markdown())
data_path: Path | None = None
shown_name = ""
if source == "Bundled example":
    bundled = examples()
    name = st.selectbox(
        "Example", list(bundled), index=list(bundled).index("tutor_chat.jsonl"), key="ft_example"
    )
    data_path, shown_name = bundled[name], name
else:
    upload = st.file_uploader(
        upload_label(),
        type=[s.lstrip(".") for s in SUFFIXES],
        key="ft_upload",
    )
    if upload is not None:
        try:
            data_path = save_upload(upload.name, upload.getvalue(), jobs.jobs_root() / "uploads")
            shown_name = upload.name
        except EXPECTED as e:
            st.error(str(e))

report = None
if data_path is not None:
    try:
        report = cached_check(str(data_path), data_path.stat().st_mtime, shown_name)
    except EXPECTED as e:
        st.error(f"{shown_name}: {e}" if shown_name not in str(e) else str(e))
if report is not None:
    summary = (
        f"{shown_name}: {report.rows} rows, format {report.format}: {report.good} usable, "
        f"{report.bad} with errors"
    )
    if report.usable:
        st.success(summary)
    else:
        st.error(summary + ". Fix the rows below (file:line) and upload the file again.")
    if report.issues:
        st.code("\n".join(report.issues), language="text", wrap_lines=True)

# --- 2. model and method --------------------------------------------------------------------------
st.subheader("2. Model and method")
c1, c2 = st.columns(2)
choice = c1.selectbox("Base model", [*MODELS, LOCAL], key="ft_model")
model = choice
if choice == LOCAL:
    model = c1.text_input("Model folder (a Hugging Face causal LM)", key="ft_model_path").strip()
method = c2.radio(
    "Method",
    ["lora", "qlora"],
    horizontal=True,
    key="ft_method",
    format_func=lambda m: {"lora": "LoRA", "qlora": "QLoRA (4-bit base)"}[m],
)
c1, c2, c3 = st.columns(3)
rank = c1.select_slider("Rank r", [1, 2, 4, 8, 16, 32, 64], value=8, key="ft_rank")
alpha = c2.number_input("Alpha", 1.0, 512.0, float(2 * rank), step=1.0, key=f"ft_alpha_{rank}")
learning_rate = c3.select_slider(
    "Learning rate",
    [1e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3],
    value=2e-3,
    format_func=lambda v: f"{v:g}",
    key="ft_lr",
)
c1, c2, c3 = st.columns(3)
max_steps = int(c1.number_input("Max steps", 1, 10_000, 60, key="ft_steps"))
batch_size = int(c2.number_input("Batch size", 1, 256, 16, key="ft_batch"))
max_length = int(c3.number_input("Max length (tokens)", 16, 8192, 128, step=16, key="ft_len"))

ready_model = bool(model)
if ready_model:
    try:
        cost = cached_estimate(model, method, rank, batch_size, max_length)
    except EXPECTED as e:
        ready_model = False
        st.error(f"{model}: {e}" if model not in str(e) else str(e))
    else:
        e1, e2, e3 = st.columns(3)
        e1.metric(
            "Trainable parameters",
            f"{cost['trainable_parameters']:,}",
            help=f"of {cost['total_parameters']:,} in the model",
        )
        e2.metric("Trainable share", f"{cost['trainable_percent']:.2f}%")
        e3.metric(
            "Training memory (estimate)",
            format_bytes(cost["memory"]["total"]),
            help=f"frozen weights in {cost['precision']}; finetune/estimate.py lists the "
            "assumptions (the numbers of `genai-lab finetune --dry-run`)",
        )
else:
    st.info("Type the folder of a model to fine-tune.")

if report is not None and report.good and ready_model:
    st.markdown("**What the model learns from** (trained tokens between « »):")
    try:
        previews = cached_previews(str(data_path), data_path.stat().st_mtime, model, max_length)
    except EXPECTED as e:
        st.error(str(e))
    else:
        for text in previews:
            st.code(text, language="text", wrap_lines=True)

# --- 3. run -------------------------------------------------------------------------------------
st.subheader("3. Run")
can_run = report is not None and report.usable and ready_model
if can_run:
    argv = build_argv(
        model, data_path, method, rank, alpha, learning_rate, max_steps, batch_size, max_length
    )
    st.code(
        shlex.join(argv) + " --output-dir <job folder>/output", language="bash", wrap_lines=True
    )
busy = job is not None and job.active
clicked = st.button(
    "Run",
    type="primary",
    disabled=not can_run or busy,
    key="ft_run",
    help="Starts the command above as a background job."
    if not busy
    else "Your run is still going: cancel it or wait for it.",
)
if clicked:
    # A second click on a busy page re-runs the script with the job already in session state:
    # it must not start another one.
    followed = current_job()
    if followed is not None and followed.active:
        st.info(f"Job {followed.id} is already running for this page.")
    else:
        try:
            new = jobs.start(argv, output_flag="--output-dir")
        except (jobs.JobError, OSError) as e:
            st.error(f"cannot start the job: {e}")
        else:
            st.session_state["ft_job"] = new.id
            st.query_params["job"] = new.id
            st.rerun()
elif not can_run and job is None:
    st.caption("Run needs usable data and a model the estimate can read.")
