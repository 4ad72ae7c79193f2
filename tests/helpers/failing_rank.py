"""`captioner train` in which one rank raises partway through an epoch, for the torchrun failure test.

Usage: torchrun ... tests/helpers/failing_rank.py FAIL_RANK FAIL_AT_STEP <captioner train arguments>
"""

import os
import sys

from captioner.cli import main
from captioner.training.objectives import Update

fail_rank, fail_at = int(sys.argv[1]), int(sys.argv[2])
real_step, steps = Update.__call__, 0


def step(self, loss):
    global steps
    steps += 1
    if int(os.environ["RANK"]) == fail_rank and steps == fail_at:
        raise RuntimeError(f"injected failure at step {steps}")
    real_step(self, loss)


Update.__call__ = step  # every optimizer step goes through here
sys.exit(main(["train", *sys.argv[3:]]))
