"""Regenerate tests/fixtures/coco_metrics_parity.json: candidate/reference sets scored by the
reference implementation, pycocoevalcap (coco-caption), so our pure-Python metrics can be tested
against it without it being installed.

Needs pycocoevalcap and Java (its PTB tokenizer and METEOR are Java), e.g. in a throwaway venv:
    python -m venv /tmp/ev && /tmp/ev/bin/pip install pycocoevalcap
    /tmp/ev/bin/python scripts/make_metrics_fixture.py
It does not import captioner (no torch needed).
"""
from __future__ import annotations

import json
import random
from importlib.metadata import version
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "coco_metrics_parity.json"

SUBJECTS = ["a dog", "two dogs", "a man", "the woman", "a little girl", "three children", "a brown dog",
            "an old man", "A black and white dog", "people"]
VERBS = ["runs on", "is running across", "jumps over", "plays with", "sits on", "walks along",
         "is standing near", "rides", "looks at", "catches"]
OBJECTS = ["the grass", "a red ball", "the beach", "a bench", "the water", "a bike", "snow", "the street",
           "a frisbee", "the rocks"]
EXTRAS = ["", " in the park", " at night", ", smiling", " while it's raining", " (outside)", " near the dog's toy",
          "; it is sunny", " - quickly", " with 2 friends"]
ENDINGS = ["", ".", " .", "!", "?", "...", " ."]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(EXTRAS)}{rng.choice(ENDINGS)}"
    if rng.random() < 0.3:
        s = s.capitalize()
    if rng.random() < 0.15:
        s = "  " + s.upper() + " "
    return s


def make_sets(seed: int = 8) -> list[dict]:
    rng = random.Random(seed)
    sets = []
    for i in range(54):
        refs = [sentence(rng) for _ in range(rng.randint(1, 5))]
        r = rng.random()
        if r < 0.25:
            cand = rng.choice(refs)  # exact copy of a reference
        elif r < 0.5:
            words = rng.choice(refs).split()
            cand = " ".join(words[: rng.randint(1, len(words))])  # a prefix: short candidates
        else:
            cand = sentence(rng)
        sets.append({"id": i, "candidate": cand, "references": refs})
    edge = [
        ("", ["a dog runs on the grass", "a brown dog is running"]),  # empty candidate
        ("a a a a a a a a", ["a dog runs", "a cat sleeps on a mat"]),  # repeats: clipped counts
        ("dog", ["a dog runs on the grass."]),  # one word
        ("a man rides a bike down the street while two dogs run after him and people watch from a bench "
         "in the park at night", ["a man rides a bike", "a cyclist on a street"]),  # long
        ("The dog, the dog, and the DOG!", ["the dog and the dog", "dogs"]),  # punctuation + repeats
        ("two dogs play with a red ball", ["two dogs play with a red ball"] * 5),  # identical references
        ("a woman's hat", ["a woman's red hat.", "the hat of a woman"]),  # possessive
    ]
    for cand, refs in edge:
        sets.append({"id": len(sets), "candidate": cand, "references": refs})
    return sets


def main() -> None:
    sets = make_sets()
    gts = {s["id"]: [{"caption": r} for r in s["references"]] for s in sets}
    res = {s["id"]: [{"caption": s["candidate"]}] for s in sets}
    tok = PTBTokenizer()
    gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts_t, res_t)
    cider, cider_each = Cider().compute_score(gts_t, res_t)
    meteor, _ = Meteor().compute_score(gts_t, res_t)
    ids = [s["id"] for s in sets]
    fixture = {
        "about": "Scores by pycocoevalcap (coco-caption) for the sets below; regenerate with "
                 "scripts/make_metrics_fixture.py",
        "pycocoevalcap_version": version("pycocoevalcap"),
        "sets": sets,
        "ptb_tokens": {"candidates": [res_t[i][0] for i in ids], "references": [gts_t[i] for i in ids]},
        "expected": {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
                     "ROUGE-L": float(rouge), "CIDEr-D": float(cider), "METEOR-1.5": float(meteor)},
        # Rouge and Cider score images in the order of gts' keys
        "per_image": {"ids": list(gts_t.keys()), "ROUGE-L": [float(x) for x in rouge_each],
                      "CIDEr-D": [float(x) for x in cider_each]},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT}: {len(sets)} sets; " + ", ".join(f"{k} {v:.4f}" for k, v in fixture["expected"].items()))


if __name__ == "__main__":
    main()
