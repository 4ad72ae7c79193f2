"""coco_tokens' fast path (captioner/ptb.py `_fast_tokens`) gives exactly what the PTB scanner gives."""

import json
import random
import re
from pathlib import Path

import pytest

from captioner import ptb
from captioner._ptb_chars import RUNS
from captioner.ptb import _coco_tokens_slow, _fast_tokens, coco_tokens

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["coco_dev/captions.json", "coco_256/captions.json", "flickr8k/captions_train.json"]


def _captions(name: str) -> list[str]:
    path = SHARED_DATA / name
    if not path.parent.is_dir():
        pytest.skip(f"{path.parent} is not here")
    return [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]


def _check(caption: str, following: str) -> bool:
    """Fast path (when taken) == slow path, with and without `following`; True if it was taken."""
    fast = _fast_tokens(caption)
    if fast is None:
        return False
    assert fast == _coco_tokens_slow(caption, following), (caption, following)
    assert fast == coco_tokens(caption, following)
    if following:
        assert fast == _coco_tokens_slow(caption), caption
    return True


@pytest.mark.parametrize("name", FILES)
def test_fast_path_equals_slow_path_on_real_captions(name):
    caps = _captions(name)
    for k, c in enumerate(caps):  # captions not on the fast path go through the slow one unchanged
        _check(c, caps[k + 1] if k + 1 < len(caps) else "")


def test_most_real_captions_take_the_fast_path():
    caps = _captions(FILES[0]) + _captions(FILES[1])
    assert sum(_fast_tokens(c) is not None for c in caps) / len(caps) >= 0.9


def test_shapes_left_to_the_slow_path():
    words = [
        *ptb._ABBREV_LOWER_NEXT,
        *ptb._ABBREV_UPPER_NEXT,
        *ptb._ABBREV_CAPITALISED,
        *ptb._ABBREV_BEFORE_NUMBER,
        *"pty pte ptys ptes ppty pptes mfg mtg ph".split(),
        *"abcdefghijklmnopqrstuvwxyz",
    ]
    for w in words:
        for form in (w, w.upper(), w.capitalize()):
            assert _fast_tokens(f"A photo of {form}.") is None, form
            assert _fast_tokens(f"a walk-{form}. ") is None, form
            assert _fast_tokens(f"a photo of {form} .") == ["a", "photo", "of", form.lower()]  # period apart
    for c in ["He Cannot go", "a WANNA be", "wannabe", "a 2 b", "it'd", "dog's.", "a.b", "a,b", "x-", "a--b"]:
        assert _fast_tokens(c) is None, c
    assert _coco_tokens_slow("a dog,walk-in") == ["a", "dog,walk-in"]  # why a comma needs white space after it
    assert _fast_tokens(" A Man's walk-in closet ,\tnext to  a dog 's bed.\n") == [
        *"a man 's walk-in closet next to a dog 's bed".split()
    ]


def _caption(rng: random.Random) -> str:
    """Mostly captions of (or near) the fast path's shape, each with a fair chance of something risky."""
    plain = ["dog", "A", "Man", "THE", "surfboard", "the", "on", "walk-in", "x-ray", "a-b", "man's", "MAN'S", "'s"]
    plain += ["o's", "y's", "th's", "d-o", "The", "He", "In", "Once", "b", "I", "e", "s", "n", "t", "www", "No"]
    plain += [rng.choice(ptb._ABBREV_LOWER_NEXT + ptb._ABBREV_UPPER_NEXT + ptb._ABBREV_CAPITALISED)]
    plain += [rng.choice(ptb._ABBREV_BEFORE_NUMBER), rng.choice(["pty", "Ptes", "pPtYS", "mfg", "MTG", "Ph"])]
    risky = ["don't", "can't", "'em", "'tis", "'90s", "d'or", "Cannot", "cannotx", "gonna", "Wanna", "gimme", "3"]
    risky += ["wannabe", "1,000", "2.5", "U.S", "c++", "AT&T", "and/or", "Ph.D", "e.g.", "x--y", "-", "_", "é", "🐶"]
    seps = [" "] * 6 + ["  ", "\t", "\n", ", ", " , ", " ,\t", ",\n", " ,  "]
    bad_seps = [",", ".", ". ", " . ", "-", "'", " '' ", '"', "...", "\r", "\u00a0", ";", " - "]
    risk = rng.random() < 0.5
    n = rng.randint(0, 8)
    out = rng.choice(["", "", " ", "\t", "\n"])
    for i in range(n):
        w = rng.choice(risky if risk and rng.random() < 0.2 else plain)
        out += rng.choice([w, w, w.lower(), w.upper(), w.capitalize()])
        if i + 1 < n:
            out += rng.choice(bad_seps if risk and rng.random() < 0.2 else seps)
    ends = ["", ".", ".", " .", ". ", ".\n", "\n", " ", "'s.", " 's ."]
    return out + rng.choice(ends + ([",", ",.", "...", "?", ". .", ". The"] if risk else []))


