"""The three training stages in one command: pre-train -> SFT -> reward model -> PPO (and DPO).

`run_pipeline(config, out_dir)` writes

    out_dir/base/  sft/  reward/  rlhf/  (dpo/)   Hugging Face folders (reward/: + score head)
    out_dir/runs/<stage>/                         each stage's checkpoints, metrics.jsonl, report
    out_dir/metrics.json                          every figure below, per stage
    out_dir/report.md                             the figures and sample answers side by side

A stage whose folder exists is complete (folders are written atomically) and is skipped on a
re-run; an interrupted stage resumes from its newest checkpoint.

The figures (all on held-out data never trained on):
  - key-term accuracy: share of greedy answers to held-out question phrasings that contain a key
    term of the reference answer (base, SFT, PPO, DPO);
  - reward-model accuracy on held-out preference pairs;
  - mean reward-model score of sampled answers to held-out prompts, KL(policy ‖ SFT) per answer,
    and the share of prompts where the RM prefers the RLHF model's answers to the SFT model's;
  - the share of those sampled answers that end with filler (the flaw in the bundled
    demonstrations that RLHF should remove, see core/content/tutor_data.py);
  - per held-out question, how many greedy answers gained or lost the key term against SFT's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic
from core.content.tutor_data import is_padded
from core.lm.generate import answer
from core.lm.loader import load_model, resolve_model_path, save_model, ship_model
from core.lm.tokenizer import load_tokenizer
from core.train.config import (
    ConfigError,
    check_key,
    coerce,
    field_types,
    load_config,
    read_yaml_mapping,
)
from core.train.data import DATA_DIR, load_rows
from core.train.data import preference_triple as _pref
from core.train.evaluate import key_term_accuracy
from core.train.stages.pretrain import PretrainConfig, pretrain
from core.train.stages.reward import (
    RewardConfig,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)
from core.train.stages.rlhf import RLHFConfig, rlhf
from core.train.stages.rollouts import evaluate_answers, unique_prompts
from core.train.stages.sft import SFTConfig, sft

CONFIG_DIR = Path(__file__).parents[2] / "configs"
DEFAULT_PIPELINE = CONFIG_DIR / "pipeline.yaml"
SECTIONS = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig}
SAMPLE_PROMPTS = ["What is a token?", "Explain temperature in simple words.", "What is LoRA?"]


@dataclass
class PipelineConfig:
    base_model: str | None = None  # None: pre-train from scratch; else start from this folder/name
    pretrain_config: str = "tutor-base.yaml"  # a PretrainConfig YAML (relative: to this file)
    pretrain: dict = field(default_factory=dict)  # overrides of pretrain_config's keys
    sft: dict = field(default_factory=dict)  # SFTConfig keys
    reward: dict = field(default_factory=dict)  # RewardConfig keys
    rlhf: dict = field(default_factory=dict)  # RLHFConfig keys (method: ppo)
    dpo: dict | None = field(default_factory=dict)  # RLHFConfig keys for DPO; null: skip DPO
    threads: int | None = 2
    eval_samples: int = 8  # sampled answers per held-out prompt for the reward figures
    heldout_file: str = str(DATA_DIR / "sft_heldout.jsonl")  # key-term figure (rows with "concept")
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    source: str = ""  # the YAML file this came from (set by load_pipeline_config)


def _section(cls: type, values: dict | None, where: str, extra: dict | None = None) -> Any:
    """A stage's dataclass from its YAML section, with file: section.key errors."""
    types_ = field_types(cls)
    clean = {}
    for key, value in (values or {}).items():
        check_key(cls, str(key), where)
        clean[key] = coerce(value, types_[key], f"{where}.{key}")
    return cls(**{**clean, **(extra or {})})


def load_pipeline_config(path: str | Path | None = None, overrides: dict | None = None):
    path = Path(path or DEFAULT_PIPELINE)
    data = read_yaml_mapping(path)
    for key, value in data.items():
        check_key(PipelineConfig, str(key), str(path))
        if key in ("pretrain", "sft", "reward", "rlhf", "dpo") and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key}: expected a mapping of stage keys")
            cls = SECTIONS.get(key, RLHFConfig)
            for sub in value:
                check_key(cls, str(sub), f"{path}: {key}")
    flat = {k: v for k, v in data.items() if k not in ("pretrain", "sft", "reward", "rlhf", "dpo")}
    cfg = load_config(PipelineConfig, None, {**flat, **(overrides or {})})
    for key in ("pretrain", "sft", "reward", "rlhf", "dpo"):
        if key in data:
            setattr(cfg, key, data[key])
    cfg.source = str(path)
    return cfg


