"""Chat: the LangChain chatbot (chat/) with memory, cited concepts and a "why this token" view."""

from __future__ import annotations

import gc
import time
import uuid
from contextlib import closing

import pandas as pd
import streamlit as st

from chat.chain import default_system_prompt
from chat.conversations import (
    ChatStore,
    ThreadInfo,
    default_db_path,
    export_json,
    export_markdown,
    short_time,
)
from chat.providers import default_chat_model, load_chat_model
from chat.retrieval import ConceptRetriever
from chat.session import ChatSession, TurnResult
from core.lm.loader import BOT_MODEL, FOUNDATION_MODEL, PRETRAINED_DIR, SHIPPED_MODELS
from core.lm.sampling import SamplingParams
from dashboard.lib.chat import (
    RunningAnswer,
    dropped_note,
    finetuned_models,
    safe_markdown,
    turn_stats,
)

# What the model picker says about each shipped name.
MODEL_LABELS = {
    BOT_MODEL: "smollm2-tutor: the demo bot (SmolLM2 + notes + our adapter)",
    FOUNDATION_MODEL: "smollm2-135m-instruct: SmolLM2 as it comes",
    "tutor": "tutor: ours from scratch, most-trained stage (reads 128 tokens)",
    "tutor-rlhf": "tutor-rlhf: after RLHF (reads 128 tokens)",
    "tutor-sft": "tutor-sft: after SFT (reads 128 tokens)",
    "tutor-base": "tutor-base: pre-trained only, not a chat model (continues text)",
}
FIRST_THREAD = "dashboard"  # the conversation a first visit opens (the page's old default)
SHOWN_THREADS = 50  # the sidebar lists this many recent conversations


@st.cache_resource(show_spinner="Loading the model ...")
def backend(spec: str, temperature: float, top_k: int | None, top_p: float | None):
    loaded = load_chat_model(
        spec, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    )
    # Streamlit collects garbage in full after every run (runner.postScriptGC): with torch and a
    # model loaded that walks ~500k objects, 0.5 s of CPU a run, a Stop's run included. The
    # model and the modules stay for the server's life: freeze them out of those collections.
    gc.collect()
    gc.freeze()
    return loaded


@st.cache_resource(show_spinner=False)
def store(path: str) -> ChatStore:
    return ChatStore(path)


@st.cache_resource(show_spinner="Embedding the concept notes with MiniLM ...")
def retriever() -> ConceptRetriever:
    return ConceptRetriever()


def cite(sources: list[dict]) -> str:
    return "Sources: " + ", ".join(
        f"**{s['title']}** (dashboard page `{s['page']}`)" for s in sources
    )


def token_table(tokens: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "token": [repr(t["token"]) for t in tokens],
            "probability": [round(t["probability"], 3) for t in tokens],
            "alternatives": [
                ", ".join(f"{a['token']!r} {a['probability']:.2f}" for a in t["alternatives"])
                for t in tokens
            ],
        }
    )


def show_extras(metadata: dict, key: str, history: int, stats: str = "") -> None:
    """Under an answer: what was left out of the context, speed, citations, token inspector.
    `history` is how many messages came before its question (what the model could have seen)."""
    if metadata.get("interrupted"):
        st.caption("(stopped)")
    note = dropped_note(int(metadata.get("dropped_messages") or 0), history)
    if note:
        st.info(note, icon=":material/content_cut:")
    if stats:
        st.caption(stats)
    if metadata.get("sources"):
        st.caption(cite(metadata["sources"]))
    if metadata.get("tokens"):
        with st.expander("Why these tokens?"):
            st.caption(
                "For each generated token: its probability and the model's top alternatives "
                "(before temperature and top-k/top-p filtering)."
            )
            tokens = metadata["tokens"]
            st.dataframe(token_table(tokens), hide_index=True, key=f"table::{key}")
            pick = st.selectbox(
                "Token",
                range(len(tokens)),
                format_func=lambda i: f"{i + 1}: {tokens[i]['token']!r}",
                key=f"pick::{key}",
            )
            alternatives = tokens[pick]["alternatives"]
            st.bar_chart(
                pd.DataFrame(
                    {
                        "token": [repr(a["token"]) for a in alternatives],
                        "probability": [a["probability"] for a in alternatives],
                    }
                ),
                x="token",
                y="probability",
                sort="-probability",
            )


