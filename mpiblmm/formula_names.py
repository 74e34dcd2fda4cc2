"""Names in the formula form as R and lme4 give them (a helper of :mod:`mpiblmm.formula`).

- :func:`lme4_factor_names`: the random factors' names.  lme4 (``mkReTrms``) puts the
  random terms by decreasing number of levels (``rev(order(nl))``, only when they are not
  already in that order; so ties are reversed too when it reorders), and ``VarCorr`` names
  them by their groupings in that order, through ``make.names(unique = TRUE)`` when a
  grouping repeats: ``y ~ (1 | site) + (time || subject)`` has ``subject`` (the ``time``
  slope), ``subject.1`` (the intercept) and ``site``.
- :class:`ColumnAliases`: covariate columns whose R names are not Python names (``age.z``,
  ``x.1``, ``.hidden``, ``lambda``), renamed for formulaic, which evaluates the inside of a
  call as Python (``age.z`` would be an attribute), and named back in every name and message.
"""

from __future__ import annotations

import keyword
import re
from typing import Iterator, Sequence

#: R's reserved words (``?Reserved``): constants and keywords, never variables.
R_RESERVED = frozenset({"if", "else", "repeat", "while", "function", "for", "next", "break",
                        "in", "TRUE", "FALSE", "NULL", "Inf", "NaN", "NA", "NA_integer_",
                        "NA_real_", "NA_character_", "NA_complex_"})
_TOKEN = re.compile(r"(?<![A-Za-z0-9_.])[A-Za-z_.][A-Za-z0-9_.]*")


# --------------------------------------------------------------------------- R's make.names
def r_make_name(name: str) -> str:
    """R's ``make.names`` of one (ASCII) name: ``X`` before a name not starting with a
    letter or a dot (or a dot then a digit), ``.`` for every other invalid character, ``.``
    after a reserved word: ``site:grp`` -> ``site.grp``, ``g3:(g2:g1)`` -> ``g3..g2.g1.``."""
    out = name
    if not out or not ((out[0].isascii() and out[0].isalpha())
                       or (out[0] == "." and not out[1:2].isdigit())):
        out = "X" + out
    out = re.sub(r"[^A-Za-z0-9._]", ".", out)
    return out + "." if out in R_RESERVED else out


def r_make_unique(names: Sequence[str]) -> list[str]:
    """R's ``make.unique(names)``: a repeat of a name gets ``.1``, ``.2``, ..., the first
    number that is no name already."""
    taken = set(names)
    first: set[str] = set()
    counts: dict[str, int] = {}
    out = list(names)
    for i, name in enumerate(names):
        if name not in first:
            first.add(name)
            continue
        k = counts.get(name, 1)
        while f"{name}.{k}" in taken:
            k += 1
        out[i] = f"{name}.{k}"
        taken.add(out[i])
        counts[name] = k + 1
    return out


def r_make_names_unique(names: Sequence[str]) -> list[str]:
    """R's ``make.names(names, unique = TRUE)``: the names R leaves as they are keep their
    claim to the bare name before those it changes."""
    made = [r_make_name(n) for n in names]
    order = sorted(range(len(names)), key=lambda i: made[i] != names[i])
    unique = r_make_unique([made[i] for i in order])
    for i, name in zip(order, unique):
        made[i] = name
    return made


# --------------------------------------------------------------------------- lme4's factor names
def lme4_factor_names(groupings: Sequence[str], lme4_order: Sequence[tuple[int, ...]],
                      levels: Sequence[int]) -> list[str]:
    """The names lme4 (``VarCorr``) gives the random terms, in the order they are given.

    ``groupings``: each term's grouping as lme4 writes it (``subject``, ``g2:g1``);
    ``lme4_order``: a key putting the terms in ``findbars`` order (the formula's terms, a
    ``||`` term's pieces by ``terms()``'s order, then a ``/`` grouping's expansion);
    ``levels``: each term's number of levels (``nl``).
    """
    found = sorted(range(len(groupings)), key=lambda i: lme4_order[i])
    nl = [levels[i] for i in found]
    if any(b > a for a, b in zip(nl, nl[1:])):          # mkReTrms: any(diff(nl) > 0)
        ascending = sorted(range(len(found)), key=lambda k: nl[k])    # order(): stable
        found = [found[k] for k in reversed(ascending)]               # rev(order(nl))
    names = [groupings[i] for i in found]
    if len(set(names)) < len(names):                    # mkVarCorr: anyDuplicated(nms)
        names = r_make_names_unique(names)
    out = [""] * len(groupings)
    for i, name in zip(found, names):
        out[i] = name
    return out


# --------------------------------------------------------------------------- names for formulaic
def name_tokens(text: str) -> Iterator[re.Match]:
    """The names in an R expression that may be variables: not inside quotes or backticks,
    not a function (``log(``) nor an argument's name (``raw = ``), not a number (``.5``)."""
    quoted = _quoted_spans(text)
    for m in _TOKEN.finditer(text):
        if any(a <= m.start() < b for a, b in quoted):
            continue
        token = m.group()
        if token[0] == "." and token[1:2].isdigit():
            continue
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or (rest.startswith("=") and not rest.startswith("==")):
            continue
        yield m


def _quoted_spans(text: str) -> list[tuple[int, int]]:
    spans, quote, start, escaped = [], None, 0, False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote != "`":
                escaped = True
            elif ch == quote:
                spans.append((start, i + 1))
                quote = None
        elif ch in "'\"`":
            quote, start = ch, i
    if quote:
        spans.append((start, len(text)))
    return spans


def python_name(name: str) -> bool:
    """Is ``name`` usable as written in the Python formulaic evaluates?"""
    return name.isidentifier() and not keyword.iskeyword(name)


def backtick_names(text: str) -> str:
    """``text`` with every name that is not a Python name in backticks (formulaic's quoting),
    for parsing only (formulaic's term labels keep the backticks inside calls)."""
    out, pos = [], 0
    for m in name_tokens(text):
        if not python_name(m.group()) and m.group() not in R_RESERVED:
            out += [text[pos:m.start()], f"`{m.group()}`"]
            pos = m.end()
    return "".join(out) + text[pos:]


class ColumnAliases:
    """Python names for the columns whose names are not (``age.z`` -> ``_mpiblmm_c0_``).

    :meth:`rename` rewrites an R expression for formulaic; :meth:`restore` writes the
    column names back into a column name, term label or message.
    """

    _ALIAS = re.compile(r"(?<![A-Za-z0-9_.])_mpiblmm_c([0-9]+)_")

    def __init__(self, columns: Sequence[str]) -> None:
        self.alias: dict[str, str] = {}
        self.column: dict[str, str] = {}
        for i, name in enumerate(columns):
            if python_name(name) or name in R_RESERVED or (name[0] == "." and name[1:2].isdigit()):
                continue
            alias = f"_mpiblmm_c{i}_"
            self.alias[name] = alias
            self.column[alias] = name

    def python(self, column: str) -> str:
        """The name formulaic sees for ``column``."""
        return self.alias.get(column, column)

    def rename(self, text: str) -> str:
        """``text`` (R) with every aliased column name replaced by its alias."""
        if not self.alias:
            return text
        out, pos = [], 0
        for m in name_tokens(text):
            if m.group() in self.alias:
                out += [text[pos:m.start()], self.alias[m.group()]]
                pos = m.end()
        return "".join(out) + text[pos:]

    def restore(self, text: str) -> str:
        """``text`` with every alias replaced by its column's name (a level may follow it)."""
        if not self.alias:
            return text
        return self._ALIAS.sub(lambda m: self.column.get(m.group(), m.group()), text)
