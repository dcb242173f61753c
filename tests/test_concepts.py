"""The concept list is consistent with the dashboard it points to."""

from __future__ import annotations

import ast
from pathlib import Path

from core.concepts import CONCEPTS, CONCEPTS_BY_ID, concepts_for_page

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def dashboard_page_modules() -> set[str]:
    """Page module names listed in dashboard/app.py's PAGE_ORDER (read without running it)."""
    tree = ast.parse(APP.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PAGE_ORDER":
            return {entry.elts[0].value for entry in node.value.elts}
    raise AssertionError("PAGE_ORDER not found")


def test_ids_unique_and_every_page_exists_in_the_app():
    assert len(CONCEPTS_BY_ID) == len(CONCEPTS)
    pages = dashboard_page_modules()
    for concept in CONCEPTS:
        assert concept.page in pages, concept.id
        assert concept.key_terms, concept.id
        assert 40 < len(concept.text) < 600, concept.id


def test_every_explainer_page_has_concepts():
    for page in ("taxonomy", "tokens", "next_token", "embeddings", "training_stages"):
        assert concepts_for_page(page), page
    for page in ("quantization", "lora", "chat"):
        assert concepts_for_page(page), page
