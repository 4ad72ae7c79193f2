"""COCO object naming: the word table, the recall/precision/CHAIR measures and "novel" kinds."""

from __future__ import annotations

import pytest

from captioner.evaluation import score
from captioner.metrics import normalize_corpus
from captioner.objects import COCO_OBJECTS, kind_shares, novel_kinds, object_naming, objects_named


def named(text: str) -> set[str]:
    return objects_named(text.split())


def test_eighty_kinds_with_plurals_phrases_and_the_longest_name_first() -> None:
    assert len(COCO_OBJECTS) == 80
    assert named("two zebras and a giraffe near a fire hydrant") == {"zebra", "giraffe", "fire hydrant"}
    assert named("a hot dog and a teddy bear on a dining table") == {"hot dog", "teddy bear", "dining table"}
    assert named("knives forks and a spoon") == {"knife", "fork", "spoon"}
    assert named("a man in an orange shirt") == {"person"}  # the colour names no fruit
    assert named("a tabby kitten on a sofa") == {"cat", "couch"}


def test_recall_precision_and_invention_against_the_references() -> None:
    refs = {
        1: ["a cat on a couch", "a cat sleeping on a sofa", "a kitten on a couch", "a cat", "a tv in a room"],
        2: ["a bus on a street", "a red bus", "a bus and a car", "a bus", "a city street"],
    }
    cands = {1: "a dog on a couch", 2: "a red bus parked by a car"}
    r_tok, c_tok = normalize_corpus(refs, cands)
    out = object_naming(r_tok, c_tok, novel={"bus", "couch"})
    # most references name: {cat, couch} and {bus}; the captions name couch and bus of them
    assert out["object_recall"] == pytest.approx(2 / 3)
    # named: dog (invented), couch, bus, car (one reference names the car)
    assert out["object_precision"] == pytest.approx(3 / 4)
    assert out["object_invented"] == pytest.approx(1 / 2)
    assert out["novel_object_recall"] == pytest.approx(1.0) and out["novel_objects"] == 2
    assert object_naming(r_tok, c_tok)["novel_object_recall"] is None


def test_novel_kinds_come_from_the_training_captions() -> None:
    train = [c.split() for c in ["a dog runs", "a dog and a man", "a man on a bike", "two dogs play"]]
    shares = kind_shares(train)
    assert shares["dog"] == pytest.approx(0.75) and shares["bicycle"] == pytest.approx(0.25)
    novel = novel_kinds(shares, threshold=0.3)
    assert "bicycle" in novel and "zebra" in novel and "dog" not in novel and "person" not in novel


def test_score_reports_object_naming() -> None:
    refs = {1: ["a pizza on a plate", "a pizza", "pizza on a table"]}
    out = score(refs, {1: "a pizza on a table"}, use_meteor=False, novel={"pizza"})
    assert out["object_recall"] == 1.0 and out["novel_object_recall"] == 1.0 and out["object_precision"] == 1.0
