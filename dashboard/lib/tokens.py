"""Tokenization made visible: text -> coloured segments, ids and counts for two tokenizers.

Byte-level BPE (our tutor's) never fails: every UTF-8 byte is in its vocabulary, so a character
it has not learnt becomes several byte tokens. WordPiece (MiniLM's, from BERT) lowercases, strips
accents, drops whitespace, and maps a character missing from its 30,522 pieces to [UNK].
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from transformers.convert_slow_tokenizer import bytes_to_unicode

from core.lm.chat_format import encode_text, tokenize_conversation

MAX_CHARS = 2_000  # longer text is cut here; the page says so
WHITESPACE_MARKS = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}
# Pastel backgrounds that stay readable with black text; neighbours always differ.
PALETTE = ("#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6", "#a0c4ff", "#ffadad")

# Byte-level BPE spells each byte as one printable character; this undoes that.
_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True)
class Segment:
    token_id: int
    token: str  # the tokenizer's own spelling: "Ġcat", "##ing", "[UNK]"
    start: int  # character span of the source text this token came from
    end: int
    label: str  # what the token stands for, readable, whitespace made visible
    kind: str  # "text", "bytes" (part of a character's UTF-8 bytes), "unknown" ([UNK]) or
    # "special" (a control token such as <|im_start|>, not text the user typed)


def cap_text(text: str, limit: int = MAX_CHARS) -> tuple[str, bool]:
    """(text cut to at most `limit` characters, whether it was cut). The cut falls at the last
    whitespace, so no word is split in two (a half word would look like a new, unseen word);
    only text with no whitespace in its first `limit` characters is cut mid-word."""
    if len(text) <= limit:
        return text, False
    if text[limit].isspace():
        return text[:limit].rstrip(), True
    head = text[:limit]
    boundary = max((i for i, c in enumerate(head) if c.isspace()), default=-1)
    return (head[:boundary].rstrip() if boundary > 0 else head), True


def show_whitespace(text: str) -> str:
    """Make spaces, newlines and tabs visible: "a b\\n" -> "a·b↵"."""
    return "".join(WHITESPACE_MARKS.get(c, c) for c in text)


def readable_bytes(data: bytes) -> tuple[str, bool]:
    """Decode what is valid UTF-8; write stray bytes of a split character as ⟨e6⟩.
    Returns (label, whether any byte was stray)."""
    out: list[str] = []
    i, stray = 0, False
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                out.append(data[i : i + size].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += size
            break
        else:
            out.append(f"⟨{data[i]:02x}⟩")
            i, stray = i + 1, True
    return "".join(out), stray


def bpe_token_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for ("Ġcat" -> b" cat")."""
    return bytes(_UNICODE_TO_BYTE[c] for c in token)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return encoding["input_ids"], encoding["offset_mapping"]


def bpe_segments(tokenizer, text: str) -> list[Segment]:
    """Segments of a byte-level BPE tokenizer (e.g. `core.lm.tokenizer.load_tokenizer(...)`)."""
    return _bpe_segments(tokenizer, *_encode(tokenizer, text))


def _bpe_segments(tokenizer, ids: list[int], offsets: list[tuple[int, int]]) -> list[Segment]:
    segments = []
    for token_id, (start, end), token in zip(
        ids, offsets, tokenizer.convert_ids_to_tokens(ids), strict=True
    ):
        label, stray = readable_bytes(bpe_token_bytes(token))
        segments.append(
            Segment(
                token_id, token, start, end, show_whitespace(label), "bytes" if stray else "text"
            )
        )
    return segments


def wordpiece_segments(tokenizer, text: str) -> list[Segment]:
    """Segments of a WordPiece tokenizer (MiniLM's). Labels are the pieces as the model sees them
    (lowercased, accents stripped, "##" marks a word's continuation); an [UNK] is labelled with
    the text it replaced."""
    ids, offsets = _encode(tokenizer, text)
    unknown = tokenizer.unk_token
    return [
        Segment(
            token_id,
            token,
            start,
            end,
            show_whitespace(text[start:end]) if token == unknown else token,
            "unknown" if token == unknown else "text",
        )
        for token_id, (start, end), token in zip(
            ids, offsets, tokenizer.convert_ids_to_tokens(ids), strict=True
        )
    ]


@dataclass(frozen=True)
class Summary:
    tokens: int
    characters: int
    chars_per_token: float
    unknown: int  # [UNK] tokens: text the tokenizer could not represent
    byte_pieces: int  # tokens that are only part of a character's bytes
    dropped: str  # source characters no token covers (WordPiece drops whitespace)


