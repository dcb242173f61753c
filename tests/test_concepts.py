"""The concept list is consistent with the dashboard it points to."""

from __future__ import annotations

from pathlib import Path

from core.content.concepts import CONCEPTS, CONCEPTS_BY_ID, concepts_for_page
from dashboard.navigation import PAGE_ORDER, page_path


def test_ids_unique_and_every_page_exists_in_the_app():
    assert len(CONCEPTS_BY_ID) == len(CONCEPTS)
    pages = {module for module, _, _ in PAGE_ORDER}
    for concept in CONCEPTS:
        assert concept.page in pages, concept.id
        assert page_path(concept.page).is_file(), concept.page  # cites a page that exists
        assert concept.key_terms, concept.id
        assert 40 < len(concept.text) < 600, concept.id


def test_every_explainer_page_has_concepts():
    for page in ("taxonomy", "tokens", "next_token", "embeddings", "training_stages"):
        assert concepts_for_page(page), page
    for page in ("quantization", "lora", "chat"):
        assert concepts_for_page(page), page


# Every concept the source course notes (../shared/seeds/) teach, with the page that teaches it
# and a phrase that page (its view, its lib module or its concept notes) must contain.
SEED_CONCEPTS: dict[str, tuple[str, str]] = {
    "artificial intelligence": ("taxonomy", "artificial intelligence"),
    "machine learning": ("taxonomy", "machine learning"),
    "deep learning": ("taxonomy", "deep learning"),
    "generative AI": ("taxonomy", "generative ai"),
    "discriminative vs generative models": ("taxonomy", "discriminative"),
    "foundation models": ("taxonomy", "foundation model"),
    "large language models": ("taxonomy", "large language model"),
    "multimodal models": ("taxonomy", "multimodal"),
    "modalities (text, image, audio, video, code)": ("taxonomy", "modalit"),
    "the transformer": ("taxonomy", "transformer"),
    "BERT (encoder) vs GPT (decoder)": ("taxonomy", "bert"),
    "the AI engineer's role": ("taxonomy", "ai engineer"),
    "challenges: data, compute, bias, evaluation, misuse": ("taxonomy", "bias"),
    "model leaderboards": ("taxonomy", "leaderboard"),
    "tokens and tokenizers": ("tokens", "token"),
    "context window": ("tokens", "context window"),
    "parameters vs tokens": ("tokens", "parameter"),
    "next-token prediction": ("next_token", "next token"),
    "temperature": ("next_token", "temperature"),
    "top-k": ("next_token", "top-k"),
    "top-p": ("next_token", "top-p"),
    "greedy decoding": ("next_token", "greedy"),
    "KV cache": ("next_token", "kv cache"),
    "attention": ("inside", "attention"),
    "perplexity": ("inside", "perplexity"),
    "embeddings": ("embeddings", "embedding"),
    "cosine similarity": ("embeddings", "cosine"),
    "representation learning": ("embeddings", "representation learning"),
    "pre-training": ("training_stages", "pre-train"),
    "supervised fine-tuning": ("training_stages", "supervised fine-tuning"),
    "RLHF": ("training_stages", "rlhf"),
    "reward model": ("training_stages", "reward model"),
    "PPO": ("training_stages", "ppo"),
    "DPO": ("training_stages", "dpo"),
    "hallucination": ("prompting", "hallucinat"),
    "zero-shot and few-shot prompting": ("prompting", "few-shot"),
    "quantization": ("quantization", "quantiz"),
    "LoRA": ("lora", "lora"),
    "QLoRA": ("lora", "qlora"),
    "transfer learning": ("lora", "transfer learning"),
    "fine-tuning on your own data": ("finetune_lab", "fine-tun"),
    "parameter file + run file": ("home", "parameter file"),
    "chatbots with LangChain (retrieval, memory)": ("chat", "retriev"),
}


def _page_text(page: str) -> str:
    root = Path(__file__).resolve().parents[1]
    parts = [(root / "dashboard" / "views" / f"{page}.py").read_text(encoding="utf-8")]
    for name in (f"{page}.py", f"{page}_view.py"):
        lib = root / "dashboard" / "lib" / name
        if lib.is_file():
            parts.append(lib.read_text(encoding="utf-8"))
    parts += [f"{c.title} {c.text}" for c in CONCEPTS if c.page == page]
    return " ".join(parts).lower()


def test_every_concept_of_the_source_notes_has_a_page_that_teaches_it():
    from dashboard.navigation import existing_pages

    pages = {module for module, _, _ in existing_pages()}
    missing = [
        (concept, page, phrase)
        for concept, (page, phrase) in SEED_CONCEPTS.items()
        if page not in pages or phrase not in _page_text(page)
    ]
    assert not missing, missing
