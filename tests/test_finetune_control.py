"""Training control: `--resume` continues only the run its folder holds (and says in one line
what differs), the adapter is the best checkpoint's by eval loss, the report words a rise as a
rise, evaluation is capped and spaced for the run's length, and chat answers are bounded."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from core.train.config import ConfigError, save_config
from finetune.config import FinetuneConfig
from finetune.report import _markdown, change_words, overfitting, read_metrics
from finetune.run import COMPLETE, FINGERPRINT, check_resume, fingerprint, intervals
from finetune.train import finetune, prepare_data

ROOT = Path(__file__).parents[1]
DATA = ROOT / "finetune" / "examples" / "data"
ALPACA = DATA / "tutor_alpaca.json"
CHAT = DATA / "tutor_chat.jsonl"


def quiet(*_) -> None:
    pass


def started_run(folder: Path, cfg: FinetuneConfig) -> Path:
    """A run folder as `genai-lab finetune` leaves it after its first checkpoint: config.yaml,
    fingerprint.json and a complete checkpoint (what --resume checks before loading anything)."""
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    (folder / FINGERPRINT).write_text(json.dumps(fingerprint(cfg)))
    checkpoint = folder / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE).write_text("2\n")
    return folder


# ---------------------------------------------------------------------------------------------
# --resume checks the run it continues


def test_resume_with_another_method_is_refused_in_one_line_and_config_untouched(tmp_path):
    from core.cli import build_app

    data = str(shutil.copy(ALPACA, tmp_path / "rows.json"))
    out = tmp_path / "run"
    started_run(out, FinetuneConfig(data=data, output_dir=str(out), method="qlora"))
    saved = (out / "config.yaml").read_bytes()
    args = ["finetune", "--data", data, "--output-dir", str(out), "--resume", "--quiet"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [
        f"error: --resume: {out / 'config.yaml'} has method=qlora, this run has method=lora; "
        "pass the same settings or a new --output-dir"
    ]
    assert (out / "config.yaml").read_bytes() == saved


def test_resume_names_every_differing_key_and_edited_data_but_allows_a_longer_run(tmp_path):
    data = Path(shutil.copy(ALPACA, tmp_path / "rows.json"))
    out = tmp_path / "run"
    cfg = FinetuneConfig(data=str(data), output_dir=str(out), max_steps=10, lora_rank=8)
    started_run(out, cfg)
    longer = FinetuneConfig(data=str(data), output_dir=str(out), max_steps=40, eval_steps=4)
    check_resume(longer, out)  # more steps, other intervals: the same run
    moved = Path(shutil.copy(data, tmp_path / "moved.json"))
    check_resume(FinetuneConfig(data=str(moved), output_dir=str(out), max_steps=10), out)

    data.write_text(data.read_text().replace("puppy", "kitten"))
    other = FinetuneConfig(data=str(data), output_dir=str(out), max_steps=10, lora_rank=16)
    with pytest.raises(ConfigError) as e:
        check_resume(other, out)
    message = str(e.value)
    assert "\n" not in message
    assert "has lora_rank=8, data=" in message and "this run has lora_rank=16, data=" in message
    assert message.count("sha256") == 2


def test_resume_refuses_a_cut_short_config_naming_the_file_and_the_missing_keys(tmp_path):
    data = str(shutil.copy(ALPACA, tmp_path / "rows.json"))
    out = tmp_path / "run"
    cfg = FinetuneConfig(data=data, output_dir=str(out))
    started_run(out, cfg)
    text = (out / "config.yaml").read_bytes()
    (out / "config.yaml").write_bytes(text[:200])  # a config.yaml cut short (a copy, a disk)
    saved = yaml.safe_load(text[:200])
    missing = [key for key in asdict(cfg) if key not in saved]
    assert missing and len(missing) < len(asdict(cfg)) - 2  # a cut that still parses
    with pytest.raises(ConfigError) as e:
        check_resume(cfg, out)
    assert str(e.value) == (
        f"--resume: {out / 'config.yaml'} lacks {', '.join(missing)} (cut short or edited), so "
        "this run cannot be checked against the one it would continue; pass a new --output-dir"
    )


# ---------------------------------------------------------------------------------------------
# Reports and evaluation settings (no training)


def test_report_words_a_rise_as_a_rise():
    assert change_words(3.9786, 4.1282) == "rose 3.8%"
    assert change_words(4.0, 3.0) == "fell 25.0%"
    assert change_words(2.0, 2.0) == "unchanged"
    report = {
        "model": "tutor-base",
        "method": "lora",
        "device": "cpu",
        "trainable_parameters": 10,
        "total_parameters": 100,
        "train_rows": 9,
        "eval_rows": 1,
        "steps": 40,
        "adapter_step": 28,
        "train_seconds": 1.0,
        "estimated_memory_bytes": 1,
        "eval_loss_before": 3.9786,
        "eval_loss_after": 4.1282,
        "eval_loss_last": 4.5,
        "eval_ppl_before": 53.4,
        "eval_ppl_after": 62.1,
        "overfitting": None,
        "samples": [],
    }
    markdown = _markdown(report)
    assert "3.9786 → 4.1282 (rose 3.8%; the adapter is step 28's)" in markdown
    assert (
        "lower" not in markdown and "| eval loss at the last step | 4.5000 (step 40) |" in markdown
    )


def test_overfitting_needs_eval_rising_while_train_falls():
    history = [
        {"step": 10, "loss": 2.0},
        {"step": 10, "eval_loss": 3.0},
        {"step": 20, "loss": 1.5},
        {"step": 20, "eval_loss": 2.9},
        {"step": 30, "loss": 1.0},
        {"step": 30, "eval_loss": 3.2},
        {"step": 40, "loss": 0.5},
        {"step": 40, "eval_loss": 3.6},
    ]
    found = overfitting(history)
    assert found == {
        "best_step": 20,
        "best_eval_loss": 2.9,
        "last_step": 40,
        "last_eval_loss": 3.6,
        "evals_after_best": 2,
        "train_loss_at_best": 1.5,
        "train_loss_last": 0.5,
    }
    assert overfitting(history[:6]) is None  # one evaluation above the best is noise
    diverging = [{**h, "loss": h["step"] / 10} if "loss" in h else h for h in history]
    assert overfitting(diverging) is None  # training loss rising too: not overfitting


def test_eval_rows_are_capped_and_the_output_says_how_many_were_held_out(tmp_path):
    lines: list[str] = []
    cfg = FinetuneConfig(data=str(CHAT), output_dir=str(tmp_path), eval_fraction=0.5)
    cfg.max_eval_rows = 5
    data = prepare_data(cfg, lines.append)
    assert len(data.eval) == 5 and len(data.eval_conversations) == 5
    split = next(line for line in lines if line.startswith("split:"))
    held = round(0.5 * (len(data.train) + 5))
    assert split == (
        f"split: {len(data.train)} rows for training, 5 rows for evaluation (eval_fraction 0.5 would "
        f"hold out {held}; max_eval_rows 5)"
    )
    # A separate eval file is sampled down to the cap too.
    cfg.eval_data = str(CHAT)
    assert len(prepare_data(cfg, quiet).eval) == 5


def test_eval_intervals_fit_the_run_and_checkpoints_follow_them():
    cfg = FinetuneConfig(data="x")
    assert intervals(cfg, 4) == (4, 4)  # a smoke run: evaluated at its end only
    assert intervals(cfg, 100) == (20, 20)  # ~5 evaluations
    assert intervals(cfg, 27_906) == (5582, 5582)
    assert intervals(FinetuneConfig(eval_steps=3), 100) == (3, 3)
    assert intervals(FinetuneConfig(save_steps=6), 100) == (6, 6)
    with pytest.raises(ConfigError, match=r"^save_steps: got 4, must be a multiple of eval_"):
        FinetuneConfig(data="x", save_steps=4, eval_steps=12).validate()


# ---------------------------------------------------------------------------------------------
# Training: the best checkpoint is the adapter


@pytest.fixture(scope="module")
def rising_run(tmp_path_factory):
    """A LoRA run with a learning rate high enough that the eval loss falls, then rises; only
    one checkpoint kept besides the best; early stopping after two evaluations without a new
    best."""
    out = tmp_path_factory.mktemp("rising") / "run"
    cfg = FinetuneConfig(
        data=str(ALPACA),
        output_dir=str(out),
        max_steps=8,
        eval_steps=2,
        learning_rate=3e-2,  # eval loss: 5.28 (base), 4.21 at step 2, then 7 to 9
        lr_scheduler="constant",
        warmup_ratio=0.0,
        logging_steps=2,
        save_total_limit=1,
        early_stopping_patience=2,
        num_samples=0,
    )
    lines: list[str] = []
    return finetune(cfg, progress=False, echo=lines.append), out, lines


@pytest.mark.slow
def test_the_adapter_is_the_best_checkpoints_and_early_stopping_ends_the_run(rising_run):
    report, out, lines = rising_run
    metrics = read_metrics(out / "metrics.jsonl")
    evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m and m["step"] > 0}
    best = min(evals, key=evals.get)
    assert best != report["steps"], evals  # the run really rose after its best step
    assert report["adapter_step"] == best and report["eval_loss_after"] == evals[best]
    assert report["eval_loss_last"] == evals[report["steps"]]
    kept = out / "checkpoints" / f"checkpoint-{best}"
    assert (kept / COMPLETE).is_file()  # never pruned, even with save_total_limit 1
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    at_best = load_file(kept / "adapter_model.safetensors")
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    meta = json.loads((out / "adapter" / "finetune.json").read_text())
    assert meta["step"] == best
    output = "\n".join(lines)
    assert f"best checkpoint: step {best}, eval loss {evals[best]:.4f}" in output
    # two evaluations (steps 4 and 6) without beating step 2's: stopped before max_steps 8
    assert best == 2 and report["steps"] == 6 and report["stopped_early"]
    assert "early stopping: no lower eval loss in 2 evaluations; stopped at step 6 of 8" in output
    assert not (out / "checkpoints" / "checkpoint-4").exists()  # neither best nor newest


@pytest.mark.slow
def test_resume_extends_the_run_and_the_report_covers_all_of_it(tmp_path):
    out = tmp_path / "run"
    settings = {"data": str(ALPACA), "output_dir": str(out), "eval_steps": 2, "logging_steps": 1}
    settings |= {"num_samples": 0, "learning_rate": 5e-3}
    first = finetune(FinetuneConfig(**settings, max_steps=4), progress=False, echo=quiet)
    saved = (out / "config.yaml").read_bytes()
    report = finetune(
        FinetuneConfig(**settings, max_steps=6), resume=True, progress=False, echo=quiet
    )
    assert report["steps"] == 6 and (out / "config.yaml").read_bytes() == saved
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 6  # logged every step: the whole run's mean is their mean
    assert report["train_loss"] == pytest.approx(sum(losses) / 6, rel=1e-4)
    assert report["train_seconds"] > first["train_seconds"]


# ---------------------------------------------------------------------------------------------
# Chat: a bounded answer when no length is asked for


def test_chat_answers_are_bounded_by_default(tmp_path):
    """A model that never ends its turn (its stop tokens can never win) and a context far longer
    than the default: the answer stops at DEFAULT_MAX_TOKENS, reported as cut for length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chat.local_model import DEFAULT_MAX_TOKENS, ChatLocalModel, load_local_model
    from chat.providers import load_chat_model
    from core.lm.chat_format import stop_ids
    from core.lm.sampling import SamplingParams

    _, tokenizer = load_local_model("tutor-base")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4 * DEFAULT_MAX_TOKENS,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logit 0 for every stop token: some random logit always beats it
        for i in stop_ids(tokenizer, config) + tokenizer.all_special_ids:
            model.lm_head.weight[i] = 0.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    backend = load_chat_model(str(tmp_path), SamplingParams(temperature=0))
    assert backend.context_window == 4 * DEFAULT_MAX_TOKENS
    reply = backend.chat_model.invoke("hello")
    assert reply.usage_metadata["output_tokens"] == DEFAULT_MAX_TOKENS == 512
    assert reply.response_metadata["finish_reason"] == "length"
    short = ChatLocalModel(model=str(tmp_path), temperature=0, max_tokens=7).invoke("hello")
    assert short.usage_metadata["output_tokens"] == 7


def test_repetition_penalty_is_checked_before_loading():
    from core.lm.sampling import SamplingParams

    with pytest.raises(ValueError, match="repetition_penalty must be a number > 0"):
        SamplingParams(repetition_penalty=0.0)  # checked when made, before any model loads


def test_report_to_defaults_to_what_is_installed_and_names_a_missing_integration():
    from importlib.util import find_spec

    from transformers.integrations import get_available_reporting_integrations

    installed = "tensorboard" in get_available_reporting_integrations()
    assert FinetuneConfig().report_to == ("tensorboard" if installed else "none")
    FinetuneConfig(data="x", report_to="none").validate()
    with pytest.raises(ConfigError, match=r"^report_to: got 'tensorbored', must be one of none"):
        FinetuneConfig(data="x", report_to="tensorbored").validate()
    missing = next(
        name for name in ("tensorboard", "wandb", "mlflow", "dvclive", "swanlab")
        if name not in get_available_reporting_integrations() and not find_spec(name)
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(data="x", report_to=f"none,{missing}").validate()
    assert str(e.value) == (
        f"report_to: {missing} is not installed (pip install {missing}), or pass --report-to none"
    )
