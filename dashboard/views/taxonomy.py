"""AI, ML, DL, generative AI: the nesting with examples; discriminative vs generative models live
on the same toy data; foundation vs task-specific models; modalities; a dated timeline."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.lib.taxonomy import (
    CLASSIFIERS,
    DATASETS,
    FOUNDATION_VS_TASK,
    LANES,
    LEVELS,
    MODALITIES,
    compare,
    comparison_figure,
    nesting_figure,
    timeline_figure,
    timeline_rows,
)


@st.cache_resource(show_spinner=False, max_entries=32)
def cached_comparison(dataset, classifier, n_components, n_samples, noise, seed):
    return compare(dataset, classifier, n_components, n_samples, noise, seed)


st.title("AI, machine learning, deep learning, generative AI")
st.markdown(
    "The four terms nest: every generative AI system is a deep learning system, every deep "
    "learning system is machine learning, and all of it is AI. Click a box (or ring) to zoom "
    "in; hover for a definition."
)

left, right = st.columns([3, 2])
with right:
    chart = st.radio("Draw it as", ["treemap", "sunburst"], horizontal=True)
    names = {level.name: level for level in LEVELS}
    level = names[st.selectbox("Look closer at", list(names), index=len(names) - 1)]
    st.markdown(f"**{level.name}.** {level.what}")
    st.markdown(
        "Examples that are this, but not the next level in:\n"
        + "\n".join(f"- {example}" for example in level.examples)
    )
    if level.id == "genai":
        st.caption(
            "Generative models are older than deep learning: naive Bayes, Gaussian mixtures and "
            "hidden Markov models are generative too. 'Generative AI' today means the deep ones."
        )
with left:
    st.plotly_chart(nesting_figure(chart), width="stretch")

st.header("Discriminative vs generative, on the same data")
st.markdown(
    "A **discriminative** model learns *p(class | point)*: where the border between the "
    "classes runs. It can label any point, but it knows nothing about what points look like, "
    "so it cannot make new ones. A **generative** model learns *p(point)* (here per class: "
    "*p(point | class)* and *p(class)*): what the data itself looks like. So it can **sample** "
    "new points, and with Bayes' rule it can classify too. An LLM is a generative model of "
    "text: it learns *p(next token | previous tokens)* and samples from it."
)
c1, c2, c3 = st.columns(3)
dataset = c1.selectbox("Toy data", DATASETS)
classifier = c2.selectbox("Discriminative model", CLASSIFIERS)
noise = c3.slider("Noise in the data", 0.05, 0.5, 0.2, 0.05)
c4, c5, c6 = st.columns(3)
n_components = c4.slider(
    "Gaussians per class (generative model)",
    1,
    8,
    3,
    help="More Gaussians let the mixture follow curved shapes such as the moons.",
)
n_samples = c5.slider("New points to generate", 0, 300, 60, 10)
seed = int(c6.number_input("Random seed", min_value=0, max_value=10_000, value=0, step=1))

result = cached_comparison(dataset, classifier, n_components, n_samples, noise, seed)
st.plotly_chart(comparison_figure(result), width="stretch")
m1, m2, m3 = st.columns(3)
m1.metric("Classifier accuracy (held-out 30%)", f"{result.classifier_accuracy:.1%}")
m2.metric("Generative model as a classifier", f"{result.generative_accuracy:.1%}")
m3.metric("New points the classifier can make", "none")
st.caption(
    "The generative model here is a Gaussian mixture per class, a classic machine learning "
    "model. Today's generative AI does the same job, learning a distribution and sampling from "
    "it, with deep networks over text, pixels or audio instead of two numbers per point. "
    "Try logistic regression on the circles: a straight border cannot separate them, while the "
    "mixtures still can."
)

st.header("Foundation models vs task-specific models")
st.markdown(
    "A **foundation model** is pre-trained once on a broad dataset and then adapted to many "
    "tasks; a **task-specific model** is trained for one job. Large language models are the "
    "text members of the foundation-model family; image, audio and multimodal foundation models "
    "exist too. Adapting a foundation model to your data with LoRA or QLoRA is the subject of "
    "the LoRA page."
)
st.table(pd.DataFrame(FOUNDATION_VS_TASK), hide_index=True)
st.caption(
    "Our own tutor model is not a foundation model: it was pre-trained on a small generated "
    "corpus of simple English, so it knows only that corpus."
)

st.header("What goes in, what comes out: modalities")
st.table(pd.DataFrame(MODALITIES), hide_index=True)
st.caption(
    "Not generators, though often listed as such: CLIP (OpenAI, 2021) maps images and text into "
    "one embedding space, so it can match them but not produce either; GitHub Copilot is a "
    "product built on code models (first Codex), not a model itself."
)

st.markdown(
    "A **multimodal** model works with more than one modality (text, images, audio, video) in "
    "its input, its output or both. Most of today's are read-many, write-text: they take an "
    "image and a question and answer in words. Being multimodal does not mean producing "
    "several kinds of content at once."
)

st.header("Building with models")
st.markdown(
    """
**The AI engineer's job** is less training models than building products on them: choosing a
model for the task, budget and latency; writing the prompts and the retrieval that grounds
answers (as our Chat page does); fine-tuning when prompting is not enough (the Fine-tune page);
measuring quality on held-out questions; and watching cost, speed and safety in production.

