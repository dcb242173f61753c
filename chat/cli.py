"""`genai-lab chat`: the demo chatbot in the terminal (a REPL that streams tokens, or `--once`)."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Collection
from pathlib import Path
from typing import Annotated

import typer

from core.cli import cli_errors, debug_enabled, describe_error
from core.outputs import OVERWRITE_HELP, claim_output_file, json_file_with_keys

HELP = """commands:
  /reset          forget this thread's conversation
  /history        show this thread's messages
  /model [SPEC]   show the model, or switch to SPEC (tutor, tutor-sft, PATH, PATH+ADAPTER, ...)
  /quit           leave (Ctrl-D too); Ctrl-C stops an answer, not the program
a message or command that fails prints one `error:` line and the chat goes on; the exit code
is 0 in a terminal, and 1 when input from a file or pipe had a failed line."""
# Exit codes, as sqlite3 does it: in a terminal the person saw each error, so leaving with /quit
# (or Ctrl-D) is a clean exit 0; lines read from a file or pipe are a script, which goes on past a
# failed line but ends with exit code 1 so its caller sees it; `--once` exits 1 when its message
# fails. `genai-lab chat --help` says so:
CHAT_HELP = (
    "Chat with the tutor (or any model) in the terminal; conversations are saved per thread."
    "\n\nExit code: 1 if --once's message fails. The REPL reports a failed message or command "
    "and goes on; it exits 0 in a terminal, or 1 if any line failed when its input comes from "
    "a file or pipe (a script)."
)


bot_app = typer.Typer(
    help="The demo bot (SmolLM2 + notes + our adapter): its training data and its figures.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add chat's subcommands to the root app."""
    app.command("chat", help=CHAT_HELP)(chat_command)
    app.add_typer(bot_app, name="bot")


