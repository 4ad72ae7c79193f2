"""coco-caption's tokenisation, in pure Python.

The COCO caption evaluation (coco-caption / pycocoevalcap) tokenises every caption with the
Stanford PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`, a Java program) and then drops a fixed
list of punctuation tokens. Every score depends on those tokens, so to report the official
figures without Java we reproduce that tokenizer's behaviour: a scanner that, like the JFlex
lexer it imitates, takes the longest match among its rules at each position (ties go to the
earlier rule). The rules were worked out from the tokenizer's output, not from its source, and
are checked against it (tests/fixtures/coco_metrics_parity.json, made by
scripts/make_metrics_fixture.py); the class of every non-ASCII character (part of a word, a
token of its own, dropped) is read off the official jar into `_ptb_chars.py`.

What the official tokenizer does that a plain regex tokenizer does not: a period ends a word
unless the word is a known abbreviation ("Mr.", "U.S.", "etc.", a single initial); clitics split
("dog's" -> dog 's, "don't" -> do n't, "cannot" -> can not); hyphenated words, numbers with
points and commas, slashes ("and/or", "24/7") and "o'clock" stay whole; curly quotes, dashes
and ellipses are normalised and then dropped; brackets become -lrb- and friends (and are kept,
as in coco-caption, whose punctuation list is upper-case); characters outside the Basic
Multilingual Plane (emoji) and control characters are dropped. Known difference, on purpose: a
line break inside a caption other than "\\n" (e.g. "\\r", U+2028) is a space here, while
coco-caption's tokenizer takes it as the end of the caption and shifts every later caption of
the run onto the wrong image. One addition: Chinese and Japanese characters are tokens of their
own (captioner/cjk.py: those scripts put no spaces between words); the parity fixture hands the
official tokenizer text segmented the same way.
"""

from __future__ import annotations

import re
from functools import cache

from ._ptb_chars import RUNS
from .cjk import segment

#: tokens coco-caption removes after tokenising (its PUNCTUATIONS list; it lower-cases first, so
#: the upper-case bracket names never match and -lrb- etc. are kept)
PUNCTUATION = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)

# Abbreviations that keep their period wherever they stand (read off the official tokenizer).
# Those of the first list are the tokenizer's "followed by lower case" kind: it prefers them even to
# a longer word when two more characters follow ("etc.A dog" -> etc. | a | dog).
_ABBREV_LOWER_NEXT = (
    "al ala apr ariz assn aug bancorp bhd bldg blvd bros calif co colo conn corp cos ct dak dec esq est etc ext "
    "feb fla fri ga inc ind intl jan jr jul jun kan kans ky ltd mar md mich minn mo mon mont neb nev nov oct okla "
    "penn plc rd rt sep sept seq sq sr sys tel tenn thu thurs tue tues univ va vt wed wis wisc wyo"
).split()
_ABBREV_UPPER_NEXT = (
    "adj adm adv alex assoc asst atty attys ave brig capt cf cie cmdr col comdr cpl dept det dr drs elec ens ft gen "
    "gov govs hon insp invt jos lieut lt maj messrs mlle mme mr mrs ms msgr mt natl pfc ph pres prof profs pvt rep "
    "reps rev sen sens sfc sgt spc st ste supt supts treas vs wm"
).split()
_ABBREV_CAPITALISED = "ark az del ill la mass miss ore pa tex wash".split()  # "Mass." yes, "mass." no (first kind)
_ABBREV_SPECIAL_LOWER_NEXT = (r"(?i:pp?t)[ye](?i:s)?", r"(?i:ph)\.(?i:d)")  # Pty Pte Ptys Ph.D
_ABBREV_SPECIAL_UPPER_NEXT = (r"(?i:m)[ft](?i:g)",)  # Mfg Mtg
_ABBREV_BEFORE_NUMBER = "ca fig figs no nos op pp prop art arts".split()  # "No. 5" keeps it, "no." alone not
# A single initial keeps its period ("Plan B. Next") unless one of these capitalised words follows,
# which the tokenizer takes as the start of a new sentence ("... a. The ...").
_SENTENCE_STARTS = (
    "a about according after an as at but he her here however if in it last many more now once "
    "one other our she since so some such that the their then there these they this we what when "
    "while yet you mr. ms."
).split()

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_SINGLE = {
    "£": "#",
    "€": "$",
    "\x80": "$",
    "¤": "$",
    "₠": "$",
    "¢": "cents",
    "¼": "1/4",
    "½": "1/2",
    "¾": "3/4",
    "⅓": "1/3",
    "⅔": "2/3",
}


