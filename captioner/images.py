"""The one place that opens, checks, converts and preprocesses an image.

Training and inference both go through `load_image` + `Preprocess`, so a model never sees
pixels prepared differently from the ones it was trained on.
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from .errors import ImageError
from .paths import IMAGE_EXTENSIONS, list_images, natural_key  # noqa: F401  (their home is paths.py)
from .settings import DEFAULT_MAX_PIXELS


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
    p = Path(path)
    if not p.exists():
        raise ImageError(p, "no such file")
    if p.is_dir():
        raise ImageError(p, "is a directory, not an image file")
    return _decode(p, p, max_pixels)


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


def _decode(source: Path | io.BytesIO, p: Path | str, max_pixels: int | None) -> Image.Image:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    with _as_image_error(p), _open_without_pillow_limit(source) as img:
        _check_declared(img, p, limit)
        img.seek(0)  # first frame of animations
        upright = _UPRIGHT.get(img.getexif().get(0x0112))
        scale = _draft_scale(img)
        if scale > 1:  # JPEG: decoded at 1/2, 1/4 or 1/8 scale, never in full
            img.draft(img.mode, (img.width // scale, img.height // scale))
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


def from_array(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """An in-memory picture as the (3, H, W) uint8 tensor a file would give; ImageError (naming
    the input by its type and shape) for anything that is not a picture.

    Tensors are (3, H, W); numpy arrays are (H, W, 3) or (H, W), as PIL and OpenCV give them
    (OpenCV's channel order is BGR: convert it first). Floating-point values must lie in [0, 1],
    integers in 0..255: anything else (0..255 as floats, NaN, negatives, 16-bit values) is refused
    rather than clipped into another picture.
    """
    if isinstance(x, np.ndarray):
        label = f"<numpy array {x.shape} {x.dtype}>"
        if x.ndim == 2:
            x = np.repeat(x[..., None], 3, axis=2)
        if x.ndim != 3 or x.shape[2] != 3:
            raise ImageError(label, "expected an RGB array (H, W, 3) or grey-scale (H, W)")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or x.dtype == np.bool_:
            raise ImageError(label, "expected integer (0..255) or floating-point (0..1) pixel values")
        t = torch.from_numpy(np.array(x, copy=True)).permute(2, 0, 1)  # (3, H, W); a copy: arrays may be read-only
    else:
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


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, normalise: (3, crop, crop) float tensor."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        transform = T.Compose(
            [
                T.ToImage(),
                T.Resize(self.resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                T.CenterCrop(self.crop),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(self.mean), list(self.std)),
            ]
        )
        object.__setattr__(self, "_transform", transform)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return self._transform(img)  # (3, crop, crop)

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]))
