"""The `genai-lab` command line: one typer app, each package adds its own subcommands.

Packages register through the ``genai_lab.commands`` entry-point group (see pyproject.toml):
core's commands are in core/commands/, finetune's in finetune/cli.py, chat's in chat/cli.py. So
this module imports none of them, and core never imports finetune, chat or the dashboard.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

import typer

app = typer.Typer(
    name="genai-lab",
    help="Learn generative AI by running it: train, sample, fine-tune and chat with real models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def cli_errors(fn):
    """Decorator for commands: expected failures (bad input, missing files) print one line
    `error: ...` and exit 1, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def build_app() -> typer.Typer:
    for ep in sorted(entry_points(group="genai_lab.commands"), key=lambda e: e.name):
        ep.load()(app)
    return app


def main() -> None:
    build_app()()