def new_thread_id() -> str:
    return uuid.uuid4().hex[:12]


def open_thread(thread_id: str) -> None:
    """Switch conversations; the id goes in the URL so a reload or a bookmark reopens it."""
    st.query_params["thread"] = thread_id
    st.session_state.pop("chat_confirm_delete", None)


def rename_thread(chats: ChatStore, thread_id: str) -> None:
    try:
        chats.rename(thread_id, st.session_state.get(f"title::{thread_id}", ""))
    except ValueError as e:  # ChatStoreError: shown on the next run, never as a traceback
        st.session_state["chat_error"] = str(e)


def delete_thread(chats: ChatStore, thread_id: str) -> None:
    try:
        chats.delete(thread_id)
    except ValueError as e:
        st.session_state["chat_error"] = str(e)
        return
    open_thread(new_thread_id())  # a fresh one, not a reload of the deleted id


def regenerate(chats: ChatStore, thread_id: str) -> None:
    """Take the last question and answer out of the thread; this run asks the question again."""
    try:
        question = chats.drop_last_turn(thread_id)
    except ValueError as e:
        st.session_state["chat_error"] = str(e)
        return
    if question:
        st.session_state["chat_resend"] = (thread_id, question)


def thread_label(info: ThreadInfo) -> str:
    # Labels render markdown, images included: the title is chat text, so made safe.
    when = short_time(info.updated)
    title = safe_markdown(info.title)
    return f"{title} · {when}" if when else title


def thread_sidebar(
    chats: ChatStore, threads: list[ThreadInfo], thread: str, messages: list
) -> None:
    """New chat, the saved conversations (most recent first) and the current one's actions."""
    st.subheader("Conversations")
    st.button(
        "New chat",
        icon=":material/add:",
        on_click=open_thread,
        args=(new_thread_id(),),
        width="stretch",
        key="chat_new",
    )
    for info in threads[:SHOWN_THREADS]:
        st.button(
            thread_label(info),
            key=f"open::{info.thread_id}",
            type="primary" if info.thread_id == thread else "tertiary",
            on_click=open_thread,
            args=(info.thread_id,),
            help=safe_markdown(f"{info.messages} messages · id `{info.thread_id}`"),
            width="stretch",
        )
    if len(threads) > SHOWN_THREADS:
        st.caption(f"… and {len(threads) - SHOWN_THREADS} older ones")
    if not messages:
        return
    title = next((t.title for t in threads if t.thread_id == thread), thread)
    with st.expander("This conversation"):
        st.text_input("Title", value=title, key=f"title::{thread}")
        st.button("Rename", on_click=rename_thread, args=(chats, thread), key="chat_rename")
        left, right = st.columns(2)
        left.download_button(
            "JSON",
            export_json(thread, title, messages),
            file_name=f"chat-{thread}.json",
            mime="application/json",
            icon=":material/download:",
            on_click="ignore",  # a download needs no rerun
            key="chat_export_json",
        )
        right.download_button(
            "Markdown",
            export_markdown(title, messages),
            file_name=f"chat-{thread}.md",
            mime="text/markdown",
            icon=":material/download:",
            on_click="ignore",
            key="chat_export_md",
        )
        # Deleting asks first: a conversation cannot be brought back.
        if st.session_state.get("chat_confirm_delete") != thread:
            st.button(
                "Delete…",
                icon=":material/delete:",
                key="chat_delete",
                on_click=lambda: st.session_state.update(chat_confirm_delete=thread),
            )
        else:
            st.warning(
                safe_markdown(f"Delete “{title}” and its {len(messages)} messages for good?")
            )
            yes, no = st.columns(2)
            yes.button(
                "Delete",
                type="primary",
                key="chat_delete_yes",
                on_click=delete_thread,
                args=(chats, thread),
            )
            no.button(
                "Cancel",
                key="chat_delete_no",
                on_click=lambda: st.session_state.pop("chat_confirm_delete", None),
            )


