"""The pre-flight linter and the rendering: every kind of bad row is caught with its line, every
format and file type is read, and the loss mask covers exactly the answers."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.lm.chat_format import stop_ids
from core.lm.loader import resolve_model_path
from core.train.config import ConfigError
from finetune.base_model import load_tokenizer
from finetune.config import FinetuneConfig
from finetune.data import DataError, read_rows
from finetune.lint import check_file, check_structure, lint_structure, report_lines
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
        9: "not valid UTF-8 (byte 0xe9 at line 9, column 47, file offset 1719)",
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
    with pytest.raises(
        DataError,
        match=rf"^{path}:4:3: invalid JSON \(Expecting ',' delimiter in row 2\): the whole file is "
        r"unreadable \(1 row parsed before the error\)",
    ):
        check_file(path, tokenizer)


def test_every_example_file_is_valid_and_its_format_detected(tokenizer):
    formats = {
        "tutor_chat.jsonl": "messages",
        "tutor_alpaca.json": "alpaca",
        "tutor_sharegpt.json": "sharegpt",
        "tutor_prompt_completion.csv": "prompt_completion",
        "tutor_text.parquet": "text",
    }
    for name, fmt in formats.items():
        check = check_file(EXAMPLES / name, tokenizer, max_length=128)
        assert check.format == fmt, name
        assert not check.issues, [str(i) for i in check.issues]
        assert len(check.examples) == len(check.rows) >= 16


def test_the_format_table_is_the_only_list_of_formats():
    """finetune.data.DATA_FORMATS is where formats are declared: --format's choices and help,
    auto-detection and the dashboard page are read from it, each example row is detected as its
    own format and converts cleanly, and no other module spells the format names out."""
    from dashboard.lib.finetune_lab import formats_markdown, upload_label
    from finetune.data import (
        COLUMNS,
        DATA_FORMATS,
        FORMATS,
        SFT_FORMATS,
        Row,
        detect_format,
        or_list,
    )

    names = [f.name for f in SFT_FORMATS]
    assert list(FORMATS) == names and len(set(f.name for f in DATA_FORMATS)) == len(DATA_FORMATS)
    help_text = next(f.metadata["help"] for f in fields(FinetuneConfig) if f.name == "format")
    labels = [f"{f.name} ({f.known_as})" if f.known_as else f.name for f in SFT_FORMATS]
    assert help_text == f"auto, {or_list(labels)}."
    assert f"({or_list(names)};" in upload_label()  # the page's list of formats is the table's
    assert re.findall(r"^\| `(\w+)` \|", formats_markdown(), flags=re.M) == names
    with pytest.raises(ConfigError, match=f"must be one of auto, {', '.join(names)}$"):
        FinetuneConfig(data="x.jsonl", format="chat").validate()
    assert set(COLUMNS) == {c for f in SFT_FORMATS for c in f.columns}
    for fmt in DATA_FORMATS:
        assert set(fmt.signature) <= set(fmt.example) <= set(fmt.columns)
        assert detect_format([Row("x:1", "", dict(fmt.example))], "x", DATA_FORMATS) == fmt.name
        issues = []
        converted = fmt.convert(dict(fmt.example), "x:1", issues, {})
        assert converted and not issues, (fmt.name, [str(i) for i in issues])
    # No other module lists the names by hand (the distinctive ones; "text" is a common word).
    root = Path(__file__).parents[1]
    spelled = [
        str(path.relative_to(root))
        for package in ("finetune", "dashboard", "chat", "core")
        for path in (root / package).rglob("*.py")
        if path != root / "finetune" / "data.py"
        and any(f'"{name}"' in path.read_text(encoding="utf-8")
                for name in ("sharegpt", "prompt_completion", "alpaca"))
    ]  # fmt: skip
    assert not spelled, spelled


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
    assert list(ours.input_ids) == list(reference["input_ids"])
    assert [bool(m) for m in ours.trained] == [bool(m) for m in reference["assistant_masks"]]
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
    # broken.jsonl's 9 bad rows among the 141 good chat rows: 6%, under the 10% limit
    data_file = tmp_path / "mixed.jsonl"
    good = (EXAMPLES / "tutor_chat.jsonl").read_bytes()
    data_file.write_bytes(good + BROKEN.read_bytes())
    offset = good.count(b"\n")
    cfg = FinetuneConfig(data=str(data_file), output_dir=str(tmp_path), skip_invalid=True)
    lines: list[str] = []
    data = prepare_data(cfg, lines.append)
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [int(r["where"].rsplit(":", 1)[1]) - offset for r in rejects] == [*range(2, 10), 11]
    assert rejects[0]["errors"][0].startswith("invalid JSON")
    assert len(data.train) + len(data.eval) == 144
    assert any("skipped 9 of 153 rows as invalid" in line for line in lines), lines
    # broken.jsonl alone: 9 of 12 rows bad is a broken file, not a few bad rows
    cfg = FinetuneConfig(data=str(BROKEN), output_dir=str(tmp_path), skip_invalid=True)
    with pytest.raises(DataError, match=r"9 of 12 rows invalid \(75%\), more than the 10%"):
        prepare_data(cfg, lines.append)


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


def test_dry_run_sizes_batches_by_the_datas_longest_row(tmp_path, cli, tokenizer):
    data = Path(__file__).resolve().parents[1] / "finetune/examples/data/tutor_alpaca.json"
    longest = max(len(e.input_ids) for e in check_file(data, tokenizer).examples)
    result = cli("finetune", "--dry-run", "--model", "tutor-base", "--data", data)
    assert result.exit_code == 0, result.stderr
    assert f"longest {longest}," in result.stdout
    assert f"batch 4 x {longest} tokens" in result.stdout  # not the context's 2048
    # A model folder without a tokenizer still gets its estimate, at max_length.
    (tmp_path / "config.json").write_text(
        (resolve_model_path("tutor-base") / "config.json").read_text()
    )
    bare = cli("finetune", "--dry-run", "--model", tmp_path, "--data", data, "--max-length", "300")
    assert bare.exit_code == 0, bare.stderr
    assert (
        "no tokenizer to measure the rows" in bare.stdout and "batch 4 x 300 tokens" in bare.stdout
    )


def test_model_spec_errors_name_the_model(monkeypatch):
    from finetune.base_model import ModelSpecError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelSpecError, match=r"^nobody/no-such-model: not in the local Hugging Face"
    ):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ModelSpecError, match="unknown model"):
        resolve_model("./no/such/folder")
    assert resolve_model("tutor-base") == str(resolve_model_path("tutor-base"))


# --- formats and mappings ---------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(tokenizer, encoded) -> str:
    ids = [t for t, keep in zip(encoded.input_ids, encoded.trained, strict=True) if keep]
    return tokenizer.decode(ids)


def test_sharegpt_rows_with_system_and_role_mapping(tmp_path, tokenizer):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "What is a lamb?"},
                {"from": "gpt", "value": "A lamb is a young sheep."},
            ],
            "system": "Be brief.",
        },
        {
            "conversations": [
                {"from": "human", "value": "What is the weather?"},
                {"from": "function_call", "value": '{"name": "weather"}'},
                {"from": "gpt", "value": "Sunny."},
            ]
        },
        {"conversations": [{"from": "bot", "value": "Hello."}]},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    check = check_file(path, tokenizer)
    assert check.format == "sharegpt" and check.detected
    assert check.conversations[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a lamb?"},
        {"role": "assistant", "content": "A lamb is a young sheep."},
    ]
    assert trained_text(tokenizer, check.examples[0]) == "A lamb is a young sheep.<|end|>"
    found = issues_by_line(check)
    assert "conversations[1].from: tool turn 'function_call' is not supported" in found[2][0]
    assert "conversations[0].from: unknown role 'bot'" in found[3][0]

    # Another layout: its own column and key names, and its own speaker names.
    other = [
        {
            "dialog": [
                {"speaker": "customer", "text": "What is a foal?"},
                {"speaker": "agent", "text": "A foal is a young horse."},
            ]
        },
        {"dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "agent"}]},
    ]
    path = write_jsonl(tmp_path / "other.jsonl", other)
    columns = {"conversations": "dialog", "role": "speaker", "content": "text"}
    roles = {"customer": "user", "agent": "assistant"}
    check = check_file(path, tokenizer, columns=columns, roles=roles)
    assert check.format == "sharegpt"
    assert check.conversations[0][1] == {"role": "assistant", "content": "A foal is a young horse."}
    assert issues_by_line(check) == {2: [f"{path}:2: dialog[1].text: missing field"]}
    with pytest.raises(DataError, match=r"^roles: agent: got 'bot', must be one of system"):
        check_file(path, tokenizer, columns=columns, roles={"agent": "bot"})
    with pytest.raises(DataError, match=r"^columns: unknown field 'answer'"):
        check_file(path, tokenizer, columns={"answer": "text"})


def test_alpaca_history_becomes_the_earlier_turns(tmp_path, tokenizer):
    row = {
        "instruction": "And a kitten?",
        "input": "",
        "output": "A kitten is a young cat.",
        "history": [["What is a puppy?", "A puppy is a young dog."]],
    }
    bad = {**row, "history": [["What is a puppy?"]]}
    path = write_jsonl(tmp_path / "h.jsonl", [row, bad])
    check = check_file(path, tokenizer)
    assert check.format == "alpaca"
    assert [m["content"] for m in check.conversations[0]] == [
        "What is a puppy?",
        "A puppy is a young dog.",
        "And a kitten?",
        "A kitten is a young cat.",
    ]
    # Every answer of a conversation is trained on (as in the messages format); questions not.
    assert trained_text(tokenizer, check.examples[0]) == (
        "A puppy is a young dog.<|end|>A kitten is a young cat.<|end|>"
    )
    assert issues_by_line(check) == {
        2: [f"{path}:2: history[0]: expected an [instruction, response] pair, got 1 items"]
    }


def test_openai_weight_zero_answers_are_context_only(tmp_path, tokenizer):
    conversation = [
        {"role": "user", "content": "What is a lamb?"},
        {"role": "assistant", "content": "A lamb is a young cow.", "weight": 0},
        {"role": "user", "content": "No, try again."},
        {"role": "assistant", "content": "A lamb is a young sheep.", "weight": 1},
    ]
    rows = [
        {"messages": conversation},
        {"messages": [conversation[0], {**conversation[1], "weight": 2}]},
        {"messages": [{**conversation[0], "weight": 0}, conversation[3]]},
        {"messages": conversation[:2]},
    ]
    check = check_file(write_jsonl(tmp_path / "w.jsonl", rows), tokenizer)
    assert check.conversations[0][1]["weight"] == 0 and "weight" not in check.conversations[0][3]
    encoded = check.examples[0]
    assert trained_text(tokenizer, encoded) == "A lamb is a young sheep.<|end|>"
    # The weight-0 answer's tokens are all IGNORE in the labels, even when training on prompts.
    context = tokenizer.encode("A lamb is a young cow.", add_special_tokens=False)
    for train_on_prompt in (False, True):
        enc = encode(tokenizer, check.conversations[0], train_on_prompt)
        start = next(
            i
            for i in range(len(enc.input_ids))
            if list(enc.input_ids[i : i + len(context)]) == context
        )
        assert set(enc.labels()[start : start + len(context) + 1]) == {-100}  # + <|end|>
        assert enc.num_trained >= encoded.num_trained
    found = issues_by_line(check)
    assert "messages[1].weight: got 2, must be 0 or 1" in found[2][0]
    assert "messages[0].weight: only assistant turns have a weight" in found[3][0]
    assert "every assistant turn has weight 0: nothing to train on" in found[4][0]


# --- reading files: nothing lost silently -----------------------------------------------------


def test_json_array_with_a_missing_comma_is_refused_whole(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(62)]
    text = json.dumps(rows, indent=2)
    sixth = text.index('"Question 6?"') - text[: text.index('"Question 6?"')][::-1].index(",") - 1
    path = tmp_path / "a.json"
    path.write_text(text[:sixth] + text[sixth + 1 :])  # the comma after row 6 gone
    line = text[:sixth].count("\n") + 2  # row 7 starts on the next line
    with pytest.raises(
        DataError,
        match=rf"^{path}:{line}:3: invalid JSON \(expected ',' or ']' after row 6\): the whole "
        r"file is unreadable \(6 rows parsed before the error\)",
    ):
        lint_structure([str(path)], "auto", True, print)  # --skip-invalid does not salvage it


def test_other_encodings_and_bad_bytes_are_named(tmp_path):
    row = json.dumps({"prompt": "Hi", "completion": "Hello."}) + "\n"
    cases = {
        "utf-16": "UTF-16 LE (byte-order mark FF FE)",
        "utf-16-be": "looks like UTF-16 BE (no byte-order mark",
        "utf-32": "UTF-32 LE (byte-order mark FF FE 00 00)",
    }
    for encoding, name in cases.items():
        path = tmp_path / f"{encoding}.jsonl"
        path.write_bytes(row.encode(encoding))
        with pytest.raises(DataError, match=rf"^{path}: the file .*{re.escape(name)}") as e:
            check_structure(path)
        assert str(e.value).endswith("not UTF-8; save it as UTF-8")
    path = tmp_path / "bom.jsonl"
    path.write_bytes((row * 2).encode("utf-8-sig"))
    check, _ = check_structure(path)  # UTF-8 with a byte-order mark is fine
    assert len(check.rows) == 2 and not check.errors
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,completion\nHi,Hello.\ncaf\u00e9,Coffee.\n".encode("latin-1"))
    (row1, row2) = read_rows(path)
    assert row1.ok and str(row2.issues[0]) == (
        f"{path}:3: not valid UTF-8 (byte 0xe9 at line 3, column 4, file offset 31); save the "
        "file as UTF-8"
    )


def test_too_many_rejected_rows_stop_even_with_skip_invalid(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    text = path.read_text().splitlines()
    text[3] = text[3][:-1]  # 2 of 20 rows bad (10%): dropped with --skip-invalid
    text[7] = '{"prompt": "q7"}'
    path.write_text("\n".join(text) + "\n")
    lines: list[str] = []
    checks = lint_structure([str(path)], "auto", True, lines.append)
    assert len(checks[0].good_rows) == 18 and lines[0].endswith("18 well-formed, 2 with errors")
    text[11] = "not json"  # 3 of 20 (15%): refused
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(
        DataError, match=r"d.jsonl: 3 of 20 rows invalid \(15%\), more than the 10%"
    ):
        lint_structure([str(path)], "auto", True, lines.append)
    with pytest.raises(DataError, match=r"^3 invalid rows in .*d.jsonl"):
        lint_structure([str(path)], "auto", False, lines.append)
    path.write_text(text[0] + "\n" + text[3] + "\n" + "\n".join(text[4:7]) + "\n")
    with pytest.raises(DataError, match=r"^1 invalid row in "):  # 1 row, not "1 rows"
        lint_structure([str(path)], "auto", False, lines.append)


def test_report_says_what_was_rejected_and_what_the_stats_cover(tmp_path, tokenizer):
    long = "A token is a piece of text. " * 12
    rows = [
        {"prompt": "What is a lamb?", "completion": "A lamb is a young sheep."},
        {"prompt": "Say it many times.", "completion": long},
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    check = check_file(path, tokenizer, max_length=48)
    lines = report_lines(check, tokenizer)
    assert lines[0].endswith("2 rows, format prompt_completion (auto-detected): 1 usable, 1 with "
                             "errors, 0 warnings")  # fmt: skip
    longest = check.over_lengths[0]
    assert lines[1].startswith("  tokens per row (the 1 usable row, rejected rows not counted): ")
    assert lines[2] == (
        f"  max_length 48: 1 row longer ({longest} tokens), rejected (raise --max-length or pass "
        "--truncate)"
    )
    cut = report_lines(check_file(path, tokenizer, max_length=48, truncate=True), tokenizer)
    assert "the 2 usable rows, after truncation)" in cut[1]
    assert cut[2] == f"  max_length 48: 1 row longer ({longest} tokens), truncated to 48 tokens"


def test_columns_and_roles_flags_map_another_layout(tmp_path):
    """`--columns` and `--roles` (key=value lists) reach the data layer through the CLI."""
    from typer.testing import CliRunner

    from core.cli import build_app

    rows = [
        {"dialog": [{"speaker": "customer", "text": f"Question {i}?"},
                    {"speaker": "agent", "text": f"Answer {i}."}]}
        for i in range(4)
    ]  # fmt: skip
    data = tmp_path / "dialogs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["finetune", "--check", "--data", str(data), "--format", "sharegpt"]
    mapped = [*args, "--columns", "conversations=dialog,role=speaker,content=text",
              "--roles", "customer=user,agent=assistant"]  # fmt: skip
    runner = CliRunner()
    ok = runner.invoke(build_app(), mapped)
    assert ok.exit_code == 0, ok.output
    assert "data check passed" in ok.output
    unmapped = runner.invoke(build_app(), args)
    assert unmapped.exit_code != 0
    bad = runner.invoke(build_app(), [*args, "--columns", "conversations"])
    assert bad.exit_code != 0 and "columns" in bad.output


def test_large_files_are_encoded_in_batches_with_progress(tmp_path, tokenizer, monkeypatch, capsys):
    from finetune import lint
    from finetune.train import to_dataset

    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(25)]
    rows[7] = {"prompt": "a different format"}  # one bad row does not shift the others
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    monkeypatch.setattr(lint, "ENCODE_BATCH", 10)
    calls = []
    check = check_file(path, tokenizer, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 24), (10, 24), (20, 24), (24, 24)]  # the 24 well-formed rows
    # Batched encoding gives each row exactly what encoding it alone gives.
    for conversation, example in zip(check.conversations, check.examples, strict=True):
        alone = encode(tokenizer, conversation)
        assert list(alone.input_ids) == list(example.input_ids)
        assert alone.trained == example.trained
    assert [r.where.rsplit(":", 1)[1] for r in check.bad_rows] == ["8"]
    # The Arrow dataset the trainer gets: every row's ids, its labels masked where untrained.
    dataset = to_dataset(check.examples)
    assert dataset[3]["input_ids"] == list(check.examples[3].input_ids)
    assert dataset[3]["labels"] == check.examples[3].labels()
    assert {-100} < set(dataset[3]["labels"])  # masked prompt tokens and trained answer tokens

    capsys.readouterr()
    check_file(path, tokenizer, progress=lint.progress_bar(path))
    assert capsys.readouterr().err == ""  # a small file: no bar
    monkeypatch.setattr(lint, "PROGRESS_MIN_ROWS", 20)
    check_file(path, tokenizer, progress=lint.progress_bar(path))
    err = capsys.readouterr().err
    assert "checking big.jsonl" in err and "24/24" in err
