"""The pipeline: every stage from one YAML file, stage folders, report, skip-on-rerun, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from core.lm.loader import load_model
from core.train.config import ConfigError
from core.train.data import DATA_DIR
from core.train.stages.pipeline import DEFAULT_PIPELINE, load_pipeline_config, run_pipeline


def head(name: str, n: int, tmp_path) -> str:
    lines = (DATA_DIR / name).read_text().splitlines()[:n]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_tiny_pipeline_writes_every_stage_and_skips_them_on_rerun(tmp_path):
    prefs, prefs_eval = (
        head("prefs_train.jsonl", 6, tmp_path),
        head("prefs_heldout.jsonl", 4, tmp_path),
    )
    tiny = {"batch_size": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}
    config = {
        "base_model": "tutor-base",
        "heldout_file": head("sft_heldout.jsonl", 3, tmp_path),
        "sft": {**tiny, "max_steps": 2, "train_file": head("sft_train.jsonl", 8, tmp_path),
                "eval_file": head("sft_heldout.jsonl", 3, tmp_path)},
        "reward": {**tiny, "max_steps": 2, "train_file": prefs, "eval_file": prefs_eval},
        "rlhf": {**tiny, "method": "ppo", "max_steps": 1, "minibatches": 2, "ppo_epochs": 1,
                 "max_new_tokens": 8, "eval_samples": 1, "train_file": prefs,
                 "eval_file": prefs_eval},
        "dpo": {**tiny, "max_steps": 1, "train_file": prefs, "eval_file": prefs_eval,
                "max_new_tokens": 8, "eval_samples": 1},
        "eval_samples": 1,
        "sample_prompts": ["What is a token?"],
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cfg = load_pipeline_config(path)
    metrics = run_pipeline(cfg, out, progress=False, echo=lambda s: None)
    for stage in ("base", "sft", "rlhf", "dpo"):
        load_model(out / stage)  # a complete Hugging Face folder
    assert (out / "reward" / "score_head.safetensors").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["key_term_accuracy"]) == {"base", "sft", "rlhf", "dpo"}
    assert set(saved["rm_prefers_over_sft"]) == {"rlhf", "dpo"}
    assert set(saved["padded_share"]) == {"sft", "rlhf", "dpo"}
    assert all(0 <= v <= 1 for v in saved["padded_share"].values())
    for stage, counts in saved["key_term_vs_sft"].items():  # at most the 3 held-out questions
        assert stage in ("rlhf", "dpo") and counts["better"] + counts["worse"] <= 3
    assert saved["seconds"]["total"] > 0 and metrics["heldout_prompts"] == 2
    report = (out / "report.md").read_text()
    assert (
        "**What is a token?**" in report and "- rlhf: " in report and "key-term accuracy" in report
    )
    said = []
    run_pipeline(load_pipeline_config(path), out, progress=False, echo=said.append)
    assert sum("complete: skipped" in s for s in said) == 5


def test_pipeline_config_errors_name_file_section_and_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("sft:\n  max_stpes: 3\n")
    with pytest.raises(
        ConfigError, match=r"p.yaml: sft: unknown key 'max_stpes' \(did you mean 'max_steps'"
    ):
        load_pipeline_config(path)
    path.write_text("rlhf: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"p.yaml: rlhf: expected a mapping"):
        load_pipeline_config(path)
    path.write_text("treads: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'treads' \(did you mean 'threads'"):
        load_pipeline_config(path)


def test_default_pipeline_config_loads_and_pretrains_by_default():
    cfg = load_pipeline_config(DEFAULT_PIPELINE)
    assert cfg.base_model is None and cfg.rlhf["method"] == "ppo"
