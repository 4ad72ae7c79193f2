"""The one place that opens, checks, converts and preprocesses an image.

Training and inference both go through `load_image` + `Preprocess`, so a model never sees
pixels prepared differently from the ones it was trained on.
"""

from __future__ import annotations

import io
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .paths import IMAGE_EXTENSIONS, list_images, natural_key  # noqa: F401  (their home is paths.py)
from .settings import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # torch is imported where it is used: reading and preprocessing work without it
    import torch


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grey-scale -> 8-bit "L", scaled, not clipped at 255."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        a = a / 257.0  # 16-bit range (Pillow also opens 16-bit files as "I")
    elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif a.size and (a.min() < 0 or a.max() > 255):
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # any other range: stretched
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB: transparency composited on white (not dropped to black), 16/32-bit
    grey-scale scaled to 8 bits, CMYK and palettes converted."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _gray_to_8bit(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


_PILLOW_LIMIT = threading.Lock()


def _open_without_pillow_limit(p: Path | io.BytesIO) -> Image.Image:
    """Image.open (header only) with Pillow's own bomb check off, so `load_image` applies its
    documented limit instead (Pillow would raise or warn at about 89 and 179 megapixels)."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(p)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied; ImageError if unusable.

    The format is read from the content, not the extension. An image declaring more than
    `max_pixels` pixels (default DEFAULT_MAX_PIXELS) is refused from its header, before decoding.
    """
    p = _image_file(path)
    return _decode(p, p, max_pixels)


def check_image(path: str | os.PathLike, max_pixels: int | None = None, full: bool = False) -> None:
    """ImageError (with `load_image`'s reasons) if `load_image` would refuse the file, for less:
    a JPEG is decoded at 1/8 scale, which still reads its whole entropy-coded stream, so a
    truncated or corrupt one fails alike, but skips most of the inverse DCT and the colour
    conversion (about 2/3 of the time of a full decode of a 640x480 photo, 1/2 at 256x256); every
    later step of `load_image` runs on that small image. Other formats, and full=True, go
    through `load_image` itself."""
    p = _image_file(path)
    _decode(p, p, max_pixels, smallest=not full)


def _image_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise ImageError(p, "no such file")
    if p.is_dir():
        raise ImageError(p, "is a directory, not an image file")
    return p


def image_from_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """`load_image` for an uploaded file's bytes (`name` labels its errors); no path is opened."""
    if not data:
        raise ImageError(name, "is empty")
    return _decode(io.BytesIO(data), name, max_pixels)


#: large images are decoded reduced to about this short side (>= 4x any encoder's input): a
#: 10000x10000 photo then costs its decoder's buffer once, not copies of it in every conversion
DECODE_SIDE = 1024
#: EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: bytes per pixel as Pillow holds a decoded image (multi-band modes take 4)
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


@contextmanager
def _as_image_error(label: Path | str):
    """What Pillow raises for a bad file, as one ImageError naming it."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(label, "not an image (unrecognised format, or a corrupt header)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(label, f"unreadable image ({e})") from None


def _check_declared(img: Image.Image, p: Path | str, limit: int) -> tuple[int, int]:
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(p, f"has no pixels ({w}x{h})")
    if w * h > limit:
        raise ImageError(
            p,
            f"declares {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
            "(a decompression bomb? raise the limit with --max-pixels)",
        )
    return w, h


def _draft_scale(img: Image.Image) -> int:
    """1, 2, 4 or 8: how much smaller a JPEG's decoder can hand the image over (DCT scaling)."""
    k = min(img.size) // DECODE_SIDE
    return 1 if img.format != "JPEG" or k < 2 else min(8, 1 << (k.bit_length() - 1))


