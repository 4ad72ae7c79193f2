"""The kinds of thing a caption can name (people, animals, vehicles), the words for each, and the
ImageNet classes' caption words: the one place the hallucination metric (metrics.py), the tags
and the tag-guided decoding (guidance.py) read them from.

A kind is a thing one can check against the references: a caption that says "a dog" on a photo
whose five references never name a dog (nor a puppy, nor a poodle) has invented one. People are
one kind (the references disagree too often on man/boy/person to be stricter); animals and
vehicles are one kind per species or type, plus a generic word ("animal", "vehicle") that any
kind of its category grounds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources

#: category -> kind -> the words that name it (singular; plurals are added below)
CATEGORIES: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "person": (
            "man",
            "woman",
            "boy",
            "girl",
            "child",
            "kid",
            "person",
            "people",
            "baby",
            "lady",
            "guy",
            "toddler",
            "adult",
            "teenager",
            "teen",
            "player",
            "skier",
            "surfer",
            "snowboarder",
            "skateboarder",
            "biker",
            "cyclist",
            "rider",
            "climber",
            "hiker",
            "swimmer",
            "runner",
            "dancer",
            "worker",
            "soldier",
            "officer",
            "policeman",
            "cowboy",
            "chef",
            "mother",
            "father",
            "mom",
            "dad",
            "son",
            "daughter",
            "brother",
            "sister",
            "friend",
            "gentleman",
            "student",
            "tourist",
            "pedestrian",
            "spectator",
            "crowd",
            "audience",
            "family",
            "team",
            "batter",
            "catcher",
            "pitcher",
            "umpire",
            "bride",
            "groom",
            "wrestler",
            "boxer",
            "athlete",
            "individual",
            "infant",
            "youngster",
            "performer",
            "musician",
            "singer",
            "drummer",
            "guitarist",
            "fisherman",
        ),
    },
    "animal": {
        "dog": (
            "dog",
            "puppy",
            "pup",
            "poodle",
            "terrier",
            "retriever",
            "collie",
            "beagle",
            "dalmatian",
            "greyhound",
            "bulldog",
            "labrador",
            "husky",
            "hound",
            "pug",
            "chihuahua",
            "spaniel",
            "dachshund",
            "rottweiler",
            "doberman",
            "schnauzer",
            "corgi",
            "sheepdog",
        ),
        "cat": ("cat", "kitten", "kitty"),
        "horse": ("horse", "pony", "foal", "stallion", "mare"),
        "bird": (
            "bird",
            "duck",
            "goose",
            "swan",
            "pigeon",
            "seagull",
            "gull",
            "parrot",
            "chicken",
            "hen",
            "rooster",
            "owl",
            "eagle",
            "penguin",
            "flamingo",
            "crow",
            "pelican",
            "heron",
            "hawk",
        ),
        "cow": ("cow", "cattle", "bull", "calf", "ox"),
        "sheep": ("sheep", "lamb", "ram"),
        "goat": ("goat",),
        "elephant": ("elephant",),
        "bear": ("bear",),
        "giraffe": ("giraffe",),
        "zebra": ("zebra",),
        "monkey": ("monkey", "ape", "gorilla", "chimpanzee"),
        "pig": ("pig", "hog", "boar"),
        "deer": ("deer",),
        "camel": ("camel",),
        "lion": ("lion",),
        "tiger": ("tiger",),
        "rabbit": ("rabbit", "bunny"),
        "squirrel": ("squirrel",),
        "fish": ("fish",),
        "animal": ("animal", "pet"),
    },
    "vehicle": {
        "car": ("car", "taxi", "cab", "jeep", "suv", "convertible", "sedan"),
        "truck": ("truck", "pickup", "lorry"),
        "van": ("van",),
        "bus": ("bus",),
        "train": ("train", "locomotive", "subway", "tram", "trolley"),
        "bicycle": ("bicycle", "bike", "bmx"),
        "motorcycle": ("motorcycle", "motorbike", "scooter", "moped", "dirtbike"),
        "boat": ("boat", "ship", "canoe", "kayak", "sailboat", "yacht", "raft", "ferry"),
        "airplane": ("airplane", "plane", "jet", "aircraft", "airliner"),
        "vehicle": ("vehicle",),
    },
}
GENERIC = {"animal": "animal", "vehicle": "vehicle"}  # category -> its generic kind

#: word pairs that name something other than their words' kinds ("hot dog" is food, "teddy bear" a toy)
PHRASES = {("hot", "dog"), ("hot", "dogs"), ("teddy", "bear"), ("teddy", "bears"), ("jet", "ski"), ("jet", "skis")}

_IRREGULAR = {
    "man": "men", "woman": "women", "child": "children", "person": "persons", "policeman": "policemen",
    "gentleman": "gentlemen", "fisherman": "fishermen", "goose": "geese", "ox": "oxen", "mouse": "mice",
    "sheep": "sheep", "deer": "deer", "fish": "fish", "cattle": "cattle", "people": "peoples",
    "knife": "knives", "scissors": "scissors", "skis": "skis", "glasses": "glasses", "dice": "dice",
}  # fmt: skip


def plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@cache
def word_kinds() -> dict[str, tuple[str, str]]:
    """Every word (singular and plural) -> (category, kind)."""
    out: dict[str, tuple[str, str]] = {}
    for category, kinds in CATEGORIES.items():
        for kind, words in kinds.items():
            for w in words:
                out[w] = out[plural(w)] = (category, kind)
    return out


def kinds_named(tokens: Sequence[str]) -> set[tuple[str, str]]:
    """The (category, kind) pairs a tokenised, lower-cased caption names."""
    table = word_kinds()
    named = set()
    for i, t in enumerate(tokens):
        if (tokens[i - 1], t) in PHRASES if i else False:
            continue
        if i + 1 < len(tokens) and (t, tokens[i + 1]) in PHRASES:
            continue
        if t in table:
            named.add(table[t])
    return named


def invented(caption: set[tuple[str, str]], references: Iterable[set[tuple[str, str]]]) -> set[tuple[str, str]]:
    """The kinds a caption names that no reference names. A generic word ("an animal") is grounded
    by any kind of its category; a species by the same kind, or by the generic word when no
    reference says which species it is (refs "a cat", "an animal": the animal is the cat)."""
    grounded = set().union(*references)
    categories = {c for c, _ in grounded}
    species = {c for c, k in grounded if k != GENERIC.get(c)}
    out = set()
    for c, k in caption:
        if (c, k) in grounded:
            continue
        if c in GENERIC and k == GENERIC[c] and c in categories:
            continue
        if c in GENERIC and (c, GENERIC[c]) in grounded and c not in species:
            continue
        out.add((c, k))
    return out


# ---- ImageNet classes: labels and caption words (resources/imagenet_words.json, made by
# scripts/make_imagenet_words.py from WordNet 3.0, so nothing needs WordNet at run time)
@cache
def imagenet_classes() -> list[dict]:
    """For each of the 1000 ImageNet-1k classes, in the classifier's order: {"label": a short
    readable name, "words": caption words for it, most specific first (the class's own name when
    one word, then its WordNet hypernyms'), e.g. tabby -> ["tabby", "cat", "feline", ...]}."""
    text = resources.files("captioner").joinpath("resources/imagenet_words.json").read_text(encoding="utf-8")
    classes = json.loads(text)["classes"]
    if len(classes) != 1000:
        raise RuntimeError(f"imagenet_words.json: expected 1000 classes, found {len(classes)}")
    return classes
