"""README.md stays a front page: short, the two commands, and links that resolve. Every link into
docs/ must name an existing page and, with `#anchor`, a heading of that page (the docs site itself
is checked by `mkdocs build --strict` in `make test`)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_CHARS = 15_000

# [text](target) and ![alt](target); an optional "title" after the target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXPLICIT_ID = re.compile(r"\{[^}]*#([\w-]+)[^}]*\}\s*$")


def without_code(text: str) -> str:
    """Markdown without fenced blocks, nor code spans that look like links (they are not)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", lambda m: m.group(0) if "](" not in m.group(0) else "", text)


def links(text: str) -> list[str]:
    return LINK.findall(without_code(text))


def heading_text(raw: str) -> str:
    """A heading as rendered text: no inline-code ticks, emphasis or link targets."""
    raw = EXPLICIT_ID.sub("", raw)
    raw = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    return re.sub(r"[`*_]", "", raw).strip()


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify (what mkdocs gives a heading as its id)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(text: str) -> str:
    """GitHub's heading anchors (README.md is read on GitHub): punctuation dropped, spaces to
    hyphens, runs of hyphens kept."""
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path, slug) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    found = set()
    for raw in HEADING.findall(text):
        explicit = EXPLICIT_ID.search(raw)
        found.add(explicit.group(1) if explicit else slug(heading_text(raw)))
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)) or target.startswith("//")


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text) < MAX_CHARS, f"README.md has {len(text):,} characters (limit {MAX_CHARS:,})"
    assert "make run" in text
    assert "make test" in text


def test_readme_has_relative_links():
    assert [t for t in links(README.read_text(encoding="utf-8")) if not is_external(t)]


@pytest.mark.parametrize(
    "target",
    sorted({t for t in links(README.read_text(encoding="utf-8")) if not is_external(t)}),
)
def test_readme_link_resolves(target: str):
    path_part, _, anchor = target.partition("#")
    path = (ROOT / path_part).resolve() if path_part else README
    assert path.exists(), f"README.md links to {target!r}: {path_part} does not exist"
    assert path.is_relative_to(ROOT), f"README.md links outside the repository: {target!r}"
    if not anchor:
        return
    assert path.suffix == ".md", f"{target!r}: an anchor into a non-Markdown file"
    # README.md is rendered by GitHub; the pages under docs/ by mkdocs.
    slug = github_slug if path == README else mkdocs_slug
    assert anchor in anchors(path, slug), f"{target!r}: {path.name} has no heading #{anchor}"


def test_slugs_match_what_mkdocs_renders():
    """The anchor rule above is mkdocs' (Python-Markdown's toc): headings with code, a dash, a
    slash."""
    toc = pytest.importorskip("markdown.extensions.toc")
    for heading in ("`genai-lab generate` — sample from a model", "KL(true ‖ model) & 4-bit"):
        text = heading_text(heading)
        assert mkdocs_slug(text) == toc.slugify(text, "-")
    assert (
        mkdocs_slug(heading_text("`genai-lab generate` — sample from a model"))
        == "genai-lab-generate-sample-from-a-model"
    )
    assert (
        mkdocs_slug(heading_text("finetune/ — LoRA and QLoRA on your own data"))
        == "finetune-lora-and-qlora-on-your-own-data"
    )
