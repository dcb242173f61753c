"""`genai-lab bench`: every package's speed figures, measured side by side in one run."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

from core.cli import cli_errors
from core.models import naming_write_errors


@cli_errors
def bench_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer repetitions (for smoke tests).")
    ] = False,
    output: Annotated[Path | None, typer.Option(help="Also write the results as JSON.")] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Run only these sections: core, finetune, chat, dashboard."),
    ] = None,
) -> None:
    """Measure our code against transformers side by side in one run and print the ratios."""
    # Each package contributes its own section through the `genai_lab.bench` entry points.
    sections = sorted(entry_points(group="genai_lab.bench"), key=lambda e: e.name)
    if only:
        names = [e.name for e in sections]
        unknown = [name for name in only if name not in names]
        if unknown:  # checked before anything runs: a typo must not yield an empty, "passing" run
            raise ValueError(f"--only: got {unknown[0]!r}, must be one of {', '.join(names)}")
        sections = [e for e in sections if e.name in only]
    if output is not None and output.is_dir():
        raise ValueError(f"--output: {output} is a folder; give a file name for the JSON")
    results = {}
    for ep in sections:
        typer.echo(f"== {ep.name} ==")
        results[ep.name] = ep.load()(quick=quick, echo=typer.echo)
    if output:
        with naming_write_errors(output):
            output.write_text(json.dumps(results, indent=2, default=str) + "\n")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