def decode_bytes(data: bytes, name: str, max_pixels: int | None = None) -> int:
    """The memory decoding an uploaded image will take, from its header alone (nothing decoded):
    its pixels, as its decoder hands them over, x the bytes Pillow keeps per pixel; ImageError if
    the header is unusable or declares too many pixels."""
    if not data:
        raise ImageError(name, "is empty")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    with _as_image_error(name), _open_without_pillow_limit(io.BytesIO(data)) as img:
        w, h = _check_declared(img, name, limit)
        s = _draft_scale(img)
        return -(-w // s) * -(-h // s) * _PIXEL_BYTES.get(img.mode, 4)


def _reduced(img: Image.Image) -> Image.Image:
    """A decoded image larger than DECODE_SIDE on its short side, box-averaged down to about it."""
    k = min(img.size) // DECODE_SIDE
    if k < 2:
        return img
    size = (img.width // k, img.height // k)
    try:
        return img.reduce(k)
    except ValueError:  # modes reduce() does not take ("1", "P", 16-bit grey)
        return img.resize(size, Image.Resampling.BOX)


def _decode(source: Path | io.BytesIO, p: Path | str, max_pixels: int | None, smallest: bool = False) -> Image.Image:
    """`smallest`: a JPEG (or MPO: a JPEG holding more pictures) decoded at 1/8 scale whatever its
    size (`check_image`)."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    with _as_image_error(p), _open_without_pillow_limit(source) as img:
        _check_declared(img, p, limit)
        img.seek(0)  # first frame of animations
        upright = _UPRIGHT.get(img.getexif().get(0x0112))
        scale = (8 if img.format in ("JPEG", "MPO") else 1) if smallest else _draft_scale(img)
        if scale > 1:  # JPEG: decoded at 1/2, 1/4 or 1/8 scale, never in full
            img.draft(img.mode, (max(1, img.width // scale), max(1, img.height // scale)))
        img.load()
        out = _reduced(img)
        if upright is not None:
            out = out.transpose(upright)
        return to_rgb(out)


def check_size(img: Image.Image, label: str) -> Image.Image:
    """An image with no pixels (0 wide or 0 high) cannot be resized or described."""
    if img.width == 0 or img.height == 0:
        raise ImageError(label, f"has no pixels ({img.width}x{img.height})")
    return img


def array_to_rgb(x: np.ndarray) -> np.ndarray:
    """A numpy picture as the (H, W, 3) uint8 array a file would give, without torch: the checks
    and ImageErrors of `from_array` (which uses this for arrays). Always a new array, so later
    changes to `x` do not reach it.

    Arrays are (H, W, 3) or (H, W), as PIL and OpenCV give them (OpenCV's channel order is BGR:
    convert it first). Floating-point values must lie in [0, 1] and are rounded from x * 255 in
    float32; integers must lie in 0..255. Anything else (0..255 as floats, NaN, negatives, 16-bit
    values) is refused rather than clipped into another picture.
    """
    label = f"<numpy array {x.shape} {x.dtype}>"
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise ImageError(label, "expected an RGB array (H, W, 3) or grey-scale (H, W)")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or x.dtype == np.bool_:
        raise ImageError(label, "expected integer (0..255) or floating-point (0..1) pixel values")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ImageError(label, f"has no pixels ({x.shape[1]}x{x.shape[0]})")
    if x.dtype == np.uint8:
        rgb = np.array(x, order="C", copy=True)
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # beyond float32's range: infinite, refused below
            f = x.astype(np.float32)  # checked and scaled in float32, as from_array does for tensors
        if not np.isfinite(f).all():
            raise ImageError(label, "holds NaN or infinite values")
        lo, hi = float(f.min()), float(f.max())
        if lo < 0 or hi > 1:
            hint = " (0..255 values: divide by 255, or pass uint8)" if hi > 1 and lo >= 0 else ""
            raise ImageError(label, f"floating-point pixels must lie in [0, 1]; these span [{lo:g}, {hi:g}]{hint}")
        rgb = np.rint(f * np.float32(255)).astype(np.uint8)  # 8 bits like every other input: same picture, same caption
    else:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ImageError(label, f"integer pixels must lie in 0..255; these span {lo}..{hi}")
        rgb = x.astype(np.uint8, order="C")
    if rgb.ndim == 2:  # grey-scale: checked once, repeated into the three channels
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return rgb  # (H, W, 3)


def from_array(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """An in-memory picture as the (3, H, W) uint8 tensor a file would give; ImageError (naming
    the input by its type and shape) for anything that is not a picture.

    Tensors are (3, H, W); numpy arrays are (H, W, 3) or (H, W), as PIL and OpenCV give them
    (OpenCV's channel order is BGR: convert it first). Floating-point values must lie in [0, 1],
    integers in 0..255: anything else (0..255 as floats, NaN, negatives, 16-bit values) is refused
    rather than clipped into another picture. Arrays are checked by `array_to_rgb`.
    """
    import torch

    if isinstance(x, np.ndarray):
        return torch.from_numpy(array_to_rgb(x)).permute(2, 0, 1)  # (3, H, W)
    label, t = f"<tensor {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}>", x
    if t.dim() != 3 or t.size(0) != 3:
        raise ImageError(label, "expected an RGB tensor (3, H, W)")
    if t.dtype == torch.bool or t.is_complex():
        raise ImageError(label, "expected integer (0..255) or floating-point (0..1) pixel values")
    if t.size(1) == 0 or t.size(2) == 0:
        raise ImageError(label, f"has no pixels ({t.size(2)}x{t.size(1)})")
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        return t
    if t.is_floating_point():
        t = t.float()
        if not torch.isfinite(t).all():
            raise ImageError(label, "holds NaN or infinite values")
        lo, hi = t.min().item(), t.max().item()
        if lo < 0 or hi > 1:
            hint = " (0..255 values: divide by 255, or pass uint8)" if hi > 1 and lo >= 0 else ""
            raise ImageError(label, f"floating-point pixels must lie in [0, 1]; these span [{lo:g}, {hi:g}]{hint}")
        return (t * 255).round().to(torch.uint8)  # 8 bits like every other input: same picture, same caption
    lo, hi = t.min().item(), t.max().item()
    if lo < 0 or hi > 255:
        raise ImageError(label, f"integer pixels must lie in 0..255; these span {lo}..{hi}")
    return t.to(torch.uint8)


# ---- torchvision's resize and centre crop, in numpy ------------------------------------------
# Preprocess.to_array gives the torch path's pixels exactly, for the torch-free (ONNX) inference.
# torchvision resizes a uint8 image with ATen's antialiased bicubic kernel for uint8
# (aten/src/ATen/native/cpu/UpSampleKernel.cpp, and its AVX twin UpSampleKernelAVXAntialias.h):
# Keys' cubic (a = -0.5) stretched by the scale when shrinking, normalised per output, rounded to
# int16 fixed point with as many fraction bits as the largest weight allows; the width is resized
# first into a uint8 buffer, then the height, each sum rounded and clamped to 0..255. Pillow's
# resize has the same kernel at a fixed 22-bit precision: up to 2 levels apart on real photos.

_ROWS_PER_BLOCK = 16  # outputs per matrix product: a band of the weights, not the whole matrix


class _Taps(NamedTuple):
    """Outputs first..first+count-1 of one axis resized n_in -> n_out, as ATen's uint8 kernel weighs them."""

    lo: int  # the inputs they read: lo..hi-1
    hi: int
    weights: np.ndarray | None  # (count, hi - lo) integers held as floats; None: the axis keeps its size
    precision: int  # fraction bits of the fixed-point weights
    blocks: tuple[tuple[int, int, int, int], ...]  # per block: outputs s..e-1 read inputs lo..hi-1 (from .lo)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution (a = -0.5, as Pillow), with ATen's float64 operations in its order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, first: int, count: int) -> _Taps:
    """ATen's weights for outputs first..first+count-1 (the ones the crop keeps) of n_in -> n_out."""
    if n_in == n_out:  # torch copies an axis that keeps its size
        return _Taps(first, first + count, None, 0, ())
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0  # bicubic reads 2 inputs each side, more when shrinking
    k = math.ceil(support) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), n_in) - xmin, 0, k)
    j = np.arange(k)
    w = _keys_cubic((j + xmin[:, None] - center[:, None] + 0.5) * (1.0 / scale if scale >= 1.0 else 1.0))
    w[j >= xsize[:, None]] = 0.0
    total = w[:, 0].copy()
    for i in range(1, k):  # summed in ATen's order, so the normalised weights round alike
        total += w[:, i]
    w /= np.where(total != 0.0, total, 1.0)[:, None]
    precision, w_max = 0, float(w[total != 0.0].max(initial=0.0))  # ATen leaves unnormalised rows out
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1  # the most fraction bits that keep every weight an int16
    v = w * (1 << precision)
    iw = np.trunc(np.where(v < 0, v - 0.5, v + 0.5))  # rounded half away from zero, as ATen
    keep = slice(first, first + count)
    xmin, xsize, iw = xmin[keep], xsize[keep], iw[keep]
    lo, hi = int(xmin.min()), int((xmin + xsize).max())
    # Every partial sum of 8-bit pixels x these integers is an integer; float32 holds it exactly
    # (whatever order BLAS adds in) while below 2**24, float64 always (the sums stay below 2**31).
    exact32 = 255 * np.abs(iw).sum(axis=1).max() < 2**24
    weights = np.zeros((count, hi - lo), np.float32 if exact32 else np.float64)
    rows, cols = np.nonzero(j < xsize[:, None])
    weights[rows, xmin[rows] - lo + cols] = iw[rows, cols]
    blocks = tuple(
        (s, min(s + _ROWS_PER_BLOCK, count), int(xmin[s] - lo), int((xmin + xsize)[s : s + _ROWS_PER_BLOCK].max() - lo))
        for s in range(0, count, _ROWS_PER_BLOCK)
    )
    weights.setflags(write=False)  # shared through the cache
    return _Taps(lo, hi, weights, precision, blocks)


