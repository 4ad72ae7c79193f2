"""Progress bars and reports that follow the `captioner` logger: whoever runs the library (the CLI,
a notebook, a server) decides with the logger's level whether long work shows progress — the
library itself takes no `quiet` flag. INFO (the CLI's default) shows bars; WARNING (`--quiet`)
hides them. Where nobody has set up logging (a plain script, a notebook) bars show, as tqdm's do."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("captioner")


def showing() -> bool:
    """Whether progress is wanted: the `captioner` logger reports INFO, or logging was never set up."""
    if log.level == logging.NOTSET and not log.handlers and not logging.getLogger().handlers:
        return True
    return log.isEnabledFor(logging.INFO)


def progress(iterable: Iterable | None = None, show: bool = True, **kw: Any):
    """A tqdm bar over `iterable` (or one counted by hand: total=...), shown only while the
    `captioner` logger reports INFO (show=False: never, e.g. on the other processes of a job);
    it leaves no line behind."""
    from tqdm import tqdm

    kw.setdefault("leave", False)
    return tqdm(iterable, disable=not (show and showing()), **kw)
