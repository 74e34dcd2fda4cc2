"""The order in which R sorts text: the levels of a factor, hence its reference level.

R's ``factor()`` sorts the distinct values with the locale's collation, and R as users run it
(Linux builds with ICU, macOS, ``en_US.UTF-8`` or ``C.UTF-8``) collates by ICU's root rules,
not by code point: ``a < B < c`` (code point: ``B < a < c``), ``e < é < z``, ``site_1 <
site1``.  So the reference level of a text column with mixed case differs from R's under a
code-point sort, and a contrast written by R's coefficient name (``sitec``) tests another
hypothesis.  :func:`r_sort_key` is ICU's three levels for the characters of such labels:

1. base characters: whitespace, then ASCII punctuation and symbols in ICU's order
   (:data:`PUNCTUATION`), then digits, then letters by their lower-case, accent-free form;
2. accents (a plain letter before an accented one);
3. case (lower before upper).

Checked against R 4.2's ``sort`` (ICU) on 400 random strings of letters, accents, digits,
blanks and punctuation (``tests/formula/test_r_collation.py``).  Characters outside ASCII
letters, digits, punctuation and accented Latin letters sort after them by code point.
"""

from __future__ import annotations

import unicodedata

#: Whitespace and ASCII punctuation and symbols, then the digits, in ICU's root order.
PUNCTUATION = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789"
_RANK = {c: i for i, c in enumerate(PUNCTUATION)}
_LETTERS = len(PUNCTUATION)
_OTHER = _LETTERS + 26


def r_sort_key(text: str) -> tuple:
    """A key that sorts strings as R's ``sort`` does under ICU collation (module doc)."""
    base, accents, case = [], [], []
    for ch in text:
        decomposed = unicodedata.normalize("NFD", ch)
        letter, marks = decomposed[0], decomposed[1:]
        lower = letter.lower()
        if lower in _RANK:
            base.append(_RANK[lower])
        elif "a" <= lower <= "z":
            base.append(_LETTERS + ord(lower) - ord("a"))
        else:
            base.append(_OTHER + ord(lower))
        accents.append(tuple(ord(m) for m in marks))
        case.append(0 if letter == lower else 1)
    return tuple(base), tuple(accents), tuple(case)


def r_sorted(values) -> list[str]:
    """The distinct ``values`` in R's order (:func:`r_sort_key`)."""
    return sorted(set(values), key=r_sort_key)


__all__ = ["r_sort_key", "r_sorted"]
