"""`genai-lab finetune` and `genai-lab merge`.

Every key of `FinetuneConfig` is also a flag (`--lora-rank 16`, `--no-double-quant`), generated
from the dataclass so the two can never drift apart; values go through `core.train.config.load_config`,
which gives the same one-line errors for a bad flag as for a bad YAML key.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from core.cli import cli_errors
from core.outputs import OVERWRITE_HELP
from core.train.config import load_config, parse_set_options
from finetune.config import FinetuneConfig, config_fields

_FIXED = ("config", "set_", "check", "dry_run", "resume", "overwrite", "quiet")


def _quiet_libraries() -> None:
    """Our own progress bar and messages only: no per-file loading bars from transformers and
    datasets, no deprecation notices about their internals."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _flag_parameter(f) -> inspect.Parameter:
    """One typer option for a config field: bools as --x/--no-x, the rest as text that
    load_config coerces (and rejects with a one-line error)."""
    hint = typing.get_type_hints(FinetuneConfig)[f.name]
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if hint is bool:
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
        annotation = Annotated[bool | None, option]
    else:
        metavar = {int: "INT", float: "FLOAT"}.get(hint, "TEXT")
        option = typer.Option(flag, help=help_text, metavar=metavar, show_default=False)
        annotation = Annotated[str | None, option]
    return _keyword(f.name, annotation)


@cli_errors
def finetune_command(
    config: Path | None = None,
    set_: list[str] | None = None,
    check: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    **flags,
) -> None:
    """LoRA / QLoRA fine-tuning of a Hugging Face causal LM on your own data.

    Every config key is also a flag; --check only checks the data, --dry-run only estimates
    (after checking the config and the rows of --data)."""
    # Deferred: datasets, peft and TRL take seconds to import, and every `genai-lab`
    # subcommand registers this module at start-up.

    overrides = parse_set_options(set_)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg = load_config(FinetuneConfig, config, overrides)
    _quiet_libraries()
    if dry_run:
        from finetune.dryrun import data_lengths
        from finetune.dryrun import dry_run as run_dry
        from finetune.lint import lint_structure

        seq_len, tokens = 0, 0

        cfg.validate(require_data=False)  # the config first, then the data, then the estimate
        if cfg.data and cfg.method == "dpo":
            from finetune.data import read_preferences

            for path in [cfg.data] + ([cfg.eval_data] if cfg.eval_data else []):
                read_preferences(path, cfg.skip_invalid, typer.echo)
        elif cfg.data:  # a dry run that passes is a promise: bad or empty data fails now, not later
            files = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
            lint_structure(
                files,
                cfg.format,
                cfg.skip_invalid,
                typer.echo,
                columns=cfg.columns,
                roles=cfg.roles,
            )
            seq_len, tokens = data_lengths(cfg, typer.echo)
        run_dry(cfg, typer.echo, seq_len or None, tokens)
        return
    color = sys.stdout.isatty()
    if check:
        from finetune.train import prepare_data

        if cfg.method == "dpo":
            from finetune.dpo import prepare_preferences

            prepare_preferences(cfg, typer.echo)
        else:
            prepare_data(cfg, typer.echo, color, progress=not quiet)
        typer.echo("data check passed")
        return
    if cfg.method == "dpo":  # preference pairs through TRL's DPOTrainer
        from finetune.dpo import run_dpo as finetune
    else:
        from finetune.train import finetune

    report = finetune(
        cfg, resume=resume, echo=typer.echo, progress=not quiet, color=color, overwrite=overwrite
    )
    if report:
        summary = {k: v for k, v in report.items() if k not in ("samples", "config")}
        typer.echo(json.dumps(summary, indent=2))


def _keyword(name: str, annotation, default=None) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _switch(name: str, help_text: str) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    return _keyword(name, Annotated[bool, typer.Option(flag, help=help_text)], default=False)


_fixed_parameters = [
    _keyword(
        "config", Annotated[Path | None, typer.Option(help="YAML config; flags override it.")]
    ),
    _keyword(
        "set_",
        Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override (repeatable).")],
    ),
    _switch("check", "Only check the data (no model is loaded)."),
    _switch(
        "dry_run",
        "Only estimate parameters and memory from the config (no weights load); with --data, "
        "lint it and size batches by its longest row under the model's tokenizer.",
    ),
    _switch(
        "resume",
        "Continue from the newest complete checkpoint, with the run's own settings and data "
        "(checked against its config.yaml, which is never rewritten; --max-steps may grow).",
    ),
    _switch("overwrite", OVERWRITE_HELP),
    _switch("quiet", "No progress bar."),
]
finetune_command.__signature__ = inspect.Signature(
    _fixed_parameters + [_flag_parameter(f) for f in config_fields() if f.name not in _FIXED]
)


@cli_errors
def merge_command(
    adapter: Annotated[Path, typer.Option(help="Adapter folder written by `genai-lab finetune`.")],
    output: Annotated[
        Path,
        typer.Option(
            help="Where the standalone model folder goes: a new or empty folder, or an earlier "
            "merge's (replaced)."
        ),
    ],
    base: Annotated[
        str | None, typer.Option(help="Base model (default: the one the adapter names).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="float32 (lossless merge), bfloat16 or float16.")
    ] = "float32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="If --output is not empty, move it aside to OUTPUT.old-TIMESTAMP first "
            "(nothing is deleted).",
        ),
    ] = False,
) -> None:
    """Merge an adapter into its base model and check the result against the adapter."""
    from finetune.merge import merge_adapter

    _quiet_libraries()
    merge_adapter(
        adapter, output, base=base, dtype=dtype, device=device, echo=typer.echo, overwrite=overwrite
    )


def register(app: typer.Typer) -> None:
    """Add finetune's subcommands to the root app."""
    app.command("finetune")(finetune_command)
    app.command("merge")(merge_command)
