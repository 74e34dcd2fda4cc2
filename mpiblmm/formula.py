"""The formula form of the spec: an lme4 formula over a covariates table -> the model arrays.

``"covariates": "participants.csv", "formula": "y ~ age * sex + (1 + time | subject)"``.

This module owns the formula language, nothing else:

- the bar syntax of random terms, parsed here: ``(terms | g)`` (several terms per bar,
  several bars), groupings ``g1:g2`` (interaction) and ``g1/g2`` (nested: ``g1`` and
  ``g2:g1``, as lme4's ``expandSlash``), ``(terms || g)`` (uncorrelated: one factor per term
  on the same grouping, as lme4);
- the fixed part and the terms inside each bar, given to formulaic, with the variables of
  every interaction put in R's order (first appearance in the formula) so the columns and
  their names are those of R's ``model.matrix``: ``(Intercept)``, ``age``, ``sexM``,
  ``time:sexM`` (treatment coding, reference level the first in R's sorted order,
  :mod:`mpiblmm.r_collation`);
- the columns of the covariates table the formula uses (the table itself is read by
  :mod:`mpiblmm.formula_table`, as R's ``read.csv`` reads it); grouping columns are labels as
  written (``01`` and ``1`` are different levels).

:func:`formula_model` returns plain arrays and names; :mod:`mpiblmm.design` makes the
:class:`~mpiblmm.design.Design` from them with ``build_design``, like the matrix form.
Factor names are lme4's (``VarCorr``'s): the grouping as written (``subject``,
``site:scanner``); where a grouping repeats, the names lme4 gives after putting the terms
by decreasing number of levels (:func:`mpiblmm.formula_names.lme4_factor_names`).
Column names that are not Python names (``age.z``, ``x.1``) are renamed for formulaic and
named back; a column whose name is not a syntactic R name (``age at scan``) is named by
read.csv's name (``age.at.scan``) or in backticks (:class:`mpiblmm.formula_names.ColumnAliases`).
"""

from __future__ import annotations

import dataclasses

import ast
import difflib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mpiblmm.errors import SpecError
from mpiblmm.lmm.type3 import Term, Type3Basis
from mpiblmm.formula_table import (R_LOGICAL, Table, numeric_column, r_labels, r_level,
                                   r_number, used_column)
from mpiblmm.formula_names import (ColumnAliases, backtick_names, lme4_factor_names,
                                   plain_name, r_syntactic)

