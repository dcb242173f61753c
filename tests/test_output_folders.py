"""Nothing lost: no command deletes or writes over what the user already had at the path it
was told to write (core.outputs).

Each command runs for real (typer's runner over the `genai-lab` app): a non-empty folder of the
user's files is refused in one line with every file left byte for byte; `--overwrite` moves it
aside to a visible DIR.old-TIMESTAMP that the command names; a file where a folder goes (and a
folder where a file goes) is refused; the command's own earlier output is still used as before.
No hidden `.NAME.old-*` or `.NAME.tmp-*` is ever left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.atomic import OutputError, atomic_directory, write_text_atomic
from core.cli import build_app
from core.outputs import claim_output_file, claim_output_folder, holds_all, jsonl_file_of

FAIL = 1
STAGES = ("pretrain", "sft", "reward", "rlhf", "pipeline", "feedback-retrain")
ROWS = [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Bye?", "response": "Bye."}]


@pytest.fixture(scope="module")
def app():
    return build_app()


def run(app, args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, expected: str) -> str:
    """Exit 1, no traceback, stderr is exactly one `error: ...` line containing `expected`."""
    assert result.exit_code == FAIL, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    return lines[0]


def user_folder(path: Path) -> Path:
    """A folder of the user's own: a thesis and notes in a subfolder."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("Chapter 1. What I found.\n")
    (path / "sub" / "notes.md").write_bytes(b"# notes\n\x00\xff binary too\n")
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself), by relative name, with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def no_hidden_leftovers(folder: Path) -> None:
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert hidden == [], hidden


def aside_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.old-*"))


def sft_args(tmp_path: Path, out: Path) -> list:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return ["sft", "--output-dir", out, "--train-file", data, "--eval-file", data,
            "--max-steps", "1", "--quiet", "--set", "batch_size=2"]  # fmt: skip


# -- merge --output ---------------------------------------------------------------------------------


def test_merge_refuses_a_folder_of_user_files(app, lora_adapter, tmp_path):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    result = run(app, ["merge", "--adapter", lora_adapter, "--output", out, "--device", "cpu"])
    line = one_line_error(
        result,
        f"{out} is not empty and was not written by genai-lab merge: pass another --output, "
        f"or --overwrite to move it aside (it is kept as {out}.old-TIMESTAMP)",
    )
    assert "tmp-" not in line
    assert snapshot(out) == before
    assert aside_copies(out) == []
    no_hidden_leftovers(tmp_path)


