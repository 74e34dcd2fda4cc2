"""One chunk of voxels, start to finish: data -> product forms -> fit -> contrasts -> result arrays.

This is the numerical step the pipeline runs per chunk; it is pure (numpy arrays in, numpy
arrays out; no MPI, no files), so a whole analysis can be checked serially.

Per chunk:

1. Missingness: a voxel is fitted when it has at least ``max(min_n, p + 1)`` observations and
   at least ``min_fraction`` of all observations (``p`` counts the columns its observed rows
   support, step 2); otherwise its status says why.  A voxel
   whose observed rows cannot identify the random effects (lme4's rule on the voxel's own
   data: every factor observed at 2 levels or more, and more observations than levels x
   effects of every factor, counting the levels it observes) is not fitted (status 9,
   :func:`identifiable`).  So is a voxel whose observed rows the fixed and random effects fit
   exactly, ``rank([X Z]) = n_obs`` on those rows (several factors together can saturate
   while each passes lme4's rule): its residual variance is at best weakly identified
   (often fitted as 0; :func:`saturated`).  A fitted voxel whose data, not design, the
   fixed and random effects fit exactly (its residual variance vanishes) gets status 9 too
   (:func:`_residual_vanished`), and under REML a voxel on whose observed rows the fixed
   effects absorb a random effect (:func:`absorbed_effects`)
2. Voxels observed in every image share X'X, Z'X and Z'Z (one product-form group); voxels
   with missing observations get product forms of their own.  A voxel whose observed rows
   leave X rank deficient is fitted without the columns lme4 drops, voxels that drop the
   same columns together (:func:`_fit_dropping_columns`); status 4 where that leaves X
   nearly rank deficient.
3. A voxel on whose observed rows one random factor's every effect is another's (every
   family down to one subject there) is fitted without it: the same likelihood, fixed
   effects and tests (:mod:`.shared_effects`).
4. The estimator fits each group -- both as one in a small chunk when the structure's algebra
   gives a voxel the same bits either way (``joint_groups``: one factor), so the fixed cost of
   a fit is paid once; inference computes every contrast at the fitted voxels.

A voxel's results do not depend on the other voxels of its chunk, to the last bit: which
group a voxel joins depends on its own data only, and the numerics treat each voxel alike
(:mod:`~mpiblmm.lmm.rowwise`).  So a study gives the same bits at any rank count and memory
budget.  (Grouping voxels that share a missingness pattern was tried and dropped for this:
whether a pattern was common enough to group depended on the chunk.)

The returned mapping is keyed by the results-file dataset paths (``beta``,
``random/<factor>/cov``, ``contrasts/<name>/t`` ...), one row per voxel of the chunk, NaN for
voxels without a fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from .contrasts import sequential_rows
from .dropped_columns import estimable, kept_columns
from .effect_scale import EffectTransform, effect_transform, restore, transformed_design
from .estimate import fit
from .inference import f_contrast, t_contrast
from .model import (F_STATS, STATUS_EMPTY, STATUS_NUMERICAL, STATUS_RANK_DEFICIENT,
                    STATUS_SINGULAR, STATUS_TOO_FEW, STATUS_UNIDENTIFIABLE, T_STATS,
                    ProductForms, RandomStructure, result_datasets)
from .products import RandomDesign, full_rank, product_forms
from .satterthwaite import satterthwaite_setup
from .shared_effects import (blank_shared, levels_observed, redundant_factor, shared_effects,
                             without_factor)
from .structures import for_structure
from .structures.blocked import factor_levels
from .type3 import Type3Basis, observed_type3


@dataclass(frozen=True)
class ContrastDef:
    """A contrast to test at every voxel: ``L`` (r, p), or (v, r, p) each voxel's own rows;
    ``kind`` "T" or "F".  ``sequential``: the columns of a term whose F test takes the type I
    rows of each voxel's own X'X (:func:`.contrasts.sequential_rows`; lmerTest's ``anova`` of
    a one-term fixed part).  ``term``: the formula term whose ``anova`` F this is, tested as
    ``anova`` tests it where a voxel's observed rows drop columns
    (:func:`_fit_dropping_columns`)."""

    name: str
    L: np.ndarray
    kind: str = "T"
    alternative: str = "two-sided"
    sequential: tuple[int, ...] = ()
    term: str = ""


@dataclass(frozen=True)
class Settings:
    """How voxels are selected and fitted (the spec's ``missingness`` and ``estimation``)."""

    method: str = "REML"
    tolerance: float | None = None
    max_iterations: int | None = None
    min_n: int = 0
    min_fraction: float = 0.0
    memory_budget: int | None = None  # bytes the estimator may use for one chunk


@dataclass(frozen=True, eq=False)
class Model:
    """What is the same at every voxel: X (n, p), the random design and the contrasts."""

    X: np.ndarray
    rd: RandomDesign
    contrasts: tuple[ContrastDef, ...]
    #: the formula's type III hypotheses, to make again on a voxel's kept columns
    type3: Type3Basis | None = None

    @property
    def structure(self) -> RandomStructure:
        return self.rd.structure


def bytes_per_voxel(n: int, p: int, structure: RandomStructure, n_contrasts: int,
                    blocks=None) -> int:
    """A generous estimate of the working memory one voxel of a chunk needs (bytes).

    Counts the data (a few copies of n values), the per-voxel product forms and the
    estimator's and inference's per-voxel arrays (several copies of the largest of them).
    ``blocks``: the blocked pattern (:func:`~mpiblmm.lmm.structure.choose`) when the design
    uses it; the structure's algebra says how many values its Z'Z takes (blocked: its
    non-zero blocks, not q^2).
    """
    q = structure.q
    zz = for_structure(structure, blocks).zz_values_per_voxel(p)
    m = sum(f.n_vech for f in structure.factors) + 1
    per_voxel = 4 * n + 8 * (p * p + q * p + zz + q) + m * m * p * p + 6 * n_contrasts
    return 8 * int(per_voxel) + 4096


def fit_mb_per_voxel(model: Model) -> float:
    """The design's algebra's estimate of one voxel's working memory in a fit (MiB)."""
    from .structure import choose

    algebra = for_structure(model.structure, choose(model.rd))
    return algebra.fit_bytes_per_voxel(model.X.shape[1]) / 2**20


#: What a rank holds per results dataset it writes (the HDF5 dataset and its transfer
#: properties, kept open for every chunk), KiB: a memory audit's fit with 300 contrasts
#: (~1,800 datasets) went 8 MiB over its budget; measured 30.1-30.2 KiB per dataset (70,
#: 610 and 1,810 datasets; 5.5 at creation, the rest at the first write).
RESULTS_DATASET_KIB = 32


def results_held_mb(model: Model) -> float:
    """What a rank holds for the results file's datasets while it fits (MiB): counted with
    what it holds at its start, before the work budget is sized."""
    p = model.X.shape[1]
    datasets = result_datasets(p, [(f.name, f.n_effects) for f in model.structure.factors],
                               [(c.name, c.kind) for c in model.contrasts])
    return len(datasets) * RESULTS_DATASET_KIB / 1024


def empty_results(model: Model, v: int) -> dict[str, np.ndarray]:
    """Result arrays for ``v`` voxels, every float NaN (the shape of a chunk's output; the
    layout is :func:`~mpiblmm.lmm.model.result_datasets`, as the results file's)."""
    fills = {"status": STATUS_EMPTY, "n": 0, "iterations": 0}
    layout = result_datasets(model.X.shape[1],
                             [(f.name, f.n_effects) for f in model.structure.factors],
                             [(c.name, c.kind) for c in model.contrasts])
    return {path: np.full((v,) + shape, fills.get(path, np.nan), dtype=dtype)
            for path, (shape, dtype) in layout.items()}


def analyse_chunk(model: Model, Y: np.ndarray, settings: Settings) -> dict[str, np.ndarray]:
    """Fit every voxel of a chunk and test every contrast.

    Parameters
    ----------
    model
        X, random design and contrasts.
    Y
        (v, n) observations of ``v`` voxels; NaN marks a missing observation.
    settings
        Missingness thresholds and estimation settings.
    """
    observed = np.isfinite(Y)
    # the observed levels per factor, counted once for the shared effects and the rules
    counts = levels_observed(model.rd, observed)
    shared = shared_effects(model.rd, observed, counts)
    drop = redundant_factor(model.rd, shared, Y.shape[0])
    out = (_analyse(model, Y, settings, observed, counts) if (drop < 0).all() else
           _analyse_without_redundant(model, Y, settings, drop, counts))
    # NaN for the shared variances: all of them where no factor was left out, where one
    # was, those of its effects in the factors that took them over (its own are NaN)
    for k in np.unique(drop):
        blank_shared(model.rd, shared, out, drop == k, None if k < 0 else int(k))
    return out


def _analyse_without_redundant(model: Model, Y: np.ndarray, settings: Settings,
                               drop: np.ndarray, counts: list[np.ndarray] | None
                               ) -> dict[str, np.ndarray]:
    """:func:`analyse_chunk` where some voxels' observed rows make a factor redundant
    (``drop`` (v,): its index, -1 where none; :func:`~.shared_effects.redundant_factor`):
    those voxels are fitted without it, the same likelihood, fixed effects and tests
    (:mod:`.shared_effects`, (1)) in the iterations of a regular fit; its covariance stays
    NaN.  A voxel's numbers do not depend on the others of the chunk, as before."""
    out = empty_results(model, Y.shape[0])
    for k in np.unique(drop):
        index = np.flatnonzero(drop == k)
        part = _voxels_of(model, index)
        if k >= 0:
            part = Model(part.X, without_factor(model.rd, int(k)), part.contrasts, part.type3)
        sub = (analyse_chunk(part, Y[index], settings) if k >= 0 else
               _analyse(part, Y[index], settings, np.isfinite(Y[index]),
                        None if counts is None else [c[index] for c in counts]))
        for path, values in sub.items():
            out[path][index] = values
    return out


def _voxels_of(model: Model, index: np.ndarray) -> Model:
    """``model`` for the voxels ``index`` of its chunk: a contrast with rows of each voxel's
    own (``L`` (v, r, p)) keeps theirs."""
    if all(c.L.ndim != 3 for c in model.contrasts):
        return model
    return Model(model.X, model.rd, tuple(replace(c, L=c.L[index]) if c.L.ndim == 3 else c
                                          for c in model.contrasts), model.type3)


def _analyse(model: Model, Y: np.ndarray, settings: Settings, observed: np.ndarray,
             counts: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """:func:`analyse_chunk` on a model no voxel's observed rows make redundant; ``counts``:
    the voxels' :func:`~.shared_effects.levels_observed`, when already counted."""
    v, n = Y.shape
    p = model.X.shape[1]
    out = empty_results(model, v)
    n_obs = observed.sum(axis=1)
    out["n"][:] = n_obs
    allowed = (n_obs >= settings.min_n) & (n_obs >= fewest_of_fraction(settings.min_fraction, n))
    extreme = out_of_scale_data(Y, observed)
    allowed &= ~extreme
    enough = allowed & (n_obs >= p + 1)
    out["status"][:] = np.where(n_obs == 0, STATUS_EMPTY, STATUS_TOO_FEW)
    out["status"][extreme] = STATUS_NUMERICAL
    # the per-factor counts of observed levels, once for both rules that use them
    levels = (levels_observed(model.rd, observed[enough]) if counts is None else
              [c[enough] for c in counts])
    sat, ident = np.zeros(v, dtype=bool), np.zeros(v, dtype=bool)
    sat[enough], post_fit = saturated(model.X, model.rd, observed[enough], levels=levels)
    ident[enough] = identifiable(model.rd, observed[enough], levels=levels)
    if settings.method == "REML":     # a random effect the fixed effects absorb: REML is flat
        ident[enough] &= ~absorbed_effects(model.X, model.rd, observed[enough],
                                           levels).any(axis=1)
    check_after = np.flatnonzero(enough)[post_fit]
    # covariates far from unit size or from zero: fitted scaled and centred (effect_scale)
    transform = effect_transform(model.rd)
    fitted_model = model if transform is None else Model(
        model.X, transformed_design(model.rd, transform), model.contrasts)
    parts = [_group_forms(fitted_model, Y[group].T, observed[group].T, group, out,
                          ident[group] & ~sat[group])
             for group in product_form_groups(observed, enough)]
    for pf, index in fit_groups([part for part in parts if part is not None]):
        _fit_forms(fitted_model, pf, settings, index, out, transform)
    _unfit_vanishing_residual(Y, check_after, out)
    # n <= p: too few for all p columns, maybe not for those the observed rows support
    _fit_dropping_columns(model, Y, settings, out, np.flatnonzero(allowed & (n_obs > 0) & ~enough))
    _blank_unobserved_effects(model.rd, observed, out)
    return out


#: Data beyond this size (or, not zero, below its inverse) are not fitted: the fit's sums of
#: squares and cross products over- or underflow (a degenerate-voxel audit: at 1e150 status
#: 0 with every p NaN, at 1e-160 status 2 with a subnormal sigma2, at 1e160 status 5); X's
#: columns are held to the same range (``checks.X_SCALE_LIMIT``).
DATA_SCALE_LIMIT = 1e100


def out_of_scale_data(Y: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Voxels (v,) whose largest observed ``|y|`` is above :data:`DATA_SCALE_LIMIT` or, not
    zero, below its inverse: status 5 (numerical failure) without a fit."""
    with np.errstate(invalid="ignore"):
        size = (np.where(observed, np.abs(Y), 0.0).max(axis=1) if Y.shape[1] else
                np.zeros(Y.shape[0])).astype(np.float64)     # (float32 data: 1e100 overflows)
    return (size > DATA_SCALE_LIMIT) | ((size > 0) & (size < 1.0 / DATA_SCALE_LIMIT))


def fewest_of_fraction(fraction: float, n: int) -> int:
    """The fewest observations that are at least ``fraction`` of ``n``, the fraction read as
    the decimal it was written as: 0.55 of 200 is 110 (in floating point 0.55 * 200 is
    110.00000000000001, and the voxels with exactly 110 were refused)."""
    return math.ceil(Fraction(repr(float(fraction))) * n)


def _blank_unobserved_effects(rd: RandomDesign, observed: np.ndarray,
                              out: dict[str, np.ndarray]) -> None:
    """NaN in the rows and columns of ``random/<factor>/cov`` for the effects whose covariate
    is zero on every observed row of a fitted voxel: no observation carries them, so the
    likelihood is flat along their variance and the number the fit ends at means nothing
    (an lme4 audit: a random slope of a group none of whose images is observed, and
    ``(0 + time | subject)`` where only time 0 is; lme4 reports a value with a warning that
    its Hessian is singular).  The likelihood, the fixed effects and the contrasts do not
    depend on them and stay."""
    fitted = out["status"] <= STATUS_SINGULAR
    if not fitted.any():
        return
    seen_rows = observed[fitted].astype(np.float64)          # (v, n)
    start = 0
    for f in rd.structure.factors:
        carried = (rd.vals[:, start:start + f.n_effects] != 0).astype(np.float64)  # (n, q_k)
        start += f.n_effects
        absent = (seen_rows @ carried) == 0                    # (v, q_k): no observed row
        if not absent.any():
            continue
        cov = out[f"random/{f.name}/cov"]
        block = cov[fitted]
        block[absent[:, :, None] | absent[:, None, :]] = np.nan
        cov[fitted] = block


#: Saturation (:func:`saturated`) is decided by exact algebra on an ``n_obs x n_obs`` matrix
#: per voxel up to this many observations (``O(m^3)``: about a millisecond at 256); a larger
#: candidate voxel (nested or cohort designs with hundreds of levels pass the screen at
#: hundreds of observations; at 1024 the test doubled the run time of such a study) is
#: fitted and tested afterwards (:data:`SATURATED_SIGMA2`).
SATURATED_EXACT_UP_TO = 256

#: The post-fit test for larger candidates: a residual variance below this fraction of the
#: variance of the voxel's observed data.  The 2286 regular voxels of the lme4 audit (REML
#: and ML, crossed and nested factors) have sigma2 / var(y) >= 3e-3; the voxels it found
#: fitting to rounding reach 1e-12, so 1e-10 is far below every regular voxel.  It is the
#: weaker test: a saturated voxel's likelihood can be flat in sigma2 rather than peak at 0
#: (of the audit's 83 saturated voxels, 19 had sigma2 / var(y) < 1e-5 and 3 < 1e-10).
SATURATED_SIGMA2 = 1e-10

#: Rows of the padded index a batch of the exact test gathers at once (memory: 8 bytes per
#: entry of its ``m x m`` matrices).
_SATURATED_BATCH_ENTRIES = 1 << 22


def saturated(X: np.ndarray, rd: RandomDesign, observed: np.ndarray, rtol: float = 1e-10,
              levels: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (v,) whose observed rows the fixed and random effects fit exactly,
    ``rank([X Z]) = n_obs`` on those rows, so the residual variance is at best weakly
    identified; and the voxels (v,) left to the post-fit test (:data:`SATURATED_EXACT_UP_TO`).

    Screen: the rank is at most ``p +`` the effects of the observed levels, so only voxels
    where that count reaches ``n_obs`` are candidates (cheap, from the level counts).  For a
    candidate, ``rank = n_obs`` exactly when the row Gram matrix ``K = A A'`` of ``A = [X Z]``
    (columns scaled to unit length over all rows, so units do not decide) restricted to the
    observed rows is nonsingular: its eigenvalues, rows and columns scaled to unit diagonal,
    smallest above ``rtol`` times largest (``full_rank``'s criterion).  Cost per candidate
    ``O(m^2 (p + r) + m^3)``, ``m = n_obs <= p + q_obs``.  Candidates are taken in groups of
    equal ``n_obs`` (no padding), so a voxel's answer depends on its own rows only.
    Complete voxels share one answer.  ``observed`` is (v, n); ``levels``: its
    :func:`levels_observed`, when already counted."""
    v = observed.shape[0]
    sat, late = np.zeros(v, dtype=bool), np.zeros(v, dtype=bool)
    if v == 0:
        return sat, late
    complete = observed.all(axis=1)
    if complete.any() and (v > 1):                       # complete voxels: one answer
        one = np.flatnonzero(complete)[:1]
        first = saturated(X, rd, observed[one], rtol, _rows(levels, one))
        sat[complete], late[complete] = first[0][0], first[1][0]
        if complete.all():
            return sat, late
        rest = np.flatnonzero(~complete)
        sat[rest], late[rest] = saturated(X, rd, observed[rest], rtol, _rows(levels, rest))
        return sat, late
    p = X.shape[1]
    n_obs = observed.sum(axis=1)
    if levels is None:
        levels = levels_observed(rd, observed)
    effects = p + sum(seen * f.n_effects for seen, f in zip(levels, rd.structure.factors))
    candidate = (effects >= n_obs) & (n_obs > 0)
    late[:] = candidate & (n_obs > SATURATED_EXACT_UP_TO)
    exact = candidate & ~late
    if not exact.any():
        return sat, late
    # A = [X Z] with unit columns: X's part dense, Z's per factor (level codes, covariates)
    xs = np.sqrt((X * X).sum(axis=0))
    Xs = X / np.where(xs > 0, xs, 1.0)
    zsq = np.bincount(rd.cols.ravel(), (rd.vals * rd.vals).ravel(), minlength=rd.structure.q)
    zn = np.sqrt(zsq)
    Zs = rd.vals / np.where(zn > 0, zn, 1.0)[rd.cols]
    for m in np.unique(n_obs[exact]):
        group = np.flatnonzero(exact & (n_obs == m))
        step = max(1, _SATURATED_BATCH_ENTRIES // int(m * m))
        for b in range(0, group.size, step):
            which = group[b:b + step]
            rows = np.nonzero(observed[which])[1].reshape(which.size, m)   # (k, m) sorted
            xr = Xs[rows]
            K = np.matmul(xr, np.swapaxes(xr, 1, 2))
            start = 0
            for f in rd.structure.factors:
                c = rd.cols[rows, start]                                   # (k, m) level column
                z = Zs[rows, start:start + f.n_effects]                    # (k, m, q_k)
                K += (c[:, :, None] == c[:, None, :]) * np.matmul(z, np.swapaxes(z, 1, 2))
                start += f.n_effects
            d = np.diagonal(K, axis1=1, axis2=2)
            ok = (d > 0).all(axis=1)
            s = 1.0 / np.sqrt(np.where(d > 0, d, 1.0))
            w = np.linalg.eigvalsh(K * s[:, :, None] * s[:, None, :])
            sat[which] = ok & (w[:, 0] > rtol * w[:, -1])
    return sat, late


#: An effect's columns lie in the span of X on a voxel's rows when the part of each outside
#: it is below this fraction of its squared length (1e-6 of its length; unit-length columns
#: of X and Z).  The residual comes from an orthonormal basis of X's observed rows, so its
#: rounding is about eps times X's condition number (below 1e-10 of the length for any X
#: that passes ``full_rank``): far from this threshold on either side.
ABSORBED_RTOL = 1e-12

#: Entries of a batch's (voxels, observed rows, columns) arrays in :func:`absorbed_effects`.
_ABSORBED_BATCH_ENTRIES = 1 << 21


def absorbed_effects(X: np.ndarray, rd: RandomDesign, observed: np.ndarray,
                     levels: list[np.ndarray] | None = None) -> np.ndarray:
    """(v, effects) bool: on a voxel's observed rows, the columns of a random effect (one
    per observed level: the effect's covariate on that level's rows) all lie in the span
    of X, so the fixed effects absorb it.  REML's likelihood is then flat along its
    variance and covariances (it depends on Z only through its part orthogonal to X), and
    the fit ends wherever it stops: a degenerate-voxel audit found a subject variance of
    7872 where lme4's arbitrary answer was 407, and standard errors of between-subject
    contrasts following it (9 rows of 3 subjects, subject-level columns in X).  ML is not
    flat there (the variance goes to 0, as lme4's).

    Only an effect with at most ``p`` observed levels can be absorbed (its columns are
    independent), so only those voxels are tested: the residual of each level's column
    after projection on an orthonormal basis of X's observed rows (batched SVD, singular
    values below 1e-8 of the largest left out: X's numerical column space; X's and
    Z's columns scaled to unit length over all rows) against :data:`ABSORBED_RTOL` of its
    squared length.  (From the normal equations the rounding was ~1e-8 at an ill-
    conditioned X and changed with the batch: a voxel's status changed with the rank
    count.)  Voxels are taken in groups of equal ``n_obs`` (no padding), so a voxel's
    answer depends on its own rows only; complete voxels share one answer.  ``observed``
    (v, n); ``levels``: its :func:`levels_observed`."""
    v = observed.shape[0]
    effects = sum(f.n_effects for f in rd.structure.factors)
    out = np.zeros((v, effects), dtype=bool)
    if v == 0:
        return out
    complete = observed.all(axis=1)
    if complete.any() and v > 1:
        one = np.flatnonzero(complete)[:1]
        out[complete] = absorbed_effects(X, rd, observed[one], _rows(levels, one))[0]
        rest = np.flatnonzero(~complete)
        if rest.size:
            out[rest] = absorbed_effects(X, rd, observed[rest], _rows(levels, rest))
        return out
    p = X.shape[1]
    if levels is None:
        levels = levels_observed(rd, observed)
    n_obs = observed.sum(axis=1)
    xs = np.sqrt((X * X).sum(axis=0))
    Xs = X / np.where(xs > 0, xs, 1.0)
    start = 0
    for f, level, seen in zip(rd.structure.factors, factor_levels(rd), levels):
        candidate = (seen >= 1) & (seen <= p) & (n_obs > 0)
        if not candidate.any():
            start += f.n_effects
            continue
        vals = rd.vals[:, start:start + f.n_effects].astype(np.float64)
        # unit-length columns per level and effect: |z| over all rows of the level
        norms = np.zeros((f.n_levels, f.n_effects))
        np.add.at(norms, level, vals * vals)
        vals = vals / np.where(norms > 0, np.sqrt(norms), 1.0)[level]
        maybe = np.zeros((v, f.n_effects), dtype=bool)
        maybe[candidate] = _absorbed_screen(Xs, level, vals, observed[candidate], f.n_levels)
        candidate &= maybe.any(axis=1)
        for m in np.unique(n_obs[candidate]):
            group = np.flatnonzero(candidate & (n_obs == m))
            step = max(1, _ABSORBED_BATCH_ENTRIES // int(m * max(p, 2 * f.n_effects)))
            for b in range(0, group.size, step):
                which = group[b:b + step]
                rows = np.nonzero(observed[which])[1].reshape(which.size, m)  # (k, m) sorted
                U, sv = np.linalg.svd(Xs[rows], full_matrices=False)[:2]      # (k, m, p)
                Q = U * (sv > 1e-8 * sv[:, :1])[:, None, :]     # X's numerical column space
                slot = _level_slots(level[rows])                               # (k, m) < p
                for e in range(f.n_effects):
                    Z = np.zeros((which.size, m, p))
                    np.put_along_axis(Z, slot[:, :, None], vals[rows, e][:, :, None], axis=2)
                    R = Z - np.matmul(Q, np.matmul(np.swapaxes(Q, 1, 2), Z))
                    zz = (Z * Z).sum(axis=1)                                     # (k, p)
                    rr = (R * R).sum(axis=1)
                    carried = zz > 0
                    inside = ~carried | (rr <= ABSORBED_RTOL * zz)
                    out[which, start + e] = (carried.any(axis=1) & inside.all(axis=1)
                                             & maybe[which, e])
        start += f.n_effects
    return out


#: The screen's threshold (:func:`_absorbed_screen`): far above its rounding at any X that
#: passes ``full_rank`` (about 1e-16 times cond(X'X) <= 1e10), far below a regular voxel's.
_SCREEN_RTOL = 1e-4


def _absorbed_screen(Xs: np.ndarray, level: np.ndarray, vals: np.ndarray,
                     observed: np.ndarray, n_levels: int) -> np.ndarray:
    """(c, effects) bool: which of one factor's effects may be absorbed at each voxel, from
    the normal equations (``|z|^2 - z'X (X'X)^+ X'z`` per level against :data:`_SCREEN_RTOL`
    of ``|z|^2``): cheap, and only the voxels it passes get the exact test.  Sums in
    per-voxel order (sparse products and einsum's own loops, not BLAS), so a voxel's
    answer does not depend on the voxels beside it."""
    c, n = observed.shape
    p = Xs.shape[1]
    q = vals.shape[1]
    out = np.zeros((c, q), dtype=bool)
    xx_rows = (Xs[:, :, None] * Xs[:, None, :]).reshape(n, p * p)
    rows = np.arange(n)
    step = max(1, _ABSORBED_BATCH_ENTRIES // max(n, n_levels * p))
    for b in range(0, c, step):
        W = observed[b:b + step].astype(np.float64)                      # (k, n)
        pinv = np.linalg.pinv(np.einsum("kn,nj->kj", W, xx_rows).reshape(-1, p, p),
                              hermitian=True)
        for e in range(q):
            z = vals[:, e]
            zz = np.asarray((sp.csr_matrix((z * z, (rows, level)), shape=(n, n_levels)).T
                             @ W.T).T)                                  # (k, L)
            xz = np.asarray((sp.csr_matrix(((z[:, None] * Xs).ravel(),
                                            (np.repeat(rows, p),
                                             (level[:, None] * p + np.arange(p)).ravel())),
                                           shape=(n, n_levels * p)).T @ W.T).T)
            xz = xz.reshape(-1, n_levels, p)
            proj = np.einsum("klp,kpj,klj->kl", xz, pinv, xz)
            carried = zz > 0
            inside = ~carried | (zz - proj <= _SCREEN_RTOL * zz)
            out[b:b + step, e] = carried.any(axis=1) & inside.all(axis=1)
    return out


def _level_slots(lv: np.ndarray) -> np.ndarray:
    """Per row of ``lv`` (k, m) level codes, each code's rank among the row's distinct codes
    (0, 1, ...): a voxel's observed levels as compact column slots."""
    order = np.argsort(lv, axis=1, kind="stable")
    srt = np.take_along_axis(lv, order, axis=1)
    new = np.ones(srt.shape, dtype=np.int64)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slots = np.empty_like(new)
    np.put_along_axis(slots, order, np.cumsum(new, axis=1) - 1, axis=1)
    return slots


def _fit_dropping_columns(model: Model, Y: np.ndarray, settings: Settings,
                          out: dict[str, np.ndarray], short: np.ndarray) -> None:
    """Fit the voxels whose observed rows leave X rank deficient (status 4 so far) as lme4
    fits such data: without the columns it drops (:mod:`.dropped_columns`).  So also the
    voxels ``short`` with no more observations than columns (status 3 so far) whose observed
    rows have a lower rank: lme4 fits them if the observations outnumber the kept columns.
    Voxels that keep the same columns are analysed together on those columns; their beta and
    cov_beta stay NaN in the dropped columns, a contrast gets statistics only at the voxels
    where it is estimable, and a formula term's F is lmerTest's ``anova`` of lme4's fit there
    (:func:`_fit_kept_columns`; a contained term's type III rows are made again for each set
    of observed rows, :func:`~.type3.observed_type3`: a loop over those sets).  A voxel that
    lme4's test keeps whole (rank deficient only by :func:`~.products.full_rank`'s stricter
    measure) stays status 4."""
    deficient = np.union1d(np.flatnonzero(out["status"] == STATUS_RANK_DEFICIENT), short)
    if not deficient.size:
        return
    observed = np.isfinite(Y[deficient]).astype(np.float64)
    keep = kept_columns(model.X, observed)
    more = observed.sum(axis=1) > keep.sum(axis=1)   # others stay short of observations
    deficient, observed, keep = deficient[more], observed[more], keep[more]
    XtX = np.einsum("kn,np,nq->kpq", observed, model.X, model.X)
    patterns, which = np.unique(keep, axis=0, return_inverse=True)
    for pattern, cols in enumerate(patterns):
        if cols.all():
            continue
        members = np.flatnonzero(which.ravel() == pattern)
        # a type III term's rows, made again on each voxel's observed rows: once per set of
        # rows (voxels outside one site's field of view share theirs)
        remade = {}
        terms = [c for c in model.contrasts if _remade_type3(model, c)]
        if terms:
            rows_seen, which_rows = np.unique(observed[members] > 0, axis=0, return_inverse=True)
            for c in terms:
                made = [observed_type3(rows, model.X, model.type3, cols, c.term)
                        for rows in rows_seen]
                remade[c.name] = [made[i] for i in which_rows.ravel()]
        shapes = [tuple(0 if rows[k] is None else rows[k].shape[0] for rows in remade.values())
                  for k in range(members.size)]
        for shape in sorted(set(shapes)):   # voxels whose remade rows match in number
            part = np.flatnonzero([s == shape for s in shapes])
            _fit_kept_columns(model, Y[deficient[members[part]]], settings, out,
                              deficient[members[part]], cols, XtX[members[part]],
                              {name: [rows[k] for k in part] for name, rows in remade.items()})


def _remade_type3(model: Model, c: ContrastDef) -> bool:
    """Is ``c`` a term's F whose ``anova`` rows are made again where columns drop (a term
    contained in another, or any term of a model not coded by treatment contrasts)?"""
    return bool(c.term) and not c.sequential and model.type3 is not None \
        and (model.type3.treatment_X is not None or model.type3.contained(c.term))


def _fit_kept_columns(model: Model, Y: np.ndarray, settings: Settings,
                      out: dict[str, np.ndarray], index: np.ndarray, cols: np.ndarray,
                      XtX: np.ndarray, remade: dict[str, list]) -> None:
    """Analyse the voxels ``index`` (their data ``Y``, their X'X) on the kept columns ``cols``
    and fill ``out`` there.  A formula term's F (:attr:`ContrastDef.term`) is lmerTest's
    ``anova`` of lme4's fit: the term's kept columns, or its type III rows ``remade`` for
    each voxel (the same number at every voxel here; ``None`` where there are none); another
    contrast is tested only where estimable (:func:`_reduced_contrast`)."""
    contrasts, ok = [], {}
    everywhere = np.ones(index.size, dtype=bool)
    for c in model.contrasts:
        if c.name in remade:
            rows = remade[c.name]
            if rows[0] is not None:
                contrasts.append(ContrastDef(c.name, np.stack(rows), c.kind, c.alternative))
                ok[c.name] = everywhere
            continue
        reduced = _reduced_contrast(c, cols)
        if reduced is not None:
            contrasts.append(reduced[0])
            ok[c.name] = everywhere if reduced[1] is None else estimable(reduced[1], XtX, cols)
    sub = analyse_chunk(Model(model.X[:, cols], model.rd, tuple(contrasts)), Y, settings)
    kc = np.flatnonzero(cols)
    for path, values in sub.items():
        if path == "beta":
            out[path][np.ix_(index, kc)] = values
        elif path == "cov_beta":
            out[path][index[:, None, None], kc[:, None], kc] = values
        elif path.startswith("contrasts/"):
            out[path][index] = np.where(ok[path.split("/")[1]], values, np.nan)
        else:
            out[path][index] = values


def _reduced_contrast(c: ContrastDef, cols: np.ndarray
                      ) -> tuple[ContrastDef, np.ndarray | None] | None:
    """Contrast ``c`` on the kept columns ``cols`` (p,) bool, and the rows of ``c.L`` a voxel
    must be able to estimate for it to get statistics (``None``: every voxel that keeps
    ``cols`` gets them); ``None`` where no voxel that keeps ``cols`` can estimate it.

    - A type I contrast tests the term's kept columns (lmerTest's ``anova`` of lme4's
      reduced fit).
    - An F contrast whose rows are coefficients (``beta_j = 0`` for some ``j``) tests those
      of its coefficients that are kept, where they are estimable; a formula term's F
      (:attr:`ContrastDef.term`, the term contained in no other) at every voxel, as
      lmerTest's ``anova`` tests the term in lme4's reduced fit (``group:time`` at a voxel
      without group C: ``groupB:time`` alone, 1 numerator df).
    - Another contrast keeps its weights on the kept columns, and is estimable only where its
      rows stay independent there (``L = L_K [I A]`` for estimable ``L``).
    """
    if c.L.ndim == 3:   # rows made for other columns (a voxel nearly rank deficient again)
        return None
    if c.sequential:
        position = np.cumsum(cols) - 1
        seq = tuple(int(position[j]) for j in c.sequential if cols[j])
        if not seq:
            return None
        return ContrastDef(c.name, np.eye(int(cols.sum()))[list(seq)], c.kind,
                           c.alternative, seq), None
    L = c.L
    coefficients = _coefficient_rows(L) if c.kind == "F" else None
    if coefficients is not None:
        L = L[cols[coefficients]]
        if not L.shape[0]:
            return None
        if c.term:
            return ContrastDef(c.name, L[:, cols], c.kind, c.alternative), None
    if np.linalg.matrix_rank(L[:, cols]) < L.shape[0]:   # f_weights' rank rule (numpy's)
        return None
    return ContrastDef(c.name, L[:, cols], c.kind, c.alternative), L


def _coefficient_rows(L: np.ndarray) -> np.ndarray | None:
    """The coefficient each row of ``L`` picks, when every row is a distinct unit vector
    (the hypothesis that those coefficients are zero); else ``None``."""
    picked = np.argmax(L != 0, axis=1)
    unit = np.zeros_like(L)
    unit[np.arange(L.shape[0]), picked] = 1.0
    if not np.array_equal(L, unit) or np.unique(picked).size < picked.size:
        return None
    return picked


def _residual_vanished(pf: ProductForms, s2: np.ndarray) -> np.ndarray:
    """Voxels (v,) whose fitted residual variance vanishes against the fixed effects' own:
    ``s2 < SATURATED_SIGMA2 * RSS / (n - p)``, RSS the OLS residual sum of squares (``Y'Y``
    of the centred product forms).  The data, not the design, are then fitted exactly by
    the fixed and random effects (a voxel constant within every subject, ``y = X b + Z u``):
    the likelihood grows without bound as sigma2 -> 0 and every standard error with it
    collapses (a degenerate-voxel audit: status 0 with sigma2 1e-14, an F p of 3.5e-62
    where lmerTest gives 0.008, negative variances in cov_beta).  A regular voxel's sigma2
    is of the order of that RSS / (n - p) or more than a hundredth of it."""
    if pf.y_offset is None:
        return np.zeros(pf.n_voxels, dtype=bool)
    dof = np.maximum(pf.n - pf.p, 1)
    with np.errstate(invalid="ignore"):
        return np.isfinite(s2) & (s2 < SATURATED_SIGMA2 * pf.YtY / dof)


def _unfit_vanishing_residual(Y: np.ndarray, index: np.ndarray,
                              out: dict[str, np.ndarray]) -> None:
    """The post-fit saturation test (:data:`SATURATED_SIGMA2`) at the voxels ``index`` too
    large for the exact one: a fitted voxel whose residual variance vanishes gets status 9
    and no numbers."""
    if index.size == 0:
        return
    s2 = out["sigma2"][index]
    var = np.nanvar(Y[index].astype(np.float64), axis=1)
    bad = index[np.isfinite(s2) & (s2 < SATURATED_SIGMA2 * var)]
    if bad.size == 0:
        return
    for key, a in out.items():
        if a.dtype.kind == "f":
            a[bad] = np.nan
    out["iterations"][bad] = 0
    out["status"][bad] = STATUS_UNIDENTIFIABLE


def fit_groups(parts: list[tuple[ProductForms, np.ndarray]]) -> list:
    """The (product forms, voxel index) groups a chunk is fitted as: its two product-form
    groups joined into one when the chunk is small (:data:`JOINT_GROUPS_UP_TO`), the shared
    forms are small (:data:`JOINT_LEVEL_VALUES_UP_TO`) and the algebra gives a voxel the same
    bits whether its product forms are shared or its own."""
    if len(parts) == 2 and parts[0][0].algebra.joint_groups \
            and sum(index.size for _, index in parts) <= JOINT_GROUPS_UP_TO \
            and _level_values(parts[0][0]) <= JOINT_LEVEL_VALUES_UP_TO:
        return [(joint_forms([pf for pf, _ in parts]), np.concatenate([i for _, i in parts]))]
    return parts


#: Chunks of at most this many voxels fit their complete-data and missing-data voxels
#: together when the structure's algebra allows it (``joint_groups``): the fixed cost of a
#: fit (its calls run as long as the slowest voxel) is then paid once, not twice.  Larger
#: chunks keep the complete voxels' shared product forms (less memory traffic).
JOINT_GROUPS_UP_TO = 2048

#: ... and only while a voxel's Z'Z and Z'X hold at most this many values: joined, every
#: complete voxel reads its own copy of them in every evaluation, where shared ones stay in
#: cache.  Measured (scripts/bench_chunks.py, chunks of 300, q1 = 2, p = 3): at 60 levels
#: (600 values) joining halves a chunk's fit time; at 250 (2,500) it is even; at 1,000
#: (10,000) it costs 1.2-1.25x.
JOINT_LEVEL_VALUES_UP_TO = 2048


def _level_values(pf: ProductForms) -> int:
    """Values of Z'Z and Z'X per voxel of ``pf``."""
    return int(np.prod(pf.ZtZ.shape[1:])) + int(np.prod(pf.ZtX.shape[1:]))


def joint_forms(parts: list[ProductForms]) -> ProductForms:
    """The product forms of several groups as one group with per-voxel arrays (shared ones
    repeated for every voxel of their group)."""
    def per_voxel(a: np.ndarray, pf: ProductForms) -> np.ndarray:
        return np.broadcast_to(a, (pf.n_voxels,) + a.shape[1:]) if pf.shared else a

    def joined(name: str) -> np.ndarray | None:
        if any(getattr(pf, name) is None for pf in parts):
            return None
        return np.concatenate([per_voxel(getattr(pf, name), pf) for pf in parts])

    first = parts[0]
    return ProductForms(
        XtX=joined("XtX"), XtY=joined("XtY"), YtY=joined("YtY"), ZtX=joined("ZtX"),
        ZtY=joined("ZtY"), ZtZ=joined("ZtZ"), n=joined("n"), structure=first.structure,
        y_offset=joined("y_offset"), shared=False, algebra=first.algebra,
        rtol_constant=joined("rtol_constant"))


def _rows(levels: list[np.ndarray] | None, index: np.ndarray) -> list[np.ndarray] | None:
    """The :func:`levels_observed` counts of the voxels ``index``."""
    return None if levels is None else [counts[index] for counts in levels]


def identifiable(rd: RandomDesign, observed: np.ndarray,
                 levels: list[np.ndarray] | None = None) -> np.ndarray:
    """Voxels (v,) whose observed rows identify the random effects, by lme4's rules on the
    voxel's own data: ``l_obs,k >= 2`` (``check.nlev.gtr.1``: "grouping factors must have > 1
    sampled level") and ``n_obs > l_obs,k q_k`` (``check.nobs.vs.nRE``, which implies
    ``check.nobs.vs.nlev``) for every factor ``k``, ``l_obs,k`` its levels with at least one
    observed row.  ``observed`` is (v, n); ``levels``: its :func:`levels_observed`, when
    already counted."""
    n_obs = observed.sum(axis=1)
    ok = np.ones(observed.shape[0], dtype=bool)
    if levels is None:
        levels = levels_observed(rd, observed)
    for levels_seen, f in zip(levels, rd.structure.factors):
        ok &= (levels_seen >= 2) & (n_obs > levels_seen * f.n_effects)
    return ok


def product_form_groups(observed: np.ndarray, fit: np.ndarray):
    """Split the voxels to fit into the complete ones (which share their product forms) and
    the rest (product forms of their own); yields the voxel indices of each non-empty group."""
    complete = fit & observed.all(axis=1)
    for group in (np.flatnonzero(complete), np.flatnonzero(fit & ~complete)):
        if group.size:
            yield group


def _group_forms(model: Model, Yg: np.ndarray, obs: np.ndarray, index: np.ndarray,
                 out: dict[str, np.ndarray], ident: np.ndarray):
    """The product forms of one group (all complete, or all per-voxel) and the voxels of it
    to fit (``None`` when there are none); the others get their status in ``out``.
    ``ident``: the group's voxels whose random effects the observed rows identify
    (:func:`identifiable`, and not :func:`saturated`)."""
    pf = product_forms(model.X, model.rd, Yg, obs)
    ranked = np.broadcast_to(full_rank(pf.XtX), (index.size,))
    out["status"][index[ranked & ~ident]] = STATUS_UNIDENTIFIABLE
    out["status"][index[~ranked]] = STATUS_RANK_DEFICIENT
    ok = ranked & ident
    if not ok.any():
        return None
    if not ok.all():
        keep = np.flatnonzero(ok)
        pf, index = pf.take(keep), index[keep]
    return pf, index


def _fit_forms(model: Model, pf: ProductForms, settings: Settings, index: np.ndarray,
               out: dict[str, np.ndarray], transform: EffectTransform | None = None) -> None:
    """Fit the voxels of ``pf`` and fill ``out`` at ``index``.  ``transform``: the design's
    random-effect covariates were scaled or centred (:mod:`.effect_scale`); Satterthwaite
    works in the fit's units, the covariances and the status are reported in the user's."""
    kwargs = {k: getattr(settings, k) for k in ("tolerance", "max_iterations", "memory_budget")
              if getattr(settings, k) is not None}
    fitted_res = fit(pf, method=settings.method, **kwargs)
    res = fitted_res if transform is None else restore(fitted_res, transform, pf.structure)
    out["status"][index] = res.status
    out["iterations"][index] = res.iterations
    fitted = res.fitted
    vanished = fitted & _residual_vanished(pf, res.s2)
    if vanished.any():                     # fitted exactly by the data: status 9, no numbers
        out["status"][index[vanished]] = STATUS_UNIDENTIFIABLE
        out["iterations"][index[vanished]] = 0
        fitted = fitted & ~vanished
    where = index[fitted]
    out["beta"][where] = res.beta[fitted]
    out["sigma2"][where] = res.s2[fitted]
    out["llh"][where] = res.llh[fitted]
    for f, cov in zip(model.structure.factors, res.cov):
        out[f"random/{f.name}/cov"][where] = cov[fitted]
    pre = satterthwaite_setup(pf, res.s2, fitted_res.D, settings.method, fitted=fitted)
    out["cov_beta"][where] = pre.cov_beta[fitted]
    for c in model.contrasts:
        prefix = f"contrasts/{c.name}/"
        if c.kind == "T":
            r = t_contrast(pre, res.beta, c.L[0], alternative=c.alternative, name=c.name)
            for stat in T_STATS:
                out[prefix + stat][where] = getattr(r, stat)[fitted]
        else:
            L = c.L[index] if c.L.ndim == 3 else c.L   # each voxel's own rows, or shared
            if c.sequential:  # rows of each voxel's own X'X (observed rows), (v, r, p);
                L = sequential_rows(pf.XtX, c.sequential)   # shared X'X: formed once
                L = np.broadcast_to(L, (pf.n_voxels,) + L.shape[1:])
            r = f_contrast(pre, res.beta, L, name=c.name)
            for stat in F_STATS:
                out[prefix + stat][where] = np.broadcast_to(getattr(r, stat), fitted.shape)[fitted]
