"""The concept list is consistent with the dashboard it points to."""

from __future__ import annotations

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
