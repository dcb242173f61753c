"""Streaming text: pieces joined give exactly the decoded answer, even mid-way through UTF-8."""

from __future__ import annotations

from core.generate import stream_text
from core.tokenizer import train_tokenizer


def test_stream_text_pieces_join_to_the_decoded_text():
    tokenizer = train_tokenizer(["plain words only"] * 20, vocab_size=300)
    text = "Héllo 👋 世界, tokens!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # emoji and CJK are split into several byte tokens
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never shows half a character
    assert len(pieces) > 5  # it really streams