def summarize(text: str, segments: list[Segment]) -> Summary:
    covered = bytearray(len(text))
    for s in segments:
        covered[s.start : s.end] = b"\x01" * (s.end - s.start)
    dropped = "".join(c for c, hit in zip(text, covered, strict=True) if not hit)
    return Summary(
        tokens=len(segments),
        characters=len(text),
        chars_per_token=chars_per_token(text, len(segments)),
        unknown=sum(s.kind == "unknown" for s in segments),
        byte_pieces=sum(s.kind == "bytes" for s in segments),
        dropped=dropped,
    )


def chars_per_token(text: str, num_tokens: int) -> float:
    """Characters of `text` per token (0 for no tokens): higher means a more compact encoding."""
    return len(text) / num_tokens if num_tokens else 0.0


def words_per_token(text: str, num_tokens: int) -> float:
    """Words (split at whitespace) per token: the "one token is about 3/4 of a word" number,
    measured on this text with this tokenizer."""
    return len(text.split()) / num_tokens if num_tokens else 0.0


def comparison_rows(text: str, views: list[tuple[str, int, list[Segment]]]) -> list[dict]:
    """One row per tokenizer, (name, vocabulary size, segments), for a side-by-side table."""
    rows = []
    for name, vocabulary, segments in views:
        summary = summarize(text, segments)
        rows.append(
            {
                "tokenizer": name,
                "vocabulary": f"{vocabulary:,}",
                "tokens": summary.tokens,
                "characters per token": round(summary.chars_per_token, 2),
                "words per token": round(words_per_token(text, summary.tokens), 2),
                "[UNK]": summary.unknown,
                "byte pieces": summary.byte_pieces,
            }
        )
    return rows


def mark_special(tokenizer, segments: list[Segment]) -> list[Segment]:
    """The same segments, with the tokenizer's special tokens (<|im_start|>, ...) marked."""
    special = set(tokenizer.all_special_ids)
    return [
        Segment(s.token_id, s.token, s.start, s.end, s.token, "special")
        if s.token_id in special
        else s
        for s in segments
    ]


@dataclass(frozen=True)
class ChatTemplateView:
    rendered: str  # the conversation as the one string the model reads
    token_ids: list[int]  # what the app feeds the model (core.lm.chat_format)
    segments: list[Segment]  # the rendered string's tokens, special tokens marked


def chat_template_view(
    tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False
) -> ChatTemplateView:
    """Render `messages` with the tokenizer's chat template, as text and as the token ids the app
    uses: special tokens only where the template wrote them, special-token letters inside a
    message as ordinary text pieces (core.lm.chat_format.tokenize_conversation)."""
    tokenized = tokenize_conversation(tokenizer, messages, generation_prompt)
    segments = mark_special(
        tokenizer, _bpe_segments(tokenizer, tokenized.ids, tokenized.offsets or [])
    )
    return ChatTemplateView(tokenized.text, tokenized.ids, segments)


@dataclass(frozen=True)
class TypedToken:
    token: str  # a special token's letters, e.g. "<|end|>"
    real_id: int  # its id, which only the chat template writes
    typed_ids: list[int]  # the same letters typed in a message: ordinary text pieces
    typed_pieces: list[str]  # those pieces, readable


def typed_vs_real(tokenizer, token: str) -> TypedToken:
    """A special token as the template writes it (one id) and as a message containing its letters
    is encoded (several ordinary pieces, none of them special)."""
    ids = encode_text(tokenizer, token)
    pieces = [readable_bytes(bpe_token_bytes(t))[0] for t in tokenizer.convert_ids_to_tokens(ids)]
    return TypedToken(token, tokenizer.convert_tokens_to_ids(token), ids, pieces)


def segment_rows(segments: list[Segment], text: str) -> list[dict]:
    """One row per token for a table: position, id, the token as the tokenizer spells it, and
    the source text it covers."""
    return [
        {
            "#": i,
            "id": s.token_id,
            "token": s.token,
            "text": show_whitespace(text[s.start : s.end]),
            "kind": s.kind,
        }
        for i, s in enumerate(segments)
    ]


def segments_html(text: str, segments: list[Segment]) -> str:
    """The text as coloured token chips (hover: id and token). Source characters that no token
    covers are shown struck through in grey, so nothing the tokenizer dropped is hidden."""
    parts: list[str] = []
    cursor = 0
    for i, s in enumerate(segments):
        if s.start > cursor:  # text no token covers (WordPiece's whitespace)
            parts.append(_dropped_html(text[cursor : s.start]))
        cursor = max(cursor, s.end)
        parts.append(_chip_html(s, PALETTE[i % len(PALETTE)], text[s.start : s.end]))
        if "\n" in text[s.start : s.end] and s.kind != "bytes":
            parts.append("<br>")
    if cursor < len(text):
        parts.append(_dropped_html(text[cursor:]))
    return (
        '<div style="font-family: ui-monospace, SFMono-Regular, Menlo, monospace; '
        'font-size: 0.95rem; line-height: 2.0; word-break: break-word">' + "".join(parts) + "</div>"
    )


