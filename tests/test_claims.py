"""The bundled model's published figures, recomputed (the slow tier; one fast test of the parsing).

README.md, assets/MODEL_CARD.md and docs/ print what the bundled model scores on Flickr8k val,
coco_256 and coco_dev: caption metrics, object naming, invented people and objects, and how its
confidence tracks quality. Each figure is parsed out of the text (so an edit to the text, or a
change to the model or its decoding, that makes them disagree fails here) and recomputed the way
the docs say it was made: `captioner evaluate --annotations A --images I --train-annotations
F/captions_train.json` (the same calls, in process: the photos are encoded once, through the
feature cache, and decoded once per setting), guidance off with every part of it off.

Tolerance: decoding is deterministic on CPU, so a figure must round to what is printed; the
allowance is one unit in the last printed digit (±0.001 for "0.517", ±0.1 point for "14.7 %",
±0.01 for the calibration fifths' "0.15"): half of it is the rounding, the other half room for a
near-tie beam that another CPU's float rounding could flip. Counts (photos, distinct captions,
words used) are exact. METEOR is compared only where the official METEOR 1.5 runs (Java and
pycocoevalcap), since the figures are its.

Cost (2 cores): about 90 s, most of it encoding the 1,541 photos (~40 s, paid every run: the
session's feature cache is new) and decoding them (~40 s). The Flickr8k val figures with the
guidance off (the model card's "guidance off" row, the guidance table's val "off" row) need
another 1,000-photo decode, about 20 s more: checked with CAPTIONER_CHECK_ALL_CLAIMS=1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from .conftest import REPO

DATA = REPO.parent / "shared" / "data"
FLICKR8K = DATA / "flickr8k"
TRAIN_ANNOTATIONS = FLICKR8K / "captions_train.json"
SETS = {  # name as the docs print it: (annotations, images)
    "Flickr8k val": (FLICKR8K / "captions_val.json", FLICKR8K / "images"),
    "coco_256": (DATA / "coco_256" / "captions.json", DATA / "coco_256" / "images"),
    "coco_dev": (DATA / "coco_dev" / "captions.json", DATA / "coco_dev" / "images"),
}
# "Guidance off": the docs' guidance-off figures were measured before the constrained search
# (part of the guidance since) was on by default, so off means all of it off.
GUIDANCE_OFF = {"suppress_unseen": 0, "tag_subject": 0, "constrain": 0}
OFF_SETS = ("Flickr8k val", "coco_dev")  # the sets the docs give guidance-off figures for
ALL = os.environ.get("CAPTIONER_CHECK_ALL_CLAIMS") == "1"  # also val with the guidance off (~20 s more)
STEP = 256  # evaluation.caption_features' chunk: the captions `captioner evaluate` writes

README = REPO / "README.md"
MODEL_CARD = REPO / "assets" / "MODEL_CARD.md"
OUTSIDE = REPO / "docs" / "outside-flickr8k.md"
BUNDLED = REPO / "docs" / "bundled-model.md"
SOURCES = ("README", "MODEL_CARD", "docs/outside-flickr8k.md", "docs/bundled-model.md")

# a table column's header -> the measured figure it prints (`captioner evaluate`'s keys, plus a few)
COLUMNS = {
    "BLEU-1": "BLEU-1",
    "BLEU-2": "BLEU-2",
    "BLEU-3": "BLEU-3",
    "BLEU-4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE-L": "ROUGE-L",
    "CIDEr-D": "CIDEr-D",
    "object recall": "object_recall",
    "novel object recall": "novel_object_recall",
    "object precision": "object_precision",
    "captions inventing an object": "object_invented",
    "captions inventing a kind (CHAIR-s)": "hallucinated",
    "captions inventing a person/animal/vehicle (CHAIR-s)": "hallucinated",
    "person-free photos given a person": "person_invented",
    "photos with a person whose caption names one": "person_named",
    "distinct captions / words used": "distinct_captions / words_used",
    "confidence: mean (share acceptable)": "confidence_mean (acceptable)",
    "captions": "images",
    "acceptable (CIDEr-D ≥ 0.5)": "acceptable",
    "mean confidence": "confidence_mean",
    "by confidence fifth: mean confidence → share acceptable": "fifths",
}
COUNTS = {"images", "distinct_captions", "words_used", "person_free_photos", "person_photos"}
NUMBER = re.compile(r"\d+(?:\.\d+)?")


# ---- what the docs claim -------------------------------------------------------------------------
def tables(path: Path) -> list[list[list[str]]]:
    """The Markdown tables of a file: rows of cells (bold marks dropped), the header row first."""
    out: list[list[list[str]]] = []
    previous = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                out.append([])
            if not set(line) <= set("|-: "):
                out[-1].append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
        previous = line
    return out


def row(path: Path, header: tuple[str, ...], columns: dict[str, str]) -> dict[str, str]:
    """{column header: cell} of the row that has `columns` ({column: text}; a cell matches its
    text, or its text and a parenthesis: "coco_256 (442)"), in the table whose header starts with
    `header`, without the matched cells; fails when the docs lost it (a figure cannot vanish)."""
    for table in tables(path):
        if tuple(table[0][: len(header)]) == header:
            for cells in table[1:]:
                entry = dict(zip(table[0], cells))
                if all(entry.get(k, "") == v or entry.get(k, "").startswith(v + " (") for k, v in columns.items()):
                    return {k: v for k, v in entry.items() if k not in columns}
    raise AssertionError(f"{path.relative_to(REPO)}: no table {header} with a row {columns}")


def numbers(cell: str) -> list[tuple[float, float]]:
    """The figures in a cell, each as (value, allowance): "14.7 %" -> (0.147, 0.001)."""
    out = []
    for m in NUMBER.finditer(cell):
        text = m.group()
        unit = 10.0 ** -len(text.partition(".")[2])
        percent = cell[m.end() :].lstrip().startswith("%")
        out.append((float(text) / 100, unit / 100) if percent else (float(text), unit))
    return out


def claims_of(source: str, cells: dict[str, str], where: tuple[str, str]) -> list[tuple]:
    """(source, set, setting, figure, value, allowance) for each cell of a row that prints a figure;
    "6.8 % of 219" also claims the count (person-free photos; photos with a person)."""
    out = []
    for header, cell in cells.items():
        key = COLUMNS.get(header)
        if not numbers(cell):
            continue  # labels, "not measured", "—"
        if header.startswith("of ") and "person-free" in header:  # "of 56 person-free photos, given a person"
            key, cell = "person_invented", f"{cell} of {numbers(header)[0][0]:g}"
        elif header.startswith("of ") and "with a person" in header:  # "of 37 photos with a person, ..."
            key, cell = "person_named", f"{cell} of {numbers(header)[0][0]:g}"
        if key is None:
            continue
        values = numbers(cell)
        if key == "fifths":
            figures = [("fifth confidence", 1), ("fifth acceptable", 1)] * 5
            keys = [f"{name} {i // 2 + 1}" for i, (name, _) in enumerate(figures)]
        elif " (" in key or " / " in key:
            keys = re.split(r" \(| / ", key.rstrip(")"))
        elif " of " in cell:
            keys = [key, "person_free_photos" if key == "person_invented" else "person_photos"]
        else:
            keys = [key]
        assert len(keys) == len(values), (source, where, header, cell)
        out += [(source, *where, k, v, 0.0 if k in COUNTS else tol) for k, (v, tol) in zip(keys, values)]
    return out


def published() -> list[tuple]:
    """Every figure the docs print for the bundled model as it ships, and for it with guidance off:
    (source, set, setting, figure, value, allowance)."""
    out = []
    text = _text(README)
    m = re.search(r"val CIDEr-D (\S+) and BLEU-4 (\S+) on Flickr8k", text)
    assert m, "README: the Flickr8k val figures moved"
    out += claims_of("README", {"CIDEr-D": m[1], "BLEU-4": m[2]}, ("Flickr8k val", "default"))
    m = re.search(r"coco_dev CIDEr-D (\d\S*\d)", text)
    assert m, "README: the coco_dev figure moved"
    out += claims_of("README", {"CIDEr-D": m[1]}, ("coco_dev", "default"))

    card = "MODEL_CARD"
    for name in SETS:  # naming objects: this release; "coco_256 (442)" also claims the photo count
        cells = row(MODEL_CARD, ("set", "release", "CIDEr-D"), {"set": name, "release": "this"})
        size = re.search(rf"\| {name} \((\d+)\) \|", MODEL_CARD.read_text(encoding="utf-8"))
        out += claims_of(card, cells | ({"captions": size[1]} if size else {}), (name, "default"))
    for label, setting in (("this release", "default"), ("guidance off", "off")):  # out of domain: coco_dev
        cells = row(MODEL_CARD, ("", "CIDEr-D"), {"": label})
        out += claims_of(card, cells, ("coco_dev", setting))
    cells = row(MODEL_CARD, ("model", "BLEU-1"), {"model": "the same file, guidance off"})  # validation scores
    out += claims_of(card, cells, ("Flickr8k val", "off"))

    page = "docs/outside-flickr8k.md"
    for name in SETS:  # before/after the constrained search: "after" is the shipped decoding
        cells = row(OUTSIDE, ("set", "decoding", "BLEU-4"), {"set": name, "decoding": "after"})
        out += claims_of(page, cells, (name, "default"))
    for name in OFF_SETS:  # guidance off ("on" there is the release that brought the guidance, as it says)
        cells = row(OUTSIDE, ("set", "guidance", "BLEU-4"), {"set": name, "guidance": "off"})
        out += claims_of(page, cells, (name, "off"))
    for name in ("Flickr8k val", "coco_dev"):  # confidence against measured quality
        cells = row(OUTSIDE, ("set", "captions", "acceptable (CIDEr-D ≥ 0.5)"), {"set": name})
        out += claims_of(page, cells, (name, "default"))

    page = "docs/bundled-model.md"  # "measured 2026-12-07: BLEU-4 0.206, METEOR 0.203, ..., 352 words used"
    pattern = r"measured [\d-]+: BLEU-4 (\S+), METEOR (\S+), ROUGE-L (\S+), CIDEr-D (\S+), (\d+) words used"
    m = re.search(pattern, _text(BUNDLED))
    assert m, f"{page}: the reproduced figures moved"
    cells = {"BLEU-4": m[1], "METEOR": m[2], "ROUGE-L": m[3], "CIDEr-D": m[4]}
    out += claims_of(page, cells, ("Flickr8k val", "default"))
    out.append((page, "Flickr8k val", "default", "words_used", float(m[5]), 0.0))
    return out


def _text(path: Path) -> str:
    """A file's text with its line breaks and runs of spaces as single spaces."""
    return " ".join(path.read_text(encoding="utf-8").split())