def test_merge_overwrite_moves_the_folder_aside_and_says_where(app, lora_adapter, tmp_path):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    args = ["merge", "--adapter", lora_adapter, "--output", out, "--device", "cpu"]
    result = run(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    [aside] = aside_copies(out)
    assert snapshot(aside) == before  # every file, byte for byte
    assert f"moved the old {out} aside to {aside}" in result.stderr
    assert (out / "merge_check.json").is_file() and (out / "config.json").is_file()
    assert not (out / "thesis.txt").exists()
    no_hidden_leftovers(tmp_path)


def test_merge_refuses_a_file_and_leaves_it_alone(app, lora_adapter, tmp_path):
    out = tmp_path / "model.txt"
    out.write_text("not a folder\n")
    result = run(app, ["merge", "--adapter", lora_adapter, "--output", out, "--device", "cpu"])
    one_line_error(result, f"{out} is a file, not a folder")
    assert out.read_text() == "not a folder\n"
    no_hidden_leftovers(tmp_path)


def test_merge_replaces_its_own_earlier_output(app, lora_adapter, tmp_path):
    out = tmp_path / "merged"
    (tmp_path / "empty").mkdir()  # an empty folder is fine too
    args = ["merge", "--adapter", lora_adapter, "--device", "cpu"]
    assert run(app, [*args, "--output", tmp_path / "empty"]).exit_code == 0
    first = run(app, [*args, "--output", out])
    assert first.exit_code == 0, first.output
    check = json.loads((out / "merge_check.json").read_text())
    again = run(app, [*args, "--output", out])  # our own folder: replaced, as before
    assert again.exit_code == 0, again.output
    assert json.loads((out / "merge_check.json").read_text()) == check
    assert aside_copies(out) == [] and "moved" not in again.stderr
    no_hidden_leftovers(tmp_path)


# -- the training stages' --output-dir --------------------------------------------------------------


def stage_args(command: str, out: Path, tmp_path: Path) -> list:
    if command == "feedback-retrain":
        db = tmp_path / "feedback.db"
        db.touch()
        return [command, "--db", db, "--output-dir", out]
    if command == "rlhf":  # (PPO's config needs a reward model first)
        return [command, "--method", "dpo", "--output-dir", out]
    return [command, "--output-dir", out]


@pytest.mark.parametrize("command", STAGES)
def test_stages_refuse_a_folder_of_user_files(app, tmp_path, command):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    result = run(app, stage_args(command, out, tmp_path))
    one_line_error(
        result,
        f"{out} is not empty and was not written by genai-lab {command}: pass another "
        f"--output-dir, or --overwrite to move it aside (it is kept as {out}.old-TIMESTAMP)",
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["sub", "thesis.txt"]


@pytest.mark.parametrize("command", STAGES)
def test_stages_refuse_a_file_as_output_dir(app, tmp_path, command):
    out = tmp_path / "thesis.txt"
    out.write_text("mine\n")
    result = run(app, stage_args(command, out, tmp_path))
    one_line_error(result, f"{out} is a file, not a folder")
    assert out.read_text() == "mine\n"


def test_overwrite_with_resume_is_refused(app, tmp_path):
    out = user_folder(tmp_path / "out")
    result = run(app, ["sft", "--output-dir", out, "--resume", "--overwrite"])
    one_line_error(result, "--overwrite starts afresh")
    assert (out / "thesis.txt").is_file() and aside_copies(out) == []


def test_sft_own_folder_as_before_and_overwrite_keeps_the_old_run(app, tmp_path):
    out = tmp_path / "run"
    args = sft_args(tmp_path, out)
    first = run(app, args)
    assert first.exit_code == 0, first.output
    # Its own folder: the checkpoint rule as before (continue with --resume only).
    one_line_error(run(app, args), f"{out} already has checkpoints: pass --resume")
    assert run(app, [*args, "--resume"]).exit_code == 0
    before = snapshot(out)
    fresh = run(app, [*args, "--overwrite"])  # a fresh run; the old one kept, and named
    assert fresh.exit_code == 0, fresh.output
    [aside] = aside_copies(out)
    assert snapshot(aside) == before
    assert f"moved the old {out} aside to {aside}" in fresh.stderr
    assert (out / "config.yaml").is_file() and (out / "final" / "config.json").is_file()
    no_hidden_leftovers(tmp_path)


def test_sft_overwrite_moves_user_files_aside_then_trains(app, tmp_path):
    out = user_folder(tmp_path / "run")
    before = snapshot(out)
    result = run(app, [*sft_args(tmp_path, out), "--overwrite"])
    assert result.exit_code == 0, result.output
    [aside] = aside_copies(out)
    assert snapshot(aside) == before and not (out / "thesis.txt").exists()


def test_pretrain_ship_name_is_checked_before_training(app, tmp_path):
    out = tmp_path / "run"
    result = run(app, ["pretrain", "--output-dir", out, "--ship", "../../elsewhere"])
    one_line_error(result, "--ship: got '../../elsewhere', must be a plain folder name")
    assert not out.exists()


# -- bench --output FILE ----------------------------------------------------------------------------


class FakeSection:
    """A `genai_lab.bench` entry point that measures nothing (instantly)."""

    name = "core"

    def load(self):
        return lambda quick, echo: {"tokens_per_s": 1.0}


@pytest.fixture
def fake_bench(monkeypatch):
    import core.commands.bench

    monkeypatch.setattr(core.commands.bench, "entry_points", lambda group: [FakeSection()])


def test_bench_refuses_a_file_that_is_not_a_bench_report(app, tmp_path, fake_bench):
    out = tmp_path / "results.json"
    out.write_text('{"my": "own data"}\n')
    one_line_error(
        run(app, ["bench", "--output", out]),
        f"{out} exists and was not written by genai-lab bench: pass another --output, or "
        "--overwrite to move it aside",
    )
    assert out.read_text() == '{"my": "own data"}\n'
    no_hidden_leftovers(tmp_path)


def test_bench_replaces_its_own_report_and_overwrite_keeps_others(app, tmp_path, fake_bench):
    out = tmp_path / "results.json"
    assert run(app, ["bench", "--output", out]).exit_code == 0  # new
    report = json.loads(out.read_text())
    assert report["core"] == {"tokens_per_s": 1.0} and set(report) == {"machine", "core"}
    again = run(app, ["bench", "--output", out])  # its own report: replaced
    assert again.exit_code == 0 and aside_copies(out) == []
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("a user's file\n")
    result = run(app, ["bench", "--output", theirs, "--overwrite"])
    assert result.exit_code == 0, result.output
    [aside] = aside_copies(theirs)
    assert aside.read_text() == "a user's file\n" and str(aside) in result.stderr
    assert json.loads(theirs.read_text())["core"] == {"tokens_per_s": 1.0}
    no_hidden_leftovers(tmp_path)


def test_bench_output_folder_is_one_line(app, tmp_path, fake_bench):
    one_line_error(run(app, ["bench", "--output", tmp_path]), f"{tmp_path} is a folder")


# -- bot data --output FILE -------------------------------------------------------------------------


def test_bot_data_output_folder_names_it_not_a_temp_file(app, tmp_path):
    line = one_line_error(
        run(app, ["bot", "data", "--output", tmp_path]), f"{tmp_path} is a folder"
    )
    assert "tmp-" not in line
    no_hidden_leftovers(tmp_path)


def test_bot_data_refuses_a_file_of_the_users(app, tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text('{"question": "mine"}\n')
    line = one_line_error(
        run(app, ["bot", "data", "--output", out]),
        f"{out} exists and was not written by genai-lab bot data: pass another --output",
    )
    assert out.read_text() == '{"question": "mine"}\n'
    # The line offers --overwrite only where `bot data` has that flag (chat/cli.py passes it on).
    offered = "--overwrite" in run(app, ["bot", "data", "--help"]).output
    assert ("--overwrite" in line) == offered, line


@pytest.fixture
def fake_bot_data(monkeypatch):
    """write_training_data without loading SmolLM2 or MiniLM: two fixed chat rows."""
    import chat.bot
    import chat.local_model

    class FakeModel:
        def __init__(self, model):
            pass

        def load(self):
            return None, None

        def count_tokens(self, text):
            return len(text.split())

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    monkeypatch.setattr(chat.local_model, "ChatLocalModel", FakeModel)
    monkeypatch.setattr(chat.local_model, "context_window", lambda lm, tok: 512)
    monkeypatch.setattr(chat.bot, "ConceptRetriever", lambda **kwargs: None)
    monkeypatch.setattr(chat.bot, "training_rows", lambda *args, **kwargs: rows * 2)
    return chat.bot.write_training_data


def test_bot_data_replaces_its_own_rows_and_overwrite_keeps_others(tmp_path, fake_bot_data):
    out = tmp_path / "train.jsonl"
    assert fake_bot_data(out) == 2  # new
    assert fake_bot_data(out) == 2 and aside_copies(out) == []  # its own rows: replaced
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text('{"a": 1}\n')
    with pytest.raises(OutputError, match="--overwrite to move it aside"):
        fake_bot_data(theirs, overwrite=False)
    assert fake_bot_data(theirs, overwrite=True) == 2
    [aside] = aside_copies(theirs)
    assert aside.read_text() == '{"a": 1}\n'
    no_hidden_leftovers(tmp_path)


# -- the rule itself, and the atomic swap under it --------------------------------------------------


def test_claims_use_empty_and_missing_paths_and_refuse_links_to_nothing(tmp_path):
    own = holds_all("config.json")
    assert claim_output_folder(tmp_path / "new", "merge", own) is None
    (tmp_path / "empty").mkdir()
    assert claim_output_folder(tmp_path / "empty", "merge", own) is None
    (tmp_path / "empty.txt").touch()
    assert claim_output_file(tmp_path / "empty.txt", "bench", lambda p: False) is None
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="broken link"):
        claim_output_folder(tmp_path / "dangling", "merge", own)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, so"):
        claim_output_folder(tmp_path / "file" / "out", "merge", own)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": []}\n')
    assert jsonl_file_of(lambda r: "messages" in r)(rows)
    assert not jsonl_file_of(lambda r: "messages" in r)(tmp_path / "empty.txt")


def test_atomic_directory_never_replaces_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("a user's file\n")
    with pytest.raises(OutputError, match="is a file, not a folder"), atomic_directory(target):
        pass
    assert target.read_text() == "a user's file\n"
    no_hidden_leftovers(tmp_path)


def test_atomic_directory_keeps_what_is_not_its_own_visibly(tmp_path, capsys):
    target = user_folder(tmp_path / "out")
    before = snapshot(target)
    with atomic_directory(target, own=holds_all("config.json")) as tmp:
        (tmp / "config.json").write_text("{}")
    [aside] = aside_copies(target)
    assert snapshot(aside) == before and str(aside) in capsys.readouterr().err
    with atomic_directory(target, own=holds_all("config.json")) as tmp:  # its own: replaced
        (tmp / "config.json").write_text('{"v": 2}')
    assert aside_copies(target) == [aside] and (target / "config.json").read_text() == '{"v": 2}'
    no_hidden_leftovers(tmp_path)


def test_write_text_atomic_on_a_folder_names_the_folder(tmp_path):
    with pytest.raises(OutputError, match=f"{tmp_path} is a folder, not a file"):
        write_text_atomic(tmp_path, "text")
    no_hidden_leftovers(tmp_path)


# -- finetune --output-dir --------------------------------------------------------------------------

FINETUNE_DATA = Path(__file__).resolve().parent.parent / "finetune/examples/data"


def test_finetune_refuses_a_folder_of_user_files_before_any_model_loads(app, tmp_path):
    out = user_folder(tmp_path / "run")
    before = snapshot(out)
    args = ["finetune", "--model", "tutor-base", "--data", FINETUNE_DATA / "tutor_chat.jsonl",
            "--output-dir", out, "--max-steps", "1", "--quiet"]  # fmt: skip
    one_line_error(
        run(app, args),
        f"{out} is not empty and was not written by genai-lab finetune: pass another "
        "--output-dir, or --overwrite to move it aside",
    )
    assert snapshot(out) == before
    assert aside_copies(out) == []
    one_line_error(run(app, [*args, "--overwrite", "--resume"]), "pass one of them")
    assert snapshot(out) == before


def test_bot_eval_refuses_a_file_that_is_not_its_own_before_measuring(app, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": 1}\n')
    result = run(app, ["bot", "eval", "--setup", "1", "--every", "50", "--output", mine])
    one_line_error(result, f"{mine} exists and was not written by genai-lab bot eval")
    assert mine.read_text() == '{"mine": 1}\n'
