"""Settings declared once, each with its default, its check and its help (pure: no torch).

`DecodingConfig` holds how captions are searched for; the `captioner caption|evaluate` flags
(cli/common.py), the keyword arguments of `Captioner.caption/generate/decode`, the server's form
fields and its OpenAPI schema (serve/app.py) are all generated from its fields, so a setting is
added, renamed or documented here and nowhere else. `ServeLimits` does the same for the server's
limits (`captioner serve` flags, the app, its worker processes). Training has `TrainOptions`
(training/options.py).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import UsageError

DEFAULT_MAX_PIXELS = 100_000_000  # images declaring more pixels are refused before decoding (decompression bombs)
MAX_CONSTRAINTS = 4  # constraints per image: 2**4 states of beams at most
#: tags each caption carries: the most `captioner caption --tags K` prints and a server request may ask for
TAGS_KEPT = 20
TAGS_SHOWN = 5  # tags given unless asked: `caption(return_tags=True)`, `--json`, the server
LOW_CONFIDENCE = 0.2  # the default mark (CLI, server, page): a calibrated P(acceptable) under 1 in 5


def whole_number(value: Any, low: int, name: str) -> int:
    """`value` if it is an int >= low, else UsageError naming the option (as flag and keyword)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"{name} must be a whole number >= {low}, not {value!r}")
    return value