def _stage_configs(cfg: PipelineConfig, out: Path):
    where = cfg.source or "pipeline config"
    common = {"threads": cfg.threads} if cfg.threads else {}
    sft_cfg = _section(
        SFTConfig, {**common, **cfg.sft}, f"{where}: sft", {"model": str(out / "base")}
    )
    rm_cfg = _section(
        RewardConfig, {**common, **cfg.reward}, f"{where}: reward", {"model": str(out / "sft")}
    )
    stage_models = {"model": str(out / "sft"), "reward_model": str(out / "reward")}
    ppo_cfg = _section(
        RLHFConfig, {"method": "ppo", **common, **cfg.rlhf}, f"{where}: rlhf", stage_models
    )
    dpo_cfg = None
    if cfg.dpo is not None:
        dpo_cfg = _section(
            RLHFConfig, {**common, **cfg.dpo, "method": "dpo"}, f"{where}: dpo", stage_models
        )
    return sft_cfg, rm_cfg, ppo_cfg, dpo_cfg


def _pretrain_config(cfg: PipelineConfig) -> PretrainConfig:
    path = Path(cfg.pretrain_config)
    if not path.is_absolute() and not path.is_file():
        # Relative: next to the pipeline's own file, else one of the bundled configs (so a
        # pipeline YAML that names none still finds tutor-base.yaml).
        beside = Path(cfg.source).parent / path if cfg.source else None
        path = beside if beside is not None and beside.is_file() else CONFIG_DIR / path
    pre = load_config(PretrainConfig, path)
    where = f"{cfg.source or 'pipeline config'}: pretrain"
    values = {**dataclasses.asdict(pre), **({"threads": cfg.threads} if cfg.threads else {})}
    return _section(PretrainConfig, {**values, **cfg.pretrain}, where)


