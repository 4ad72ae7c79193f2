"""Measure beam-search settings on a validation set and pick the best by CIDEr-D.

    python scripts/tune_decoding.py --model RUN/best.pt --annotations V.json --images DIR --out decoding.json

(--model given twice or more: an ensemble.)
Prints a Markdown table (one row per setting: BLEU-4, METEOR, ROUGE-L, CIDEr-D and caption
diversity) and writes the best setting as JSON, for scripts/export_model.py --decoding. Encoder
features come from the feature cache, so each setting costs only the decoding.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from captioner import Captioner
from captioner.data import load_coco
from captioner.evaluation import caption_features, references, score, training_novel_kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, action="append", help="a checkpoint; several: an ensemble")
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--beam-sizes", default="1,3,5")
    p.add_argument("--length-penalties", default="0,1")
    p.add_argument("--no-repeat-ngrams", default="0,2")
    p.add_argument("--tag-boosts", default="0", help="guidance.py's word prior: tag boost values")
    p.add_argument("--suppress-unseen", default="0", help="unseen-object penalties")
    p.add_argument("--tag-subjects", default="0", help="tag-subject thresholds (a calibrated model)")
    p.add_argument("--constrain", default="0", help="constraint thresholds (naming.py; a calibrated model)")
    p.add_argument("--train-annotations", help="the training captions: novel_object_recall is reported")

    p.add_argument("--out", help="write the best setting here (JSON)")
    a = p.parse_args()
    model = Captioner.load(a.model, device="cpu")
    corpus = load_coco(a.annotations, a.images)
    feats, kept, failed = model.corpus_inputs(corpus, model.feature_cache())
    if failed:
        sys.exit(f"{len(failed)} image(s) could not be read, e.g. {failed[0]}")
    ids, refs = [corpus.image_ids[k] for k in kept], references(corpus)
    rows = []
    print(
        "| beam | length penalty | no-repeat n-gram | tag boost | suppress unseen | tag subject | BLEU-4 | METEOR "
        "| ROUGE-L | CIDEr-D | hallucinated | person invented | constrain | object recall | novel object recall "
        "| object precision | distinct captions | unique | words used | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    novel = training_novel_kinds(a.train_annotations) if a.train_annotations else model.guidance.novel_kinds()
    grid = itertools.product(
        [int(x) for x in a.beam_sizes.split(",")],
        [float(x) for x in a.length_penalties.split(",")],
        [int(x) for x in a.no_repeat_ngrams.split(",")],
        [float(x) for x in a.tag_boosts.split(",")],
        [float(x) for x in a.suppress_unseen.split(",")],
        [float(x) for x in a.tag_subjects.split(",")],
        [float(x) for x in a.constrain.split(",")],
    )
    for beam, alpha, ngram, boost, sup, subject, constrain in grid:
        if beam == 1 and alpha:
            continue  # greedy keeps one hypothesis: nothing to re-rank
        t0 = time.time()
        setting = {"beam_size": beam, "length_alpha": alpha, "no_repeat_ngram": ngram}
        setting |= {"tag_boost": boost, "suppress_unseen": sup, "tag_subject": subject, "constrain": constrain}
        s = score(refs, caption_features(model, ids, feats, **setting), novel=novel)
        rows.append((s["CIDEr-D"], setting))
        meteor = "n/a" if s["METEOR"] is None else f"{s['METEOR']:.3f}"
        print(
            f"| {beam} | {alpha:g} | {ngram or 'off'} | {boost:g} | {sup:g} | {subject:g} | {s['BLEU-4']:.3f} | "
            f"{meteor} | {s['ROUGE-L']:.3f} | {s['CIDEr-D']:.3f} | {s['hallucinated']:.3f} | "
            f"{_pct(s['person_invented'])} | {constrain:g} | {_pct(s['object_recall'])} | "
            f"{_pct(s['novel_object_recall'])} | {_pct(s['object_precision'])} | {s['distinct_captions']} | "
            f"{s['unique_fraction']:.2f} | {s['words_used']} | {time.time() - t0:.0f} |",
            flush=True,
        )
    best = max(rows, key=lambda r: r[0])
    print(f"best by CIDEr-D: {json.dumps(best[1])} ({best[0]:.3f}); METEOR: {s['METEOR_backend']}", flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(best[1], f)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
