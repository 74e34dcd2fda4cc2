"""Designs that cannot be fitted at any voxel: user errors before any fitting.

:func:`check_fittable` runs on a built :class:`~mpiblmm.design.Design` (any front end) and
the spec's thresholds, and raises a one-line :class:`~mpiblmm.errors.SpecError` naming the
cause when no voxel, even one observed in every image, could be fitted:

- ``p >= n``: no residual degrees of freedom (REML needs ``n - p > 0``);
- ``X`` rank deficient on all rows: the first column that is a linear combination of the
  columns before it (the criterion of :func:`~mpiblmm.lmm.products.full_rank`, so a
  design that passes is full rank at every complete voxel);
- ``missingness.min_n`` above ``n``;
- per random factor, lme4's refusals (``lme4::lmerControl`` defaults ``check.nlev.gtr.1``,
  ``check.nobs.vs.nlev`` and ``check.nobs.vs.nRE``: "number of levels of each grouping
  factor must be < number of observations", "number of observations (=n) <= number of
  random effects (=l q)"): fewer than 2 levels, or ``n <= l_k q_k``;
- per random factor, linearly dependent columns of its covariates ``Z_k`` (e.g. the
  intercept given twice): ``D_k`` is then not identifiable;
- the factors together fit every row exactly, ``rank([X Z]) = n``: the residual variance is
  not identifiable (:func:`saturated_design`);
- REML only: a random effect the fixed effects absorb on all rows, its column on every
  level in the span of X (:func:`absorbed_problems`): REML is flat along its variance.

Where identifiability depends on a voxel's missing data (its observed rows and levels), the
voxel gets a status code instead (:func:`~mpiblmm.lmm.analysis.identifiable`, status 9).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mpiblmm.errors import SpecError
from mpiblmm.formula_table import TEXT_COLUMN

#: Relative eigenvalue of X'X (and Z_k'Z_k) below which columns count as dependent; the
#: estimator's own rank test (``lmm.products.full_rank``) uses the same.
RANK_RTOL = 1e-10


#: Largest magnitude of a column of X (and, inverted, the smallest non-zero one) the fit
#: takes: its sums of products over up to ~1e6 rows and the kernels' products of several
#: such sums must stay within float64 (1e308, and 1e-308 without denormals).
X_SCALE_LIMIT = 1e100


def out_of_scale_column(A: np.ndarray) -> int | None:
    """Index of the first column of ``A`` whose largest magnitude is above
    :data:`X_SCALE_LIMIT` or, not zero, below its inverse; ``None`` if every column is in
    range (a fault audit's age column in 1e200 crashed the fit, in 1e-170 it was dropped as
    zero without a word)."""
    peak = np.abs(np.asarray(A, dtype=np.float64)).max(axis=0, initial=0.0)
    bad = (peak > X_SCALE_LIMIT) | ((peak > 0) & (peak < 1 / X_SCALE_LIMIT))
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def _unit_gram(A: np.ndarray) -> np.ndarray | int:
    """The Gram matrix of ``A``'s columns scaled to unit length (units do not decide the
    rank), or the index of its first zero column."""
    A = np.asarray(A, dtype=np.float64)
    peak = np.abs(A).max(axis=0, initial=0.0)
    peak = np.where(peak > 0, peak, 1.0)      # squares of 1e160 or 1e-170 would over/underflow
    scale = peak * np.sqrt(((A / peak) ** 2).sum(axis=0))
    if not (scale > 0).all():
        return int(np.flatnonzero(~(scale > 0))[0])
    return (A / scale).T @ (A / scale)


def dependent_column(A: np.ndarray, rtol: float = RANK_RTOL) -> int | None:
    """Index of the first column of ``A`` (n, p) in the span of the columns before it (or
    zero), by the eigenvalues of the leading Gram blocks; ``None`` if ``A`` has full column
    rank."""
    G = _unit_gram(A)
    if isinstance(G, int):
        return G
    w_all = np.linalg.eigvalsh(G)
    if w_all[0] > rtol * w_all[-1]:
        return None
    for j in range(1, A.shape[1]):
        w = np.linalg.eigvalsh(G[:j + 1, :j + 1])
        if not w[0] > rtol * w[-1]:
            return j
    return A.shape[1] - 1


def dependent_culprit(A: np.ndarray, j: int) -> int:
    """The column to name for the dependence :func:`dependent_column` found at ``j``: the
    last of the first ``j + 1`` columns with a large weight (at least a tenth of the largest)
    in the smallest eigenvector of their scaled Gram matrix.  Usually ``j`` itself; but a
    column far from the dependence can tip the eigenvalue ratio below the tolerance by
    raising the largest eigenvalue (formula audit: 'flagtrue:sqrt(age)', 15% outside the
    span of the others, was named where age, sqrt(age), log10(age) and log10(age):age were
    nearly dependent)."""
    G = _unit_gram(np.asarray(A, dtype=np.float64)[:, :j + 1])
    if isinstance(G, int):
        return G
    weight = np.abs(np.linalg.eigh(G)[1][:, 0])
    return int(np.flatnonzero(weight >= 0.1 * weight.max())[-1])


def check_fittable(design: Any, spec: Any = None) -> None:
    """Raise :class:`SpecError` if no voxel of ``design`` could be fitted (module doc): the
    first of :func:`fittable_problems`.

    ``spec`` (optional) gives file names for the messages and ``missingness.min_n``.
    """
    problems = fittable_problems(design, spec)
    if problems:
        raise problems[0]


def fittable_problems(design: Any, spec: Any = None) -> list[SpecError]:
    """Every reason (module doc) why no voxel of ``design`` could be fitted, in the order
    :func:`check_fittable` tests them; ``mpiblmm check`` lists them all, in the same words."""
    n, p = design.X.shape
    spec_path = str(getattr(spec, "path", "spec"))
    x_key = "formula" if getattr(spec, "is_formula", False) else "X"   # the formula makes X
    x_where = str(getattr(spec, "X", None) or f"{spec_path}: {x_key}")
    out = []
    if p >= n:
        out.append(SpecError(f"{p} fixed effects (columns) but only {n} observations (rows): a "
                             "fit needs more observations than fixed effects", x_where))
    else:
        names = tuple(getattr(design, "fixed_names", ()) or ())
        j = out_of_scale_column(design.X)
        if j is not None:
            label = f"column {j + 1}" + (f" ({names[j]!r})" if len(names) == p else "")
            peak = float(np.abs(design.X[:, j]).max())
            out.append(SpecError(f"{label} has values up to {peak:.3g} in magnitude: the fit "
                                 "multiplies columns of X together, which over- or underflows "
                                 f"outside {1 / X_SCALE_LIMIT:g} to {X_SCALE_LIMIT:g}; rescale "
                                 "it (other units)", x_where))
        elif (j := dependent_column(design.X)) is not None:
            j = dependent_culprit(design.X, j)
            out.append(SpecError(f"{column_words(design.X, j, names)}: X is rank deficient, "
                                 "so the fixed effects are not identifiable; drop or recode "
                                 "that column", x_where))
    too_few = min_n_problem(spec, n)        # (the spec's, not the design's: no typo hint)
    if too_few is not None:
        out.append(too_few)
    for i, f in enumerate(design.factors):
        where = f"{spec_path}: random[{i}] ({f.name!r})"
        l, q = f.n_levels, f.n_effects
        if l < 2:
            out.append(SpecError(f"has {l} level: a grouping factor needs at least 2 levels",
                                 where))
        elif n <= l * q:
            out.append(SpecError(
                f"{n} observations for {l * q} random effects ({l} levels x {q} effects per "
                "level): the random effects and the residual variance are not identifiable "
                "(lme4 refuses this too); the number of observations must exceed levels x "
                "effects", where))
        else:
            problem = random_covariates_problem(design, spec, i)
            if problem is not None:
                out.append(problem)
    if not out and design.factors and saturated_design(design):
        formula = getattr(spec, "formula", None)
        out.append(SpecError(
            f"the fixed and random effects fit all {n} observations exactly (rank of [X Z] = "
            f"{n}): the residual variance is not identifiable; drop a random term or factor",
            f"{spec_path}: formula {formula!r}" if formula else f"{spec_path}: random"))
    method = getattr(getattr(spec, "estimation", None), "method", "REML")
    if not out and design.factors and method == "REML":
        out += absorbed_problems(design, spec)
    # a covariate read as text because of a typo (a factor of many levels) may be the cause
    # of any of them: p >= n, X rank deficient, [X Z] fitting every row (fault audits)
    typos = [note for note in getattr(design, "notes", ()) if TEXT_COLUMN in note]
    if typos:
        out = [e if e is too_few else SpecError(f"{e.message} (perhaps because {typos[0]})",
                                                e.where) for e in out]
    return out


def min_n_problem(spec: Any, n: int) -> SpecError | None:
    """``missingness.min_n`` above the ``n`` observations: no voxel could be fitted (also
    where the design could not be built: ``mpiblmm check`` lists it with the design's
    problem, from the number of images)."""
    min_n = getattr(getattr(spec, "missingness", None), "min_n", None)
    if min_n is None or min_n <= n:
        return None
    return SpecError(f"{min_n} is more than the {n} observations: no voxel could be fitted",
                     f"{getattr(spec, 'path', 'spec')}: missingness.min_n")


def absorbed_problems(design: Any, spec: Any = None) -> list[SpecError]:
    """A random effect whose columns (one per level) all lie in the span of X on all rows
    (:func:`~mpiblmm.lmm.analysis.absorbed_effects`: the fixed effects absorb it, e.g.
    ``y ~ group + (1 | site)`` with two sites, each of one group): REML's likelihood does
    not depend on its variance at any complete voxel."""
    from mpiblmm.lmm.analysis import absorbed_effects

    n = design.X.shape[0]
    absorbed = absorbed_effects(design.X, _random_design(design), np.ones((1, n), dtype=bool))[0]
    spec_path = str(getattr(spec, "path", "spec"))
    out, start = [], 0
    for i, f in enumerate(design.factors):
        for e, effect in enumerate(f.effect_names):
            if absorbed[start + e]:
                out.append(SpecError(
                    f"random effect {effect!r} of factor {f.name!r}: on every level its "
                    "column lies in the span of the fixed effects (X), which absorb it, so "
                    "REML's likelihood does not depend on its variance (not identifiable); "
                    "drop the fixed columns constant within its levels or the random term, "
                    "or fit by ML", f"{spec_path}: random[{i}] ({f.name!r})"))
        start += f.n_effects
    return out


def lme4_dropped_columns(X: np.ndarray) -> tuple[list[int], int | None]:
    """The columns of ``X`` lme4 drops (``fixed-effect model matrix is rank deficient so
    dropping k columns``): each column exactly in the span of the kept ones before it, or
    zero; and the first column only *nearly* in that span (``None`` if none), which is not
    dropped but refused (a covariate far from zero beside the intercept: dropping it would
    fit another model without a word)."""
    X = np.asarray(X, dtype=np.float64)
    keep: list[int] = []
    dropped: list[int] = []
    for j in range(X.shape[1]):
        cols = X[:, keep + [j]]
        if dependent_column(cols) is None:
            keep.append(j)
        elif not np.any(X[:, j]) or _outside_span(cols, len(keep)) <= 1e-10:
            dropped.append(j)
        else:
            return dropped, j
    return dropped, None


def saturated_design(design: Any) -> bool:
    """Whether ``[X Z]`` has rank ``n`` on all rows (no residual variance at any voxel;
    :func:`~mpiblmm.lmm.analysis.saturated`, the test a voxel's observed rows get).  Only
    designs with ``p + q >= n`` and ``n`` within the exact test's reach are tested."""
    from mpiblmm.lmm.analysis import SATURATED_EXACT_UP_TO, saturated
    n, p = design.X.shape
    if p + sum(f.n_levels * f.n_effects for f in design.factors) < n \
            or n > SATURATED_EXACT_UP_TO:
        return False
    return bool(saturated(design.X, _random_design(design), np.ones((1, n), dtype=bool))[0][0])


def _random_design(design: Any) -> Any:
    """The estimator's :class:`~mpiblmm.lmm.products.RandomDesign` of ``design``'s factors."""
    from mpiblmm.lmm.products import random_design

    return random_design([f.codes for f in design.factors], [f.Z for f in design.factors])


def random_covariates_problem(design: Any, spec: Any, i: int) -> SpecError | None:
    """The error for linearly dependent random-effect covariates ``Z_i`` of factor ``i`` of
    ``design`` (e.g. the intercept given twice), naming its design file when the spec has
    one; ``None`` when ``Z_i`` has full column rank.  ``mpiblmm check`` lists it too."""
    f = design.factors[i]
    k = dependent_column(f.Z)
    if k is None:
        return None
    specs = tuple(getattr(spec, "random", ()) or ())
    fs = specs[i] if i < len(specs) else None
    where = str(getattr(fs, "design", None)
                or f"{getattr(spec, 'path', 'spec')}: random[{i}] ({f.name!r})")
    return SpecError(f"random effects of factor {f.name!r}: "
                     f"{column_words(f.Z, k, tuple(f.effect_names))}: their covariance is "
                     "not identifiable; drop that column", where)


def column_words(A: np.ndarray, j: int, names: Sequence[str]) -> str:
    """'column 3 ('age') is zero' or '... is a linear combination of the columns before it'."""
    what = f"column {j + 1}" + (f" ({names[j]!r})" if len(names) == A.shape[1] else "")
    if not np.any(A[:, j]):
        return f"{what} is zero"
    left = _outside_span(A, j)
    if left > 1e-10:   # in the span to ~1e-5 only: a covariate far from 0 beside an intercept
        return (f"{what} is nearly a linear combination of the columns before it (only "
                f"{left:.1e} of it lies outside their span; if it is a covariate far from "
                f"zero beside the intercept, such as age + 10000, centre it: scale(age))")
    return f"{what} is a linear combination of the columns before it"


def _outside_span(A: np.ndarray, j: int) -> float:
    """The part of column ``j`` of ``A`` outside the span of the columns before it, relative
    to its length (least squares on unit-length columns)."""
    B = np.asarray(A[:, :j + 1], dtype=np.float64)
    B = B / np.where(np.abs(B).max(axis=0) > 0, np.abs(B).max(axis=0), 1.0)
    norm = np.linalg.norm(B, axis=0)
    B = B / np.where(norm > 0, norm, 1.0)  # a zero column before j stays zero (was NaN)
    if j == 0:
        return 1.0
    coef = np.linalg.lstsq(B[:, :j], B[:, j], rcond=None)[0]
    return float(np.linalg.norm(B[:, j] - B[:, :j] @ coef))


def design_notes(spec: Any, design: Any) -> list[str]:
    """The notes (not errors) ``check`` and ``fit`` both print, in the same words and order:
    :func:`repeated_images`, the front end's (``design.notes``: a formula's columns left
    out as lme4 leaves them out) and :func:`overlapping_random_terms`."""
    return (repeated_images(spec) + list(getattr(design, "notes", ()))
            + overlapping_random_terms(design) + slopes_constant_within_levels(design))


def slopes_constant_within_levels(design: Any) -> list[str]:
    """Notes for a random slope whose covariate is constant within every level of its factor
    (a site-level covariate under ``(1 + x | site)``): beside the intercept its effect is
    not told apart from the intercept's within a level, so nearly every voxel ends singular
    (a fault audit: 141 of 144 voxels status 2, no word before).  lme4 fits it too."""
    notes = []
    for f in design.factors:
        Z = np.asarray(f.Z, dtype=np.float64)
        if Z.shape[1] < 2 or f.n_levels < 2:
            continue
        order = np.argsort(f.codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(f.codes[order]) != 0])
        sorted_z = Z[order]
        low = np.minimum.reduceat(sorted_z, starts, axis=0)
        high = np.maximum.reduceat(sorted_z, starts, axis=0)
        constant = np.all(low == high, axis=0)
        intercept = np.any(np.all(Z == Z[:1], axis=0) & constant)
        names = tuple(f.effect_names)
        for j in np.flatnonzero(constant):
            if not intercept or np.all(Z[:, j] == Z[0, j]):
                continue             # the intercept itself, or no intercept to confuse it with
            name = names[j] if j < len(names) else f"column {j + 1}"
            notes.append(f"random factor {f.name!r}: {name!r} is constant within every level "
                         f"of {f.name!r}, so its random slope is not told apart from the "
                         "random intercept: expect singular fits (status 2) at most voxels; "
                         "a covariate of the level belongs in the fixed part only")
    return notes