st.title("Chat")
st.markdown(
    "A chatbot built with **LangChain**: a chain puts the system prompt, the conversation so far "
    "(trimmed to what the model can read) and your message into the model. **LangGraph** saves "
    "each conversation in a SQLite file after every step, so it survives restarts. Before "
    "answering, the question is embedded with MiniLM and the closest concept notes from this "
    "dashboard are looked up; the answer cites the pages they come from."
)
# A click during an answer (Stop, or any control) starts this run while the answer's run is
# still going: end that answer now, and wait until its part is saved before reading the thread.
running: RunningAnswer | None = st.session_state.pop("chat_running", None)
if running is not None and not running.halt():
    st.warning("The answer in progress is still stopping; reload in a moment to see it saved.")
# Conversations first: they show even when the chosen model cannot load.
try:
    chats = store(str(default_db_path()))
    threads = chats.thread_list()
except ValueError as e:  # ChatStoreError: the file cannot be opened or read
    st.error(str(e))
    st.stop()
# The URL names the conversation; a first visit resumes the most recent one.
thread = (st.query_params.get("thread") or "").strip() or (
    threads[0].thread_id if threads else FIRST_THREAD
)
st.query_params["thread"] = thread
if "chat_error" in st.session_state:  # from a sidebar action's callback
    st.error(safe_markdown(st.session_state.pop("chat_error")))  # it names the thread id
resend = st.session_state.pop("chat_resend", None)  # (thread, question) from "Regenerate"
try:
    messages = chats.messages(thread)
except ValueError as e:
    st.error(str(e))
    messages = []

shipped = [default_chat_model(), FOUNDATION_MODEL, "tutor"]
shipped += [n for n in SHIPPED_MODELS if (PRETRAINED_DIR / n).is_dir()]
shipped = list(dict.fromkeys(shipped))  # the default first, each once
finetuned = finetuned_models()  # the Fine-tune page's finished runs, by job id
choices = shipped + list(finetuned)
# ?model= names the picker's choice (a link, a reload); a name not in the picker is ignored.
linked = st.query_params.get("model")
if "chat_model" not in st.session_state and linked in choices:
    st.session_state["chat_model"] = linked
with st.sidebar:
    thread_sidebar(chats, threads, thread, messages)
    st.subheader("Chat settings")
    spec = st.selectbox(
        "Model",
        choices,
        key="chat_model",
        format_func=lambda name: (
            finetuned[name].label if name in finetuned else MODEL_LABELS.get(name, name)
        ),
        help="The demo bot answered the held-out questions best (README); the tutor is the "
        "from-scratch model of the training-stages page; fine-tuned ones are the adapters of "
        "the Fine-tune page's finished runs.",
    )
    st.query_params["model"] = spec
    other = st.text_input(
        "… or a model spec", help="PATH, PATH+ADAPTER or provider:model", key="chat_spec"
    )
    temperature = st.slider("Temperature", 0.0, 1.5, 0.7, 0.05, help="0 = always the top token")
    notes = st.radio(
        "Concept notes",
        ["auto", "prompt", "cite", "off"],
        horizontal=True,
        help="Look up this dashboard's notes on the question: put them in the prompt, only cite "
        "them, or auto (prompt for models that read 512+ tokens; the 128-token tutor was not "
        "trained with notes and answers better without them).",
    )
    inspect = st.toggle("Token inspector", value=True, help="Local models only")
    chosen = other.strip() or (str(finetuned[spec].adapter) if spec in finetuned else spec)
    system = st.text_area(
        "System prompt", value=default_system_prompt(chosen), height=80, key=f"system-{chosen}"
    )