def _done(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run every stage not yet complete, then evaluate all stages; returns the metrics dict."""
    out = Path(out_dir)
    runs = out / "runs"
    sft_cfg, rm_cfg, ppo_cfg, dpo_cfg = _stage_configs(cfg, out)  # config errors before work
    pre_cfg = _pretrain_config(cfg) if cfg.base_model is None else None
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    saved = _read_json(timings_file)
    timings, cpu = saved.get("wall", {}), saved.get("cpu", {})

    def stage(name: str, folder: Path, run: Callable[[], None]) -> None:
        if _done(folder):
            echo(f"[{name}] {folder} is complete: skipped")
            return
        echo(f"[{name}] training -> {folder}")
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        timings[name] = timings.get(name, 0.0) + round(time.perf_counter() - t0, 1)
        # CPU seconds of this process: on a machine shared with other jobs, wall time
        # overstates the work, and CPU time (with `threads` threads) is what a quiet one needs.
        cpu[name] = cpu.get(name, 0.0) + round(time.process_time() - c0, 1)
        write_text_atomic(timings_file, json.dumps({"wall": timings, "cpu": cpu}, indent=2) + "\n")

    def base() -> None:
        if cfg.base_model is not None:
            source = resolve_model_path(cfg.base_model)
            save_model(load_model(source), out / "base", tokenizer=load_tokenizer(source))
            return
        pretrain(pre_cfg, runs / "base", resume=True, progress=progress)
        _publish(runs / "base" / "final", out / "base")

    def run_stage(fn, stage_cfg, name: str, target: str) -> Callable[[], None]:
        def run() -> None:
            fn(stage_cfg, runs / name, resume=True, progress=progress, echo=echo)
            _publish(runs / name / "final", out / target, reward=name == "reward")

        return run

    stage("base", out / "base", base)
    stage("sft", out / "sft", run_stage(sft, sft_cfg, "sft", "sft"))
    stage("reward", out / "reward", run_stage(train_reward_model, rm_cfg, "reward", "reward"))
    stage("rlhf", out / "rlhf", run_stage(rlhf, ppo_cfg, "rlhf", "rlhf"))
    if dpo_cfg is not None:
        stage("dpo", out / "dpo", run_stage(rlhf, dpo_cfg, "dpo", "dpo"))

    echo("[evaluate] held-out figures and sample answers")
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = evaluate_pipeline(cfg, out, ppo_cfg)
    timings["evaluate"] = round(time.perf_counter() - t0, 1)
    cpu["evaluate"] = round(time.process_time() - c0, 1)
    metrics["seconds"] = {**timings, "total": round(sum(timings.values()), 1)}
    metrics["pretrain_seconds_recorded"] = _base_train_seconds(cfg, out)
    metrics["cpu_seconds"] = {**cpu, "total": round(sum(cpu.values()), 1)}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown_report(metrics))
    return metrics


def _read_json(path: Path) -> dict:
    """A bookkeeping file of an earlier run; one torn by a kill counts as absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _base_train_seconds(cfg: PipelineConfig, out: Path) -> float | None:
    """Pre-training time: this run's, or the one recorded beside a given base model."""
    if cfg.base_model is None:
        report = out / "runs" / "base" / "report.json"
    else:
        report = resolve_model_path(cfg.base_model) / "training_report.json"
    return json.loads(report.read_text()).get("train_seconds") if report.is_file() else None


def _publish(final: Path, target: Path, reward: bool = False) -> None:
    """Copy a run's final folder to the pipeline's stage folder (atomically, via save)."""
    tokenizer = load_tokenizer(final)
    if reward:
        save_reward_model(load_reward_model(final), target, tokenizer=tokenizer)
    else:
        save_model(load_model(final), target, tokenizer=tokenizer)


def evaluate_pipeline(cfg: PipelineConfig, out: Path, ppo_cfg: RLHFConfig) -> dict:
    """All the stage figures on held-out data (see the module docstring)."""
    tokenizer = load_tokenizer(out / "sft")
    stages = [s for s in ("base", "sft", "rlhf", "dpo") if _done(out / s)]
    models = {s: load_model(out / s) for s in stages}
    heldout = [json.loads(x) for x in Path(cfg.heldout_file).read_text("utf-8").splitlines() if x]
    metrics: dict = {"key_term_accuracy": {}, "sample_prompts": cfg.sample_prompts, "samples": {}}
    hits = {}
    for s, model in models.items():
        result = key_term_accuracy(model, tokenizer, heldout)
        metrics["key_term_accuracy"][s], hits[s] = result["key_term_accuracy"], result["hits"]
        metrics["samples"][s] = [answer(model, tokenizer, p) for p in cfg.sample_prompts]
    # Question by question: which greedy answers gained or lost the key term against SFT's.
    metrics["key_term_vs_sft"] = {
        s: {
            "better": sum(h and not o for h, o in zip(hits[s], hits["sft"], strict=True)),
            "worse": sum(o and not h for h, o in zip(hits[s], hits["sft"], strict=True)),
        }
        for s in ("rlhf", "dpo")
        if s in hits and "sft" in hits
    }
    rm = load_reward_model(out / "reward")
    reward_report = json.loads((out / "runs" / "reward" / "report.json").read_text())
    metrics["reward_model"] = {
        k: reward_report[k] for k in ("eval_accuracy", "eval_margin", "eval_pairs", "train_pairs")
    }
    prompts = unique_prompts(load_rows(ppo_cfg.eval_file, _pref))
    rewards = {}
    for s in [s for s in ("sft", "rlhf", "dpo") if s in models]:
        rewards[s] = evaluate_answers(
            models[s], models["sft"], rm, tokenizer, prompts, cfg.eval_samples,
            ppo_cfg.max_new_tokens, seed=12345,
        )  # fmt: skip
    metrics["heldout_prompts"] = len(prompts)
    metrics["reward"] = {s: r["reward"] for s, r in rewards.items()}
    metrics["kl_to_sft"] = {s: r["kl"] for s, r in rewards.items()}
    metrics["padded_share"] = {}
    for s, r in rewards.items():
        texts = [t for per_prompt in r["answers"] for t in per_prompt]
        metrics["padded_share"][s] = sum(map(is_padded, texts)) / len(texts)
    metrics["rm_prefers_over_sft"], metrics["rm_vs_sft"] = {}, {}
    for s in ("rlhf", "dpo"):
        if s in rewards:
            pairs = list(
                zip(
                    rewards[s]["per_prompt_reward"],
                    rewards["sft"]["per_prompt_reward"],
                    strict=True,
                )
            )
            # Identical answers get identical scores: a tie is not a preference, so it is counted
            # apart (it happens often when both models answer a question the same way).
            wins = sum(a > b + 1e-4 for a, b in pairs)
            losses = sum(b > a + 1e-4 for a, b in pairs)
            metrics["rm_prefers_over_sft"][s] = wins / len(prompts)
            metrics["rm_vs_sft"][s] = {"wins": wins, "ties": len(pairs) - wins - losses,
                                       "losses": losses}  # fmt: skip
    return metrics


def markdown_report(m: dict) -> str:
    stages = list(m["key_term_accuracy"])
    lines = ["# Training pipeline report", "", "## Figures (held-out data)", ""]
    lines += ["| figure | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    lines.append(
        "| key-term accuracy (greedy) | "
        + " | ".join(f"{m['key_term_accuracy'][s]:.1%}" for s in stages)
        + " |"
    )
    for name, key, fmt in (
        ("mean RM reward (sampled)", "reward", "{:.3f}"),
        ("KL to SFT per answer (nats)", "kl_to_sft", "{:.3f}"),
        ("RM prefers over SFT", "rm_prefers_over_sft", "{:.1%}"),
        ("sampled answers ending with filler", "padded_share", "{:.1%}"),
    ):
        cells = [fmt.format(m[key][s]) if s in m.get(key, {}) else "–" for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for s, c in m.get("rm_vs_sft", {}).items():
        lines.append(
            f"\n{s} vs SFT, per held-out prompt (mean RM score of its sampled answers): "
            f"{c['wins']} wins, {c['ties']} ties (same answers), {c['losses']} losses."
        )
    for s, c in m.get("key_term_vs_sft", {}).items():
        lines.append(
            f"\n{s} vs SFT, greedy answers per held-out question: {c['better']} gained the key "
            f"term, {c['worse']} lost it."
        )
    rm = m["reward_model"]
    lines += [
        "",
        f"Reward model: {rm['eval_accuracy']:.1%} accuracy on {rm['eval_pairs']} held-out "
        f"preference pairs (mean margin {rm['eval_margin']:.2f}); "
        f"{m['heldout_prompts']} held-out prompts for the reward figures.",
        "",
        "## Time (seconds)",
        "",
        "| | " + " | ".join(m["seconds"]) + " |",
        "|---" * (len(m["seconds"]) + 1) + "|",
        "| wall | " + " | ".join(str(v) for v in m["seconds"].values()) + " |",
        "| CPU | " + " | ".join(str(m["cpu_seconds"].get(k, "")) for k in m["seconds"]) + " |",
        "",
        f"Pre-training of the base model: {m['pretrain_seconds_recorded']} s (its own report).",
        "",
        "## Sample answers (greedy)",
        "",
    ]
    for i, question in enumerate(m["sample_prompts"]):
        lines += [f"**{question}**", ""]
        for s, answers in m["samples"].items():
            lines.append(f"- {s}: {answers[i]}")
        lines.append("")
    return "\n".join(lines)


def ship(out_dir: str | Path, include_base: bool = False, rlhf_from: str = "rlhf") -> list[Path]:
    """Copy the pipeline's sft/ and rlhf/ (and base/) into core/pretrained as fp16 folders.
    `rlhf_from="dpo"` ships the DPO model as tutor-rlhf instead of the PPO one."""
    if rlhf_from not in ("rlhf", "dpo"):
        raise ValueError(f"rlhf_from must be 'rlhf' (PPO) or 'dpo', got {rlhf_from!r}")
    out = Path(out_dir)
    names = [("sft", "tutor-sft"), (rlhf_from, "tutor-rlhf")]
    if include_base:
        names.insert(0, ("base", "tutor-base"))
    shipped = []
    for stage_name, name in names:
        run = out / "runs" / stage_name
        if not _done(out / stage_name):
            raise FileNotFoundError(f"{out / stage_name}: stage not complete, nothing to ship")
        report = json.loads((run / "report.json").read_text())
        shipped.append(ship_model(run / "final", name, report))
    # the figures measured on these very models travel with the final stage
    for source, target in (
        ("metrics.json", "pipeline_metrics.json"),
        ("report.md", "pipeline_report.md"),
    ):
        if (out / source).is_file():
            shutil.copy(out / source, shipped[-1] / target)
    return shipped
