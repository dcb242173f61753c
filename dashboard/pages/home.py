"""Home: what runs here, and a first taste — the shipped model continues your text."""

from __future__ import annotations

import streamlit as st

from core.generate import stream_text, stream_tokens
from dashboard.resources import tutor

st.title("genai-lab")
st.markdown(
    "Generative AI, run for real on your own machine. Everything on these pages runs offline: "
    "a small GPT that this project pre-trained from scratch (Llama architecture, about two "
    "million parameters) and, on later pages, the all-MiniLM-L6-v2 embedding model."
)

model, tokenizer = tutor("tutor-base")
st.subheader("Continue a text")
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
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    limit = model.config.max_position_embeddings - 1
    if len(ids) > limit:
        st.warning(f"The text is {len(ids)} tokens; the model reads at most {limit}. Shorten it.")
    else:
        tokens = stream_tokens(
            model,
            ids,
            max_new_tokens=max_new,
            temperature=temperature,
            seed=int(seed),
            stop_ids=[tokenizer.eos_token_id],
        )
        st.markdown(f"**{prompt}**" + "".join(stream_text(tokenizer, tokens)))