#: A column name usable in a formula as written (letters of any script, as R in UTF-8).
VARIABLE = re.compile(r"^(?:[^\W\d]|\.)[\w.]*$")
#: A name in backticks, R's quoting of a name that is not syntactic (`` `age at scan` ``).
QUOTED = re.compile(r"^`[^`]+`$")
#: Names formulaic evaluates itself (transforms), never covariates.
TRANSFORMS = frozenset({"C", "I", "np", "scale", "center", "poly", "bs", "lag", "hashed",
                        "factor", "log", "log2", "log10", "log1p", "exp", "sqrt", "abs",
                        "contr", "levels"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m|[\u29da\u29db]")


# --------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Bar:
    """One random term after expansion: ``(terms | grouping)``.

    ``group`` the grouping variables as written (several for an interaction ``g1:g2``; a
    name, read.csv's name or one in backticks: ``ColumnAliases.grouping`` finds the column),
    ``name`` the grouping as lme4 writes it (``g2:g1``, `` `site id`:subject``, ``site id``
    alone; the factor's name is made unique from it by
    :func:`~mpiblmm.formula_names.lme4_factor_names`), ``text`` the term as written (for
    messages), ``lme4_order`` its place in lme4's ``findbars`` order (which expands ``||``
    before ``/``, and a ``||`` term's pieces in ``terms()``'s order, by degree).
    """

    terms: str
    group: tuple[str, ...]
    name: str
    text: str
    lme4_order: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParsedFormula:
    """The formula split into its response, fixed part and random terms."""

    lhs: str | None
    fixed: str
    bars: tuple[Bar, ...]


def _split_top(text: str, seps: str) -> list[tuple[str, str]]:
    """Split ``text`` at the characters ``seps`` outside brackets and quotes.

    Returns (separator before, piece) pairs; the first separator is ``""``.
    """
    out, depth, quote, start, sep = [], 0, None, 0, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise _FormulaProblem(f"unbalanced ')' at character {i + 1}")
        elif depth == 0 and ch in seps:
            out.append((sep, text[start:i]))
            sep, start = ch, i + 1
    if depth != 0 or quote:
        raise _FormulaProblem("unbalanced parentheses or quotes")
    out.append((sep, text[start:]))
    return out


class _FormulaProblem(Exception):
    """A problem with the formula text; becomes a SpecError naming the ``formula`` key."""


def _is_group(chunk: str) -> bool:
    """Is ``chunk`` one parenthesised group, '(' ... ')' with nothing outside?"""
    if not (chunk.startswith("(") and chunk.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(chunk):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(chunk) - 1:
            return False
    return True


def _bar_split(inner: str) -> tuple[str, str, bool] | None:
    """``terms | g`` or ``terms || g`` at the top level of ``inner``; None if no bar."""
    depth = 0
    for i, ch in enumerate(inner):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and ch == "|":
            if inner[i + 1:i + 2] == "|":
                return inner[:i], inner[i + 2:], False
            return inner[:i], inner[i + 1:], True
    return None


def _groupings(text: str, term: str) -> list[tuple[tuple[str, ...], str]]:
    """The groupings of a bar's right side and their lme4 names: ``g``, ``g1:g2``, and
    ``g1/g2/g3`` -> ``g3:(g2:g1)``, ``g2:g1``, ``g1`` (lme4's expandSlash)."""
    text = text.strip()
    if not text:
        raise _FormulaProblem(f"random term {term}: nothing after '|' (write the grouping column, e.g. (1 | subject))")
    parts = [p.strip() for _, p in _split_top(text, "/")]
    nested: list[tuple[str, ...]] = []
    for part in parts:
        names = tuple(n.strip() for _, n in _split_top(part, ":"))
        for n in names:
            if not (VARIABLE.match(n) or QUOTED.match(n)):
                raise _FormulaProblem(f"random term {term}: unsupported grouping {text!r} "
                                      "(use column names joined by ':' or '/')")
        nested.append(names)
    out = []
    for k in range(len(nested), 0, -1):
        group: tuple[str, ...] = ()
        for names in reversed(nested[:k]):
            group += names
        if len(group) == 1 and QUOTED.match(group[0]):   # lme4: deparse of the symbol
            name = group[0][1:-1]
        else:
            name = _lme4_name([tuple(map(_r_deparsed, names)) for names in nested[:k]])
        out.append((group, name))
    return out


def _r_deparsed(name: str) -> str:
    """A name as R's ``deparse`` writes it in a call: in backticks unless syntactic."""
    if QUOTED.match(name) and r_syntactic(name[1:-1]):
        return name[1:-1]
    return name


def _lme4_name(levels: list[tuple[str, ...]]) -> str:
    """lme4's name of the innermost grouping of ``a/b/c``: ``a``, ``b:a``, ``c:(b:a)``."""
    name = ":".join(levels[0])
    for i, names in enumerate(levels[1:]):
        outer = name if i == 0 else f"({name})"
        name = f"{':'.join(names)}:{outer}"
    return name


def parse_formula(text: str) -> ParsedFormula:
    """Split an lme4 formula into response, fixed part and expanded random terms.

    Raises
    ------
    SpecError
        Naming the ``formula`` key and the term at fault (``where`` is added by the caller).
    """
    try:
        return _parse(text)
    except _FormulaProblem as exc:
        raise SpecError(str(exc)) from None


#: R calls whose name starts with a Python keyword (``as.numeric``, ``is.na``): formulaic
#: cannot parse them (a Python syntax error); ``as.factor`` is read as ``factor``.
_KEYWORD_CALL = re.compile(r"(?<![\w.])((?:as|is)\.[A-Za-z_][\w.]*)\s*\(")
_PACKAGE_PREFIX = re.compile(r"(?<![\w.])([A-Za-z][\w.]*):::?([A-Za-z_.][\w.]*)")


def _unsupported_calls(rhs: str) -> None:
    """A one-line problem for R calls the formula language here cannot read: ``as.*`` and
    ``is.*`` functions (but ``as.factor``) and package prefixes (``splines::ns``)."""
    for m in _KEYWORD_CALL.finditer(rhs):
        name = m.group(1)
        if name == "as.factor":
            continue
        if name.startswith("is."):
            raise _FormulaProblem(f"{name}() is not supported: the covariates a formula uses "
                                  "have no missing values (a missing cell is an error)")
        raise _FormulaProblem(f"{name}() is not supported: write the column itself if it is "
                              "numeric, or factor(column) to read it as a factor")
    m = _PACKAGE_PREFIX.search(rhs)
    if m:
        raise _FormulaProblem(f"{m.group()!r}: package prefixes ({m.group(1)}::) are not "
                              f"supported; write the function alone ({m.group(2)})")


def _parse(text: str) -> ParsedFormula:
    sides = _split_top(text, "~")
    if len(sides) == 1:
        raise _FormulaProblem("no '~' (write e.g. y ~ age + (1 | subject))")
    if len(sides) > 2:
        raise _FormulaProblem("more than one '~'")
    lhs, rhs = sides[0][1].strip() or None, sides[1][1]
    _unsupported_calls(rhs)
    if lhs is not None and not VARIABLE.match(lhs):
        raise _FormulaProblem(f"the left side {lhs!r} must be one name, the image data (y)")
    fixed: list[str] = []
    bars: list[Bar] = []
    for sign, chunk in _split_top(rhs, "+-"):
        chunk = chunk.strip()
        if not chunk:
            if sign == "-" or not fixed and not bars:
                continue  # a leading '-' or '+'
            raise _FormulaProblem(f"empty term after {sign!r}")
        if _is_group(chunk) and (split := _bar_split(chunk[1:-1])) is not None:
            if sign == "-":
                raise _FormulaProblem(f"random term {chunk}: cannot be subtracted")
            terms, grouping, correlated = split
            if not terms.strip():
                raise _FormulaProblem(f"random term {chunk}: nothing before '|' (write e.g. (1 | g))")
            if "|" in terms or "|" in grouping:
                raise _FormulaProblem(f"random term {chunk}: more than one bar")
            first = len(bars)      # lme4: the formula's terms, each one's pieces, groupings
            for g, (group, name) in enumerate(_groupings(grouping, chunk)):
                for bar, rank in _expand_bar(terms.strip(), group, name, correlated, chunk):
                    bars.append(dataclasses.replace(bar, lme4_order=(first, rank, g)))
            continue
        if "|" in chunk:
            if re.search(r"(?<![\w.])I\(.*\|", chunk):  # lme4's findbars reads it as a bar too
                raise _FormulaProblem(f"term {chunk!r}: a '|' inside I() is read as a "
                                      "random-effects bar, as lme4 reads it: write the "
                                      "condition without it (its complement with &, e.g. "
                                      "I((a <= 1) & (b <= 2)) for not (a > 1 or b > 2))")
            raise _FormulaProblem(f"term {chunk!r}: a random term must stand alone in "
                                  "parentheses, e.g. + (1 + time | subject)")
        fixed.append(f"{sign} {chunk}" if fixed or sign == "-" else chunk)
    fixed_text = " ".join(fixed).strip() or "1"
    if fixed_text.startswith("-"):
        fixed_text = "1 " + fixed_text
    return ParsedFormula(lhs, fixed_text, tuple(bars))


def _expand_bar(terms: str, group: tuple[str, ...], name: str, correlated: bool,
                text: str) -> list[tuple[Bar, int]]:
    """One bar, or for ``||`` one bar per term (lme4: intercept, then ``0 + term`` each),
    each with its rank in lme4's order (``terms()``'s term labels: by degree, then as
    written); the bars themselves stay in the order written."""
    if correlated:
        return [(Bar(terms, group, name, text), 0)]
    try:
        import formulaic

        parsed = formulaic.Formula(_r_to_python(backtick_names(terms)), _ordering="none")
    except Exception as exc:  # formulaic's syntax errors have no common base class
        raise _FormulaProblem(f"random term {text}: {_one_line(exc)}") from None
    out = []
    pieces = [(":".join(_r_piece(f.expr) for f in t.factors), len(t.factors)) for t in parsed]
    if any(label == "1" for label, _ in pieces):
        out.append((Bar("1", group, name, text), 0))
    pieces = [(label, degree) for label, degree in pieces if label != "1"]
    by_degree = sorted(range(len(pieces)), key=lambda k: pieces[k][1])
    out.extend((Bar(f"0 + {pieces[k][0]}", group, name, text), 1 + by_degree.index(k))
               for k in range(len(pieces)))
    return out


def _r_piece(expr: str) -> str:
    """A factor of formulaic's term (parsed after :func:`backtick_names`) as R code again:
    backticks only around a name that is not one (`` `age at scan` ``, also inside calls)."""
    if "`" in expr:
        return re.sub(r"`([^`]*)`", lambda m: m.group(1) if plain_name(m.group(1))
                      else m.group(), expr)
    if expr == "1" or "(" in expr or plain_name(expr):
        return expr
    return f"`{expr}`"


def _outside_strings(text: str, change) -> str:
    """``text`` with ``change`` applied to its parts outside quoted strings ("TRUE" stays a
    string: I(answer == "TRUE") compared with "True" before)."""
    parts = re.split(r"(\"[^\"]*\"|'[^']*')", text)
    return "".join(part if i % 2 else change(part) for i, part in enumerate(parts))


def _r_to_python(text: str) -> str:
    """R spellings formulaic does not know: ``^`` inside a call is a power (``I(x^2)``),
    ``as.factor(x)`` is ``factor(x)``, ``TRUE``/``FALSE`` are Python's (and ``T``/``F`` as an
    argument's value, ``raw = T``), ``a %in% b`` is
    ``a:b`` (formulaic reads it as nesting, ``b/a``, adding ``b``'s main effect), ``C(x,
    sum)`` is ``C(x, "sum")`` (:func:`_r_factor_calls`)."""
    text = _r_factor_calls(text)
    text = re.sub(r"\s*%in%\s*", ":", text)       # R: a %in% b is the term a:b
    text = re.sub(r"\bas\.factor\s*\(", "factor(", text)
    text = _outside_strings(text, lambda part: re.sub(r"\bTRUE\b", "True",
                                                      re.sub(r"\bFALSE\b", "False", part)))
    # R's T and F as an argument's value (poly(age, 2, raw = T)); not a column named T.
    # Written bool(1) / bool(0), not True / False, so that the names keep R's spelling:
    # R deparses the symbol T as T ("poly(age, 2, raw = T)1"), :class:`_RConstants`
    text = re.sub(r"(?<![=!<>])(=\s*)T\b(?![\w.])", r"\1bool(1)",
                  re.sub(r"(?<![=!<>])(=\s*)F\b(?![\w.])", r"\1bool(0)", text))
    out, stack = [], []
    for i, ch in enumerate(text):
        if ch == "(":
            j = i - 1
            while j >= 0 and text[j] == " ":
                j -= 1
            stack.append(j >= 0 and (text[j].isalnum() or text[j] in "_."))
        elif ch == ")" and stack:
            stack.pop()
        out.append("**" if ch == "^" and any(stack) else ch)
    return "".join(out)


#: R's contrasts that ``C(x, contr)`` takes here, as C() accepts them: the function
#: (``contr.sum``; formulaic's ``contr`` has these five with R's values) or its short name
#: (``sum``, which R's C() reads as ``"contr.sum"``).
R_CONTRASTS = ("treatment", "sum", "helmert", "poly", "SAS")
_FACTOR_CALL = re.compile(r"(?<![\w.])(C|factor|as\.factor)\s*\(")


def _r_factor_calls(text: str) -> str:
    """Check every ``factor(x)`` and ``C(x, contr)`` of ``text``, and write C's short
    contrast names as strings (``C(grp, sum)`` -> ``C(grp, "sum")``, for :func:`_r_C`; the
    names keep R's spelling, :func:`r_expression`).

    What formulaic cannot code as R does is an error naming the call: ``factor()`` with
    more than its variable (``levels``, ``ordered``), ``C()`` with other contrasts
    (``contr.diff``), a contrast matrix or call (``contr.treatment(3)``: R's argument is the
    number of levels, formulaic's the base level), ``how.many`` or named arguments.
    """
    out, pos = [], 0
    for m, end, args in _factor_calls(text):
        call = text[m.start():end]
        named = [a for a in args if re.match(r"[\w.]+\s*=(?!=)", a)]
        if m.group(1) != "C" and (len(args) != 1 or named):
            raise SpecError(f"term {call!r}: {m.group(1)}() takes only the variable here "
                            "(levels, labels, ordered are not supported)")
        # contr.sum, sum, or "sum" as written here before (a || term is read twice)
        short = args[1].removeprefix("contr.").strip("\"'") if len(args) == 2 else None
        if m.group(1) == "C" and (len(args) > 2 or named or (short is not None
                                                             and short not in R_CONTRASTS)):
            raise SpecError(f"term {call!r}: C() takes the variable and one of R's contrasts "
                            f"by name: contr.{', contr.'.join(R_CONTRASTS)} (or "
                            f"{', '.join(R_CONTRASTS)}); no other contrasts, calls or arguments")
        args[0] = _r_factor_calls(args[0])
        if short is not None and not args[1].startswith("contr."):
            args[1] = f'"{short}"'
        out += [text[pos:m.start()], f"{m.group(1)}({', '.join(args)})"]
        pos = end
    return "".join(out) + text[pos:]


#: Why an R function lme4 users write is not a transform here (said after its name).
UNSUPPORTED = {
    "offset": ": offsets (a term with its coefficient fixed at 1) are not supported: "
              "subtract the offset from the images",
    "ordered": ": ordered factors (R's polynomial contrasts) are written "
               "C(factor(x), contr.poly) here",
}


def _factor_calls(text: str):
    """Each ``factor(...)``, ``as.factor(...)`` and ``C(...)`` call of ``text`` (not those
    inside them), in order: its match, the end of the call and its arguments."""
    pos = 0
    while (m := _FACTOR_CALL.search(text, pos)) is not None:
        depth, end = 1, m.end()
        while depth:                    # the call's closing ')' (the formula is balanced)
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        yield m, end, [a.strip() for _, a in _split_top(text[m.end():end - 1], ",")]
        pos = end


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """A library's error message on one line, without colour codes, at most ``limit`` chars;
    Python's parser is not named ("invalid syntax (<unknown>, line 1)": the term is not one
    R's formula syntax writes)."""
    if isinstance(exc, SyntaxError):
        if exc.text and re.search(r"!(?!=)", exc.text):  # R's not, which Python writes `not`
            return ("R's ! (not) is not supported here: write the comparison the other way "
                    f"round (time <= 1 for !(time > 1)) (near {exc.text.strip()[:60]!r})")
        near = f" near {exc.text.strip()[:60]!r}" if exc.text and exc.text.strip() else ""
        return f"not a term R's formula syntax writes ({exc.msg}{near})"
    text = " ".join(_ANSI.sub("", str(exc)).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- R names
def r_expression(expr: str) -> str:
    """A formulaic factor expression written as R's ``deparse`` would: ``I(age/10)``,
    ``I(age^2)``, ``log(age)``, ``a + b`` (spaces around ``+ - *``, none around ``/ ^``)."""
    try:
        node = ast.parse(expr, mode="eval")
    except SyntaxError:
        return expr
    node = _RConstants().visit(node)
    text = ast.unparse(node)
    text = text.replace(" ** ", "^").replace(" / ", "/").replace("'", '"')
    return re.sub(r"(?<=[(,\s])(\w+)=(?!=)", r"\1 = ", text)     # R: f(x, raw = TRUE)


class _RConstants(ast.NodeTransformer):
    """Constants as R's ``deparse`` writes them: ``TRUE``, ``FALSE``, ``1e+06``; C's short
    contrast names bare again (``C(grp, "sum")`` -> ``C(grp, sum)``, :func:`_r_factor_calls`)."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _short_contrasts(node) is not None:
            node.args[1] = ast.Name(id=node.args[1].value)
        if (isinstance(node.func, ast.Name) and node.func.id == "bool" and len(node.args) == 1
                and not node.keywords and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in (0, 1) and not isinstance(node.args[0].value, bool)):
            return ast.Name(id="T" if node.args[0].value else "F")     # R's T / F (above)
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, bool):
            return ast.Name(id="TRUE" if node.value else "FALSE")
        if isinstance(node.value, float) and math.isfinite(node.value):
            return ast.Name(id=r_number(node.value))
        return node


def _short_contrasts(node: ast.AST) -> str | None:
    """``sum`` for the call ``C(x, "sum")`` (C's short name, as :func:`_r_factor_calls`
    writes it), else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "C" \
            and len(node.args) == 2 and isinstance(node.args[1], ast.Constant) \
            and node.args[1].value in R_CONTRASTS:
        return node.args[1].value
    return None


def _contrasts_function(expr: str) -> bool:
    """Are the contrasts of ``expr`` given as R's function (``C(x, contr.treatment)``)?"""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return False
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
        and node.func.id == "C" and len(node.args) == 2 and isinstance(node.args[1], ast.Attribute)


def _r_contrast_labels(expr: str, contrasts: Any, levels: list, fields: list) -> list[str]:
    """R's labels of the columns of a factor coded by contrasts (``fields``: formulaic's).

    ``model.matrix`` labels them by the contrast matrix's column names, else 1, 2, ...:
    ``contr.sum`` and ``contr.helmert`` have none (``1 ... n-1``); ``contr.poly`` has
    ``.L .Q .C ^4 ...`` (formulaic's too); ``contr.treatment`` and ``contr.SAS`` called with
    the levels (a factor's default, ``C(x, treatment)``) have the levels but the reference,
    called with their number (``C(x, contr.treatment)``: C() calls the function with
    ``nlevels``) the levels' positions (``2 ... n``; SAS ``1 ... n-1``).
    """
    from formulaic.transforms.contrasts import HelmertContrasts, PolyContrasts, SumContrasts

    if isinstance(contrasts, PolyContrasts):
        return [str(f) for f in fields]
    if isinstance(contrasts, (SumContrasts, HelmertContrasts)):
        return [str(j) for j in range(1, len(levels))]
    if _contrasts_function(expr):
        return [str(levels.index(f) + 1) for f in fields]
    return [r_level(f) for f in fields]


def _codings(expr: str, info: dict, reduced: bool | None) -> list[tuple[str, str]]:
    """(formulaic's label, R's label) of each column of the categorical ``expr``: coded by
    indicators (``reduced`` False: one per level), by contrasts (True), either (None)."""
    state = info.get("contrasts")
    levels = list(state.levels if state is not None else info.get("categories") or [])
    out = []
    if reduced is not True:
        out += [(str(level), r_level(level)) for level in levels]
    if reduced is not False and state is not None:
        fields = list(state.contrasts.get_coding_column_names(levels, reduced_rank=True))
        form = state.contrasts.get_factor_format(levels, reduced_rank=True)   # "{name}[S.{field}]"
        ours = [form.format(name="", field=f)[1:-1] for f in fields]
        out += zip(ours, _r_contrast_labels(expr, state.contrasts, levels, fields))
    return out


def r_column_names(model_matrix: Any) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """R's column names of a formulaic model matrix, and R's term labels with their columns.

    ``Intercept`` -> ``(Intercept)``; ``sex[T.M]`` -> ``sexM``; ``time:sex[T.M]`` ->
    ``time:sexM``; ``I(age / 10)`` -> ``I(age/10)``; ``factor(v)[T.2.0]`` -> ``factor(v)2``;
    ``C(g, contr.sum)[S.a]`` -> ``C(g, contr.sum)1``; ``poly(x)[1]`` -> ``poly(x)``.
    A column that cannot be read so is an error naming its term.
    """
    spec = model_matrix.model_spec
    state = spec.encoder_state
    names = list(model_matrix.columns)
    out = list(names)
    terms = []
    parsed: dict[int, list[tuple[str, str, bool]]] = {}
    for structure in spec.structure:
        factors = [f.expr for f in structure.term.factors]
        label = ":".join(r_expression(e) for e in factors) if str(structure.term) != "1" else "(Intercept)"
        cols = [names.index(c) for c in structure.columns]
        terms.append((label, cols))
        # each column is one of the term's scoped terms (formulaic splits a term to keep full
        # rank, a:b without its margins, into scoped terms of fewer factors), each factor
        # coded by indicators or contrasts (reduced)
        candidates = [[(f.factor.expr, f.reduced) for f in scoped.factors]
                      for scoped in structure.scoped_terms] + [[(e, None) for e in factors]]
        for j in cols:
            if str(structure.term) == "1":
                out[j] = "(Intercept)"
                continue
            parts = next((p for c in candidates if (p := _r_parts(names[j], c, state))), None)
            if parts is None:
                raise SpecError(f"term {label!r}: cannot give its column {names[j]!r} R's name")
            parsed[j] = parts
    # R names a one-column matrix by its expression alone (poly(x), as scale(x)), the
    # columns of a wider one by its column names (poly(x, 2)1)
    width: dict[str, set[str]] = {}
    for parts in parsed.values():
        for e, label, matrix in parts:
            if matrix:
                width.setdefault(e, set()).add(label)
    for j, parts in parsed.items():
        out[j] = ":".join(r_expression(e) + ("" if matrix and len(width[e]) == 1 else label)
                          for e, label, matrix in parts)
    return out, terms


def _logical(expr: str) -> bool:
    """``I(...)`` of a comparison or a logical operation: R makes it a logical vector (a
    factor with levels FALSE and TRUE); formulaic a 0/1 column."""
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return False
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "I" and len(node.args) == 1):
        return False
    return _logical_node(node.args[0])


def _logical_node(node: ast.AST) -> bool:
    """A comparison, a logical operation, or ``&`` / ``|`` of such (R's elementwise and/or,
    written with the comparisons in parentheses: ``(time > 1) & (age > 51)``)."""
    if isinstance(node, (ast.Compare, ast.BoolOp)) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        return True
    return isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)) \
        and _logical_node(node.left) and _logical_node(node.right)


def _r_parts(column: str, factors: list[tuple[str, bool | None]],
             state: dict) -> list[tuple[str, str, bool]] | None:
    """A formulaic column read as a column of ``factors`` ((expression, reduced) in order):
    per factor its expression, R's label of its column (a level, a contrast, a power:
    ``poly(x, 2)[1]``) and whether that label is a matrix column's; None if not theirs."""
    pos, parts = 0, []
    for i, (e, reduced) in enumerate(factors):
        if i:
            if not column.startswith(":", pos):
                return None
            pos += 1
        if not column.startswith(e, pos):
            return None
        pos += len(e)
        kind, info = state.get(e, (None, {}))
        if getattr(kind, "value", None) == "categorical":
            for ours, r in _codings(e, info, reduced):
                after = pos + len(ours) + 2
                if column.startswith(f"[{ours}]", pos) and column[after:after + 1] in ("", ":"):
                    parts.append((e, r, False))
                    pos = after
                    break
            else:
                return None
        elif column.startswith("[", pos):       # a numeric matrix: poly(x, 2)[1]
            end = column.find("]", pos)
            if end < 0:
                return None
            level = column[pos + 1:end]
            if re.match(r"poly\(.*\braw\s*=\s*(True\b|bool\(1\))", e) and level.isdigit():
                level = str(int(level) + 1)      # formulaic counts raw powers from 0, R from 1
            parts.append((e, level, True))
            pos = end + 1
        else:          # R codes a logical as a factor: I(age > 40)TRUE
            parts.append((e, "TRUE" if _logical(e) else "", False))
    return parts if pos == len(column) else None


def _r_ordered(fixed: str) -> str:
    """The fixed part rewritten with every interaction's variables in R's order.

    R orders the variables of a term by their first appearance in the formula
    (``y ~ sex + time + time:sex`` has the term ``sex:time``); formulaic keeps them as
    written.  The terms themselves formulaic orders by degree, as R does.
    """
    import formulaic

    from formulaic.parser import DefaultFormulaParser

    parsed = formulaic.Formula(fixed, _ordering="none")
    order: dict[str, int] = {}
    # every variable as written, subtracted terms too: R's order of ``y ~ grp * time - grp``
    # is grp, time (its term ``grp:time``), though only ``time`` and ``grp:time`` are left
    stack = [DefaultFormulaParser().get_ast(fixed)]
    while stack:
        node = stack.pop()
        if hasattr(node, "args"):
            stack.extend(reversed(node.args))
        else:
            order.setdefault(str(node), len(order))
    for term in parsed:
        for f in term.factors:
            order.setdefault(f.expr, len(order))
    pieces = []
    intercept = False
    for term in parsed:
        if str(term) == "1":
            intercept = True
            continue
        factors = sorted((f.expr for f in term.factors), key=order.__getitem__)
        pieces.append(":".join(factors))
    return " + ".join(["1" if intercept else "0"] + pieces)


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class FormulaModel:
    """What the formula and table give: X with R's names and terms, the random factors."""

    X: np.ndarray
    names: tuple[str, ...]
    terms: tuple[tuple[str, tuple[int, ...]], ...]      # R term label, its columns of X
    factors: tuple[tuple[str, list[str], np.ndarray, tuple[str, ...]], ...]  # name, labels, Z, effects
    #: the hypothesis (rows x p) lmerTest's ``anova`` tests for each term listed
    #: (:func:`_anova_hypotheses`); a term not listed is tested by its own columns.
    type3: tuple[tuple[str, np.ndarray], ...] = ()
    #: the fixed part has one term: ``anova`` tests type I rows, those of each voxel's own
    #: X'X (``type3`` holds them for every observation).
    one_term: bool = False
    #: what the type III hypotheses of ``type3`` are made from, to make them again where a
    #: voxel's observed rows drop columns (:func:`mpiblmm.lmm.type3.observed_type3`): with
    #: treatment coding where some term is contained in another, with other codings always
    #: (where those hypotheses could be made); ``None`` for a one-term fixed part.
    type3_basis: Type3Basis | None = None
    #: terms left with one column by :func:`without_columns` that ``anova`` still tests (F)
    f_terms: frozenset[str] = frozenset()


def _log(x, base=None):
    """R's ``log(x, base)`` (natural by default; ``log10``/``log2`` for those bases, as R)."""
    if base is None:
        return np.log(x)
    if base == 10:
        return np.log10(x)
    if base == 2:
        return np.log2(x)
    return np.log(x) / np.log(base)


def _r_C(data, contrasts=None):
    """R's ``C(x, contr)``: ``contr`` formulaic's class of one of R's contrasts
    (``contr.sum``) or C's short name of one (``"sum"``, :func:`_r_factor_calls`)."""
    from formulaic.transforms import C
    from formulaic.transforms.contrasts import ContrastsRegistry

    if isinstance(contrasts, str):
        contrasts = getattr(ContrastsRegistry, contrasts)
    return C(data, contrasts)


def _context() -> dict:
    from formulaic.transforms import C

    return {"C": _r_C, "factor": C, "log": _log, "log2": np.log2, "log10": np.log10,
            "log1p": np.log1p, "exp": np.exp, "sqrt": np.sqrt, "abs": np.abs}


def _used_variables(text: str, table: Table, where: str, aliases: ColumnAliases) -> set[str]:
    """The names of covariate columns (formulaic's: ``aliases``' Python names) a formula part
    reads (``text``: its columns renamed by ``aliases``); an unknown name is an error with a
    suggestion, the first unknown name in the order written."""
    import formulaic

    if re.search(r"(^|[+\-~*:(\s])\.(\s|$|[+\-)])", text):
        raise SpecError(f"{where}: '.' (every column) is not supported: name the covariates")
    parsed = formulaic.Formula(text, _ordering="none")
    columns = aliases.column
    used = set()

    def written_at(name: str) -> int:     # a set's order changes from run to run
        m = re.search(rf"(?<![\w.]){re.escape(name)}", text)
        return m.start() if m else len(text)

    for name in sorted(parsed.required_variables, key=lambda v: (written_at(v), v)):
        if name in columns:
            used.add(name)
        elif name in TRANSFORMS:
            continue
        elif re.search(rf"(?<![\w.]){re.escape(name)}\s*\(", text):
            raise SpecError(f"{where}: unknown function {name!r}{UNSUPPORTED.get(name, '')} "
                            f"(supported: {', '.join(sorted(TRANSFORMS - {'np', 'contr', 'levels', 'lag', 'hashed'}))})")
        else:
            # formulaic reads age.zz inside a call as age's attribute: name the whole word
            dotted = re.search(rf"(?<![\w.]){re.escape(name)}\.[\w.]*", text)
            name = dotted.group() if dotted else name
            raise SpecError(f"{where}: no column {name!r} in {table.path}"
                            f"{_column_hint(name, table, aliases)}")
    # formulaic leaves out the variables of stateful transforms (scale, center, poly)
    used |= {w for w in re.findall(r"[\w.]+", text) if w in columns}
    return used


def _column_hint(name: str, table: Table, aliases: ColumnAliases) -> str:
    """`` (did you mean 'age'?)`` when a column is named close to ``name`` (as a formula can
    name it), else `` (its columns: subject, age, ...)``."""
    choices = aliases.suggestions()
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {choices[close[0]]!r}?)"
    shown = [repr(n) if not VARIABLE.match(n) else n for n in table.names[:30]]
    more = f", ... ({len(table.names)} in all)" if len(table.names) > 30 else ""
    if len(table.names) == 1 and re.search(r"[;\t|]", table.names[0]):
        more += ("; one column only: separate the columns by commas (CSV), or by tabs in a "
                 ".tsv file")
    return f" (its columns: {', '.join(shown)}{more})"


