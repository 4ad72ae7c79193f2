"""`captioner validate-data`: check a dataset file and its images, and say what is wrong."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from ..errors import DataError, ImageError
from ..settings import DEFAULT_MAX_PIXELS, whole_number

#: images handed to a worker at a time: few enough that the results come back in order smoothly
_CHUNK = 64


def add(sub) -> None:
    vd = sub.add_parser("validate-data", help="check a dataset file and its images, and say what is wrong")
    src = vd.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", dest="file", help="COCO caption JSON")
    src.add_argument("--sequences", dest="file", help="sequence caption JSON")
    vd.add_argument("--images", required=True, help="folder its file_names are in")
    vd.add_argument("--show", type=int, default=5, help="offenders shown per kind of problem")
    vd.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="report images declaring more pixels than this (decompression bombs), as caption refuses them",
    )
    vd.add_argument(
        "--decode",
        choices=("quick", "full"),
        default="quick",
        help="quick: JPEGs decoded at 1/8 scale, which still reads every byte (truncated or corrupt files "
        "fail alike), other formats in full; full: every image decoded exactly as training decodes it",
    )
    vd.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes checking images at once (default: one per CPU core; 0: all in this process)",
    )
    vd.add_argument("--quiet", action="store_true", help="no progress bar")
    vd.set_defaults(func=run)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's, a taskset's)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    """Check a dataset without training: the file's entries, then every image it names."""
    workers = _cores() if args.workers is None else whole_number(args.workers, 0, "--workers")
    from ..data import DataProblems, check_file
    from ..progress import progress
    from ..vocab import has_words

    if not args.file or not args.images:
        raise DataError("give --annotations or --sequences, and --images")
    files, groups, captions, problems = check_file(args.file)
    for key, caps in captions.items():
        for c in caps:
            if not has_words(c):
                problems.add("captions with no words (only punctuation or symbols)", f"{key!r}: {c[:30]!r}")
    used = {i for ids in groups.values() for i in ids} if groups is not None else set(files)
    order = sorted(used, key=str)
    paths = [str(Path(args.images) / files[iid]) for iid in order]
    images = DataProblems(args.file)
    checked = _check_images(paths, args.max_pixels, args.decode == "full", workers)
    # --quiet: the logger hides the bar
    for iid, reason in zip(order, progress(checked, total=len(paths), desc="images", unit="img")):
        if reason is not None:
            images.add(
                "missing image files" if reason == "no such file" else "unreadable images",
                f"{files[iid]} ({reason})",
            )
    what = f"{len(groups)} sequences, " if groups is not None else ""
    print(f"{args.file}: {len(files)} images, {what}{sum(len(c) for c in captions.values())} captions")
    bad = problems.lines(args.show) + images.lines(args.show)
    if not captions:
        bad.insert(0, "no captioned images: nothing to train or evaluate on")
    for line in bad:
        print(f"  {line}")
    print(
        "problems found: fix them (training refuses malformed entries and missing or unreadable images unless "
        "given --skip-bad / --skip-missing)"
        if bad
        else "ok"
    )
    return 1 if bad else 0


def _reason(path: str, max_pixels: int, full: bool) -> str | None:
    """Why training could not use this image file (ImageError's reason), or None if it could."""
    from ..images import check_image

    try:
        check_image(path, max_pixels, full)
    except ImageError as e:
        return e.reason
    return None


def _check_images(paths: list[str], max_pixels: int, full: bool, workers: int) -> Iterator[str | None]:
    """`_reason` of each path, in order: in `workers` fresh processes (spawned, so they hold only
    what checking needs, not this process's parsed JSON), or in this one (0, or too few images to
    be worth starting any)."""
    check = partial(_reason, max_pixels=max_pixels, full=full)
    if workers == 0 or len(paths) <= _CHUNK:
        yield from map(check, paths)
        return
    import multiprocessing

    processes = min(workers, -(-len(paths) // _CHUNK))
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_ignore_interrupts) as pool:
        yield from pool.imap(check, paths, chunksize=_CHUNK)


def _ignore_interrupts() -> None:
    """Ctrl-C stops the command once, in this process (which ends the pool), not with a
    traceback from every worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
