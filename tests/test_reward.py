"""The reward model: Bradley-Terry loss as binary classification, last-token scores, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss
from transformers import AutoModelForCausalLM

from core import load_model
from core.lm.chat_format import encode_answer, pad_sequences
from core.lm.loader import PRETRAINED_DIR
from core.lm.tokenizer import load_tokenizer
from core.train.losses import bradley_terry_loss
from core.train.stages.reward import (
    RewardConfig,
    RewardModel,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)

TOKENIZER = load_tokenizer(PRETRAINED_DIR / "tutor-base")


def test_bradley_terry_is_logistic_regression_on_the_score_difference():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(64, generator=g) * 2, torch.randn(64, generator=g) * 2
    loss = bradley_terry_loss(chosen, rejected).item()
    # binary cross-entropy of "the first answer is preferred" (label 1), logit = difference
    diff = chosen - rejected
    assert loss == pytest.approx(F.binary_cross_entropy_with_logits(diff, torch.ones(64)).item())
    # scikit-learn's log loss of a classifier that predicts P(label 1) = sigmoid(difference)
    probs = torch.sigmoid(torch.cat([diff, -diff])).double().numpy()
    labels = [1] * 64 + [0] * 64  # the same pairs, presented in both orders
    assert loss == pytest.approx(log_loss(labels, probs), rel=1e-5)


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    rm = RewardModel(load_model("tutor-base"))
    torch.nn.init.normal_(rm.score.weight, std=0.1)
    short = encode_answer(TOKENIZER, "What is a token?", "A piece of text.")
    long = encode_answer(TOKENIZER, "What is a token?", "A token is a piece of text, often a word.")
    assert short[-1] == TOKENIZER.convert_tokens_to_ids("<|end|>")
    ids, lengths = pad_sequences([short, long], TOKENIZER.pad_token_id)
    with torch.no_grad():
        batch = rm(ids, lengths)
        alone = rm(torch.tensor([short]), torch.tensor([len(short)]))
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_saved_reward_model_reloads_and_its_backbone_is_a_transformers_llama(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(load_model("tutor-base"))
    torch.nn.init.normal_(rm.score.weight, std=0.1)
    save_reward_model(rm, tmp_path / "rm", tokenizer=TOKENIZER)
    again = load_reward_model(tmp_path / "rm")
    scores = again.score_texts(TOKENIZER, ["What is a token?"] * 2, ["A piece of text.", "No."])
    assert torch.allclose(scores, rm.score_texts(TOKENIZER, ["What is a token?"] * 2,
                                                 ["A piece of text.", "No."]), atol=1e-5)  # fmt: skip
    AutoModelForCausalLM.from_pretrained(tmp_path / "rm")  # loads without complaint
    with pytest.raises(ValueError, match="not a reward model folder"):
        load_reward_model(PRETRAINED_DIR / "tutor-base")


def test_training_separates_chosen_from_rejected(tmp_path):
    rows = [
        {
            "prompt": "What is a token?",
            "chosen": "A token is a piece of text.",
            "rejected": "Go away.",
        },
        {"prompt": "What is a cat?", "chosen": "A cat is an animal.", "rejected": "I do not know."},
        {"prompt": "What is the sun?", "chosen": "The sun is a star.", "rejected": "Look it up."},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardConfig(
        model="tutor-base", train_file=str(path), eval_file=str(path), max_steps=8, batch_size=3,
        learning_rate=2e-3, warmup_steps=1, eval_every=4, checkpoint_every=4, threads=2,
    )  # fmt: skip
    report = train_reward_model(cfg, tmp_path / "rm", progress=False)
    first = json.loads((tmp_path / "rm/metrics.jsonl").read_text().splitlines()[0])
    assert first["eval_loss"] == pytest.approx(0.6931, abs=1e-4)  # zero head: no preference yet
    assert report["eval_accuracy"] == 1.0 and report["eval_loss"] < first["eval_loss"]
    assert (tmp_path / "rm/final/score_head.safetensors").is_file()


def test_identical_pair_stops_before_training(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    cfg = RewardConfig(model="tutor-base", train_file=str(path), eval_file=str(path))
    with pytest.raises(ValueError, match=r"prefs.jsonl:1: chosen: identical to rejected"):
        train_reward_model(cfg, tmp_path / "rm", progress=False)
    assert not (tmp_path / "rm").exists()