def _frame(table: Table, used: dict[str, str], aliases: ColumnAliases):
    """The data frame formulaic evaluates: a column of the table under each of its Python
    names in ``used`` (with what uses it, for messages)."""
    import pandas as pd

    from mpiblmm.r_collation import r_sorted

    data = {}
    for python in sorted(used):
        name = aliases.column[python]
        used_column(table, name, used[python])
        values = numeric_column(table, name)
        if values is None:   # text: a factor with its levels in R's order (r_collation)
            cells = r_labels(table, name)     # a logical column's T/F: TRUE/FALSE
            values = pd.Categorical(cells, categories=r_sorted(cells))
        data[python] = values
    return pd.DataFrame(data, index=range(table.n))


def _matrix(text: str, frame, where: str, table: Table | None = None):
    """The model matrix of ``text`` with R's coding of each categorical variable
    (:mod:`mpiblmm.r_coding`); where that is rank deficient (``a:b`` of two text columns
    with an intercept, which lme4 trims), formulaic's full-rank coding of the same terms.
    ``table``: the frame's, to name the row where a transform gives NaN (``log`` of a
    negative value)."""
    import formulaic

    from mpiblmm.checks import dependent_column
    from mpiblmm.r_coding import RCodingMaterializer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ordered = _r_ordered(text)
            mm = formulaic.model_matrix(ordered, frame, context=_context(), na_action="raise",
                                        materializer=RCodingMaterializer)
            if mm.shape[1] and dependent_column(np.asarray(mm, dtype=np.float64)) is not None:
                full_rank = formulaic.model_matrix(ordered, frame, context=_context(),
                                                   na_action="raise")
                # formulaic's coding only where it spans R's columns: else a redundant column
                # elsewhere (I(2 * age) beside age) changed the model of other terms
                # (time:sex + sex:grp), and R's coding is kept, trimmed as lme4 trims it
                if _same_span(np.asarray(mm, dtype=np.float64),
                              np.asarray(full_rank, dtype=np.float64)):
                    mm = full_rank
            return mm
    except SpecError:
        raise
    except Exception as exc:  # formulaic raises many types for a bad term
        if table is not None and "null values after evaluation" in str(exc):
            _nan_after_transform(ordered, frame, where, table)
        raise SpecError(f"{where}: {_one_line(exc)}") from None


