"""Does a model tell which way things move? Train on the generated motion set, then count how
often held-back sequences get the right direction word, and how often reversing them flips it.

    python scripts/motion_experiment.py --models gru:attention,none:attention --epochs 15

Each model is TEMPORAL:DECODER (temporal gru|lstm|none; decoder attention|lstm). The settings
match tests/test_sequences.py.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from captioner import Captioner
from captioner.data import load_sequences
from captioner.synthetic import OPPOSITE, make_motion_split, motion_direction
from captioner.training import Trainer, TrainOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gru:attention,none:attention")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-tracks", type=int, default=48)
    p.add_argument("--test-tracks", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="motion-"))
    rng = random.Random(0)
    make_motion_split(out, "train", a.train_tracks, rng, start_id=1)
    test_json = make_motion_split(out, "test", a.test_tracks, rng, start_id=100_000)
    train, test = load_sequences(out / "train.json", out / "train"), load_sequences(test_json, out / "test")
    truth = {s["id"]: s["direction"] for s in json.loads(test_json.read_text())["sequences"]}
    truth = [truth[i] for i in test.image_ids]
    for spec in a.models.split(","):
        temporal, decoder = spec.split(":")
        opts = TrainOptions(
            decoder=decoder,
            temporal=temporal,
            epochs=a.epochs,
            batch_size=32,
            hidden_size=128,
            embed_size=64,
            attention_size=64,
            temporal_size=128,
            min_word_count=1,
            lr=a.lr,
            dropout=0.2,
            lr_schedule="constant",
        )
        t0 = time.time()
        model = Trainer(train, None, out / spec.replace(":", "_"), opts, device="cpu").fit()
        model = Captioner.load(model, device="cpu")
        seconds = time.time() - t0
        seqs = [[test.paths[f] for f in fr] for fr in test.frames]
        fwd = [motion_direction(r[0].text) for r in model.generate_sequences(seqs, beam_size=3)]
        bwd = [motion_direction(r[0].text) for r in model.generate_sequences([s[::-1] for s in seqs], beam_size=3)]
        right = sum(d == t for d, t in zip(fwd, truth))
        flipped = sum(d == OPPOSITE[t] for d, t in zip(bwd, truth))
        print(
            f"{spec:16s} direction right {right}/{len(truth)}  reversed flips {flipped}/{len(truth)}  "
            f"(trained in {seconds:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
