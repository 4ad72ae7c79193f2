"""The errors a user can cause and fix, as opposed to bugs.

Every exception that stands for a problem with the user's input, options, files or machine
derives from `CaptionerError` and carries a one-line message naming the thing and the problem:
the CLI prints that line and exits 2. Anything else that escapes is a bug, and the CLI shows its
traceback and says so (a bare ValueError from inside torch is never dressed up as bad input).
"""

from __future__ import annotations

import os


def first_line(e: BaseException) -> str:
    """An error's first line: backend errors run to many lines of C++ context."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class CaptionerError(Exception):
    """A problem the user can fix; the message says what and where."""


class UsageError(CaptionerError, ValueError):
    """Options or arguments that cannot work together (also a ValueError, for callers that catch that)."""


class DataError(CaptionerError):
    """A dataset that cannot be used as given; the message says which file and why."""


class TrainingDiverged(CaptionerError, FloatingPointError):
    """The training loss became inf or nan (too high a learning rate, usually); the last good
    checkpoint is kept."""


class CheckpointError(CaptionerError):
    """A checkpoint (or export folder) that cannot be used; the message names the file and the reason."""


class OutputError(CaptionerError):
    """A path captioner was asked to write cannot be written; the message names the path as given."""


class ImageError(CaptionerError):
    """An input image that cannot be used; carries the path and a one-line reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # travels back from DataLoader worker processes
        return (ImageError, (self.path, self.reason))
