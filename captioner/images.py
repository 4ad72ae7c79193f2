"""The one place that opens, checks, converts and preprocesses an image.

Training and inference both go through `load_image` + `Preprocess`, so a model never sees
pixels prepared differently from the ones it was trained on.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2 as T

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class ImageError(Exception):
    """An input image that cannot be used; carries the path and a one-line reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # travels back from DataLoader worker processes
        return (ImageError, (self.path, self.reason))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB; transparency is composited on white, not dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied; ImageError if unusable."""
    p = Path(path)
    if not p.exists():
        raise ImageError(p, "no such file")
    if p.is_dir():
        raise ImageError(p, "is a directory, not an image file")
    try:
        with Image.open(p) as img:
            img.seek(0)  # first frame of animations
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(p, "not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(p, f"unreadable image ({e})") from None


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, normalise: (3, crop, crop) float tensor."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        transform = T.Compose([
            T.ToImage(),
            T.Resize(self.resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(self.crop),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(self.mean), list(self.std)),
        ])
        object.__setattr__(self, "_transform", transform)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return self._transform(img)  # (3, crop, crop)

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]))


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: frame2 before frame10, as people number frames."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name) if part]


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly in a folder, by extension, in natural order of their names."""
    return sorted((p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: (natural_key(p.name), p.name))
