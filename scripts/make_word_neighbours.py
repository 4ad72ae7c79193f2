"""Generate captioner/resources/word_neighbours.json: for each word a tag can ask a caption to say
(the ImageNet classes' caption words, COCO's object names), the nouns of a captioning vocabulary
closest to it in WordNet (Wu-Palmer similarity of their first noun senses), nearest first:
zebra -> horse, banana -> apple, giraffe -> deer.

A decoder that never saw "zebra" writes it where it would write its nearest known word: the word's
embedding and output row are borrowed from that word at load time (guidance.VocabularyExtension;
the DCC idea, Hendricks et al. 2016, with WordNet standing in for word vectors). The pool is the
vocabulary of a model's checkpoint (default: the bundled Flickr8k model); at run time each word
takes the first of its neighbours the loaded model knows.

Needs WordNet 3.0 once, here (as scripts/make_imagenet_words.py); nothing needs it at run time.

    python scripts/make_word_neighbours.py [--model CKPT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from captioner.checkpoint import atomic_write
from captioner.concepts import imagenet_classes
from captioner.metrics import _nltk_wordnet
from captioner.objects import COCO_OBJECTS
from captioner.paths import bundled_model_path

OUT = Path(__file__).resolve().parents[1] / "captioner" / "resources" / "word_neighbours.json"
KEEP = 6  # neighbours kept per word
MIN_SIMILARITY = 0.7  # Wu-Palmer below this is no neighbour (zebra-dog 0.76, zebra-horse 0.93, pizza-dog 0.3)
#: what a photo shows: a neighbour must be of the same lexicographer file ("toaster" the appliance
#: borrows from appliances, never from "someone", whose noun.person sense toaster also has)
CONCRETE = {"noun.animal", "noun.artifact", "noun.food", "noun.plant", "noun.object", "noun.substance"}


def imagenet_senses(wn) -> set:
    """Every synset an ImageNet class is, or is a kind of: the sense a tag word is meant in."""
    out = set()
    for c in imagenet_classes():
        level = [wn.synset_from_pos_and_offset(c["wnid"][0], int(c["wnid"][1:]))]
        while level:
            out.update(level)
            level = [h for s in level for h in s.hypernyms() + s.instance_hypernyms() if h not in out]
    return out


def sense(wn, word: str, preferred: set):
    """The noun sense a tag word means: one an ImageNet class is or is a kind of, else the first
    concrete one; None if it has no concrete sense."""
    senses = [s for s in wn.synsets(word, "n") if s.lexname() in CONCRETE]
    return next((s for s in senses if s in preferred), senses[0] if senses else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(bundled_model_path()), help="checkpoint whose vocabulary is the pool")
    parser.add_argument("--out", type=Path, default=OUT)
    a = parser.parse_args()
    wn = _nltk_wordnet()
    if wn is None:
        print("WordNet not found: install nltk's wordnet data or Debian's wordnet-base", file=sys.stderr)
        return 1
    vocab = torch.load(a.model, map_location="cpu", weights_only=True)["vocab"]["words"]
    preferred = imagenet_senses(wn)
    # the pool: the vocabulary's concrete nouns in their singular form (the plural follows at run time)
    pool = []
    for w in vocab:
        if w.isalpha() and wn.morphy(w, wn.NOUN) == w:
            s = sense(wn, w, preferred)
            if s is not None and s == wn.synsets(w, "n")[0]:  # its usual sense is a thing
                pool.append((w, s))
    words = {w for c in imagenet_classes() for w in c["words"]}
    words |= {n for names in COCO_OBJECTS.values() for n in names if " " not in n}
    table = {}
    for w in sorted(words):
        mine = sense(wn, w, preferred)
        if mine is None:
            continue
        same = [(v, s) for v, s in pool if v != w and s.lexname() == mine.lexname()]
        sims = sorted(((mine.wup_similarity(s) or 0.0, v) for v, s in same), reverse=True)
        near = [v for sim, v in sims[:KEEP] if sim >= MIN_SIMILARITY]
        if near:
            table[w] = near
    source = json.dumps(f"WordNet 3.0 Wu-Palmer neighbours among the nouns of {Path(a.model).name}'s vocabulary")
    lines = ",\n".join(f"{json.dumps(w)}: {json.dumps(n)}" for w, n in table.items())
    text = f'{{"source": {source},\n"neighbours": {{\n{lines}\n}}}}\n'
    atomic_write(a.out, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {a.out} ({len(table)} words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
