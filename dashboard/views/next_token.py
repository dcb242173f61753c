"""Next token & sampling: the tutor's next-token distribution, reshaped live by temperature, top-k
and top-p; sampled; compared with the corpus's true distribution; and a generation step by step."""

from __future__ import annotations

import streamlit as st

from core.content import corpus
from core.lm.chat_format import stop_ids
from core.lm.generate import stream_steps
from core.lm.loader import FOUNDATION_MODEL
from core.lm.sampling import SamplingParams, entropy, sample_many, sampling_stages
from dashboard.lib.next_token import (
    MAX_PROMPT_CHARS,
    compare_with_truth,
    comparison_figure,
    distribution_figure,
    distribution_table,
    escape_markdown,
    fit_document_prompt,
    next_token_logits,
    sample_frequencies,
    sampling_counts,
    step_table,
    surprisal_bits,
    token_label,
    true_next_words,
)
from dashboard.resources import tutor

# Our base model (trained on the bundled corpus only, so the corpus truth applies to it) and a real
# one: the embedded SmolLM2-135M-Instruct, run by the same code (core's GPT loads it).
MODELS = {
    "tutor-base": "tutor-base (ours, 1.9M parameters, trained on the bundled corpus)",
    FOUNDATION_MODEL: "SmolLM2-135M-Instruct (a real model, 135M parameters, 49,152 tokens)",
}
TOP_N = 20
MAX_PROMPT_TOKENS = 1024  # the real model reads 8,192; more than this only slows the page
N_SAMPLES = 100
MAX_STEPS = 40
DEFAULT_STEPS = 12
CUSTOM = "(your own text)"


@st.cache_data(show_spinner=False, max_entries=64)
def truth_comparison(prefix: str):
    model, tokenizer = tutor("tutor-base")
    truth = true_next_words(prefix)
    return None if truth is None else compare_with_truth(model, tokenizer, prefix, truth)


@st.cache_data(show_spinner=False, max_entries=64)
def generation(
    name: str,
    ids: tuple[int, ...],
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    budget: int,
    stop_at_end: bool = False,
):
    model, tokenizer = tutor(name)
    steps = stream_steps(
        model,
        list(ids),
        stop_ids=stop_ids(tokenizer, model.config) if stop_at_end else (),
        sampling=SamplingParams(
            max_tokens=budget, temperature=temperature, top_k=top_k or None, top_p=top_p, seed=seed
        ),
    )
    return list(steps)


def use_preset() -> None:
    choice = st.session_state["nt_preset"]
    if choice != CUSTOM:
        st.session_state["nt_prompt"] = choice


def preset_label(prefix: str) -> str:
    if prefix == "":
        return "(empty: the start of a document)"
    return prefix if len(prefix) <= 80 else "…" + prefix[-77:]


st.title("Next token & sampling")
st.markdown(
    "A language model does one thing: given the text so far, it gives every token of its "
    "vocabulary a score (a *logit*); the softmax turns the scores into probabilities that sum "
    "to 1. Generating text means picking one token from that distribution, appending it, and "
    "asking again. How the pick is made is up to us: that is what temperature, top-k and "
    "top-p control. It all runs on the project's own base model, `tutor-base`, or on a real "
    "instruction model, SmolLM2-135M-Instruct, through the very same code."
)

model_name = st.radio(
    "Model", list(MODELS), format_func=MODELS.get, horizontal=True, key="nt_model"
)
model, tokenizer = tutor(model_name)
context = min(model.config.max_position_embeddings, MAX_PROMPT_TOKENS)

st.session_state.setdefault("nt_prompt", "The cat sat on the")
presets = corpus.preset_prefixes()
st.selectbox(
    "Pick a prompt from the bundled corpus (for these the true next-word distribution is known)",
    [CUSTOM, *presets],
    key="nt_preset",
    format_func=lambda p: p if p == CUSTOM else preset_label(p),
    on_change=use_preset,
)
text = st.text_area("Prompt", key="nt_prompt", height=80)

col_t, col_k, col_p = st.columns(3)
temperature = col_t.slider(
    "Temperature", 0.0, 2.0, 1.0, 0.01, key="nt_temperature", help="0 = greedy: the top token"
)
top_k = col_k.slider("Top-k (0 = off)", 0, 50, 0, 1, key="nt_top_k")
top_p = col_p.slider("Top-p (1 = off)", 0.01, 1.0, 1.0, 0.01, key="nt_top_p")

