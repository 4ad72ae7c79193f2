"""The torch-free twins in images.py give what the torch path gives: `Preprocess.to_array` the
same float32 values as `Preprocess.__call__` (bit for bit: torchvision's uint8 bicubic resize is
reproduced, not approximated with Pillow's, which differs by up to 2 levels), `array_to_rgb` the
same pixels and ImageErrors as `from_array`; and reading + preprocessing run with torch absent."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.images import ImageError, Preprocess, array_to_rgb, from_array, load_image, to_rgb
from captioner.paths import list_images

from .conftest import FLICKR8K, REPO

EXAMPLES = list_images(REPO / "assets" / "examples")
IMAGENET = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PREPROCESSES = [Preprocess(), IMAGENET, Preprocess(240, 240), Preprocess(100, 224)]  # the last pads: crop > resize


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random pixels: every weight and every clamp of the resize shows in them."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_same(pre: Preprocess, img, label) -> None:
    got = pre.to_array(img)
    want = pre(img if isinstance(img, Image.Image) else from_array(img)).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape == (3, pre.crop, pre.crop), label
    if not np.array_equal(got, want):  # say how far apart, in 8-bit levels, before failing
        std, mean = (np.asarray(v, np.float32)[:, None, None] for v in (pre.std, pre.mean))
        levels = np.abs(np.rint((got * std + mean) * 255) - np.rint((want * std + mean) * 255))
        pytest.fail(f"{label}: {int(levels.max())} levels apart at most, {np.mean(levels > 0):.4%} of values")


def test_the_examples_are_preprocessed_bit_for_bit_as_by_torchvision():
    assert len(EXAMPLES) >= 5
    for path in EXAMPLES:
        img = load_image(path)
        for pre in PREPROCESSES:
            _assert_same(pre, img, f"{path.name} {pre}")


ODD_SIZES = [(7, 5), (5, 7), (1, 1), (2, 900), (900, 3), (40, 700), (700, 40), (224, 224), (256, 256), (255, 257)]


@pytest.mark.parametrize("h,w", ODD_SIZES + [(1000, 1333)])
def test_odd_sizes_are_preprocessed_bit_for_bit_as_by_torchvision(h, w):
    """Tiny (enlarged), long strips, already the right size, and a large photo shrunk 4x."""
    a = _noise(h, w, seed=h * 10_000 + w)
    for pre in PREPROCESSES:
        _assert_same(pre, Image.fromarray(a), f"{w}x{h} PIL {pre}")
        _assert_same(pre, a, f"{w}x{h} array {pre}")


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "1", "I;16"])
def test_other_modes_are_preprocessed_as_to_rgb_gives_them(mode):
    rgba = np.concatenate([_noise(37, 53, seed=1), _noise(37, 53, seed=2)[..., :1]], axis=2)
    img = Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba, "RGBA")
    assert np.array_equal(Preprocess().to_array(img), Preprocess()(to_rgb(img)).numpy()), mode


def test_arrays_of_every_accepted_kind_are_preprocessed_as_from_array_gives_them():
    rng = np.random.default_rng(5)
    for x in (
        rng.random((40, 30)),  # grey-scale floats in [0, 1]
        rng.random((33, 47, 3)).astype(np.float16),
        rng.integers(0, 256, (33, 20), dtype=np.int64),
        rng.integers(0, 256, (9, 20, 3)).astype(np.uint16),
        np.asfortranarray(_noise(31, 29)),
        _noise(50, 60)[::2, ::-1],  # a strided, reversed view
    ):
        _assert_same(Preprocess(), x, f"{x.shape} {x.dtype}")


@pytest.mark.skipif(not (FLICKR8K / "images").is_dir(), reason="Flickr8k not present at ../shared/data")
@pytest.mark.slow  # reads real photos
def test_real_photos_are_preprocessed_bit_for_bit_as_by_torchvision():
    photos = sorted((FLICKR8K / "images").glob("*.jpg"))[:100]
    photos += sorted((FLICKR8K.parent / "coco_dev" / "images").glob("*.jpg"))[:50]  # full-size: shrunk, not enlarged
    for path in photos:
        img = load_image(path)
        for pre in (Preprocess(), IMAGENET):
            _assert_same(pre, img, path.name)


def _from_array_rgb(x: np.ndarray) -> np.ndarray:
    return from_array(x).permute(1, 2, 0).numpy()  # (H, W, 3)


def test_array_to_rgb_gives_from_arrays_pixels_in_a_new_array():
    rng = np.random.default_rng(7)
    read_only = _noise(6, 4)
    read_only.setflags(write=False)
    halves = np.array([[0.5, 1.5, 2.5, 254.5]]) / 255  # x 255 lands half-way: rounded to even, as torch
    for x in (
        _noise(6, 4),
        read_only,
        _noise(8, 9)[:, ::-1].transpose(1, 0, 2),
        _noise(5, 5)[..., 0],  # grey-scale
        rng.random((4, 7, 3)),
        rng.random((4, 7)).astype(np.float32),
        rng.random((3, 3, 3)).astype(np.float16),
        halves,
        np.full((2, 2), 1.0000000001),  # 1 once in float32, as from_array checks tensors
        rng.integers(0, 256, (4, 5, 3), dtype=np.int64),
        rng.integers(0, 128, (4, 5), dtype=np.int8),
        np.full((3, 2, 3), 255, np.uint32),
    ):
        got = array_to_rgb(x)
        assert got.dtype == np.uint8 and got.shape == x.shape[:2] + (3,) and got.flags.c_contiguous
        assert np.array_equal(got, _from_array_rgb(x)), (x.shape, x.dtype)
        assert not np.shares_memory(got, x) and got.flags.writeable
    assert array_to_rgb(halves)[0, :, 0].tolist() == [0, 2, 2, 254]


BAD_ARRAYS = {
    "4 channels": np.zeros((4, 4, 4), np.uint8),
    "1-D": np.zeros(5),
    "4-D": np.zeros((1, 4, 4, 3)),
    "bool": np.ones((3, 3, 3), bool),
    "complex": np.ones((3, 3), np.complex64),
    "object": np.ones((3, 3), object),
    "text": np.array([["a"]]),
    "no rows": np.zeros((0, 5, 3), np.uint8),
    "no columns": np.zeros((4, 0)),
    "NaN": np.full((2, 2), np.nan),
    "infinite": np.array([[0.5, np.inf]]),
    "beyond float32": np.full((2, 2, 3), 1e300),
    "0..255 floats": np.full((2, 2), 255.0),
    "negative floats": np.array([[-0.5, 0.5]]),
    "negative ints": np.full((2, 2, 3), -3, np.int8),
    "16-bit": np.full((2, 2), 40000, np.int32),
    "huge ints": np.full((2, 2, 3), 2**40),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_array_to_rgb_refuses_what_from_array_refuses_in_the_same_words(name):
    x = BAD_ARRAYS[name]
    with pytest.raises(ImageError) as mine:
        array_to_rgb(x)
    with pytest.raises(ImageError) as theirs:
        from_array(x)
    assert str(mine.value) == str(theirs.value), name
    assert mine.value.path == f"<numpy array {x.shape} {x.dtype}>"
    if x.ndim == 3 and x.shape[2] == 3 and x.dtype.kind in "fiu":  # a tensor of the same values: the same reason
        with pytest.raises(ImageError) as tensor:
            from_array(torch.from_numpy(x).permute(2, 0, 1))
        assert tensor.value.reason == mine.value.reason, name


def test_16_bit_arrays_within_0_255_are_read_and_beyond_it_refused():
    """torch has no min() for uint16: these crashed from_array before it checked arrays with numpy."""
    assert np.array_equal(_from_array_rgb(np.full((2, 2, 3), 200, np.uint16)), np.full((2, 2, 3), 200, np.uint8))
    with pytest.raises(ImageError, match="integer pixels must lie in 0..255; these span 300..300"):
        from_array(np.full((2, 2), 300, np.uint16))


TORCH_FREE = """
import json, sys
sys.modules['torch'] = None  # `import torch` now raises ImportError, as where it is not installed
sys.modules['torchvision'] = None
import numpy as np
import captioner.images as m

