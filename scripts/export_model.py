"""Turn a training checkpoint into a model file to ship: no optimizer state, fp16 weights
(--half), and the decoding settings measured on validation data (--decoding JSON from
`captioner tune --out`) recorded as the model's defaults.

    python scripts/export_model.py RUN/best.pt assets/model/captioner-flickr8k.pt --half --decoding decoding.json
"""

from __future__ import annotations

import argparse
import json

from captioner import Captioner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--half", action="store_true", help="store floating-point weights as fp16")
    p.add_argument("--decoding", help="JSON file of decoding defaults (beam_size, length_alpha, no_repeat_ngram, ...)")
    a = p.parse_args()
    model = Captioner.load(a.checkpoint, device="cpu")
    if a.decoding:
        with open(a.decoding, encoding="utf-8") as f:
            model.config["decoding"] = json.load(f)
    model.save(a.out, half=a.half)
    print(a.out)


if __name__ == "__main__":
    main()
