"""The tutor's bundled fine-tuning data, generated from the checked concept list (core/content/concepts.py).

`python -m core.content.tutor_data` rewrites core/content/data/*.jsonl deterministically:

- sft_train.jsonl / sft_heldout.jsonl: `{"messages": [...]}` conversations (TRL's format). Every
  concept is asked with several question phrasings; the held-out file uses phrasings that never
  appear in training, so it measures whether the model understood the question, not the string.
  A few training rows are multi-turn with a system message. About 30% of the single-turn training
  answers end with filler ("Well, as I said, and so on and so on."), like the padding real
  demonstrations have; held-out answers never do (see PADDED_SHARE).
- prefs_train.jsonl / prefs_heldout.jsonl: `{"prompt", "chosen", "rejected"}` pairs (TRL's
  "implicit prompt" preference format with plain strings), split the same way.

The preference rubric (what a person ranking answers would prefer):
  1. correct beats wrong: a true answer beats a false statement about the same thing;
  2. on-topic beats off-topic: the answer about the asked concept beats a true answer about
     another concept;
  3. concise beats rambling: the answer beats the same answer padded with repetition and filler;
  4. polite and helpful beats rude or evasive: the answer beats "look it up yourself" or
     "I do not know".
Every chosen answer is the reference answer below; each rejected answer breaks exactly one rule.

The answers are short (at most 50 tokens) because the tutor reads only 128 tokens, and they use
the bundled corpus's words where possible, so the tiny tokenizer spends few tokens on them. Each
answer is a shortened, plain-words version of its concept's checked text and contains the
concept's key term (tested in tests/test_tutor.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from core.content.concepts import CONCEPTS, CONCEPTS_BY_ID

DATA_DIR = Path(__file__).parent / "data"
SYSTEM_PROMPT = "You are a kind tutor."
# A two-turn chat must fit the tutor's 128-token context; ~2.5 characters per token for these words.
MAX_CHAT_CHARS = 255

# concept id -> (what the question is about, the reference answer)
TUTOR_ANSWERS: dict[str, tuple[str, str]] = {
    "ai": (
        "artificial intelligence",
        "Artificial intelligence (AI) is the broad field of building computer systems that do "
        "tasks we link with intelligence, such as speech or chess.",
    ),
    "machine-learning": (
        "machine learning",
        "Machine learning is the part of AI where a system learns patterns from data instead of "
        "following rules written by people.",
    ),
    "deep-learning": (
        "deep learning",
        "Deep learning is the part of machine learning that uses neural networks with many layers.",
    ),
    "generative-ai": (
        "generative AI",
        "Generative AI is the part of deep learning that creates new content, such as text, "
        "images, music or code.",
    ),
    "ai-nesting": (
        "how AI, machine learning and deep learning are nested",
        "They are nested: AI contains machine learning, machine learning contains deep learning, "
        "and deep learning contains generative AI.",
    ),
    "discriminative-vs-generative": (
        "discriminative and generative models",
        "A discriminative model learns to tell classes apart, like spam or not spam. A generative "
        "model learns what the data looks like, so it can make new examples.",
    ),
    "foundation-model": (
        "a foundation model",
        "A foundation model is a large model pre-trained on broad data that can be adapted to many "
        "tasks, like GPT-4 or Llama.",
    ),
    "llm": (
        "a large language model",
        "A large language model (LLM) is a big transformer trained on a lot of text to predict "
        "the next token.",
    ),
    "transformer": (
        "the transformer",
        "The transformer is the neural network behind language models. Its attention layers let "
        "each token look at the tokens before it.",
    ),
    "modalities": (
        "modalities of generative models",
        "A modality is the kind of data that goes in or out, for example text-to-text, "
        "text-to-image or speech-to-text.",
    ),
    "token": (
        "a token",
        "A token is a piece of text, often a word or a part of a word. Each token has a number "
        "called its token id.",
    ),
    "tokenizer": (
        "a tokenizer",
        "A tokenizer splits text into tokens. BPE starts from bytes and keeps merging the most "
        "frequent pair into a new token.",
    ),
    "parameters": (
        "the parameters of a model",
        "Parameters are the numbers inside a model that training changes, its weights. Large "
        "models have billions of them.",
    ),
    "next-token": (
        "next token prediction",
        "The model gives a probability to every token for being the next token, picks one, adds "
        "it to the text and repeats.",
    ),
    "temperature": (
        "temperature",
        "Temperature scales the scores before sampling. Below one it makes the distribution "
        "sharper, above one it makes it flatter.",
    ),
    "top-k": (
        "top-k sampling",
        "Top-k sampling keeps only the k most likely tokens and samples the next token from them.",
    ),
    "top-p": (
        "top-p sampling",
        "Top-p sampling, also called nucleus sampling, keeps the smallest set of likely tokens "
        "whose probabilities add up to at least p.",
    ),
    "greedy": (
        "greedy decoding",
        "Greedy decoding always picks the most likely next token, so it is deterministic: the "
        "same prompt gives the same answer.",
    ),
    "kv-cache": (
        "the KV cache",
        "The KV cache keeps the keys and values of earlier tokens, so each new token needs only "
        "one new step.",
    ),
    "context-window": (
        "the context window",
        "The context window is the number of tokens that the model can read at once, prompt and "
        "answer together.",
    ),
    "embedding": (
        "an embedding",
        "An embedding is a vector, a list of numbers, that represents a token or a sentence. "
        "Similar meanings get similar vectors.",
    ),
    "cosine-similarity": (
        "cosine similarity",
        "Cosine similarity measures the angle between two vectors: 1 means the same direction, "
        "0 means unrelated.",
    ),
    "pretraining": (
        "pre-training",
        "Pre-training is the first stage: the model learns to predict the next token on a huge "
        "amount of text. The result is a base model.",
    ),
    "sft": (
        "supervised fine-tuning",
        "Supervised fine-tuning (SFT) trains the base model on example conversations, with the "
        "loss only on the answers.",
    ),
    "rlhf": (
        "RLHF",
        "RLHF means reinforcement learning from human feedback: a reward model learns from human "
        "rankings, and the model learns to get a higher reward.",
    ),
    "reward-model": (
        "a reward model",
        "A reward model reads a prompt and an answer and gives one score. It learns to score the "
        "preferred answer higher.",
    ),
    "ppo": (
        "PPO",
        "PPO is the reinforcement learning method of classic RLHF. It moves the policy toward a "
        "higher reward in small, clipped steps.",
    ),
    "dpo": (
        "DPO",
        "DPO, direct preference optimisation, trains on preference pairs directly, without a "
        "reward model or reinforcement learning.",
    ),
    "hallucination": (
        "hallucination",
        "A hallucination is a fluent answer that is false or made up. The model writes likely "
        "text, not checked facts.",
    ),
    "quantization": (
        "quantization",
        "Quantization stores the weights with fewer bits, for example 8-bit or 4-bit instead of "
        "16 bits, so the model needs less memory.",
    ),
    "nf4": (
        "NF4",
        "NF4, 4-bit NormalFloat, is the data type of QLoRA. Its 16 levels fit weights with a "
        "normal distribution.",
    ),
    "fine-tuning": (
        "fine-tuning",
        "Fine-tuning trains a pre-trained model further on your own data, so it learns a domain "
        "or a style.",
    ),
    "lora": (
        "LoRA",
        "LoRA keeps the original weights frozen and trains two small low-rank matrices whose "
        "product is added to them.",
    ),
    "qlora": (
        "QLoRA",
        "QLoRA is LoRA on a base model quantized to 4-bit NF4. Only the small LoRA matrices are "
        "trained.",
    ),
    "langchain": (
        "LangChain",
        "LangChain is a Python framework for building applications with language models. It "
        "connects a model to prompts, tools and memory.",
    ),
    "retrieval": (
        "retrieval-augmented generation",
        "Retrieval (RAG) finds the passages that match a question and puts them into the prompt, "
        "so the answer is grounded in them.",
    ),
}

TRAIN_QUESTIONS = (
    "What is {s}?",
    "Can you explain {s}?",
    "Tell me about {s}.",
    "What does {s} mean?",
    "Explain {s} in simple words.",
    "I want to learn about {s}.",
    "what is {s}",
)
HELDOUT_QUESTIONS = (
    "Please describe {s}.",
    "What do you know about {s}?",
    "Help me understand {s}.",
)

# Rubric-breaking answers; {S} is the subject with a capital letter.
WRONG_ANSWERS = (
    "{S} is a kind of computer mouse that you plug into a printer.",
    "{S} is an old word for the sun, and it has nothing to do with computers.",
    "{S} means that the model deletes all of its weights after every answer.",
)
RUDE_ANSWERS = (
    "What a silly question. Look it up yourself.",
    "I do not want to explain that to you.",
)
EVASIVE_ANSWERS = ("I do not know.", "Maybe. It depends.")
# Filler that pads an answer without adding anything (rubric rule 3).
RAMBLING_FILLERS = (
    " Well, as I said, and so on and so on.",
    " Anyway, that is more or less it, I think.",
    " So yes, that is it, and so on and so on.",
)
# Demonstrations are written by people, and people pad: this share of the single-turn SFT training
# answers ends with a filler tail (a deliberate, documented flaw; held-out answers are clean). SFT
# imitates the habit, the preference pairs rank the padded answer below the concise one, so the
# reward model penalises it and RLHF teaches the tutor to stop: what comparisons can teach that
# imperfect demonstrations did not (the InstructGPT argument for stage 3).
PADDED_SHARE = 0.3


def key_terms(concept_id: str) -> list[str]:
    """The concept's key terms that its reference answer contains (what an answer must say)."""
    answer = TUTOR_ANSWERS[concept_id][1].lower()
    return [t for t in CONCEPTS_BY_ID[concept_id].key_terms if t.lower() in answer]