path, out = sys.argv[1], sys.argv[2]
data = open(path, 'rb').read()
img = m.load_image(path)
assert m.image_from_bytes(data, 'upload').size == img.size
assert m.decode_bytes(data, 'upload') > 0
pre = m.Preprocess.from_dict(m.Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to_dict())
x = pre.to_array(m.check_size(m.to_rgb(img), 'img'))
assert x.shape == (3, 224, 224) and x.dtype == np.float32
assert pre.to_array(m.array_to_rgb(np.asarray(img) / 255.0)).shape == (3, 224, 224)
try:
    pre(img)
except ImportError:
    pass
else:
    raise AssertionError('the torch path ran with torch blocked')
real = sorted(n for n, mod in sys.modules.items() if mod is not None and n.split('.')[0] in ('torch', 'torchvision'))
assert sys.modules['torch'] is None and not real, real
np.save(out, x)
print(json.dumps(sorted(n for n in sys.modules if n.startswith('captioner'))))
"""


def test_reading_and_preprocessing_run_without_torch(tmp_path):
    path = REPO / "assets" / "examples" / "cat.jpg"
    out = tmp_path / "x.npy"
    r = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(path), str(out)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "captioner.images" in json.loads(r.stdout)
    pre = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert np.array_equal(np.load(out), pre(load_image(path)).numpy())  # torch-free, and the torch path's numbers


def test_a_preprocess_builds_its_torch_transform_only_when_called():
    pre = Preprocess()
    assert "_transform" not in pre.__dict__
    pre.to_array(_noise(20, 30))
    assert "_transform" not in pre.__dict__
    pre(Image.fromarray(_noise(20, 30)))
    assert "_transform" in pre.__dict__ and pre == Preprocess() and Preprocess.from_dict(pre.to_dict()) == pre