st.latex(r"p_i = \frac{\exp(z_i / T)}{\sum_{j} \exp(z_j / T)}")
st.caption(
    "Softmax with temperature: z_i is token i's logit, T the temperature, and the sum runs over "
    "the whole vocabulary. Dividing by a small T stretches the gaps between the logits, so the "
    "top token takes almost all the probability; a large T shrinks them and flattens the "
    "distribution. Top-k and top-p then remove tokens and the rest are renormalised to sum to 1."
)

with st.expander("What do temperature, top-k and top-p do?", expanded=False):
    st.markdown(
        "They are applied in this order, as Hugging Face `transformers` does:\n\n"
        "1. **Temperature** *T* divides every logit by *T* before the softmax. Below 1 the "
        "distribution gets sharper (likely tokens get likelier), above 1 flatter (rare tokens "
        "get a real chance); *T* = 1 is the model's own distribution. The order of the tokens "
        "never changes. As *T* approaches 0 all the probability goes to the top token, so "
        "*T* = 0 is taken to mean **greedy decoding**: always the most likely token.\n"
        "2. **Top-k** keeps only the *k* most likely tokens and renormalises their "
        "probabilities to sum to 1. A fixed *k* ignores how sure the model is.\n"
        "3. **Top-p** (nucleus sampling) keeps the smallest set of most likely tokens whose "
        "probabilities add up to at least *p*, then renormalises. When the model is confident "
        "that is one or two tokens; when it is unsure, many.\n\n"
        "Low temperature, small *k* or small *p* make the text safer and more repetitive; high "
        "values make it more varied and more likely to go wrong."
    )

if temperature == 0:
    st.info(
        "Temperature 0 means greedy decoding: the most likely token is always chosen, so "
        "top-k and top-p change nothing and every sample is the same token."
    )
if text != text.rstrip():
    st.caption(
        "Your prompt ends in whitespace. This tokenizer puts the space *before* a word into the "
        "word's token (·mat), so the model rarely saw text end in a bare space; expect odd "
        "predictions, or remove the space."
    )
if not text.strip():
    st.info(
        "The prompt is empty, so this shows what the model predicts at the very start of a "
        "document (right after the <|endoftext|> token). Type a prompt to see its next token."
    )

prompt = fit_document_prompt(
    tokenizer, text, max_tokens=context, document_start=model_name == "tutor-base"
)
if prompt.message:
    st.warning(prompt.message)

logits = next_token_logits(model, prompt.ids)
stages = sampling_stages(logits, temperature, top_k or None, top_p)
table = distribution_table(stages, tokenizer, temperature, top_n=TOP_N)

# --- the distribution -------------------------------------------------------------------------
st.subheader("The next-token distribution")
st.session_state.setdefault("nt_sample_seed", None)
sample_col, clear_col, _ = st.columns([1, 1, 3])
if sample_col.button(f"Sample {N_SAMPLES} times", key="nt_sample"):
    st.session_state["nt_sample_seed"] = (st.session_state["nt_sample_seed"] or 0) + 1
if clear_col.button("Hide samples", key="nt_clear"):
    st.session_state["nt_sample_seed"] = None

frequencies = None
seed = st.session_state["nt_sample_seed"]
if seed is not None:
    samples = sample_many(logits, N_SAMPLES, temperature, top_k or None, top_p, seed=seed)
    frequencies = sample_frequencies(samples, list(table["id"]))
    st.caption(
        f"Black diamonds: the fraction of {N_SAMPLES} draws (seed {seed}) that gave each token. "
        "They scatter around the dark bars; more draws would bring them closer."
    )
st.plotly_chart(distribution_figure(table, frequencies), key="nt_chart")

shown_mass = float(stages.original[list(table["id"])].sum())
m1, m2, m3 = st.columns(3)
counts = sampling_counts(stages)
m1.metric(
    "Tokens that can still be sampled",
    f"{counts.kept:,} of {logits.numel():,}",
    help="Tokens that no filter removed: in exact arithmetic their probability is above zero, "
    "however small.",
)
m2.metric("Entropy of what is sampled", f"{entropy(stages.final):.2f} nats")
m3.metric(f"Model probability in these {len(table)} bars", f"{shown_mass:.1%}")
st.caption(
    f"“Can be sampled” means no filter (temperature 0, top-k, top-p) removed the token, even if "
    f"its chance is vanishingly small. Of these {counts.kept:,}, **{counts.at_least_tiny:,}** "
    f"have a chance of at least one in a million and **{counts.at_least_likely:,}** of at least "
    f"1%. At a low temperature nearly all the probability sits on one token, so the entropy is "
    f"close to 0 although thousands of tokens could, in principle, still be drawn."
)
st.dataframe(
    table.drop(columns="id"),
    hide_index=True,
    column_config={
        c: st.column_config.NumberColumn(format="%.4f")
        for c in ("model", "after temperature", "sampled from")
    },
    key="nt_table",
)