def _same_span(A: np.ndarray, B: np.ndarray) -> bool:
    """Whether the columns of ``A`` and ``B`` (n rows each) span the same space: both ranks
    equal the rank of the two side by side (columns scaled to unit length: units do not
    decide; the rank tolerance of :func:`mpiblmm.checks.dependent_column`)."""
    from mpiblmm.checks import RANK_RTOL

    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        return True  # a term of Inf or NaN: refused by the caller's check, in its words

    def rank(M: np.ndarray) -> int:
        norm = np.linalg.norm(M, axis=0)
        M = M[:, norm > 0] / norm[norm > 0]
        if M.shape[1] == 0:
            return 0
        sv = np.linalg.svd(M, compute_uv=False)
        return int(np.count_nonzero(sv ** 2 > RANK_RTOL * sv[0] ** 2))

    both = rank(np.hstack([A, B]))
    return rank(A) == both and rank(B) == both


def _nan_after_transform(text: str, frame, where: str, table: Table) -> None:
    """Raise the error naming the first row where a term of ``text`` is NaN although its
    columns are numbers (``log(x)``, ``sqrt(x)`` of a negative ``x``; R says "NaNs produced"
    and lmer drops the row without a word); formulaic's own words did not say which row."""
    import formulaic

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # numpy's "invalid value encountered in log"
            mm = formulaic.model_matrix(text, frame, context=_context(), na_action="ignore")
    except Exception:  # noqa: BLE001  (the caller's message then)
        return
    values = np.asarray(mm, dtype=np.float64)
    bad = np.argwhere(np.isnan(values))
    if bad.size:
        row, col = bad[0]
        raise SpecError(f"{where}: {r_expression(str(mm.columns[col]))} is not a number (NaN) "
                        f"at row {table.lines[row]} of {table.path} (a log or square root of "
                        "a negative value?): remove the row and its image, or change the term")


