"""core's subcommands: `pretrain`, `generate`, `bench`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.cli import cli_errors

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tutor-base.yaml"
CHAT_TUNED = ("tutor", "tutor-sft", "tutor-rlhf")


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
) -> None:
    """Stage 1: pre-train the GPT on the bundled corpus (or your own text) from scratch."""
    from core.config import load_config, parse_set_options
    from core.pretrain import PretrainConfig, pretrain

    overrides = parse_set_options(set_)
    overrides.update(
        corpus=corpus,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
    )
    cfg = load_config(PretrainConfig, config or DEFAULT_CONFIG, overrides)
    report = pretrain(cfg, output_dir, resume=resume, progress=not quiet)
    summary = {k: v for k, v in report.items() if k != "config"}
    typer.echo(json.dumps(summary, indent=2))
    if ship:
        ship_model(output_dir / "final", ship, report)
        typer.echo(f"shipped to core/pretrained/{ship}")


def ship_model(final_dir: Path, name: str, report: dict) -> Path:
    """Copy a trained model into the package as fp16 (half the bytes, same answers to ~1e-3)."""
    import torch

    from core.hf import PRETRAINED_DIR, load_model, save_model
    from core.tokenizer import load_tokenizer

    model = load_model(final_dir)
    dest = PRETRAINED_DIR / name
    save_model(model, dest, tokenizer=load_tokenizer(final_dir), dtype=torch.float16)
    (dest / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    metrics = final_dir.parent / "metrics.jsonl"
    if metrics.exists():
        shutil.copy(metrics, dest / "metrics.jsonl")
    return dest


@cli_errors
def generate_command(
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Model folder, shipped name or hub id (default: tutor; with --adapter, the adapter's base)."
        ),
    ] = None,
    adapter: Annotated[
        str | None, typer.Option(help="A LoRA/QLoRA adapter folder from `genai-lab finetune`.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=0, help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Keep the smallest set with mass p.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Wrap the prompt in the chat template as a user turn "
            "(default: on for the chat-tuned tutor, tutor-sft, tutor-rlhf and adapters).",
        ),
    ] = None,
) -> None:
    """Generate text from a model, streamed token by token."""
    from core.generate import stream_text, stream_tokens
    from core.hf import load_model, resolve_model_path
    from core.sft import stop_ids
    from core.tokenizer import load_tokenizer

    if chat is None:  # a chat-tuned model answers questions; a base model continues text
        chat = adapter is not None or (model or "tutor") in CHAT_TUNED
    if adapter is not None:
        # A fine-tuned adapter runs on its transformers base through peft (finetune/).
        from finetune.inference import load_for_generation, stream_generate

        hf_model, hf_tokenizer = load_for_generation(model, adapter)
        pieces = stream_generate(
            hf_model, hf_tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat
        )
        _write_stream(prompt if not chat else "", pieces)
        return
    folder = resolve_model_path(model or "tutor")
    gpt = load_model(folder)
    tokenizer = load_tokenizer(folder)
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    stop = stop_ids(tokenizer)  # end of turn and end of document (id 0: never filter by truth)
    tokens = stream_tokens(
        gpt,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=stop,
    )
    _write_stream(prompt if not chat else "", stream_text(tokenizer, tokens))


def _write_stream(head: str, pieces) -> None:
    sys.stdout.write(head)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


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
    from importlib.metadata import entry_points

    # Each package contributes its own section through the `genai_lab.bench` entry points.
    sections = sorted(entry_points(group="genai_lab.bench"), key=lambda e: e.name)
    if only:
        sections = [e for e in sections if e.name in only]
    results = {}
    for ep in sections:
        typer.echo(f"== {ep.name} ==")
        results[ep.name] = ep.load()(quick=quick, echo=typer.echo)
    if output:
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
    app.command("generate")(generate_command)
    app.command("bench")(bench_command)
