"""The `genai-lab` command line: one typer app, each package adds its own subcommands.

Packages register through the ``genai_lab.commands`` entry-point group (see pyproject.toml):
core's commands are in core/commands/, finetune's in finetune/cli.py, chat's in chat/cli.py. So
this module imports none of them, and core never imports finetune, chat or the dashboard.

Errors have one style everywhere: a single line `error: ...` on stderr and a non-zero exit, for a
mistyped flag (exit 2, click's usage code) as for a bad file or config value (exit 1). A Python
traceback appears only with `genai-lab --debug ...` or GENAI_LAB_DEBUG=1.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Annotated, Any, TypeVar

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer._click.globals import get_current_context
from typer.core import TyperGroup

# typer (0.29) vendors click as typer._click: its exceptions and context are not the `click`
# package's, so they are imported from there.

DEBUG_ENV = "GENAI_LAB_DEBUG"
_DEBUG_KEY = "genai_lab.debug"  # in click's context meta, shared by the whole command tree
_DEBUG_HINT = f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
F = TypeVar("F", bound=Callable[..., Any])


class OneLineErrorGroup(TyperGroup):
    """The root command group: click's usage errors (unknown flag, bad value, missing option)
    become one `error:` line like every other failure, instead of a usage block and a box."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # a caller that handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:
            e.show()  # `genai-lab` or `genai-lab bot` alone: the help, as before
            sys.exit(e.exit_code)
        except typer.TyperException as e:  # click's ClickException and its usage errors
            typer.echo(f"error: {usage_message(e)}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # Non-standalone click returns the exit code of a typer.Exit, else the command's value.
        sys.exit(result if isinstance(result, int) else 0)


def usage_message(e: typer.TyperException) -> str:
    """click's error text on one line, pointing at the command's --help for usage errors."""
    text = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, UsageError) and ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


app = typer.Typer(
    name="genai-lab",
    help="Learn generative AI by running it: train, sample, fine-tune and chat with real models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrorGroup,
)


@app.callback()
def global_options(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help=f"On an error, show the full Python traceback (also: {DEBUG_ENV}=1)."
        ),
    ] = False,
) -> None:
    """Options of every subcommand, given before its name: `genai-lab --debug sft ...`."""
    ctx.meta[_DEBUG_KEY] = debug


def debug_enabled() -> bool:
    """Whether errors should propagate with their traceback (--debug or GENAI_LAB_DEBUG=1)."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_DEBUG_KEY))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _no_space(where: str | None) -> str:
    target = f"while writing {where}" if where else "while writing"
    return f"no space left on device {target}: free some disk space or write somewhere else"


def describe_error(e: BaseException) -> str:
    """One line for an exception: our own errors (ValueError subclasses) say what to do in their
    message; library errors we know are translated; anything else keeps its type and points to
    --debug."""
    message = _first_line(str(e))
    if isinstance(e, OSError):
        path = e.filename
        if e.errno == errno.ENOSPC:
            return _no_space(None if path is None else str(path))
        if path is not None and e.strerror:
            return f"{path}: {e.strerror[0].lower()}{e.strerror[1:]}"
        return message or type(e).__name__
    name = type(e).__name__
    if name == "SafetensorError":  # safetensors' Rust error class (no Python base to catch)
        lowered = message.lower()
        if "no space left" in lowered or "os error 28" in lowered:
            return _no_space(None)
        return f"cannot read or write a safetensors file ({message}) {_DEBUG_HINT}"
    if isinstance(e, RuntimeError | AssertionError) and _is_device_error(message):
        return (
            f"device: {message}; pick one this machine has: --device cpu (or auto, "
            "which uses a GPU when torch sees one)"
        )
    if isinstance(e, ValueError) and message:
        return message
    return f"{name}: {message or 'no details'} {_DEBUG_HINT}"


def _is_device_error(message: str) -> bool:
    """torch's own words for a device that does not exist or has no driver."""
    lowered = message.lower()
    return any(
        s in lowered
        for s in ("not compiled with cuda", "expected one of cpu", "no cuda gpus", "invalid device")
    )


def cli_errors(fn: F) -> F:
    """Decorator for commands: every failure prints one line `error: ...` and exits non-zero,
    never a traceback (unless --debug / GENAI_LAB_DEBUG=1 asks for it). Expected failures
    (bad input, missing files) are ValueError/OSError and say what to do; unexpected ones keep
    their exception type in the line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.TyperException, typer.Abort):
            raise  # typer's own exits and usage errors: the group prints those
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debug_enabled():
                raise
            typer.echo(f"error: {describe_error(e)}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


_registered = False


def build_app() -> typer.Typer:
    """The app with every package's subcommands (registered once per process)."""
    global _registered
    if not _registered:
        for ep in sorted(entry_points(group="genai_lab.commands"), key=lambda e: e.name):
            ep.load()(app)
        _registered = True
    return app


def main() -> None:
    build_app()()