def _single_levels(mm, terms: list[tuple[str, list[int]]], what: str) -> None:
    """A categorical variable with one level makes no column (formulaic drops it where R
    stops with "contrasts can be applied only to factors with 2 or more levels"): an error
    naming the term, not a model silently without it."""
    state = mm.model_spec.encoder_state
    for structure, (label, cols) in zip(mm.model_spec.structure, terms):
        for f in structure.term.factors:
            kind, info = state.get(f.expr, (None, {}))
            levels = info.get("categories") if isinstance(info, dict) else None
            if getattr(kind, "value", None) == "categorical" and levels is not None \
                    and len(levels) < 2:
                raise SpecError(f"{what} {label!r}: {r_expression(f.expr)} has a single level "
                                f"({levels[0]!r} in every row); a factor needs two or more "
                                "levels: remove the term")


def _finite_columns(mm, names: list[str], table: Table, what: str) -> None:
    """A column a transform made non-finite (``I(age/0)``, ``log(0)``): an error naming the
    column and the first row, not a rank test on NaN."""
    values = np.asarray(mm, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise SpecError(f"{what} {names[col]!r} is not a finite number ({values[row, col]}) "
                        f"at row {table.lines[row]} of {table.path}")


def formula_model(formula: str, table: Table) -> FormulaModel:
    """Evaluate ``formula`` on ``table`` (one row per observation).

    Raises
    ------
    SpecError
        Without a ``where``: the caller prefixes the spec's ``formula`` key.
    """
    _refused_in_I(formula, table)
    logical = _logical_calls(formula)
    if logical and (as_r := _logical_as_factors(formula, table, logical)) is not None:
        return as_r
    aliases = ColumnAliases(table.names)
    try:
        model = _formula_model(formula, table, aliases)
    except SpecError as exc:
        if not aliases.alias:
            raise
        raise SpecError(aliases.restore(exc.message), exc.where) from None
    if not aliases.alias and "as.factor" not in formula:
        return model
    # as.factor(x) is read as factor(x): R's spelling back, from the part that writes it (the
    # fixed part, or the random term of those effects)
    parsed = parse_formula(formula) if "as.factor" in formula else None
    spellings = [] if parsed is None else [_as_factor_spelling(parsed.fixed)]
    bar_spellings = [] if parsed is None else [_as_factor_spelling(b.terms) for b in parsed.bars]

    def back(name: str, spelled: list | None = None) -> str:
        name = aliases.restore(name) if aliases.alias else name
        for step in spellings if spelled is None else spelled:
            name = step(name)
        return name

    def back_effect(k: int, name: str) -> str:
        return back(name, bar_spellings[k:k + 1] if k < len(bar_spellings) else [])

    return _renamed(model, back, back_effect)


def _renamed(model: FormulaModel, back, back_effect=None) -> FormulaModel:
    """``model`` with its column, term and hypothesis names passed through ``back`` and the
    effects of its ``k``-th random factor through ``back_effect(k, name)`` (default
    ``back``)."""
    effect = back_effect or (lambda k, name: back(name))
    return FormulaModel(
        model.X, tuple(back(n) for n in model.names),
        tuple((back(label), cols) for label, cols in model.terms),
        tuple((name, labels, Z, tuple(effect(k, e) for e in effects))
              for k, (name, labels, Z, effects) in enumerate(model.factors)),
        tuple((back(label), L) for label, L in model.type3), model.one_term,
        None if model.type3_basis is None else dataclasses.replace(model.type3_basis, terms=tuple(
            dataclasses.replace(t, label=back(t.label)) for t in model.type3_basis.terms)))


_I_CALL = re.compile(r"(?<![\w.])I\(")


def _calls(opening: re.Pattern, formula: str):
    """Each call of ``formula`` whose name and ``(`` ``opening`` matches (not those inside
    another): the match, its end (past the closing parenthesis) and its argument."""
    pos = 0
    while (m := opening.search(formula, pos)) is not None:
        depth, end = 1, m.end()
        while depth and end < len(formula):
            depth += {"(": 1, ")": -1}.get(formula[end], 0)
            end += 1
        yield m, end, formula[m.end():end - 1]
        pos = end


def _I_calls(formula: str):
    """Each ``I(...)`` call of ``formula`` (not those inside another): start, end, argument."""
    for m, end, inner in _calls(_I_CALL, formula):
        yield m.start(), end, inner


_TABLE_WIDE_CALL = re.compile(r"(?<![\w.])(scale|center|poly)\s*\(")
_RAW_POLY = re.compile(r"\braw\s*=\s*(TRUE|T|True)\b")


def table_wide_transforms(formula: str) -> list[str]:
    """The calls of ``formula`` whose columns depend on the rows they are computed on --
    ``scale(x)``, ``center(x)``, ``poly(x, d)`` (not ``raw = TRUE``) -- as written, once each:
    mpiblmm computes them on every row of the table, lme4 given a voxel's observed rows on
    those rows."""
    found = []
    for m, end, _ in _calls(_TABLE_WIDE_CALL, formula):
        call = formula[m.start():end]
        if not (m.group(1) == "poly" and _RAW_POLY.search(call)) and call not in found:
            found.append(call)
    return found


def _refused_in_I(formula: str, table: Table) -> None:
    """Refuse what ``I()`` would evaluate otherwise than R: a logical column (TRUE/FALSE
    cells), a factor here of the labels TRUE and FALSE, not R's logical vector
    (``I(smoker == TRUE)`` compared text with True and gave a zero column, left out with a
    note, where R has the smoker indicator; ``I(smoker & time > 1)`` failed in formulaic's
    words), and an ``&`` that does not join two comparisons (:func:`_and_or_of_comparisons`)."""
    for start, end, inner in _I_calls(formula):
        unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", "", inner)  # not words inside a string
        for word in dict.fromkeys(re.findall(r"(?<![\w.])[A-Za-z.][\w.]*", unquoted)):
            if word in table.names and numeric_column(table, word) is None \
                    and all(c in R_LOGICAL for c in table.cells[word]):
                raise SpecError(
                    f"term {formula[start:end]!r}: {word!r} is a logical column (TRUE/FALSE), "
                    f"which enters a formula as a factor here, not as R's logical vector, and "
                    f"cannot be used inside I(): write {word} for its TRUE level (the column "
                    f"{word}TRUE), or recode it as 0/1 in {table.path} and compare it, "
                    f"I(({word} == 1) & (time > 1))")
        _and_or_of_comparisons(formula[start:end], inner)


def _and_or_of_comparisons(call: str, inner: str) -> None:
    """Refuse an ``&`` inside ``I()`` that does not join two comparisons (or logical terms
    of such): Python, which evaluates ``I()``, binds ``&`` more tightly than a comparison
    (``I(x & t > 1)`` is ``(x & t) > 1``, a zero column where R has ``x & (t > 1)``), and
    its ``&`` of numbers is bitwise (``2 & 1`` is 0, R's TRUE)."""
    try:
        tree = ast.parse(_r_to_python(inner), mode="eval")
    except SyntaxError:
        return  # (said where the formula is evaluated)
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)) \
                and not (_logical_node(node.left) and _logical_node(node.right)):
            raise SpecError(f"term {call!r}: & inside I() joins comparisons here, each in "
                            "parentheses, e.g. I((time > 1) & (age > 50)) (Python, which "
                            "evaluates I(), binds & more tightly than a comparison, and its & "
                            "of numbers is bitwise)")


