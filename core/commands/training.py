"""The training-stage subcommands: `pretrain`, `sft`, `reward`, `rlhf`, `pipeline` (and
`feedback-retrain`, on the dashboard's stored rankings). Each builds
its stage's config from YAML, `--set key=value` and flags (in that order of precedence, flags
last), and calls the stage in core/train/stages/.

Every --output-dir is claimed first (core.outputs): a new or empty folder, or the command's own
run folder; a folder of anything else is refused in one line, or with --overwrite moved aside to
DIR.old-TIMESTAMP. Nothing of the user's is deleted or written over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from core.cli import cli_errors
from core.lm.chat_format import encode_conversation, mask_view
from core.lm.loader import PRETRAINED_DIR, resolve_model_path, ship_model
from core.lm.tokenizer import load_tokenizer
from core.outputs import OVERWRITE_HELP, claim_output_folder
from core.train.config import ConfigError, load_config, parse_set_options
from core.train.data import conversation_messages, load_rows
from core.train.stages.pipeline import load_pipeline_config, markdown_report, run_pipeline
from core.train.stages.pipeline import ship as ship_stages
from core.train.stages.pretrain import PretrainConfig, pretrain
from core.train.stages.reward import RewardConfig, train_reward_model
from core.train.stages.rlhf import RLHFConfig, rlhf
from core.train.stages.sft import SFTConfig, sft

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "tutor-base.yaml"

ConfigOpt = Annotated[Path | None, typer.Option(help="YAML config of this stage's keys.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key: --set key=value (repeatable)."),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output-dir.")
]
SkipOpt = Annotated[
    bool,
    typer.Option(
        "--skip-invalid",
        help="Skip bad dataset rows (written to OUTPUT_DIR/rejects/) instead of stopping.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)]


def _stage_config_file(path: Path) -> bool:
    """A stage's config.yaml: a YAML mapping with the training keys every stage writes."""
    import yaml

    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"max_steps", "learning_rate"} <= data.keys()


def run_folder(path: Path) -> bool:
    """A training stage's own --output-dir (pretrain, sft, reward, rlhf), by what a run writes
    first: checkpoints/, metrics.jsonl, its config.yaml, pre-training's data cache, sft's rejects."""
    path = Path(path)
    return (
        (path / "checkpoints").is_dir()
        or (path / "metrics.jsonl").exists()
        or (path / "tokens.safetensors").is_file()
        or any((path / "rejects" / name).is_file() for name in ("train.jsonl", "eval.jsonl"))
        or _stage_config_file(path / "config.yaml")
    )


def pipeline_folder(path: Path) -> bool:
    """`genai-lab pipeline`'s own --output-dir: its stage runs, its timings, or its base model."""
    path = Path(path)
    return (
        (path / "runs").is_dir()
        or (path / "timings.json").is_file()
        or (path / "base" / "config.json").is_file()
    )


def retrain_folder(path: Path) -> bool:
    """`genai-lab feedback-retrain`'s own --output-dir: its results or its two stage runs."""
    path = Path(path)
    return (
        (path / "retrain.json").is_file()
        or (path / "heldout.jsonl").is_file()
        or run_folder(path / "reward")
        or run_folder(path / "policy")
    )


def claim_output_dir(
    output_dir: Path, command: str, own, overwrite: bool, resume: bool = False
) -> None:
    """The --output-dir rule (core.outputs) before any work; --overwrite starts afresh, so it
    cannot be combined with --resume."""
    if overwrite and resume:
        raise ConfigError(
            "--overwrite starts afresh (the old folder moved aside) and --resume continues it: "
            "pass one of them"
        )
    claim_output_folder(output_dir, command, own, overwrite=overwrite, flag="--output-dir")


