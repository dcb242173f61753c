"""`genai-lab generate`: text from any local model, streamed token by token.

The data path: `--model`/`--adapter` -> core.lm.loader.resolve (a ModelSpec) -> core.lm.loader.load
(our GPT, or a transformers model with its adapter through the loader finetune registers) ->
core.lm.chat_format.encode_prompt -> core.lm.generate.stream_tokens (the one decoding loop) ->
core.lm.sampling.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from core.cli import cli_errors
from core.lm.chat_format import encode_prompt, ensure_chat_template, stop_ids
from core.lm.generate import generation_config, stream_text, stream_tokens
from core.lm.loader import ModelSpecError, load, resolve
from core.lm.sampling import SamplingParams


@cli_errors
def generate_command(
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Shipped name, model folder, adapter folder or hub id "
            "(default: tutor; with --adapter, the adapter's base)."
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
            "(default: on for the chat-tuned tutor, tutor-sft, tutor-rlhf, adapters and "
            "models whose tokenizer has a chat template).",
        ),
    ] = None,
) -> None:
    """Generate text from a model, streamed token by token."""
    spec = resolve(model or ("" if adapter else "tutor"), adapter=adapter)
    if spec.hosted:
        raise ModelSpecError(f"{spec.spec}: generate runs local models (chat talks to hosted ones)")
    if chat is None:  # a chat-tuned model answers questions; a base model continues text
        chat = spec.chat_tuned
    lm, tokenizer = load(spec)
    if chat:
        ensure_chat_template(tokenizer)
    ids = encode_prompt(tokenizer, prompt, chat)
    config = generation_config(lm)
    tokens = stream_tokens(
        lm,
        ids,
        stop_ids=stop_ids(tokenizer, config),
        sampling=SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        ),
    )
    pieces = stream_text(tokenizer, tokens)
    first = next(pieces, "")  # a prompt that does not fit fails here, before anything is shown
    sys.stdout.write((prompt if not chat else "") + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