@bot_app.command("data")
@cli_errors
def bot_data_command(
    output: Annotated[
        Path, typer.Option(help="JSONL of chat rows for `genai-lab finetune`.")
    ] = Path("runs/bot/train.jsonl"),
    model: Annotated[str, typer.Option(help="Whose tokenizer and context shape the prompt.")] = (
        "smollm2-135m-instruct"
    ),
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Write the adapter's training rows: the bot's own grounded prompt -> the answer."""
    from chat.bot import write_training_data  # (deferred: loads the model's tokenizer)

    _quiet_libraries()
    rows = write_training_data(output, model, overwrite=overwrite)
    typer.echo(f"{rows} rows -> {output}")


@bot_app.command("ship")
@cli_errors
def bot_ship_command(
    run: Annotated[
        Path, typer.Option(help="A `genai-lab finetune` output folder (with adapter/).")
    ] = Path("runs/bot/finetune"),
) -> None:
    """Copy a trained adapter (and its training report) to core/pretrained/smollm2-tutor-lora,
    where the name smollm2-tutor finds it."""
    from chat.bot import ship_adapter

    typer.echo(f"shipped {ship_adapter(run)}")


@bot_app.command("eval")
@cli_errors
def bot_eval_command(
    output: Annotated[
        Path | None, typer.Option(help="Write the figures and every answer as JSON.")
    ] = None,
    setup: Annotated[
        list[str] | None,
        typer.Option(help="Only these setups (by number, 1-4; default: all)."),
    ] = None,
    every: Annotated[
        int, typer.Option(min=1, help="Use every N-th held-out question (a quick subset).")
    ] = 1,
    max_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit, in tokens.")] = 48,
    update: Annotated[
        bool,
        typer.Option(
            "--update", help="Keep the other setups already in --output (re-measure some)."
        ),
    ] = False,
    rescore: Annotated[
        bool,
        typer.Option(
            "--rescore", help="Only score the answers saved in --output again (no generation)."
        ),
    ] = False,
) -> None:
    """Measure the bot on the held-out questions (never trained on): right concept, other
    concept, abstentions, for the tutor, SmolLM2 plain, SmolLM2 + notes and + our adapter."""
    import json

    from chat.bot import HELDOUT_FILE, SETUPS, answer_scorer, evaluate_setup, read_questions, table
    from chat.bot import rescore as rescore_answers
    from chat.retrieval import ConceptRetriever

    _quiet_libraries()
    numbers = [str(i + 1) for i in range(len(SETUPS))]
    for i in setup or []:
        if i not in numbers:
            raise ValueError(f"--setup: got {i!r}, must be 1-{len(SETUPS)}")
    chosen = [SETUPS[int(i) - 1] for i in setup] if setup else SETUPS
    if rescore and output is None:
        raise ValueError("--rescore needs --output FILE: the saved answers to score again")
    if output is not None and output.is_dir():
        raise ValueError(f"{output}: is a folder; --output needs a file name")
    results = {}
    if (update or rescore) and output is not None:
        # Checked whole before anything loads: a file edited by hand or cut short is one line
        # naming the setup and field, not a KeyError from the scorer.
        remeasured = set() if rescore else {s.name for s in chosen}
        results = read_eval_results(output, [s.name for s in SETUPS], rescore, remeasured)
    elif output is not None:  # a fresh measurement replaces only an earlier one of ours
        claim_output_file(
            output, "bot eval", json_file_with_keys(s.name for s in SETUPS), overwrite=None
        )
    rows = read_questions(HELDOUT_FILE)[::every]
    retriever = ConceptRetriever()
    if rescore:
        scorer = answer_scorer()
        results = {name: rescore_answers(r, scorer) for name, r in results.items()}
        chosen = []
    for s in chosen:
        typer.echo(f"{s.name}: {len(rows)} questions ...", err=True)
        results[s.name] = evaluate_setup(s, rows, retriever, max_tokens, echo=typer.echo)
    order = [s.name for s in SETUPS]  # the table lists the setups in their fixed order
    results = dict(sorted(results.items(), key=lambda kv: order.index(kv[0])))
    typer.echo(table(results))
    if output:
        from core.atomic import write_text_atomic

        write_text_atomic(output, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


FIGURES = ("right_concept", "other_concept", "abstained_out_of_scope", "wrongly_abstained")


def read_eval_results(
    path: Path, setups: list[str], rescore: bool, remeasured: Collection[str] = ()
) -> dict:
    """The results `bot eval --output` saved, checked for what --rescore (each answer) or
    --update (each setup's figures, except those measured again) reads; one line naming the
    file, the setup and the field otherwise. A missing file is {} for --update."""
    import json
    import math

    from core.content.tutor_data import TUTOR_ANSWERS

    again = "fix it, or run `genai-lab bot eval --output FILE` without --rescore/--update"
    if not path.is_file():
        if rescore:
            raise ValueError(
                f"{path}: not found; --rescore scores the answers an earlier "
                "`genai-lab bot eval --output FILE` saved there"
            )
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); {again}") from None
    except json.JSONDecodeError as e:
        reason = f"{e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}"
        raise ValueError(f"{path}: invalid JSON ({reason}); {again}") from None
    except RecursionError:
        raise ValueError(
            f"{path}: invalid JSON (nested too deeply: lists or objects hundreds of levels "
            f"down); {again}"
        ) from None

    def kind(value) -> str:
        return {dict: "an object", list: "a list", str: "a string", bool: "true/false"}.get(
            type(value), "null" if value is None else "a number"
        )

    def number(value, low: float = 0.0, high: float = math.inf) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            return low <= float(value) <= high
        except OverflowError:  # an integer too large for a float
            return False

    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object of setup name -> results (as `bot eval --output` "
            f"writes it), got {kind(data)}; {again}"
        )
    for name, result in data.items():
        if name not in setups:
            raise ValueError(
                f"{path}: unknown setup {name!r} (the setups: {', '.join(setups)}); {again}"
            )
        where = f"{path}: {name!r}"
        if not isinstance(result, dict):
            raise ValueError(f"{where}: expected an object of results, got {kind(result)}; {again}")
        if name in remeasured:
            continue
        if not number(result.get("seconds")):
            got = kind(result["seconds"]) if "seconds" in result else "nothing"
            raise ValueError(f"{where}: seconds: expected a number >= 0, got {got}; {again}")
        if not rescore:
            for key in FIGURES:
                if not number(result.get(key), 0.0, 1.0):
                    got = repr(result[key])[:40] if key in result else "nothing"
                    raise ValueError(
                        f"{where}: {key}: expected a share from 0 to 1, got {got}; {again}"
                    )
            continue
        answers = result.get("answers")
        if not isinstance(answers, list):
            got = kind(answers) if "answers" in result else "nothing"
            raise ValueError(f"{where}: answers: expected a list, got {got}; {again}")
        for i, answer in enumerate(answers):
            field = f"{where}: answers[{i}]"
            if not isinstance(answer, dict):
                raise ValueError(f"{field}: expected an object, got {kind(answer)}; {again}")
            for key in ("answer", "verdict"):
                if not isinstance(answer.get(key), str):
                    got = kind(answer[key]) if key in answer else "nothing"
                    raise ValueError(f"{field}.{key}: expected a string, got {got}; {again}")
            concept = answer.get("concept", ...)
            if concept is not None and (
                not isinstance(concept, str) or concept not in TUTOR_ANSWERS
            ):
                got = "nothing" if concept is ... else repr(concept)[:40]
                raise ValueError(
                    f"{field}.concept: got {got}, must be a concept id (such as "
                    f"{next(iter(TUTOR_ANSWERS))!r}) or null; {again}"
                )
    return data


@cli_errors
def chat_command(
    model: Annotated[
        str | None,
        typer.Option(
            help="smollm2-tutor (the demo bot, default), smollm2-135m-instruct, tutor (from "
            "scratch, reads 128 tokens), tutor-sft, PATH, PATH+ADAPTER or provider:model."
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option(
            help="System prompt ('' for none; default: the one the model was trained with)."
        ),
    ] = None,
    thread: Annotated[str, typer.Option(help="Conversation id: same id, same memory.")] = "default",
    db: Annotated[
        Path | None,
        typer.Option(help="SQLite file of conversations (default: in your data folder)."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (local models).")] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Answer length limit, in tokens (default: 512 for local models; hosted: the "
            "provider's)."
        ),
    ] = None,
    repetition_penalty: Annotated[
        float | None,
        typer.Option(
            help="> 1 discourages repeats: tokens already in the conversation have their scores "
            "divided by it (local models; as transformers' repetition_penalty)."
        ),
    ] = None,
    no_retrieval: Annotated[
        bool, typer.Option("--no-retrieval", help="Don't look up the dashboard's concept notes.")
    ] = False,
    abstain: Annotated[
        bool,
        typer.Option(
            "--abstain/--no-abstain",
            help="Decline questions no concept note is close to, instead of letting the model "
            "guess (with retrieval on).",
        ),
    ] = True,
    grounding: Annotated[
        str,
        typer.Option(
            help="Where found notes go: prompt, cite (only cited), auto (prompt if the model "
            "reads >= 512 tokens; the tiny tutor answers better without them)."
        ),
    ] = "auto",
    once: Annotated[
        str | None, typer.Option(help="Answer this one message and exit (for scripts).")
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Print the thread's messages and exit.")
    ] = False,
) -> None:
    """Chat with the tutor (or any model) in the terminal; conversations are saved per thread.
    (Its --help is CHAT_HELP, which also gives the exit codes.)"""
    # Deferred: LangChain, LangGraph and torch take seconds to import, and every `genai-lab`
    # subcommand (and --help) registers this module at start-up.
    from chat.chain import default_system_prompt, notes_in_prompt
    from chat.conversations import ChatStore, default_db_path
    from chat.providers import default_chat_model
    from chat.session import ChatSession
    from core.lm.sampling import SamplingParams

    notes_in_prompt(grounding, 0)  # an unknown mode fails before anything loads
    if once is not None and history:
        raise ValueError("--once and --history do not go together: use one, then the other")
    if once is not None and not once.strip():
        raise ValueError("empty message: --once needs some text")
    # Every value is checked before the conversation file is opened (or created).
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        max_tokens=max_tokens,
    )
    store = ChatStore(db or default_db_path())
    if history:
        print_history(store.messages(thread), thread)
        return
    _quiet_libraries()
    model = model or default_chat_model()
    session = ChatSession(
        store,
        _load(model, sampling),
        thread_id=thread,
        system_prompt=default_system_prompt(model) if system is None else system,
        retriever=None if no_retrieval else _retriever(),
        grounding=grounding,
        abstain=abstain,
    )
    if once is not None:
        result = _answer(session, once)
        if result.sources:
            typer.echo(f"sources: {_sources(result.sources)}", err=True)
        return
    interactive = _stdin_is_terminal()
    failed, lines = repl(session, sampling, interactive)
    if failed and not interactive:  # a script: its caller must see that a line failed
        typer.echo(f"{failed} of {lines} lines failed (exit code 1)", err=True)
        raise typer.Exit(1)


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def repl(session, sampling, interactive: bool = True) -> tuple[int, int]:
    """Read messages until /quit or end of input; errors are reported and the loop goes on.
    Returns (lines that failed, lines read), for the exit code (see HELP)."""
    failed = lines = 0
    typer.echo(
        f"genai-lab chat · model {session.backend.spec} · thread {session.thread_id!r} · "
        f"{session.store.path}\n/help for commands; Ctrl-C stops an answer, /quit leaves.",
        err=True,
    )
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return failed, lines
        except KeyboardInterrupt:
            typer.echo("\n(/quit or Ctrl-D leaves)", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        lines += 1
        try:
            if text.startswith("/"):
                if not command(session, text, sampling):
                    return failed, lines
            else:
                result = _answer(session, text)
                if result.sources:
                    typer.echo(f"  (sources: {_sources(result.sources)})")
        except KeyboardInterrupt:
            typer.echo("\ninterrupted", err=True)  # the person stopped it: not a failure
        except Exception as e:  # a failing model must not end the conversation
            failed += 1
            if debug_enabled():
                traceback.print_exc()
            typer.echo(f"error: {describe_error(e)}", err=True)


def command(session, text: str, sampling) -> bool:
    """Run a /command; False means leave."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        typer.echo(f"thread {session.thread_id!r} is empty now")
    elif name == "/history":
        print_history(session.history(), session.thread_id)
    elif name == "/model":
        if arg:
            session.backend = _load(arg, sampling)  # the old model stays if this fails
        typer.echo(f"model: {session.backend.spec} ({session.backend.kind})")
    elif name == "/help":
        typer.echo(HELP)
    else:
        raise ValueError(f"unknown command {name} (/help lists them)")
    return True


def print_history(messages, thread: str) -> None:
    if not messages:
        typer.echo(f"(thread {thread!r} has no messages)", err=True)
    for message in messages:
        role = {"human": "user", "ai": "assistant"}.get(message.type, message.type)
        stopped = " [stopped]" if message.response_metadata.get("interrupted") else ""
        typer.echo(f"{role}: {message.text.strip()}{stopped}")


def _answer(session, text: str):
    """Stream one answer to stdout; Ctrl-C while it streams ends it early, keeping what is shown."""
    stop = threading.Event()
    label = f"{_label(session.backend.spec)}> "
    shown: list[str] = []

    def show(piece: str) -> None:
        if not shown:
            piece = piece.lstrip()  # the answer starts right after "name> "
            if not piece:
                return
            sys.stdout.write(label)
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        result = session.ask(text, on_text=show, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        if shown:
            sys.stdout.write("\n")
    if not shown:  # an answer not streamed (the bot declining) is printed whole; an empty
        typer.echo(f"{label}{result.answer.strip()}".rstrip())  # one still gets its line
    if result.interrupted:
        typer.echo("[stopped]")
    return result


def _label(spec: str) -> str:
    return Path(spec).name if "/" in spec and ":" not in spec else spec


def _sources(sources: list[dict]) -> str:
    return ", ".join(f"{s['title']} (dashboard page: {s['page']})" for s in sources)


def _load(spec: str, sampling):
    from chat.providers import load_chat_model

    return load_chat_model(spec, sampling)


def _retriever():
    from chat.retrieval import ConceptRetriever

    return ConceptRetriever()


def _quiet_libraries() -> None:
    """Keep library progress bars and notices out of the conversation."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