def _logical_calls(formula: str) -> list[tuple[int, int, str]]:
    """Each ``I(...)`` of ``formula`` whose argument is a comparison or a logical operation
    (:func:`_logical`): its start, end and argument as written."""
    return [(start, end, inner) for start, end, inner in _I_calls(formula)
            if _logical(formula[start:end])]


def _logical_as_factors(formula: str, table: Table,
                        calls: list[tuple[int, int, str]]) -> FormulaModel | None:
    """The model with each logical ``I(...)`` written as ``factor(...)``, named ``I(...)``
    again; ``None`` where that cannot be evaluated (a comparison with one value, which R
    refuses as a factor of one level; the caller then builds the 0/1 columns).

    R makes a comparison a logical vector, a factor of FALSE and TRUE; formulaic a 0/1
    column.  Where R codes that factor by contrasts (an intercept, or the term's margin
    before it) both are the column ``I(x > 1)TRUE``; where R codes it by indicators (no
    intercept, an interaction without its margin such as ``age:I(age > 50)``, a random
    term ``(0 + I(t > 1) | g)``) R has a column per level and the 0/1 column was a smaller
    model (formula audit: another fit, logLik -368.2 where lmer's was -343.1); and where the
    widths agree the coding may not (``0 + I(t > 1) + sex``: R's ``sexM`` is M - F, the 0/1
    model's the level M)."""
    text = formula
    for start, end, inner in reversed(calls):
        text = text[:start] + f"factor({inner})" + text[end:]
    try:
        other = formula_model(text, table)
    except SpecError:
        return None
    names = {r_expression(f"factor({inner.strip()})"): r_expression(f"I({inner.strip()})")
             for _, _, inner in calls}

    def back(name: str) -> str:
        for ours, written in names.items():
            name = name.replace(ours, written)
        return name

    return _renamed(other, back)


