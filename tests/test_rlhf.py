"""PPO and DPO: the losses against references, the batched sampler, and short real runs."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from core import load_model
from core.lm.chat_format import encode_prompt, stop_ids
from core.lm.generate import generate, sample_batch
from core.lm.loader import PRETRAINED_DIR
from core.lm.sampling import SamplingParams
from core.lm.tokenizer import load_tokenizer
from core.train.losses import dpo_loss, gae, ppo_losses
from core.train.stages.rlhf import RLHFConfig, rlhf
from core.train.stages.rollouts import answer_mask, sequence_logprobs

TOKENIZER = load_tokenizer(PRETRAINED_DIR / "tutor-base")


# ---------------------------------------------------------------------------------------------
# DPO == TRL


def trl_dpo_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta):
    """Run TRL's own DPOTrainer._compute_loss (sigmoid loss, precomputed reference log-probs) on
    given per-token log-probabilities. The trainer and the model are stand-ins that only carry
    settings and hand TRL these log-probs; all loss arithmetic is TRL's."""
    n = per_token_logps.shape[0]
    outputs = SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps),
        is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, per_token_logps.shape[1] + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, per_token_logps.shape[1] + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(beta):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    completion_mask = (torch.rand(2 * B, T + 1, generator=g) > 0.3).long()
    completion_mask[:, 0] = 0  # the first token is never predicted
    per_token = -torch.rand(2 * B, T, generator=g) * 3 * completion_mask[:, 1:]  # 0 off-answer
    ref_chosen, ref_rejected = -torch.rand(B, generator=g) * 10, -torch.rand(B, generator=g) * 10
    expected = trl_dpo_loss(per_token, completion_mask, ref_chosen, ref_rejected, beta)
    summed = per_token.sum(1)
    ours, r_c, r_r = dpo_loss(summed[:B], summed[B:], ref_chosen, ref_rejected, beta)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(r_c, beta * (summed[:B] - ref_chosen))
    assert torch.allclose(r_r, beta * (summed[B:] - ref_rejected))


# ---------------------------------------------------------------------------------------------
# GAE and the PPO loss == loop-by-loop references


