"""chat's chain, memory and retrieval: the logic with LangChain's fake chat models (offline, fast),
the retrieval with the real MiniLM."""

from __future__ import annotations

import itertools
import sqlite3
import threading

import numpy as np
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from chat.chain import ContextOverflowError, answer_budget, build_chain, fit_prompt
from chat.conversations import ChatStore, ChatStoreError, default_db_path
from chat.providers import ChatBackend
from chat.retrieval import ConceptRetriever, MiniLMEmbeddings
from chat.session import ChatSession
from core.content.concepts import CONCEPTS

ANSWER = "Tokens are pieces of text the model reads and writes."


def count_words(messages) -> int:
    """A stand-in tokenizer: one token per word, two per message for the template."""
    return sum(len(m.text.split()) + 2 for m in messages) + 1


class Recorder(BaseCallbackHandler):
    """Keeps the prompt each chat-model call received."""

    def __init__(self) -> None:
        self.prompts: list[list] = []

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.prompts.append(messages[0])


def fake_backend(context: int = 60, answers=(ANSWER,), recorder=None) -> ChatBackend:
    model = GenericFakeChatModel(
        messages=itertools.cycle([AIMessage(a) for a in answers]),
        callbacks=[recorder] if recorder else None,
    )
    return ChatBackend("fake", "provider", model, context, count_words)


def note(concept_id: str) -> Document:
    c = next(c for c in CONCEPTS if c.id == concept_id)
    meta = {"id": c.id, "title": c.title, "page": c.page, "text": c.text, "score": 0.8}
    return Document(page_content=c.text, metadata=meta)


@pytest.fixture
def store(tmp_path):
    s = ChatStore(tmp_path / "chat.sqlite")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# the chain


def test_chain_puts_system_notes_history_and_question_in_order():
    recorder = Recorder()
    backend = fake_backend(recorder=recorder)
    chain = build_chain(backend.chat_model, count_words, 400, 50, "Be kind.")
    history = [HumanMessage("hi"), AIMessage("hello")]
    out = chain.invoke(
        {"question": "What is a token?", "history": history, "passages": [note("token")]}
    )
    assert out["answer"].content == ANSWER
    prompt = recorder.prompts[0]
    assert [m.type for m in prompt] == ["system", "human", "ai", "human"]
    assert prompt[0].content.startswith("Be kind.\n\nNotes:\n[Tokens] A token is")
    assert prompt[-1].content == "What is a token?"
    assert out["fitted"].sources[0] | {"score": None} == {
        "id": "token", "title": "Tokens", "page": "tokens", "score": None, "in_prompt": True,
    }  # fmt: skip


def test_history_is_trimmed_to_the_context_newest_turns_first():
    history = []
    for i in range(20):
        history += [HumanMessage(f"question number {i}"), AIMessage(f"answer number {i}")]
    fitted = fit_prompt("and now?", history, [], count_words, 60, 20, "Be kind.")
    assert fitted.prompt_tokens <= 60 - 20
    kept = fitted.history
    assert kept and kept == history[-len(kept) :]  # the newest messages, in order
    assert kept[0].type == "human"  # never starts with a dangling answer
    assert fitted.dropped_messages == len(history) - len(kept) > 0
    # One more message would not have fitted.
    one_more = history[-len(kept) - 2 :]
    assert count_words([SystemMessage("Be kind."), *one_more, HumanMessage("and now?")]) > 40
    # With room for everything, nothing is dropped.
    assert fit_prompt("and now?", history, [], count_words, 2000, 20).dropped_messages == 0


def test_notes_are_cut_to_fit_and_cited_even_when_left_out():
    notes = [note("token"), note("tokenizer")]
    roomy = fit_prompt("What is a token?", [], notes, count_words, 500, 50)
    assert [s["in_prompt"] for s in roomy.sources] == [True, True]
    assert note("tokenizer").metadata["text"] in roomy.system[0].content
    tight = fit_prompt("What is a token?", [], notes, count_words, 45, 10)
    system = tight.system[0].content
    assert "[Tokens] A token is" in system and "[Tokenizer" not in system
    assert count_words([*tight.system, HumanMessage("What is a token?")]) <= 35
    assert [s["in_prompt"] for s in tight.sources] == [True, False]  # both still cited
    none = fit_prompt("What is a token?", [], notes, count_words, 26, 10)
    assert "Notes" not in none.system[0].content
    assert [s["id"] for s in none.sources] == ["token", "tokenizer"]


