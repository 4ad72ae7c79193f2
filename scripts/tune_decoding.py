"""Kept for old recipes: `python scripts/tune_decoding.py ARGS` is `captioner tune ARGS` (see its --help):
measure decoding settings on a validation set and write the best by CIDEr-D as JSON."""

from __future__ import annotations

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
