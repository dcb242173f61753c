"""Conversation memory: a LangGraph graph (retrieve -> respond) whose state is saved after every
step by the SQLite checkpointer, keyed by thread id, so conversations survive restarts.

A turn's question and answer are added to the thread's messages together, by the last step: if
anything fails mid-turn (a message too long, a locked database, Ctrl-C before the first token),
the conversation so far is exactly as it was. An answer stopped part-way is kept as shown, marked
`response_metadata["interrupted"]`.

Turns on one thread take turns (`ChatStore.turn`): each writer reads the conversation, answers
and saves while holding the thread, so two tabs or two processes never extend the same
checkpoint and hide each other's turn in a fork of the thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    RemoveMessage,
    messages_from_dict,
    messages_to_dict,
)
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime

from chat.chain import (
    ABSTAIN_ANSWER,
    DEFAULT_SYSTEM_PROMPT,
    answer_budget,
    build_chain,
    notes_in_prompt,
)
from core.userdata import user_data_path

if TYPE_CHECKING:  # type hints only: reading a conversation needs no model (nor torch)
    from chat.providers import ChatBackend
    from chat.retrieval import ConceptRetriever

try:
    import fcntl
except ImportError:  # Windows: no flock, so turns are serialised within one process only
    fcntl = None

DB_ENV = "GENAI_LAB_CHAT_DB"  # overrides the default database file
TOKEN_ALTERNATIVES = 5  # alternatives per token kept for the inspector
TURN_TIMEOUT = 300.0  # seconds a turn waits for another writer's turn on the same thread
LOCK_POLL = 0.01  # seconds between tries of another process's lock (flock cannot time out)
TITLE_LENGTH = 48  # characters of the first message a thread's default title keeps
EXPORT_FORMAT = "genai-lab-chat/1"  # marks an exported thread, for a future import
# Titles given by hand live in a small side table of the same file, so one INSERT OR REPLACE
# renames atomically and deleting a thread can drop its title in the same transaction.
TITLES_TABLE = "CREATE TABLE IF NOT EXISTS chat_titles (thread_id TEXT PRIMARY KEY, title TEXT)"
# What a chat database holds: LangGraph's SqliteSaver tables and ours, with the columns each must
# have. A file with any other table belongs to another application and is never written to.
OUR_TABLES = {
    "checkpoints": {"thread_id", "checkpoint_ns", "checkpoint_id", "checkpoint", "metadata"},
    "writes": {"thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx", "channel", "value"},
    "chat_titles": {"thread_id", "title"},
}

# One lock per (database file, thread) for the whole process: sessions sharing a store and
# separate stores on the same file both wait for each other.
_turn_locks: dict[tuple[str, str], threading.Lock] = {}
_turn_locks_guard = threading.Lock()


class ChatStoreError(ValueError):
    """The conversation database cannot be opened, read or written."""


def default_db_path() -> Path:
    """$GENAI_LAB_CHAT_DB, else chat.sqlite in the user's data folder (core.userdata)."""
    return user_data_path("chat.sqlite", DB_ENV)


def store_error(path: Path, error: sqlite3.Error, doing: str) -> ChatStoreError:
    """One line that says which file, what went wrong and what happened to the conversation."""
    reason = str(error) or type(error).__name__
    if "locked" in reason:
        hint = "another program is writing to it; try again"
    elif "not a database" in reason or "malformed" in reason:
        hint = "the file is damaged or not a chat database; move it away or use --db"
    else:
        hint = "check the file and its folder"
    return ChatStoreError(f"{path}: cannot {doing} ({reason}): {hint}; nothing was changed")


class ChatState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]  # the conversation
    question: str  # this turn's message, moved into `messages` by respond
    passages: list[dict]  # this turn's retrieved notes
    nearest: dict | None  # set when no note is close enough and the bot abstains: the closest