def _chip_html(s: Segment, colour: str, source: str) -> str:
    label = s.label
    style = f"background:{colour}; color:#111; border-radius:4px; padding:1px 2px; margin:0 1px"
    if s.kind == "unknown":
        label = f"{s.label}→[UNK]"
        style = "background:#ffb3b3; color:#7a0000; border:1px solid #c00; border-radius:4px; padding:1px 2px; margin:0 1px"
    elif s.kind == "bytes":
        style += "; border:1px dashed #555"
    elif s.kind == "special":
        style = "background:#333; color:#fff; font-weight:bold; border-radius:4px; padding:1px 3px; margin:0 1px"
    title = f"id {s.token_id} · token {s.token!r} · text {source!r}"
    return f'<span title="{html.escape(title)}" style="{style}">{html.escape(label)}</span>'


def _dropped_html(text: str) -> str:
    # A newline the tokenizer dropped still ends the line, so the layout matches the input.
    pieces = [
        '<span style="color:#999; text-decoration: line-through">'
        f"{html.escape(show_whitespace(line))}</span>"
        for line in text.split("\n")
    ]
    return '<span style="color:#999">↵</span><br>'.join(pieces)


# ---------------------------------------------------------------------------------------------
# Tokens vs parameters: published figures (training tokens are what a model read while
# learning; the context window is how many it reads at once; parameters are its learned numbers)
# ---------------------------------------------------------------------------------------------

SCALE_TABLE: tuple[dict, ...] = (
    # model, year, parameters, training tokens, context window, source
    {"model": "GPT-3", "year": 2020, "parameters": 175e9, "training tokens": 300e9,
     "context": 2048, "source": "Brown et al. 2020, Language Models are Few-Shot Learners"},
    {"model": "Chinchilla", "year": 2022, "parameters": 70e9, "training tokens": 1.4e12,
     "context": 2048, "source": "Hoffmann et al. 2022, Training Compute-Optimal LLMs"},
    {"model": "LLaMA 7B", "year": 2023, "parameters": 7e9, "training tokens": 1.0e12,
     "context": 2048, "source": "Touvron et al. 2023, LLaMA"},
    {"model": "LLaMA 65B", "year": 2023, "parameters": 65e9, "training tokens": 1.4e12,
     "context": 2048, "source": "Touvron et al. 2023, LLaMA"},
    {"model": "Llama 2 7B", "year": 2023, "parameters": 7e9, "training tokens": 2.0e12,
     "context": 4096, "source": "Touvron et al. 2023, Llama 2"},
    {"model": "Llama 2 70B", "year": 2023, "parameters": 70e9, "training tokens": 2.0e12,
     "context": 4096, "source": "Touvron et al. 2023, Llama 2"},
    {"model": "Llama 3 8B", "year": 2024, "parameters": 8e9, "training tokens": 15e12,
     "context": 8192, "source": "Meta 2024, Llama 3 model card (15T+ tokens)"},
    {"model": "Llama 3 70B", "year": 2024, "parameters": 70e9, "training tokens": 15e12,
     "context": 8192, "source": "Meta 2024, Llama 3 model card (15T+ tokens)"},
    {"model": "Llama 3.1 405B", "year": 2024, "parameters": 405e9, "training tokens": 15.6e12,
     "context": 131072, "source": "Llama Team 2024, The Llama 3 Herd of Models"},
    {"model": "SmolLM2-135M", "year": 2024, "parameters": 135e6, "training tokens": 2e12,
     "context": 8192, "source": "Hugging Face 2024, SmolLM2 model card"},
)  # fmt: skip


def scale_rows(tutor_report: dict, tutor_context: int) -> list[dict]:
    """SCALE_TABLE plus our tutor's measured figures (from its training_report.json), with
    human-readable numbers and tokens per parameter."""
    tutor = {
        "model": "tutor-base (this project, measured)",
        "year": None,
        "parameters": float(tutor_report["parameters"]),
        "training tokens": float(tutor_report["tokens_seen"]),
        "context": tutor_context,
        "source": "core/pretrained/tutor-base/training_report.json",
    }
    return [
        {
            "model": row["model"],
            "year": str(row["year"]) if row["year"] else "",
            "parameters": human_count(row["parameters"]),
            "training tokens": human_count(row["training tokens"]),
            "tokens per parameter": _ratio(row["training tokens"] / row["parameters"]),
            "context window": f"{row['context']:,}" if row["context"] else "n/a",
            "source": row["source"],
        }
        for row in (*SCALE_TABLE, tutor)
    ]


def _ratio(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def human_count(n: float) -> str:
    """175e9 -> '175B', 1.4e12 -> '1.4T', 1877184 -> '1.88M'."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:g}"