def check_ship_name(name: str) -> Path:
    """--ship NAME: a plain folder name under core/pretrained, free or holding a shipped model
    (which the new one replaces). Checked before training, not after."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
        raise ConfigError(
            f"--ship: got {name!r}, must be a plain folder name (it goes to core/pretrained/NAME)"
        )
    dest = PRETRAINED_DIR / name
    if dest.exists() or dest.is_symlink():
        model = dest.is_dir() and (dest / "config.json").is_file()
        if not model and not (dest.is_dir() and not any(dest.iterdir())):
            raise ConfigError(
                f"--ship: {dest} exists and is not a model genai-lab shipped: pass another NAME"
            )
    return dest


def _summary(report: dict) -> None:
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


def _overrides(set_: list[str] | None, **flags) -> dict:
    overrides = parse_set_options(set_)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides


@cli_errors
def pretrain_command(
    config: Annotated[
        Path | None, typer.Option(help="YAML config (default: the tutor-base recipe).")
    ] = None,
    output_dir: Annotated[
        Path, typer.Option(help="Where checkpoints, metrics and the model go.")
    ] = Path("runs/pretrain"),
    corpus: Annotated[
        str | None, typer.Option(help="Your own text: a .txt/.md file or a folder of them.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (init and batches).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output-dir.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any config key: --set key=value (repeatable)."),
    ] = None,
    ship: Annotated[
        str | None, typer.Option(help="Also copy the result (fp16) to core/pretrained/NAME.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Stage 1: pre-train the GPT on the bundled corpus (or your own text) from scratch."""
    overrides = _overrides(
        set_,
        corpus=corpus,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
    )
    cfg = load_config(PretrainConfig, config or DEFAULT_CONFIG, overrides)
    cfg.validate()  # (bad values before the folder is touched)
    if ship:
        check_ship_name(ship)
    claim_output_dir(output_dir, "pretrain", run_folder, overwrite, resume)
    report = pretrain(cfg, output_dir, resume=resume, progress=not quiet)
    summary = {k: v for k, v in report.items() if k != "config"}
    typer.echo(json.dumps(summary, indent=2))
    if ship:
        ship_model(Path(output_dir) / "final", ship, report)
        typer.echo(f"shipped to core/pretrained/{ship}")