def contains_key_term(answer: str, concept_id: str) -> bool:
    """True if `answer` mentions at least one key term of the concept's reference answer."""
    return any(term.lower() in answer.lower() for term in key_terms(concept_id))


def is_padded(answer: str) -> bool:
    """True if the answer ends with one of the filler tails (the flaw RLHF should remove)."""
    return answer.rstrip().endswith(tuple(f.strip() for f in RAMBLING_FILLERS))


def questions(concept_id: str, held_out: bool) -> list[str]:
    subject = TUTOR_ANSWERS[concept_id][0]
    return [q.format(s=subject) for q in (HELDOUT_QUESTIONS if held_out else TRAIN_QUESTIONS)]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def sft_rows(held_out: bool, seed: int = 0) -> list[dict]:
    """One single-turn conversation per (concept, question); training also gets multi-turn rows.
    About PADDED_SHARE of the single-turn training answers carry a filler tail (see above)."""
    rows = []
    pad_rng = random.Random(seed + 2)
    for c in CONCEPTS:
        for q in questions(c.id, held_out):
            answer = TUTOR_ANSWERS[c.id][1]
            padded = not held_out and pad_rng.random() < PADDED_SHARE
            if padded:
                answer += pad_rng.choice(RAMBLING_FILLERS)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": answer},
                    ],
                    "concept": c.id,
                    "padded": padded,
                }
            )
    if not held_out:  # two-turn chats with a system prompt: the second question follows the first
        rng = random.Random(seed)
        ids = [c.id for c in CONCEPTS]
        for first in ids:
            q1 = min(questions(first, False), key=len)
            room = MAX_CHAT_CHARS - len(SYSTEM_PROMPT) - len(q1) - len(TUTOR_ANSWERS[first][1])
            fits = [
                i
                for i in ids
                if i != first
                and len(min(questions(i, False), key=len)) + len(TUTOR_ANSWERS[i][1]) <= room
            ]
            if not fits:
                continue
            second = rng.choice(fits)
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": q1},
                        {"role": "assistant", "content": TUTOR_ANSWERS[first][1]},
                        {"role": "user", "content": min(questions(second, False), key=len)},
                        {"role": "assistant", "content": TUTOR_ANSWERS[second][1]},
                    ],
                    "concept": second,
                }
            )
    return rows