# ---- what the bundled model measures ---------------------------------------------------------------
def person_named(refs: dict, results: dict) -> dict[str, float]:
    """Of the photos most of whose references name a person (calibration.person_labels), the share
    whose caption names one, and how many such photos."""
    from captioner.calibration import person_labels
    from captioner.concepts import kinds_named
    from captioner.metrics import normalize

    keys = list(results)
    labels = person_labels([refs[k] for k in keys]).bool().tolist()
    with_person = [k for k, has in zip(keys, labels) if has]
    named = [any(c == "person" for c, _ in kinds_named(normalize(results[k]))) for k in with_person]
    return {"person_named": sum(named) / len(named), "person_photos": len(named)}


def confidence_figures(confidence: torch.Tensor, quality: torch.Tensor) -> dict[str, float]:
    """Mean confidence, share acceptable, and each confidence fifth's mean confidence and share acceptable."""
    from captioner.calibration import reliability
    from captioner.guidance import ACCEPTABLE

    out = {
        "images": len(quality),
        "confidence_mean": confidence.mean().item(),
        "acceptable": (quality >= ACCEPTABLE).float().mean().item(),
    }
    for i, b in enumerate(reliability(confidence, quality, bins=5), start=1):
        out[f"fifth confidence {i}"], out[f"fifth acceptable {i}"] = b["confidence"], b["acceptable"]
    return out


