"""Tokenizer and vocabulary.

Captions are tokenised exactly as the COCO caption evaluation tokenises them (captioner/ptb.py),
so the words a model learns are the words the metrics count. Tokens without a letter or digit of
any script (punctuation, symbols, brackets) are dropped; Chinese and Japanese characters are
tokens of their own (captioner/cjk.py).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .cjk import join_words
from .ptb import coco_tokens

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_NAMED_BRACKET = re.compile("(?i)-[lr][rsc]b-")  # a superset of the names; the slow path decides
_BRACKETS = {"-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"}  # what the tokenizer makes of ( ) [ ] { }


def _is_word(token: str) -> bool:
    return any(ch.isalnum() for ch in token) and token not in _BRACKETS


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of a caption in any script, punctuation and symbols dropped."""
    return [t for t in coco_tokens(text) if _is_word(t)]


def has_words(text: str) -> bool:
    """`bool(tokenize(text))`, without tokenising a caption holding an ASCII letter or digit and
    no "&", "<" or bracket name like "-lrb-" (nearly all of them). ptb.py's scanner never drops
    such a character: no rule matches it as space or as dropped text, every rule that can take it
    emits it in its token (the split words emit a part holding letters and scan the rest again:
    "cannot" -> can not), and a lower-cased token holding it is no PUNCTUATION entry (their
    letters are upper case). So it ends in a word token unless it is spelled as an entity that
    becomes punctuation ("&mdash;" -> "--", "&amp;" -> "&") or is a bracket's name, typed
    ("-LRB-") or split out of an SGML tag."""
    if "&" not in text and "<" not in text and not _NAMED_BRACKET.search(text) and re.search("[A-Za-z0-9]", text):
        return True
    return bool(tokenize(text))


def word_counts(captions: Iterable[str]) -> Counter:
    return Counter(tok for c in captions for tok in tokenize(c))


class Vocabulary:
    """Word <-> index map with fixed specials: <pad>=0, <start>=1, <end>=2, <unk>=3."""

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        words = [w for w in words if w not in SPECIALS]
        self.itos: list[str] = list(SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")
        self.min_count = min_count

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        return cls.from_counts(word_counts(captions), min_count)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 5) -> Vocabulary:
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, min_count=min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str | Sequence[str], add_specials: bool = True) -> list[int]:
        """Token ids of a caption (str is tokenized first), wrapped in <start> ... <end>."""
        tokens = tokenize(caption) if isinstance(caption, str) else caption
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_specials else ids

    def words(self, ids: Iterable[int]) -> tuple[str, ...]:
        """The words of token ids; stops at <end>, skips <pad>/<start>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return tuple(words)

    def decode(self, ids: Iterable[int]) -> str:
        """Caption text of token ids (see `words`), Chinese/Japanese characters joined without spaces."""
        return join_words(list(self.words(ids)))

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.itos[len(SPECIALS) :], "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        return cls(d["words"], min_count=d.get("min_count", 1))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos
