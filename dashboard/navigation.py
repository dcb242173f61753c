"""The dashboard's pages in learning-path order; importable without running the app."""

from __future__ import annotations

from pathlib import Path

PAGES_DIR = Path(__file__).parent / "views"

# (module, title, icon) in the learning path's order.
PAGE_ORDER: list[tuple[str, str, str]] = [
    ("home", "Home", "🏠"),
    ("taxonomy", "AI, ML, DL, GenAI", "🪆"),
    ("tokens", "Tokens", "🔤"),
    ("next_token", "Next token & sampling", "🎲"),
    ("inside", "Inside the transformer", "🔬"),
    ("prompting", "Prompting & hallucination", "🪄"),
    ("embeddings", "Embeddings", "🧭"),
    ("training_stages", "Training stages", "🏗️"),
    ("quantization", "Quantization", "🗜️"),
    ("lora", "LoRA & QLoRA", "🧩"),
    ("finetune_lab", "Fine-tune", "🛠️"),
    ("chat", "Chat", "💬"),
]


def page_path(module: str) -> Path:
    return PAGES_DIR / f"{module}.py"


def existing_pages() -> list[tuple[str, str, str]]:
    """The entries of PAGE_ORDER whose module file exists."""
    return [entry for entry in PAGE_ORDER if page_path(entry[0]).is_file()]
