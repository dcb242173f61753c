"""The bundled pre-training corpus: simple English documents with *exact* next-word probabilities.

Every document is one instance of a template: a fixed sequence of literal words, punctuation and
``{slot}`` references. A slot is a small categorical distribution over single words, optionally
conditioned on an earlier slot (a rainy day makes a coat likely). The first occurrence of a slot
samples it; later occurrences repeat the bound value, which is how a story keeps reusing its
character's name.

Because the generating process is known, the true distribution of the next word after any document
prefix can be computed exactly by marginalising over templates:

    P(next | prefix) ∝ Σ_t P(t) · P(prefix | t) · P(next | t, prefix)

so a model trained on this corpus can be scored against the truth, not just against samples.
Punctuation marks are words of their own (rendered attached to the previous word, "mat."), and the
end of a document is the word ``END_OF_TEXT``.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

END_OF_TEXT = "<|endoftext|>"
PUNCTUATION = frozenset(".,!?:;")

Dist = dict[str, float]

# A word is a run of non-space, non-punctuation characters ("{slot}" references included).
_WORD_RE = re.compile(r"[.,!?:;]|[^\s.,!?:;]+")


def split_words(text: str) -> list[str]:
    """Split text into words and punctuation marks: "The cat sat." -> ["The", "cat", "sat", "."]."""
    return _WORD_RE.findall(text)


def join_words(words: list[str]) -> str:
    """Exact inverse of `split_words` on generated text: spaces between words, none before marks."""
    text = ""
    for word in words:
        text += word if word in PUNCTUATION or not text else " " + word
    return text


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Given:
    """A slot whose distribution depends on the value of an earlier slot `on`."""

    on: str
    table: dict[str, Dist]


@dataclass(frozen=True)
class Template:
    """One kind of document: items are literal words/punctuation or "{slot}" references."""

    name: str
    weight: float
    items: tuple[str, ...]
    slots: dict[str, Dist | Given]


def _slot_of(item: str) -> str | None:
    return item[1:-1] if item.startswith("{") else None


def _template(name: str, weight: float, text: str, /, **slots: Dist | Given) -> Template:
    """Parse template text and check that every slot is defined before it is used."""
    items = tuple(split_words(text))
    seen: set[str] = set()
    for item in items:
        slot = _slot_of(item)
        if slot is None or slot in seen:
            continue
        spec = slots.get(slot)
        if spec is None:
            raise ValueError(f"template {name}: slot {slot} has no distribution")
        if isinstance(spec, Given) and spec.on not in seen:
            raise ValueError(f"template {name}: slot {slot} depends on a later slot {spec.on}")
        seen.add(slot)
    if seen != set(slots):
        raise ValueError(f"template {name}: unused slots {sorted(set(slots) - seen)}")
    return Template(name, weight, items, slots)


def _slot_dist(template: Template, slot: str, bound: dict[str, str]) -> Dist:
    spec = template.slots[slot]
    return spec.table[bound[spec.on]] if isinstance(spec, Given) else spec


def _normalize(dist: Dist) -> Dist:
    total = sum(dist.values())
    return {word: p / total for word, p in dist.items()}


# Shared slot distributions. Weights are deliberately unequal so that a model has to learn them.
NAMES: Dist = {
    "Tom": 0.2,
    "Lily": 0.2,
    "Max": 0.15,
    "Mia": 0.15,
    "Ben": 0.1,
    "Sara": 0.1,
    "Luna": 0.05,
    "Sam": 0.05,
}
_GIRLS = {"Lily", "Mia", "Sara", "Luna"}
ANIMALS: Dist = {"cat": 0.3, "dog": 0.25, "rabbit": 0.15, "bird": 0.1, "fox": 0.1, "mouse": 0.1}
FEELINGS: Dist = {"happy": 0.5, "surprised": 0.2, "excited": 0.2, "proud": 0.1}


def _pronoun(girl: str, boy: str, on: str = "name") -> Given:
    """He/she etc. must agree with the name chosen earlier in the same story."""
    return Given(on, {name: {girl if name in _GIRLS else boy: 1.0} for name in NAMES})


def _other_name(on: str = "name") -> Given:
    """A second character who is never the first one."""
    return Given(on, {n: _normalize({m: p for m, p in NAMES.items() if m != n}) for n in NAMES})


SPOTS = Given(
    "animal",
    {
        "cat": {"mat": 0.4, "table": 0.2, "floor": 0.2, "chair": 0.1, "bed": 0.1},
        "dog": {"floor": 0.4, "mat": 0.2, "grass": 0.2, "bed": 0.1, "step": 0.1},
        "rabbit": {"grass": 0.5, "mat": 0.2, "floor": 0.2, "hill": 0.1},
        "bird": {"branch": 0.4, "roof": 0.3, "fence": 0.2, "table": 0.1},
        "fox": {"hill": 0.4, "grass": 0.3, "log": 0.2, "step": 0.1},
        "mouse": {"table": 0.3, "floor": 0.3, "chair": 0.2, "mat": 0.2},
    },
)
FOODS = Given(
    "animal",
    {
        "cat": {"fish": 0.6, "milk": 0.2, "chicken": 0.2},
        "dog": {"meat": 0.5, "bones": 0.3, "rice": 0.2},
        "rabbit": {"carrots": 0.7, "lettuce": 0.3},
        "bird": {"seeds": 0.6, "worms": 0.3, "berries": 0.1},
        "fox": {"mice": 0.4, "berries": 0.3, "eggs": 0.3},
        "mouse": {"cheese": 0.6, "seeds": 0.3, "bread": 0.1},
    },
)

# Relative weights (normalised below): stories ≈ 45 %, everyday facts ≈ 17 %, AI concepts ≈ 38 %.
TEMPLATES: tuple[Template, ...] = (
    # --- short stories ------------------------------------------------------------------------
    _template(
        "animal_sat",
        7,
        "The {animal} sat on the {spot}.",
        animal=ANIMALS,
        spot=SPOTS,
    ),
    _template(
        "animal_sat_story",
        5,
        "The {animal} sat on the {spot}. It looked at the {sight} for a long time. "
        "Then it {action}, and the {animal} went to sleep.",
        animal=ANIMALS,
        spot=SPOTS,
        sight={"window": 0.35, "door": 0.25, "moon": 0.2, "rain": 0.2},
        action={"yawned": 0.4, "stretched": 0.3, "blinked": 0.2, "jumped": 0.1},
    ),
    _template(
        "animal_hungry",
        4,
        "The {animal} was hungry, so it looked for {food}. It found some {food} near the {where} "
        "and ate it all. Then the {animal} was {feeling}.",
        animal=ANIMALS,
        food=FOODS,
        where={"house": 0.4, "river": 0.3, "barn": 0.2, "road": 0.1},
        feeling={"happy": 0.6, "full": 0.3, "sleepy": 0.1},
    ),
    _template(
        "once_upon",
        8,
        "Once upon a time, there was a little {animal} named {name}. {name} lived in a {home} "
        "near the {nature}. Every morning, {name} went to the {nature} to {activity}. One day, "
        "{name} found a {thing} under a {cover}. {name} was very {feeling} and showed the {thing} "
        "to {his} friends.",
        animal=ANIMALS,
        name=NAMES,
        home=Given(
            "animal",
            {
                "cat": {"house": 0.6, "barn": 0.2, "garden": 0.2},
                "dog": {"house": 0.5, "barn": 0.3, "garden": 0.2},
                "rabbit": {"hole": 0.5, "garden": 0.3, "barn": 0.2},
                "bird": {"nest": 0.7, "tree": 0.3},
                "fox": {"den": 0.6, "hole": 0.4},
                "mouse": {"hole": 0.5, "house": 0.3, "barn": 0.2},
            },
        ),
        nature={"river": 0.35, "forest": 0.25, "lake": 0.2, "hill": 0.1, "sea": 0.1},
        activity={"play": 0.4, "drink": 0.2, "swim": 0.15, "run": 0.15, "sing": 0.1},
        thing={"box": 0.3, "key": 0.25, "shell": 0.2, "map": 0.15, "coin": 0.1},
        cover={"rock": 0.4, "tree": 0.3, "leaf": 0.2, "bush": 0.1},
        feeling=FEELINGS,
        his=_pronoun("her", "his"),
    ),
    _template(
        "lost_ball",
        6,
        "{name} had a {color} ball. One day, {name} lost the ball in the {area}. {He} looked "
        "everywhere, but {he} could not find it. Then {helper} helped {him} look under the "
        "{furniture}. The {color} ball was there! {name} said thank you to {helper}.",
        name=NAMES,
        color={"red": 0.35, "blue": 0.25, "green": 0.15, "yellow": 0.15, "pink": 0.1},
        area={"house": 0.5, "garden": 0.3, "park": 0.2},
        He=_pronoun("She", "He"),
        he=_pronoun("she", "he"),
        helper={"Mom": 0.35, "Dad": 0.3, "Grandma": 0.2, "Grandpa": 0.15},
        him=_pronoun("her", "him"),
        furniture=Given(
            "area",
            {
                "house": {"bed": 0.4, "sofa": 0.3, "table": 0.3},
                "garden": {"bush": 0.5, "bench": 0.3, "tree": 0.2},
                "park": {"bench": 0.5, "slide": 0.3, "tree": 0.2},
            },
        ),
    ),
    _template(
        "weather_trip",
        6,
        "It was a {weather} day. {name} wanted to go to the {place}. {He} put on {his} {clothes} "
        "and went outside. At the {place}, {he} saw {count} {creatures}. {name} had a {time} time "
        "and went home.",
        weather={"sunny": 0.4, "rainy": 0.3, "cold": 0.2, "windy": 0.1},
        name=NAMES,
        place={"park": 0.4, "beach": 0.2, "lake": 0.2, "farm": 0.1, "zoo": 0.1},
        He=_pronoun("She", "He"),
        his=_pronoun("her", "his"),
        clothes=Given(
            "weather",
            {
                "sunny": {"hat": 0.6, "shoes": 0.4},
                "rainy": {"coat": 0.5, "boots": 0.5},
                "cold": {"coat": 0.5, "scarf": 0.3, "hat": 0.2},
                "windy": {"coat": 0.5, "scarf": 0.5},
            },
        ),
        he=_pronoun("she", "he"),
        count={"two": 0.4, "three": 0.3, "four": 0.2, "many": 0.1},
        creatures=Given(
            "place",
            {
                "park": {"ducks": 0.5, "dogs": 0.3, "birds": 0.2},
                "beach": {"boats": 0.4, "birds": 0.3, "crabs": 0.3},
                "lake": {"ducks": 0.5, "frogs": 0.3, "fish": 0.2},
                "farm": {"cows": 0.4, "pigs": 0.3, "sheep": 0.3},
                "zoo": {"lions": 0.4, "monkeys": 0.4, "elephants": 0.2},
            },
        ),
        time={"great": 0.4, "fun": 0.3, "lovely": 0.2, "long": 0.1},
    ),
    _template(
        "best_friends",
        5,
        "{name} and {friend} were best friends. Every day after school, they played {game} in the "
        "park. One day, {friend} felt sad, so {name} shared {his} {snack} with {friend_him}. Soon "
        "{friend} smiled again, and they played {game} until dinner.",
        name=NAMES,
        friend=_other_name(),
        game={"tag": 0.4, "football": 0.3, "chess": 0.15, "cards": 0.15},
        his=_pronoun("her", "his"),
        snack={"apple": 0.3, "cookie": 0.3, "sandwich": 0.2, "cake": 0.2},
        friend_him=_pronoun("her", "him", on="friend"),
    ),
    _template(
        "baking",
        4,
        "{name} wanted to bake a cake for {his} {relative}. {He} mixed flour, eggs and {sweet}. "
        "The cake was {result}. {His} {relative} said it was the best cake ever.",
        name=NAMES,
        his=_pronoun("her", "his"),
        relative={"mom": 0.3, "dad": 0.25, "grandma": 0.2, "sister": 0.15, "brother": 0.1},
        He=_pronoun("She", "He"),
        sweet={"sugar": 0.4, "milk": 0.3, "butter": 0.2, "honey": 0.1},
        result={"sweet": 0.4, "soft": 0.3, "big": 0.2, "warm": 0.1},
        His=_pronoun("Her", "His"),
    ),
    _template(
        "dog_named",
        4,
        "{name} had a dog named {dog}. Every day, {name} threw a stick, and {dog} ran to get it. "
        "One day, {dog} came back with a {found} instead. {name} laughed and gave {dog} a {treat}.",
        name=NAMES,
        dog={"Rex": 0.35, "Buddy": 0.3, "Spot": 0.2, "Daisy": 0.15},
        found={"shoe": 0.35, "sock": 0.25, "ball": 0.25, "hat": 0.15},
        treat={"bone": 0.5, "hug": 0.3, "cookie": 0.2},
    ),
    _template(
        "garden_seed",
        4,
        "{name} planted a {seed} seed in the garden. Every day, {he} gave it water. After many "
        "days, a small {plant} grew from the seed. {name} was so {feeling}!",
        name=NAMES,
        seed={"sunflower": 0.35, "tomato": 0.25, "bean": 0.25, "pumpkin": 0.15},
        he=_pronoun("she", "he"),
        plant=Given(
            "seed",
            {
                "sunflower": {"flower": 0.7, "plant": 0.3},
                "tomato": {"plant": 0.8, "vine": 0.2},
                "bean": {"plant": 0.6, "vine": 0.4},
                "pumpkin": {"vine": 0.6, "plant": 0.4},
            },
        ),
        feeling=FEELINGS,
    ),
    _template(
        "forest_walk",
        3,
        "{name} went for a walk in the forest with {his} {pet}. It started to get dark, and {name} "
        "could not see the path. The {pet} found the way home. That night, {name} gave the {pet} "
        "an extra {treat}.",
        name=NAMES,
        his=_pronoun("her", "his"),
        pet={"dog": 0.6, "puppy": 0.4},
        treat={"bone": 0.5, "cookie": 0.3, "hug": 0.2},
    ),
    _template(
        "bedtime_book",
        3,
        "Every night, {name} reads a book about {topic} before bed. {His} favorite story is about "
        "a brave {hero}. {name} wants to be like the brave {hero} one day.",
        name=NAMES,
        topic={"dragons": 0.3, "space": 0.3, "pirates": 0.2, "dinosaurs": 0.2},
        His=_pronoun("Her", "His"),
        hero=Given(
            "topic",
            {
                "dragons": {"knight": 0.6, "dragon": 0.4},
                "space": {"astronaut": 0.7, "robot": 0.3},
                "pirates": {"pirate": 0.6, "captain": 0.4},
                "dinosaurs": {"scientist": 0.6, "dinosaur": 0.4},
            },
        ),
    ),
    _template(
        "birthday",
        3,
        "Today {name} is {age} years old. There was a big {flavor} cake at the party. {name} blew "
        "out all {age} candles and made a wish.",
        name=NAMES,
        age={"five": 0.3, "six": 0.3, "seven": 0.2, "eight": 0.2},
        flavor={"chocolate": 0.5, "strawberry": 0.3, "lemon": 0.2},
    ),
    # --- everyday facts ------------------------------------------------------------------------
    _template("animal_eats", 4, "The {animal} likes to eat {food}.", animal=ANIMALS, food=FOODS),
    _template(
        "animal_says",
        2,
        "The {animal} says {sound}.",
        animal={"cat": 0.25, "dog": 0.25, "cow": 0.2, "duck": 0.15, "mouse": 0.15},
        sound=Given(
            "animal",
            {
                "cat": {"meow": 1.0},
                "dog": {"woof": 1.0},
                "cow": {"moo": 1.0},
                "duck": {"quack": 1.0},
                "mouse": {"squeak": 1.0},
            },
        ),
    ),
    _template(
        "young_animal",
        2,
        "A {young} is a young {adult}.",
        young={"puppy": 0.3, "kitten": 0.3, "lamb": 0.15, "calf": 0.15, "foal": 0.1},
        adult=Given(
            "young",
            {
                "puppy": {"dog": 1.0},
                "kitten": {"cat": 1.0},
                "lamb": {"sheep": 1.0},
                "calf": {"cow": 1.0},
                "foal": {"horse": 1.0},
            },
        ),
    ),
    _template(
        "seasons",
        2,
        "{season} is the {extreme} season of the year.",
        season={"Summer": 0.5, "Winter": 0.5},
        extreme=Given("season", {"Summer": {"warmest": 1.0}, "Winter": {"coldest": 1.0}}),
    ),
    _template(
        "ripe_fruit",
        2,
        "A ripe {fruit} is {color}.",
        fruit={"banana": 0.3, "lemon": 0.2, "strawberry": 0.2, "tomato": 0.15, "blueberry": 0.15},
        color=Given(
            "fruit",
            {
                "banana": {"yellow": 1.0},
                "lemon": {"yellow": 1.0},
                "strawberry": {"red": 1.0},
                "tomato": {"red": 1.0},
                "blueberry": {"blue": 1.0},
            },
        ),
    ),
    _template(
        "plants_need",
        2,
        "Plants need {need} and {need2} to grow.",
        need={"water": 0.5, "sunlight": 0.3, "air": 0.2},
        need2=Given(
            "need",
            {
                "water": {"sunlight": 0.7, "air": 0.3},
                "sunlight": {"water": 0.8, "air": 0.2},
                "air": {"water": 0.6, "sunlight": 0.4},
            },
        ),
    ),
    _template("sun", 1.5, "The sun rises in the east and sets in the west."),
    _template("calendar", 1.5, "There are seven days in a week and twelve months in a year."),
    _template(
        "water",
        1.5,
        "Water turns into ice when it gets very cold, and it boils when it gets very hot.",
    ),
    # --- generative AI concepts (plain language, and correct) ---------------------------------
    _template(
        "ai_nesting",
        2,
        "Artificial intelligence contains machine learning, machine learning contains deep "
        "learning, and deep learning contains generative AI.",
    ),
    _template(
        "ml",
        1.5,
        "Machine learning is a part of artificial intelligence. It learns patterns from {data} "
        "instead of following rules written by people.",
        data={"data": 0.6, "examples": 0.4},
    ),
    _template(
        "dl",
        1.5,
        "Deep learning is a part of machine learning that uses neural networks with many layers.",
    ),
    _template(
        "genai",
        2,
        "Generative AI is a part of deep learning. It creates new {out} and {out2}.",
        out={"text": 0.45, "images": 0.3, "music": 0.15, "code": 0.1},
        out2=Given(
            "out",
            {
                "text": {"images": 0.6, "code": 0.4},
                "images": {"text": 0.5, "video": 0.5},
                "music": {"images": 0.5, "text": 0.5},
                "code": {"text": 0.7, "images": 0.3},
            },
        ),
    ),
    _template(
        "token",
        1.5,
        "A token is a piece of text. A token is often a part of a word, so it is not always a "
        "whole word.",
    ),
    _template(
        "tokenizer",
        1,
        "A tokenizer splits text into tokens and turns each token into a number called a token id.",
    ),
    _template(
        "next_token",
        1.5,
        "A language model predicts the next token. It gives a probability to every token in its "
        "vocabulary.",
    ),
    _template(
        "generation_loop",
        1,
        "To write text, the model {picks} the next token, adds it to the text, and repeats.",
        picks={"samples": 0.5, "picks": 0.3, "chooses": 0.2},
    ),
    _template(
        "temperature",
        2.5,
        "A temperature {side} one makes the distribution {shape}, so the output is more {style}.",
        side={"below": 0.5, "above": 0.5},
        shape=Given("side", {"below": {"sharper": 1.0}, "above": {"flatter": 1.0}}),
        style=Given(
            "side",
            {
                "below": {"predictable": 0.6, "focused": 0.4},
                "above": {"random": 0.5, "surprising": 0.3, "creative": 0.2},
            },
        ),
    ),
    _template(
        "temperature_zero",
        1,
        "With a temperature close to zero, the model almost always picks the most likely token.",
    ),
    _template(
        "top_k",
        1.5,
        "Top k sampling keeps only the k most likely tokens and samples the next token from them.",
    ),
    _template(
        "top_p",
        1.5,
        "Top p sampling keeps the smallest set of likely tokens whose probabilities add up to at "
        "least p. It is also called nucleus sampling.",
    ),
    _template(
        "greedy",
        1,
        "Greedy decoding always picks the most likely next token, so it gives the same answer "
        "every time.",
    ),
    _template(
        "embedding",
        2,
        "An embedding is a list of numbers that represents a token. Tokens with similar meanings "
        "get {close} embeddings.",
        close={"similar": 0.6, "close": 0.4},
    ),
    _template(
        "pretraining",
        2,
        "During pretraining, the model learns to predict the next token on a huge amount of text "
        "from {source} and {source2}.",
        source={"books": 0.4, "websites": 0.4, "code": 0.2},
        source2=Given(
            "source",
            {
                "books": {"websites": 0.7, "code": 0.3},
                "websites": {"books": 0.7, "code": 0.3},
                "code": {"books": 0.5, "websites": 0.5},
            },
        ),
    ),
    _template(
        "three_stages",
        1.5,
        "A chat model is trained in three stages: pretraining, supervised finetuning and RLHF.",
    ),
    _template(
        "sft",
        1.5,
        "Supervised finetuning trains a pretrained model on example conversations, so it learns "
        "to follow instructions.",
    ),
    _template(
        "rlhf",
        2,
        "RLHF stands for reinforcement learning from human feedback. People rank answers from the "
        "model, a reward model learns from these rankings, and the model is then trained to get a "
        "higher reward.",
    ),
    _template(
        "reward_model",
        1.5,
        "The reward model is trained on human {judgements} and gives each answer a score.",
        judgements={"rankings": 0.5, "preferences": 0.3, "comparisons": 0.2},
    ),
    _template(
        "quantization",
        2,
        "Quantization stores the weights with fewer bits. Using {bits} bits instead of sixteen "
        "bits makes the model about {factor} times smaller.",
        bits={"eight": 0.5, "four": 0.5},
        factor=Given("bits", {"eight": {"two": 1.0}, "four": {"four": 1.0}}),
    ),
    _template(
        "quantization_tradeoff",
        1,
        "Quantization saves memory, but it can make the model a little less accurate.",
    ),
    _template(
        "lora",
        2,
        "LoRA freezes the original weights and trains two small low rank matrices. Their product "
        "is added to the frozen weights, so very few parameters are trained.",
    ),
    _template(
        "qlora",
        2,
        "QLoRA is LoRA on a frozen base model that is quantized to four bits with the NormalFloat "
        "data type. Only the small LoRA matrices are trained.",
    ),
    _template(
        "qlora_gpu",
        1,
        "QLoRA can finetune a large model on a single GPU, because the frozen weights use much "
        "less memory.",
    ),
    _template(
        "transformer",
        2,
        "A transformer is a neural network made of attention layers and feed forward layers. In a "
        "language model, attention lets each token look at the tokens before it.",
    ),
    _template(
        "llms_are_transformers",
        1,
        "Most large language models are transformers that are trained on a lot of text.",
    ),
    _template(
        "context_window",
        1,
        "The context window is the number of tokens that the model can read at once.",
    ),
    _template(
        "hallucination",
        1,
        "A language model can make up facts that sound true. This is called hallucination.",
    ),
    _template(
        "softmax",
        1,
        "The softmax function turns the logits into probabilities that add up to one. The logits "
        "are the raw scores that the model gives to each token.",
    ),
    _template(
        "langchain",
        1.5,
        "LangChain is a library for building applications with language models. It connects a "
        "model to prompts, tools and memory.",
    ),
    _template(
        "loss",
        1,
        "The training loss measures how surprised the model is by the real next token. A lower "
        "loss means better predictions.",
    ),
    _template(
        "parameters",
        1,
        "The weights of a neural network are also called its parameters. Training changes the "
        "parameters to make the loss smaller.",
    ),
    _template(
        "prompt",
        1,
        "A prompt is the text that you give to the model. The model continues the prompt one "
        "token at a time.",
    ),
    _template(
        "llama",
        1,
        "This small model uses RMSNorm, rotary position embeddings and SwiGLU, like Llama.",
    ),
)

_TOTAL_WEIGHT = sum(t.weight for t in TEMPLATES)
_TEMPLATE_PROBS = tuple(t.weight / _TOTAL_WEIGHT for t in TEMPLATES)


# ---------------------------------------------------------------------------------------------
# Sampling and exact probabilities
# ---------------------------------------------------------------------------------------------


def _sample_words(rng: random.Random) -> list[str]:
    """Sample one document as a list of words (without END_OF_TEXT)."""
    template = rng.choices(TEMPLATES, weights=_TEMPLATE_PROBS)[0]
    bound: dict[str, str] = {}
    words = []
    for item in template.items:
        slot = _slot_of(item)
        if slot is None:
            words.append(item)
            continue
        if slot not in bound:
            dist = _slot_dist(template, slot, bound)
            bound[slot] = rng.choices(list(dist), weights=list(dist.values()))[0]
        words.append(bound[slot])
    return words


def generate_documents(n: int, seed: int = 0) -> list[str]:
    """n independent documents; the same seed always gives the same documents."""
    rng = random.Random(seed)
    return [join_words(_sample_words(rng)) for _ in range(n)]


def _continuations(template: Template, prefix: list[str]) -> tuple[float, Dist] | None:
    """P(prefix | template) and P(next word | template, prefix), or None if impossible."""
    if len(prefix) > len(template.items):
        return None
    bound: dict[str, str] = {}
    likelihood = 1.0
    for item, word in zip(template.items, prefix, strict=False):
        slot = _slot_of(item)
        if slot is None:
            if item != word:
                return None
        elif slot in bound:
            if bound[slot] != word:
                return None
        else:
            likelihood *= _slot_dist(template, slot, bound).get(word, 0.0)
            if likelihood == 0.0:
                return None
            bound[slot] = word
    if len(prefix) == len(template.items):
        return likelihood, {END_OF_TEXT: 1.0}
    item = template.items[len(prefix)]
    slot = _slot_of(item)
    if slot is None:
        return likelihood, {item: 1.0}
    if slot in bound:
        return likelihood, {bound[slot]: 1.0}
    return likelihood, _slot_dist(template, slot, bound)


def next_word_distribution(prefix: str) -> dict[str, float]:
    """Exact P(next word | document prefix), sorted by probability (END_OF_TEXT ends a document).

    The prefix is the beginning of a document cut at a word boundary ("" for the first word).
    """
    words = split_words(prefix)
    scores: defaultdict[str, float] = defaultdict(float)
    for template, p_template in zip(TEMPLATES, _TEMPLATE_PROBS, strict=True):
        match = _continuations(template, words)
        if match is None:
            continue
        likelihood, dist = match
        for word, p in dist.items():
            scores[word] += p_template * likelihood * p
    total = sum(scores.values())
    if total == 0.0:
        raise ValueError(f"no template of the bundled corpus can produce the prefix {prefix!r}")
    return dict(sorted(((w, s / total) for w, s in scores.items()), key=lambda kv: (-kv[1], kv[0])))


def held_out_prefixes(n: int, seed: int = 12345) -> list[str]:
    """n evaluation prefixes: fresh documents cut at a uniformly random word boundary.

    Cuts range over 0..len(words), so the empty prefix and the position right before
    END_OF_TEXT both occur.
    """
    rng = random.Random(seed)
    prefixes = []
    for _ in range(n):
        words = _sample_words(rng)
        prefixes.append(join_words(words[: rng.randint(0, len(words))]))
    return prefixes


def preset_prefixes() -> list[str]:
    """Instructive prefixes for the dashboard, each showing a different thing a model must learn."""
    return [
        "",  # which kinds of document start how
        "The cat sat on the",  # a plain word distribution
        "The bird sat on the",  # ...that depends on a word further back
        "Once upon a time, there was a little rabbit named Luna. Luna lived in a hole near the "
        "river. Every morning,",  # copy the character's name from context
        "It was a rainy day. Mia wanted to go to the park. She put on her",  # weather -> clothes
        "Today Ben is six years old. There was a big lemon cake at the party. Ben blew out all",
        "The rabbit likes to eat",  # a memorised fact with some spread
        "A temperature above one makes the distribution flatter, so the output is more",
        "The reward model is trained on human",
        "QLoRA is LoRA on a frozen base model that is quantized to",  # a single correct answer
    ]


def corpus_vocabulary() -> set[str]:
    """Every word and punctuation mark that any template can emit (END_OF_TEXT excluded)."""
    vocab: set[str] = set()
    for template in TEMPLATES:
        vocab.update(item for item in template.items if _slot_of(item) is None)
        for spec in template.slots.values():
            for dist in spec.table.values() if isinstance(spec, Given) else [spec]:
                vocab.update(dist)
    return vocab


# ---------------------------------------------------------------------------------------------
# A user's own text
# ---------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """A user-supplied corpus cannot be used; the message names the offending file."""


def _read_document(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of the text
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
    text = text.strip()
    if not text:
        raise CorpusError(f"{path}: file is empty")
    return text


def load_text_corpus(path: str | Path) -> list[str]:
    """Load a .txt/.md file, or every .txt/.md file under a folder (sorted), one document each."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        )
        if not files:
            raise CorpusError(f"{path}: folder contains no .txt or .md files")
    elif path.suffix.lower() in TEXT_SUFFIXES:
        files = [path]
    else:
        raise CorpusError(f"{path}: expected a .txt or .md file, or a folder of them")
    return [_read_document(file) for file in files]
