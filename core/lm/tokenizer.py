"""Byte-level BPE tokenizer with chat special tokens, trained from scratch on our corpus.

Byte-level means the base alphabet is the 256 byte values, so any UTF-8 text (emoji, Chinese, ...)
can be encoded and decoded exactly; BPE merges then build longer tokens from frequent byte pairs.
The result is wrapped in a `transformers.PreTrainedTokenizerFast`, so `AutoTokenizer` can load it
and `apply_chat_template` works for supervised finetuning later.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from core.content.corpus import END_OF_TEXT

PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLES = ("system", "user", "assistant")
# Order matters: these get ids 0..5. <|endoftext|> separates documents (bos and eos).
SPECIAL_TOKENS: tuple[str, ...] = (
    END_OF_TEXT,
    PAD,
    *(f"<|{role}|>" for role in ROLES),
    END_OF_TURN,
)

# Each turn is "<|role|>\n{content}<|end|>\n". The assistant's content and its <|end|> are inside
# {% generation %}, so `return_assistant_tokens_mask=True` marks exactly what SFT should learn
# to produce (including when to stop). The tokenizer alone matches these special tokens anywhere
# in a text; core.lm.chat_format encodes conversations so that only the ones this template writes
# get special ids, and the same letters inside a message's content are ordinary text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unknown chat role ' + message['role']"
    " + ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with the chat special tokens."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: a document's first word has no leading space, exactly as in the text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (END_OF_TEXT, PAD)],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Write the tokenizer files (tokenizer.json, config, chat template) into the folder path."""
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `save_tokenizer` (never touches the network)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """One flat int64 token stream: <|endoftext|> doc1 <|endoftext|> doc2 ...

    The separator before each document acts as BOS, and the one before the next document doubles
    as EOS, so the model learns both how documents start and when they end.
    """
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []
    stream = [token for ids in encoded for token in (eot, *ids)]
    return torch.tensor(stream, dtype=torch.long)
