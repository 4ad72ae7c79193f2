"""`captioner validate-data` on images and captions: the quick image check refuses what training's
loader refuses (and only that), with the same reasons, in the same order with any number of
worker processes; the "no words" check agrees with the tokenizer."""

from __future__ import annotations

import io
import json
import os
import random
import re
import string
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli import main
from captioner.errors import ImageError
from captioner.images import check_image, load_image
from captioner.vocab import has_words, tokenize
from tests.conftest import REPO
from tests.helpers.messy_captions import SEEDS, messy

MAX_PIXELS = 4_500_000


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """A picture whose entropy-coded data is long, so a cut or a bad byte lands inside it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _spliced(data: bytes, at: float, new: bytes) -> bytes:
    i = int(len(data) * at)
    return data[:i] + new + data[i + len(new) :]


@cache
def _good() -> dict[str, bytes]:
    mpo = io.BytesIO()
    _noise(60, 40, 10).save(mpo, "MPO", save_all=True, append_images=[_noise(60, 40, 11)])
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated
    rgba = Image.new("RGBA", (40, 30), (200, 10, 10, 128))
    return {
        "photo.jpg": _jpeg(_noise(128, 96)),
        "progressive.jpg": _jpeg(_noise(120, 80, 1), progressive=True),
        "grey.jpg": _jpeg(_noise(64, 48, 2).convert("L")),
        "cmyk.jpg": _jpeg(Image.new("CMYK", (33, 17), (10, 20, 30, 40))),
        "rotated.jpg": _jpeg(_noise(50, 20, 3), exif=exif),
        "tiny.jpg": _jpeg(_noise(3, 2, 4)),  # smaller than 8 pixels: still decodes at its smallest
        "large.jpg": _jpeg(Image.new("RGB", (2100, 2050), (0, 90, 200))),  # training draft-decodes it too
        "two-pictures.mpo": mpo.getvalue(),
        "alpha.png": _png(rgba),
        "sixteen.png": _png(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),
        "named-png-but.jpg": _png(_noise(20, 20, 5)),  # the format is read from the content
        "palette.gif": _png(_noise(20, 20, 6).convert("P")),
        "zeroed-middle.jpg": _spliced(_jpeg(_noise(128, 96, 7)), 0.5, bytes(300)),  # libjpeg only warns
    }


@cache
def _bad() -> dict[str, bytes]:
    jpg, png = _jpeg(_noise(128, 96, 8)), _png(_noise(64, 64, 9))
    return {
        "truncated.jpg": jpg[: len(jpg) // 2],
        "no-end-marker.jpg": jpg[:-2],
        "corrupt-middle.jpg": _spliced(jpg, 0.5, b"\xff" * 64),  # a run of marker bytes in the scan
        "second-header.jpg": _spliced(jpg, 0.6, b"\xff\xd8"),
        "truncated.mpo": _good()["two-pictures.mpo"][:500],
        "truncated.png": png[: len(png) // 2],
        "corrupt.png": _spliced(png, 0.5, bytes(100)),
        "text.jpg": b"not an image at all\n",
        "empty.jpg": b"",
        "bomb.png": _png(Image.new("L", (2200, 2100))),  # 4.6 megapixels, over MAX_PIXELS
        "bomb.jpg": _jpeg(Image.new("RGB", (2100, 2200))),
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for name, data in {**_good(), **_bad()}.items():
        (d / name).write_bytes(data)
    (d / "a-folder.jpg").mkdir()
    return d


def _reason(f, *args, **kw) -> str | None:
    try:
        f(*args, **kw)
    except ImageError as e:
        return e.reason
    return None


def test_check_image_refuses_exactly_what_load_image_refuses_with_its_reasons(folder):
    for name in sorted({*_good(), *_bad(), "a-folder.jpg", "missing.jpg"}):
        p = folder / name
        expected = _reason(load_image, p, MAX_PIXELS)
        assert (expected is None) == (name in _good()), (name, expected)
        assert _reason(check_image, p, MAX_PIXELS) == expected, name
        assert _reason(check_image, str(p), MAX_PIXELS, full=True) == expected, name
    assert _reason(check_image, folder / "missing.jpg") == "no such file"
    assert "over the limit of 4,500,000" in _reason(check_image, folder / "bomb.jpg", MAX_PIXELS)
    assert _reason(check_image, folder / "bomb.jpg") is None  # under the default limit
    assert "truncated" in _reason(check_image, folder / "truncated.jpg")
    assert "truncated" in _reason(check_image, folder / "truncated.png")
    assert _reason(check_image, folder / "text.jpg").startswith("not an image")


def test_a_truncated_or_corrupted_real_photo_fails_the_quick_check_as_training(tmp_path):
    photos = sorted((REPO.parent / "shared" / "data" / "coco_dev" / "images").glob("*.jpg"))[:4]
    if not photos:
        pytest.skip("../shared/data/coco_dev is not here")
    rng = random.Random(0)
    for k, photo in enumerate(photos):
        data = photo.read_bytes()
        for j in range(10):
            x = bytearray(data[: rng.randrange(1000, len(data))] if j % 2 else data)
            for _ in range(0 if j % 2 else 16):  # every other one: bytes overwritten in the scan
                x[rng.randrange(len(x) // 4, len(x) - 4)] = rng.randrange(256)
            p = tmp_path / f"{k}-{j}.jpg"
            p.write_bytes(bytes(x))
            assert _reason(check_image, p) == _reason(load_image, p), p.name


def _dataset(tmp_path: Path, folder: Path, names: set[str], copies: int = 16) -> tuple[Path, list[str]]:
    """These files, then enough links to good ones that the images go to the workers in several
    chunks; ids in an order unlike the names'. Also the file names in the report's order."""
    names = sorted(names)
    for n in range(copies * len(_good())):
        os.link(folder / sorted(_good())[n % len(_good())], folder / f"link{n:03}.jpg")
    names += [f"link{n:03}.jpg" for n in range(copies * len(_good()))]
    random.Random(1).shuffle(names)
    images = [{"id": i + 1, "file_name": name} for i, name in enumerate(names)]
    anns = [{"id": i, "image_id": i + 1, "caption": f"picture number {i}"} for i in range(len(names))]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, [im["file_name"] for im in sorted(images, key=lambda im: str(im["id"]))]


def _validate(capsys, path: Path, folder: Path, *flags: str) -> tuple[int, str]:
    argv = ["validate-data", "--annotations", str(path), "--images", str(folder), "--show", "100"]
    code = main([*argv, "--max-pixels", str(MAX_PIXELS), "--quiet", *flags])
    return code, capsys.readouterr().out


def test_the_report_names_every_bad_image_in_order_with_any_number_of_workers(tmp_path, folder, capsys):
    path, in_order = _dataset(tmp_path, folder, {*_good(), *_bad(), "a-folder.jpg", "missing.jpg"})
    assert len(in_order) > 200  # more than a few chunks of images per worker
    code, out = _validate(capsys, path, folder, "--workers", "2")
    assert code == 1
    unreadable = [n for n in in_order if n in _bad() or n == "a-folder.jpg"]
    first, *kinds, last = out.splitlines()
    assert first == f"{path}: {len(in_order)} images, {len(in_order)} captions"
    assert len(kinds) == 2 and last.startswith("problems found")
    assert "  1 missing image files: missing.jpg (no such file)" in kinds
    (line,) = [k for k in kinds if k.startswith(f"  {len(unreadable)} unreadable images: ")]
    assert re.findall(r"(?:: |, )([\w.-]+\.(?:jpg|png|gif|mpo)) \(", line) == unreadable
    assert "bomb.png (declares 2200x2100 = 4,620,000 pixels, over the limit" in line
    assert "truncated.jpg (unreadable image (image file is truncated" in line
    assert "text.jpg (not an image" in line and "a-folder.jpg (is a directory" in line
    for flags in (["--workers", "1"], ["--workers", "0"], ["--decode", "full"], ["--decode", "full", "--workers", "0"]):
        assert _validate(capsys, path, folder, *flags) == (1, out), flags


def test_good_images_pass(tmp_path, folder, capsys):
    path, _ = _dataset(tmp_path, folder, set(_good()), copies=1)
    for flags in ([], ["--workers", "2"], ["--decode", "full"]):
        code, out = _validate(capsys, path, folder, *flags)
        assert (code, out.splitlines()[-1]) == (0, "ok"), (flags, out)


def test_workers_and_decode_are_checked_at_the_door(tmp_path, capsys):
    argv = ["validate-data", "--annotations", str(tmp_path / "none.json"), "--images", str(tmp_path)]
    assert main([*argv, "--workers", "-1"]) == 2
    assert "--workers must be a whole number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--decode", "half"])


# ---- captions with no words ----------------------------------------------------------------

TRICKY = [
    "&mdash;",
    "&ndash; &MD;",
    "&amp;",
    "a&mdash;b",
    "AT&T",
    "Q&amp;A",
    "<! -LRB- >",
    "<a -lrb- b>",
    "<br>",
    "-LRB-",
    "( [ { } ] )",
    "cannot",
    "gonna",
    "'tis",
    "n't",
    "'s",
    ":D",
    ":(",
    "... -- !!",
    "3 1/2",
    "(555) 123-4567",
    "Mr.",
    "U.S.",
    "etc.",
    "…",
    "— – ―",
    "😀",
    "¢ ½",
    "猫",
    "é",
    "١٢٣",
    "",
    " ",
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [*TRICKY, *string.printable, "-", "'", "`", "&", ";", "<", ">", "mdash", "amp", "lrb", "RRB", "\u00a0"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 7))) for _ in range(n)]


def _shared_captions() -> list[str]:
    out = []
    data = REPO.parent / "shared" / "data"
    for f in sorted(data.glob("*/captions*.json")) if data.is_dir() else []:
        out += [a["caption"] for a in json.loads(f.read_text(encoding="utf-8"))["annotations"]]
    return out


def test_has_words_is_whether_tokenize_finds_a_word():
    rng = random.Random(2)
    texts = TRICKY + _fuzz(20_000) + [messy(s, SEEDS, rng) for s in SEEDS * 20]
    mismatched = [t for t in texts if has_words(t) != bool(tokenize(t))]
    assert not mismatched
    assert not has_words("&mdash;") and not has_words("<! -LRB- >") and has_words("cannot")
    assert not any(has_words(t) for t in ("", " ", "...", "( )", "😀"))


def test_has_words_agrees_with_tokenize_on_every_shared_caption():
    captions = _shared_captions()
    if not captions:
        pytest.skip("../shared/data is not here")
    assert [c for c in captions if has_words(c) != bool(tokenize(c))] == []
