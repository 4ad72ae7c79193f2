"""Caption metrics with the COCO caption evaluation's definitions (coco-caption / pycocoevalcap).

BLEU-1..4, ROUGE-L and CIDEr-D are pure Python and match pycocoevalcap to 1e-6 (tested against
a fixture it produced from over 1000 real, messy captions). METEOR needs outside help: the
official METEOR 1.5 jar (through pycocoevalcap, with Java), else nltk's re-implementation when
WordNet data is present, else it is reported as unavailable. Every result says which METEOR it used.

Inputs everywhere: `refs` and `cands` are dicts keyed by image id; refs[id] is a list of raw
reference strings, cands[id] one raw candidate string. Text is normalised as coco-caption does it
(captioner/ptb.py): its PTB tokenizer's tokens, lower-cased, punctuation tokens removed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .concepts import CATEGORIES, invented, kinds_named
from .errors import DataError
from .objects import object_naming
from .paths import cache_dir
from .ptb import coco_tokens, coco_tokens_in_order

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def normalize(text: str) -> list[str]:
    """coco-caption's text normalisation of one caption: lower-case PTB tokens without punctuation."""
    return coco_tokens(text)


def split_words(tokens: list[str]) -> list[str]:
    """Tokens as coco-caption's BLEU and CIDEr see them: its tokenizer's line split on any white space."""
    return " ".join(tokens).split() if any(ch.isspace() for t in tokens for ch in t) else tokens


