"""Inside the transformer: one forward pass of a live model over the visitor's text, opened up:
attention per layer and head, the shapes a token goes through, the logit lens, and perplexity."""

from __future__ import annotations

import streamlit as st

from core.lm.loader import FOUNDATION_MODEL
from dashboard.lib.inside import (
    attention_figure,
    capture,
    final_token_figure,
    kv_head,
    lens_grid,
    lens_grid_figure,
    logit_lens,
    perplexity,
    position_labels,
    shape_steps,
    shape_table,
    surprisal_figure,
)
from dashboard.lib.next_token import fit_document_prompt
from dashboard.resources import tutor

MODELS = {
    "tutor-base": "tutor-base (ours: 4 layers, 1.9M parameters)",
    FOUNDATION_MODEL: "SmolLM2-135M-Instruct (a real model: 30 layers, 135M parameters)",
}
MAX_TOKENS = 128  # more would make the heatmaps unreadable (and the tutor reads only 128)
LENS_POSITIONS = 12  # positions in the logit-lens heatmap, ending at the chosen one


@st.cache_resource(show_spinner=False, max_entries=16)
def analysed(name: str, ids: tuple[int, ...]):
    """One forward pass per (model, prompt), shared, not copied: its arrays are read-only."""
    model, _ = tutor(name)
    return capture(model, list(ids))


@st.cache_data(show_spinner=False, max_entries=64)
def lens_at(name: str, ids: tuple[int, ...], position: int):
    model, tokenizer = tutor(name)
    return logit_lens(model, tokenizer, analysed(name, ids), position)


@st.cache_data(show_spinner=False, max_entries=64)
def lens_window(name: str, ids: tuple[int, ...], positions: tuple[int, ...]):
    model, tokenizer = tutor(name)
    return lens_grid(model, tokenizer, analysed(name, ids), list(positions))


st.title("Inside the transformer")
st.markdown(
    "The other pages show what goes into a language model and what comes out. This one opens "
    "it up: your text goes through the model once, and we keep what happens on the way: where "
    "each attention head looks, the shape of every tensor a token passes through, what each "
    "layer would predict if it were the last one, and how surprised the model is by your text. "
    "Everything is computed live by the project's own transformer code (`core/lm/model.py`), on "
    "our tiny tutor or on a real model it also runs."
)

model_name = st.radio(
    "Model", list(MODELS), format_func=MODELS.get, horizontal=True, key="in_model"
)
if model_name == FOUNDATION_MODEL:
    spinner = (
        "Loading SmolLM2-135M-Instruct. The first time, its GGUF file is converted into a "
        "Hugging Face folder and cached (about 20 s); later loads take a few seconds ..."
    )
else:
    spinner = "Loading the tutor ..."
with st.spinner(spinner):
    model, tokenizer = tutor(model_name)
config = model.config

st.session_state.setdefault("in_prompt", "The cat sat on the mat. The dog sat on the")
text = st.text_area("Your text", key="in_prompt", height=80)
prompt = fit_document_prompt(
    tokenizer,
    text,
    max_tokens=min(MAX_TOKENS, config.max_position_embeddings),
    document_start=model_name == "tutor-base",
)
if prompt.message:
    st.warning(prompt.message + f" (this page looks at {MAX_TOKENS} tokens at most)")
if not prompt.ids:
    st.info("Type some text: the model needs at least one token to look at.")
    st.stop()

ids = tuple(prompt.ids)
cap = analysed(model_name, ids)
labels = position_labels(tokenizer, prompt.ids)
T = len(ids)
st.caption(
    f"{T} tokens (· marks a space). {config.num_hidden_layers} layers, "
    f"{config.num_attention_heads} query heads and {config.num_key_value_heads} key/value heads "
    f"per layer, hidden size {config.hidden_size}, vocabulary {config.vocab_size:,}."
)

# --- 1. attention ----------------------------------------------------------------------------
st.header("1. Attention, layer by layer and head by head")
st.markdown(
    "In every layer, each token's **query** is compared with every token's **key**; a softmax "
    "turns the scores into weights that sum to 1, and the token takes that weighted mix of the "
    "**values**. Each head does this with its own projections, so heads can specialise: some "
    "look mostly at the previous token, some at the first token (a place to park attention "
    "when nothing else matters), some at an earlier copy of the current token."
)
col_layer, col_head = st.columns(2)
layer = col_layer.slider(
    "Layer", 1, config.num_hidden_layers, 1, key=f"in_layer_{model_name}"
)  # a key per model: their numbers of layers differ
head = col_head.selectbox(
    "Head",
    range(config.num_attention_heads),
    format_func=lambda h: f"head {h + 1} (reads key/value head {kv_head(config, h) + 1})",
    key=f"in_head_{model_name}",
)
st.plotly_chart(
    attention_figure(cap.attention[layer - 1, head], labels, layer - 1, head),
    width="stretch",
    key="in_attention",
)
st.caption(
    "The empty upper triangle is the **causal mask**: a token may only look at itself and the "
    "tokens before it, never ahead, because when the model generates text the later tokens do "
    "not exist yet. Each row sums to 1."
)
with st.expander("Grouped-query attention (GQA): why heads share keys and values"):
    group = config.num_attention_heads // config.num_key_value_heads
    st.markdown(
        f"This model has {config.num_attention_heads} query heads but only "
        f"{config.num_key_value_heads} key/value heads: each key/value head is shared by "
        f"{group} query heads. The queries still differ, so the heads of a group can look at "
        "different tokens, but they read the same keys and values. While generating, the "
        "model keeps every past token's keys and values (the KV cache); fewer key/value heads "
        f"make that cache {group}× smaller and faster to read, at a small cost in quality."
    )