def _as_factor_spelling(formula: str):
    """A renaming of ``factor(x)`` back to ``as.factor(x)`` in the names of columns and terms
    for each ``x`` the formula writes as ``as.factor(x)`` (read as ``factor(x)``:
    :func:`_r_to_python`), as R names them (``as.factor(site)B``); not for an ``x`` also
    written ``factor(x)``.  A call as a term's variable and one as ``C()``'s first argument
    are spelled apart (``C(factor(r), sum) + x:as.factor(r)`` keeps both spellings)."""
    bare: dict[str, set[str]] = {}
    in_c: dict[str, set[str]] = {}
    for m, _, args in _factor_calls(formula):
        if m.group(1) != "C" and len(args) == 1:
            bare.setdefault(r_expression(args[0].strip()), set()).add(m.group(1))
        elif m.group(1) == "C" and args:
            first = re.fullmatch(r"(as\.factor|factor)\s*\((.*)\)", args[0].strip(), re.S)
            if first is not None:
                in_c.setdefault(r_expression(first.group(2).strip()), set()).add(first.group(1))
    patterns = [(re.compile(rf"(?<![\w.])(?<!C\()factor\({re.escape(arg)}\)"),
                 f"as.factor({arg})") for arg, calls in bare.items() if calls == {"as.factor"}]
    patterns += [(re.compile(rf"(?<![\w.])C\(factor\({re.escape(arg)}\)"),
                  f"C(as.factor({arg})") for arg, calls in in_c.items() if calls == {"as.factor"}]

    def rename(name: str) -> str:
        for pattern, written in patterns:
            name = pattern.sub(written, name)
        return name
    return rename


def _formula_model(formula: str, table: Table, aliases: ColumnAliases) -> FormulaModel:
    """:func:`formula_model`, the columns of ``aliases`` under their aliases."""
    parsed = parse_formula(formula)
    if not parsed.bars:
        raise SpecError("no random-effects term such as (1 | subject): a linear mixed model "
                        "needs at least one grouping factor")
    if parsed.lhs is not None and parsed.lhs in table.names:
        raise SpecError(f"the left side names column {parsed.lhs!r} of {table.path}, but the "
                        "response is the image data, not a column: leave the left side out "
                        f"(~ {formula.split('~', 1)[1].strip()}) or rename the column")
    fixed = _r_to_python(aliases.rename(parsed.fixed))
    bar_terms = [_r_to_python(aliases.rename(bar.terms)) for bar in parsed.bars]
    groupings: dict[str, str] = {}     # a grouping as written -> its column
    try:
        used: dict[str, str] = {}
        for term in _written_terms(parsed.fixed):   # the first unknown name, in its term
            for v in _used_variables(_r_to_python(aliases.rename(term)), table,
                                     f"term {term!r}", aliases):
                used.setdefault(v, "fixed part")
        used.update((v, "fixed part") for v in _used_variables(fixed, table, "fixed part",
                                                                aliases))
        for bar, terms in zip(parsed.bars, bar_terms):
            for v in _used_variables(terms, table, f"random term {bar.text}", aliases):
                used.setdefault(v, f"random term {bar.text}")
            for g in bar.group:
                column = aliases.grouping(g)
                if column is None:
                    raise SpecError(f"random term {bar.text}: no grouping column {g!r} in "
                                    f"{table.path}{_column_hint(g.strip('`'), table, aliases)}")
                groupings[g] = column
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(_one_line(exc)) from None
    if "Intercept" in used:   # formulaic's name for the intercept: the column would replace it
        raise SpecError(f"{used['Intercept']}: column 'Intercept' of {table.path} has the name "
                        "formulaic gives the intercept, and would silently replace it: rename "
                        "the column")
    frame = _frame(table, used, aliases)
    for g in sorted(set(groupings.values())):
        used_column(table, g, "grouping")

    X = _matrix(fixed, frame, "fixed part", table)
    names, terms = r_column_names(X)
    one = _one_term(X, terms)
    if len(names) == 0:
        raise SpecError("the fixed part has no columns (remove '0 +' or add a term)")
    _single_levels(X, terms, "term")
    _finite_columns(X, names, table, "column")
    factors = []
    for bar, terms_text in zip(parsed.bars, bar_terms):
        Z = _matrix(terms_text, frame, f"random term {bar.text}", table)
        effects, zterms = r_column_names(Z)
        if len(effects) == 0:
            raise SpecError(f"random term {bar.text}: no columns")
        _single_levels(Z, zterms, f"random term {bar.text}: term")
        _finite_columns(Z, effects, table, f"random term {bar.text}: column")
        labels = [":".join(parts)     # R's levels: a number's as R prints it (01 is 1)
                  for parts in zip(*(r_labels(table, groupings[g]) for g in bar.group))]
        factors.append((labels, np.asarray(Z, dtype=np.float64), tuple(effects)))
    # lme4's names need each term's number of levels (mkReTrms orders the terms by it)
    factor_names = lme4_factor_names([bar.name for bar in parsed.bars],
                                     [bar.lme4_order for bar in parsed.bars],
                                     [len(set(labels)) for labels, _, _ in factors])
    hypotheses, basis = _anova_hypotheses(X, frame, terms, fixed, one)
    return FormulaModel(np.asarray(X, dtype=np.float64), tuple(names),
                        tuple((label, tuple(cols)) for label, cols in terms),
                        tuple((name, *factor) for name, factor in zip(factor_names, factors)),
                        tuple(hypotheses.items()), one, basis)


def _one_term(mm, terms: list[tuple[str, list[int]]]) -> bool:
    """lmerTest's test for type I rows in place of type III: one column, or one term
    besides the intercept."""
    labelled = [label for structure, (label, _) in zip(mm.model_spec.structure, terms)
                if str(structure.term) != "1"]
    return mm.shape[1] <= 1 or len(labelled) <= 1


def _anova_hypotheses(mm, frame, terms: list[tuple[str, list[int]]], fixed: str, one_term: bool
                      ) -> tuple[dict[str, np.ndarray], Type3Basis | None]:
    """The hypotheses lmerTest's ``anova`` (type III, its default) tests for the terms whose
    rows are not simply their own coefficients (``lmerTest:::get_contrasts_type3``):

    - a fixed part of one term (or one column, ``one_term``: :func:`_one_term`): type I rows
      (:func:`mpiblmm.lmm.type3.type1_rows`);
    - a factor coded other than by treatment contrasts (``C(g, sum)``, ``C(g, helmert)``,
      ``C(g, SAS)``...): the hypotheses of the same formula in treatment coding (below),
      written on this coding's coefficients (:func:`mpiblmm.lmm.type3.mapped_rows`), for every
      term of several columns;
    - otherwise those of the terms contained in others (:func:`_type3_hypotheses`).

    They span the same hypothesis as the plain ones (F is the same), but Satterthwaite's
    denominator df depends on the rows.  Empty where a step cannot be taken (the plain
    hypotheses are then kept).  With them, the :class:`~mpiblmm.lmm.type3.Type3Basis` to
    make them again where a voxel's rows drop columns (not for type I rows)."""
    from mpiblmm.lmm import type3 as t3

    X = np.asarray(mm, dtype=np.float64)
    if one_term:
        return {label: t3.type1_rows(X, cols) for label, cols in terms if len(cols) > 1}, None
    treatment = _treatment_coded(fixed)
    if treatment == fixed:
        return _type3_hypotheses(mm, frame, terms)
    mm_t = _matrix(treatment, frame, "fixed part")
    _, terms_t = r_column_names(mm_t)
    X_t = np.asarray(mm_t, dtype=np.float64)
    if len(terms_t) != len(terms) or [len(c) for _, c in terms_t] != [len(c) for _, c in terms]:
        return {}, None
    terms3_t, R_t = _type3_terms(mm_t, frame, terms_t)
    contained = (None if R_t is None else t3.type3(X_t, R_t, terms3_t)) or {}
    out = {}
    for (label, cols), (label_t, cols_t) in zip(terms, terms_t):
        if len(cols) < 2:
            continue
        L_t = contained.get(label_t)
        if L_t is None:
            L_t = _own_rows(cols_t, X_t.shape[1])
        L = t3.mapped_rows(L_t, X_t, X)
        if L is None:
            return {}, None
        out[label] = L
    # to make them again where columns drop: the treatment coding's terms (named as the
    # model's), its R where a term is contained in another, and its design X_t; none where
    # such a term's hypothesis could not be made (it is then its own columns everywhere)
    if t3.any_contained(terms3_t) and not contained:
        return out, None
    names = {label_t: label for (label, _), (label_t, _) in zip(terms, terms_t)}
    R = R_t if R_t is not None else np.zeros((X_t.shape[0], 0))
    return out, t3.Type3Basis(R, tuple(dataclasses.replace(t, label=names.get(t.label, t.label))
                                       for t in terms3_t), X_t)


