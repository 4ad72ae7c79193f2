"""Generate captioner/resources/imagenet_words.json: for each ImageNet-1k class (the classifier's
order) a short label and the caption words that name it — its own one-word names, then those of
its WordNet hypernyms up to MAX_UP levels, without the abstract ones ("artifact", "organism").

Needs WordNet 3.0 once, here (nltk data, or Debian's wordnet-base: `apt-get install wordnet-base`);
nothing needs it at run time. The class list (WordNet ids, descriptions) comes from timm.

    python scripts/make_imagenet_words.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from timm.data import ImageNetInfo

from captioner.checkpoint import atomic_write
from captioner.metrics import _nltk_wordnet

OUT = Path(__file__).resolve().parents[1] / "captioner" / "resources" / "imagenet_words.json"
MAX_UP = 4  # hypernym levels: tabby -> domestic cat -> cat -> feline -> carnivore
#: hypernym names too general to describe a photo with
ABSTRACT = set(
    """entity object whole thing artifact artefact instrumentality device structure construction
    organism being living_thing animate_thing matter substance abstraction unit part portion
    container covering commodity merchandise ware equipment implement system means conveyance
    transport creation product physical_entity causal_agent cause agent article material stuff
    invertebrate vertebrate craniate chordate placental eutherian mammal mammalian carnivore
    protective_covering protection furnishing decoration ornament adornment instrument
    ungulate even-toed_ungulate odd-toed_ungulate ruminant rodent gnawer primate mechanism
    foodstuff food_product solid nutriment nourishment sustenance aliment alimentation victuals
    consumer_goods durables durable_goods worker person individual someone somebody mortal soul
    arthropod mollusk mollusc shellfish crustacean diapsid diapsid_reptile anapsid
    passerine passeriform_bird oscine oscine_bird percoid percoid_fish percoidean bony_fish
    teleost teleost_fish spiny-finned_fish acanthopterygian aquatic_vertebrate
    geological_formation formation natural_object plant_part plant_organ reproductive_structure
    vascular_plant tracheophyte angiosperm flowering_plant fungus""".split()
)


def single_words(synset) -> list[str]:
    return [n.lower() for n in synset.lemma_names() if "_" not in n and n.isalpha()]


def words_for(synset) -> list[str]:
    """The synset's own one-word names, then its hypernyms' (the nearest first; each hypernym's first
    name only, when it is one word: toy dog's second name is "toy")."""
    words = single_words(synset)
    level, seen = [synset], {synset}
    for _ in range(MAX_UP):
        parents = {h for s in level for h in s.hypernyms() + s.instance_hypernyms()} - seen
        level = sorted(parents, key=lambda h: h.name())  # nltk gives them in no fixed order
        seen.update(level)
        for h in level:
            if h.name().split(".")[0] in ABSTRACT:
                continue
            words += [w for w in single_words(h)[:1] if w not in ABSTRACT]
    return list(dict.fromkeys(words))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the table")
    out = parser.parse_args().out
    wn = _nltk_wordnet()
    if wn is None:
        print("WordNet not found: install nltk's wordnet data or Debian's wordnet-base", file=sys.stderr)
        return 1
    info = ImageNetInfo()
    classes = []
    for i in range(1000):
        wnid = info.index_to_label_name(i)  # "n02123045"
        synset = wn.synset_from_pos_and_offset(wnid[0], int(wnid[1:]))
        label = info.index_to_description(i).split(",")[0].strip()
        classes.append({"wnid": wnid, "label": label, "words": words_for(synset)})
    source = json.dumps("WordNet 3.0 hypernyms of the ImageNet-1k classes: scripts/make_imagenet_words.py")
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in classes)  # one class a line: readable diffs
    text = f'{{"source": {source},\n"classes": [\n{lines}\n]}}\n'
    atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {out} ({len(classes)} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
