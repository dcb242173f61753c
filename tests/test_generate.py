"""Streaming text: pieces joined give exactly the decoded answer, even mid-way through UTF-8."""

from __future__ import annotations

from core.lm.generate import stream_text
from core.lm.sampling import SamplingParams
from core.lm.tokenizer import train_tokenizer


def test_stream_text_pieces_join_to_the_decoded_text():
    tokenizer = train_tokenizer(["plain words only"] * 20, vocab_size=300)
    text = "Héllo 👋 世界, tokens!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # emoji and CJK are split into several byte tokens
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never shows half a character
    assert len(pieces) > 5  # it really streams


def test_repetition_penalty_matches_transformers_generate():
    """Greedy decoding with a repetition penalty: core's one loop, on our GPT and on the same
    weights in transformers, gives exactly transformers' `generate(repetition_penalty=...)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.lm.chat_format import encode_prompt
    from core.lm.generate import generate
    from core.lm.loader import PRETRAINED_DIR, load

    folder = PRETRAINED_DIR / "tutor-base"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = encode_prompt(tokenizer, "Once upon a time there was a", chat=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=40, do_sample=False, repetition_penalty=2.5,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
        )[0, len(ids) :].tolist()  # fmt: skip
    ours, _ = load("tutor-base")
    for model in (ours, reference):
        got = generate(
            model,
            ids,
            sampling=SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=2.5),
        )
        assert got == out
    plain = generate(ours, ids, sampling=SamplingParams(max_tokens=40, temperature=0.0))
    assert plain != out  # the penalty really changed the text
