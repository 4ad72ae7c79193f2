"""Kept for old recipes: `python scripts/calibrate.py ARGS` is `captioner calibrate ARGS` (see its --help):
fit a model's guidance state and write the model with it; print how well the confidence is calibrated."""

from __future__ import annotations

import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
