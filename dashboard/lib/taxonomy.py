"""Where generative AI sits: the AI ⊃ ML ⊃ DL ⊃ generative AI nesting, a live discriminative vs
generative comparison on 2-D toy data, the modalities and a dated timeline.

Every dated fact here is the first public release (paper, arXiv preprint or launch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from sklearn.datasets import make_blobs, make_circles, make_moons
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

# ---------------------------------------------------------------------------------------------
# The nesting, with examples at each level
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    id: str
    name: str
    parent: str  # "" for the root
    what: str  # one-sentence definition
    examples: tuple[str, ...]  # examples that belong here but not to the next level down


LEVELS: tuple[Level, ...] = (
    Level(
        "ai",
        "Artificial intelligence",
        "",
        "Any technique that makes a computer do something we would call intelligent: "
        "hand-written rules, search and planning, and everything learnt from data.",
        (
            "Deep Blue's chess search (1997)",
            "Expert systems of hand-written rules (MYCIN, 1970s)",
            "Route planning with A* search",
        ),
    ),
    Level(
        "ml",
        "Machine learning",
        "ai",
        "Programs whose behaviour is learnt from examples instead of written as rules.",
        (
            "Spam filter (naive Bayes, logistic regression)",
            "Credit scoring with gradient-boosted trees",
            "Customer segments with k-means",
        ),
    ),
    Level(
        "dl",
        "Deep learning",
        "ml",
        "Machine learning with neural networks of many layers that learn their own features "
        "from raw data (pixels, audio, text).",
        (
            "AlexNet image classifier (2012)",
            "BERT: a transformer encoder for understanding text (2018)",
            "Speech recognition with LSTMs",
        ),
    ),
    Level(
        "genai",
        "Generative AI",
        "dl",
        "Deep models that learn what their training data looks like well enough to produce new "
        "examples of it: text, images, audio, video, code.",
        (
            "GPT-style LLMs: ChatGPT, Llama, Claude, Gemini",
            "Diffusion image models: Stable Diffusion, DALL·E 3",
            "GANs (StyleGAN faces) and VAEs",
            "Speech synthesis: WaveNet",
        ),
    ),
)


def nesting_figure(kind: str = "sunburst") -> go.Figure:
    """The nesting as a plotly sunburst or treemap; each level's examples are its leaves.
    Click a ring (or box) to zoom into it."""
    ids, labels, parents, hovers = [], [], [], []
    for level in LEVELS:
        ids.append(level.id)
        labels.append(level.name)
        parents.append(level.parent)
        hovers.append(level.what)
        for i, example in enumerate(level.examples):
            ids.append(f"{level.id}/{i}")
            labels.append(example)
            parents.append(level.id)
            hovers.append(f"an example of {level.name.lower()}")
    common = {
        "ids": ids,
        "labels": [_wrap(label, 22) for label in labels],
        "parents": parents,
        "customdata": hovers,
        "hovertemplate": "<b>%{label}</b><br>%{customdata}<extra></extra>",
        "branchvalues": "remainder",
    }
    if kind == "sunburst":
        figure = go.Figure(go.Sunburst(**common, insidetextorientation="radial"))
    elif kind == "treemap":
        figure = go.Figure(go.Treemap(**common, textfont={"size": 14}))
    else:
        raise ValueError(f"unknown chart kind {kind!r} (choose sunburst or treemap)")
    figure.update_layout(margin={"t": 10, "l": 10, "r": 10, "b": 10}, height=560)
    return figure


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "<br>".join([*lines, line])


# ---------------------------------------------------------------------------------------------
# Discriminative vs generative on the same toy data
# ---------------------------------------------------------------------------------------------

DATASETS = ("two moons", "blobs", "circles")
CLASSIFIERS = (
    "logistic regression",
    "k-nearest neighbours",
    "support vector machine (RBF)",
    "neural network (MLP)",
)


def toy_data(name: str, n: int = 300, noise: float = 0.2, seed: int = 0):
    """(X [n, 2], y [n] in {0, 1}) of a named 2-D toy dataset."""
    if name == "two moons":
        return make_moons(n_samples=n, noise=noise, random_state=seed)
    if name == "circles":
        return make_circles(n_samples=n, noise=noise / 2, factor=0.5, random_state=seed)
    if name == "blobs":
        return make_blobs(
            n_samples=n,
            centers=[(-1.0, -0.5), (1.0, 0.5)],
            cluster_std=0.4 + 2 * noise,
            random_state=seed,
        )
    raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")


def make_classifier(name: str, seed: int = 0):
    """A discriminative model: it learns p(class | point) and nothing about the points."""
    if name == "logistic regression":
        return LogisticRegression()
    if name == "k-nearest neighbours":
        return KNeighborsClassifier(n_neighbors=15)
    if name == "support vector machine (RBF)":
        return SVC(kernel="rbf", probability=True, random_state=seed)
    if name == "neural network (MLP)":
        return MLPClassifier(hidden_layer_sizes=(32, 32), max_iter=2000, random_state=seed)
    raise ValueError(f"unknown classifier {name!r} (choose from {', '.join(CLASSIFIERS)})")


class ClassConditionalGMM:
    """A generative model of labelled 2-D points: p(point, class) = p(class) · p(point | class),
    with one Gaussian mixture per class. It can sample new points of a chosen class and, by
    Bayes' rule, classify too: p(class | point) ∝ p(class) · p(point | class)."""

    def __init__(self, n_components: int = 3, seed: int = 0):
        self.n_components = n_components
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> ClassConditionalGMM:
        self.classes_ = np.unique(y)
        self.priors_ = np.array([np.mean(y == c) for c in self.classes_])
        # Means started at random data points, best of 3 starts: as good as k-means starts
        # here and much faster on a busy CPU.
        self.mixtures_ = [
            GaussianMixture(
                self.n_components, init_params="random_from_data", n_init=3, random_state=self.seed
            ).fit(X[y == c])
            for c in self.classes_
        ]
        return self

    def class_log_likelihood(self, X: np.ndarray) -> np.ndarray:
        """[n, classes]: log p(point | class)."""
        return np.stack([m.score_samples(X) for m in self.mixtures_], axis=1)

    def density(self, X: np.ndarray) -> np.ndarray:
        """p(point) = Σ_class p(class) · p(point | class)."""
        return np.exp(self.class_log_likelihood(X)) @ self.priors_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        joint = self.class_log_likelihood(X) + np.log(self.priors_)
        joint -= joint.max(axis=1, keepdims=True)  # stable softmax
        p = np.exp(joint)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """n new points: a class drawn from the priors, then a point from that class's mixture."""
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n, self.priors_)
        points, labels = [], []
        for c, mixture, k in zip(self.classes_, self.mixtures_, counts, strict=True):
            if k == 0:
                continue
            component = rng.choice(len(mixture.weights_), size=k, p=mixture.weights_)
            for j in np.unique(component):
                m = int(np.sum(component == j))
                points.append(
                    rng.multivariate_normal(mixture.means_[j], mixture.covariances_[j], size=m)
                )
                labels.append(np.full(m, c))
        if not points:
            return np.empty((0, 2)), np.empty(0, dtype=int)
        return np.concatenate(points), np.concatenate(labels)


