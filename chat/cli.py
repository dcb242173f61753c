"""`genai-lab` subcommands of the chat package (issue 5 fills these in)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add chat's subcommands to the root app."""