def test_message_longer_than_the_context_is_a_clear_error():
    with pytest.raises(ContextOverflowError, match=r"the message is \d+ tokens"):
        fit_prompt("word " * 100, [], [], count_words, 60, 20)
    with pytest.raises(ContextOverflowError, match="shorten the system prompt"):
        fit_prompt("hi", [], [], count_words, 60, 20, "rule " * 50)
    with pytest.raises(ValueError, match="empty message"):
        fit_prompt("   ", [], [], count_words, 60, 20)
    assert (
        answer_budget(128) == 42 and answer_budget(128, 10) == 10 and answer_budget(128, 500) == 64
    )


# ---------------------------------------------------------------------------------------------
# memory


def test_conversations_survive_a_restart_and_threads_are_separate(tmp_path):
    db = tmp_path / "chat.sqlite"
    first = ChatStore(db)
    session = ChatSession(first, fake_backend(), thread_id="a")
    result = session.ask("What is a token?")
    assert result.answer == ANSWER
    first.close()
    again = ChatStore(db)  # a new process would do exactly this
    history = ChatSession(again, fake_backend(), thread_id="a").history()
    assert [(m.type, m.text) for m in history] == [("human", "What is a token?"), ("ai", ANSWER)]
    assert ChatSession(again, fake_backend(), thread_id="b").history() == []
    assert again.threads() == ["a"]
    ChatSession(again, fake_backend(), thread_id="b").reset()  # resetting b leaves a alone
    assert len(again.messages("a")) == 2
    again.close()


def test_a_conversation_longer_than_the_context_keeps_working(store):
    recorder = Recorder()
    session = ChatSession(store, fake_backend(context=50, recorder=recorder), thread_id="long")
    for i in range(25):
        result = session.ask(f"tell me more about tokens, part {i}")
        assert result.answer == ANSWER
    assert len(session.history()) == 50  # everything is saved ...
    assert result.dropped_messages > 30  # ... but only the newest turns are sent
    assert all(count_words(p) <= 50 - answer_budget(50) for p in recorder.prompts)
    assert recorder.prompts[-1][-1].content == "tell me more about tokens, part 24"


def test_bad_messages_leave_the_conversation_as_it_was(store):
    session = ChatSession(store, fake_backend(), thread_id="t")
    session.ask("hello")
    with pytest.raises(ValueError, match="empty message"):
        session.ask("  ")
    with pytest.raises(ContextOverflowError):
        session.ask("word " * 200)
    assert [m.text for m in session.history()] == ["hello", ANSWER]
    assert session.ask("still here?").answer == ANSWER


def test_stopping_keeps_the_part_already_shown(store):
    words = " ".join(f"w{i}" for i in range(40))
    session = ChatSession(store, fake_backend(answers=[words]), thread_id="s")
    stop = threading.Event()
    shown: list[str] = []

    def on_text(piece: str) -> None:
        shown.append(piece)
        if len(shown) == 3:
            stop.set()  # what Ctrl-C does in the CLI

    result = session.ask("count", on_text=on_text, stop=stop)
    assert result.interrupted
    assert words.startswith(result.answer) and 0 < len(result.answer) < len(words)
    assert "".join(shown).startswith(result.answer)
    saved = session.history()[-1]
    assert saved.text == result.answer and saved.response_metadata["interrupted"]


def test_a_locked_database_is_a_clear_error_and_keeps_the_conversation(tmp_path):
    db = tmp_path / "chat.sqlite"
    store = ChatStore(db, timeout=0.2)
    session = ChatSession(store, fake_backend(), thread_id="t")
    session.ask("first")
    other = sqlite3.connect(db)
    other.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
    with pytest.raises(ChatStoreError, match="database is locked") as info:
        session.ask("second")
    assert str(db) in str(info.value) and "\n" not in str(info.value)
    other.rollback()
    other.close()
    assert [m.text for m in session.history()] == ["first", ANSWER]
    assert session.ask("third").answer == ANSWER  # works again once the lock is gone
    store.close()