def rejected_answers(concept_id: str, rng: random.Random) -> dict[str, str]:
    """One answer breaking each rubric rule, for this concept."""
    subject, answer = TUTOR_ANSWERS[concept_id]
    other = rng.choice([c for c in TUTOR_ANSWERS if c != concept_id])
    return {
        "wrong": rng.choice(WRONG_ANSWERS).format(S=_capitalise(subject)),
        "off-topic": TUTOR_ANSWERS[other][1],
        "rambling": answer + rng.choice(RAMBLING_FILLERS),
        "rude": rng.choice(RUDE_ANSWERS),
        "evasive": rng.choice(EVASIVE_ANSWERS),
    }


def preference_rows(held_out: bool, seed: int = 0, per_prompt: int = 2) -> list[dict]:
    """(prompt, chosen, rejected) pairs: `per_prompt` rubric violations per question."""
    rng = random.Random(seed + (1 if held_out else 0))
    rows = []
    for c in CONCEPTS:
        for q in questions(c.id, held_out):
            options = rejected_answers(c.id, rng)
            for rule in rng.sample(sorted(options), per_prompt):
                rows.append(
                    {
                        "prompt": q,
                        "chosen": TUTOR_ANSWERS[c.id][1],
                        "rejected": options[rule],
                        "rule": rule,
                        "concept": c.id,
                    }
                )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def write_bundled_data(folder: Path = DATA_DIR) -> dict[str, int]:
    """Regenerate the bundled JSONL files; returns rows per file."""
    files = {
        "sft_train.jsonl": sft_rows(held_out=False),
        "sft_heldout.jsonl": sft_rows(held_out=True),
        "prefs_train.jsonl": preference_rows(held_out=False),
        "prefs_heldout.jsonl": preference_rows(held_out=True),
    }
    for name, rows in files.items():
        write_jsonl(rows, folder / name)
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    print(write_bundled_data())
