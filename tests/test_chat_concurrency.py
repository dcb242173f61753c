"""Several writers on one conversation (dashboard tabs sharing a store, separate stores, separate
`genai-lab chat` processes) keep every turn, each writer's in order, with the real tutor model."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chat.conversations import ChatStore, ChatStoreError
from chat.providers import ChatBackend, load_chat_model
from chat.session import ChatSession
from core.lm.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TURNS = 8  # per writer

# One writer in its own process: loads the model, says so, waits for the start signal.
WRITER = """
import sys
from chat.conversations import ChatStore
from chat.providers import load_chat_model
from chat.session import ChatSession
from core.lm.sampling import SamplingParams

db, name, turns = sys.argv[1], sys.argv[2], int(sys.argv[3])
backend = load_chat_model("tutor", SamplingParams(temperature=0, max_tokens=4))
session = ChatSession(ChatStore(db), backend, thread_id="shared")
print("ready", flush=True)
sys.stdin.readline()
for i in range(turns):
    pieces = []
    result = session.ask(f"{name} turn {i}: what is a token?", on_text=pieces.append)
    assert "".join(pieces) == result.answer, (pieces, result.answer)
"""


@pytest.fixture(scope="module")
def tutor() -> ChatBackend:
    return load_chat_model("tutor", SamplingParams(temperature=0, max_tokens=4))


def write_turns(session: ChatSession, name: str, start: threading.Barrier | threading.Event):
    start.wait()
    for i in range(TURNS):
        pieces: list[str] = []
        result = session.ask(f"{name} turn {i}: what is a token?", on_text=pieces.append)
        assert "".join(pieces) == result.answer  # streaming still streams the saved answer


def run_writers(targets: list[tuple]) -> None:
    """Run each (session, name, start) writer in a thread; fail on any writer's error."""
    errors: list[BaseException] = []

    def run(*args) -> None:
        try:
            write_turns(*args)
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=args) for args in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def assert_every_turn_kept(store: ChatStore, names: list[str]) -> None:
    messages = store.messages("shared")
    assert len(messages) == 2 * TURNS * len(names)
    # Every question is followed by its own answer: no turn was interleaved with another.
    assert [m.type for m in messages] == ["human", "ai"] * (TURNS * len(names))
    questions = [m.text for m in messages[::2]]
    for name in names:
        mine = [q for q in questions if q.startswith(f"{name} turn ")]
        assert mine == [f"{name} turn {i}: what is a token?" for i in range(TURNS)]
    # One line of checkpoints: no turn went into a fork that the thread no longer shows.
    parents = [
        snap.parent_config["configurable"]["checkpoint_id"]
        for snap in store.graph.get_state_history({"configurable": {"thread_id": "shared"}})
        if snap.parent_config
    ]
    assert len(parents) == len(set(parents))


def test_tabs_and_stores_in_one_process_keep_every_turn_in_order(tmp_path, tutor):
    db = tmp_path / "chat.sqlite"
    shared = ChatStore(db)  # the dashboard: one store, a session per tab
    own = [ChatStore(db), ChatStore(db)]  # separate stores on the same file
    sessions = [ChatSession(shared, tutor, thread_id="shared") for _ in range(2)]
    sessions += [ChatSession(store, tutor, thread_id="shared") for store in own]
    names = [f"w{i}" for i in range(len(sessions))]
    start = threading.Barrier(len(sessions))
    run_writers([(s, name, start) for s, name in zip(sessions, names, strict=True)])
    assert_every_turn_kept(ChatStore(db), names)


def test_processes_writing_one_conversation_keep_every_turn_in_order(tmp_path, tutor):
    db = tmp_path / "chat.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), "child", str(TURNS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout.readline() == "ready\n", child.communicate(timeout=60)[1]
        start = threading.Event()
        store = ChatStore(db)  # and two writers in this process, at the same time
        writers = [(ChatSession(store, tutor, "shared"), name, start) for name in ("me0", "me1")]
        here = threading.Thread(target=run_writers, args=(writers,))
        here.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        start.set()
        _, err = child.communicate(timeout=120)
        here.join(timeout=120)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
    assert_every_turn_kept(ChatStore(db), ["child", "me0", "me1"])


def test_a_held_conversation_waits_or_fails_in_one_line_and_others_go_on(tmp_path, tutor):
    db = tmp_path / "chat.sqlite"
    first = ChatSession(ChatStore(db), tutor, thread_id="shared")
    answering = first.stream("What is a token?")
    shown = next(answering)  # mid-answer: the thread is held until the turn is saved
    impatient = ChatSession(ChatStore(db, turn_timeout=0.2), tutor, thread_id="shared")
    with pytest.raises(ChatStoreError, match="still busy") as info:
        impatient.ask("hello")
    assert str(db) in str(info.value) and "\n" not in str(info.value)
    other = ChatSession(impatient.store, tutor, thread_id="other")
    assert other.ask("hello").answer  # another conversation is not held up
    # The reader leaves part-way (a closed tab): the part shown is saved, the thread is free.
    answering.close()
    question, answer = impatient.history()
    assert question.text == "What is a token?" and answer.text.startswith(shown)
    assert impatient.ask("hello").answer
    assert [m.text for m in first.history()][::2] == ["What is a token?", "hello"]
    # Another process in the middle of a turn (its lock file held): the same clear error.
    lock_files = sorted(impatient.store.lock_dir.iterdir())
    assert len(lock_files) == 2  # one per conversation
    held = [open(path) for path in lock_files]  # noqa: SIM115  (closed below)
    try:
        for f in held:
            fcntl.flock(f, fcntl.LOCK_EX)
        for session in (impatient, other):
            with pytest.raises(ChatStoreError, match="still busy"):
                session.ask("hello")
    finally:
        for f in held:
            f.close()
    assert [m.text for m in first.history()][::2] == ["What is a token?", "hello"]
    # Reset takes the thread like a turn (never under one in progress), then it is gone.
    impatient.reset()
    assert first.history() == []
