"""`captioner validate-data`: check a dataset file and its images, and say what is wrong."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DataError, ImageError
from ..settings import DEFAULT_MAX_PIXELS


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
    vd.add_argument("--quiet", action="store_true", help="no progress bar")
    vd.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check a dataset without training: the file's entries, then every image it names."""
    from ..data import DataProblems, check_file
    from ..images import load_image
    from ..progress import progress
    from ..vocab import tokenize

    if not args.file or not args.images:
        raise DataError("give --annotations or --sequences, and --images")
    files, groups, captions, problems = check_file(args.file)
    for key, caps in captions.items():
        for c in caps:
            if not tokenize(c):
                problems.add("captions with no words (only punctuation or symbols)", f"{key!r}: {c[:30]!r}")
    used = {i for ids in groups.values() for i in ids} if groups is not None else set(files)
    images = DataProblems(args.file)
    for iid in progress(sorted(used, key=str), desc="images", unit="img"):  # --quiet: the logger hides it
        try:
            load_image(Path(args.images) / files[iid], args.max_pixels)
        except ImageError as e:
            images.add(
                "missing image files" if e.reason == "no such file" else "unreadable images",
                f"{files[iid]} ({e.reason})",
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