# --- the truth --------------------------------------------------------------------------------
st.subheader("The model against the truth")
comparison = None
if model_name == "tutor-base" and len(text) <= MAX_PROMPT_CHARS:
    comparison = truth_comparison(text)
if model_name != "tutor-base":
    st.caption(
        "The true next-word distribution is known only for the bundled corpus, which only "
        "tutor-base was trained on: switch the model to tutor-base to compare with the truth."
    )
elif comparison is None:
    st.caption(
        "The bundled corpus cannot produce this prompt, so its true next-word distribution is "
        "unknown. Pick one of the corpus prompts above to compare the model with the truth."
    )
else:
    st.markdown(
        "The corpus generator knows the exact probability of every next word after this prompt. "
        "Beside it: the model's probability of the same words (a word made of several tokens "
        "gets the product of its tokens' probabilities)."
    )
    st.plotly_chart(comparison_figure(comparison.table), key="nt_truth_chart")
    k1, k2 = st.columns(2)
    k1.metric("KL(true ‖ model)", f"{comparison.kl:.3f} nats")
    k2.metric("Model probability on the possible words", f"{comparison.model_mass:.1%}")
    st.caption(
        "KL(true ‖ model) is 0 when the model matches the truth exactly; it is the average "
        "number of extra nats per word you would pay for believing the model instead of the "
        "truth. The model's probabilities are at temperature 1: sampling settings do not change "
        "what the model has learnt."
    )

# --- step by step -----------------------------------------------------------------------------
st.subheader("Generate, one token at a time")
st.markdown(
    "Each step samples one token with the settings above, appends it, and asks the model again. "
    "The table lists the model's favourites at that step (temperature 1, before any filter), so "
    "you can see when the sampler picked something other than the top token."
)
seed_col, steps_col, stop_col = st.columns([1, 2, 2], vertical_alignment="bottom")
gen_seed = seed_col.number_input("Seed", value=0, step=1, key="nt_gen_seed")
wanted = steps_col.slider("Tokens to generate", 1, MAX_STEPS, DEFAULT_STEPS, key="nt_steps")
stop_at_end = stop_col.checkbox(
    "Stop at the end-of-text token",
    value=False,
    key="nt_stop_at_end",
    help="Off: when the model samples its end token, the page shows it and keeps going, so "
    "you see what the model writes after it (for tutor-base, a new document).",
)
b1, b2, b3, _ = st.columns([1, 1, 1, 2])
gen_ids = prompt.ids[-(context - 1) :]  # leave room for at least one new token
budget = min(wanted, context - len(gen_ids))
settings = (
    model_name,
    tuple(gen_ids),
    temperature,
    top_k,
    top_p,
    int(gen_seed),
    budget,
    stop_at_end,
)
if st.session_state.get("nt_steps_for") != settings:
    st.session_state["nt_steps_for"] = settings
    st.session_state["nt_shown"] = 0
steps = generation(*settings)
if b1.button("Next token ▶", key="nt_next", disabled=st.session_state["nt_shown"] >= len(steps)):
    st.session_state["nt_shown"] += 1
if b2.button("All the way", key="nt_all"):
    st.session_state["nt_shown"] = len(steps)
if b3.button("Start over", key="nt_reset"):
    st.session_state["nt_shown"] = 0

shown = min(st.session_state["nt_shown"], len(steps))
done = steps[:shown]
if shown == 0:
    st.caption("Press “Next token” to generate the first token.")
else:
    earlier = tokenizer.decode([s.token_id for s in done[:-1]])
    latest = token_label(tokenizer, done[-1].token_id)
    st.markdown(
        f"{escape_markdown(text[-300:])} :blue[{escape_markdown(earlier)}]"
        f":orange-background[**{escape_markdown(latest)}**]"
    )
    st.caption(
        f"Step {shown} of {len(steps)}: new text in blue, the latest token highlighted "
        "(· marks its space)."
    )
    step = done[-1]
    st.caption(
        f"Chosen token: model probability {step.probability:.3f}, a surprise of "
        f"{surprisal_bits(step.probability):.1f} bits."
    )
    st.dataframe(step_table(tokenizer, step), hide_index=True, key="nt_step_table")
if shown == len(steps) and shown > 0:
    if len(steps) < budget:
        st.caption("The model ended the text here (it sampled its end-of-text token).")
    else:
        st.caption(f"Stopped after {len(steps)} tokens, the number asked for.")