@dataclass
class TurnContext:
    """Per-run settings (LangGraph runtime context): not saved with the conversation."""

    backend: ChatBackend
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    retriever: ConceptRetriever | None = None
    grounding: str = "auto"  # where the retrieved notes go: auto, prompt or cite (chat.chain)
    inspect_tokens: bool = False
    stop: threading.Event | None = None  # set it to end the answer early (Ctrl-C)
    abstain: bool = False  # no note close enough: say so instead of asking the model


def retrieve(state: ChatState, runtime: Runtime[TurnContext]) -> dict:
    """The notes for this turn. A short follow-up ("and why?") is searched again together with
    the previous question when it finds nothing alone."""
    retriever = runtime.context.retriever
    if retriever is None:
        return {"passages": [], "nearest": None}
    question = state["question"]
    docs = retriever.search(question)
    earlier = [m.text for m in state.get("messages") or [] if isinstance(m, HumanMessage)]
    if not docs and earlier:
        docs = retriever.search(f"{earlier[-1]}\n{question}")
    nearest = None
    if not docs and runtime.context.abstain:
        nearest = retriever.nearest(question).metadata
    return {"passages": [{"text": d.page_content, **d.metadata} for d in docs], "nearest": nearest}


def abstention(nearest: dict) -> str:
    """The refusal, pointing to the closest page the lab has."""
    title, page = nearest.get("title", ""), nearest.get("page", "")
    return f"{ABSTAIN_ANSWER} The closest topic I know is {title} (dashboard page: {page})."


def respond(state: ChatState, runtime: Runtime[TurnContext]) -> dict:
    ctx = runtime.context
    backend = ctx.backend
    if ctx.stop is not None and ctx.stop.is_set():
        return {}  # stopped before the model started (while the notes were looked up): no trace
    if state.get("nearest"):  # nothing the notes cover: no model call, no made-up answer
        reply = AIMessage(
            content=abstention(state["nearest"]),
            response_metadata={"abstained": True, "sources": [], "model": backend.spec},
        )
        return {"messages": [HumanMessage(state["question"]), reply]}
    model = backend.chat_model
    if ctx.inspect_tokens and backend.token_inspector:
        model = model.bind(top_alternatives=TOKEN_ALTERNATIVES)
    chain = build_chain(
        model,
        backend.count_tokens,
        backend.context_window,
        answer_budget(backend.context_window, backend.max_tokens),
        ctx.system_prompt,
        notes_in_prompt(ctx.grounding, backend.context_window),
    )
    passages = [Document(page_content=p["text"], metadata=p) for p in state.get("passages") or []]
    inputs = {
        "question": state["question"],
        "history": state.get("messages") or [],
        "passages": passages,
    }
    fitted, answer, interrupted = None, None, False
    with closing(chain.stream(inputs)) as parts:
        for part in parts:
            fitted = part.get("fitted", fitted)
            if "answer" in part:
                answer = part["answer"] if answer is None else answer + part["answer"]
            if ctx.stop is not None and ctx.stop.is_set():
                interrupted = True
                break  # closing the stream stops the model between two tokens
    metadata: dict[str, Any] = dict(answer.response_metadata) if answer is not None else {}
    metadata.update(
        sources=fitted.sources if fitted else [],
        dropped_messages=fitted.dropped_messages if fitted else 0,
        model=backend.spec,
    )
    if interrupted:
        if answer is None or not answer.text:
            return {}  # stopped before any text: the turn leaves no trace
        metadata["interrupted"] = True
    reply = AIMessage(
        content=answer.text if answer is not None else "",
        response_metadata=metadata,
        usage_metadata=answer.usage_metadata if answer is not None else None,
    )
    return {"messages": [HumanMessage(state["question"]), reply]}


def build_graph(checkpointer):
    graph = StateGraph(ChatState, context_schema=TurnContext)
    graph.add_node("retrieve", retrieve)
    graph.add_node("respond", respond)
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "respond")
    graph.add_edge("respond", END)
    return graph.compile(checkpointer=checkpointer)


