"""The model's design: X, the random factors (level codes and Z blocks) and the contrasts.

:func:`design_from_spec` reads the files a :class:`~mpiblmm.spec.Spec` names: the CSV
tables of the matrix form, or the covariates table and formula of the formula form (through
:mod:`mpiblmm.formula`); both end in :func:`build_design`, which makes a :class:`Design`
from arrays.  A :class:`Design` is frozen and its arrays are read-only.

Layout of the full random-effects matrix (see ``mpiblmm.lmm.model``): columns are ordered
factor, then level, then effect, so factor ``k`` level ``j`` effect ``e`` is column
``offset_k + j * q_k + e``.  Levels are coded ``0..l-1`` in order of first appearance.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mpiblmm.checks import (column_words, dependent_column, dependent_culprit,
                            lme4_dropped_columns)
from mpiblmm.errors import ContrastError, SpecError, UserError, not_utf8
from mpiblmm.formula_table import NUMBER, read_table, suspicious_text_columns
from mpiblmm.lmm.model import RandomFactor, RandomStructure
from mpiblmm.lmm.type3 import Type3Basis
from mpiblmm.spec import Spec, first_duplicate, name_length_problem, short_name


@dataclass(frozen=True, eq=False)
class Factor:
    """One grouping factor: level code per observation, its labels and its Z block.

    ``codes`` (n,) int64 in ``0..l-1``; ``labels`` the level labels in code order;
    ``Z`` (n, q) float64 the random-effect covariates; ``effect_names`` (q,).
    """

    name: str
    codes: np.ndarray
    labels: tuple[str, ...]
    Z: np.ndarray
    effect_names: tuple[str, ...]

    @property
    def n_levels(self) -> int:
        return len(self.labels)

    @property
    def n_effects(self) -> int:
        return int(self.Z.shape[1])


@dataclass(frozen=True, eq=False)
class Contrast:
    """A contrast: ``L`` (r, p); ``kind`` "T" (one row, may be one-sided) or "F".
    ``sequential``: the columns of X of a term whose F test takes, at each voxel, the type I
    rows of that voxel's own X'X (lmerTest's ``anova`` of a one-term fixed part; ``L`` is
    then those rows on every observation); empty for a contrast tested by ``L`` itself.
    ``term``: the formula term whose ``anova`` F this is (a default contrast): where a voxel's
    observed rows drop columns, it is tested as lmerTest's ``anova`` tests the term in lme4's
    fit without them (:func:`mpiblmm.lmm.analysis._fit_dropping_columns`)."""

    name: str
    L: np.ndarray
    alternative: str = "two-sided"
    kind: str = "T"
    sequential: tuple[int, ...] = ()
    term: str = ""

    @property
    def n_rows(self) -> int:
        return int(self.L.shape[0])


@dataclass(frozen=True, eq=False)
class Design:
    """Everything about the model that is the same at every voxel.

    ``X`` (n, p) float64; ``factors`` in column order of Z; ``structure`` the
    :class:`~mpiblmm.lmm.model.RandomStructure` the estimator uses.
    """

    X: np.ndarray
    fixed_names: tuple[str, ...]
    factors: tuple[Factor, ...]
    contrasts: tuple[Contrast, ...]
    structure: RandomStructure
    #: the formula's type III hypotheses to make again at voxels that drop columns
    #: (:class:`~mpiblmm.lmm.type3.Type3Basis`), or ``None``
    type3_basis: Type3Basis | None = None
    #: what the front end changed and the user should know (a formula's columns dropped)
    notes: tuple[str, ...] = ()
    #: the formula's columns left out as lme4 drops them: name -> why (a contrast naming one
    #: is refused with it, :func:`spec_contrasts`)
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

    def Z(self) -> np.ndarray:
        """The full random-effects design (n, q) as a dense array (small studies, tests)."""
        out = np.zeros((self.n, self.structure.q))
        rows = np.arange(self.n)
        for f, offset in zip(self.factors, self.structure.offsets):
            for e in range(f.n_effects):
                out[rows, offset + f.codes * f.n_effects + e] = f.Z[:, e]
        return out


# --------------------------------------------------------------------------- from arrays
def build_design(
    X: np.ndarray,
    factors: Sequence[tuple[str, Sequence[str], np.ndarray | None, Sequence[str] | None]],
    contrasts: Sequence[tuple[str, np.ndarray, str]] = (),
    fixed_names: Sequence[str] | None = None,
    where: str = "design",
    type3_basis: Type3Basis | None = None,
) -> Design:
    """Make a :class:`Design` from arrays (the common end of every front end).

    Parameters
    ----------
    X
        (n, p) fixed-effects design.
    factors
        ``(name, labels, Z, effect_names)`` per factor: ``labels`` n level labels, ``Z``
        (n, q) covariates or ``None`` for an intercept, ``effect_names`` or ``None``.
    contrasts
        ``(name, weights, alternative)``; ``weights`` 1-D (T) or 2-D (F) of width p; a fourth
        item, when given, is :attr:`Contrast.sequential`, a fifth :attr:`Contrast.term`.
    fixed_names
        Names of the p columns of X (default ``x0..x{p-1}``).
    where
        Prefix of error messages for contrasts, e.g. ``"spec.json: contrasts"``.
    type3_basis
        :attr:`Design.type3_basis` (the formula form's).

    Raises
    ------
    SpecError, ContrastError
    """
    X = _frozen(np.asarray(X, dtype=np.float64))
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise SpecError(f"X must be a non-empty 2-D table, got shape {X.shape}", where)
    n, p = X.shape
    if fixed_names is None:
        fixed_names = tuple(f"x{j}" for j in range(p))
    fixed_names = tuple(fixed_names)
    if len(fixed_names) != p:
        raise SpecError(f"{len(fixed_names)} fixed_names for {p} columns of X", where)

    made = []
    for name, labels, Z, effect_names in factors:
        if len(labels) != n:
            raise SpecError(f"factor {name!r} has {len(labels)} rows; X has {n}", where)
        codes, uniq = _codes(labels)
        Z = np.ones((n, 1)) if Z is None else np.asarray(Z, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[0] != n or Z.shape[1] == 0:
            raise SpecError(f"factor {name!r}: design must be (n={n}, q), got {Z.shape}", where)
        q = Z.shape[1]
        if effect_names is None:
            effect_names = ("(Intercept)",) if q == 1 and np.all(Z == 1) else tuple(f"z{e}" for e in range(q))
        effect_names = tuple(effect_names)
        if len(effect_names) != q:
            raise SpecError(f"factor {name!r}: {len(effect_names)} effect_names for {q} columns", where)
        made.append(Factor(name, _frozen(codes), uniq, _frozen(Z), effect_names))

    cons = tuple(replace(_contrast(name, w, alt, fixed_names, f'{where}[{i}] ("{name}")'),
                         sequential=tuple(int(j) for j in (rest[0] if rest else ())),
                         term=str(rest[1]) if len(rest) > 1 else "")
                 for i, (name, w, alt, *rest) in enumerate(contrasts))
    structure = RandomStructure(tuple(
        RandomFactor(f.name, f.n_levels, f.n_effects, f.effect_names) for f in made))
    return Design(X, fixed_names, tuple(made), cons, structure, type3_basis)


def _codes(labels: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Level codes 0..l-1 in order of first appearance, and the labels in code order."""
    arr = np.asarray([str(x) for x in labels], dtype=object)
    uniq, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    order = np.argsort(first)  # unique labels by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()].astype(np.int64), tuple(str(u) for u in uniq[order])


#: Rows of a contrast whose smallest singular value, each row scaled to length 1, is below
#: this times the largest are "nearly dependent": F's (L C L')^-1 then loses every digit
#: (an audit's rows [0, 1, 0], [0, 1, 1e-8] gave F = inf, p = 0 at most voxels; at 1e-5
#: F was still within 4e-5).
NEARLY_DEPENDENT = 1e-6

#: A row's largest weight must lie within these (t, F and p do not depend on a row's scale,
#: but estimate * se overflows or underflows outside them).
WEIGHT_RANGE = (1e-100, 1e100)


def rank_problem(L: np.ndarray) -> str | None:
    """Why the contrast rows ``L`` (r, p) cannot be tested (all zero, rows linearly or
    nearly dependent, a row's weights too large or too small to compute with), or ``None``
    when they can."""
    rank = np.linalg.matrix_rank(L)
    if rank == 0:
        return "all weights are zero"
    if rank < L.shape[0]:
        return (f"the {L.shape[0]} rows are linearly dependent (rank {rank}); drop the "
                "redundant rows")
    size = np.abs(L).max(axis=1)
    lo, hi = WEIGHT_RANGE
    bad = np.flatnonzero((size < lo) | (size > hi))
    if bad.size:
        where = f"row {bad[0] + 1}'s" if L.shape[0] > 1 else "the"
        return (f"{where} largest weight is {size[bad[0]]:.3g}: outside {lo:g} .. {hi:g}; "
                "rescale it (t, F and p do not depend on a row's scale)")
    if L.shape[0] > 1:
        sv = np.linalg.svd(L / np.linalg.norm(L, axis=1, keepdims=True), compute_uv=False)
        if sv[-1] < NEARLY_DEPENDENT * sv[0]:
            return (f"the {L.shape[0]} rows are nearly linearly dependent (scaled to length "
                    f"1, their smallest singular value is {sv[-1] / sv[0]:.2g} of the largest); "
                    "F cannot be computed reliably: drop the redundant rows or combine them")
    return None


def _contrast(name: str, weights: np.ndarray, alternative: str, fixed_names: tuple[str, ...],
              where: str) -> Contrast:
    p = len(fixed_names)
    too_long = name_length_problem(name, "contrast")
    if too_long is not None:  # its maps could not be written, after the whole fit
        raise ContrastError(too_long, where.replace(f'("{name}")', f'("{short_name(name)}")'))
    w = np.asarray(weights, dtype=np.float64)
    kind = "T" if w.ndim == 1 else "F"
    L = np.atleast_2d(w)
    if L.ndim != 2 or L.shape[1] != p:
        shown = ", ".join(fixed_names[:12]) + (", ..." if p > 12 else "")
        raise ContrastError(f"each row needs {p} weights, one per column of X ({shown}), got "
                            f"{L.shape[-1]}", f"{where}.weights")
    problem = rank_problem(L)
    if problem is not None:
        raise ContrastError(problem, f"{where}.weights")
    if kind == "F" and alternative != "two-sided":
        raise ContrastError("an F contrast has no direction", f"{where}.alternative")
    return Contrast(name, _frozen(L), alternative, kind)


# --------------------------------------------------------------------------- from a spec
def design_from_spec(spec: Spec) -> Design:
    """Read the files of a spec (either form) and build the :class:`Design`.

    Matrix form: checks that X, every factor and design file (and the image list, when
    NIfTI) have the same number of rows, naming the first file that differs.  Formula form:
    see :func:`design_from_formula`.
    """
    if spec.is_formula:
        return design_from_formula(spec)
    X = read_numeric_csv(spec.X)
    n = X.shape[0]
    spec_where = str(spec.path)
    if spec.images is not None and len(spec.images) != n:
        raise SpecError(f"{_image_count(spec.images)} but {spec.X} has {n} rows "
                        "(one image per row of X)", f"{spec_where}: images")
    factors = []
    for fs in spec.random:
        labels = read_labels_csv(fs.factor)
        if len(labels) == n + 1 and header_like(labels):
            raise SpecError(f"has {len(labels)} rows but {spec.X} has {n}: its first row "
                            f"{labels[0]!r} looks like a header (every other row is a number); "
                            "a factor file has no header row: delete that line", str(fs.factor))
        _same_rows(fs.factor, len(labels), spec.X, n)
        Z = None
        if fs.design is not None:
            Z = read_numeric_csv(fs.design)
            _same_rows(fs.design, Z.shape[0], spec.X, n)
        factors.append((fs.name, labels, Z, fs.effect_names))
    if spec.fixed_names is not None and len(spec.fixed_names) != X.shape[1]:
        raise SpecError(f"{len(spec.fixed_names)} names for the {X.shape[1]} columns of {spec.X}",
                        f"{spec_where}: fixed_names")
    names = spec.fixed_names or tuple(f"x{j}" for j in range(X.shape[1]))
    contrasts = spec_contrasts(spec, names)
    for i, fs in enumerate(spec.random):
        q = 1 if fs.design is None else factors[i][2].shape[1]
        if fs.effect_names is not None and len(fs.effect_names) != q:
            raise SpecError(f"{len(fs.effect_names)} names for the {q} columns of "
                            f"{fs.design or 'the random intercept'}",
                            f"{spec_where}: random[{i}].effect_names")
    return build_design(X, factors, contrasts, spec.fixed_names, where=f"{spec_where}: contrasts")


def _image_count(images) -> str:
    """How many observations the spec's images hold, in the user's terms: a list of images,
    or one 4-D image's volumes (its volumes carry ``volume``, :func:`mpiblmm.spec.volume_path`)."""
    if images and hasattr(images[0], "volume"):
        return f"{images[0]} has {len(images)} volumes"
    return f"lists {len(images)} images"


def design_from_formula(spec: Spec) -> Design:
    """The formula form: the covariates table and the lme4 formula
    (:mod:`mpiblmm.formula`), then the same :func:`build_design` as the matrix form.

    Without a ``contrasts`` key every coefficient gets a T contrast and every term of
    several columns an F contrast (lmerTest's ``summary`` and ``anova``).
    """
    from mpiblmm import formula as fm

    spec_where = str(spec.path)
    table = read_table(spec.covariates)
    if spec.images is not None and len(spec.images) != table.n:
        skipped = (f"; {len(table.empty_lines)} line(s) of empty cells not counted (line "
                   f"{', '.join(map(str, table.empty_lines[:5]))})" if table.empty_lines else "")
        raise SpecError(f"{_image_count(spec.images)} but {spec.covariates} has "
                        f"{table.n} rows (one image per row){skipped}", f"{spec_where}: images")
    try:
        model = fm.formula_model(spec.formula, table)
    except SpecError as exc:
        if exc.where is not None:  # a file and row of the table
            raise
        raise SpecError(exc.message, f"{spec_where}: formula") from None
    twice = first_duplicate(model.names)
    if twice is not None:  # a contrast by that name would take the first column silently
        i, j = [k + 1 for k, name in enumerate(model.names) if name == twice][:2]
        raise SpecError(f"columns {i} and {j} of the fixed part are both named {twice!r} (e.g. "
                        "a level of a text column and a numeric column of that name): rename "
                        f"a column of {spec.covariates}", f"{spec_where}: formula")
    notes: tuple[str, ...] = ()
    left_out: dict[str, str] = {}                 # column name -> why it was left out
    if dependent_column(model.X) is not None:     # dropped as lme4 drops them, if exactly so
        dropped, near = lme4_dropped_columns(model.X)
        if dropped and near is None:
            notes = tuple(
                f"{column_words(model.X, j, model.names)} (e.g. an empty cell of an "
                "interaction, or levels nested in another factor's): left out, as lme4 drops "
                "it ('fixed-effect model matrix is rank deficient')" for j in dropped)
            left_out = {model.names[j]: column_words(model.X, j, model.names) for j in dropped}
            model = fm.without_columns(model, ~np.isin(np.arange(model.X.shape[1]), dropped))
        elif dropped:  # the column that blocks is the nearly dependent one, not the first
            kept = [c for c in range(near + 1) if c not in dropped]
            near = kept[dependent_culprit(model.X[:, kept], len(kept) - 1)]
            raise SpecError(
                f"{column_words(model.X, near, model.names)}: X is rank deficient, so the fixed "
                f"effects are not identifiable; drop or recode that column (the column"
                f"{'s' if len(dropped) > 1 else ''} before it exactly dependent, "
                f"{', '.join(repr(model.names[j]) for j in dropped)}, would be left out as "
                "lme4 drops them)", f"{spec_where}: formula")
    for name, *_ in model.factors:  # named by the formula's grouping columns
        too_long = name_length_problem(name, "factor")
        if too_long is not None:
            raise SpecError(f"random factor {short_name(name)!r} (its grouping): {too_long}",
                            f"{spec_where}: formula")
    if spec.contrasts is None:
        contrasts = fm.default_contrasts(model)
        twice = first_duplicate([name for name, *_ in contrasts])
        if twice is not None:  # results.h5 would keep one of them
            raise SpecError(f"two default contrasts would be named {twice!r} ('/' becomes '_' "
                            "in group and file names): rename a column, or give \"contrasts\" "
                            "with names of your own", f"{spec_where}: formula")
        for name, *_ in contrasts:  # named by the coefficients and terms
            too_long = name_length_problem(name, "contrast")
            if too_long is not None:
                raise SpecError(f"the default contrast of {short_name(name)!r}: {too_long}; "
                                "rename the column, or give \"contrasts\" with shorter names",
                                f"{spec_where}: formula")
    else:
        try:
            contrasts = spec_contrasts(spec, model.names)
        except UserError as exc:  # often a covariate read as text because of one typo
            raise contrast_problem(exc, tuple(left_out.items()),
                                   suspicious_text_columns(table)) from None
    design = build_design(model.X, model.factors, contrasts, model.names,
                          where=f"{spec_where}: contrasts", type3_basis=model.type3_basis)
    notes += tuple(_table_wide_note(fm.table_wide_transforms(spec.formula), table.n,
                                    spec.covariates))
    # the fit prints them too: the factor a typo made may fit without an error (a fault audit)
    notes += tuple(suspicious_text_columns(table))
    return replace(design, notes=notes, left_out=tuple(left_out.items())) if notes else design


def _table_wide_note(calls: Sequence[str], rows: int, table: Any) -> list[str]:
    """The note on ``scale()``, ``center()`` and ``poly()`` (a formula audit against lme4):
    mpiblmm computes them once on every row of the table, lme4 fitted on a voxel's observed
    rows on those rows, so where a voxel misses images the two parameterise the same fit
    (given an intercept) differently."""
    if not calls:
        return []
    one = len(calls) == 1
    return [f"{', '.join(calls)}: computed once from all {rows} rows of {table}, as one "
            f"covariate for every voxel; lme4, fitted on a voxel's observed rows, computes "
            f"{'it' if one else 'them'} on those rows, so at voxels that miss images the fit "
            f"is the same (with an intercept) but the coefficients of {'its' if one else 'their'} "
            f"columns, the type III F of terms {'it enters' if one else 'they enter'} and the "
            "REML log-likelihood (by a constant) are those of another parameterisation; to "
            "compare with lme4 there, put the computed column in the table"]


def contrast_problem(exc: UserError, left_out: tuple[tuple[str, str], ...],
                     typos: Sequence[str]) -> UserError:
    """A contrast's error ``exc`` with what may explain it: a column lme4's rule left out
    (:func:`left_out_problem`), and the first note on a covariate read as text because of a
    typo (``typos``, :func:`~mpiblmm.formula_table.suspicious_text_columns`).  ``check`` and
    ``fit`` give it in the same words."""
    exc = left_out_problem(exc, left_out) or exc
    if not typos:
        return exc
    return type(exc)(f"{exc.message} (perhaps because {typos[0]})", exc.where)


def left_out_problem(exc: UserError, left_out: tuple[tuple[str, str], ...]) -> UserError | None:
    """``exc`` (a contrast naming no coefficient) with why, when the name is a column the
    formula made and lme4's rule left out (a fuzz audit: a constant age, collinear with the
    intercept, gave "no coefficient 'age'" without a word of it); else ``None``."""
    for name, why in left_out:
        if f"no coefficient {name!r}" in exc.message:
            return type(exc)(f"{exc.message}: {why}, so it was left out as lme4 drops it",
                             exc.where)
    return None


def spec_contrasts(spec: Spec, names: Sequence[str]) -> list[tuple[str, np.ndarray, str]]:
    """The spec's contrasts as ``(name, weights, alternative)``, weights given by coefficient
    name resolved against ``names`` (the columns of X)."""
    out = []
    for i, c in enumerate(spec.contrasts or ()):
        if c.by_name is None:
            w = np.asarray(c.weights[0] if c.kind == "T" else c.weights)
        else:
            where = f'{spec.path}: contrasts[{i}] ("{c.name}").weights'
            rows = [_named_row(row, names, where) for row in c.by_name]
            w = rows[0] if c.kind == "T" else np.vstack(rows)
        out.append((c.name, w, c.alternative))
    return out


def _named_row(row: Sequence[tuple[str, float]], names: Sequence[str], where: str) -> np.ndarray:
    import difflib

    w = np.zeros(len(names))
    for key, value in row:
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if tuple(names) == tuple(f"x{j}" for j in range(len(names))):  # X's columns unnamed
                hint += ("; name the columns of X with the spec's \"fixed_names\" to use "
                         "other names")
            raise ContrastError(f"no coefficient {key!r}{hint} (coefficients: "
                                f"{', '.join(names)})", where)
        w[list(names).index(key)] = value
    return w


def _same_rows(path: Path, rows: int, x_path: Path, n: int) -> None:
    if rows != n:
        raise SpecError(f"has {rows} rows but {x_path} has {n}", str(path))


# --------------------------------------------------------------------------- CSV readers
def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Rows of a header-less CSV as (line number, cells); trailing blank lines dropped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [(reader_line, row) for reader_line, row in _numbered(csv.reader(fh))]
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    except (OSError, csv.Error) as exc:
        raise SpecError(f"cannot read the file ({getattr(exc, 'strerror', None) or exc})",
                        str(path)) from None
    while rows and not any(c.strip() for c in rows[-1][1]):
        rows.pop()
    if not rows:
        raise SpecError("the file is empty", str(path))
    return rows


def _numbered(reader: "csv._reader") -> list[tuple[int, list[str]]]:
    out = []
    for row in reader:
        out.append((reader.line_num, row))
    return out


def read_numeric_csv(path: Path) -> np.ndarray:
    """A header-less numeric CSV as (rows, columns) float64; every cell finite.

    Errors: ``<file>: row N: <problem>`` (column numbers from 1).
    """
    rows = _csv_rows(path)
    width = len(rows[0][1])
    out = np.empty((len(rows), width))
    for i, (line, cells) in enumerate(rows):
        where = f"{path}: row {line}"
        if not any(c.strip() for c in cells):
            raise SpecError("empty row", where)
        if len(cells) != width:
            raise SpecError(f"has {len(cells)} columns; row {rows[0][0]} has {width}", where)
        for j, cell in enumerate(cells):
            try:
                if not NUMBER.fullmatch(cell):     # float() also takes '1_0' and other digits
                    raise ValueError(cell)
                value = float(cell)
            except ValueError:
                hint = _not_a_number_hint(cell, first_row=i == 0)
                below = [r[j] for _, r in rows[1:] if j < len(r)]
                if hint.endswith("no header row)") and below and not any(
                        NUMBER.fullmatch(c) for c in below):
                    # a header row beside it too: both said at once (a fault audit: the
                    # header was named only on the next run, once the column was deleted)
                    header = len(rows) > 1 and any(
                        not NUMBER.fullmatch(c) and NUMBER.fullmatch(d)
                        for k, (c, d) in enumerate(zip(cells, rows[1][1])) if k != j)
                    raise SpecError(f"column {j + 1}: text in every row ({cell.strip()!r}, "
                                    f"{below[0].strip()!r}, ...), as in an ID column"
                                    + (", and this row is a header row" if header else "")
                                    + ": the file must hold numbers only; delete that column"
                                    + (" and this row" if header else ""), where) from None
                raise SpecError(f"column {j + 1}: not a number: {cell.strip()!r}{hint}",
                                where) from None
            if not math.isfinite(value):
                raise SpecError(f"column {j + 1}: not a finite number: {cell.strip()!r}", where)
            out[i, j] = value
    return out


def _not_a_number_hint(cell: str, first_row: bool) -> str:
    """Why a cell of a numeric CSV may not be a number: numbers joined by another separator
    (a tab-separated file: a fault audit's X got "must have no header row"), or a header."""
    for sep, name in (("\t", "tabs"), (";", "semicolons"), (" ", "spaces")):
        parts = cell.strip().split(sep)
        if len(parts) > 1 and all(NUMBER.fullmatch(part.strip()) for part in parts if part):
            return f" (numbers separated by {name}: the file must be comma-separated)"
    return " (the file must have no header row)" if first_row else ""


def read_labels_csv(path: Path) -> list[str]:
    """A one-column CSV of level labels (any text; surrounding spaces removed)."""
    labels = []
    for line, cells in _csv_rows(path):
        where = f"{path}: row {line}"
        if not any(c.strip() for c in cells):
            raise SpecError("empty level label", where)
        if len(cells) != 1:
            raise SpecError(f"expected one column (the level label), got {len(cells)}", where)
        labels.append(cells[0].strip())
    return labels


def header_like(labels: list[str]) -> bool:
    """Does a factor file's first row look like a header: not a number, where every other
    row is one (``subject`` above level codes)?"""
    return len(labels) > 1 and not NUMBER.fullmatch(labels[0]) and all(
        NUMBER.fullmatch(label) for label in labels[1:])


def _frozen(a: np.ndarray) -> np.ndarray:
    # C order whatever the front end made (formulaic's frames are column-major): BLAS
    # results depend on the layout, and both forms must give the same bits.
    a = np.array(a, copy=True, order="C")
    a.setflags(write=False)
    return a
