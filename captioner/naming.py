"""Naming what the tags see: the constraints of constrained beam search, the words a decoder was
never taught, and the grammar around them.

The encoder's ImageNet head knows an espresso, a zebra and a school bus; a Flickr8k decoder knows
dogs and people. Three pieces close the gap, all at decode time:

- concepts: each ImageNet class names one concept, the word a person would use (tabby -> the COCO
  kind "cat"; espresso -> "coffee"; zebra -> "zebra"), with the words that count as naming it
  (cat, cats, kitten, tabby ...). A concept the classifier is at least `threshold` sure of (its
  classes' probabilities summed) becomes a disjunctive constraint for decoding.beam_search, the
  most probable `max_constraints` of them per photo (Anderson et al. 2017).
- words the decoder never saw: the vocabulary is extended at load time with the concepts' words;
  each borrows the embedding and the output row of its nearest known word in WordNet
  (resources/word_neighbours.json: zebra <- horse; the DCC idea, Hendricks et al. 2016), so the
  decoder writes "zebra" where it would have written "horse" and goes on as after "horse". A
  borrowed word may only be written on a photo whose constraints ask for it.
- grammar: "a"/"an" agree with the next word ("an elephant"); a mass noun ("coffee", "broccoli")
  takes no indefinite article (the search is banned from "a coffee" and finds "a cup of coffee").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from .beam import ExtendedSteps, StepModel
from .concepts import imagenet_classes, plural
from .objects import COCO_OBJECTS
from .vocab import Vocabulary

#: hypernyms too general to be what a caption names (a "vehicle" for a space shuttle reads wrong)
GENERIC_WORDS = frozenset(
    """animal vehicle vessel food clothing garment produce furniture craft machine device tool building
    establishment dish instrument appliance structure container equipment covering barrier restraint
    obstruction outlet game fastener seat shop wind beverage liquid fluid drug alcohol ingredient condiment
    flavorer starches course entree timepiece peripheral plaything heater utensil cookware crockery tableware
    canine feline equine bovid pachyderm proboscidean saurian reptile amphibian insect arachnid decapod
    mustelid catarrhine gallinacean wader lepidopteron beetle cyprinid malacopterygian footwear headdress
    fabric kernel grain seed toy chute gate pc satellite aircraft""".split()
)
#: classes named for what people wear, or that are seldom the photo's subject: tags, never constraints
NOT_SUBJECTS = frozenset(["clothing", "garment", "headdress", "footwear", "fabric", "covering"])
#: nouns that take no indefinite article: "coffee", not "a coffee" (countable uses are rare in captions)
MASS_NOUNS = frozenset(
    """coffee espresso tea water wine beer milk juice soup food bread meat rice pasta spaghetti cheese
    chocolate cream broccoli cauliflower guacamole hay sand snow grass mud ice luggage furniture
    corn lettuce spinach cereal""".split()
)
#: a concept outside COCO's kinds becomes a constraint only when the classifier is this sure of it:
#: on Flickr8k val and coco_256 such concepts at 0.5 were in the references 43 % of the time
#: (COCO kinds 84-88 %), and classes named by a word the decoder never learnt (maypole,
#: tandem) 0-5 %: those never become constraints
OTHER_CONCEPT_MIN = 0.9
_AN_EXCEPTIONS = ("one", "uni", "use", "usu", "ut", "eu", "ewe")  # vowel letters, consonant sound: "a unicycle"
_A_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")  # consonant letter, vowel sound: "an hour"


def takes_an(word: str) -> bool:
    """Whether the indefinite article before `word` is "an" (by its spelling, with the usual exceptions)."""
    w = word.lower()
    if w.startswith(_A_EXCEPTIONS):
        return True
    return w[:1] in "aeiou" and not w.startswith(_AN_EXCEPTIONS)


@cache
def word_neighbours() -> dict[str, list[str]]:
    """word -> its nearest vocabulary nouns in WordNet (scripts/make_word_neighbours.py)."""
    text = resources.files("captioner").joinpath("resources/word_neighbours.json").read_text(encoding="utf-8")
    return json.loads(text)["neighbours"]


@dataclass(frozen=True)
class Concept:
    name: str  # a COCO kind ("dining table") or a word ("coffee")
    words: tuple[str, ...]  # the single words, singular and plural, that name it


def _forms(word: str) -> tuple[str, ...]:
    """A noun and its plural; a mass noun alone ("coffees" is no caption word)."""
    return (word,) if word in MASS_NOUNS else (word, plural(word))


def _coco_words(kind: str) -> list[str]:
    return [f for name in COCO_OBJECTS[kind] if " " not in name for f in _forms(name)]


def _kind_of_word() -> dict[str, str]:
    return {n: kind for kind, names in COCO_OBJECTS.items() for n in names if " " not in n and kind != "person"}


def class_concepts(known: set[str]) -> list[Concept | None]:
    """For each ImageNet class, the concept a caption should name, given the words a decoder
    `known`s: the first of the class's words that names a COCO kind (with all of that kind's
    words); else the first it knows that is not too general; else its own name; None for classes
    of clothing and for those with only general words."""
    kinds = _kind_of_word()
    out: list[Concept | None] = []
    for entry in imagenet_classes():
        chain = entry["words"]
        if not chain or any(w in NOT_SUBJECTS for w in chain):
            out.append(None)
            continue
        i = next((j for j, w in enumerate(chain) if w in kinds), None)
        if i is not None:
            kind = kinds[chain[i]]
            out.append(Concept(kind, tuple(_coco_words(kind))))  # not the class's own names: "tiger" cat, "toy" dog
            continue
        i = next((j for j, w in enumerate(chain) if w in known and w not in GENERIC_WORDS), None)
        if i is None:
            out.append(None)
            continue
        head = chain[i]
        words = [w for c in chain[: i + 1] for w in _forms(c)]
        out.append(Concept(head, tuple(dict.fromkeys(words))))
    return out


class Naming:
    """One vocabulary's concepts and its extension (see the module docstring).

    vocab: the extended vocabulary (the decoder's words, then the borrowed ones); sources (E,): the
    decoder word each borrowed word copies; class_concept (classes, C): which concept each ImageNet
    class names; concept_ids: each concept's word ids in the extended vocabulary."""

    def __init__(self, base: Vocabulary) -> None:
        self.base = base
        known = set(base.stoi)
        concepts = class_concepts(known)
        neighbours = word_neighbours()
        union: dict[str, list[str]] = {}  # concept -> its words over all the classes that name it
        cls_idx: list[tuple[int, str]] = []
        for c, concept in enumerate(concepts):
            if concept is not None:
                union.setdefault(concept.name, []).extend(concept.words)
                cls_idx.append((c, concept.name))
        new_words: dict[str, str] = {}  # borrowed word -> the known word it copies
        words_of: dict[str, list[str]] = {}
        for name, words in union.items():
            words = list(dict.fromkeys(words))
            writable = [w for w in words if w in known]
            if not writable:  # a concept the decoder has no word for: borrow its first name (and plural)
                for w in _forms(words[0]):
                    src = self._source(w, known, neighbours)
                    if src is not None:
                        new_words[w] = src
                        writable.append(w)
            if writable:
                words_of[name] = writable
        names = {n: j for j, n in enumerate(words_of)}
        self.concept_names = list(names)
        self.coco = np.array([n in COCO_OBJECTS for n in names], dtype=bool)  # (C,)
        self.vocab = Vocabulary(base.itos[4:] + list(new_words), min_count=base.min_count)
        self.sources = np.array([base.stoi[s] for s in new_words.values()], dtype=np.int64)  # (E,)
        self.class_concept = np.zeros((len(concepts), len(names)), np.float32)  # (classes, C): one per ImageNet class
        for c, name in cls_idx:
            if name in names:
                self.class_concept[c, names[name]] = 1.0
        self.concept_ids = [{self.vocab.stoi[w] for w in ws} for ws in words_of.values()]
        V = len(self.vocab)
        every = {w for ws in words_of.values() for w in ws}
        plurals = {p for w in every if (p := plural(w)) != w} & every  # not "sheep": its plural is itself
        no_article = MASS_NOUNS | plurals  # "a coffee", "a zebras"
        # words that take no "a"/"an" (mass nouns, the concepts' plurals)
        self.no_article_ids = np.array([i for w, i in self.vocab.stoi.items() if w in no_article], dtype=np.int64)
        self.article_ids = np.array([self.vocab.stoi[a] for a in ("a", "an") if a in self.vocab.stoi], dtype=np.int64)
        self._an = np.array([takes_an(w) for w in self.vocab.itos])  # (V,)
        self.V0, self.V = len(base), V

    @staticmethod
    def _source(word: str, known: set[str], neighbours: dict[str, list[str]]) -> str | None:
        """The known word a new word borrows from: its nearest WordNet neighbour the decoder knows
        (the plural borrows the neighbour's plural when known); None if it has none."""
        for singular in (word, word[:-1], word[:-2], word[:-3] + "y"):  # plural forms back to a table entry
            near = [n for n in neighbours.get(singular, []) if n in known]
            if near:
                if singular != word and plural(near[0]) in known:
                    return plural(near[0])
                return near[0]
        return None

    @property
    def extended(self) -> bool:
        return self.V > self.V0

    def evidence(self, probs: Any) -> np.ndarray:
        """ImageNet probabilities (B, 1000) -> each concept's probability (B, C)."""
        return np.minimum(np.asarray(probs, dtype=np.float32) @ self.class_concept, 1.0)

    def constraints(self, probs: Any, threshold: Any, most: int) -> list[list[set[int]]]:
        """For each photo, the word-id sets of the (at most `most`) concepts the classifier is at
        least `threshold` (one, or one per photo (B,)) sure of (OTHER_CONCEPT_MIN for those outside
        COCO's kinds), the surest first."""
        ev = self.evidence(probs)  # (B, C)
        ev = np.where(self.coco | (ev >= OTHER_CONCEPT_MIN), ev, 0.0)
        limit = np.broadcast_to(np.asarray(threshold, dtype=np.float32), (len(ev),)).tolist()  # (B,) per photo
        out = []
        for row, th in zip(ev, limit):
            j = np.argsort(-row, kind="stable")[:most]  # the surest first (equals in class order)
            out.append([self.concept_ids[c] for q, c in zip(row[j].tolist(), j.tolist()) if q >= th])
        return out

    def allowed_bias(self, constraints: Sequence[Sequence[set[int]]]) -> np.ndarray:
        """(B, V) log-prob bias: 0, but -inf on the borrowed words a photo's constraints do not ask for."""
        bias = np.zeros((len(constraints), self.V), np.float32)
        bias[:, self.V0 :] = float("-inf")
        for b, sets in enumerate(constraints):
            for ws in sets:
                ids = [i for i in ws if i >= self.V0]
                bias[b, ids] = 0.0
        return bias

    def banned_bigrams(self, constraints: Sequence[Sequence[set[int]]]) -> tuple[np.ndarray, np.ndarray] | None:
        """(articles (F,), banned (B, V)): for each photo, its constraint words that are mass nouns
        or plurals may not come right after "a"/"an" ("a coffee", "a zebras"). Only the photo's own:
        "a coffee cup" or "a water bottle" stays writable where coffee is not what it must name."""
        if not len(self.article_ids):
            return None
        banned = np.zeros((len(constraints), self.V), dtype=bool)
        no_article = set(self.no_article_ids.tolist())
        for b, sets in enumerate(constraints):
            ids = [i for ws in sets for i in ws if i in no_article]
            banned[b, ids] = True
        return self.article_ids, banned

    def fix_articles(self, tokens: list[int]) -> list[int]:
        """'a' / 'an' made to agree with the word after them (same length: attention rows still line up)."""
        if len(self.article_ids) < 2:
            return tokens
        a, an = self.article_ids.tolist()
        out = list(tokens)
        for i in range(len(out) - 1):
            if out[i] in (a, an):
                out[i] = an if bool(self._an[out[i + 1]]) else a
        return out

    def wrap(self, steps: StepModel) -> StepModel:
        """A step model (beam.py) that also writes the borrowed words."""
        return ExtendedSteps(steps, self.sources, self.V0) if self.extended else steps