def _runs() -> list[tuple[int, int, str]]:
    """The character table as (first, last, class) code-point runs."""
    out = []
    for run in RUNS.split():
        a, b = (int(x, 16) for x in run[:-1].split("-"))
        out.append((a, b, run[-1]))
    return out


def _ranges(kinds: str) -> str:
    """Regex class body of the non-ASCII BMP characters whose class is in `kinds`."""
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b, kind in _runs()
        if kind in kinds
    )


def _digits() -> str:
    """Non-ASCII characters of class L that are decimal digits (they make numbers, not words)."""
    return "".join(
        re.escape(chr(c)) for a, b, kind in _runs() if kind == "L" for c in range(a, b + 1) if chr(c).isdecimal()
    )


@cache
def _scanner() -> tuple[re.Pattern, list[tuple[re.Pattern, str]]]:
    """(white space, [(rule, name), ...] in priority order): built on first use."""
    digit_chars = _digits()
    word_chars = _ranges("L")
    DIG = f"[0-9{digit_chars}]"
    ALNUM = f"[A-Za-z0-9{word_chars}]"
    LET = f"(?:(?![0-9{digit_chars}]){ALNUM})"
    SP = f"[\\x00-\\x20\\x7f{_ranges('D')}]"
    HY = "[-_\u058a\u2010\u2011]"
    APOS = "['\x92\u2019]"
    APOSETC = "['\x92\u2019`\x91\u2018\u201b]"
    WORD = f"{LET}{ALNUM}*(?:[.!?]{LET}{ALNUM}*)*"
    NOT_LETTER = f"(?!{ALNUM})"
    ELIDED = f"(?:[dDoOlL]{APOSETC}{ALNUM})?"

    def longest_first(words: list[str]) -> str:  # a regex alternation takes the first that matches
        return "|".join(sorted(words, key=len, reverse=True))

    capitalised = "|".join(f"{w[0].upper()}(?i:{w[1:]})" for w in _ABBREV_CAPITALISED)
    abbrev_lower_next = (
        f"(?:{'|'.join(_ABBREV_SPECIAL_LOWER_NEXT)}|(?i:{longest_first(_ABBREV_LOWER_NEXT)})|{capitalised})\\."
    )
    abbrev_upper_next = f"(?:{'|'.join(_ABBREV_SPECIAL_UPPER_NEXT)}|(?i:{longest_first(_ABBREV_UPPER_NEXT)}))\\."
    starts = "|".join(f"{w[0].upper()}(?i:{re.escape(w[1:])})" if len(w) > 1 else w.upper() for w in _SENTENCE_STARTS)
    rules = [
        ("split3", r"(?i:cannot)"),  # can | not
        ("keep", r"(?i:c\+\+|[cf]#)"),
        ("split2", "(?i:gonna|gotta|lemme|gimme|wanna|'tis|'twas)(?![A-Za-z])"),
        (  # SGML-like tags stay one token (attribute values quoted, names apart by spaces)
            "tag",
            r"<(?:[!?][A-Za-z\-][^>\r\n]*|/?[A-Za-z][A-Za-z0-9:._\-]*"
            r"""(?: +[A-Za-z][A-Za-z0-9:._\-]*(?: *= *(?:"[^"\r\n]*"|'[^'\r\n]*'))?)* */?)>""",
        ),
        ("dash", "[\u2013\u2014\u2015\x96\x97]|&(?:MD|mdash|ndash);"),
        ("amp", "&amp;"),
        ("keep", WORD),
        # a word before a clitic competes with the clitic's length even when a letter follows ("y'dx": y | dx)
        ("host", f"({WORD})(?={APOS}(?i:s|m|d|re|ve|ll))" + f"{APOS}(?i:s|m|d|re|ve|ll)"),
        ("clitic", f"{APOS}(?i:s|m|d|re|ve|ll){NOT_LETTER}"),
        ("host", f"({LET}*(?![nN]){LET})(?=[nN]{APOS}[tT]{NOT_LETTER})[nN]{APOS}[tT]"),
        ("clitic", f"[nN]{APOS}[tT]{NOT_LETTER}"),
        ("keep", f"(?i:'em|'cause|'till?|'n'|y'(?={LET}))"),  # y' only before a letter; th' is th | '
        ("keep", f"{LET}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{LET}*"),  # Hawai'i, ma'am (a tie goes to host)
        ("keep", f"'{DIG}{DIG}[sS]?"),
        ("keep", f"{ELIDED}{ALNUM}+(?:{HY}{ELIDED}{ALNUM}+)*"),  # hyphenated, o'clock, 5km
        ("keep", r"[A-Za-z0-9][A-Za-z0-9.,]*(?:-[A-Za-z0-9]+)+"),  # points before the first hyphen: 1.5-2
        ("amp", r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"),  # AT&T, Q&A (capitals only)
        ("keep", f"{ALNUM}+(?:-{LET}+){{0,2}}(?:\\\\?/{ALNUM}+(?:-{LET}+){{0,2}}){{1,2}}"),  # and/or 24/7
        ("keep", f"[-+]?(?:{DIG}*(?:[.:,\u066b\u066c]{DIG}+)+|{DIG}+)"),  # 1,000.5 10:30 -5
        ("nbsp", f"(?:{DIG}{{1,4}}[- \u00a0])?{DIG}{{1,4}}\\\\?/{DIG}{{1,4}}"),  # fractions: 3 1/2
        (
            "nbsp",
            "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
            "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}",
        ),  # phone
        ("host", f"({abbrev_lower_next})(?s:..)"),  # competes as if the next two characters were its own
        ("keep", abbrev_lower_next),
        ("keep", abbrev_upper_next),
        ("keep", r"[A-Za-z](?:\.[A-Za-z])+\."),  # U.S. a.m. e.g.
        ("keep", f"[A-Za-z]\\.(?!{SP}+(?:{starts})(?:{SP}|$))"),
        ("keep", f"(?i:{'|'.join(_ABBREV_BEFORE_NUMBER)})\\.(?={SP}*{DIG})"),
        ("keep", f"{WORD}\\.(?=[,;:\u3001])"),
        ("drop", "\"|''|``|[`\u2018\u2019\u201b\u201c\u201d\x91-\x94\u2039\u203a\u00ab\u00bb']{1,2}"),
        ("keep", "[\u201a\u201e\u201f]"),
        ("bracket", r"[()\[\]{}]"),
        ("keep", "-(?i:LRB|RRB|LSB|RSB|LCB|RCB)-"),  # a bracket already written as its name
        ("hyphens", r"-+"),
        ("drop", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\x85\u2026]"),
        ("keep", r"[?!]+|<<|>>|@+|#+|_+|\*+|(?:\\\*){1,3}"),
        ("keep", f"@[A-Za-z_][A-Za-z_0-9]*|#{LET}+"),
        (
            "keep",
            '[a-zA-Z0-9][^ \\t\\n\\f\\r"<>|()\u00a0]*@(?:[^ \\t\\n\\f\\r"<>|().\u00a0]+\\.)*'
            '[^ \\t\\n\\f\\r"<>|().\u00a0]+',
        ),  # e-mail
        ("keep", r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"),
        (
            "keep",
            r"www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?",
        ),
        ("smiley", r"[<>]?[:;=][\-o\*']?[\(\)DPdpO\\{@\|\[\]]" + NOT_LETTER),
        ("single", f"[$%&+<=>\\\\^|~*:;,./{re.escape(''.join(_SINGLE))}{_ranges('S')}]"),
    ]
    return re.compile(f"(?:{SP}|[{_ranges('H')}])+"), [(re.compile(p), name) for name, p in rules]


def _emit(name: str, m: re.Match) -> tuple[list[str], int]:
    """The tokens a rule's match produces and how many characters it consumes."""
    text = m.group(0)
    if name == "keep":
        return [text], len(text)
    if name == "tag":  # its spaces become no-break spaces
        return [text.replace(" ", "\u00a0")], len(text)
    if name == "nbsp":  # one token even with spaces inside: they become no-break spaces
        return ["".join(_BRACKETS.get(c, c) for c in text).replace(" ", "\u00a0")], len(text)
    if name == "split3":
        return [text[:3]], 3
    if name == "split2":
        cut = 2 if text.startswith("'") else 3
        return [text[:cut]], cut
    if name == "host":
        return [m.group(1)], len(m.group(1))
    if name == "clitic":
        return [re.sub("['\x92\u2019]", "'", text)], len(text)
    if name == "dash":
        return ["--"], len(text)
    if name == "amp":
        return [text.replace("&amp;", "&")], len(text)
    if name == "drop":
        return [], len(text)
    if name == "bracket":
        return [_BRACKETS[text]], 1
    if name == "hyphens":
        return (["--"] if 2 <= len(text) <= 4 else [text]), len(text)
    if name == "smiley":
        return ["".join(_BRACKETS.get(c, c) for c in text)], len(text)
    return [_SINGLE.get(text, text)], len(text)  # single


def ptb_tokenize(text: str, following: str = "") -> list[str]:
    """PTB tokens of one caption, as coco-caption's tokenizer gives them (before lower-casing).

    `following`: the caption that comes next in the same run of the official tokenizer. It reads
    all captions as one text, one per line, and a few of its rules look past the end of the line:
    "... by Plan B." keeps "B." as an initial unless the next line starts a sentence ("The ...").
    """
    space, rules = _scanner()
    text = segment(_clean(text))
    n = len(text)
    if following:
        text += "\n" + segment(following.replace("\n", " "))  # as the official one sees it: soft hyphens in
    tokens: list[str] = []
    i = 0
    while i < n:
        m = space.match(text, i)
        if m:
            i = m.end()
            continue
        best, best_len = None, 0
        for rule, name in rules:
            r = rule.match(text, i)
            if r and r.end() - i > best_len:
                best, best_len = (name, r), r.end() - i
        if best is None:  # a character no rule takes (outside the BMP, e.g. emoji): dropped
            i += 1
            continue
        out, used = _emit(*best)
        tokens += out
        i += used
    return tokens


def _clean(text: str) -> str:
    """coco-caption puts each caption on one line; soft hyphens vanish, even inside words."""
    return text.replace("\n", " ").replace("\u00ad", "")


# The fast path: captions of one common shape, whose tokens are known without the scanner. Shape:
# white space (space, tab, newline: `_clean` makes "\n" a space) around and between tokens, a
# token being letter words joined by hyphens ("walk-in"), perhaps with "'s" attached ("man's"), or
# a lone "'s" ("man 's"); a comma directly after a token or after white space, always followed by
# white space; perhaps one period at the end, attached to the last token or after white space.
# Why the scanner's rules give exactly the tokens split off below (each word starts a token, as
# the scan only stops on white space, "," "." or "'" and otherwise consumes whole words):
# - at a word, WORD takes its letters (a period after it is followed by white space, a line
#   break or the end, never by a letter); only "'s" + non-letter lets `host` take longer (the
#   word; "'s" is then a clitic), only a hyphen lets the hyphenated rules take longer (the whole
#   hyphenated word: ELIDED's d'/o'/l' needs a letter after "'s", and the points-and-commas rule
#   stops at the white space that follows every comma or period); "y'" "th'" lose to `host`;
#   e-mail needs "@" and cannot pass white space; "www." needs a second period;
# - split words (cannot, gonna, gotta, lemme, gimme, wanna, in any case and anywhere, as split3
#   has no word boundary) are excluded, so split3/split2 never win;
# - every rule keeping a period after a word (the abbreviations of all lists, their special
#   forms, single initials, "No." before a number, "U.S.", WORD "." before , ; :) needs the
#   period attached to the word: so an attached final period after a single letter or after any
#   abbreviation of any list (in any case) goes to the slow path. These are also the only rules
#   that look past the caption into `following` (a line break, then that caption); the others
#   stop at white space, so the fast path never depends on `following`;
# - at "'s": clitic (2 characters) beats the quote drop (1) and the "'em"-style words; at "," and
#   ".": the number rule needs a digit, the ellipsis rule two more periods, so `single` takes them
#   and they are dropped as punctuation;
# - every other rule (C++, tags, dashes, &, slashes, numbers, phones, quotes, brackets, symbols,
#   smileys, URLs) needs a character outside the shape: digits, other punctuation, non-ASCII.
_WS = "[ \\t\\n]"
_TOKEN = "[A-Za-z]++(?:-[A-Za-z]++)*+(?:'[sS])?|'[sS]"
_FAST = re.compile(  # possessive (*+ ++): never backtracks, so a caption of another shape fails fast
    f"{_WS}*+(?:(?:{_TOKEN})(?:{_WS}*+,)?{_WS}++)*+(?:{_TOKEN})?(?:{_WS}*+\\.)?{_WS}*+"
)
_SPLIT_WORDS = re.compile("cannot|gonna|gotta|lemme|gimme|wanna")  # searched in the lower-cased caption
# words that may keep an attached period: single letters and every abbreviation above, in any case
_KEEPS_PERIOD = frozenset("abcdefghijklmnopqrstuvwxyz").union(
    _ABBREV_LOWER_NEXT, _ABBREV_UPPER_NEXT, _ABBREV_CAPITALISED, _ABBREV_BEFORE_NUMBER
)
_KEEPS_PERIOD_SPECIAL = re.compile(f"(?i:{'|'.join([*_ABBREV_SPECIAL_LOWER_NEXT, *_ABBREV_SPECIAL_UPPER_NEXT])})")


def _fast_tokens(caption: str) -> list[str] | None:
    """`coco_tokens` of a caption of the fast path's shape (see above; `following` never matters
    for it), or None for any other caption."""
    if _FAST.fullmatch(caption) is None:
        return None
    low = caption.lower()
    if _SPLIT_WORDS.search(low):
        return None
    end = low.rstrip(" \t\n")
    if end[-2:-1].isalpha() and end[-1] == ".":  # a period attached to the last token
        last = end[:-1].rsplit(None, 1)[-1].rsplit("-", 1)[-1]  # its last letter word (or 's)
        if "'" in last or last in _KEEPS_PERIOD or _KEEPS_PERIOD_SPECIAL.fullmatch(last):
            return None  # after "'s" (kept simple) or a word that may keep its period
    return low.replace(",", " ").replace(".", " ").replace("'", " '").split()


def _coco_tokens_slow(caption: str, following: str = "") -> list[str]:
    out = []
    for tok in ptb_tokenize(caption, following):
        out += [t for t in tok.lower().split(" ") if t and t not in PUNCTUATION]
    return out


def coco_tokens(caption: str, following: str = "") -> list[str]:
    """A caption as coco-caption scores it: PTB tokens, lower-cased, split on spaces (a few tokens,
    such as "3 1/2", hold one), punctuation tokens removed. `following`: see `ptb_tokenize`."""
    fast = _fast_tokens(caption)
    return fast if fast is not None else _coco_tokens_slow(caption, following)


def coco_tokens_in_order(captions: list[str]) -> list[list[str]]:
    """Captions tokenised as one run of coco-caption's tokenizer, in this order (what it does with
    a set's references, and separately with its candidates), so each sees the one after it."""
    return [coco_tokens(c, captions[k + 1] if k + 1 < len(captions) else "") for k, c in enumerate(captions)]
