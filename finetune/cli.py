"""`genai-lab` subcommands of the finetune package (issue 4 fills these in)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add finetune's subcommands to the root app."""