@cli_errors
def sft_command(
    config: ConfigOpt = None,
    output_dir: Annotated[Path, typer.Option(help="Checkpoints, metrics, final/.")] = Path(
        "runs/sft"
    ),
    model: Annotated[str | None, typer.Option(help="Base model folder or name.")] = None,
    train_file: Annotated[
        str | None, typer.Option(help="JSONL: messages or prompt/response.")
    ] = None,
    eval_file: Annotated[str | None, typer.Option(help="Held-out JSONL, same format.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    show_mask: Annotated[
        int,
        typer.Option(
            min=0, help="Print N training examples with the trained-on tokens in [brackets]."
        ),
    ] = 0,
    resume: ResumeOpt = False,
    skip_invalid: SkipOpt = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Stage 2: supervised fine-tuning on conversations (loss on the assistant's tokens only)."""
    overrides = _overrides(
        set_, model=model, train_file=train_file, eval_file=eval_file, max_steps=max_steps
    )
    if skip_invalid:
        overrides["skip_invalid"] = True
    cfg = load_config(SFTConfig, config, overrides)
    if show_mask:
        tokenizer = load_tokenizer(resolve_model_path(cfg.model))
        rows = load_rows(cfg.train_file, conversation_messages, cfg.skip_invalid, echo=typer.echo)
        for where, messages in rows[:show_mask]:
            typer.echo(
                f"{where}: {mask_view(tokenizer, *encode_conversation(tokenizer, messages))}"
            )
        return
    cfg.validate()
    claim_output_dir(output_dir, "sft", run_folder, overwrite, resume)
    _summary(sft(cfg, output_dir, resume=resume, progress=not quiet, echo=typer.echo))


@cli_errors
def reward_command(
    config: ConfigOpt = None,
    output_dir: Annotated[Path, typer.Option(help="Checkpoints, metrics, final/.")] = Path(
        "runs/reward"
    ),
    model: Annotated[str | None, typer.Option(help="Backbone: usually the SFT model.")] = None,
    train_file: Annotated[str | None, typer.Option(help="JSONL: prompt, chosen, rejected.")] = None,
    eval_file: Annotated[str | None, typer.Option(help="Held-out pairs, same format.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    resume: ResumeOpt = False,
    skip_invalid: SkipOpt = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Stage 3a: train a reward model on preference pairs (Bradley-Terry loss)."""
    overrides = _overrides(
        set_, model=model, train_file=train_file, eval_file=eval_file, max_steps=max_steps
    )
    if skip_invalid:
        overrides["skip_invalid"] = True
    cfg = load_config(RewardConfig, config, overrides)
    cfg.validate()
    claim_output_dir(output_dir, "reward", run_folder, overwrite, resume)
    report = train_reward_model(cfg, output_dir, resume=resume, progress=not quiet, echo=typer.echo)
    _summary(report)


@cli_errors
def rlhf_command(
    method: Annotated[str, typer.Option(help="ppo (with a reward model) or dpo.")] = "ppo",
    config: ConfigOpt = None,
    output_dir: Annotated[Path, typer.Option(help="Checkpoints, metrics, final/.")] = Path(
        "runs/rlhf"
    ),
    model: Annotated[str | None, typer.Option(help="Policy start and frozen reference.")] = None,
    reward_model: Annotated[str | None, typer.Option(help="Reward model folder (ppo).")] = None,
    train_file: Annotated[str | None, typer.Option(help="Preference JSONL.")] = None,
    eval_file: Annotated[str | None, typer.Option(help="Held-out preference JSONL.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="PPO rollouts / DPO steps.")] = None,
    resume: ResumeOpt = False,
    skip_invalid: SkipOpt = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Stage 3b: optimise the chat model with PPO against a reward model, or with DPO."""
    overrides = _overrides(
        set_,
        method=method,
        model=model,
        reward_model=reward_model,
        train_file=train_file,
        eval_file=eval_file,
        max_steps=max_steps,
    )
    if skip_invalid:
        overrides["skip_invalid"] = True
    cfg = load_config(RLHFConfig, config, overrides)
    cfg.validate()
    claim_output_dir(output_dir, "rlhf", run_folder, overwrite, resume)
    _summary(rlhf(cfg, output_dir, resume=resume, progress=not quiet, echo=typer.echo))


@cli_errors
def pipeline_command(
    config: Annotated[
        Path | None, typer.Option(help="Pipeline YAML (default: core/configs/pipeline.yaml).")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="base/, sft/, reward/, rlhf/, report.")] = Path(
        "runs/pipeline"
    ),
    base_model: Annotated[
        str | None, typer.Option(help="Start from this base model instead of pre-training.")
    ] = None,
    ship: Annotated[
        bool,
        typer.Option(
            "--ship", help="Copy sft/ and rlhf/ (and a pre-trained base/) to core/pretrained."
        ),
    ] = False,
    ship_rlhf_from: Annotated[
        str, typer.Option(help="Which stage becomes tutor-rlhf: rlhf (PPO) or dpo.")
    ] = "rlhf",
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """All stages: pre-train -> SFT -> reward model -> PPO (+ DPO), with a report. Re-running
    skips finished stages and resumes an interrupted one."""
    overrides = {"base_model": base_model} if base_model else {}
    cfg = load_pipeline_config(config, overrides)
    _check_pipeline_values(cfg, output_dir)
    claim_output_dir(output_dir, "pipeline", pipeline_folder, overwrite)
    metrics = run_pipeline(cfg, output_dir, progress=not quiet, echo=typer.echo)
    typer.echo(markdown_report(metrics))
    if ship:
        include_base = cfg.base_model is None
        for path in ship_stages(output_dir, include_base, rlhf_from=ship_rlhf_from):
            typer.echo(f"shipped {path}")


def _check_pipeline_values(cfg, output_dir: Path) -> None:
    """Every stage's values checked before the first one trains: run_pipeline checks keys and
    types up front, but values only when each stage starts, so `rlhf: {minibatches: 0}` would
    otherwise fail after an hour of pre-training."""
    from core.train.stages.pipeline import _pretrain_config, _stage_configs

    names = ("sft", "reward", "rlhf", "dpo")
    stages = list(zip(names, _stage_configs(cfg, Path(output_dir)), strict=True))
    if cfg.base_model is None:
        stages.insert(0, ("pretrain", _pretrain_config(cfg)))
    for name, stage_cfg in stages:
        if stage_cfg is None:
            continue
        try:
            stage_cfg.validate()
        except ValueError as e:
            raise ConfigError(f"{cfg.source or 'pipeline config'}: {name}: {e}") from None


@cli_errors
def feedback_retrain_command(
    db: Annotated[Path, typer.Option(help="The feedback store (SQLite) of ranked answers.")] = Path(
        "runs/feedback.db"
    ),
    output_dir: Annotated[Path, typer.Option(help="reward/ and policy/ (the new tutor).")] = Path(
        "runs/feedback"
    ),
    model: Annotated[str, typer.Option(help="Backbone of the reward model and policy start.")] = (
        "tutor-sft"
    ),
    reward_steps: Annotated[int, typer.Option(help="Reward-model optimizer steps.")] = 20,
    policy_steps: Annotated[int, typer.Option(help="DPO optimizer steps.")] = 10,
    eval_pairs: Annotated[
        int,
        typer.Option(
            min=0, help="Held-out figures on the first N bundled held-out pairs (0: all of them)."
        ),
    ] = 0,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Retrain a reward model and a DPO policy on the rankings stored in --db
    (core.train.stages.feedback.retrain), then score each ranked answer with the reward model before
    and after, and answer the ranked questions with the policy before and after
    (core.train.stages.feedback.measure_retrain); writes OUTPUT_DIR/retrain.json."""
    from core.atomic import write_text_atomic
    from core.train.stages.feedback import FeedbackStore, measure_retrain, retrain

    if not db.is_file():
        raise ConfigError(f"{db}: no feedback store yet (rank some answers first)")
    if reward_steps < 1 or policy_steps < 1:
        raise ConfigError("--reward-steps and --policy-steps must be at least 1")
    claim_output_dir(output_dir, "feedback-retrain", retrain_folder, overwrite, resume)
    # Small evaluation/checkpoint intervals: the lab runs a few steps, so the defaults
    # (every 25-100 steps) would mean no eval point and no resumable checkpoint.
    reward = {
        "max_steps": reward_steps,
        "eval_every": reward_steps,
        "checkpoint_every": max(1, reward_steps // 2),
    }
    policy = {"max_steps": policy_steps, "eval_every": policy_steps,
              "checkpoint_every": max(1, policy_steps // 2), "eval_samples": 1}  # fmt: skip
    if eval_pairs:
        # Each stage evaluates before its first step and after its last: on all 216 bundled
        # pairs that was two thirds of a lab-sized retrain.
        lines = Path(RewardConfig.eval_file).read_text("utf-8").splitlines()
        kept = [line for line in lines if line.strip()][:eval_pairs]
        heldout = output_dir / "heldout.jsonl"
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(heldout, "".join(line + "\n" for line in kept))
        reward["eval_file"] = policy["eval_file"] = str(heldout)
    with FeedbackStore(db) as store:
        comparisons = store.comparisons()  # what this retrain trains on, measured after it
        reports = retrain(
            store, output_dir, model, reward, policy, progress=not quiet, resume=resume
        )
    reports["measured"] = measure_retrain(comparisons, output_dir, model)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(reports, indent=2, default=str) + "\n"
    write_text_atomic(output_dir / "retrain.json", text)
    typer.echo(text)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
    app.command("sft")(sft_command)
    app.command("reward")(reward_command)
    app.command("rlhf")(rlhf_command)
    app.command("pipeline")(pipeline_command)
    app.command("feedback-retrain")(feedback_retrain_command)
