"""The conversation database refuses a SQLite file that belongs to another application before
writing anything to it (chat.conversations.refuse_foreign_database), and opens its own files,
new paths and empty files as before."""

from __future__ import annotations

import sqlite3

import pytest

from chat.conversations import ChatStore, ChatStoreError


def make_db(path, *statements: str, wal: bool = False) -> bytes:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path.read_bytes()


def test_new_path_empty_file_and_our_own_database_open(tmp_path):
    new = tmp_path / "sub" / "new.sqlite"
    ChatStore(new).close()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    store = ChatStore(empty)
    store.rename("t", "a title")
    store.close()
    again = ChatStore(empty)  # ours now: LangGraph's tables and chat_titles
    assert again.title("t") == "a title"
    while_open = ChatStore(empty)  # a second store while the first is open (WAL in use)
    assert while_open.title("t") == "a title"
    while_open.close()
    again.close()


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_another_applications_database_is_refused_untouched(tmp_path, wal):
    path = tmp_path / "app.sqlite"
    before = make_db(
        path,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
        "CREATE TABLE checkpoints (thread_id, checkpoint_ns, checkpoint_id, checkpoint, metadata)",
        wal=wal,
    )
    with pytest.raises(ChatStoreError) as e:
        ChatStore(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not a chat database: it holds another application's")
    assert "(users)" in message and "nothing was changed" in message
    assert "\n" not in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite"]  # no -wal, -shm


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("CREATE TABLE checkpoints (id INTEGER)", "its table 'checkpoints' has no columns"),
        (
            "CREATE TABLE chat_titles (thread_id TEXT)",
            "its table 'chat_titles' has no column title",
        ),
        ("CREATE VIEW writes AS SELECT 1 AS thread_id", "its 'writes' is a view"),
    ],
    ids=["checkpoints", "chat_titles", "view"],
)
def test_tables_named_like_ours_but_not_ours_are_refused(tmp_path, statement, expected):
    path = tmp_path / "lookalike.sqlite"
    before = make_db(path, statement)
    with pytest.raises(ChatStoreError, match=expected):
        ChatStore(path)
    assert path.read_bytes() == before


def test_a_file_that_is_not_sqlite_is_still_named(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database\n" * 50)
    with pytest.raises(ChatStoreError, match="cannot open the chat database"):
        ChatStore(path)
    assert path.read_text() == "not a database\n" * 50
