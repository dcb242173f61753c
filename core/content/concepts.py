"""The concepts genai-lab explains, each in a few plain sentences, with the dashboard page that
shows it live. One source for the chatbot's retrieval (answers cite the page) and for the tutor's
supervised fine-tuning data.

Facts here are checked, and deliberately correct some common mistakes of the course notes this
project grew from (see the comments marked "correction").
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Concept:
    id: str
    title: str
    page: str  # dashboard page module that shows it (dashboard/views/<page>.py)
    text: str
    key_terms: list[str] = field(default_factory=list)


CONCEPTS: list[Concept] = [
    # --- the big picture -------------------------------------------------------------------
    Concept(
        "ai",
        "Artificial intelligence",
        "taxonomy",
        "Artificial intelligence (AI) is the broad field of building computer systems that do "
        "tasks we associate with intelligence, such as recognising speech, recommending films or "
        "playing chess. It includes hand-written rules as well as learning systems.",
        ["artificial intelligence", "AI"],
    ),
    Concept(
        "machine-learning",
        "Machine learning",
        "taxonomy",
        "Machine learning (ML) is the part of AI where a system learns patterns from data instead "
        "of following rules written by people. A spam filter trained on labelled emails is a "
        "classic example.",
        ["machine learning", "data", "patterns"],
    ),
    Concept(
        "deep-learning",
        "Deep learning",
        "taxonomy",
        "Deep learning is the part of machine learning that uses neural networks with many "
        "layers. Neural networks date back to the perceptron of 1958, but deep networks only "
        "took off around 2006 to 2012, when large datasets and GPUs made them trainable.",
        ["deep learning", "neural network", "layers"],
    ),
    Concept(
        "generative-ai",
        "Generative AI",
        "taxonomy",
        "Generative AI is the part of AI that creates new content such as text, images, audio "
        "or code; today it is built with deep learning. A generative model learns the patterns "
        "of its training data and then samples new examples that follow them.",
        ["generative AI", "new content", "generate"],
    ),
    Concept(
        "ai-nesting",
        "AI, ML, DL and generative AI",
        "taxonomy",
        "The four fields nest inside each other: artificial intelligence contains machine "
        "learning, machine learning contains deep learning, and deep learning contains today's "
        "generative AI (older generative models, such as n-gram text models, were not deep).",
        ["nested", "contains", "subset"],
    ),
    Concept(
        "discriminative-vs-generative",
        "Discriminative and generative models",
        "taxonomy",
        "A discriminative model learns to tell classes apart, such as spam or not spam; it "
        "models the label given the input. A generative model learns what the data itself looks "
        "like, so it can produce new examples. Both can be trained on labelled or unlabelled "
        "data; language models learn from unlabelled text by predicting the next token.",
        ["discriminative", "generative", "classification"],
    ),
    Concept(
        "foundation-model",
        "Foundation models",
        "taxonomy",
        "A foundation model is a large model pre-trained on broad data that can be adapted to "
        "many tasks, for example GPT-4, Llama, Gemma or Claude. A task-specific model is trained "
        "for one job only. The term was coined by Stanford researchers in 2021.",
        ["foundation model", "pre-trained", "adapted"],
    ),
    Concept(
        "llm",
        "Large language models",
        "taxonomy",
        "A large language model (LLM) is a neural network, usually a decoder-only transformer, "
        "trained on huge amounts of text to predict the next token. Chat assistants are LLMs "
        "that were fine-tuned to follow instructions.",
        ["large language model", "LLM", "next token"],
    ),
    Concept(
        "transformer",
        "The transformer",
        "taxonomy",
        "The transformer is the neural network architecture behind today's language models, "
        "introduced in 2017 in the paper Attention Is All You Need. Its attention layers let "
        "each token look at other tokens: in a decoder such as GPT only at the tokens before it "
        "(the causal mask), in an encoder such as BERT at those on both sides. GPT models use "
        "only the decoder part; BERT uses only the encoder and is built for understanding text, "
        "not for free-running generation.",
        ["transformer", "attention", "decoder"],
    ),
    Concept(
        "modalities",
        "Modalities",
        "taxonomy",
        "Generative models are grouped by what goes in and what comes out: text-to-text (chat "
        "assistants), text-to-image (Stable Diffusion, DALL-E), image-to-text (captioning), "
        "speech-to-text (Whisper), text-to-speech and text-to-video.",
        ["text-to-image", "speech-to-text", "modality"],
    ),
    # --- tokens and next-token prediction -------------------------------------------------
    Concept(
        "token",
        "Tokens",
        "tokens",
        "A token is a piece of text that a language model reads and writes: often a whole short "
        "word, sometimes part of a word, a space plus a word, or punctuation. Each token has a "
        "number, its token id. In English, one token is about three quarters of a word on "
        "average.",
        ["token", "token id", "piece of text"],
    ),
    Concept(
        "tokenizer",
        "Tokenizers and BPE",
        "tokens",
        "A tokenizer splits text into tokens. Byte-pair encoding (BPE) starts from single bytes "
        "and repeatedly merges the most frequent neighbouring pair into a new token, so common "
        "words become one token and rare words several. Working on bytes means any text, even "
        "emoji, can be encoded.",
        ["tokenizer", "BPE", "byte-pair encoding", "merge"],
    ),
    Concept(
        "parameters",
        "Parameters and tokens",
        "tokens",
        "Parameters are the numbers inside a model that training adjusts, its weights. Tokens "
        "are the pieces of text it learns from. For example, Llama 2 7B has about 6.7 billion "
        "parameters and was trained on 2 trillion tokens. A model is just a parameter file plus "
        "the code that runs it.",
        ["parameters", "weights", "billion"],
    ),
    Concept(
        "next-token",
        "Next-token prediction",
        "next_token",
        "A language model reads the text so far and outputs a probability for every token in "
        "its vocabulary being the next one. To write text it picks a token from that "
        "distribution, appends it and repeats. This loop is called autoregressive generation.",
        ["next token", "probability", "autoregressive"],
    ),
    Concept(
        "temperature",
        "Temperature",
        "next_token",
        "Temperature divides the model's scores before they become probabilities. Below one it "
        "sharpens the distribution, so likely tokens win more often; above one it flattens it, "
        "so the output is more varied and surprising. Near zero it almost always picks the most "
        "likely token.",
        ["temperature", "sharper", "flatter"],
    ),
    Concept(
        "top-k",
        "Top-k sampling",
        "next_token",
        "Top-k sampling keeps only the k most likely tokens, renormalises their probabilities "
        "and samples from them, so very unlikely tokens can never be picked.",
        ["top-k", "k most likely"],
    ),
    Concept(
        "top-p",
        "Top-p (nucleus) sampling",
        "next_token",
        "Top-p or nucleus sampling keeps the smallest set of most likely tokens whose "
        "probabilities add up to at least p, then samples from them. Unlike top-k, the number "
        "of kept tokens adapts: few when the model is sure, many when it is not.",
        ["top-p", "nucleus", "smallest set"],
    ),
    Concept(
        "greedy",
        "Greedy decoding",
        "next_token",
        "Greedy decoding always takes the single most likely next token. It is deterministic, "
        "the same prompt always gives the same answer, but it can get stuck repeating itself.",
        ["greedy", "most likely", "deterministic"],
    ),
    Concept(
        "kv-cache",
        "The KV cache",
        "next_token",
        "While generating, a transformer keeps the keys and values of earlier tokens in a KV "
        "cache, so each new token needs only one new step instead of re-reading the whole text. "
        "It removes that recomputation, but each new token still attends over every cached "
        "position, so the time per token still grows (slowly) with the text, and the cache "
        "takes memory that grows with it too.",
        ["KV cache", "keys and values"],
    ),
    Concept(
        "context-window",
        "The context window",
        "chat",
        "The context window is the most tokens a model can read at once, prompt and answer "
        "together. Older messages of a long chat must be dropped or summarised to fit. Our tutor "
        "model's window is tiny; large models read tens of thousands of tokens or more.",
        ["context window", "context length"],
    ),
    # --- embeddings ------------------------------------------------------------------------
    Concept(
        "embedding",
        "Embeddings",
        "embeddings",
        "An embedding is a list of numbers, a vector, that represents a token or a whole "
        "sentence. Texts with similar meanings get vectors that point in similar directions. "
        "The MiniLM model on the embeddings page turns each sentence into 384 numbers.",
        ["embedding", "vector", "similar meaning"],
    ),
    Concept(
        "cosine-similarity",
        "Cosine similarity",
        "embeddings",
        "Cosine similarity measures the angle between two embedding vectors: 1 means the same "
        "direction, 0 means unrelated. 'The sun is shining brightly.' and 'Cats and dogs are "
        "popular pets.' get a low similarity; two sentences about sunny weather get a high one.",
        ["cosine similarity", "angle"],
    ),
    # --- training stages -------------------------------------------------------------------
    Concept(
        "pretraining",
        "Pre-training",
        "training_stages",
        "Pre-training is the first stage: the model learns to predict the next token on a huge "
        "amount of text such as web pages, books and code. The result is a base model that can "
        "continue text but does not reliably follow instructions or answer questions.",
        ["pre-training", "base model", "huge amount of text"],
    ),
    Concept(
        "sft",
        "Supervised fine-tuning",
        "training_stages",
        "Supervised fine-tuning (SFT) is the second stage: the base model is trained further on "
        "example conversations, each a request with an ideal response written by people. The "
        "loss is taken only on the response tokens, so the model learns to answer rather than "
        "to ask.",
        ["supervised fine-tuning", "SFT", "conversations"],
    ),
    Concept(
        "rlhf",
        "RLHF",
        "training_stages",
        "Reinforcement learning from human feedback (RLHF) is the third stage: people rank "
        "several answers to the same prompt, a reward model learns to score answers like they "
        "would, and the chat model is then optimised to earn a high reward while staying close "
        "to its supervised version.",
        ["RLHF", "human feedback", "reward"],
    ),
    Concept(
        "reward-model",
        "Reward model",
        "training_stages",
        "A reward model reads a prompt and an answer and outputs one number, a score. It is "
        "trained on pairs of answers where people preferred one: the loss pushes the preferred "
        "answer's score above the other's.",
        ["reward model", "score", "preferred"],
    ),
    Concept(
        "ppo",
        "PPO",
        "training_stages",
        "Proximal policy optimisation (PPO) is the reinforcement learning method used in "
        "classic RLHF. The model writes answers, the reward model scores them, and PPO nudges "
        "the model toward higher scores in small, clipped steps, with a penalty for drifting "
        "too far from the original model.",
        ["PPO", "policy", "clipped"],
    ),
    Concept(
        "dpo",
        "DPO",
        "training_stages",
        "Direct preference optimisation (DPO) skips the separate reward model and reinforcement "
        "learning: it trains directly on preferred and rejected answer pairs with a simple loss, "
        "and reaches similar results with much less machinery.",
        ["DPO", "direct preference optimisation", "preference pairs"],
    ),
    Concept(
        "hallucination",
        "Hallucination",
        "training_stages",
        "A hallucination is a fluent answer that is false or made up. It happens because a "
        "language model produces likely-sounding text, not checked facts. Fine-tuning, human "
        "feedback and grounding answers in retrieved documents reduce it but do not remove it.",
        ["hallucination", "made up"],
    ),
    # --- making models small and cheap ------------------------------------------------------
    Concept(
        "quantization",
        "Quantization",
        "quantization",
        "Quantization stores a model's weights with fewer bits, for example 8 or 4 bits instead "
        "of 16 or 32. A 70-billion-parameter model needs about 140 GB at 16 bits but about 35 GB "
        "at 4 bits, at the cost of a small loss of accuracy.",
        ["quantization", "bits", "8-bit", "4-bit"],
    ),
    Concept(
        "nf4",
        "NF4",
        "quantization",
        "NF4 (4-bit NormalFloat) is the 4-bit data type introduced with QLoRA. Its 16 levels are "
        "spaced for weights that follow a bell-shaped normal distribution, so it loses less "
        "information than evenly spaced 4-bit numbers.",
        ["NF4", "NormalFloat", "4-bit"],
    ),
    Concept(
        "fine-tuning",
        "Fine-tuning",
        "lora",
        "Fine-tuning continues training a pre-trained model on your own, smaller dataset so it "
        "learns a domain or a style. Full fine-tuning updates every weight; parameter-efficient "
        "methods such as LoRA train only a small number of new weights.",
        ["fine-tuning", "your own data", "domain"],
    ),
    Concept(
        "lora",
        "LoRA",
        "lora",
        "LoRA (low-rank adaptation, 2021) freezes the original weights W and learns a small "
        "update B times A, two thin matrices of rank r. Only B and A are trained, often well "
        "under one percent of the parameters, and they can be merged back into W afterwards.",
        ["LoRA", "low-rank", "rank", "frozen"],
    ),
    Concept(
        "qlora",
        "QLoRA",
        "lora",
        "QLoRA (2023) is LoRA on top of a base model quantized to 4-bit NF4, with double "
        "quantization and paged optimisers. It made it possible to fine-tune a 65-billion-"
        "parameter model on a single 48 GB GPU.",
        ["QLoRA", "4-bit", "NF4"],
    ),
    # --- building apps ---------------------------------------------------------------------
    Concept(
        "langchain",
        "LangChain",
        "chat",
        "LangChain is a Python framework for building applications on top of language models. "
        "It gives one interface to many chat models, plus prompts, retrieval of documents and "
        "chaining of steps; our chat page uses it, with LangGraph keeping the conversation "
        "history.",
        ["LangChain", "framework", "chain"],
    ),
    Concept(
        "retrieval",
        "Retrieval and grounding",
        "chat",
        "Retrieval-augmented generation finds the passages most relevant to a question, by "
        "comparing embeddings, and puts them into the prompt, so the model can answer from them "
        "and cite where the answer came from.",
        ["retrieval", "grounding", "RAG"],
    ),
]

CONCEPTS_BY_ID: dict[str, Concept] = {c.id: c for c in CONCEPTS}


def concepts_for_page(page: str) -> list[Concept]:
    """The concepts a dashboard page explains, in order."""
    return [c for c in CONCEPTS if c.page == page]
