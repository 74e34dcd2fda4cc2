"""Names in the formula form as R and lme4 give them (a helper of :mod:`mpiblmm.formula`).

- :func:`lme4_factor_names`: the random factors' names.  lme4 (``mkReTrms``) puts the
  random terms by decreasing number of levels (``rev(order(nl))``, only when they are not
  already in that order; so ties are reversed too when it reorders), and ``VarCorr`` names
  them by their groupings in that order, through ``make.names(unique = TRUE)`` when a
  grouping repeats: ``y ~ (1 | site) + (time || subject)`` has ``subject`` (the ``time``
  slope), ``subject.1`` (the intercept) and ``site``.
- :class:`ColumnAliases`: covariate columns whose R names are not Python names (``age.z``,
  ``x.1``, ``.hidden``, ``lambda``), renamed for formulaic, which evaluates the inside of a
  call as Python (``age.z`` would be an attribute), and named back in every name and message;
  a column whose name is not a syntactic R name (``age at scan``) by the name ``read.csv``
  gives it (``age.at.scan``, ``make.names``) or in backticks (`` `age at scan` ``, as with
  ``check.names = FALSE``), named back as R names it each way.
"""

from __future__ import annotations

import keyword
import re
from typing import Iterator, Sequence

#: R's reserved words (``?Reserved``): constants and keywords, never variables.
R_RESERVED = frozenset({"if", "else", "repeat", "while", "function", "for", "next", "break",
                        "in", "TRUE", "FALSE", "NULL", "Inf", "NaN", "NA", "NA_integer_",
                        "NA_real_", "NA_character_", "NA_complex_"})
#: A name in R code (letters of any script, as R in a UTF-8 locale).
_TOKEN = re.compile(r"(?<![\w.])(?:[^\W\d]|\.)[\w.]*")


# --------------------------------------------------------------------------- R's make.names
def _r_letter(ch: str) -> bool:
    """Can ``ch`` start a syntactic R name (R in a UTF-8 locale: any script's letters)?"""
    return ch.isalpha() if ch.isascii() else ch.isalnum()


def _r_word(ch: str) -> bool:
    """Can ``ch`` be in a syntactic R name?"""
    return ch.isalnum() or ch in "._" if ch.isascii() else ch.isalnum()


def r_make_name(name: str) -> str:
    """R's ``make.names`` of one name: ``X`` before a name not starting with a letter or a
    dot (or a dot then a digit), ``.`` for every other invalid character, ``.`` after a
    reserved word: ``site:grp`` -> ``site.grp``, ``g3:(g2:g1)`` -> ``g3..g2.g1.``,
    ``age at scan`` -> ``age.at.scan``; letters of other scripts are letters (R in a UTF-8
    locale: ``âge moyen`` -> ``âge.moyen``)."""
    out = name
    if not out or not (_r_letter(out[0]) or (out[0] == "." and not out[1:2].isdigit())):
        out = "X" + out
    out = "".join(ch if _r_word(ch) else "." for ch in out)
    return out + "." if out in R_RESERVED else out


def r_syntactic(name: str) -> bool:
    """Is ``name`` a syntactic R name (R writes it without backticks)?"""
    return bool(name) and r_make_name(name) == name


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


def plain_name(name: str) -> bool:
    """Can ``name`` be written bare in a formula (a name token, not R's reserved words nor a
    number such as ``.5``)?"""
    return bool(_TOKEN.fullmatch(name)) and name not in R_RESERVED \
        and not (name[0] == "." and name[1:2].isdigit())


class ColumnAliases:
    """The names a formula may give the table's columns, and Python names for them.

    A column is named in a formula as written when that is a name (``age``, ``age.z``), by
    ``read.csv``'s name (``make.names(unique = TRUE)``: ``age at scan`` -> ``age.at.scan``,
    ``if`` -> ``if.``) when that differs, or in backticks (`` `age at scan` ``).  Each way
    of writing it that is not a Python name gets a Python name (``_mpiblmm_c0_``) for
    formulaic; :meth:`rename` rewrites an R expression for formulaic, :meth:`restore` writes
    the names back as R writes them: ``age.at.scan``, `` `age at scan` `` (R's
    ``model.matrix`` backticks a name that is not syntactic), ``age.z`` for `` `age.z` ``.
    """

    _ALIAS = re.compile(r"(?<![\w.])_mpiblmm_c[0-9]+_")

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        #: read.csv's name of each column (``check.names = TRUE``).
        self.r_names = tuple(r_make_names_unique(self.columns))
        self.token: dict[str, str] = {}    # a bare name in the formula -> its Python name
        self.quoted: dict[str, str] = {}   # the text inside backticks -> its Python name
        self.column: dict[str, str] = {}   # a Python name -> the table's column
        self.alias: dict[str, str] = {}    # an alias -> the column's name as R writes it
        written: dict[tuple[str, str], str] = {}
        for name, r_name in zip(self.columns, self.r_names):
            forms = []
            if plain_name(name):
                forms.append((self.token, name, name))
            if r_name != name:
                forms.append((self.token, r_name, r_name))
            forms.append((self.quoted, name, name if r_syntactic(name) else f"`{name}`"))
            for table, spelling, as_r in forms:
                key = (name, as_r)
                if key not in written:
                    if as_r == name and python_name(name):
                        written[key] = name
                    else:
                        written[key] = f"_mpiblmm_c{len(self.alias)}_"
                        self.alias[written[key]] = as_r
                    self.column[written[key]] = name
                table.setdefault(spelling, written[key])

    def rename(self, text: str) -> str:
        """``text`` (R) with every name of a column (bare or in backticks) replaced by its
        Python name."""
        found = [(m.start(), m.end(), self.token.get(m.group())) for m in name_tokens(text)]
        found += [(a, b, self.quoted.get(text[a + 1:b - 1])) for a, b in _quoted_spans(text)
                  if text[a] == "`" and b - a >= 2 and text[b - 1] == "`"]
        out, pos = [], 0
        for start, end, python in sorted(found):
            if python is not None:
                out += [text[pos:start], python]
                pos = end
        return "".join(out) + text[pos:]

    def grouping(self, name: str) -> str | None:
        """The column a grouping names (as written: bare, read.csv's name or in backticks)."""
        if len(name) >= 2 and name[0] == name[-1] == "`":
            python = self.quoted.get(name[1:-1])
        else:
            python = self.token.get(name)
            if python is None and name in self.columns:
                return name
        return None if python is None else self.column[python]

    def suggestions(self) -> dict[str, str]:
        """For a did-you-mean: each way of naming a column -> the name to suggest (as a
        formula can write it: as written, else read.csv's name)."""
        out = {}
        for name, r_name in zip(self.columns, self.r_names):
            shown = name if plain_name(name) else r_name
            out.setdefault(name, shown)
            out.setdefault(r_name, shown)
        return out

    def restore(self, text: str) -> str:
        """``text`` with every alias replaced by its column's name as R writes it (a level
        may follow it)."""
        if not self.alias:
            return text
        return self._ALIAS.sub(lambda m: self.alias.get(m.group(), m.group()), text)
