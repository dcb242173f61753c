"""The shipped base model: a real pre-trained GPT that loads offline, in ours and in transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import load_model
from core.content import corpus
from core.lm.loader import PRETRAINED_DIR, resolve_model_path
from core.lm.tokenizer import load_tokenizer
from core.train.evaluate import next_word_kl, word_probabilities

BASE = PRETRAINED_DIR / "tutor-base"


@pytest.fixture(scope="module")
def tutor():
    return load_model("tutor-base"), load_tokenizer(BASE)


def test_shipped_files_are_small_safetensors_with_tokenizer():
    names = {p.name for p in BASE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_report.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    weights = sum(p.stat().st_size for p in BASE.iterdir() if p.suffix == ".safetensors")
    assert weights <= 8 * 1024 * 1024


@pytest.mark.slow
def test_next_word_distribution_is_close_to_the_truth(tutor):
    model, tokenizer = tutor
    kl = next_word_kl(model, tokenizer, corpus.held_out_prefixes(400, seed=2024))
    assert kl <= 0.1


def test_artifact_recorded_pretraining_time_is_within_budget():
    """An artifact check: the time `make model` recorded on the 2-core machine (the slow tier's
    test_pretrain runs pre-training for real)."""
    report = json.loads((BASE / "training_report.json").read_text())
    assert report["train_seconds"] <= 600


def test_the_cat_sat_on_the(tutor):
    model, tokenizer = tutor
    truth = corpus.next_word_distribution("The cat sat on the")
    predicted = word_probabilities(model, tokenizer, "The cat sat on the", list(truth))
    assert sum(predicted.values()) > 0.9  # almost all mass on the words the corpus allows
    for word, p in truth.items():
        assert predicted[word] == pytest.approx(p, abs=0.1), word


def test_transformers_loads_the_shipped_model_with_same_logits(tutor):
    model, _ = tutor
    reference = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(BASE)
    ids = torch.tensor([hf_tokenizer.encode("<|endoftext|>Once upon a time there was a")])
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4


def test_tutor_name_resolves_to_a_shipped_stage():
    assert resolve_model_path("tutor").parent == PRETRAINED_DIR


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core", *args], capture_output=True, text=True, env=env
    )


def test_generate_cli_streams_a_continuation():
    result = run_cli(
        "generate", "--model", "tutor-base", "--prompt", "The cat sat on the",
        "--temperature", "0", "--max-new-tokens", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    assert out.startswith("The cat sat on the ")
    next_word = corpus.split_words(out)[5]
    assert next_word in corpus.next_word_distribution("The cat sat on the")


def test_generate_cli_stops_at_the_end_of_the_document():
    result = run_cli(
        "generate", "--model", "tutor-base", "--prompt", "The cat sat on the",
        "--temperature", "0", "--max-new-tokens", "60",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout.strip()
    # One whole document: the corpus can produce it, and it may end right here. Text that ran on
    # into a second document would make next_word_distribution raise.
    assert corpus.END_OF_TEXT in corpus.next_word_distribution(text)


def test_generate_cli_errors_are_one_line(tmp_path):
    """In-process through typer's runner (no new interpreter per case)."""
    from typer.testing import CliRunner

    from core.cli import build_app

    def run(*args):
        result = CliRunner().invoke(build_app(), ["generate", *args])
        return result.exit_code, result.output

    code, out = run("--model", "tutor-base", "--prompt", "The cat sat on the mat. " * 60)
    assert code == 1 and "context is 128 tokens" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # no weights, not causal
    code, out = run("--model", str(tmp_path), "--prompt", "hi")
    assert code == 1 and str(tmp_path) in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1
    code, out = run("--model", "tutr", "--prompt", "hi")
    assert code == 1 and "unknown model 'tutr'" in out
