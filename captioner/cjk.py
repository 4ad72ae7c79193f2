"""Chinese and Japanese: scripts written without spaces between words.

Every other script is split into words by white space and punctuation (captioner/ptb.py), but a
Chinese or Japanese caption is one unbroken run of characters, which would be one "word". Without
a word segmenter (jieba, MeCab: dictionaries this project does not ship), the stated fallback is
the one Chinese caption benchmarks also report: each ideograph or kana is a token of its own.
Training, captions and metrics all see text through `segment`, and a caption's characters are
joined back without spaces (`join_words`).

No imports beyond `re`: scripts/make_metrics_fixture.py loads this file on its own, to segment
the text it hands to the official scorer exactly as captioner does.
"""

from __future__ import annotations

import re

# ideographs (CJK unified, extension A, compatibility), the iteration marks 々〆〇, hiragana,
# katakana (and its phonetic extensions and half-width forms)
_CJK = "\u3005-\u3007\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_ONE = re.compile(f"[{_CJK}]")
_EACH = re.compile(f"([{_CJK}])")


def segment(text: str) -> str:
    """Spaces around every Chinese/Japanese character, so each is a token; other text untouched."""
    return _EACH.sub(r" \1 ", text) if _ONE.search(text) else text


def is_cjk(token: str) -> bool:
    """A token that is one Chinese/Japanese character."""
    return len(token) == 1 and _ONE.match(token) is not None


def join_words(words: list[str]) -> str:
    """Words as a caption: spaces between words, none between two Chinese/Japanese characters."""
    out = ""
    for i, w in enumerate(words):
        if i and not (is_cjk(w) and is_cjk(words[i - 1])):
            out += " "
        out += w
    return out
