"""The demo bot: SmolLM2-135M-Instruct grounded on the concept notes, with our own LoRA adapter.

What makes it a bot that knows its subject:
1. retrieval (MiniLM over core.content.concepts) puts the nearest notes into the prompt, and the
   answer cites their dashboard pages;
2. a question whose nearest concept scores below ABSTAIN_THRESHOLD (chat.retrieval) is not sent
   to the model at all: the bot says it only knows about generative AI and names the nearest
   page, instead of making an answer up;
3. the adapter (`genai-lab bot data` + `genai-lab finetune`, shipped as
   core/pretrained/smollm2-tutor-lora) teaches the model to answer from the notes in one to three
   sentences, and to decline questions the notes do not cover.

The data: core/content/data/bot_train.jsonl (hand-written questions with answers, and
out-of-scope questions) trains the adapter and sets the threshold; bot_heldout.jsonl, written
apart with other wording and sentence shapes, is only ever used to measure (`genai-lab bot eval`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chat.chain import (
    ABSTAIN_ANSWER,
    ABSTAIN_MARKER,
    BOT_SYSTEM_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    answer_budget,
    fit_prompt,
)
from chat.retrieval import RELEVANCE_THRESHOLD, ConceptRetriever
from core.atomic import write_text_atomic
from core.content.concepts import CONCEPTS_BY_ID
from core.content.tutor_data import contains_key_term
from core.lm.loader import BOT_MODEL
from core.train.data import DATA_DIR

# Below this cosine similarity to its nearest note a question gets no notes, and the bot abstains
# without asking the model (chat.retrieval.RELEVANCE_THRESHOLD, measured on the training
# questions by `best_threshold`).
ABSTAIN_THRESHOLD = RELEVANCE_THRESHOLD
TRAIN_FILE = DATA_DIR / "bot_train.jsonl"
HELDOUT_FILE = DATA_DIR / "bot_heldout.jsonl"


def read_questions(path: str | Path) -> list[dict]:
    """Rows {"question", "concept" (None: out of scope), "answer" (training rows)}."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise ValueError(f"{path}:{number}: expected an object with a 'question' string")
        rows.append(row)
    return rows


def best_threshold(in_scope: list[float], out_of_scope: list[float]) -> float:
    """The threshold (on a 0.01 grid) with the fewest mistakes: in-scope questions below it plus
    out-of-scope questions at or above it (ties: the lower threshold, refusing less)."""
    grid = [round(0.1 + 0.01 * i, 2) for i in range(41)]

    def mistakes(t: float) -> int:
        return sum(s < t for s in in_scope) + sum(s >= t for s in out_of_scope)

    return min(grid, key=lambda t: (mistakes(t), t))


def is_abstention(answer: str) -> bool:
    return ABSTAIN_MARKER.lower() in answer.lower()


# ---------------------------------------------------------------------------------------------
# the adapter's training data


def labelled_answer(row: dict) -> str:
    """The answer as the bot gives it: led by the name of the concept it explains ("Top-p
    sampling: ..."), so a reader sees at once which idea (and dashboard page) the answer is
    about, and the model learns to pick the note that answers the question."""
    title = CONCEPTS_BY_ID[row["concept"]].title
    return f"{title}: {row['answer']}"


def training_rows(
    rows: list[dict],
    retriever: ConceptRetriever,
    count_tokens: Callable,
    context_window: int,
    system_prompt: str = BOT_SYSTEM_PROMPT,
) -> list[dict]:
    """Chat rows for `genai-lab finetune`: the very prompt the bot builds at run time (system
    prompt + the retrieved notes, by chat.chain.fit_prompt) + the question -> the answer, or the
    refusal for out-of-scope questions (with their nearest notes: those that slip past the
    threshold reach the model, which must decline them)."""
    out = []
    budget = answer_budget(context_window)
    for row in rows:
        question = row["question"]
        # Its nearest notes as if it were a new question (its own copy among the examples left
        # out), whatever their score: out-of-scope questions that slip past the threshold reach
        # the model, which must learn to decline them.
        docs = retriever.ranked(question, leave_out=True)[: retriever.k]
        fitted = fit_prompt(question, [], docs, count_tokens, context_window, budget, system_prompt)
        answer = labelled_answer(row) if row.get("concept") else ABSTAIN_ANSWER
        messages = (
            [{"role": "system", "content": fitted.system[0].content}] if fitted.system else []
        )
        messages += [
            {"role": "user", "content": fitted.question},
            {"role": "assistant", "content": answer},
        ]
        out.append({"messages": messages})
    return out


