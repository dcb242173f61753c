"""Chat: the LangChain chatbot (chat/) with memory, cited concepts and a "why this token" view."""

from __future__ import annotations

from contextlib import closing

import pandas as pd
import streamlit as st

from chat.chain import default_system_prompt
from chat.memory import ChatStore, default_db_path
from chat.models import Sampling, default_chat_model, load_chat_model
from chat.retrieval import ConceptRetriever
from chat.session import ChatSession, TurnResult
from core.models import BOT_MODEL, FOUNDATION_MODEL, PRETRAINED_DIR, SHIPPED_MODELS
from dashboard.lib.chat_view import safe_markdown

# What the model picker says about each shipped name.
MODEL_LABELS = {
    BOT_MODEL: "smollm2-tutor: the demo bot (SmolLM2 + notes + our adapter)",
    FOUNDATION_MODEL: "smollm2-135m-instruct: SmolLM2 as it comes",
    "tutor": "tutor: ours from scratch, most-trained stage (reads 128 tokens)",
    "tutor-rlhf": "tutor-rlhf: after RLHF (reads 128 tokens)",
    "tutor-sft": "tutor-sft: after SFT (reads 128 tokens)",
    "tutor-base": "tutor-base: pre-trained only, not a chat model (continues text)",
}


@st.cache_resource(show_spinner="Loading the model ...")
def backend(spec: str, temperature: float, top_k: int | None, top_p: float | None):
    return load_chat_model(spec, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))


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


def show_extras(metadata: dict, key: str) -> None:
    """Citations and the token inspector under an answer."""
    if metadata.get("interrupted"):
        st.caption("(stopped)")
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


st.title("Chat")
st.markdown(
    "A chatbot built with **LangChain**: a chain puts the system prompt, the conversation so far "
    "(trimmed to what the model can read) and your message into the model. **LangGraph** saves "
    "each conversation in a SQLite file after every step, so it survives restarts. Before "
    "answering, the question is embedded with MiniLM and the closest concept notes from this "
    "dashboard are looked up; the answer cites the pages they come from."
)
shipped = [default_chat_model(), FOUNDATION_MODEL, "tutor"]
shipped += [n for n in SHIPPED_MODELS if (PRETRAINED_DIR / n).is_dir()]
shipped = list(dict.fromkeys(shipped))  # the default first, each once
with st.sidebar:
    st.subheader("Chat settings")
    spec = st.selectbox(
        "Model",
        shipped,
        format_func=lambda name: MODEL_LABELS.get(name, name),
        help="The demo bot answered the held-out questions best (README); the tutor is the "
        "from-scratch model of the training-stages page.",
    )
    other = st.text_input("… or a model spec", help="PATH, PATH+ADAPTER or provider:model")
    thread = st.text_input("Conversation id", value="dashboard").strip() or "dashboard"
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
    chosen = other.strip() or spec
    system = st.text_area(
        "System prompt", value=default_system_prompt(chosen), height=80, key=f"system-{chosen}"
    )

try:
    session = ChatSession(
        store(str(default_db_path())),
        backend(chosen, temperature, None, None),
        thread_id=thread,
        system_prompt=system,
        retriever=None if notes == "off" else retriever(),
        grounding="auto" if notes == "off" else notes,
        inspect_tokens=inspect,
        abstain=notes != "off",
    )
    messages = session.history()
except ValueError as e:
    st.error(str(e))
    st.stop()

context = session.backend.context_window
st.caption(
    f"Model **{session.backend.spec}** ({session.backend.kind}) reads {context:,} tokens; "
    f"conversation **{thread}** has {len(messages)} messages."
)
if st.button("Clear this conversation", disabled=not messages):
    session.reset()
    st.rerun()

for i, message in enumerate(messages):
    role = "user" if message.type == "human" else "assistant"
    with st.chat_message(role):
        st.markdown(safe_markdown(message.text))  # never images or HTML: they can leak the chat
        if role == "assistant":
            show_extras(message.response_metadata, f"old-{i}")

question = st.chat_input("Ask about tokens, sampling, LoRA ...")
if question:
    with st.chat_message("user"):
        st.markdown(safe_markdown(question))
    with st.chat_message("assistant"):
        # Streamed by hand rather than st.write_stream, which renders the raw text as markdown.
        shown = st.empty()
        text, result = "", None
        try:
            # closing: a rerun or stop mid-answer saves the part shown and frees the thread now
            with closing(session.stream(question)) as turn:
                for item in turn:
                    if isinstance(item, TurnResult):
                        result = item
                    else:
                        text += item
                        shown.markdown(safe_markdown(text) + "▌")
        except ValueError as e:
            st.error(str(e))
        if text:
            shown.markdown(safe_markdown(text))
        else:
            shown.empty()
        if result is not None:
            if result.dropped_messages:
                st.caption(f"({result.dropped_messages} older messages did not fit the context)")
            show_extras(
                {
                    "sources": result.sources,
                    "tokens": result.tokens,
                    "interrupted": result.interrupted,
                },
                f"new-{len(messages)}",
            )