def cross_validated(model, pooled: torch.Tensor, captions: list, quality: torch.Tensor) -> torch.Tensor:
    """The val confidence as `captioner calibrate` reports it (calibration.calibrate): the confidence
    regression fitted on four fifths of the val captions, applied to the fifth held out, times the
    photo's familiarity. The photo state it needs (person classifier, typicality) is the model's."""
    from captioner.calibration import fit_confidence

    probs = model.imagenet_probs(pooled)
    caps = [[(c.text, c.score, len(c.words))] for c in captions]
    x = torch.stack([torch.from_numpy(r[0]) for r in model.guidance.confidence_features(pooled, probs, caps)])
    folds = torch.arange(len(x)) % 5
    held_out = torch.empty(len(x))
    for f in range(5):
        part = fit_confidence(x[folds != f], quality[folds != f])
        held_out[folds == f] = torch.sigmoid(x[folds == f] @ part["confidence_weight"] + part["confidence_bias"])
    return held_out * torch.from_numpy(model.guidance.familiarity(pooled))


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, str], dict[str, float]]:
    """{(set, "default" | "off"): figures} for the bundled model on CPU, as `captioner evaluate
    --annotations A --images I --train-annotations F/captions_train.json [guidance off]` computes
    them, plus the person-naming and confidence figures the docs print."""
    for path in (TRAIN_ANNOTATIONS, *(p for pair in SETS.values() for p in pair)):
        if not path.exists():
            pytest.skip(f"{path} not found: the published figures are measured on it")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAPTIONER_METEOR", raising=False)  # the machine's METEOR, as a user's (conftest turns it off)
        return measure()