def _resample(x: np.ndarray, axis: int, taps: _Taps) -> np.ndarray:
    """Planar uint8 (3, H, W), spanning taps.lo..taps.hi along `axis` (1: rows, 2: columns), resized
    along it to taps' outputs, each sum rounded and clamped to 8 bits as ATen does."""
    if taps.weights is None:
        return x
    w = taps.weights
    shape = list(x.shape)
    shape[axis] = w.shape[0]
    out = np.empty(shape, np.uint8)
    for s, e, lo, hi in taps.blocks:
        if axis == 2:
            acc = x[:, :, lo:hi].astype(w.dtype) @ w[s:e, lo:hi].T  # (3, H, e - s)
            dst = out[:, :, s:e]
        else:
            acc = w[s:e, lo:hi] @ x[:, lo:hi].astype(w.dtype)  # (3, e - s, W)
            dst = out[:, s:e]
        fixed = acc.astype(np.int32)
        fixed += 1 << (taps.precision - 1)  # + 0.5, then the fraction bits dropped: rounded
        fixed >>= taps.precision
        dst[...] = np.clip(fixed, 0, 255)
    return out


def _resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(short): the short side to `short`, the long side scaled and truncated."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _crop_span(n: int, crop: int) -> tuple[int, int, int]:
    """CenterCrop along one axis of n pixels: (first kept, how many, zero padding before them)."""
    if crop > n:  # torchvision pads a short axis with zeros, (crop - n) // 2 of them first
        return 0, n, (crop - n) // 2
    return int(round((n - crop) / 2.0)), crop, 0  # round() as torchvision: half to even