def repeated_images(spec: Any) -> list[str]:
    """A note for an image listed twice in the spec's ``images`` (a copied line?): it enters
    the fit as two observations, which is seldom meant (a fault audit saw it fitted without a
    word).  Paths compared as written, normalised; a 4-D file's volumes by number."""
    import os

    seen: dict[tuple, int] = {}
    for i, path in enumerate(getattr(spec, "images", None) or ()):
        key = (os.path.normpath(str(path)), getattr(path, "volume", None))
        if key in seen:
            what = str(path) + (f" (volume {key[1]})" if key[1] is not None else "")
            return [f"{what} is observation {seen[key] + 1} and {i + 1}: listed twice, it "
                    "enters the fit twice"]
        seen[key] = i
    return []


def overlapping_random_terms(design: Any) -> list[str]:
    """Notes (not errors) for pairs of random factors with the same grouping whose
    covariates overlap, ``rank([Z_a Z_b]) < q_a + q_b``: ``(1 | subject) + (1 | subject)``,
    or ``(cond || subject)`` with a factor ``cond`` (its indicator columns sum to the
    intercept).  lme4 fits them without a word, and so does mpiblmm: the likelihood, the
    fixed effects and their tests are identified, but how the variance splits between the
    two terms is not (an audit saw the split differ 40-237 fold from lme4's at equal
    log-likelihoods)."""
    notes = []
    factors = list(design.factors)
    for i, a in enumerate(factors):
        for b in factors[i + 1:]:
            if not np.array_equal(a.codes, b.codes):
                continue
            both = np.column_stack([a.Z, b.Z])
            if dependent_column(both) is not None:
                notes.append(f"random terms {a.name!r} and {b.name!r} group by the same "
                             "levels and their effects overlap: the fit, the fixed effects "
                             "and their tests are identified, but how the variance splits "
                             "between the two terms is arbitrary (lme4's is too; where both "
                             "have the same effect, its variance is NaN in both)")
    return notes
