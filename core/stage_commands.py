"""The training-stage subcommands: `sft`, `reward`, `rlhf`, `pipeline` (see `register`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from core.cli import cli_errors

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


def _summary(report: dict) -> None:
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


def _overrides(set_: list[str] | None, **flags) -> dict:
    from core.config import parse_set_options

    overrides = parse_set_options(set_)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides


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
        typer.Option(help="Print N training examples with the trained-on tokens in [brackets]."),
    ] = 0,
    resume: ResumeOpt = False,
    skip_invalid: SkipOpt = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stage 2: supervised fine-tuning on conversations (loss on the assistant's tokens only)."""
    from core.config import load_config
    from core.sft import SFTConfig, conversation_messages, load_rows, mask_view, sft
    from core.sft import encode_conversation as encode

    overrides = _overrides(
        set_, model=model, train_file=train_file, eval_file=eval_file, max_steps=max_steps
    )
    if skip_invalid:
        overrides["skip_invalid"] = True
    cfg = load_config(SFTConfig, config, overrides)
    if show_mask:
        from core.hf import resolve_model_path
        from core.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_path(cfg.model))
        rows = load_rows(cfg.train_file, conversation_messages, cfg.skip_invalid, echo=typer.echo)
        for where, messages in rows[:show_mask]:
            typer.echo(f"{where}: {mask_view(tokenizer, *encode(tokenizer, messages))}")
        return
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
) -> None:
    """Stage 3a: train a reward model on preference pairs (Bradley-Terry loss)."""
    from core.config import load_config
    from core.reward import RewardConfig, train_reward_model

    overrides = _overrides(
        set_, model=model, train_file=train_file, eval_file=eval_file, max_steps=max_steps
    )
    if skip_invalid:
        overrides["skip_invalid"] = True
    cfg = load_config(RewardConfig, config, overrides)
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
) -> None:
    """Stage 3b: optimise the chat model with PPO against a reward model, or with DPO."""
    from core.config import load_config
    from core.rlhf import RLHFConfig, rlhf

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
) -> None:
    """All stages: pre-train -> SFT -> reward model -> PPO (+ DPO), with a report. Re-running
    skips finished stages and resumes an interrupted one."""
    from core.pipeline import load_pipeline_config, markdown_report, run_pipeline
    from core.pipeline import ship as ship_stages

    overrides = {"base_model": base_model} if base_model else {}
    cfg = load_pipeline_config(config, overrides)
    metrics = run_pipeline(cfg, output_dir, progress=not quiet, echo=typer.echo)
    typer.echo(markdown_report(metrics))
    if ship:
        include_base = cfg.base_model is None
        for path in ship_stages(output_dir, include_base, rlhf_from=ship_rlhf_from):
            typer.echo(f"shipped {path}")


def register(app: typer.Typer) -> None:
    app.command("sft")(sft_command)
    app.command("reward")(reward_command)
    app.command("rlhf")(rlhf_command)
    app.command("pipeline")(pipeline_command)
