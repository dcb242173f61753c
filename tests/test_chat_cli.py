"""`genai-lab chat` in real processes (memory across processes, the REPL through stdin, Ctrl-C, a
LoRA adapter, bad input) and the dashboard's chat page (Streamlit AppTest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import typer

import chat.session  # noqa: F401  (import the package before AppTest puts pages/ first on sys.path)
from chat.chain import default_system_prompt
from chat.cli import register
from chat.conversations import ChatStore
from chat.local_model import load_local_model
from chat.providers import default_chat_model, load_chat_model
from core import save_model
from core.lm.chat_format import stop_ids
from core.lm.model import GPT, GPTConfig
from core.lm.sampling import SamplingParams

STORY = "Once upon a time, there was a little rabbit named Ben."  # the base model runs on

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def genai_lab_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=ROOT,
    )


def chat_in_process(*args: str, stdin: str | None = None):
    """The same command run in this process (typer's CliRunner): for quick checks. Its stdin
    is not a terminal (a script), unless a test patches `chat.cli._stdin_is_terminal`."""
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so typer keeps "chat" as a subcommand
    return CliRunner().invoke(app, ["chat", *args], input=stdin)


def assert_one_line_error(result, text: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr


@pytest.mark.slow
def test_once_in_two_processes_then_history(tmp_path):
    db = str(tmp_path / "chat.sqlite")
    common = ["--db", db, "--thread", "demo", "--model", "tutor-base", "--seed", "0"]
    first = genai_lab_chat(*common, "--once", "What is a token?")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("tutor-base> ")
    assert "sources: Tokens (dashboard page: tokens)" in first.stderr  # grounding is on
    second = genai_lab_chat(*common, "--no-retrieval", "--once", "And what is LoRA?")
    assert second.returncode == 0, second.stderr
    assert "sources:" not in second.stderr
    history = chat_in_process("--db", db, "--thread", "demo", "--history")
    lines = history.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["user", "assistant"] * 2
    assert lines[0] == "user: What is a token?" and lines[2] == "user: And what is LoRA?"
    assert lines[1] == "assistant: " + first.stdout.removeprefix("tutor-base> ").strip()
    assert ChatStore(db).messages("someone-else") == []  # (the REPL test runs --history on one)


@pytest.mark.slow
def test_repl_commands_and_bad_input_through_stdin(tmp_path):
    db = tmp_path / "chat.sqlite"
    lines = [
        "What is a token?",
        "",  # ignored
        "/model tutor-base",
        "/bogus",
        "word " * 200,  # longer than the context
        "/model no/such/model",
        "/history",
        "/reset",
        "/history",
        "hello",
        "/help",
        "/quit",
        "this is never read",
    ]
    proc = genai_lab_chat(
        "--db", str(db), "--thread", "r", "--no-retrieval", "--model", "tutor",
        stdin="\n".join(lines) + "\n",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # input from a pipe with failed lines: a script
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().endswith("3 of 11 lines failed (exit code 1)")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "unknown command /bogus" in errors[0]
    assert "the message is" in errors[1] and "tokens" in errors[1]
    assert "unknown model 'no/such/model'" in errors[2]
    out = proc.stdout
    assert "model: tutor-base (core)" in out
    assert out.count("user: What is a token?") == 1  # /history before the reset
    assert "thread 'r' is empty now" in out and "has no messages" in proc.stderr
    assert "/quit" in out  # /help was printed
    messages = ChatStore(db).messages("r")  # the bad lines left no trace; "hello" is saved
    assert [m.text for m in messages][:1] == ["hello"] and len(messages) == 2


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random GPT with a 4,096-token context that never ends its turn (the stop tokens' logits
    are 0, below every top-50 logit): a long answer to interrupt."""
    _, tokenizer = load_local_model("tutor-base")
    config = GPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[stop_ids(tokenizer)] = 0
    return save_model(model, tmp_path_factory.mktemp("slow") / "slow", tokenizer=tokenizer)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_program(tmp_path, slow_model):
    db = tmp_path / "chat.sqlite"
    args = ["--model", str(slow_model), "--db", str(db), "--thread", "c", "--no-retrieval"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "chat", *args, "--top-k", "50", "--max-tokens", "2000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")))
    reader.start()
    proc.stdin.write("tell me a long story\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 240
    while len("".join(out).partition("slow> ")[2]) < 20:  # the answer is streaming
        assert proc.poll() is None and time.monotonic() < deadline, "".join(out)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("/history\n/quit\n")
    proc.stdin.flush()
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0  # the program went on and left through /quit
    reader.join()
    stderr = proc.stderr.read()
    text = "".join(out)
    assert "Traceback" not in stderr
    assert "[stopped]" in text
    assert "assistant: " in text and text.rstrip().endswith("[stopped]")  # /history marks it
    saved = ChatStore(db).messages("c")[-1]
    assert saved.response_metadata["interrupted"] and saved.text
    _, tokenizer = load_local_model(str(slow_model))
    assert len(tokenizer.encode(saved.text)) < 1000  # stopped long before its 2,000 tokens


@pytest.mark.slow
def test_a_lora_adapter_chats_through_the_cli(tmp_path, lora_adapter):
    adapter = lora_adapter
    db = str(tmp_path / "chat.sqlite")
    args = [
        "--db",
        db,
        "--no-retrieval",
        "--system",
        "",
        "--temperature",
        "0",
        "--max-tokens",
        "30",
    ]
    proc = genai_lab_chat(*args, "--model", f"tutor-base+{adapter}", "--once", STORY)
    assert proc.returncode == 0, proc.stderr
    backend = load_chat_model(f"tutor-base+{adapter}", SamplingParams(temperature=0, max_tokens=30))
    expected = backend.chat_model.invoke(STORY).content.strip()
    assert proc.stdout.strip() == f"lora> {expected}"
    history = chat_in_process("--db", db, "--history")
    assert history.stdout.splitlines()[1] == f"assistant: {expected}"


def test_once_prints_the_bots_refusal(tmp_path):
    """With --abstain, a question no concept note is near gets the bot's fixed refusal instead
    of the model's answer: --once prints it (it is not streamed token by token) and saves it."""
    db = str(tmp_path / "chat.sqlite")
    args = ["--db", db, "--model", "tutor-base", "--abstain"]
    result = chat_in_process(*args, "--once", "Name three primary colors.")
    assert result.exit_code == 0, result.output
    saved = ChatStore(db).messages("default")[-1].text
    assert "can't answer" in saved
    assert result.stdout.strip() == f"tutor-base> {saved}"


def test_repl_exit_code_terminal_or_script(tmp_path, monkeypatch):
    """A failed line (a message longer than the context, an unknown command) is reported and the
    REPL goes on, in a terminal and from a pipe; a terminal session left with /quit exits 0, a
    script with a failed line exits 1 at its end, one without exits 0."""
    import chat.cli

    args = ["--db", str(tmp_path / "chat.sqlite"), "--no-retrieval", "--model", "tutor-base"]
    lines = "word " * 200 + "\n/bogus\n/help\n/quit\nnever read\n"
    script = chat_in_process(*args, stdin=lines)
    assert script.exit_code == 1, script.output
    assert isinstance(script.exception, SystemExit)
    errors = [line for line in script.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, script.stderr
    assert "the message is 207 tokens" in errors[0] and "unknown command /bogus" in errors[1]
    assert "/quit" in script.stdout  # /help ran after the failures: the REPL went on
    assert script.stderr.rstrip().endswith("2 of 4 lines failed (exit code 1)")
    clean = chat_in_process(*args, stdin="/help\n/quit\n")
    assert clean.exit_code == 0, clean.output
    monkeypatch.setattr(chat.cli, "_stdin_is_terminal", lambda: True)
    terminal = chat_in_process(*args, stdin=lines)
    assert terminal.exit_code == 0, terminal.output  # the person saw the errors, then /quit
    assert len([x for x in terminal.stderr.splitlines() if x.startswith("error:")]) == 2
    assert "lines failed" not in terminal.stderr
    assert "Exit code: 1 if --once's message fails" in " ".join(
        chat_in_process("--help").stdout.split()
    )


def test_cli_bad_input_is_one_line_and_exit_1(tmp_path):
    db = str(tmp_path / "a.sqlite")
    assert_one_line_error(chat_in_process("--db", db, "--model", "tutr"), "unknown model 'tutr'")
    assert_one_line_error(chat_in_process("--db", db, "--once", " "), "empty message")
    both = chat_in_process("--db", db, "--once", "hi", "--history")
    assert_one_line_error(both, "do not go together")
    assert_one_line_error(chat_in_process("--db", db, "--max-tokens", "0"), "at least 1")
    assert_one_line_error(chat_in_process("--db", db, "--temperature", "-1"), "temperature")
    assert_one_line_error(chat_in_process("--db", db, "--grounding", "maybe"), "unknown grounding")
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_text("not a database\n" * 50)
    assert_one_line_error(chat_in_process("--db", str(corrupt), "--history"), "not a database")
    assert corrupt.read_text() == "not a database\n" * 50  # untouched
    assert_one_line_error(chat_in_process("--db", str(tmp_path), "--history"), "is a folder")


# ---------------------------------------------------------------------------------------------
# the dashboard's chat page


@pytest.mark.slow
def test_dashboard_chat_page_answers_cites_and_remembers(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GENAI_LAB_CHAT_DB", str(tmp_path / "chat.sqlite"))
    page = str(ROOT / "dashboard" / "views" / "chat.py")
    at = AppTest.from_file(page, default_timeout=60).run()
    assert not at.exception
    assert at.text_area[0].value == default_system_prompt(default_chat_model())
    assert not at.chat_message  # a new conversation
    at.chat_input[0].set_value("What is a token?").run()
    assert not at.exception
    user, assistant = at.chat_message
    assert user.markdown[0].value == "What is a token?"
    assert any("**Tokens** (dashboard page `tokens`)" in c.value for c in assistant.caption)
    assert len(assistant.dataframe) == 1  # the token inspector's table
    # A new visitor (a new session) sees the saved conversation.
    again = AppTest.from_file(page, default_timeout=60).run()
    assert not again.exception
    assert [m.name for m in again.chat_message] == ["user", "assistant"]
    # Turning retrieval off: no citation under the next answer.
    again.radio[0].set_value("off").run()
    again.chat_input[0].set_value("hello there").run()
    assert not again.exception
    last = again.chat_message[-1]
    assert not any("Sources" in c.value for c in last.caption)
    assert len(ChatStore(tmp_path / "chat.sqlite").messages("dashboard")) == 4
