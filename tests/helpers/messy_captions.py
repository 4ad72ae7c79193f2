"""Captions written the way people write them, for the coco-caption parity fixture.

Seed sentences (our own, below, or the real captions in ../shared/data) are rewritten with a fixed
seed: several sentences in one caption, curly quotes and apostrophes, possessives and
contractions, hyphens and dashes, numbers with points and commas, money and fractions,
abbreviations and initials, brackets, accented and non-Latin letters, emoji, stray white space.
scripts/make_metrics_fixture.py scores them with the official code; tests/test_metrics.py
rebuilds the same sets and checks our tokenizer and metrics against those scores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEEDS = [
    "a dog runs on the grass",
    "two dogs play with a red ball in the park",
    "a man rides a bike down the street",
    "the woman is standing near the water",
    "a little girl sits on a bench",
    "three children jump over a fence",
    "a brown dog is running across the beach",
    "an old man looks at the rocks",
    "people walk along the snow",
    "a black and white dog catches a frisbee",
    "a cat sleeps on a red couch",
    "a plate of food with rice and beans",
    "a kitchen with a stove and a white fridge",
    "a bus is parked on the side of the road",
    "two men play tennis on a blue court",
    "a woman holds an umbrella in the rain",
    "a boy flies a kite on the beach",
    "a train goes over a bridge",
    "a group of people stand in front of a building",
    "a giraffe eats leaves from a tree",
    "a pizza with cheese and tomatoes on a table",
    "a man surfs a large wave",
    "a skier goes down a snowy hill",
    "a little boy in a yellow shirt plays soccer",
    "two horses graze in a field",
    "a girl with a pink hat smiles",
    "a red car drives past a store",
    "an elephant walks through the dust",
    "a baby sleeps in a crib",
    "a man in a suit talks on a phone",
    "a cup of coffee next to a laptop",
    "a clock tower stands over the city",
    "a dog jumps into the lake to get a stick",
    "children play in the fountain",
    "a woman cuts a cake",
    "the sun sets over the ocean",
    "a teddy bear sits on a chair",
    "a boat floats in the harbor",
    "a motorcycle is parked by the curb",
    "a crowd watches a parade",
    "a young man skateboards down a ramp",
    "a black dog and a white dog wrestle in the snow",
    "a girl feeds the ducks at the pond",
    "a man climbs a rock wall",
    "a woman in a red dress dances",
    "two dogs run through the tall grass",
]
WORDS = {
    "dog": ["dog's toy", "dog’s bone", "puppy", "dogs'", "German shepherd", "St. Bernard", "husky (a puppy)"],
    "man": ["man's", "man’s", "Mr. Smith", "Dr. Jones", "J. R. Smith", "man (in a hat)", "man—smiling—"],
    "woman": ["woman's", "Mrs. O’Neil", "woman [left]", "Ms. Zoë", "señora", "woman…"],
    "street": ["St. Mark’s Pl.", "5th Ave.", "street in the U.S.", "Main St., downtown", "rue de l'Église"],
    "water": ["water (approx. 3.5 m deep)", "H2O", "water, e.g. a lake", "lake—or sea—", "water ~20°C"],
    "two": ["2", "two (2)", "a couple of", "2-3", "twenty-two"],
    "three": ["3", "three-and-a-half", "3½", "1,000", "1.000,50", "10,000"],
    "red": ["red-and-white", "bright–red", "red/white", "rouge", "crimson"],
    "a": ["a", "one", "an", "A"],
    "is": ["is", "isn't", "’s", "is not", "was", "can't be", "cannot be"],
    "on": ["on", "on top of", "atop", "upon", "on/off"],
    "the": ["the", "THE", "The", "thé"],
    "girl": ["girl's", "girls'", "girl’s", "niña", "fille", "girl :)"],
    "beach": ["beach in São Paulo", "beach at Zürich", "plage", "beach (Malibu, Calif.)", "beach vs. pool"],
    "ball": ["ball!", "ball?!", "ball…", "ball — a toy", "ball #1", "ball no. 5"],
    "park": ["park at 10:30 a.m.", "park at 5 p.m.", "park, etc.", "park & garden", "Central Park (NYC)"],
}
EXTRAS = [
    "",
    "",
    "",
    " in the park",
    " at 3:45 p.m.",
    ", smiling",
    " while it’s raining",
    " (outside)",
    " near the dog's toy",
    "; it is sunny",
    " – quickly",
    " with 2 friends",
    " for $5.99",
    " costing €3,50",
    " worth £20",
    " 50% off",
    " about 1,250.75 m away",
    " in 1999",
    " in the '90s",
    " on Jan. 5",
    " vs. a cat",
    " i.e. outdoors",
    " in Mt. Fuji’s shadow",
    " (see fig. 2)",
    " [sic]",
    " {blurred}",
    " 🐶",
    " 😀👍🏽",
    " ☺",
    " ✓",
    " ❤️",
    " 🇺🇸",
    " in Москва",
    " 在公园里",
    " στην παραλία",
    " à la café",
    " naïve piñata",
    " crème brûlée",
    " façade of the Łódź building",
    " in the U.K.",
    " — wow!",
    "...",
    " . . .",
    "!!",
    "?",
    " ?!",
    " o’clock",
    " rock 'n' roll",
    " w/ a hat",
    " 24/7",
    " and/or a cat",
    " x-ray",
    " T-shirt",
    " 5-year-old",
    " well‐known",
    " «quoted»",
    " „low“",
    ' "hello"',
    " 'single'",
    " ‘curly single’",
    " “curly double”",
    " ``latex''",
    " at AT&T",
    " Q&A",
    " e-mail: a@b.com",
    " www.example.com",
    " #hashtag",
    " @user",
    " C++",
    " 3 1/2 in",
]
ENDINGS = ["", ".", " .", "!", "?", "...", " .", "…", ". ", "!!", " ?", ".\t", "  "]
SPACES = [" ", " ", " ", " ", "  ", "\t", "\u00a0", " \u2009", "\u3000"]
EDGE_CASES = [
    ("", ["a dog runs on the grass", "a brown dog is running"]),  # empty candidate
    ("a a a a a a a a", ["a dog runs", "a cat sleeps on a mat"]),  # repeats: clipped counts
    ("dog", ["a dog runs on the grass."]),  # one word
    (
        "a man rides a bike down the street while two dogs run after him and people watch from a bench "
        "in the park at night",
        ["a man rides a bike", "a cyclist on a street"],
    ),  # long
    ("The dog, the dog, and the DOG!", ["the dog and the dog", "dogs"]),  # punctuation + repeats
    ("two dogs play with a red ball", ["two dogs play with a red ball"] * 5),  # identical references
    ("a woman's hat", ["a woman's red hat.", "the hat of a woman"]),  # possessive
    ("A dog sits below a square. A cat runs. Then a bird flies.", ["a dog below a square", "a cat"]),
    ("🐶🐶🐶", ["a dog", "a puppy"]),  # emoji only: no tokens
    ("一只狗在草地上跑。", ["一只狗在跑。", "a dog runs"]),  # Chinese: no spaces
    ("a man near Plan B.", ["The man stands.", "a man"]),  # an initial at the end, then a sentence start
]


def _rewrite(caption: str, rng: random.Random) -> str:
    out = []
    for w in caption.strip().rstrip(" .").split():
        alts = WORDS.get(w.lower())
        out.append(rng.choice(alts) if alts and rng.random() < 0.35 else w)
    s = rng.choice(SPACES).join(out) if rng.random() < 0.3 else " ".join(out)
    s += rng.choice(EXTRAS) + rng.choice(ENDINGS)
    r = rng.random()
    if r < 0.3:
        s = s[:1].upper() + s[1:]
    elif r < 0.37:
        s = s.upper()
    elif r < 0.42:
        s = s.title()
    if rng.random() < 0.1:
        s = rng.choice(["  ", "\t", " ", "\u00a0"]) + s + rng.choice(["  ", "\t", "\n", " "])
    return s


def messy(caption: str, pool: list[str], rng: random.Random) -> str:
    """A rewritten caption; often several sentences (a period inside the text)."""
    s = _rewrite(caption, rng)
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        joint = rng.choice([". ", ". ", "! ", "? ", "; ", ".  ", ".\n", " - ", "... ", ".", "; and "])
        s = s.rstrip(" .!?…\t\u00a0") + joint + _rewrite(rng.choice(pool), rng)
    return s


def builtin_sets(seed: int = 14, n: int = 230) -> list[dict]:
    """Sets made from our own seed sentences (safe to commit): n images, 1-5 references each,
    plus the edge cases. About 1100 captions."""
    rng = random.Random(seed)
    sets = []
    for i in range(n):
        topic = rng.choice(SEEDS)
        refs = [
            messy(topic if rng.random() < 0.6 else rng.choice(SEEDS), SEEDS, rng)
            for _ in range(rng.choice([1, 2, 3, 4, 5, 5, 5, 5]))
        ]
        base = topic if rng.random() < 0.5 else rng.choice(SEEDS)
        sets.append({"id": i, "candidate": messy(base, SEEDS, rng), "references": refs})
    for cand, refs in EDGE_CASES:
        sets.append({"id": len(sets), "candidate": cand, "references": refs})
    return sets


def _annotations(path: Path) -> dict[int, list[str]]:
    refs: dict[int, list[str]] = {}
    for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return refs


def shared_sets(data: Path, seed: int = 8, n_flickr: int = 120) -> list[dict] | None:
    """Sets made from the real captions in `data` (../shared/data), or None where it is absent:
    the 99 COCO photos' 495 human captions untouched as references, with rewritten candidates, and
    Flickr8k val images whose references are partly rewritten. These are not committed (the data
    stays outside the repository): the fixture holds only their scores and token hashes."""
    coco, flickr = data / "coco_dev" / "captions.json", data / "flickr8k" / "captions_val.json"
    if not (coco.is_file() and flickr.is_file()):
        return None
    rng = random.Random(seed)
    coco_refs, flickr_refs = _annotations(coco), _annotations(flickr)
    pool = [c for rs in list(coco_refs.values()) + list(flickr_refs.values()) for c in rs]
    sets = []
    for image_id, refs in sorted(coco_refs.items()):
        base = rng.choice(refs) if rng.random() < 0.5 else rng.choice(pool)
        sets.append(
            {"id": len(sets), "source": f"coco_dev:{image_id}", "candidate": messy(base, pool, rng), "references": refs}
        )
    for image_id in sorted(flickr_refs)[:n_flickr]:
        refs = [messy(r, pool, rng) if rng.random() < 0.7 else r for r in flickr_refs[image_id]]
        base = rng.choice(flickr_refs[image_id]) if rng.random() < 0.6 else rng.choice(pool)
        sets.append(
            {
                "id": len(sets),
                "source": f"flickr8k_val:{image_id}",
                "candidate": messy(base, pool, rng),
                "references": refs,
            }
        )
    return sets