@dataclass
class Comparison:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classifier: object
    generative: ClassConditionalGMM
    samples: np.ndarray
    sample_labels: np.ndarray
    classifier_accuracy: float  # on the held-out 30%
    generative_accuracy: float  # the generative model used as a classifier (Bayes' rule)


def compare(
    dataset: str,
    classifier: str,
    n_components: int,
    n_samples: int,
    noise: float = 0.2,
    seed: int = 0,
    n_points: int = 300,
) -> Comparison:
    """Fit both kinds of model on the same training split and sample from the generative one."""
    # The matrices are tiny (2x2 covariances): multi-threaded BLAS only adds overhead, seconds of
    # it on a busy 2-core machine.
    with threadpool_limits(1):
        return _compare(dataset, classifier, n_components, n_samples, noise, seed, n_points)


def _compare(dataset, classifier, n_components, n_samples, noise, seed, n_points) -> Comparison:
    X, y = toy_data(dataset, n_points, noise, seed)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, random_state=seed, stratify=y
    )
    clf = make_classifier(classifier, seed).fit(X_train, y_train)
    gen = ClassConditionalGMM(n_components, seed).fit(X_train, y_train)
    samples, sample_labels = gen.sample(n_samples, seed)
    return Comparison(
        X_train,
        y_train,
        X_test,
        y_test,
        clf,
        gen,
        samples,
        sample_labels,
        float(clf.score(X_test, y_test)),
        float(np.mean(gen.predict(X_test) == y_test)),
    )


CLASS_COLOURS = ("#1f77b4", "#d62728")