session: ChatSession | None = None
try:
    session = ChatSession(
        chats,
        backend(chosen, temperature, None, None),
        thread_id=thread,
        system_prompt=system,
        retriever=None,  # loaded when a question comes (embedding the notes takes a while)
        grounding="auto" if notes == "off" else notes,
        inspect_tokens=inspect,
        abstain=notes != "off",
    )
except (ValueError, OSError) as e:  # a bad model spec: say why, keep the conversation visible
    st.error(safe_markdown(f"{chosen}: {e}" if chosen not in str(e) else str(e)))

title = next((t.title for t in threads if t.thread_id == thread), "New chat")
if session is not None:
    st.caption(
        f"Model **{session.backend.spec}** ({session.backend.kind}) reads "
        f"{session.backend.context_window:,} tokens; conversation **{safe_markdown(title)}** "
        f"has {len(messages)} messages."
    )
stats: dict[str, str] = st.session_state.setdefault("chat_stats", {})  # this session's answers

for i, message in enumerate(messages):
    role = "user" if message.type == "human" else "assistant"
    with st.chat_message(role):
        st.markdown(safe_markdown(message.text))  # never images or HTML: they can leak the chat
        if role == "assistant":
            show_extras(
                message.response_metadata, f"old-{i}", i - 1, stats.get(f"{thread}:{i}", "")
            )

if session is not None and messages and messages[-1].type == "ai":
    st.button(
        "Regenerate the last answer",
        icon=":material/refresh:",
        key="chat_regenerate",
        on_click=regenerate,
        args=(chats, thread),
        help="Ask the last question again (the current answer is replaced)",
    )

question = st.chat_input("Ask about tokens, sampling, LoRA ...", disabled=session is None)
if resend is not None and resend[0] == thread:
    question = resend[1]
if question and session is not None:
    with st.chat_message("user"):
        st.markdown(safe_markdown(question))
    with st.chat_message("assistant"):
        # Streamed by hand rather than st.write_stream, which renders the raw text as markdown.
        shown = st.empty()
        # Clicking Stop reruns the page: that run halts this answer (its stop event ends the model
        # after the token it is computing) and shows the part saved.
        answer = st.session_state["chat_running"] = RunningAnswer()
        stopper = st.empty()
        stopper.button(
            "Stop",
            icon=":material/stop_circle:",
            key="chat_stop",
            help="Stop the answer here (the part shown is kept)",
        )
        text, result = "", None
        started, first = time.perf_counter(), None
        try:
            if notes != "off":  # loaded at the first question: embedding the notes takes a while
                session.retriever = retriever()
            # closing: a rerun or stop mid-answer saves the part shown and frees the thread now
            with closing(session.stream(question, answer.stop)) as turn:
                for item in turn:
                    if isinstance(item, TurnResult):
                        result = item
                    else:
                        first = first or time.perf_counter()
                        text += item
                        shown.markdown(safe_markdown(text) + "▌")
        except (ValueError, OSError) as e:  # a store error, a model or notes that cannot load
            st.error(str(e))
        finally:
            answer.done.set()  # the turn is closed: saved, or left as it was
        ended = time.perf_counter()
        stopper.empty()
        if text:
            shown.markdown(safe_markdown(text))
        else:
            shown.empty()
        if result is not None:
            line = turn_stats(result.usage, ended - started, ended - first if first else None)
            if result.answer:  # saved as message len(messages) + 1, right after the question
                stats[f"{thread}:{len(messages) + 1}"] = line
            show_extras(
                {
                    "sources": result.sources,
                    "tokens": result.tokens,
                    "interrupted": result.interrupted,
                    "dropped_messages": result.dropped_messages,
                },
                f"new-{len(messages)}",
                len(messages),
                line,
            )
    if result is not None and result.answer:
        st.rerun()  # the sidebar lists the new conversation (or its new first message)