def is_chat_row(row: object) -> bool:
    """One row as `write_training_data` writes it: {"messages": [{"role", "content"}, ...]}."""
    if not isinstance(row, dict) or set(row) != {"messages"}:
        return False
    messages = row["messages"]
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
    )


def write_training_data(
    out_file: str | Path, model: str = "smollm2-135m-instruct", overwrite: bool | None = None
) -> int:
    """Write the adapter's training rows (JSONL) for `model`'s tokenizer and context.

    `out_file` may be new, empty, or an earlier file of chat rows (replaced); any other file is
    refused before the model loads, or with `overwrite` moved aside to OUT_FILE.old-TIMESTAMP
    (core.outputs); a folder is refused in one line naming it. `overwrite` None: the caller
    offers no --overwrite flag, so the refusal does not mention one."""
    from chat.local_model import ChatLocalModel, context_window
    from core.outputs import claim_output_file, jsonl_file_of

    claim_output_file(out_file, "bot data", jsonl_file_of(is_chat_row), overwrite=overwrite)

    chat_model = ChatLocalModel(model=model)
    lm, tokenizer = chat_model.load()
    rows = training_rows(
        read_questions(TRAIN_FILE),
        # The notes-only ranking (the bot's first retriever, which the shipped adapter was
        # trained with): the right note is first for 87% of these questions and second for 8%,
        # so the adapter learns to pick the note that answers rather than always the first.
        ConceptRetriever(examples=()),
        chat_model.count_tokens,
        context_window(lm, tokenizer),
    )
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(out_file, text)
    return len(rows)


def ship_adapter(run: str | Path) -> Path:
    """Copy `run`/adapter and its report into the package (atomically), as the bot's adapter."""
    import shutil

    from core.atomic import atomic_directory
    from core.lm.loader import BOT_ADAPTER

    run = Path(run)
    adapter = run / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors (did the run finish?)")
    with atomic_directory(BOT_ADAPTER) as tmp:
        for item in adapter.iterdir():
            if item.is_file() and item.name != "README.md":  # (peft's empty model card)
                shutil.copyfile(item, tmp / item.name)
        if (run / "report.json").is_file():
            shutil.copy2(run / "report.json", tmp / "training_report.json")
    return BOT_ADAPTER


# ---------------------------------------------------------------------------------------------
# measuring it on the held-out questions


@dataclass
class BotSetup:
    """One configuration to measure: a model, with or without notes and the threshold."""

    name: str
    model: str
    notes: bool  # retrieved notes in the prompt
    gate: bool  # abstain without the model below ABSTAIN_THRESHOLD
    system_prompt: str = BOT_SYSTEM_PROMPT


SETUPS = [
    # the tutor as trained (its own system prompt; notes would not fit its 128 tokens usefully)
    BotSetup("tutor (from scratch, 1.9M)", "tutor", False, False, DEFAULT_SYSTEM_PROMPT),
    # the model as it comes: its template's own system prompt, no notes
    BotSetup("SmolLM2 plain", "smollm2-135m-instruct", notes=False, gate=False, system_prompt=""),
    BotSetup("SmolLM2 + notes", "smollm2-135m-instruct", notes=True, gate=True),
    BotSetup("SmolLM2 + notes + our adapter", BOT_MODEL, notes=True, gate=True),
]


# The scoring rule, fixed when the table was first measured (and kept, so figures stay
# comparable): an answer is about the concept whose note alone is nearest to it by MiniLM, if that
# cosine similarity reaches this.
ANSWER_NOTE_MIN = 0.23