def _number(value: Any, low: float, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise UsageError(f"{name} must be a number >= {low:g}, not {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """One setting as every front end shows it."""

    name: str  # keyword argument and form field: beam_size
    kind: type  # int or float
    default: Any
    help: str
    label: str  # how errors name it: "beam size"
    flag: str  # command-line flag: --beam-size
    low: float  # least value allowed
    high: float | None  # most value allowed (None: no bound)
    serve_max: float | None  # most one server request may ask for (None: `high`)
    model_default: bool  # part of a model's decoding defaults (config["decoding"]); n_best is per call

    def check(self, value: Any) -> Any:
        """`value` if allowed, else UsageError naming the flag and the keyword."""
        name = f"{self.label} ({self.flag}, {self.name}=)"
        value = whole_number(value, int(self.low), name) if self.kind is int else _number(value, self.low, name)
        if self.high is not None and value > self.high:
            raise UsageError(f"{name} must be at most {self.high:g}, not {value!r}")
        return value


def _setting(
    default: Any,
    help: str,
    label: str,
    low: float = 0,
    high: float | None = None,
    flag: str | None = None,
    serve_max: float | None = None,
    model_default: bool = True,
):
    meta = {"help": help, "label": label, "low": low, "high": high, "flag": flag, "serve_max": serve_max,
            "model_default": model_default}  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are searched for. A model's defaults (measured best on validation data, recorded
    in its checkpoint as config["decoding"]) are one of these; a call, a flag or a form field
    overrides single settings (`with_`)."""

    beam_size: int = _setting(5, "beam width, 1 = greedy", "beam size", low=1, serve_max=20)
    max_len: int = _setting(20, "most words per caption", "max length", low=1, serve_max=60)
    min_len: int = _setting(1, "fewest words per caption", "min length", serve_max=60)
    length_alpha: float = _setting(0.0, "GNMT alpha, 0 = off", "length penalty", high=5, flag="--length-penalty")
    no_repeat_ngram: int = _setting(0, "forbid repeating n-grams of this size, 0 = off", "no-repeat n-gram size")
    tag_boost: float = _setting(
        0.0, "favour the words the encoder's ImageNet classifier recognises, 0 = off", "tag boost", high=100
    )
    suppress_unseen: float = _setting(
        0.0,
        "penalise naming people, animals and vehicles the classifiers do not see, 0 = off",
        "unseen-object penalty",
        high=1000,
    )
    tag_subject: float = _setting(
        0.0,
        "on photos unlike the training photos, start the caption with the word the ImageNet classifier "
        "is at least this sure of (a cat, a bus), 0 = off",
        "tag subject threshold",
        high=1,
    )
    constrain: float = _setting(
        0.0,
        "make the caption name what the ImageNet classifier is at least this sure of (constrained beam "
        "search; words the decoder never learnt are borrowed from related ones), 0 = off",
        "constraint threshold",
        high=1,
    )
    max_constraints: int = _setting(
        2, "with --constrain: the surest this many concepts per photo", "most constraints", low=1, high=MAX_CONSTRAINTS
    )
    constraints_needed: int = _setting(
        1, "with --constrain: how many of them the caption must name", "constraints needed", low=1
    )
    n_best: int = _setting(
        1,
        "how many captions per image or sequence (the CLI prints them with --json)",
        "n-best",
        low=1,
        serve_max=20,
        model_default=False,
    )

    def __post_init__(self) -> None:
        for s in self.settings():
            s.check(getattr(self, s.name))
        if self.min_len > self.max_len:
            raise UsageError(f"min length {self.min_len} is more than max length {self.max_len}")

    @classmethod
    def settings(cls) -> Iterator[Setting]:
        """Every setting with its metadata, in declaration order."""
        for f in fields(cls):
            m = f.metadata
            kind = int if f.type in ("int", int) else float
            flag = m["flag"] or "--" + f.name.replace("_", "-")
            yield Setting(f.name, kind, f.default, m["help"], m["label"], flag, m["low"], m["high"],
                          m["serve_max"], m["model_default"])  # fmt: skip

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(s.name for s in cls.settings())

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DecodingConfig:
        """A checkpoint's recorded defaults (unknown keys from other versions are ignored)."""
        known = set(cls.names())
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def with_(self, **given: Any) -> DecodingConfig:
        """These settings with what a caller set (None: not set); UsageError for unknown names or nonsense."""
        unknown = set(given) - set(self.names())
        if unknown:
            raise UsageError(
                f"unknown decoding setting(s): {', '.join(sorted(unknown))} (known: {', '.join(self.names())})"
            )
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def model_defaults(self) -> dict[str, Any]:
        """The settings a checkpoint records as its defaults (all but the per-call ones)."""
        keep = {s.name for s in self.settings() if s.model_default}
        return {k: v for k, v in asdict(self).items() if k in keep}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _limit(default: Any, help: str, low: float):
    return field(default=default, metadata={"help": help, "low": low})


@dataclass
class Grid:
    """The values tried for each decoding setting (every combination is measured); each field is
    named as the model's decoding setting it varies."""

    beam_size: tuple[int, ...] = (1, 3, 5)
    length_alpha: tuple[float, ...] = (0.0, 1.0)
    no_repeat_ngram: tuple[int, ...] = (0, 2)
    tag_boost: tuple[float, ...] = (0.0,)
    suppress_unseen: tuple[float, ...] = (0.0,)
    tag_subject: tuple[float, ...] = (0.0,)
    constrain: tuple[float, ...] = (0.0,)

    def settings(self) -> Iterator[dict[str, Any]]:
        """Each combination as decoding settings; greedy search (beam 1) is tried without a length
        penalty only: it keeps one hypothesis, so there is nothing to re-rank."""
        names = [f.name for f in fields(self)]
        for values in itertools.product(*(getattr(self, n) for n in names)):
            setting = dict(zip(names, values))
            if setting["beam_size"] == 1 and setting["length_alpha"]:
                continue
            yield setting


SERVE_ENV = "CAPTIONER_SERVE_CONFIG"  # how `captioner serve` hands its settings to uvicorn's worker processes


@dataclass(frozen=True)
class ServeLimits:
    """What one `captioner serve` process accepts and how it batches: the flags, the app and its
    worker processes all read these."""

    max_upload_mb: float = _limit(20.0, "largest request body accepted", 0)
    max_files: int = _limit(32, "most images in one request", 1)
    max_pixels: int = _limit(
        DEFAULT_MAX_PIXELS,
        "refuse images declaring more pixels than this, before decoding them (decompression bombs)",
        1,
    )
    max_decode_mb: float = _limit(
        1024.0,
        "most memory decoding uploads may take at once, over all requests (each image's cost read from its "
        "header: pixels x bytes per pixel); requests beyond it wait",
        0,
    )
    max_request_decode_mb: float = _limit(
        512.0, "most memory one request's images may take while decoded; a larger image is refused", 0
    )
    decode_wait_s: float = _limit(30.0, "how long a request waits for decoding memory before a 503", 0)
    request_timeout_s: float = _limit(
        30.0,
        "close a connection that sends nothing for this long while its request (headers or body) is "
        "incomplete; a slow upload that keeps sending is not cut off",
        0,
    )
    max_connections: int = _limit(256, "most connections at once; beyond them new ones get 503", 1)
    batch_size: int = _limit(32, "most images captioned together across requests", 1)
    batch_wait_ms: float = _limit(5.0, "how long the first image waits for others to join its batch", 0)

    @classmethod
    def flags(cls) -> Iterator[tuple[str, str, type, Any, str]]:
        """(flag, name, type, default, help) of each limit, for `captioner serve`."""
        for f in fields(cls):
            yield (
                "--" + f.name.replace("_", "-"),
                f.name,
                int if f.type in ("int", int) else float,
                f.default,
                f.metadata["help"],
            )

    def __post_init__(self) -> None:
        for f in fields(self):
            name, low = "--" + f.name.replace("_", "-"), f.metadata["low"]
            value = getattr(self, f.name)
            if f.type in ("int", int):
                whole_number(value, int(low), name)
            else:
                _number(value, low, name)
            if (
                f.name in ("max_upload_mb", "max_decode_mb", "max_request_decode_mb", "request_timeout_s")
                and value <= 0
            ):
                raise UsageError(f"{name} must be > 0, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