def _treatment_coded(text: str) -> str:
    """The fixed part ``text`` (formulaic's spelling) with every ``C(x, contrasts)`` coded by
    R's treatment contrasts, ``C(x)`` (lmerTest's ``contrasts = "contr.treatment"``
    remake of the model matrix); ``text`` itself when there is none."""
    out, pos = [], 0
    for m, end, args in _factor_calls(text):
        first = _treatment_coded(args[0])
        if m.group(1) == "C" and len(args) == 2:
            out += [text[pos:m.start()], f"C({first})"]
        else:
            out += [text[pos:m.start()], f"{m.group(1)}({', '.join([first] + args[1:])})"]
        pos = end
    return "".join(out) + text[pos:]


def _type3_hypotheses(mm, frame, terms: list[tuple[str, list[int]]]
                      ) -> tuple[dict[str, np.ndarray], Type3Basis | None]:
    """lmerTest's type III hypotheses of the terms contained in others (:mod:`mpiblmm.lmm.type3`):
    the over-parameterised design is ``~ 0 + term`` of every term (each factor by all its
    levels) after an intercept column.  Empty when no term is contained in another, or when
    a term cannot be coded that way (its own columns are then its hypothesis).  With them,
    their :class:`~mpiblmm.lmm.type3.Type3Basis` (``None`` when empty)."""
    from mpiblmm.lmm import type3 as t3

    X = np.asarray(mm, dtype=np.float64)
    terms3, R = _type3_terms(mm, frame, terms)
    out = None if R is None else t3.type3(X, R, terms3)
    if not out:
        return {}, None
    return out, t3.Type3Basis(R, tuple(terms3))


def _type3_terms(mm, frame, terms: list[tuple[str, list[int]]]) -> tuple[list[Term], Any]:
    """The terms of the fixed part as :class:`~mpiblmm.lmm.type3.Term` (their variables, and
    which are marginal and numeric), and the over-parameterised design ``R``: ``None`` when
    no term is contained in another (none is needed) or a term cannot be coded that way."""
    from mpiblmm.lmm import type3 as t3

    state = mm.model_spec.encoder_state
    found, blocks = [], []
    intercept = False
    for structure, (label, cols) in zip(mm.model_spec.structure, terms):
        if str(structure.term) == "1":
            intercept = True
            continue
        found.append((label, tuple(cols), frozenset(f.expr for f in structure.term.factors)))
    model = {variables for _, _, variables in found}
    numerics = {e for _, _, variables in found for e in variables
                if getattr(state.get(e, (None, {}))[0], "value", None) != "categorical"}
    found = [t3.Term(label, cols, (), variables, marginal, marginal & numerics)
             for label, cols, variables in found
             for marginal in [t3.marginal_variables(variables, model)]]
    if not t3.any_contained(found):
        return found, None
    width = int(intercept)
    terms3 = []
    for t in found:
        try:
            block = np.asarray(_matrix("0 + " + ":".join(sorted(t.variables)), frame, t.label),
                               dtype=np.float64)
        except SpecError:
            return found, None
        blocks.append(block)
        terms3.append(dataclasses.replace(t, r_cols=tuple(range(width, width + block.shape[1]))))
        width += block.shape[1]
    return terms3, np.column_stack(([np.ones(mm.shape[0])] if intercept else []) + blocks)


def without_columns(model: FormulaModel, keep: np.ndarray) -> FormulaModel:
    """``model`` without the fixed columns not in ``keep`` (p,) bool: the model lme4 fits when
    it drops them (``fixed-effect model matrix is rank deficient``), its terms, and the
    hypotheses lmerTest's ``anova`` tests in it, made as for a voxel whose observed rows drop
    those columns (:func:`mpiblmm.lmm.type3.observed_type3`; type I rows of a one-term part
    on the kept columns)."""
    from mpiblmm.lmm import type3 as t3

    keep = np.asarray(keep, dtype=bool)
    position = np.cumsum(keep) - 1
    X = model.X[:, keep]
    terms = tuple((label, tuple(int(position[j]) for j in cols if keep[j]))
                  for label, cols in model.terms)
    terms = tuple((label, cols) for label, cols in terms if cols)
    basis, type3 = model.type3_basis, []
    if model.one_term:
        type3 = [(label, t3.type1_rows(X, list(cols))) for label, cols in terms if len(cols) > 1]
    elif basis is not None:
        every = np.ones(X.shape[0], dtype=bool)
        for label, _ in model.type3:
            L = t3.observed_type3(every, model.X, basis, keep, label)
            if L is not None:
                type3.append((label, L))
        if basis.treatment_X is None:      # its terms name columns of X (else of X_t)
            basis = dataclasses.replace(basis, terms=tuple(
                dataclasses.replace(t, x_cols=tuple(int(position[j]) for j in t.x_cols
                                                    if keep[j]))
                for t in basis.terms))
    several = {label for label, cols in model.terms if len(cols) > 1}
    return dataclasses.replace(model, X=X, names=tuple(np.asarray(model.names)[keep].tolist()),
                               terms=terms, type3=tuple(type3), type3_basis=basis,
                               f_terms=frozenset(several & {label for label, _ in terms}))


def default_contrasts(model: FormulaModel) -> list[tuple]:
    """lmerTest's ``summary`` and ``anova``: a T contrast per coefficient (named by it), an F
    contrast per term of more than one column (named by the term): the rows ``anova`` tests
    (:func:`_anova_hypotheses`: for a term contained in another, e.g. ``group`` in ``sex *
    group``, the main effect, not the coefficients of its columns).  Each is ``(name, weights,
    alternative, sequential)``, and an F's also its term's label (:attr:`mpiblmm.design.
    Contrast.term`); ``sequential`` (:attr:`mpiblmm.design.Contrast.sequential`) is the term's
    columns where the fixed part has one term, whose rows then follow each voxel's own X'X."""
    p = len(model.names)
    out = []
    for j, name in enumerate(model.names):
        w = np.zeros(p)
        w[j] = 1.0
        out.append((safe_name(name), w, "two-sided", ()))
    taken = {c[0] for c in out}
    type3 = dict(model.type3)
    for label, cols in model.terms:
        if len(cols) > 1 or label in model.f_terms:
            L = type3.get(label, _own_rows(cols, p))   # anova's where it has other rows
            name = safe_name(label)
            out.append((name if name not in taken else f"{name}.F", L, "two-sided",
                        tuple(cols) if model.one_term else (),   # type I rows per voxel
                        label))   # anova's test of the term, also where columns drop
    return out


def _own_rows(cols, p: int) -> np.ndarray:
    """The hypothesis that the coefficients ``cols`` (of ``p``) are zero: a row for each."""
    L = np.zeros((len(cols), p))
    L[np.arange(len(cols)), list(cols)] = 1.0
    return L


def safe_name(name: str) -> str:
    """A coefficient or term name usable as an HDF5 group and file name ('/' replaced)."""
    return name.replace("/", "_")


def _written_terms(fixed: str) -> list[str]:
    """The terms of the fixed part as written (``age``, ``group * factor(visit)``)."""
    return [t.strip() for _, t in _split_top(fixed, "+-") if t.strip()]


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` when a close choice exists, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