def answer_scorer() -> ConceptRetriever:
    """Notes only (no example questions): answers are statements, compared with statements."""
    return ConceptRetriever(examples=(), min_score=ANSWER_NOTE_MIN)


def concept_of_answer(answer: str, right: str | None, scorer: ConceptRetriever) -> str:
    """How an answer is scored: "right" (it says a key term of the right concept),
    "abstained", "other" (it is about another concept: the note nearest to the answer itself,
    by `answer_scorer`, is another one and close enough), or "none". (A question the model
    could not take, such as one longer than its context, is scored "error" by
    `evaluate_setup`.)"""
    if is_abstention(answer):
        return "abstained"
    if right is not None and contains_key_term(answer, right):
        return "right"
    nearest = scorer.nearest(answer).metadata
    if nearest["score"] >= scorer.min_score and nearest["id"] != right:
        return "other"
    return "none"


def rescore(result: dict, scorer: ConceptRetriever) -> dict:
    """Score saved answers again (after a change of the scoring rule; nothing is generated)."""
    answers = [
        {**r, "verdict": r["verdict"] if r["verdict"] == "error"
         else concept_of_answer(r["answer"], r["concept"], scorer)}
        for r in result["answers"]
    ]  # fmt: skip
    return {**result, **summarise(answers), "answers": answers}


def evaluate_setup(
    setup: BotSetup,
    rows: list[dict],
    retriever: ConceptRetriever,
    max_tokens: int = 48,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Greedy answers to every row through the bot's real path (ChatSession: retrieval, the
    threshold, the chain, LangGraph memory in a throwaway SQLite file), scored per row."""
    import tempfile

    from chat.conversations import ChatStore
    from chat.providers import load_chat_model
    from chat.session import ChatSession
    from core.lm.sampling import SamplingParams

    backend = load_chat_model(setup.model, SamplingParams(temperature=0, max_tokens=max_tokens))
    scorer = answer_scorer()
    results, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = ChatStore(Path(tmp) / "eval.sqlite")
        for i, row in enumerate(rows):
            session = ChatSession(
                store,
                backend,
                thread_id=f"q{i}",
                system_prompt=setup.system_prompt,
                retriever=retriever if setup.notes or setup.gate else None,
                grounding="prompt" if setup.notes else "cite",
                abstain=setup.gate,
            )
            try:
                answer = session.ask(row["question"]).answer
                verdict = concept_of_answer(answer, row["concept"], scorer)
            except ValueError as e:  # e.g. longer than the tutor's 128-token context
                answer, verdict = f"(error: {e})", "error"
            results.append({**row, "answer": answer, "verdict": verdict})
            if echo and (i + 1) % 20 == 0:
                echo(f"  {setup.name}: {i + 1}/{len(rows)} ({time.perf_counter() - t0:.0f} s)")
        store.close()
    return summarise(results) | {"seconds": round(time.perf_counter() - t0, 1), "answers": results}


def summarise(results: list[dict]) -> dict:
    """The four figures of the README's table."""
    inside = [r for r in results if r["concept"]]
    outside = [r for r in results if not r["concept"]]

    def share(items, verdict):
        return sum(r["verdict"] == verdict for r in items) / len(items) if items else 0.0

    return {
        "in_scope": len(inside),
        "out_of_scope": len(outside),
        "right_concept": share(inside, "right"),
        "other_concept": share(inside, "other"),
        "wrongly_abstained": share(inside, "abstained"),
        "abstained_out_of_scope": share(outside, "abstained"),
    }


def table(results: dict[str, dict]) -> str:
    """The README's table (markdown) from `evaluate_setup` results."""
    lines = [
        "| setup | right concept | other concept | abstains (out of scope) "
        "| wrongly abstains (in scope) | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['right_concept']:.1%} | {r['other_concept']:.1%} "
            f"| {r['abstained_out_of_scope']:.1%} | {r['wrongly_abstained']:.1%} | {r['seconds']} |"
        )
    n = next(iter(results.values()), {})
    lines.append(
        f"\n{n.get('in_scope', 0)} in-scope and {n.get('out_of_scope', 0)} out-of-scope held-out "
        "questions, greedy answers."
    )
    return "\n".join(lines)
