"""Supervised fine-tuning: data validation, the assistant-only loss mask, training and resume."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from core.commands.training import register
from core.lm.chat_format import IGNORE, encode_conversation, mask_view
from core.lm.loader import PRETRAINED_DIR
from core.lm.tokenizer import load_tokenizer
from core.train.data import DatasetError, conversation_messages, load_rows, preference_triple
from core.train.stages.sft import SFTConfig, encode_sft_rows, sft

TOKENIZER = load_tokenizer(PRETRAINED_DIR / "tutor-base")
GOOD = {
    "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": [{"content": "hi"}]}, "messages[0].role: missing field"),
        ({"messages": [{"role": "user"}]}, "messages[0].content: missing field"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "messages[1].content: empty response",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        ({"prompt": "q"}, "response: missing field"),
        ({"prompt": "q", "response": ""}, "response: empty"),
        ({"text": "q"}, "messages: missing field"),
    ],
)
def test_bad_sft_rows_name_file_line_field_and_reason(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(DatasetError) as e:
        load_rows(path, conversation_messages)
    assert str(e.value).startswith(f"{path}:2: ")
    assert reason in str(e.value)


def test_bad_files_and_preference_rows(tmp_path):
    bad_json = write_jsonl(tmp_path / "j.jsonl", [GOOD, "{not json"])
    with pytest.raises(DatasetError, match=r"j.jsonl:2: invalid JSON"):
        load_rows(bad_json, conversation_messages)
    latin1 = tmp_path / "l.jsonl"
    latin1.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"l.jsonl:2: not valid UTF-8"):
        load_rows(latin1, conversation_messages)
    same = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DatasetError, match=r"p.jsonl:1: chosen: identical to rejected"):
        load_rows(same, preference_triple)
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DatasetError, match=r"m.jsonl:1: rejected: missing field"):
        load_rows(missing, preference_triple)


def test_skip_invalid_writes_rejects_and_counts(tmp_path):
    bad = {"messages": [{"role": "robot", "content": "x"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, "oops", GOOD])
    printed = []
    rows = load_rows(path, conversation_messages, True, tmp_path / "rej.jsonl", printed.append)
    assert len(rows) == 2 and [w for w, _ in rows] == [f"{path}:1", f"{path}:4"]
    rejects = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == [f"{path}:2", f"{path}:3"]
    assert "kept 2 rows, skipped 2 invalid" in printed[0]


def test_prompt_response_rows_become_chat_messages():
    assert conversation_messages({"prompt": "q", "completion": "a"}) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_loss_mask_covers_exactly_the_assistant_answers_and_their_end_tokens():
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A piece of text."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids, mask = encode_conversation(TOKENIZER, messages)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    expected = TOKENIZER.encode("A piece of text.<|end|>You are welcome.<|end|>")
    assert trained == expected
    view = mask_view(TOKENIZER, ids, mask)
    assert "[<|end|>]" in view and "<|user|>" in view and "[<|user|>]" not in view
    (inputs, labels), = encode_sft_rows(TOKENIZER, [("x:1", messages)], context=128)  # fmt: skip
    # label t is token t+1 where that token is trained on; everything else is ignored
    kept = [y for y in labels if y != IGNORE]
    assert kept == expected and len(inputs) == len(labels)


def test_too_long_conversation_is_a_clear_error():
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DatasetError, match=r"f.jsonl:7: messages: \d+ tokens, longer than"):
        encode_sft_rows(TOKENIZER, [("f.jsonl:7", long)], context=128)


def tiny_data(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {w}?"},
                {"role": "assistant", "content": f"{w.capitalize()} is a word."},
            ]
        }
        for w in ("a token", "a cat", "the sun", "water")
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", rows)


def test_sft_lowers_held_out_loss_and_resume_continues(tmp_path):
    train, evals = tiny_data(tmp_path)
    cfg = SFTConfig(
        train_file=train, eval_file=evals, max_steps=6, batch_size=4, warmup_steps=1,
        eval_every=3, checkpoint_every=3, log_every=1, learning_rate=3e-3, threads=2,
    )  # fmt: skip
    out = tmp_path / "run"
    cfg.max_steps = 3
    sft(cfg, out, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        sft(cfg, out, progress=False)
    cfg.max_steps = 6
    report = sft(cfg, out, resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["eval_loss"]
    assert report["eval_loss"] < first
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "chat_template.jinja").is_file()


def test_cli_bad_dataset_is_one_line_error_and_show_mask_works(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"messages": [{"role": "x", "content": "y"}]}])
    result = runner.invoke(app, ["sft", "--train-file", bad, "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"error: {bad}:2: messages[0].role: unknown role 'x'" in result.output
    assert "Traceback" not in result.output
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    result = runner.invoke(app, ["sft", "--train-file", good, "--show-mask", "1"])
    assert result.exit_code == 0, result.output
    assert "[Hello.<|end|>]" in result.output.replace("][", "")
    result = runner.invoke(app, ["sft", "--set", "lerning_rate=1"])
    assert result.exit_code == 1 and "did you mean 'learning_rate'" in result.output


def test_padding_does_not_change_the_loss_of_a_row():
    from core import load_model
    from core.lm.chat_format import pad_batch

    model = load_model("tutor-base")
    a = encode_sft_rows(TOKENIZER, [("x:1", conversation_messages(GOOD))], 128)
    long = {"prompt": "Tell me a long story about the sun and the moon.", "response": "No."}
    b = encode_sft_rows(TOKENIZER, [("x:2", conversation_messages(long))], 128)
    ids, _ = pad_batch(a + b, TOKENIZER.pad_token_id)
    with torch.no_grad():
        alone = model(torch.tensor([a[0][0]]))[0]
        padded = model(ids)[0, : len(a[0][0])]
    assert torch.allclose(alone, padded, atol=1e-5)  # right padding + causal mask: no effect
