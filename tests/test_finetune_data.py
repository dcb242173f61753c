"""The pre-flight linter and the rendering: every kind of bad row is caught with its line, every
format and file type is read, and the loss mask covers exactly the answers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.chat_format import stop_ids
from core.models import resolve_model_path
from finetune.config import FinetuneConfig
from finetune.data import DataError
from finetune.lint import check_file
from finetune.modeling import load_tokenizer
from finetune.render import DEFAULT_CHAT_TEMPLATE, encode, ensure_chat_template
from finetune.train import prepare_data

EXAMPLES = Path(__file__).parents[1] / "finetune" / "examples" / "data"
BROKEN = EXAMPLES / "broken.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("tutor-base")
    ensure_chat_template(tok)
    return tok


def issues_by_line(check) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for issue in check.issues:
        line = int(issue.where.rsplit(":", 1)[1].removeprefix("row "))
        found.setdefault(line, []).append(str(issue))
    return found


def test_linter_catches_every_kind_of_bad_row_with_its_line(tokenizer):
    check = check_file(BROKEN, tokenizer, max_length=128)
    found = issues_by_line(check)
    expected = {
        2: "invalid JSON",
        3: "messages: missing field",
        4: "messages: wrong type: expected an array of messages, got string",
        5: "messages[1].content: empty completion",
        6: "messages[1].role: unknown role 'bot'",
        7: "the last turn is 'user': a conversation must end with an assistant turn",
        8: "longer than max_length 128",
        9: "not valid UTF-8 (byte 0xe9",
        10: "warning: duplicate of line 1",
        11: "messages[0].content: wrong type: expected a string, got number",
    }
    assert set(found) == set(expected)
    for line, text in expected.items():
        assert len(found[line]) == 1 and text in found[line][0], (line, found[line])
        assert found[line][0].startswith(f"{BROKEN}:{line}: ")
    assert check.format == "messages" and check.detected
    assert [r.where for r in check.good_rows] == [f"{BROKEN}:{n}" for n in (1, 10, 12)]
    assert check.over_length == 1


def test_alpaca_and_prompt_completion_rows_are_checked(tmp_path, tokenizer):
    rows = [
        {"instruction": "What is a lamb?", "input": "", "output": "A lamb is a young sheep."},
        {"instruction": "What is a foal?"},
        {"instruction": 7, "output": "Seven."},
        {"instruction": "Say nothing.", "output": ""},
        {"instruction": "Name a fruit.", "input": None, "output": "A banana."},
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = issues_by_line(check_file(path, tokenizer))
    assert found == {
        2: [f"{path}:2: output: missing field"],
        3: [f"{path}:3: instruction: wrong type: expected a string, got number"],
        4: [f"{path}:4: output: empty completion"],
    }
    csv_path = tmp_path / "pc.csv"
    csv_path.write_text('prompt,completion\nHi,Hello.\n"multi\nline",\nonly one column\n')
    check = check_file(csv_path, tokenizer)
    assert check.format == "prompt_completion"
    assert issues_by_line(check) == {
        3: [f"{csv_path}:3: completion: empty completion"],  # the row starts on line 3
        5: [f"{csv_path}:5: has 1 columns, the header has 2"],
    }


def test_json_array_rows_know_their_lines_and_bad_json_stops_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"text": "The cat sat on the mat."},\n\n  {"text": 5}\n]\n')
    check = check_file(path, tokenizer)
    assert check.format == "text"
    assert issues_by_line(check) == {
        4: [f"{path}:4: text: wrong type: expected a string, got number"]
    }
    path.write_text('[\n  {"text": "ok"},\n  {"text": "broken"\n  {"text": "x"}\n]\n')
    found = issues_by_line(check_file(path, tokenizer))
    assert list(found) == [3] and "invalid JSON" in found[3][0]


def test_every_example_file_is_valid_and_its_format_detected(tokenizer):
    formats = {
        "tutor_chat.jsonl": "messages",
        "tutor_alpaca.json": "alpaca",
        "tutor_prompt_completion.csv": "prompt_completion",
        "tutor_text.parquet": "text",
    }
    for name, fmt in formats.items():
        check = check_file(EXAMPLES / name, tokenizer, max_length=128)
        assert check.format == fmt, name
        assert not check.issues, [str(i) for i in check.issues]
        assert len(check.examples) == len(check.rows) >= 16


def test_parquet_rows_are_numbered(tmp_path, tokenizer):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "A cat."}, {"text": ""}]), path)
    assert issues_by_line(check_file(path, tokenizer)) == {2: [f"{path}:row 2: text: empty"]}


def test_unknown_format_and_files_are_one_line_errors(tmp_path, tokenizer):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(
        DataError, match=r"cannot tell the format from the columns \(answer, question\)"
    ):
        check_file(path, tokenizer)
    (tmp_path / "x.txt").write_text("some text")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        check_file(tmp_path / "x.txt", tokenizer)
    with pytest.raises(DataError, match="dataset file not found"):
        check_file(tmp_path / "missing.jsonl", tokenizer)


def test_assistant_mask_equals_the_templates_generation_mask(tokenizer):
    """Our prefix rendering finds the same answer tokens as transformers'
    return_assistant_tokens_mask on the tutor template's {% generation %} blocks."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A token is a piece of text."},
        {"role": "user", "content": "And a tokenizer?"},
        {"role": "assistant", "content": "It splits text into tokens. 😀"},
    ]
    ours = encode(tokenizer, conversation)
    reference = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ours.input_ids == list(reference["input_ids"])
    assert ours.trained == [bool(m) for m in reference["assistant_masks"]]
    assert 0 < ours.num_trained < len(ours.input_ids)
    assert encode(tokenizer, conversation, train_on_prompt=True).num_trained == len(ours.input_ids)


