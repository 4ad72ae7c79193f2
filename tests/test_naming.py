"""Naming what the tags see: concepts, borrowed words, articles, and constrained decoding end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captioner import Captioner
from captioner.beam import ExtendedSteps
from captioner.concepts import imagenet_classes
from captioner.decoding import TorchSteps, beam_search
from captioner.models.base import CaptionModel
from captioner.naming import Naming, class_concepts, takes_an
from captioner.vocab import Vocabulary

from .conftest import REPO
from .test_decoding import FakeState

WORDS = "a an dog dogs horse horses cat cats coffee cup of on the table in grass".split()


def class_index(label: str) -> int:
    return next(i for i, c in enumerate(imagenet_classes()) if c["label"] == label)


def test_each_class_names_the_concept_a_person_would() -> None:
    concepts = class_concepts(set(WORDS))
    assert concepts[class_index("tabby")].name == "cat"
    assert {"cat", "cats", "kitten"} <= set(concepts[class_index("tabby")].words)
    assert concepts[class_index("golden retriever")].name == "dog"
    assert concepts[class_index("school bus")].name == "bus"
    assert concepts[class_index("espresso")].name == "coffee"  # the first word the decoder knows
    assert concepts[class_index("espresso")].words == ("espresso", "coffee")  # a mass noun: no plural
    assert concepts[class_index("zebra")].name == "zebra"
    assert concepts[class_index("jersey")] is None  # clothing: a tag, never a constraint
    assert concepts[class_index("maypole")] is None  # a word the decoder does not know, no COCO kind


def test_words_the_decoder_never_learnt_are_borrowed_from_their_nearest_known_word() -> None:
    naming = Naming(Vocabulary(WORDS))
    borrowed = dict(zip(naming.vocab.itos[naming.V0 :], naming.sources.tolist()))
    assert borrowed["zebra"] == naming.base.stoi["horse"] and borrowed["zebras"] == naming.base.stoi["horses"]
    assert naming.vocab.itos[: naming.V0] == naming.base.itos  # the decoder's ids unchanged
    zebra = naming.concept_names.index("zebra")
    assert naming.concept_ids[zebra] == {naming.vocab.stoi["zebra"], naming.vocab.stoi["zebras"]}
    # evidence sums the classes of one concept; only sure concepts become constraints
    probs = torch.zeros(2, 1000)
    probs[0, class_index("tabby")], probs[0, class_index("Egyptian cat")] = 0.2, 0.25
    probs[1, class_index("zebra")] = 0.1
    sets = naming.constraints(probs, 0.4, 2)
    assert sets == [[naming.concept_ids[naming.concept_names.index("cat")]], []]
    assert naming.constraints(probs, torch.tensor([0.5, 0.05]), 2)[1] == [naming.concept_ids[zebra]]
    bias = naming.allowed_bias([[], [naming.concept_ids[zebra]]])
    assert np.isinf(bias[0, naming.V0 :]).all() and bias[1, naming.vocab.stoi["zebra"]] == 0


class Table(CaptionModel):
    """Next-token log-probabilities by the previous token only."""

    def __init__(self, logp: torch.Tensor) -> None:
        super().__init__()
        self.logp = logp

    def init_state(self, features):
        return FakeState(image=features.long())

    def step(self, tokens, state):
        return self.logp[tokens], state


def test_a_borrowed_word_goes_in_and_comes_out_as_its_source() -> None:
    naming = Naming(Vocabulary(WORDS))
    V0 = naming.V0
    logits = torch.randn(V0, V0, generator=torch.Generator().manual_seed(0))
    base = Table(logits.log_softmax(-1))
    ext = naming.wrap(TorchSteps(base))
    assert isinstance(ext, ExtendedSteps)
    horse, zebra = naming.base.stoi["horse"], naming.vocab.stoi["zebra"]
    state = ext.init_state(torch.zeros(2))
    out, _ = ext.step(np.array([zebra, horse]), state)  # (2, V0 + E)
    assert np.allclose(out[0], out[1])  # "zebra" goes in as "horse"
    assert out[0, zebra] == pytest.approx(float(out[0, horse]))  # and comes out with its probability
    assert np.exp(out).sum(-1) == pytest.approx(np.ones(2))


def test_articles_agree_and_no_mass_noun_or_plural_follows_one() -> None:
    assert [takes_an(w) for w in ("elephant", "hour", "unicycle", "dog", "orange", "one")] == [
        True,
        True,
        False,
        False,
        True,
        False,
    ]
    naming = Naming(Vocabulary(WORDS + ["elephant"]))
    s = naming.vocab.stoi
    assert naming.fix_articles([s["a"], s["elephant"], s["on"], s["an"], s["table"]]) == [
        s["an"],
        s["elephant"],
        s["on"],
        s["a"],
        s["table"],
    ]
    # a decoder that would write "a coffee": banned, it writes "a cup of coffee"
    V = naming.V0
    logp = torch.full((V, V), -20.0)
    for prev, nxt, p in [
        ("<start>", "a", 0.9), ("<start>", "coffee", 0.1), ("a", "coffee", 0.7), ("a", "cup", 0.3),
        ("cup", "of", 1.0), ("of", "coffee", 1.0), ("coffee", "<end>", 1.0),
    ]:  # fmt: skip
        logp[naming.vocab.stoi[prev], naming.vocab.stoi[nxt]] = math.log(p)
    model = naming.wrap(TorchSteps(Table(logp.log_softmax(-1))))  # as decoded: with the borrowed words
    free = beam_search(model, torch.zeros(1), beam_size=2)[0][0].tokens
    coffee = {naming.vocab.stoi["coffee"]}
    banned = naming.banned_bigrams([[coffee]])
    assert naming.banned_bigrams([[{naming.vocab.stoi["dog"]}]])[1].sum() == 0  # only a photo's own mass nouns
    banned = beam_search(model, torch.zeros(1), beam_size=2, banned_bigrams=banned)[0][0].tokens
    assert naming.vocab.decode(free) == "a coffee"
    assert naming.vocab.decode(banned) == "a cup of coffee"


def test_the_bundled_model_names_what_its_classifier_is_sure_of() -> None:
    model = Captioner.load(device="cpu")
    assert model.decoding["constrain"] > 0
    coffee = REPO / "assets" / "examples" / "coffee.jpg"
    free = model.caption(coffee, constrain=0.0, tag_subject=0.0)
    named = model.caption(coffee)
    assert "coffee" not in free.split() and "coffee" in named.split(), (free, named)
    assert "a coffee" not in named
