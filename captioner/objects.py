"""COCO's 80 kinds of object, the words that name each, and the object-naming measures built on
them: does the caption name what the photo's references name (recall), is what it names there
(precision, CHAIR), and how does it do on the kinds its training captions hardly ever name
("novel" kinds, computed from the training captions, never listed by hand).

concepts.py holds the coarser person/animal/vehicle kinds of the hallucination metric; this is
the finer, COCO-wide table. Word lists follow the spirit of CHAIR's synonym list (Rohrbach et al.
2018): plural forms are added, multi-word names ("hot dog", "fire hydrant") are matched whole and
before their words, and ambiguous words ("orange" the colour, "glass" the window, "baseball" the
game) are left out rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from .concepts import CATEGORIES, plural

#: COCO category name -> the words (singular; plurals added) and phrases that name it
COCO_OBJECTS: dict[str, tuple[str, ...]] = {
    "person": CATEGORIES["person"]["person"],
    "bicycle": ("bicycle", "bike", "bmx", "tandem"),
    "car": ("car", "automobile", "sedan", "suv", "jeep", "taxi", "cab", "taxicab", "minivan", "van", "limo", "coupe"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike", "dirtbike"),
    "airplane": ("airplane", "plane", "aeroplane", "jet", "jetliner", "airliner", "aircraft", "jumbo jet"),
    "bus": ("bus", "school bus", "double decker", "minibus", "busses"),
    "train": ("train", "locomotive", "tram", "streetcar", "subway", "trolley", "railcar"),
    "truck": ("truck", "pickup", "lorry", "firetruck", "fire engine", "semi", "tractor trailer"),
    "boat": ("boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "raft", "motorboat", "tugboat", "dinghy"),
    "traffic light": ("traffic light", "traffic signal", "stop light", "stoplight"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench",),
    "bird": CATEGORIES["animal"]["bird"],
    "cat": ("cat", "kitten", "kitty", "tabby", "feline"),
    "dog": CATEGORIES["animal"]["dog"],
    "horse": ("horse", "pony", "foal", "stallion", "mare", "colt"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "steer"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear", "brown bear"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse"),
    "tie": ("tie", "necktie", "bow tie", "bowtie"),
    "suitcase": ("suitcase", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "soccer ball", "tennis ball", "football", "basketball", "volleyball", "softball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "surf board", "boogie board", "paddleboard"),
    "tennis racket": ("tennis racket", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass", "goblet"),
    "cup": ("cup", "mug", "teacup", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "cheeseburger", "sub sandwich", "panini", "wrap sandwich"),
    "orange": ("oranges", "tangerine", "clementine", "mandarin orange"),  # not "orange": mostly the colour
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "stool", "armchair"),
    "couch": ("couch", "sofa", "loveseat"),
    "potted plant": ("potted plant", "houseplant", "plant", "flower pot", "flowerpot"),
    "bed": ("bed",),
    "dining table": ("table", "dining table", "kitchen table"),
    "toilet": ("toilet", "urinal"),
    "tv": ("tv", "television", "tv set"),
    "laptop": ("laptop", "computer", "notebook computer"),
    "mouse": ("computer mouse", "mouse"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("phone", "cellphone", "cell phone", "smartphone", "telephone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "teddybear", "stuffed animal"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": ("toothbrush",),
}
NOVEL_SHARE = 0.005  # a kind named in fewer than this share of the training captions is "novel"
MAJORITY = 0.5  # an object "most references name": named by more than this share of them (3 of 5)


def _forms(name: str) -> tuple[str, ...]:
    words = name.split()
    return (name, " ".join(words[:-1] + [plural(words[-1])]))


@cache
def object_phrases() -> dict[tuple[str, ...], str]:
    """Every name of every kind, singular and plural, as a token tuple -> the kind."""
    out: dict[tuple[str, ...], str] = {}
    for kind, names in COCO_OBJECTS.items():
        for name in names:
            for form in _forms(name):
                out.setdefault(tuple(form.split()), kind)
    return out


@cache
def _longest() -> int:
    return max(len(p) for p in object_phrases())


def objects_named(tokens: Sequence[str]) -> set[str]:
    """The COCO kinds a tokenised, lower-cased caption names; the longest name wins ("hot dog" is
    a hot dog, not a dog; "teddy bear" a teddy bear)."""
    table, named, i = object_phrases(), set(), 0
    while i < len(tokens):
        for n in range(min(_longest(), len(tokens) - i), 0, -1):
            kind = table.get(tuple(tokens[i : i + n]))
            if kind is not None:
                named.add(kind)
                i += n
                break
        else:
            i += 1
    return named


def kind_shares(captions: Iterable[Sequence[str]]) -> dict[str, float]:
    """For each kind, the share of the (tokenised) captions that name it."""
    counts, n = dict.fromkeys(COCO_OBJECTS, 0), 0
    for c in captions:
        n += 1
        for k in objects_named(c):
            counts[k] += 1
    return {k: v / max(n, 1) for k, v in counts.items()}


def novel_kinds(shares: Mapping[str, float], threshold: float = NOVEL_SHARE) -> set[str]:
    """The kinds the training captions (whose `kind_shares` these are) name rarely or never."""
    return {k for k in COCO_OBJECTS if shares.get(k, 0.0) < threshold}


def object_naming(
    r_tok: Mapping[Any, list[list[str]]], c_tok: Mapping[Any, list[str]], novel: set[str] | None = None
) -> dict[str, Any]:
    """How well captions name the photo's objects, against the references (token lists in).

    object_recall: of the kinds more than half a photo's references name, the share its caption
    names; object_precision: of the kinds captions name, the share some reference names
    (1 - CHAIR-i over COCO's kinds); object_invented: the share of captions naming a kind no
    reference names (CHAIR-s); novel_object_recall: object_recall over the `novel` kinds only
    (None when no novel set is given or no photo has one).
    """
    hit = total = named = grounded = inventing = novel_hit = novel_total = 0
    for k, cap in c_tok.items():
        refs = [objects_named(r) for r in r_tok[k]]
        said = objects_named(cap)
        anywhere = set().union(*refs)
        most = {o for o in anywhere if sum(o in r for r in refs) > MAJORITY * len(refs)}
        hit += len(said & most)
        total += len(most)
        named += len(said)
        grounded += len(said & anywhere)
        inventing += bool(said - anywhere)
        if novel:
            novel_hit += len(said & most & novel)
            novel_total += len(most & novel)
    return {
        "object_recall": hit / total if total else None,
        "object_precision": grounded / named if named else None,
        "object_invented": inventing / max(len(c_tok), 1),
        "novel_object_recall": novel_hit / novel_total if novel_total else None,
        "novel_objects": novel_total if novel else None,
    }