def normalize_corpus(refs: Mapping[Any, Sequence[str]], cands: Mapping[Any, str]) -> tuple[dict, dict]:
    """(references, candidates) tokenised as coco-caption tokenises them: each side in one run, in
    the candidates' order, so that the few rules of its tokenizer that look at the next caption
    see the same one (see ptb.ptb_tokenize)."""
    keys = list(cands)
    flat = coco_tokens_in_order([r for k in keys for r in refs[k]])
    r_tok, start = {}, 0
    for k in keys:
        r_tok[k] = flat[start : start + len(refs[k])]
        start += len(refs[k])
    return r_tok, dict(zip(keys, coco_tokens_in_order([cands[k] for k in keys])))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(refs: Mapping[Any, list[list[str]]], cands: Mapping[Any, list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (token lists in): clipped n-gram precisions summed over the corpus, brevity
    penalty from the reference length closest to each candidate (the shorter on ties), no smoothing."""
    tiny, small = 1e-15, 1e-9  # coco-caption's guards against log(0) / division by zero
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for key, cand in cands.items():
        rs = refs[key]
        test_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            max_ref: Counter = Counter()
            for r in rs:
                max_ref |= _ngrams(r, k)  # element-wise max over references
            counts = _ngrams(cand, k)
            correct[k - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            guess[k - 1] += max(len(cand) - k + 1, 0)
    scores, prod = [], 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        score = prod ** (1.0 / (k + 1))
        scores.append(score * math.exp(1 - 1 / ratio) if ratio < 1 else score)
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(refs: Sequence[list[str]], cand: list[str], beta: float = 1.2) -> float:
    """ROUGE-L F-measure of one candidate: precision and recall each maxed over the references."""
    if not cand:
        return 0.0
    lcs = [_lcs(r, cand) for r in refs]
    prec = max(l / len(cand) for l in lcs)
    rec = max(l / len(r) if r else 0.0 for l, r in zip(lcs, refs))
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + beta**2) * prec * rec / (rec + beta**2 * prec)


class CiderD:
    """CIDEr-D against a fixed reference corpus, whose n-gram document frequencies (idf) it keeps:
    `cider_d` builds one per evaluation; self-critical training keeps one over the training
    references and scores every sampled caption against it (`score`)."""

    def __init__(self, refs: Mapping[Any, list[list[str]]], n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        counts = {key: [_all_ngrams(r, n) for r in rs] for key, rs in refs.items()}
        self.doc_freq: Counter = Counter()
        for cs in counts.values():
            self.doc_freq.update({g for c in cs for g in c})
        self.log_docs = math.log(float(len(refs)))
        self.refs = {key: [self._vector(c) for c in cs] for key, cs in counts.items()}

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        for g, tf in counts.items():
            w = tf * (self.log_docs - math.log(max(1.0, self.doc_freq[g])))
            vec[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 2)  # coco-caption's "length": bigram count
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, key: Any, cand: Sequence[str]) -> float:
        """CIDEr-D of one tokenised candidate against the references of `key`."""
        vh, nh, lh = self._vector(_all_ngrams(cand, self.n))
        total = 0.0
        for vr, nr, lr in self.refs[key]:
            penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total += val * penalty / self.n
        return 10.0 * total / len(self.refs[key])


def cider_d(
    refs: Mapping[Any, list[list[str]]], cands: Mapping[Any, list[str]], n: int = 4, sigma: float = 6.0
) -> dict[Any, float]:
    """CIDEr-D per image: tf-idf n-gram cosine (idf from this reference set), candidate weights
    clipped by the reference's, Gaussian length penalty, averaged over n and references, x10."""
    scorer = CiderD({key: refs[key] for key in cands}, n, sigma)
    return {key: scorer.score(key, cand) for key, cand in cands.items()}


def diversity(cands: Mapping[Any, str]) -> dict[str, Any]:
    """How varied a model's captions are (beam search tends to repeat a few safe sentences):
    distinct captions, the fraction of images whose caption no other image got, words used."""
    captions = [" ".join(normalize(c)) for c in cands.values()]
    counts = Counter(captions)
    return {
        "distinct_captions": len(counts),
        "unique_fraction": sum(1 for c in captions if counts[c] == 1) / max(len(captions), 1),
        "words_used": len({w for c in counts for w in c.split()}),
    }


def _all_ngrams(tokens: Sequence[str], n: int) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        c.update(_ngrams(tokens, k))
    return c


# ---- hallucination ----------------------------------------------------------------------------
def hallucination(r_tok: Mapping[Any, list[list[str]]], c_tok: Mapping[Any, list[str]]) -> dict[str, Any]:
    """How often captions name a kind of thing (a person, a dog, a bus; concepts.py) that none of
    the photo's references names: CHAIR (Rohrbach et al. 2018) computed from the references, since
    there are no object labels. Token lists in (`normalize_corpus`).

    hallucinated: the share of captions that invent at least one kind (CHAIR-s);
    hallucinated_mentions: the share of the kinds captions name that are invented (CHAIR-i);
    person_invented: of the photos no reference puts a person in (person_free_photos of them),
    the share whose caption does; animal_invented / vehicle_invented: the share of captions that
    invent an animal / a vehicle.
    """
    keys = list(c_tok)
    named = invented_any = 0
    invented_kinds = 0
    person_free = person_added = 0
    by_category = dict.fromkeys(CATEGORIES, 0)
    for k in keys:
        ref_kinds = [kinds_named(r) for r in r_tok[k]]
        cap_kinds = kinds_named(c_tok[k])
        bad = invented(cap_kinds, ref_kinds)
        named += len(cap_kinds)
        invented_kinds += len(bad)
        invented_any += bool(bad)
        for c in {c for c, _ in bad}:
            by_category[c] += 1
        if not any(c == "person" for rk in ref_kinds for c, _ in rk):
            person_free += 1
            person_added += any(c == "person" for c, _ in cap_kinds)
    n = max(len(keys), 1)
    return {
        "hallucinated": invented_any / n,
        "hallucinated_mentions": invented_kinds / named if named else 0.0,
        "person_invented": person_added / person_free if person_free else None,
        "person_free_photos": person_free,
        "animal_invented": by_category["animal"] / n,
        "vehicle_invented": by_category["vehicle"] / n,
    }


# ---- METEOR -------------------------------------------------------------------------------------
def meteor_backend() -> str:
    """Which METEOR this machine can compute: 'official-1.5', 'nltk' or 'unavailable'."""
    if os.environ.get("CAPTIONER_METEOR") == "off":
        return "unavailable"
    if shutil.which("java"):
        try:
            import pycocoevalcap.meteor.meteor  # noqa: F401

            return "official-1.5"
        except ImportError:
            pass
    return "nltk" if _nltk_wordnet() is not None else "unavailable"


_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()  # WordNet 3.0's lexicographer files, in file-number order
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def _debian_wordnet_as_nltk_data(source: Path) -> Path | None:
    """Lay Debian's WordNet 3.0 (wordnet-base) out as nltk data, adding the `lexnames` file nltk
    needs and Debian lacks. The files are copied once (36 MB): nltk refuses symbolic and hard
    links that point outside its data folder."""
    base = cache_dir() / "nltk_data"
    target = base / "corpora" / "wordnet"
    if (target / "lexnames").is_file():
        return base
    if not (source / "data.noun").is_file():
        return None
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet.", dir=_mkdir(base / "corpora")))
    for f in source.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)
    (tmp / "lexnames").write_text(
        "".join(f"{i:02d}\t{n}\t{_POS_NUMBER[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))
    )
    try:
        os.rename(tmp, target)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return base


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _nltk_wordnet():
    """nltk's WordNet from nltk data, else from Debian's /usr/share/wordnet ($WORDNET_DIR); or None."""
    import nltk
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    base = _debian_wordnet_as_nltk_data(Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet")))
    if base is None:
        return None
    if str(base) not in nltk.data.path:
        nltk.data.path.append(str(base))
    try:
        wordnet.ensure_loaded()
    except LookupError:
        return None
    return wordnet


# One METEOR 1.5 Java process per Python process, started on first use and kept: starting it
# (the JVM and the paraphrase table) takes 5-13 s, scoring a thousand captions a fraction of one.
_jvm: Any = None
_jvm_lock = threading.Lock()
_inherited: list[Any] = []


def _forget_jvm_in_child() -> None:
    """A forked child must not talk to (or, when collected, kill) its parent's Java process."""
    global _jvm
    if _jvm is not None:
        _inherited.append(_jvm)  # kept referenced: its __del__ would kill the parent's process
        _jvm = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_jvm_in_child)


def _official_meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    """pycocoevalcap's METEOR over normalised captions, through the kept Java process. A call that
    fails leaves the process out of step with us (and pycocoevalcap's lock held): it is dropped."""
    global _jvm
    from pycocoevalcap.meteor.meteor import Meteor

    with _jvm_lock:
        if _jvm is None:
            _jvm = Meteor()
        jvm = _jvm
        try:
            score, _ = jvm.compute_score(gts, res)
        except BaseException:
            _jvm = None
            _drop(jvm)
            raise
    return float(score)


def _drop(jvm: Any) -> None:
    """End a Meteor whose call failed: its process, reaped, and the lock that pycocoevalcap leaves
    held when a call fails part-way, which its __del__ takes (held, it hung the interpreter at exit)."""
    jvm.meteor_p.kill()
    jvm.meteor_p.wait()
    try:
        jvm.meteor_p.stdin.close()  # closed even when this raises: its unwritten line cannot be flushed
    except OSError:
        pass
    if jvm.lock.locked():
        jvm.lock.release()


def meteor(
    refs: Mapping[Any, list[str]],
    cands: Mapping[Any, str],
    backend: str | None = None,
    tokens: tuple[dict, dict] | None = None,
) -> float | None:
    """Mean METEOR over images from raw strings, or None when no backend is available.
    `tokens`: the corpus as `normalize_corpus` gives it, when the caller has it already."""
    backend = backend or meteor_backend()
    keys = list(cands)
    if backend not in ("official-1.5", "nltk"):
        return None
    r_tok, c_tok = tokens or normalize_corpus(refs, cands)
    if backend == "official-1.5":
        gts = {k: [" ".join(r) for r in r_tok[k]] for k in keys}
        res = {k: [" ".join(c_tok[k])] for k in keys}
        return _official_meteor(gts, res)
    from nltk.translate.meteor_score import meteor_score

    wn = _nltk_wordnet()
    return sum(meteor_score(r_tok[k], c_tok[k], wordnet=wn) for k in keys) / max(len(keys), 1)


def evaluate(
    refs: Mapping[Any, list[str]], cands: Mapping[Any, str], use_meteor: bool = True, novel: set[str] | None = None
) -> dict[str, Any]:
    """All COCO caption metrics for raw strings; keys as in METRICS plus 'METEOR_backend', counts,
    the hallucination measures and the object-naming ones (objects.py; `novel`: the COCO kinds the
    model's training captions rarely name, for novel_object_recall)."""
    missing = [k for k in cands if k not in refs]
    if missing:
        raise DataError(f"{len(missing)} candidate(s) have no references, e.g. image id {missing[0]!r}")
    r_tok, c_tok = normalize_corpus(refs, cands)
    out: dict[str, Any] = {}
    if not cands:
        return {**{m: None for m in METRICS}, "METEOR_backend": "unavailable", "images": 0, "references": 0}
    # coco-caption's BLEU and CIDEr split its tokenizer's lines on any white space, ROUGE-L on " " only:
    # they differ on the rare token that holds a no-break space ("3 1/2", phone numbers)
    r_words = {k: [split_words(r) for r in rs] for k, rs in r_tok.items()}
    c_words = {k: split_words(c) for k, c in c_tok.items()}
    for k, b in enumerate(bleu(r_words, c_words), start=1):
        out[f"BLEU-{k}"] = b
    backend = meteor_backend() if use_meteor else "unavailable"
    out["METEOR"] = meteor(refs, cands, backend, tokens=(r_tok, c_tok)) if backend != "unavailable" else None
    out["ROUGE-L"] = sum(rouge_l(r_tok[k], c_tok[k]) for k in cands) / len(cands)
    cider = cider_d(r_words, c_words)
    out["CIDEr-D"] = sum(cider.values()) / len(cider)
    out.update(hallucination(r_tok, c_tok))
    out.update(object_naming(r_tok, c_tok, novel))
    out["METEOR_backend"] = backend
    out["images"] = len(cands)
    out["references"] = sum(len(refs[k]) for k in cands)
    return out