def comparison_figure(c: Comparison, steps: int = 120) -> go.Figure:
    """Left: the classifier's p(class 1 | point) with the decision boundary. Right: the generative
    model's density p(point) with the real points faded and the new samples on top."""
    X = np.vstack([c.X_train, c.X_test])
    pad = 0.5
    xs = np.linspace(X[:, 0].min() - pad, X[:, 0].max() + pad, steps)
    ys = np.linspace(X[:, 1].min() - pad, X[:, 1].max() + pad, steps)
    grid = np.column_stack([a.ravel() for a in np.meshgrid(xs, ys)])
    with threadpool_limits(1):
        p_class1 = c.classifier.predict_proba(grid)[:, 1].reshape(steps, steps)
        density = c.generative.density(grid).reshape(steps, steps)

    figure = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.06,
        subplot_titles=(
            "Discriminative: p(red | point), blue 0 → red 1, border at 0.5",
            f"Generative: p(point) in grey, {len(c.samples)} new points (stars)",
        ),
    )
    figure.add_trace(
        go.Contour(
            x=xs, y=ys, z=p_class1, colorscale="RdBu_r", zmin=0, zmax=1, opacity=0.55,
            contours={"start": 0, "end": 1, "size": 0.1}, line={"width": 0},
            showscale=False, hoverinfo="skip",
        ),
        row=1, col=1,
    )  # fmt: skip
    figure.add_trace(
        go.Contour(
            x=xs, y=ys, z=p_class1, contours={"start": 0.5, "end": 0.5, "coloring": "none"},
            line={"width": 3, "color": "black"}, showscale=False, hoverinfo="skip",
            name="decision boundary",
        ),
        row=1, col=1,
    )  # fmt: skip
    figure.add_trace(
        go.Contour(
            x=xs, y=ys, z=density, colorscale="Greys", opacity=0.5, showscale=False,
            contours={"coloring": "fill"}, line={"width": 0.5}, hoverinfo="skip",
        ),
        row=1, col=2,
    )  # fmt: skip
    for k, (colour, name) in enumerate(zip(CLASS_COLOURS, ("blue", "red"), strict=True)):
        real = c.X_train[c.y_train == k]
        for col, opacity in ((1, 0.9), (2, 0.25)):
            figure.add_trace(
                go.Scatter(
                    x=real[:, 0], y=real[:, 1], mode="markers", name=f"real, {name} class",
                    marker={"color": colour, "size": 6, "line": {"width": 0.5, "color": "white"}},
                    opacity=opacity, showlegend=col == 1, legendgroup=f"real{k}",
                ),
                row=1, col=col,
            )  # fmt: skip
        new = c.samples[c.sample_labels == k]
        figure.add_trace(
            go.Scatter(
                x=new[:, 0], y=new[:, 1], mode="markers", name=f"generated, {name} class",
                marker={"color": colour, "size": 9, "symbol": "star",
                        "line": {"width": 0.8, "color": "black"}},
            ),
            row=1, col=2,
        )  # fmt: skip
    figure.update_xaxes(range=[xs[0], xs[-1]], showgrid=False, zeroline=False)
    figure.update_yaxes(range=[ys[0], ys[-1]], showgrid=False, zeroline=False)
    figure.update_layout(
        height=470,
        margin={"t": 40, "l": 10, "r": 10, "b": 10},
        legend={"orientation": "h", "y": -0.08},
    )
    return figure


# ---------------------------------------------------------------------------------------------
# Foundation models vs task-specific models
# ---------------------------------------------------------------------------------------------

