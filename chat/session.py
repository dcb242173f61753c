"""`ChatSession`: one conversation thread with one model, the API the CLI and the dashboard use.

store = ChatStore("chat.sqlite")
session = ChatSession(store, load_chat_model("tutor"), thread_id="demo")
for piece in session.stream("What is a token?"):
    print(piece if isinstance(piece, str) else f"\\n{piece.sources}")
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from langchain_core.messages import AIMessageChunk, AnyMessage

from chat.chain import DEFAULT_SYSTEM_PROMPT, notes_in_prompt
from chat.conversations import ChatStore, TurnContext, store_error, thread_config

if TYPE_CHECKING:  # type hints only: reading a conversation needs no model (nor torch)
    from chat.providers import ChatBackend
    from chat.retrieval import ConceptRetriever


@dataclass
class TurnResult:
    """One answer and what came with it."""

    answer: str
    sources: list[dict] = field(default_factory=list)  # concepts in the prompt: id, title, page
    tokens: list[dict] | None = None  # per token: probability and top alternatives (inspector)
    usage: dict | None = None  # input/output tokens, where the model reports them
    interrupted: bool = False  # stopped early (Ctrl-C / stop button)
    dropped_messages: int = 0  # oldest history messages left out to fit the context


class ChatSession:
    """A thread of a `ChatStore` talked to through a `ChatBackend`."""

    def __init__(
        self,
        store: ChatStore,
        backend: ChatBackend,
        thread_id: str = "default",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        retriever: ConceptRetriever | None = None,
        grounding: str = "auto",
        inspect_tokens: bool = False,
        abstain: bool = False,
    ) -> None:
        if not thread_id.strip():
            raise ValueError("the thread id is empty")
        self.store, self.backend, self.thread_id = store, backend, thread_id
        self.system_prompt = system_prompt
        self.retriever = retriever
        notes_in_prompt(grounding, backend.context_window)  # validates the mode now
        self.grounding = grounding
        self.inspect_tokens = inspect_tokens
        self.abstain = abstain  # with a retriever: decline questions no note is close to

    def history(self) -> list[AnyMessage]:
        return self.store.messages(self.thread_id)

    def reset(self) -> None:
        """Forget this thread's conversation."""
        self.store.delete(self.thread_id)

    def stream(self, message: str, stop: threading.Event | None = None) -> Iterator:
        """Yield the answer's text pieces as they are generated, then one `TurnResult`.
        Setting `stop` ends the answer after the current token (the part shown is kept); so does
        closing the generator part-way (a closed tab, a rerun, a `break`).

        The turn holds the thread (`ChatStore.turn`) from reading the history to saving the
        answer: another session, tab or process on the same thread waits for it to finish."""
        if not message.strip():
            raise ValueError("empty message: type something to send")
        stop = stop if stop is not None else threading.Event()
        context = TurnContext(
            backend=self.backend,
            system_prompt=self.system_prompt,
            retriever=self.retriever,
            grounding=self.grounding,
            inspect_tokens=self.inspect_tokens,
            stop=stop,
            abstain=self.abstain,
        )
        with self.store.turn(self.thread_id):
            try:
                before = len(self.history())
                parts = self.store.graph.stream(
                    {"question": message.strip(), "passages": []},
                    thread_config(self.thread_id),
                    context=context,
                    stream_mode="messages",
                )
                try:
                    for chunk, meta in parts:
                        from_model = isinstance(chunk, AIMessageChunk)
                        if from_model and meta.get("langgraph_node") == "respond" and chunk.text:
                            yield chunk.text
                except GeneratorExit:
                    # The reader left mid-answer. Stop at the next token and let the graph save
                    # the part shown, still holding the thread: a run left half-done is dropped,
                    # answer and all, by the thread's next turn.
                    stop.set()
                    for _ in parts:
                        pass
                    raise
                messages = self.history()
            except sqlite3.Error as e:
                raise store_error(self.store.path, e, "save this turn") from None
        if len(messages) == before:  # stopped before the first token: nothing was saved
            yield TurnResult(answer="", interrupted=True)
            return
        reply = messages[-1]
        meta = reply.response_metadata
        yield TurnResult(
            answer=reply.text,
            sources=list(meta.get("sources", [])),
            tokens=meta.get("tokens"),
            usage=dict(reply.usage_metadata) if reply.usage_metadata else None,
            interrupted=bool(meta.get("interrupted")),
            dropped_messages=int(meta.get("dropped_messages", 0)),
        )

    def ask(
        self,
        message: str,
        on_text: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> TurnResult:
        """Answer one message (calling `on_text` with each piece as it streams)."""
        result = None
        for item in self.stream(message, stop):
            if isinstance(item, TurnResult):
                result = item
            elif on_text is not None:
                on_text(item)
        assert result is not None
        return result