def measure() -> dict[tuple[str, str], dict[str, float]]:
    """See `measured`: one model, each set's photos encoded once, decoded once per setting."""
    from captioner import Captioner
    from captioner.calibration import caption_quality
    from captioner.cli import build_parser
    from captioner.cli.common import decoding
    from captioner.data import load_coco
    from captioner.evaluation import references, score, training_novel_kinds
    from captioner.metrics import meteor_backend

    novel = training_novel_kinds(TRAIN_ANNOTATIONS)
    official_meteor = meteor_backend() == "official-1.5"
    model = Captioner.load(device="cpu")
    # what `captioner evaluate` decodes with when given no decoding flag: the model's defaults, as here
    args = build_parser().parse_args(["evaluate", "--annotations", "A", "--images", "I"])
    assert decoding(model, args) == model.resolve_decoding()
    cache = model.feature_cache()  # the session's private cache (conftest): the photos are encoded here
    out = {}
    for name, (captions_file, images) in SETS.items():
        corpus = load_coco(captions_file, images)
        feats, kept, failed = model.corpus_inputs(corpus, cache)
        assert not failed, failed[:3]
        refs, ids = references(corpus), [corpus.image_ids[k] for k in kept]
        for setting in ("default", "off") if name == "coco_dev" or (ALL and name in OFF_SETS) else ("default",):
            opts = GUIDANCE_OFF if setting == "off" else {}
            captions = [hs[0] for s in range(0, len(ids), STEP) for hs in model.decode(feats[s : s + STEP], **opts)]
            results = dict(zip(ids, (c.text for c in captions)))
            figures = score(refs, results, use_meteor=official_meteor, novel=novel) | person_named(refs, results)
            if setting == "default" and name in ("Flickr8k val", "coco_dev"):
                quality = caption_quality(refs, results)
                quality = torch.tensor([quality[k] for k in ids])
                if name == "coco_dev":  # the shipped confidence: fitted on val only, never on this set
                    confidence = torch.tensor([c.confidence for c in captions])
                else:
                    pooled = torch.cat([model.pooled(feats[s : s + STEP]).cpu() for s in range(0, len(ids), STEP)])
                    confidence = cross_validated(model, pooled, captions, quality)
                figures |= confidence_figures(confidence, quality)
            out[(name, setting)] = figures
    return out


def check(source: str, measured: dict) -> None:
    """Every figure `source` prints, against what was measured (see the module docstring)."""
    claims = [c for c in published() if c[0] == source]
    assert claims, f"{source}: no figures found"
    wrong = []
    for _, name, setting, key, value, allowance in claims:
        if (name, setting) not in measured:
            assert not ALL and (name, setting) == ("Flickr8k val", "off"), (name, setting)
            continue  # the one costly set of figures left to CAPTIONER_CHECK_ALL_CLAIMS=1
        got = measured[(name, setting)].get(key)
        if got is None and key == "METEOR":
            continue  # no official METEOR on this machine: the one comparison left out
        if got is None or abs(got - value) > allowance + 1e-9:
            guidance = "off" if setting == "off" else "on"
            wrong.append(f"{name}, guidance {guidance}: {key} {got} against {value} ± {allowance}")
    assert not wrong, f"{source} prints figures the bundled model does not give:\n" + "\n".join(wrong)


def test_every_figure_the_docs_print_is_found() -> None:
    """Fast, no data: the parsing still finds each source's figures, and each is one that is measured."""
    claims = published()
    assert {c[0] for c in claims} == set(SOURCES)
    figures = {k for c in COLUMNS.values() for k in re.split(r" \(| / ", c.rstrip(")"))} | COUNTS
    for source, name, setting, key, *_ in claims:
        assert name in SETS and (setting == "default" or name in OFF_SETS), (source, name, setting)
        assert key in figures or re.fullmatch(r"fifth (confidence|acceptable) [1-5]", key), (source, key)


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_published_figures_are_what_the_bundled_model_measures(source, measured) -> None:
    check(source, measured)
