"""Regenerate tests/fixtures/coco_metrics_parity.json: caption sets scored by the reference
implementation, pycocoevalcap (coco-caption), so our pure-Python tokenizer and metrics are tested
against it without Java.

Two parts, both messy on purpose (tests/helpers/messy_captions.py says how):
- "builtin": sets rewritten from our own sentences (about 1100 captions), committed in full
  with the official tokens and scores; tested everywhere.
- "shared": sets made from the real captions in ../shared/data (the 495 human COCO captions of
  coco_dev, and Flickr8k val captions; about 1300 captions). That data must not be copied into
  the repository, so only the official scores and a hash of each caption's official tokens are
  kept; the test rebuilds the sets from ../shared/data and skips where it is absent.

Chinese and Japanese characters are tokens of their own in captioner (captioner/cjk.py), so the
text handed to the official tokenizer is segmented the same way first: the parity tested is
"captioner on raw text = coco-caption on CJK-segmented text" (which is how Chinese caption sets
are scored with coco-caption: segmented beforehand); other text is handed over untouched.

Needs pycocoevalcap and Java (its PTB tokenizer and METEOR are Java), e.g.
    pip install pycocoevalcap && python scripts/make_metrics_fixture.py
It does not import captioner (no torch needed).
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers.messy_captions import builtin_sets, shared_sets  # noqa: E402


def _load_cjk():
    """captioner/cjk.py on its own (importing the package would import torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("captioner_cjk", ROOT / "captioner" / "cjk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


segment = _load_cjk().segment

OUT = ROOT / "tests" / "fixtures" / "coco_metrics_parity.json"
SHARED = ROOT.parent / "shared" / "data"


def token_hash(tokens: str) -> str:
    return hashlib.sha1(tokens.encode("utf-8")).hexdigest()[:16]


def score(sets: list[dict]) -> dict:
    """The official tokens and scores of a list of sets, as COCOEvalCap computes them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {s["id"]: [{"caption": segment(r)} for r in s["references"]] for s in sets}
    res = {s["id"]: [{"caption": segment(s["candidate"])}] for s in sets}
    tok = PTBTokenizer()
    gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts_t, res_t)
    cider, cider_each = Cider().compute_score(gts_t, res_t)
    meteor, _ = Meteor().compute_score(gts_t, res_t)
    ids = [s["id"] for s in sets]
    return {
        "captions": sum(1 + len(s["references"]) for s in sets),
        "ptb_tokens": {"candidates": [res_t[i][0] for i in ids], "references": [gts_t[i] for i in ids]},
        "expected": {
            "BLEU-1": bleu[0],
            "BLEU-2": bleu[1],
            "BLEU-3": bleu[2],
            "BLEU-4": bleu[3],
            "ROUGE-L": float(rouge),
            "CIDEr-D": float(cider),
            "METEOR-1.5": float(meteor),
        },
        # Rouge and Cider score images in the order of gts' keys
        "per_image": {
            "ids": list(gts_t.keys()),
            "ROUGE-L": [float(x) for x in rouge_each],
            "CIDEr-D": [float(x) for x in cider_each],
        },
    }


def main() -> None:
    builtin = builtin_sets()
    fixture = {
        "about": "Scores by pycocoevalcap (coco-caption) for the sets below, Chinese/Japanese characters "
        "segmented first as captioner/cjk.py does; regenerate with scripts/make_metrics_fixture.py",
        "pycocoevalcap_version": version("pycocoevalcap"),
        "builtin": {"sets": builtin, **score(builtin)},
    }
    shared = shared_sets(SHARED)
    if shared is None:
        print(f"note: {SHARED} not found: the 'shared' part is left out", file=sys.stderr)
    else:
        part = score(shared)
        tokens = part.pop("ptb_tokens")
        part["token_sha1"] = {
            "candidates": [token_hash(t) for t in tokens["candidates"]],
            "references": [[token_hash(t) for t in ts] for ts in tokens["references"]],
        }
        fixture["shared"] = {
            "sets": len(shared),
            "sources": sorted({s["source"].split(":")[0] for s in shared}),
            **part,
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("builtin", "shared"):
        if name in fixture:
            part = fixture[name]
            print(
                f"{name}: {part['captions']} captions; "
                + ", ".join(f"{k} {v:.4f}" for k, v in part["expected"].items())
            )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