# --- 2. shapes ---------------------------------------------------------------------------------
st.header("2. The path of a token, with tensor shapes")
st.session_state.setdefault("in_position_for", None)
if st.session_state["in_position_for"] != (model_name, ids):
    # A new prompt: start at its last token, the one whose next token the model predicts.
    st.session_state["in_position_for"] = (model_name, ids)
    st.session_state["in_position"] = T - 1
position = st.select_slider(
    "Token to follow (also used by the logit lens below)",
    options=range(T),
    format_func=lambda i: labels[i],
    key="in_position",
)
st.markdown(
    f"All {T} tokens go through the model side by side, as the rows of one matrix; token "
    f"**{labels[position]}** is one row of each. The sizes come from this model's config: "
    f"d = {config.hidden_size} (hidden size), H = {config.num_attention_heads} query heads, "
    f"KV = {config.num_key_value_heads} key/value heads, D = {config.head_dim} (head size), "
    f"I = {config.intermediate_size:,} (MLP hidden size), V = {config.vocab_size:,} "
    "(vocabulary). *measured* is what the forward pass above really produced (seen by hooks on "
    "the modules of block 1)."
)
shapes = shape_table(shape_steps(config, T), cap)
# Tall enough for every row: the path reads top to bottom, without a scrollbar.
st.dataframe(shapes, hide_index=True, height=36 * (len(shapes) + 1), key="in_shapes")
with st.expander("What the steps do"):
    st.markdown(
        "- **Residual stream**: the embedding is the start of a running vector per token. No "
        "block replaces it; attention and the MLP each read a normalised copy and *add* an "
        "update to it. That is what the two *residual add* steps are, and why the stream has "
        "the same width d everywhere.\n"
        "- **RMSNorm** scales each vector to a root-mean-square of 1 (times learned gains), so "
        "the sizes of the numbers stay stable through many layers.\n"
        "- **RoPE** (rotary position embedding) rotates pairs of numbers in each query and key "
        "by an angle proportional to the token's position. The dot product of a query and a "
        "key then depends on how far apart the two tokens are, not where they are: that is "
        "the only place position enters the model.\n"
        "- **Attention** mixes information *between* tokens; the **MLP** (SwiGLU: "
        "silu(gate) × up, then down) works on each token *alone*, widening it to I numbers "
        "and back.\n"
        "- **lm_head** turns the final vector into one score per vocabulary token; the softmax "
        "of the last row is the next-token distribution of the *Next token* page."
    )

# --- 3. logit lens -----------------------------------------------------------------------------
st.header("3. The logit lens: what each layer would predict")
st.markdown(
    "The final norm and lm_head read only the residual stream, so we can apply them to the "
    "stream after *any* block and ask: if the model stopped here, what would it predict? This "
    "trick (the *logit lens*) shows the prediction taking shape layer by layer. Early layers "
    "usually guess something generic; the final answer often appears some layers before the "
    "end. The last row is exactly the model's own prediction."
)
lens = lens_at(model_name, ids, position)
first = max(0, position - LENS_POSITIONS + 1)
window = tuple(range(first, position + 1))
st.plotly_chart(
    lens_grid_figure(lens_window(model_name, ids, window), labels), width="stretch", key="in_lens"
)
col_table, col_final = st.columns([1, 1])
col_table.markdown(f"After **{labels[position]}**, layer by layer:")
col_table.dataframe(
    lens.table,
    hide_index=True,
    column_config={
        "top probability": st.column_config.NumberColumn(format="%.3f"),
        "probability of final": st.column_config.NumberColumn(format="%.3g"),
    },
    key="in_lens_table",
)
col_final.plotly_chart(final_token_figure(lens), width="stretch", key="in_final")
tied = (
    " In the embedding row the stream is still the input token's own vector, and with tied "
    "embeddings (one matrix reads tokens in and scores them out) it mostly predicts that "
    "same token again."
    if config.tie_word_embeddings
    else ""
)
st.caption(
    "The lens is a rough instrument: the intermediate layers were never trained to be read "
    "by lm_head, so their guesses hint at what the stream contains; they are not what the "
    "layer 'thinks'." + tied
)

# --- 4. perplexity -----------------------------------------------------------------------------
st.header("4. Perplexity: how surprised the model is by your text")
score = perplexity(cap.nll)
if score is None:
    st.info("One token has nothing before it to be predicted from: add more text.")
else:
    c1, c2, c3 = st.columns(3)
    c1.metric("Perplexity", f"{score.value:,.2f}")
    c2.metric("Mean negative log-likelihood", f"{score.mean_nll:.3f} nats/token")
    c3.metric("Tokens scored", f"{score.num_tokens}")
    st.plotly_chart(surprisal_figure(cap, labels), width="stretch", key="in_surprisal")
st.markdown(
    "The same forward pass gives, at every position, the probability the model gave to the "
    "token that really comes next. **Perplexity** is exp of the mean of −ln p over the text: "
    "a perplexity of 20 means the model was, on average, as unsure as if it were picking "
    "uniformly among 20 tokens. Lower is better; 1 would be a model that predicts every token "
    "with certainty. It measures a model on a text, and is the standard way to compare "
    "language models on held-out data (with the same tokenizer: a larger vocabulary changes "
    "what one token means).\n\n"
    "t-SNE's *perplexity* on the Embeddings page is the same formula put to a different use: "
    "there it is a **setting** you choose, the effective number of neighbours each point's "
    "similarity distribution spreads over, and it shapes the picture. Here it is a "
    "**measurement** of how well a model predicts text. Same word, different job."
)
if model_name == FOUNDATION_MODEL:
    st.caption(
        "SmolLM2-135M-Instruct was tuned to answer chat turns; on plain text it is still a "
        "good predictor of English, but it never saw the tutor's toy stories."
    )
