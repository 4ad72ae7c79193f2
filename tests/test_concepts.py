"""The kinds a caption names, the hallucination metric built on them, and the ImageNet word table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.concepts import CATEGORIES, imagenet_classes, invented, kinds_named, plural, word_kinds
from captioner.metrics import evaluate, hallucination, normalize_corpus

ROOT = Path(__file__).resolve().parents[1]


def kinds(text: str) -> set[str]:
    return {k for _, k in kinds_named(text.split())}


def test_kinds_named_with_plurals_and_phrases() -> None:
    assert kinds("two men and a woman walk three dogs") == {"person", "dog"}
    assert kinds("a flock of geese near the children") == {"bird", "person"}
    assert kinds("a puppy chases a kitten") == {"dog", "cat"}
    assert kinds("a hot dog and a teddy bear on a table") == set()  # food and a toy, not a dog or a bear
    assert kinds("a jet ski on the lake") == set()
    assert kinds("a plate of food on a table") == set()


def test_plural_forms() -> None:
    assert [plural(w) for w in ("man", "bus", "puppy", "toy", "sheep", "cat")] == [
        "men",
        "buses",
        "puppies",
        "toys",
        "sheep",
        "cats",
    ]


def test_every_word_belongs_to_one_kind() -> None:
    seen: dict[str, str] = {}
    for kinds_ in CATEGORIES.values():
        for kind, words in kinds_.items():
            for w in words:
                assert w not in seen, f"{w!r} is both {seen[w]} and {kind}"
                seen[w] = kind
    assert word_kinds()["women"] == ("person", "person")


def test_invented_kinds() -> None:
    refs = [kinds_named("a cat sleeps on a sofa".split()), kinds_named("an animal on the couch".split())]
    assert invented(kinds_named("a man with a dog".split()), refs) == {("person", "person"), ("animal", "dog")}
    assert invented(kinds_named("a kitten on a sofa".split()), refs) == set()
    assert invented(kinds_named("an animal on a sofa".split()), refs) == set()  # any animal grounds "animal"
    # a reference's generic word grounds a species the others leave unnamed
    assert invented({("animal", "horse")}, [{("animal", "animal")}]) == set()
    assert invented({("vehicle", "vehicle")}, [{("animal", "cat")}]) == {("vehicle", "vehicle")}


def test_hallucination_figures() -> None:
    refs = {
        1: ["A cat sits on a chair.", "A kitten on a chair."],  # no person
        2: ["A man rides a bike.", "A person on a bicycle."],
        3: ["A plate of pasta.", "Food on a plate."],  # no person
        4: ["A dog runs.", "A puppy in the grass."],  # no person
    }
    cands = {
        1: "a man sitting on a chair",  # invents a person
        2: "a man riding a bicycle",  # fine
        3: "a dog and a car",  # invents a dog and a car
        4: "a dog in the grass",  # fine
    }
    h = hallucination(*normalize_corpus(refs, cands))
    assert h["hallucinated"] == pytest.approx(2 / 4)
    assert h["hallucinated_mentions"] == pytest.approx(3 / 6)  # person | person, bicycle | dog, car | dog
    assert h["person_free_photos"] == 3
    assert h["person_invented"] == pytest.approx(1 / 3)
    assert h["animal_invented"] == pytest.approx(1 / 4)
    assert h["vehicle_invented"] == pytest.approx(1 / 4)
    report = evaluate(refs, cands, use_meteor=False)
    assert report["person_invented"] == pytest.approx(1 / 3)


def test_no_person_free_photos() -> None:
    h = hallucination(*normalize_corpus({1: ["a man"]}, {1: "a woman"}))
    assert h["person_invented"] is None and h["hallucinated"] == 0.0


def test_imagenet_classes_name_the_examples() -> None:
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[281]["label"] == "tabby" and "cat" in classes[281]["words"]
    assert "coffee" in classes[967]["words"]  # espresso
    assert "bus" in classes[779]["words"]  # school bus
    assert "dog" in classes[207]["words"]  # golden retriever
    assert all(set(c) == {"wnid", "label", "words"} for c in classes)


@pytest.mark.slow
def test_imagenet_table_is_what_the_script_makes(tmp_path: Path) -> None:
    from captioner.metrics import _nltk_wordnet

    if _nltk_wordnet() is None:
        pytest.skip("WordNet is not installed here (Debian wordnet-base): cannot regenerate the table")
    out = tmp_path / "imagenet_words.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_imagenet_words.py"), "--out", str(out)], check=True)
    shipped = json.loads((ROOT / "captioner" / "resources" / "imagenet_words.json").read_text())
    assert json.loads(out.read_text()) == shipped


def test_score_reports_hallucination(tmp_path: Path, capsys) -> None:
    from captioner.cli import main

    refs = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A cat on a sofa."},
            {"id": 2, "image_id": 2, "caption": "A man rides a horse."},
        ],
    }
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    results = [{"image_id": 1, "caption": "a woman on a sofa"}, {"image_id": 2, "caption": "a man on a horse"}]
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert main(["score", "--results", str(tmp_path / "res.json"), "--annotations", str(tmp_path / "refs.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["person_invented"] == 1.0 and report["person_free_photos"] == 1
    assert report["hallucinated"] == 0.5
