"""chat's figures: how well retrieval finds the right concept, what grounding does to the tutor's
answers, and what LangChain, LangGraph and SQLite add to the time of an answer.

`run_benchmarks(quick, echo) -> dict` (wired into `genai-lab bench`). Questions are the tutor's
held-out paraphrases (core/content/data/sft_heldout.jsonl, never trained on), each tagged with its concept.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

from langchain_core.messages import HumanMessage

from chat.chain import DEFAULT_SYSTEM_PROMPT, answer_budget, build_chain
from chat.conversations import ChatStore
from chat.local_model import ChatLocalModel, prompt_ids
from chat.providers import load_chat_model
from chat.retrieval import ConceptRetriever
from chat.session import ChatSession
from core.content.tutor_data import contains_key_term
from core.lm.chat_format import stop_ids
from core.lm.generate import generation_config, stream_tokens
from core.lm.loader import BOT_ADAPTER, BOT_MODEL, is_adapter_folder
from core.lm.sampling import SamplingParams
from core.train.data import bundled_rows


def held_out_questions(quick: bool) -> list[tuple[str, str]]:
    """(question, concept id) pairs; `quick` keeps every fourth."""

    rows = bundled_rows("sft_heldout.jsonl")
    pairs = [(r["messages"][-2]["content"], r["concept"]) for r in rows]
    return pairs[::4] if quick else pairs


def retrieval_hit_rate(retriever, questions: list[tuple[str, str]]) -> dict:
    """Share of questions whose concept is the first hit / among the hits / cited at all."""
    top1 = anywhere = cited = 0
    for question, concept in questions:
        ids = [d.metadata["id"] for d in retriever.search(question)]
        top1 += bool(ids) and ids[0] == concept
        anywhere += concept in ids
        cited += bool(ids)
    n = len(questions)
    return {"top1": top1 / n, f"top{retriever.k}": anywhere / n, "cited_any": cited / n, "n": n}


def grounding_effect(model_spec: str, retriever, questions: list[tuple[str, str]]) -> dict:
    """Key-term accuracy of greedy answers (core.content.tutor_data.contains_key_term) with and without
    the system prompt and the retrieved notes."""

    backend = load_chat_model(model_spec, SamplingParams(temperature=0))
    budget = answer_budget(backend.context_window)
    results = {}
    for name, system, grounded in [
        ("no system prompt, no notes", "", False),
        ("system prompt, notes only cited (the tutor's default)", DEFAULT_SYSTEM_PROMPT, False),
        ("notes in the prompt", "", True),
        ("system prompt + notes in the prompt", DEFAULT_SYSTEM_PROMPT, True),
    ]:
        chain = build_chain(
            backend.chat_model, backend.count_tokens, backend.context_window, budget, system
        )
        hits = 0
        for question, concept in questions:
            passages = retriever.search(question) if grounded else []
            out = chain.invoke({"question": question, "history": [], "passages": passages})
            hits += contains_key_term(out["answer"].text, concept)
        results[name] = hits / len(questions)
    return results


def answer_cost(model_spec: str, new_tokens: int = 40, repeats: int = 5) -> dict:
    """Milliseconds for the same greedy answer: core's loop alone, through the LangChain chat
    model, and as a whole chat turn (graph, checkpoints in SQLite). Median of `repeats`."""

    question = "What is a token?"
    model = ChatLocalModel(model=model_spec, temperature=0, max_tokens=new_tokens)
    lm, tokenizer = model.load()
    ids = prompt_ids(tokenizer, [HumanMessage(question)])
    stops = stop_ids(tokenizer, generation_config(lm))

    def core_loop() -> int:
        tokens = stream_tokens(
            lm, ids, stop_ids=stops, sampling=SamplingParams(max_tokens=new_tokens, temperature=0.0)
        )
        return len(list(tokens))

    def chat_model() -> int:
        return model.invoke(question).usage_metadata["output_tokens"]

    with tempfile.TemporaryDirectory() as tmp:
        store = ChatStore(f"{tmp}/bench.sqlite")
        backend = load_chat_model(model_spec, SamplingParams(temperature=0, max_tokens=new_tokens))
        turn = 0

        def chat_turn() -> int:
            nonlocal turn
            turn += 1  # a fresh thread each time: the same prompt, no history
            session = ChatSession(store, backend, thread_id=f"t{turn}", system_prompt="")
            return session.ask(question).usage["output_tokens"]

        runs = {"core loop": core_loop, "chat model": chat_model, "chat turn": chat_turn}
        figures = {name: _median_ms(fn, repeats) for name, fn in runs.items()}
        figures["tokens"] = core_loop()
        store.close()
    return figures


def _median_ms(fn: Callable[[], int], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bot_latency(
    model_spec: str, retriever, new_tokens: int = 64, repeats: int = 3, prompt_tokens: int = 300
) -> dict:
    """What the chat page feels with the demo bot: time to the first token and tokens per second
    of a grounded answer through the LangChain chat model, for a prompt of at least
    `prompt_tokens` (the bot's system prompt + the nearest notes + the question). Median of
    `repeats`, after a warm-up; greedy, so every repeat does the same work."""
    import os

    import torch

    from chat.chain import BOT_SYSTEM_PROMPT, fit_prompt

    chat_model = ChatLocalModel(model=model_spec, temperature=0, max_tokens=new_tokens)
    question = "How does top-p sampling decide how many tokens to keep at each step?"
    ranked = retriever.ranked(question)
    for n in range(1, len(ranked) + 1):  # the nearest notes, until the prompt is ~300 tokens
        fitted = fit_prompt(
            question, [], ranked[:n], chat_model.count_tokens, 8192, new_tokens, BOT_SYSTEM_PROMPT
        )
        if fitted.prompt_tokens >= prompt_tokens:
            break
    messages = [*fitted.system, HumanMessage(question)]
    firsts, rates, tokens = [], [], 0
    for i in range(repeats + 1):
        start = time.perf_counter()
        first = None
        for chunk in chat_model.stream(messages, stop=None):
            if first is None and chunk.content:
                first = time.perf_counter() - start
            if chunk.usage_metadata:
                tokens = chunk.usage_metadata["output_tokens"]
        total = time.perf_counter() - start
        if i:  # the first round warms up
            firsts.append(first or total)
            rates.append((tokens - 1) / max(total - (first or 0.0), 1e-9))
    return {
        "model": model_spec,
        "prompt_tokens": fitted.prompt_tokens,
        "answer_tokens": tokens,
        "first_token_s": statistics.median(firsts),
        "tokens_per_s": statistics.median(rates),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }


def run_benchmarks(
    quick: bool = False, echo: Callable[[str], None] = print, model: str = "tutor"
) -> dict:

    questions = held_out_questions(quick)
    start = time.perf_counter()
    retriever = ConceptRetriever()
    build_s = time.perf_counter() - start
    echo(f"chat benchmarks: model {model}, {len(questions)} held-out questions")
    hits = retrieval_hit_rate(retriever, questions)
    echo(
        f"  retrieval (MiniLM, {build_s:.1f} s to load and index): right concept first "
        f"{hits['top1']:.0%}, among the top {retriever.k} {hits[f'top{retriever.k}']:.0%}"
    )
    grounding = grounding_effect(model, retriever, questions)
    for name, accuracy in grounding.items():
        echo(f"  key-term accuracy, {name}: {accuracy:.0%}")
    cost = answer_cost(model, repeats=2 if quick else 5)
    names = ("core loop", "chat model", "chat turn")
    echo(
        f"  one answer of {cost['tokens']} tokens, ms: "
        + ", ".join(f"{name} {cost[name]:.0f}" for name in names)
    )
    bot = {}
    if is_adapter_folder(BOT_ADAPTER):
        bot = bot_latency(BOT_MODEL, retriever, repeats=1 if quick else 3)
        echo(
            f"  demo bot ({BOT_MODEL}), {bot['prompt_tokens']}-token grounded prompt, "
            f"{bot['threads']} threads, load {bot['load_average']:.1f}: first token "
            f"{bot['first_token_s']:.2f} s (goal <= 1.5 s), {bot['tokens_per_s']:.1f} tokens/s "
            "(goal >= 15)"
        )
    return {
        "model": model,
        "bot": bot,
        "retrieval": {**hits, "build_seconds": build_s},
        "key_term_accuracy": grounding,
        "answer_ms": cost,
    }