class ChatStore:
    """A SQLite file of conversations (one LangGraph thread each) and the graph that uses it.
    One store can serve many sessions (the dashboard shares one per file)."""

    def __init__(
        self,
        path: str | Path | None = None,
        timeout: float = 5.0,
        turn_timeout: float = TURN_TIMEOUT,
    ) -> None:
        self.path = Path(path).expanduser() if path is not None else default_db_path()
        self.turn_timeout = turn_timeout
        if self.path.is_dir():
            raise ChatStoreError(f"{self.path}: is a folder; --db needs a file name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ChatStoreError(f"{self.path}: cannot create its folder ({e})") from None
        refuse_foreign_database(self.path, timeout)  # before anything writes to the file
        # check_same_thread=False: SqliteSaver serialises access with its own lock.
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=timeout)
        self.checkpointer = SqliteSaver(conn)
        try:
            self.checkpointer.setup()
            conn.execute("SELECT count(*) FROM checkpoints").fetchone()
            with self.checkpointer.cursor() as cur:
                cur.execute(TITLES_TABLE)
        except sqlite3.Error as e:
            conn.close()
            raise store_error(self.path, e, "open the chat database") from None
        self.graph = build_graph(self.checkpointer)
        self.lock_dir = self.path.with_name(self.path.name + ".locks")  # one empty file a thread

    @contextmanager
    def turn(self, thread_id: str) -> Iterator[None]:
        """Hold `thread_id` from reading its conversation to saving the answer, against every
        other session, thread and process using this file; a writer waits its turn (up to
        `turn_timeout` seconds, then a `ChatStoreError`). Without it two writers both extend the
        same checkpoint and the checkpointer keeps only one of the two turns."""
        deadline = time.monotonic() + self.turn_timeout
        with _turn_locks_guard:
            local = _turn_locks.setdefault((str(self.path.resolve()), thread_id), threading.Lock())
        if not local.acquire(timeout=self.turn_timeout):
            raise self._busy(thread_id)
        try:
            with self._file_lock(thread_id, deadline):
                yield
        finally:
            local.release()

    @contextmanager
    def _file_lock(self, thread_id: str, deadline: float) -> Iterator[None]:
        """The other processes' side of `turn`: an flock on the thread's lock file, which the
        system releases if the holder dies mid-turn."""
        if fcntl is None:
            yield
            return
        name = hashlib.sha256(thread_id.encode()).hexdigest()[:32]  # any id, a safe file name
        try:
            self.lock_dir.mkdir(exist_ok=True)
            fd = os.open(self.lock_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ChatStoreError(
                f"{self.lock_dir}: cannot create a lock file ({e.strerror}): check the folder; "
                "nothing was changed"
            ) from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise self._busy(thread_id) from None
                    time.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # also releases the flock

    def _busy(self, thread_id: str) -> ChatStoreError:
        return ChatStoreError(
            f"{self.path}: conversation {thread_id!r} is still busy with another chat's answer "
            f"after {self.turn_timeout:g} s; try again when it is done; nothing was changed"
        )

    def messages(self, thread_id: str) -> list[AnyMessage]:
        try:
            state = self.graph.get_state(thread_config(thread_id))
        except sqlite3.Error as e:
            raise store_error(self.path, e, "read the conversation") from None
        return list(state.values.get("messages", []))

    def threads(self) -> list[str]:
        """Thread ids with saved conversations, most recently used first."""
        try:
            with self.checkpointer.cursor(transaction=False) as cur:
                rows = cur.execute(
                    "SELECT thread_id FROM checkpoints GROUP BY thread_id ORDER BY max(rowid) DESC"
                ).fetchall()
        except sqlite3.Error as e:
            raise store_error(self.path, e, "list the conversations") from None
        return [r[0] for r in rows]

    def thread_list(self) -> list[ThreadInfo]:
        """Every saved thread that has messages or a title, with the title and last-update time,
        most recently used first."""
        try:
            with self.checkpointer.cursor(transaction=False) as cur:
                titles = dict(cur.execute("SELECT thread_id, title FROM chat_titles").fetchall())
        except sqlite3.Error as e:
            raise store_error(self.path, e, "list the conversations") from None
        infos = []
        for thread_id in self.threads():
            try:
                state = self.graph.get_state(thread_config(thread_id))
            except sqlite3.Error as e:
                raise store_error(self.path, e, "list the conversations") from None
            messages = list(state.values.get("messages", []))
            if not messages and thread_id not in titles:
                continue  # only steps of a turn stopped before its first token: nothing to show
            infos.append(
                ThreadInfo(
                    thread_id=thread_id,
                    title=titles.get(thread_id) or thread_title(messages),
                    updated=state.created_at or "",
                    messages=len(messages),
                )
            )
        return infos

    def title(self, thread_id: str) -> str:
        """The title given by `rename`, else the start of the first message."""
        try:
            with self.checkpointer.cursor(transaction=False) as cur:
                row = cur.execute(
                    "SELECT title FROM chat_titles WHERE thread_id = ?", (thread_id,)
                ).fetchone()
        except sqlite3.Error as e:
            raise store_error(self.path, e, "read the conversation's title") from None
        return row[0] if row and row[0] else thread_title(self.messages(thread_id))

    def rename(self, thread_id: str, title: str) -> None:
        """Give `thread_id` a title; an empty one goes back to the first message."""
        title = " ".join(title.split())
        try:
            with self.checkpointer.cursor() as cur:
                if title:
                    cur.execute(
                        "INSERT OR REPLACE INTO chat_titles (thread_id, title) VALUES (?, ?)",
                        (thread_id, title),
                    )
                else:
                    cur.execute("DELETE FROM chat_titles WHERE thread_id = ?", (thread_id,))
        except sqlite3.Error as e:
            raise store_error(self.path, e, "rename the conversation") from None

    def delete(self, thread_id: str) -> None:
        with self.turn(thread_id):  # not under a turn in progress, which would bring it back
            try:
                self.checkpointer.delete_thread(thread_id)
                with self.checkpointer.cursor() as cur:
                    cur.execute("DELETE FROM chat_titles WHERE thread_id = ?", (thread_id,))
            except sqlite3.Error as e:
                raise store_error(self.path, e, "delete the conversation") from None

    def drop_last_turn(self, thread_id: str) -> str | None:
        """Remove the last question and its answer (to ask it again: regenerate); returns the
        question, or None when the thread does not end with an answer."""
        with self.turn(thread_id):  # not while a turn is adding to it
            messages = self.messages(thread_id)
            if len(messages) < 2 or not isinstance(messages[-2], HumanMessage):
                return None
            question, answer = messages[-2], messages[-1]
            if not isinstance(answer, AIMessage):
                return None
            try:  # add_messages deletes by id: one new checkpoint without the two
                self.graph.update_state(
                    thread_config(thread_id),
                    {"messages": [RemoveMessage(id=question.id), RemoveMessage(id=answer.id)]},
                    as_node="respond",
                )
            except sqlite3.Error as e:
                raise store_error(self.path, e, "remove the last answer") from None
            return question.text

    def export(self, thread_id: str, fmt: str = "json") -> str:
        """The thread as JSON (`export_json`) or markdown (`export_markdown`)."""
        messages, title = self.messages(thread_id), self.title(thread_id)
        if fmt == "json":
            return export_json(thread_id, title, messages)
        if fmt == "markdown":
            return export_markdown(title, messages)
        raise ValueError(f"unknown export format {fmt!r}: json or markdown")

    def close(self) -> None:
        self.checkpointer.conn.close()


def refuse_foreign_database(path: Path, timeout: float = 5.0) -> None:
    """Refuse, before anything writes to it, a SQLite file that is not a chat database: one with
    tables other than LangGraph's checkpointer's and ours (OUR_TABLES), or ours with other
    columns. A new path, an empty file and a chat database are fine. Read through a read-only
    connection, so another application's file is left exactly as it was."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    # Read-only; first as immutable (no lock, and no -shm/-wal files created beside a WAL
    # database), unless a writer is at work on it now (its -wal exists), or that read failed (a
    # writer changing it under us): then with locks, through the files the writer made.
    active = path.with_name(path.name + "-wal").exists()
    for mode in ("mode=ro",) if active else ("immutable=1", "mode=ro"):
        try:
            foreign, wrong = _tables_of(path, mode, timeout)
            break
        except sqlite3.Error as e:
            if mode == "mode=ro":
                raise store_error(path, e, "open the chat database") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        wrong = f"it holds another application's tables ({shown})"
    if wrong:
        raise ChatStoreError(
            f"{path}: not a chat database: {wrong}; nothing was changed. Pass --db a new file "
            "name (or a chat database) instead"
        )


def _tables_of(path: Path, mode: str, timeout: float) -> tuple[list[str], str | None]:
    """(its tables and views that are not ours, what is wrong with one of ours) of a SQLite
    file, opened with the URI parameter `mode`."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, timeout=timeout)
    try:
        tables = conn.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        foreign = [name for name, _ in tables if name not in OUR_TABLES]
        wrong = None
        for name, kind in tables:
            if foreign or wrong or name not in OUR_TABLES:
                continue
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({name!r})")}
            missing = sorted(OUR_TABLES[name] - have)
            if kind != "table":
                wrong = f"its {name!r} is a view, where a chat database has a table"
            elif missing:
                columns = "column" if len(missing) == 1 else "columns"
                wrong = f"its table {name!r} has no {columns} {', '.join(missing)}"
    finally:
        conn.close()
    return foreign, wrong


def thread_config(thread_id: str) -> dict:
    return {"configurable": {"thread_id": thread_id}}


@dataclass
class ThreadInfo:
    """One saved conversation, as the thread list shows it."""

    thread_id: str
    title: str
    updated: str  # ISO 8601 time of the last saved step ("" if unknown)
    messages: int


def thread_title(messages: list[AnyMessage], length: int = TITLE_LENGTH) -> str:
    """The first user message on one line, cut to `length` characters ("(empty)" if none)."""
    first = next((m.text for m in messages if isinstance(m, HumanMessage)), "")
    text = " ".join(first.split())
    if not text:
        return "(empty)"
    return text if len(text) <= length else text[: length - 1].rstrip() + "…"


def short_time(iso: str, now: datetime | None = None) -> str:
    """An ISO time as "14:05" today, "3 Mar 14:05" this year, else "3 Mar 2025" (local time)."""
    try:
        when = datetime.fromisoformat(iso).astimezone()
    except (TypeError, ValueError):
        return ""
    now = now or datetime.now().astimezone()
    if when.date() == now.date():
        return when.strftime("%H:%M")
    day = f"{when.day} {when.strftime('%b')}"
    return f"{day} {when.strftime('%H:%M')}" if when.year == now.year else f"{day} {when.year}"


def export_json(thread_id: str, title: str, messages: list[AnyMessage]) -> str:
    """The thread as JSON: LangChain's message dicts, so `messages_from_json` gives them back
    with their metadata (sources, token usage)."""
    return json.dumps(
        {
            "format": EXPORT_FORMAT,
            "thread": thread_id,
            "title": title,
            "messages": messages_to_dict(messages),
        },
        ensure_ascii=False,
        indent=2,
        default=str,  # metadata a provider filled with non-JSON values (dates) stays readable
    )


def messages_from_json(text: str) -> list[AnyMessage]:
    """The messages of an `export_json` file."""
    return messages_from_dict(json.loads(text)["messages"])


def export_markdown(title: str, messages: list[AnyMessage]) -> str:
    """The thread as a markdown document: a heading per message, the text as written, and the
    cited dashboard pages under each answer."""
    out = [f"# {title}", ""]
    for message in messages:
        out += ["## You" if isinstance(message, HumanMessage) else "## Assistant", ""]
        out += [message.text.strip(), ""]
        sources = message.response_metadata.get("sources") or []
        if sources:
            cited = ", ".join(f"{s.get('title', '')} (`{s.get('page', '')}`)" for s in sources)
            out += [f"*Sources: {cited}*", ""]
    return "\n".join(out)