def test_fast_path_equals_slow_path_on_generated_captions():
    rng = random.Random(20240607)
    starts = ["", "The dog", "5 dogs", ", a", ". . .", "...", "A b", "Mr. x", "'s", "-x", "@x.com", "1/2", "b.", "\n"]
    taken = 0
    for _ in range(4000):
        c = _caption(rng)
        f = rng.choice([*starts, _caption(rng)])
        taken += _check(c, f)
    assert taken >= 1000  # the generator exercises the fast path, not only the slow one


def test_plain_captions_never_reach_the_scanner(monkeypatch):
    """The fast path is what makes tokenising a large set cheap: captions of its shape skip the scanner."""
    plain = {
        "A dog runs.": "a dog runs",
        "a man's hat, a dog 's bed": "a man 's hat a dog 's bed",
        " Two dogs ,\ta cat\nand a bird . ": "two dogs a cat and a bird",
        "A walk-in closet.": "a walk-in closet",
        "plan b": "plan b",  # a single letter keeps no period it has not got
        "a sign for mr": "a sign for mr",
        "": "",
    }
    for caption, want in plain.items():
        assert _fast_tokens(caption) == want.split() == _coco_tokens_slow(caption), caption

    def scanner(*a):
        raise AssertionError("the scanner ran")

    monkeypatch.setattr(ptb, "_coco_tokens_slow", scanner)
    assert [coco_tokens(c, "The next") for c in plain] == [want.split() for want in plain.values()]


def test_a_period_that_may_stay_goes_to_the_slow_path_wherever_its_word_is():
    for caption in ["Mr.", "b.", "A jack-in-the-b.", "walk-in-etc.", "a walk-in-Mass.", "x-Ph."]:
        assert _fast_tokens(caption) is None, caption
    assert _fast_tokens("A jack-in-the-box.") == ["a", "jack-in-the-box"] == _coco_tokens_slow("A jack-in-the-box.")


def test_scanner_tables():
    runs = ptb._runs()  # RUNS: "first-lastK" in hex
    assert runs[:3] == [(0x80, 0x80, "S"), (0x81, 0x90, "D"), (0x91, 0x94, "S")] and len(runs) == len(RUNS.split())
    assert all(b < c for (_, b, _), (c, _, _) in zip(runs, runs[1:])) and all(a <= b for a, b, _ in runs)
    assert {k for *_, k in runs} == set("LSDH")
    letters = re.compile(f"[{ptb._ranges('L')}]")
    assert all(letters.fullmatch(c) for c in "éñøłжκ") and not any(letters.fullmatch(c) for c in "a½\x80\u2014")
    assert re.fullmatch(f"[{ptb._ranges('SD')}]+", "\x80\x81½") and not re.search(f"[{ptb._ranges('SD')}]", "é")
    digits = re.compile(f"[{ptb._digits()}]+")  # the non-ASCII decimal digits that the table calls letters
    assert digits.fullmatch("٠١٢٣٤٥٦٧٨٩०१२३४५६७८९") and not digits.search("X05é½²")


def test_the_next_caption_decides_an_initials_period():
    assert ptb.ptb_tokenize("Plan B.") == ["Plan", "B."]
    assert ptb.ptb_tokenize("Plan B.", "a next") == ["Plan", "B."]
    assert ptb.ptb_tokenize("Plan B.", "The end") == ["Plan", "B", "."]  # a new sentence starts
    assert ptb.ptb_tokenize("Plan B.", "The\nend") == ["Plan", "B", "."]
    assert ptb.ptb_tokenize("Plan B.", "T\u00adhe end") == ["Plan", "B."]  # the official one sees its soft hyphen
    assert ptb.ptb_tokenize("walk\u00adin\nnow") == ["walkin", "now"] and ptb._clean("a\nb\u00adc") == "a bc"