def test_a_corrupt_database_is_a_clear_error_and_is_not_touched(tmp_path):
    db = tmp_path / "chat.sqlite"
    garbage = b"this is not a database, but someone's notes\n" * 100
    db.write_bytes(garbage)
    with pytest.raises(ChatStoreError, match="file is not a database") as info:
        ChatStore(db)
    assert str(db) in str(info.value) and "\n" not in str(info.value)
    assert db.read_bytes() == garbage
    with pytest.raises(ChatStoreError, match="is a folder"):
        ChatStore(tmp_path)


def test_default_database_location(monkeypatch, tmp_path):
    monkeypatch.setenv("GENAI_LAB_CHAT_DB", str(tmp_path / "x.sqlite"))
    assert default_db_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("GENAI_LAB_CHAT_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    path = default_db_path()
    assert path.name == "chat.sqlite" and "genai-lab" in str(path)


# ---------------------------------------------------------------------------------------------
# retrieval (real MiniLM)


@pytest.fixture(scope="module")
def retriever():
    return ConceptRetriever()


def test_minilm_embeddings_equal_langchain_huggingface_embeddings():
    from langchain_huggingface import HuggingFaceEmbeddings

    from chat.embeddings import minilm_path

    texts = ["What is a token?", "LoRA trains two small matrices."]
    reference = HuggingFaceEmbeddings(
        model_name=str(minilm_path()),
        model_kwargs={"device": "cpu", "local_files_only": True},
        encode_kwargs={"normalize_embeddings": True},
    )
    ours = MiniLMEmbeddings()
    np.testing.assert_allclose(
        ours.embed_documents(texts), reference.embed_documents(texts), atol=1e-5
    )
    np.testing.assert_allclose(
        ours.embed_query(texts[0]), reference.embed_query(texts[0]), atol=1e-5
    )


@pytest.mark.parametrize(
    ("question", "concept", "page"),
    [
        ("What is a token?", "token", "tokens"),
        ("How does top-p sampling work?", "top-p", "next_token"),
        ("What is LoRA?", "lora", "lora"),
        ("Tell me about quantization", "quantization", "quantization"),
    ],
)
def test_retriever_finds_the_concept_and_its_page(retriever, question, concept, page):
    hits = retriever.search(question)
    assert hits[0].metadata["id"] == concept and hits[0].metadata["page"] == page
    scores = [h.metadata["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] >= retriever.min_score


def test_small_talk_cites_nothing(retriever):
    assert retriever.search("hello") == []
    assert retriever.search("What's the weather like in Paris?") == []


def test_answers_cite_the_concepts_and_retrieval_can_be_switched_off(store, retriever):
    on = ChatSession(store, fake_backend(context=400), thread_id="on", retriever=retriever)
    result = on.ask("What is a token?")
    assert result.sources[0]["id"] == "token" and result.sources[0]["page"] == "tokens"
    saved = on.history()[-1].response_metadata["sources"]
    assert saved == result.sources  # the citation is kept with the answer
    off = ChatSession(store, fake_backend(context=400), thread_id="off", retriever=None)
    assert off.ask("What is a token?").sources == []


@pytest.mark.parametrize(
    ("grounding", "context", "in_prompt"),
    [("prompt", 400, True), ("cite", 4000, False), ("auto", 400, False), ("auto", 600, True)],
)
def test_grounding_decides_whether_the_model_reads_the_notes(
    store, retriever, grounding, context, in_prompt
):
    recorder = Recorder()
    backend = fake_backend(context=context, recorder=recorder)
    session = ChatSession(store, backend, retriever=retriever, grounding=grounding)
    result = session.ask("What is a token?")
    assert result.sources[0]["id"] == "token"  # cited either way
    assert result.sources[0]["in_prompt"] is in_prompt
    assert ("[Tokens] A token is" in recorder.prompts[0][0].content) is in_prompt
    with pytest.raises(ValueError, match="unknown grounding 'maybe'"):
        ChatSession(store, backend, grounding="maybe")