def test_default_template_for_models_without_one(tokenizer):
    tok = load_tokenizer("tutor-base")
    tok.chat_template = None
    assert ensure_chat_template(tok) == "default" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": "What is a lamb?"},
        {"role": "assistant", "content": "A lamb is a young sheep."},
    ]
    encoded = encode(tok, conversation)
    trained = tok.decode([t for t, m in zip(encoded.input_ids, encoded.trained, strict=True) if m])
    assert trained == "A lamb is a young sheep." + tok.eos_token
    assert stop_ids(tok) == [tok.eos_token_id]
    # the tutor's own template ends answers with <|end|>, which generation must stop at
    assert tokenizer.convert_tokens_to_ids("<|end|>") in stop_ids(tokenizer)


def test_skip_invalid_writes_rejects_and_keeps_the_rest(tmp_path):
    cfg = FinetuneConfig(data=str(BROKEN), output_dir=str(tmp_path), skip_invalid=True)
    lines: list[str] = []
    data = prepare_data(cfg, lines.append)
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in rejects] == [str(n) for n in range(2, 10)] + [
        "11"
    ]
    assert rejects[0]["errors"][0].startswith("invalid JSON")
    assert len(data.train) + len(data.eval) == 3
    assert any("skipped 9 invalid rows" in line for line in lines)


@pytest.fixture(scope="module")
def cli():
    """The real `genai-lab` app, run in-process (a subprocess would re-import torch each time)."""
    from typer.testing import CliRunner

    from core.cli import build_app

    app, runner = build_app(), CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_check_command_fails_on_bad_rows_and_passes_on_good_data(tmp_path, cli):
    base = ["finetune", "--check", "--output-dir", tmp_path]
    bad = cli(*base, "--data", BROKEN)
    assert bad.exit_code == 1
    assert f"{BROKEN}:6: messages[1].role: unknown role 'bot'" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("error: 9 invalid rows in")
    assert bad.exception is None or isinstance(bad.exception, SystemExit)  # no traceback
    good = cli(*base, "--data", EXAMPLES / "tutor_alpaca.json", "--lora-rank", "4")
    assert good.exit_code == 0, good.stderr
    assert "format alpaca (auto-detected)" in good.stdout
    assert "«A puppy is a young dog.<|end|>»" in good.stdout  # the preview marks the answer
    typo = cli(*base, "--set", "lora_rnak=4")
    assert typo.exit_code == 1 and "did you mean 'lora_rank'?" in typo.stderr
    hub = cli(*base, "--data", BROKEN, "--model", "nobody/no-such-model")
    assert hub.exit_code == 1
    assert hub.stderr.startswith("error: nobody/no-such-model: not in the local Hugging Face cache")


def test_dry_run_needs_only_the_config(tmp_path, cli):
    """A folder with nothing but Llama-2-7B's config.json: the estimate needs no weights."""
    from finetune.estimate import MODEL_SHAPES

    config = {**MODEL_SHAPES["Llama-2-7B"], "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = cli("finetune", "--dry-run", "--model", tmp_path, "--method", "qlora")
    assert result.exit_code == 0, result.stderr
    assert "6,738,415,616 parameters" in result.stdout
    assert "trainable: 19,988,480 parameters (0.297% of the model)" in result.stdout
    nf4_row = next(line for line in result.stdout.splitlines() if "4-bit NF4" in line)
    assert nf4_row.endswith("<- this run")
    narrow = cli("finetune", "--dry-run", "--model", tmp_path, "--target-modules", "q_proj,v_proj")
    assert "trainable: 4,194,304 parameters" in narrow.stdout  # 32 layers x 2 x 8 x (4096+4096)
    wrong = cli("finetune", "--dry-run", "--model", tmp_path, "--target-modules", "c_attn")
    assert wrong.exit_code == 1 and "'c_attn' is not a linear layer of this model" in wrong.stderr


def test_model_spec_errors_name_the_model(monkeypatch):
    from finetune.modeling import ModelSpecError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelSpecError, match=r"^nobody/no-such-model: not in the local Hugging Face"
    ):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ModelSpecError, match="unknown model"):
        resolve_model("./no/such/folder")
    assert resolve_model("tutor-base") == str(resolve_model_path("tutor-base"))