def read_image(item: Any, max_pixels: int | None = None) -> Image.Image | np.ndarray:
    """One input as the model paths take it: a file path (`max_pixels`: the largest image accepted,
    None: DEFAULT_MAX_PIXELS), a PIL image, an (H, W, 3) or (H, W) array, or a (3, H, W) torch
    tensor -> an RGB image or an (H, W, 3) uint8 array, checked; ImageError if it cannot be used.
    Torch and the torch-free runtime read inputs here alike; torch is touched only for a tensor
    (whose caller has imported it)."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, max_pixels)
    if isinstance(item, Image.Image):
        return to_rgb(check_size(item, f"<PIL image {item.width}x{item.height} {item.mode}>"))
    if isinstance(item, np.ndarray):
        return array_to_rgb(item)
    if type(item).__module__.startswith("torch"):
        return from_array(item).permute(1, 2, 0).numpy()  # (3, H, W) checked -> (H, W, 3)
    raise ImageError(
        f"<{type(item).__name__}>",
        "unsupported input: give a file path, a PIL image, an RGB tensor (3, H, W) or an array (H, W, 3)",
    )


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, normalise: (3, crop, crop) float tensor (`__call__`, with
    torchvision) or the same numbers as a numpy array (`to_array`, without torch)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        transform = self.__dict__.get("_transform")
        if transform is None:  # built on first use, so a Preprocess can exist without torch
            transform = self._torch_transform()
            object.__setattr__(self, "_transform", transform)
        return transform(img)  # (3, crop, crop)

    def _torch_transform(self):
        import torch
        from torchvision.transforms import v2 as T

        return T.Compose(
            [
                T.ToImage(),
                T.Resize(self.resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                T.CenterCrop(self.crop),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def to_array(self, img: Image.Image | np.ndarray) -> np.ndarray:
        """`__call__` in numpy, for inference without torch: the same float32 values, bit for bit.

        A PIL image is taken as `to_rgb` gives it, an array as `array_to_rgb` checks it (so
        `to_array(x)` equals `self(from_array(x))`). Only the pixels the crop keeps are resized.
        """
        if isinstance(img, np.ndarray):
            rgb = array_to_rgb(img)
        else:
            rgb = np.asarray(to_rgb(check_size(img, f"<PIL image {img.width}x{img.height} {img.mode}>")))
        h, w = rgb.shape[:2]
        new_h, new_w = _resized_size(h, w, self.resize)
        (y0, ny, pad_y), (x0, nx, pad_x) = _crop_span(new_h, self.crop), _crop_span(new_w, self.crop)
        rows, cols = _taps(h, new_h, y0, ny), _taps(w, new_w, x0, nx)
        x = np.ascontiguousarray(rgb[rows.lo : rows.hi, cols.lo : cols.hi].transpose(2, 0, 1))  # (3, h', w')
        x = _resample(_resample(x, 2, cols), 1, rows)  # (3, ny, nx): the width first, as torch
        if (ny, nx) != (self.crop, self.crop):  # smaller than the crop: zero padding, as CenterCrop
            x = np.pad(x, ((0, 0), (pad_y, self.crop - ny - pad_y), (pad_x, self.crop - nx - pad_x)))
        out = x.astype(np.float32)
        out *= np.float32(1 / 255)  # ToDtype(scale=True): times 1/255 in float32, not divided by 255
        out -= np.asarray(self.mean, np.float32)[:, None, None]
        out /= np.asarray(self.std, np.float32)[:, None, None]
        return out  # (3, crop, crop)

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]))
