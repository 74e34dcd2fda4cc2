"""Type III hypotheses of the fixed-effects terms, as lmerTest's ``anova`` tests them.

For a term not contained in another, the hypothesis is that its coefficients are zero.  For a
term contained in another (``group`` in ``sex * group``) that hypothesis is a simple effect
(``group`` at the reference level of ``sex``); the type III hypothesis is the main effect,
averaged over the levels of the containing terms.  lmerTest's ``anova`` (type III, its
default) builds it as follows (Goodnight's construction, as SAS), and so does :func:`type3`:

1. ``R`` (n x r): the over-parameterised design, an intercept column (if the model has one)
   and per term every column of ``~ 0 + term`` (each factor coded by all its levels).  The
   model's ``X`` (n x p, full rank) spans the same space: ``X M = R`` with ``M = X^+ R``.
2. Column ``j`` of ``L = M'`` (r x p) writes coefficient ``beta_j`` as a function of the
   over-parameterised effects ``gamma`` (``beta = M gamma``).  Terms are visited from the
   highest order down; the columns of a term contained in others are replaced by their
   residuals after least squares on the (already visited) columns of the terms containing
   it.  Term ``T1`` is contained in ``T2`` when every variable of ``T1`` is in ``T2``,
   ``T2`` has more, and both have the same numeric variables (so ``group`` is contained in
   ``sex:group`` but not in ``group:time``).  The variables of a term counted here are R's
   (its ``terms`` object's ``factors`` coded 1): those whose margin, the term without them,
   is in the model too (in ``0 + group + group:sex`` the term ``group:sex`` counts ``sex``
   only, so ``group`` is contained in nothing).
3. The rows ``h_j' = L[:, j]'`` of a term are estimable functions of ``gamma``; on ``beta``
   they are ``c_j' = h_j' R^+ X`` (for treatment coding: the entries of ``h_j`` at the
   columns of ``R`` that are columns of ``X``).  Rows that vanish are dropped.

At a voxel whose observed rows leave X rank deficient, lme4 drops the dependent columns and
lmerTest builds these hypotheses on what is left, on those rows (``Missing cells for: ...``,
"interpret type III hypotheses with care"): :func:`observed_type3` does the same from a
:class:`Type3Basis`, which keeps ``R`` (and for other codings the treatment coding's design)
row by row: products such as ``X M`` would leave rounding where R's columns are exactly zero
on those rows, and R's pivoted QR keeps such a column.

Pure numpy: no formula parsing here (:mod:`mpiblmm.formula` builds ``R`` and the terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Entries below this times the largest of a contrast are rounding (lmerTest: ``zapsmall``).
ZAP = 1e-10


@dataclass(frozen=True)
class Term:
    """A fixed-effects term: its label, its columns of ``X``, its columns of ``R``, its
    variables, those whose margin is in the model (``marginal``: R's ``factors`` code 1) and
    which of these are numeric."""

    label: str
    x_cols: tuple[int, ...]
    r_cols: tuple[int, ...]
    variables: frozenset[str]
    marginal: frozenset[str]
    numeric: frozenset[str]


def marginal_variables(variables: frozenset[str], model: set[frozenset[str]]) -> frozenset[str]:
    """R's code 1 in a term's column of ``attr(terms, "factors")``: a variable whose margin
    (the term without it) is a term of ``model`` (or nothing: a main effect)."""
    return frozenset(v for v in variables if len(variables) == 1 or variables - {v} in model)


def contains(inner: Term, outer: Term) -> bool:
    """lmerTest's containment: ``outer`` has every (marginal) variable of ``inner`` and
    more, and the same numeric ones."""
    return (inner.marginal < outer.marginal) and inner.numeric == outer.numeric


def any_contained(terms) -> bool:
    """Is some term of ``terms`` contained in another (so type III differs from a term's own
    columns somewhere)?"""
    return any(contains(a, b) for a in terms for b in terms)


def _zap(a: np.ndarray) -> np.ndarray:
    top = np.abs(a).max() if a.size else 0.0
    return np.where(np.abs(a) > ZAP * top, a, 0.0)


@dataclass(frozen=True, eq=False)
class Type3Basis:
    """What the type III hypotheses of a model need besides X, row by row: the
    over-parameterised design ``R`` (n, r; (n, 0) where no term is contained in another) and
    the terms."""

    R: np.ndarray
    terms: tuple[Term, ...]
    #: for a model whose factors are not all coded by treatment contrasts: the treatment
    #: coding's design ``X_t`` (n, p_t), whose columns ``terms`` refer to (lmerTest builds
    #: the hypotheses there and maps them: :func:`mapped_rows`)
    treatment_X: np.ndarray | None = None

    def contained(self, label: str) -> bool:
        """Is term ``label`` contained in another (its hypothesis made by :func:`type3`)?"""
        inner = [t for t in self.terms if t.label == label]
        return bool(inner) and any(contains(inner[0], o) for o in self.terms)


def over_parameterised_map(X: np.ndarray, R: np.ndarray) -> np.ndarray | None:
    """``M`` with ``X M = R`` (least squares), or ``None`` when ``R`` is not in the span of
    ``X`` (an empty cell of a factor interaction)."""
    M, *_ = np.linalg.lstsq(X, R, rcond=None)
    if np.abs(X @ M - R).max() > 1e-8 * max(1.0, np.abs(R).max()):
        return None
    return M


def type3(X: np.ndarray, R: np.ndarray, terms: list[Term]) -> dict[str, np.ndarray] | None:
    """Type III contrast matrices (rows x p) of the terms contained in others, by label.

    Terms not contained in any other are left out (their hypothesis is their own columns).
    Returns ``None`` when ``R`` is not in the span of ``X`` (an empty cell of a factor
    interaction: lmerTest warns that type III hypotheses are then to be read with care; the
    caller keeps the plain hypotheses).
    """
    containers = {t.label: [o for o in terms if contains(t, o)] for t in terms}
    if not any(containers.values()):
        return {}
    M = over_parameterised_map(X, R)                                   # X M = R
    if M is None:
        return None
    L = M.T.copy()                                                     # (r, p)
    for t in sorted(terms, key=lambda t: len(t.variables), reverse=True):
        basis = L[:, [j for o in containers[t.label] for j in o.x_cols]]
        if not basis.shape[1] or not t.x_cols:   # nothing contains it, or nothing is left
            continue
        coef, *_ = np.linalg.lstsq(basis, L[:, list(t.x_cols)], rcond=None)
        L[:, list(t.x_cols)] = _zap(L[:, list(t.x_cols)] - basis @ coef)
    to_beta = np.linalg.pinv(R) @ X                                    # h' R^+ X
    out = {}
    for t in terms:
        if not containers[t.label]:
            continue
        C = _zap(L[:, list(t.x_cols)].T @ to_beta)
        C = C[np.abs(C).sum(axis=1) > 1e-8]
        out[t.label] = _independent_rows(C)
    return out


def observed_type3(rows: np.ndarray, X: np.ndarray, basis: Type3Basis, keep: np.ndarray,
                   label: str) -> np.ndarray | None:
    """lmerTest's ``anova`` hypothesis of term ``label`` at a voxel whose observed rows
    ``rows`` (n,) bool of ``X`` (n, p) keep the columns ``keep`` (p,) bool, on the kept
    coefficients; ``None`` where it has none.  With treatment coding: the rows :func:`type3`
    gives for the model lme4 fits there (those columns, those rows of X and R).  Otherwise
    lmerTest's steps: the treatment coding's design on those rows, without the columns R's
    pivoted QR finds dependent (``ensure_full_rank``), its hypothesis (the type III rows of a
    contained term, else the term's own columns), mapped to the kept coefficients by
    ``ginv(X_t) X``."""
    if basis.treatment_X is None:
        return _kept_type3(X[rows], keep, basis.R[rows], basis.terms, label)
    from .dropped_columns import kept_columns

    X_t = basis.treatment_X[rows]
    keep_t = kept_columns(X_t, np.ones((1, X_t.shape[0])))[0]
    L = _kept_type3(X_t, keep_t, basis.R[rows], basis.terms, label)
    if L is not None:
        L = mapped_rows(L, X_t[:, keep_t], X[rows][:, keep])
    return L if L is not None and L.shape[0] else None


def _kept_type3(X: np.ndarray, keep: np.ndarray, R: np.ndarray, terms: tuple[Term, ...],
                label: str) -> np.ndarray | None:
    """:func:`observed_type3` in the coding of ``terms``, on the rows given: a contained
    term's type III rows, another's own kept columns."""
    position = np.cumsum(keep) - 1
    kept = [Term(t.label, tuple(int(position[j]) for j in t.x_cols if keep[j]), t.r_cols,
                 t.variables, t.marginal, t.numeric) for t in terms]
    inner = next(t for t in kept if t.label == label)
    if any(contains(inner, o) for o in kept):
        out = type3(X[:, keep], R, kept)
        L = None if out is None else out.get(label)
    else:
        L = np.eye(int(keep.sum()))[list(inner.x_cols)]
    return L if L is not None and L.shape[0] else None


def type1_rows(X: np.ndarray, cols: list[int]) -> np.ndarray:
    """lmerTest's type I (sequential) hypothesis of the term with columns ``cols`` of ``X``
    (:func:`mpiblmm.lmm.contrasts.sequential_rows` of ``X'X``).  lmerTest's ``anova`` tests
    these in place of type III when the fixed part has one term
    (``lmerTest:::get_contrasts_type3``); they span the same hypothesis as the term's
    coefficients, but Satterthwaite's F denominator df depends on the rows."""
    from mpiblmm.lmm.contrasts import sequential_rows

    return sequential_rows((X.T @ X)[None], cols)[0]


def mapped_rows(L_t: np.ndarray, X_t: np.ndarray, X: np.ndarray) -> np.ndarray | None:
    """Rows ``L_t`` on the coefficients of ``X_t`` written on those of ``X`` (the same column
    space in another coding): ``L_t A`` with ``X_t A = X`` (lmerTest's ``map = ginv(X_t)
    %*% X``, for a model whose factors are not all coded by ``contr.treatment``: it builds
    the type III hypotheses in treatment coding and maps them).  ``None`` when ``X`` is not
    in the span of ``X_t``."""
    A = np.linalg.pinv(X_t) @ X
    if np.abs(X_t @ A - X).max() > 1e-8 * max(1.0, np.abs(X).max()):
        return None
    out = _zap(L_t @ _zap(A))
    return out[np.abs(out).sum(axis=1) > 1e-8]


def _independent_rows(C: np.ndarray) -> np.ndarray:
    """The rows of ``C`` with any row in the span of those before it dropped."""
    keep: list[int] = []
    for i in range(C.shape[0]):
        trial = C[keep + [i]]
        if np.linalg.matrix_rank(trial, tol=1e-9 * np.abs(C).max()) == len(keep) + 1:
            keep.append(i)
    return C[keep]