**The key challenges**
- *Data*: models learn what their data says, gaps and errors included; good data is scarce and
  licences and privacy limit what may be used.
- *Compute*: training and serving large models needs costly accelerators and energy; this is why
  quantization and LoRA (pages in this app) matter.
- *Bias*: patterns in the training text (who is described how) come back in the answers.
- *Evaluation*: fluent text is easy to produce and hard to grade; benchmarks leak into training
  data and saturate, so measure on your own held-out questions.
- *Misuse and mistakes*: convincing spam, fraud and impersonation; and honest-sounding answers
  that are wrong (hallucination: the Prompting & hallucination page shows one live).

**Reading a model leaderboard.** Comparison sites list models with columns such as a *quality*
score (an average over benchmarks, or human preference votes, where people pick the better of
two anonymous answers), *speed* (output tokens per second, and time to the first token), *price*
(per million input and output tokens, which differ) and the *context window*. Rankings change
every few weeks, so read the columns, not the order: check which benchmarks make up the score,
whether speed was measured on the provider you would use, and test the top candidates on your
own task.
"""
)

st.header("Timeline")
lanes = st.multiselect("Show", LANES, default=list(LANES))
if not lanes:
    st.info("Pick at least one strand of the story to show.")
else:
    st.plotly_chart(timeline_figure(tuple(lanes)), width="stretch")
    with st.expander("The timeline as a table"):
        st.table(pd.DataFrame(timeline_rows(tuple(lanes))), hide_index=True)

with st.expander("Common claims, corrected"):
    st.markdown(
        """
- *"Deep learning started in the 1950s."* Neural networks did (the perceptron, 1958), but they
  were shallow. Training deep networks became practical only from 2006 (layer-wise
  pre-training) and took off in 2012 with AlexNet on GPUs.
- *"Transformers and BERT are the backbone of generative AI."* Text generators such as GPT and
  Llama are decoder-only transformers. BERT is a transformer encoder: it reads text to
  understand or classify it; it is not used for free-running text generation (it can only fill
  in masked words).
- *"The transformer comes from RNNs."* It grew out of RNN translators with attention
  (2014), but it dropped recurrence entirely: attention alone, so all positions are processed
  in parallel during training.
- *"Generative models don't need labels, discriminative ones do."* Roughly: pre-training is
  self-supervised (the next token is the label, taken from the text itself), while a
  classifier needs human labels. But fine-tuning generative models (SFT, RLHF) does use
  human-written examples and rankings.
- *"Foundation models are trained on the entire internet."* They are trained on large
  filtered web crawls, books, code and other sources, up to a cut-off date: a curated
  fraction, not everything.
- *"Vercel is a foundation-model company."* Vercel is a web hosting and front-end platform
  (it makes Next.js and an AI SDK for apps); it builds on other labs' models. The labs behind
  major foundation models include OpenAI, Anthropic, Google DeepMind, Meta and Mistral AI.
- *"Stability works on large image models (LIMs)."* Stability AI is known for Stable Diffusion,
  a text-to-image latent diffusion model (2022, with CompVis and Runway). "LIM" is not a
  standard term; such models are usually called text-to-image or diffusion models.
- *"Backpropagation was introduced in 1980; autoencoders in 2010."* Backpropagation was
  popularised for neural networks in 1986 (Rumelhart, Hinton & Williams); autoencoders date
  from the 1980s, and deep autoencoders from 2006.
- *"Gemini has 175T / 50T / 10T parameters."* Google has not published the sizes of Gemini
  Pro or Ultra; its Gemini report gives only the on-device models, Nano-1 (1.8B parameters)
  and Nano-2 (3.25B).
- *"New capabilities emerge at 2-7B parameters."* There is no fixed size. Some benchmark
  abilities appeared abruptly only at much larger scales in one study (Wei et al., 2022), and
  later work showed that much of this "emergence" depends on the metric: with a smooth metric
  the same abilities improve gradually with scale.
- *"Perplexity approximates the training set."* Perplexity measures how well a model predicts
  a given text: exp of the average negative log-likelihood per token (lower is better). It is
  a score of a model on a text, not an approximation of any data set.
- *"GPT-3 was trained on 500B words."* Its data mix held about 500 billion *tokens*, of which
  GPT-3 was trained on 300 billion (some sources seen more than once, most less than once).
- *"OpenLLaMA (Meta) generates images."* OpenLLaMA is an open re-training of the LLaMA
  architecture by OpenLM Research (UC Berkeley), not by Meta, and it is a text-only language
  model.
- *"You tweak the parameters during inference."* A model's parameters (its weights) are fixed
  once it is trained. What you set at inference time are decoding settings (temperature, top-k,
  top-p, length), which change how tokens are picked from the same scores.
- *"Multimodal means it generates several types of content at once."* A multimodal model
  works with more than one modality, in its input, its output or both: most read images and
  text and write only text.
- *"Models don't store information."* They store a great deal in their weights (facts, style,
  even long verbatim passages of their training text), just not as records you can look up:
  the knowledge is spread over millions of numbers, lossy and without sources.
- *"SFT uses SGD."* SFT is gradient descent on minibatches, but in practice with Adam or AdamW
  (adaptive per-parameter step sizes), not plain stochastic gradient descent.
"""
    )