def reference_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE, one sequence and one token at a time in plain floats."""
    B, R = rewards.shape
    adv, ret = torch.zeros(B, R), torch.zeros(B, R)
    for b in range(B):
        n = int(lengths[b])
        a = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            a = delta + gamma * lam * a
            adv[b, t] = a
            ret[b, t] = a + float(values[b, t])
    return adv, ret


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_the_loop_reference(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    lengths = torch.tensor([6, 4, 1])
    mask = answer_mask(lengths, 6)
    rewards = rewards * mask
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-6)
    assert torch.allclose(ret, ref_ret, atol=1e-6)


def test_ppo_losses_match_the_loop_reference():
    g = torch.Generator().manual_seed(2)
    B, R, eps, eps_v = 3, 5, 0.2, 0.3
    logp_old = -torch.rand(B, R, generator=g) * 2
    logp_new = logp_old + torch.randn(B, R, generator=g) * 0.4  # some ratios leave [0.8, 1.2]
    adv, v_old = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    v_new, returns = v_old + torch.randn(B, R, generator=g) * 0.5, torch.randn(B, R, generator=g)
    mask = answer_mask(torch.tensor([5, 3, 2]), R)
    out = ppo_losses(logp_new, logp_old, adv, v_new, v_old, returns, mask, eps, eps_v)

    pg, vf, clipped, n = 0.0, 0.0, 0, 0
    for b in range(B):
        for t in range(R):
            if not mask[b, t]:
                continue
            ratio = float(torch.exp(logp_new[b, t] - logp_old[b, t]))
            a = float(adv[b, t])
            pg += max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
            clipped += -a * min(max(ratio, 1 - eps), 1 + eps) > -a * ratio
            v, vo, r = float(v_new[b, t]), float(v_old[b, t]), float(returns[b, t])
            vc = vo + min(max(v - vo, -eps_v), eps_v)
            vf += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
            n += 1
    assert 0 < clipped < n  # the fixed tensors exercise both branches
    assert out["policy_loss"].item() == pytest.approx(pg / n, rel=1e-5)
    assert out["value_loss"].item() == pytest.approx(vf / n, rel=1e-5)
    assert out["clip_fraction"].item() == pytest.approx(clipped / n, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the batched sampler


def test_batched_greedy_sampling_equals_batch_one_generation():
    model = load_model("tutor-base")
    prompts = ["What is a token?", "What is a cat?"]  # equal token length (checked below)
    encoded = [encode_prompt(TOKENIZER, p) for p in prompts]
    assert len(encoded[0]) == len(encoded[1])
    answers, lengths, ended = sample_batch(model, torch.tensor(encoded), 20, stop_ids(TOKENIZER), TOKENIZER.pad_token_id, sampling=SamplingParams(temperature=0.0))  # fmt: skip
    for i, ids in enumerate(encoded):
        single = generate(
            model,
            ids,
            stop_ids=stop_ids(TOKENIZER),
            sampling=SamplingParams(max_tokens=20, temperature=0),
        )
        n = int(lengths[i])
        got = answers[i, :n].tolist()
        if ended[i]:
            assert got[-1] in stop_ids(TOKENIZER)
            got = got[:-1]
        assert got == single
        assert (answers[i, n:] == TOKENIZER.pad_token_id).all()
    logp = sequence_logprobs(model, torch.tensor(encoded), answers)
    assert logp.shape == answers.shape and (logp <= 0).all()


# ---------------------------------------------------------------------------------------------
# short real runs on tiny data


def tiny_prefs(tmp_path):
    rows = [
        {"prompt": "What is a token?", "chosen": "A token is a piece of text.", "rejected": "No."},
        {"prompt": "What is a cat?", "chosen": "A cat is an animal.", "rejected": "Go away."},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_run_raises_preference_accuracy_and_resumes(tmp_path):
    prefs = tiny_prefs(tmp_path)
    cfg = RLHFConfig(
        method="dpo", model="tutor-base", train_file=prefs, eval_file=prefs, max_steps=4,
        batch_size=2, learning_rate=1e-3, warmup_steps=1, eval_every=2, checkpoint_every=2,
        log_every=1, beta=0.5, threads=2,
    )  # fmt: skip
    out = tmp_path / "dpo"
    report = rlhf(cfg, out, progress=False)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval_dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert report["eval_dpo_loss"] < first["eval_dpo_loss"]
    assert report["eval_pref_accuracy"] == 1.0
    cfg.max_steps = 6
    rlhf(cfg, out, resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]


def test_ppo_needs_a_reward_model_and_logs_its_statistics(tmp_path):
    prefs = tiny_prefs(tmp_path)
    with pytest.raises(ValueError, match="ppo needs a reward model"):
        RLHFConfig(method="ppo", train_file=prefs).validate()
    with pytest.raises(ValueError, match="method must be"):
        RLHFConfig(method="a2c", reward_model="x").validate()
    from core.train.stages.reward import RewardModel, save_reward_model

    torch.manual_seed(0)
    rm = RewardModel(load_model("tutor-base"))
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a fixed, arbitrary preference
    save_reward_model(rm, tmp_path / "rm", tokenizer=TOKENIZER)
    cfg = RLHFConfig(
        method="ppo", model="tutor-base", reward_model=str(tmp_path / "rm"), train_file=prefs,
        eval_file=prefs, max_steps=2, batch_size=4, minibatches=2, ppo_epochs=2,
        max_new_tokens=8, eval_every=2, checkpoint_every=1, log_every=1, eval_samples=1,
        threads=2,
    )  # fmt: skip
    out = tmp_path / "ppo"
    report = rlhf(cfg, out, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = lines[1]
    for key in ("reward", "kl", "entropy", "clip_fraction", "policy_loss", "value_loss"):
        assert key in step and math.isfinite(step[key])
    assert abs(step["kl"]) < 1e-4  # first rollout: policy == reference
    assert step["entropy"] > 0
    assert "eval_reward" in report and "eval_kl" in report
    assert (out / "final" / "model.safetensors").is_file()
    assert len(list((out / "checkpoints").iterdir())) == 2
