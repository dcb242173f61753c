"""`genai-lab bench`: every package's speed figures, measured side by side in one run."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

from core.atomic import write_text_atomic
from core.cli import cli_errors
from core.lm.loader import naming_write_errors
from core.outputs import OVERWRITE_HELP, claim_output_file, json_file_with_keys


@cli_errors
def bench_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer repetitions (for smoke tests).")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Also write the results as JSON (a new file, or an earlier bench report, which "
            "is replaced)."
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Run only these sections: core, finetune, chat, dashboard."),
    ] = None,
    against: Annotated[
        list[str] | None,
        typer.Option(
            help="Also decode SmolLM2 with llama.cpp ('llama.cpp'): F32, F16, Q8_0 and Q4_1 "
            "files beside our fp32, float16 and 4-bit weights. Builds llama-cpp-python into its own "
            "environment under the cache folder on first use (minutes); skipped with a "
            "message when that fails."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Measure our code against transformers side by side in one run and print the ratios."""
    # Each package contributes its own section through the `genai_lab.bench` entry points.
    sections = sorted(entry_points(group="genai_lab.bench"), key=lambda e: e.name)
    # An earlier report of ours: a JSON object keyed by section names (and "against").
    own_report = json_file_with_keys([e.name for e in sections] + ["against", "machine"])
    if only:
        names = [e.name for e in sections]
        unknown = [name for name in only if name not in names]
        if unknown:  # checked before anything runs: a typo must not yield an empty, "passing" run
            raise ValueError(f"--only: got {unknown[0]!r}, must be one of {', '.join(names)}")
        sections = [e for e in sections if e.name in only]
    unknown = [name for name in against or [] if name != "llama.cpp"]
    if unknown:
        raise ValueError(f"--against: got {unknown[0]!r}, the one known is 'llama.cpp'")
    if output is not None and output.is_dir():
        raise ValueError(f"--output: {output} is a folder; give a file name for the JSON")
    if output is not None:  # before the minutes of measuring: never over someone else's file
        claim_output_file(output, "bench", own_report, overwrite=overwrite)
    from core.bench.machine import describe, machine

    results = {"machine": machine()}  # every figure below is this machine's
    typer.echo(describe(results["machine"]))
    for ep in sections:
        typer.echo(f"== {ep.name} ==")
        results[ep.name] = ep.load()(quick=quick, echo=typer.echo)
    if against:
        from core.bench.llamacpp import against_llama_cpp

        typer.echo("== against llama.cpp ==")
        results["against"] = {"llama.cpp": against_llama_cpp(quick=quick, echo=typer.echo)}
    if output:
        with naming_write_errors(output):
            write_text_atomic(output, json.dumps(results, indent=2, default=str) + "\n")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