FOUNDATION_VS_TASK: tuple[dict, ...] = (
    {"": "trained on", "foundation model": "a huge, broad dataset (web text, books, code, "
     "images), mostly without labels: the data itself is the target",
     "task-specific model": "a labelled dataset for one task"},
    {"": "used for", "foundation model": "many tasks, through prompting or fine-tuning",
     "task-specific model": "the one task it was trained for"},
    {"": "cost to train", "foundation model": "hundreds of thousands to many millions of "
     "dollars of GPU time; done by a few organisations",
     "task-specific model": "a laptop to a few GPUs"},
    {"": "examples", "foundation model": "GPT-4 (OpenAI), Claude (Anthropic), Gemini and Gemma "
     "(Google), Llama (Meta), Mistral 7B (Mistral AI), Stable Diffusion (Stability AI), "
     "Whisper (OpenAI)",
     "task-specific model": "a spam filter, a chest X-ray classifier, a sentiment classifier "
     "fine-tuned from BERT"},
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Modalities
# ---------------------------------------------------------------------------------------------

MODALITIES: tuple[dict, ...] = (
    {"modality": "text → text", "tasks": "chat, writing, summarising, translation",
     "examples": "GPT-4 (OpenAI, 2023), Claude 3 (Anthropic, 2024), Llama 3 (Meta, 2024), "
                 "T5 (Google, 2019)"},
    {"modality": "text → image", "tasks": "images from a description",
     "examples": "DALL·E 3 (OpenAI, 2023), Stable Diffusion (Stability AI, CompVis, Runway, "
                 "2022), Imagen (Google, 2022), Midjourney (2022)"},
    {"modality": "image → text", "tasks": "captions, questions about an image",
     "examples": "BLIP-2 (Salesforce, 2023), LLaVA (2023), GPT-4V (OpenAI, 2023)"},
    {"modality": "speech → text", "tasks": "speech recognition (ASR)",
     "examples": "Whisper (OpenAI, 2022), wav2vec 2.0 (Meta, 2020)"},
    {"modality": "text → speech", "tasks": "speech synthesis (TTS)",
     "examples": "WaveNet (DeepMind, 2016), Tacotron 2 (Google, 2017), VALL-E (Microsoft, 2023)"},
    {"modality": "text → music / audio", "tasks": "music and sound from a description",
     "examples": "MusicLM (Google, 2023), MusicGen (Meta, 2023), Stable Audio (Stability AI, 2023)"},
    {"modality": "text → video", "tasks": "video clips from a description",
     "examples": "Make-A-Video (Meta, 2022), Imagen Video (Google, 2022), Sora (OpenAI, 2024), "
                 "Veo (Google DeepMind, 2024)"},
    {"modality": "text → code", "tasks": "writing and completing programs",
     "examples": "Codex (OpenAI, 2021; the first model behind GitHub Copilot), "
                 "Code Llama (Meta, 2023), StarCoder (BigCode, 2023)"},
    {"modality": "image → image", "tasks": "editing, inpainting, style transfer, super-resolution",
     "examples": "pix2pix (2016), ESRGAN (2018), Stable Diffusion img2img and inpainting (2022), "
                 "InstructPix2Pix (2022)"},
    {"modality": "text → 3-D", "tasks": "3-D objects from a description",
     "examples": "DreamFusion (Google, 2022), Shap-E (OpenAI, 2023)"},
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Timeline (year of first public release)
# ---------------------------------------------------------------------------------------------

TIMELINE: tuple[dict, ...] = (
    {"year": 1958, "event": "Perceptron", "lane": "neural networks",
     "detail": "Rosenblatt's single-layer learning machine: neural networks are this old, "
               "deep learning is not."},
    {"year": 1986, "event": "Backpropagation popularised", "lane": "neural networks",
     "detail": "Rumelhart, Hinton & Williams (Nature) show it trains multi-layer networks "
               "(the method itself goes back to Linnainmaa 1970 and Werbos 1974)."},
    {"year": 1986, "event": "Autoencoders", "lane": "generative models",
     "detail": "Networks that compress their input and reconstruct it (late 1980s: Rumelhart et "
               "al.; Bourlard & Kamp 1988)."},
    {"year": 1997, "event": "LSTM", "lane": "language models",
     "detail": "Hochreiter & Schmidhuber: recurrent networks that keep information over long "
               "sequences."},
    {"year": 2006, "event": "Deep autoencoders, deep belief nets", "lane": "neural networks",
     "detail": "Hinton & Salakhutdinov (Science); Hinton, Osindero & Teh: layer-wise "
               "pre-training makes deep networks trainable — deep learning takes off."},
    {"year": 2012, "event": "AlexNet", "lane": "neural networks",
     "detail": "Krizhevsky, Sutskever & Hinton win ImageNet by a wide margin with a deep CNN "
               "trained on GPUs."},
    {"year": 2013, "event": "Word2vec", "lane": "language models",
     "detail": "Mikolov et al.: word embeddings where king − man + woman ≈ queen."},
    {"year": 2013, "event": "Variational autoencoder (VAE)", "lane": "generative models",
     "detail": "Kingma & Welling, Auto-Encoding Variational Bayes: an autoencoder with a "
               "probabilistic latent space you can sample from."},
    {"year": 2014, "event": "GAN", "lane": "generative models",
     "detail": "Goodfellow et al.: a generator and a discriminator trained against each other."},
    {"year": 2014, "event": "Attention for translation", "lane": "language models",
     "detail": "Bahdanau, Cho & Bengio: an RNN translator that learns where to look in the "
               "source sentence."},
    {"year": 2015, "event": "Diffusion models", "lane": "generative models",
     "detail": "Sohl-Dickstein et al.; made practical by DDPM (Ho et al., 2020), the basis of "
               "Stable Diffusion and DALL·E 2/3."},
    {"year": 2017, "event": "Transformer", "lane": "language models",
     "detail": "Vaswani et al., Attention Is All You Need: attention only, no recurrence."},
    {"year": 2017, "event": "RL from human preferences", "lane": "alignment & fine-tuning",
     "detail": "Christiano et al.: learn a reward model from human comparisons, then optimise "
               "against it (the idea behind RLHF)."},
    {"year": 2018, "event": "GPT-1", "lane": "language models",
     "detail": "OpenAI (Radford et al.): a decoder-only transformer, generatively pre-trained "
               "and then fine-tuned; 117M parameters."},
    {"year": 2018, "event": "BERT", "lane": "language models",
     "detail": "Google (Devlin et al.): a transformer encoder for understanding text; it does not "
               "generate text."},
    {"year": 2019, "event": "GPT-2", "lane": "language models",
     "detail": "OpenAI: 1.5B parameters; fluent text from pre-training alone."},
    {"year": 2020, "event": "GPT-3", "lane": "language models",
     "detail": "OpenAI (Brown et al.): 175B parameters, 300B training tokens; few-shot learning "
               "from the prompt."},
    {"year": 2021, "event": "LoRA", "lane": "alignment & fine-tuning",
     "detail": "Hu et al.: fine-tune by training small low-rank updates BA beside frozen "
               "weight matrices; the base model stays untouched."},
    {"year": 2022, "event": "InstructGPT (RLHF)", "lane": "alignment & fine-tuning",
     "detail": "Ouyang et al.: supervised fine-tuning, then a reward model from human rankings "
               "and PPO; human raters preferred the 1.3B InstructGPT to the 175B GPT-3."},
    {"year": 2022, "event": "ChatGPT", "lane": "language models",
     "detail": "OpenAI, 30 November 2022: a chat model trained like InstructGPT."},
    {"year": 2023, "event": "QLoRA", "lane": "alignment & fine-tuning",
     "detail": "Dettmers et al.: LoRA on a base model frozen in 4-bit NF4; a 65B model "
               "fine-tuned on one 48 GB GPU."},
    {"year": 2023, "event": "Llama 2", "lane": "language models",
     "detail": "Meta: 7B–70B open-weight models trained on 2T tokens, with chat versions."},
)  # fmt: skip

LANES = ("neural networks", "generative models", "language models", "alignment & fine-tuning")
LANE_COLOURS = ("#636efa", "#ef553b", "#00a67e", "#ab63fa")


def timeline_figure(lanes: tuple[str, ...] = LANES) -> go.Figure:
    """A dated timeline, one row per event (oldest at the top), coloured by strand; hover shows
    who did what."""
    events = sorted((e for e in TIMELINE if e["lane"] in lanes), key=lambda e: e["year"])
    rows = [f"{e['event']} ({e['year']})" for e in events]
    figure = go.Figure()
    for lane, colour in zip(LANES, LANE_COLOURS, strict=True):
        chosen = [(row, e) for row, e in zip(rows, events, strict=True) if e["lane"] == lane]
        if not chosen:
            continue
        figure.add_trace(
            go.Scatter(
                x=[e["year"] for _, e in chosen],
                y=[row for row, _ in chosen],
                mode="markers",
                marker={"size": 13, "color": colour, "line": {"width": 1, "color": "white"}},
                customdata=[e["detail"] for _, e in chosen],
                hovertemplate="<b>%{y}</b><br>%{customdata}<extra></extra>",
                name=lane,
            )
        )
    figure.update_layout(
        height=120 + 26 * len(events),
        margin={"t": 10, "l": 10, "r": 10, "b": 10},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom"},
        xaxis={"title": "year", "range": [1954, 2026], "dtick": 5, "gridcolor": "#eee"},
        yaxis={"categoryorder": "array", "categoryarray": rows[::-1], "gridcolor": "#f4f4f4"},
    )
    return figure


def timeline_rows(lanes: tuple[str, ...] = LANES) -> list[dict]:
    return [
        {"year": e["year"], "event": e["event"], "what happened": e["detail"]}
        for e in sorted(TIMELINE, key=lambda e: e["year"])
        if e["lane"] in lanes
    ]
