"""n-best never changes the headline caption (issue 27, item 5), and `captioner caption`'s tags,
omitted captions and ensembles (item 8), with the bundled model and the example photos."""

import json

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.cli.caption import MAX_TAGS
from captioner.guidance import TAGS_KEPT, Tag
from captioner.paths import BUNDLED_MODEL
from captioner.pipeline import Caption, caption_record

from .conftest import REPO

EXAMPLES = REPO / "assets" / "examples"
DOG = EXAMPLES / "dog.png"  # the photo: "a dog in the snow" became "a dog jumps in the snow" at n_best=4
# coffee: its caption comes from the constrained search; grace_hopper: the wider beam's best differs at 6
PHOTOS = [DOG, EXAMPLES / "coffee.jpg", EXAMPLES / "grace_hopper.jpg"]
NS = range(1, 7)


@pytest.fixture(scope="module")
def bundled():
    return Captioner.load(device="cpu")


@pytest.fixture(scope="module")
def lists(bundled):
    """For each n, each photo's n-best Captions from `generate`."""
    return {n: list(bundled.generate(PHOTOS, n_best=n)) for n in NS}


@pytest.fixture
def cli(bundled, monkeypatch, capsys):
    """`captioner caption ARGS` with the loaded bundled model -> (exit status, stdout lines, stderr lines)."""
    monkeypatch.setattr(Captioner, "load", classmethod(lambda cls, *args, **kw: bundled))

    def run(*args):
        capsys.readouterr()
        rc = main(["caption", *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out.splitlines(), err.splitlines()

    return run


def test_the_bundled_model_beam_is_narrower_than_the_n_best_asked(bundled):
    assert bundled.decoding["beam_size"] == 3 and bundled.decoding["constrain"] > 0  # what the tests below need


def test_the_headline_caption_is_the_same_for_every_n_best(bundled, lists):
    headline = [r[0].text for r in lists[1]]
    assert bundled.caption(PHOTOS) == headline
    features = bundled.encode(torch.stack([bundled.prepare(p) for p in PHOTOS]))
    for n in NS:
        assert [r[0].text for r in lists[n]] == headline, n
        assert [r[0][0] for r in bundled.caption_nbest(PHOTOS, n=n)] == headline, n
        assert [r[0].text for r in bundled.decode(features, n_best=n)] == headline, n  # what the server calls


def test_n_best_lists_are_distinct_best_first_with_the_headline_first(bundled, lists):
    beam = bundled.decoding["beam_size"]
    for n in NS:
        for b, r in enumerate(lists[n]):
            texts = [c.text for c in r]
            assert len(texts) == n and len(set(texts)) == n, (n, texts)
            assert texts[0] == lists[1][b][0].text
            if n <= beam:  # the configured beam's own list: a longer one extends a shorter one
                assert texts == [c.text for c in lists[beam][b]][:n]
    for n in (beam + 1, beam + 3):  # the others: the best of a search n wide, the headline left out
        wide = list(bundled.generate(PHOTOS, beam_size=n, n_best=n))
        for r, w in zip(lists[n], wide):
            assert [c.text for c in r[1:]] == [c.text for c in w if c.text != r[0].text][: n - 1]
            assert all(c.tags == r[0].tags for c in r) and all(c.confidence is not None for c in r)
    for r in (lists[6][0], lists[6][2]):  # free search (no constraint): the others by falling score
        scores = [c.score for c in r[1:]]
        assert scores == sorted(scores, reverse=True)


def test_a_beam_given_by_the_caller_is_the_headline_s_beam(bundled):
    for beam, n in ((1, 2), (2, 5)):
        nbest = bundled.caption_nbest(DOG, n=n, beam_size=beam)
        assert len(nbest) == n and nbest[0][0] == bundled.caption(DOG, beam_size=beam)
        assert len({c for c, _ in nbest}) == n


def test_the_command_line_headline_is_the_same_for_every_n_best(bundled, lists, cli):
    headline = [r[0].text for r in lists[1]][:2]
    for n in NS:
        rc, lines, err = cli(*PHOTOS[:2], "--json", "--n-best", n)  # the dog, and a constrained caption
        assert rc == 0 and err == []
        recs = [json.loads(line) for line in lines]
        assert [r["caption"] for r in recs] == headline, n
        assert [[c["caption"] for c in r["nbest"]] for r in recs] == [[c.text for c in r] for r in lists[n][:2]]
    rc, lines, _ = cli(DOG, "--n-best", 5)
    assert rc == 0 and lines[0].split("\t")[1] == headline[0]


def test_tags_k_up_to_the_maximum(bundled, cli):
    assert MAX_TAGS == TAGS_KEPT  # one number (settings.py) for the CLI, the server and the captions
    greedy = ("--beam-size", 1)  # the tags do not depend on the search
    for k in (1, 5, 10, MAX_TAGS):
        rc, [line], err = cli(DOG, "--json", "--tags", k, *greedy)
        assert rc == 0 and err == []
        assert [t["label"] for t in json.loads(line)["tags"]] == [t.label for t in bundled.tags(DOG, k=k)]
    rc, [line], _ = cli(DOG, "--tags", 10, "--min-confidence", 0, *greedy)
    fields = line.split("\t")
    assert len(fields) == 3 and fields[2].startswith("tags: ") and len(fields[2].split(", ")) == 10
    rc, [line], _ = cli(DOG, "--json", *greedy)  # unset: 5 in JSON
    assert len(json.loads(line)["tags"]) == 5
    assert len(bundled.caption(DOG, return_tags=True)[1]) == 5


def test_tags_0_means_none_even_after_a_low_confidence_caption(cli):
    rc, [line], _ = cli(DOG, "--min-confidence", 1)  # every caption is below 1: marked low
    fields = line.split("\t")
    assert fields[2].startswith("(low confidence") and len(fields[3].split(", ")) == 3  # unset: 3 after a low one
    rc, [line], err = cli(DOG, "--min-confidence", 1, "--tags", 0)
    assert rc == 0 and err == [] and len(line.split("\t")) == 3 and "tags:" not in line
    rc, [line], _ = cli(DOG, "--json", "--tags", 0)
    assert "tags" not in json.loads(line)


@pytest.mark.parametrize("k", [MAX_TAGS + 1, 1000, -1])
def test_tags_beyond_the_maximum_are_refused_in_one_line(cli, k):
    rc, lines, err = cli(DOG, "--tags", k)
    assert rc == 2 and lines == [] and len(err) == 1 and f"--tags must be 0 to {MAX_TAGS}, not {k}" in err[0]


def test_omitted_captions_are_left_out_of_nbest_too(lists, cli):
    rc, [line], _ = cli(DOG, "--json", "--n-best", 3, "--min-confidence", 1, "--omit-low-confidence")
    rec = json.loads(line)
    assert rc == 0 and rec["caption"] is None and rec["low_confidence"] is True and rec["nbest"] == []
    assert len(rec["tags"]) == 5  # the tags still come
    rc, [line], _ = cli(DOG, "--json", "--n-best", 3, "--min-confidence", 1)  # marked, not omitted
    assert len(json.loads(line)["nbest"]) == 3
    # a mark between the captions' confidences: those below it go, the others stay (headline included)
    tags = (Tag("Eskimo dog", 0.3),)
    nbest = [Caption("a", -1.0, tags=tags, confidence=0.1), Caption("b", -2.0, tags=tags, confidence=0.5),
             Caption("c", -3.0, tags=tags, confidence=0.05)]  # fmt: skip
    rec = caption_record(nbest, 1, 0.2, omit_low=True)
    assert rec["caption"] is None and [c["caption"] for c in rec["nbest"]] == ["b"]
    rec = caption_record([nbest[1], nbest[0]], 1, 0.2, omit_low=True)
    assert rec["caption"] == "b" and rec["low_confidence"] is False and [c["caption"] for c in rec["nbest"]] == ["b"]
    assert [c["caption"] for c in caption_record(nbest, 1, 0.2)["nbest"]] == ["a", "b", "c"]


def test_an_ensemble_says_it_has_no_confidence_when_asked_for_one(capsys):
    pair = ["--model", BUNDLED_MODEL, "--model", BUNDLED_MODEL]
    for flags in (["--min-confidence", "0.5"], ["--omit-low-confidence"]):
        assert main(["caption", str(DOG), *map(str, pair), *flags]) == 0
        out, err = capsys.readouterr()
        assert len(out.splitlines()) == 1 and "(low confidence" not in out
        assert len(err.splitlines()) == 1 and "ensemble has no confidence" in err
    assert main(["caption", str(DOG), *map(str, pair)]) == 0  # the default mark, not asked for: no word
    assert capsys.readouterr().err == ""
