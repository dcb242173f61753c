"""Fuzzing with Hypothesis: the data readers (JSONL, JSON, CSV, Parquet, in every format), the
chat format and the YAML config loader meet arbitrary input and raise nothing but our named
error types (finetune.data.DataError, core.lm.chat_format.RenderError, core.train.config.
ConfigError), which the CLI prints as one line. 10,000 examples each, in the slow tier; the
fast tier runs a few hundred of each (FUZZ_EXAMPLES overrides both)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.lm.chat_format import RenderError, encode_conversation, encode_prompt
from core.lm.loader import PRETRAINED_DIR
from core.lm.tokenizer import load_tokenizer
from core.train.config import ConfigError, load_config
from finetune.config import FinetuneConfig
from finetune.data import DATA_FORMATS, DataError, detect_format, read_rows, to_conversation

SLOW = int(os.environ.get("FUZZ_EXAMPLES", 10_000))
FAST = int(os.environ.get("FUZZ_EXAMPLES", 200))


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure is reproducible, never flaky
        suppress_health_check=list(HealthCheck),
        database=None,
    )


# -- values a user's file may hold --------------------------------------------------------------

COLUMNS = sorted(
    {c for f in DATA_FORMATS for c in f.columns} | {"role", "content", "from", "value"}
)
ROLES = ["system", "user", "assistant", "human", "gpt", "bot", "tool", "", "USER"]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(ROLES) | json_values,
            "content": st.text(max_size=60) | json_values,
            "from": st.sampled_from(ROLES),
            "value": st.text(max_size=60),
            "weight": st.sampled_from([0, 1, 0.5, "x", None]),
        },
    ),
    max_size=5,
)
rows = st.lists(
    st.dictionaries(
        st.sampled_from(COLUMNS) | st.text(max_size=6),
        st.text(max_size=60) | messages | json_values,
        max_size=5,
    )
    | json_values,
    min_size=0,
    max_size=4,
)


def write(rows_: list, kind: str, folder: Path) -> Path:
    path = folder / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows_), encoding="utf-8")
    elif kind == "csv":
        dicts = [r for r in rows_ if isinstance(r, dict)]
        names = sorted({str(k) for r in dicts for k in r})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=names or ["text"])
        writer.writeheader()
        for r in dicts:
            writer.writerow({str(k): json.dumps(v) if not isinstance(v, str) else v
                             for k, v in r.items()})  # fmt: skip
        path.write_text(out.getvalue(), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dicts = [r for r in rows_ if isinstance(r, dict)] or [{"text": "x"}]
        names = sorted({str(k) for r in dicts for k in r})
        table = pa.table({n: [json.dumps(r.get(n)) for r in dicts] for n in names})
        pq.write_table(table, path)
    return path


def read_and_convert(path: Path) -> None:
    """What `genai-lab finetune --check` does with a file: read, detect, convert every row."""
    parsed = read_rows(path)
    try:
        fmt = detect_format([r for r in parsed if r.ok], str(path))
    except DataError:
        return
    for row in parsed:
        if row.ok:
            to_conversation(row.data, fmt, row.where)


# One folder for every example (a folder per example costs more than the reading it tests).
SCRATCH = Path(tempfile.mkdtemp(prefix="genai-lab-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _scratch():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


def data_readers_survive(rows_: list, kind: str, raw: bytes | None) -> None:
    path = write(rows_, kind, SCRATCH)
    if raw is not None and kind != "parquet":
        path.write_bytes(raw)  # not even well-formed: arbitrary bytes in a data file
    with contextlib.suppress(DataError):
        read_and_convert(path)


KINDS = st.sampled_from(["jsonl", "json", "csv", "parquet"])
RAW = st.none() | st.binary(max_size=200) | st.text(max_size=200).map(str.encode)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(rows, KINDS, RAW)
def test_fuzz_data_readers_raise_only_data_errors(rows_, kind, raw):
    data_readers_survive(rows_, kind, raw)


@fuzz_settings(FAST)
@given(rows, KINDS, RAW)
def test_fuzz_data_readers_quick(rows_, kind, raw):
    data_readers_survive(rows_, kind, raw)


# -- the chat format ------------------------------------------------------------------------------

TUTOR = load_tokenizer(PRETRAINED_DIR / "tutor-sft")
conversations = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES[:4]) | st.text(max_size=5), "content": st.text(max_size=80)}
    ),
    max_size=5,
)


def chat_format_survives(conversation: list[dict], prompt: str) -> None:
    try:
        encode_prompt(TUTOR, conversation or prompt)
    except (RenderError, ValueError) as e:
        assert type(e) in (RenderError, ValueError), e  # named, one line
    with contextlib.suppress(RenderError, ValueError):
        encode_conversation(TUTOR, conversation)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(conversations, st.text(max_size=80))
def test_fuzz_chat_format_raises_only_render_errors(conversation, prompt):
    chat_format_survives(conversation, prompt)


# -- the YAML config loader -----------------------------------------------------------------------

yaml_text = st.text(max_size=300) | st.dictionaries(
    st.sampled_from([f.name for f in FinetuneConfig.__dataclass_fields__.values()])
    | st.text(max_size=8),
    json_values,
    max_size=6,
).map(lambda d: "\n".join(f"{k}: {json.dumps(v)}" for k, v in d.items()))


def config_loader_survives(text: str) -> None:
    path = SCRATCH / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with contextlib.suppress(ConfigError):
        load_config(FinetuneConfig, path).validate(require_data=False)


@pytest.mark.slow
@fuzz_settings(SLOW)
@given(yaml_text)
def test_fuzz_yaml_config_loader_raises_only_config_errors(text):
    config_loader_survives(text)


@fuzz_settings(FAST)
@given(yaml_text)
def test_fuzz_yaml_config_loader_quick(text):
    config_loader_survives(text)
