"""core's subcommands (typer): each module registers the commands of one idea.

- generate.py: `generate`, text from any local model through the one decoding loop;
- training.py: `pretrain`, `sft`, `reward`, `rlhf`, `pipeline`, the tutor's training stages;
- bench.py: `bench`, every package's speed figures side by side.
"""

from __future__ import annotations

import typer

from core.commands import bench, generate, training


def register(app: typer.Typer) -> None:
    """Add core's subcommands to the root app (the `genai_lab.commands` entry point)."""
    training.register(app)
    generate.register(app)
    bench.register(app)
