"""Where captioner keeps things on disk outside a run folder."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

BUNDLED_NAME = "captioner-flickr8k.pt"
# an installed wheel carries it inside the package (pyproject maps assets/model to captioner/bundled);
# a checkout, or an editable install, has it in the repository's assets/model
_INSTALLED = Path(__file__).resolve().parent / "bundled" / BUNDLED_NAME
_CHECKOUT = Path(__file__).resolve().parent.parent / "assets" / "model" / BUNDLED_NAME
BUNDLED_MODEL = _INSTALLED if _INSTALLED.is_file() else _CHECKOUT


def cache_dir() -> Path:
    """Shared cache (features, WordNet copy): $CAPTIONER_CACHE_DIR, else $XDG_CACHE_HOME/captioner,
    else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "captioner"


def bundled_model_path() -> Path:
    """Where `Captioner.load()` looks when no path is given: $CAPTIONER_MODEL, else the bundled file."""
    return Path(os.environ.get("CAPTIONER_MODEL", BUNDLED_MODEL))


def _nearest_folder(path: Path, given: str) -> Path:
    """The closest existing ancestor of `path` (where the first folder or file would be created)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{given}: cannot write here: {parent} is a file, not a folder")
            return parent
    return Path.cwd()


def _probe(folder: Path, given: str) -> None:
    """Create and remove a temp file in `folder`: the one honest test of writability (permission
    bits, read-only mounts, ACLs and root all answer it correctly)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".captioner-probe.", dir=folder)
    except OSError as e:
        raise OutputError(f"{given}: cannot write into {folder} ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse, before any work is done, a file path that cannot be written (a folder, a path under
    a file, a read-only place): OutputError naming the path the user gave."""
    given, p = str(path), Path(path)
    if p.is_dir():
        raise OutputError(f"{given}: is a folder; give a file name")
    _probe(p.parent if p.parent.is_dir() else _nearest_folder(p, given), given)


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse, before any work is done, a folder that cannot be created or written into."""
    given, p = str(path), Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{given}: exists and is not a folder; give a folder (it is created if missing)")
    _probe(p if p.is_dir() else _nearest_folder(p, given), given)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: frame2 before frame10, as people number frames."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name) if part]


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly in a folder, by extension, in natural order of their names."""
    return sorted(
        (p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: (natural_key(p.name), p.name),
    )


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait until the block is done, then take effect as they would
    have: a write is never cut halfway (torch's zip writer, cut mid-file, raises its own error on
    top of the KeyboardInterrupt and leaves nothing usable). Nested blocks hold until the outermost
    one ends. Outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: h for s in held if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)}
    for s in previous:  # (None: a handler not set from Python; left alone)
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):  # delivered now, to whatever handled them before
            signal.raise_signal(s)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temp file next to `path`, then rename it over `path`; signals
    wait until it is done (see `signals_held`)."""
    path = Path(path)
    check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_held():
            _atomic_write(path, write)
    except OSError as e:  # e.g. the disk filled up: name the user's file, not the temp file
        raise OutputError(
            f"{path}: not written ({e.strerror or type(e).__name__}); any earlier version of it is untouched"
        ) from None


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
