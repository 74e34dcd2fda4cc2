"""Random-effect covariates in the units users keep them in: scaled by powers of two to fit.

A random slope on time in days (values ~700) next to a random intercept puts the entries of
``D_k`` ~1e6 apart, and the estimator's relative thresholds (the eigenvalue clip of Fisher
Scoring, its hand-over to the polish at a relative eigenvalue of 1e-6, the null space of the
polish's escape) are then decided by the units, not the data: a voxel whose slope variance
is small per day but far from zero was handed to the polish as if on the boundary and never
left it (status 1, logLik 3.4 below lme4's).

So each column of ``Z_k`` whose root mean square over the observations lies outside
``[2^-4, 2^4]`` is divided by the power of two nearest that size, exactly (a power of two
loses no digit); the fit runs in those units and its results are brought back
(:func:`unscale`).  With ``Z~ = Z S^-1`` the random effects are ``b~ = S b`` and
``D~_k = S D_k S``, ``Lambda~_k = S Lambda_k`` (still lower triangular, diagonal of the same
sign): a linear change of the covariance parameters, so the log-likelihood, ``beta``,
``s2`` and the Satterthwaite df (computed in the same units as the fit) do not change, and
lme4's singular test is applied to lme4's theta.  Designs whose covariates are all within the
range (intercepts, time in years, centred age in decades) are not touched: same bits.

Far from zero is the same trouble in another shape: calendar year (2015-2020) as a random
slope next to the intercept makes the two columns of ``Z_k`` nearly collinear (the random
effects correlate at about -0.9999) and the evaluations lose digits with the square of the
offset: voxels stopped on a false boundary (status 2, df 116 where lmerTest's are 33, p 400
times too small) and logLik came out above the optimum.  So, within a factor that has an
intercept column, a covariate whose mean over the observations is more than
:data:`CENTRE_RATIO` standard deviations from zero is centred first: ``z_j - c_j`` with
``c_j`` the mean rounded to a multiple of the power of two below the standard deviation
(``2017`` for years, so the centred values are exact).  With ``Z~ = Z T`` (``T`` the identity
but ``T[i0, j] = -c_j``, ``i0`` the intercept column) ``D_k = T D~_k T'``; lme4's theta is then
the Cholesky factor of that ``D_k``.  The model is the same (an exact reparametrisation of
the random effects): the fit only runs where its numbers are well conditioned.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .model import STATUS_CONVERGED, STATUS_SINGULAR, FitResult, RandomStructure
from .products import RandomDesign

#: log2 of the largest (and of 1 / the smallest) root mean square left unscaled.
LOG2_RANGE = 4


def effect_scales(rd: RandomDesign) -> np.ndarray | None:
    """The power of two each column of Z's row values is divided by (r,), or ``None`` when
    every column is within range (nothing to scale)."""
    rms = np.sqrt(np.mean(rd.vals * rd.vals, axis=0))
    with np.errstate(divide="ignore"):
        exponent = np.where(rms > 0, np.round(np.log2(np.where(rms > 0, rms, 1.0))), 0.0)
    exponent = np.where(np.abs(exponent) > LOG2_RANGE, exponent, 0.0)
    if not exponent.any():
        return None
    return np.exp2(exponent)


def scaled_design(rd: RandomDesign, scales: np.ndarray) -> RandomDesign:
    """``rd`` with each column of its row values divided by its scale (exact)."""
    return dataclasses.replace(rd, vals=rd.vals / scales)


def per_factor(scales: np.ndarray, structure: RandomStructure) -> list[np.ndarray]:
    """The scales of each factor's effects (q_k,)."""
    out, start = [], 0
    for f in structure.factors:
        out.append(scales[start:start + f.n_effects])
        start += f.n_effects
    return out


#: A random-effect covariate of a factor with an intercept is centred when its mean is more
#: than this many standard deviations from zero (age 70 +- 5 is 14; time 0-3 is about 1.3).
CENTRE_RATIO = 4.0


@dataclasses.dataclass(frozen=True)
class EffectTransform:
    """How the fit's random-effect covariates are made from the user's (module doc): column
    ``j`` of ``Z`` (all factors' effects side by side, (r,)) less ``centres[j]`` times the
    column ``intercepts[j]`` (-1: not centred), then divided by ``scales[j]``."""

    centres: np.ndarray
    intercepts: np.ndarray
    scales: np.ndarray

    @property
    def centred(self) -> bool:
        return bool((self.intercepts >= 0).any())


def effect_centres(rd: RandomDesign) -> tuple[np.ndarray, np.ndarray] | None:
    """``(centres, intercepts)`` (r,) of the covariates to centre (module doc), or ``None``."""
    vals = rd.vals
    centres, intercepts = np.zeros(vals.shape[1]), np.full(vals.shape[1], -1)
    start = 0
    for f in rd.structure.factors:
        cols = range(start, start + f.n_effects)
        ones = [j for j in cols if np.all(vals[:, j] == 1.0)]
        for j in cols if ones else ():
            if j == ones[0]:
                continue
            mean, sd = float(np.mean(vals[:, j])), float(np.std(vals[:, j]))
            if sd > 0 and abs(mean) > CENTRE_RATIO * sd:
                step = 2.0 ** np.floor(np.log2(sd))
                centres[j], intercepts[j] = np.round(mean / step) * step, ones[0]
        start += f.n_effects
    return (centres, intercepts) if (intercepts >= 0).any() else None


def effect_transform(rd: RandomDesign) -> EffectTransform | None:
    """The transform the fit's covariates need, or ``None`` when they are fine as they are
    (nothing is touched: same bits)."""
    found = effect_centres(rd)
    if found is not None:
        rd = centred_design(rd, *found)
    scales = effect_scales(rd)
    if found is None and scales is None:
        return None
    r = rd.vals.shape[1]
    centres, intercepts = found if found is not None else (np.zeros(r), np.full(r, -1))
    return EffectTransform(centres, intercepts, np.ones(r) if scales is None else scales)


def centred_design(rd: RandomDesign, centres: np.ndarray, intercepts: np.ndarray
                   ) -> RandomDesign:
    """``rd`` with column ``j`` less ``centres[j]`` times column ``intercepts[j]`` (a column of
    ones: exact where the centred values are, e.g. whole years)."""
    vals = rd.vals.copy()
    for j in np.flatnonzero(intercepts >= 0):
        vals[:, j] = vals[:, j] - centres[j] * rd.vals[:, intercepts[j]]
    return dataclasses.replace(rd, vals=vals)


def transformed_design(rd: RandomDesign, tr: EffectTransform) -> RandomDesign:
    """The design the fit runs on: centred, then scaled."""
    if tr.centred:
        rd = centred_design(rd, tr.centres, tr.intercepts)
    return scaled_design(rd, tr.scales)


def restore(res: FitResult, tr: EffectTransform, structure: RandomStructure) -> FitResult:
    """A fit made on :func:`transformed_design` in the units of ``Z``: ``D_k = M D~_k M'`` with
    ``M = T S^-1``; lme4's theta ``Lambda_k = S^-1 Lambda~_k`` (its entry ``[r, c]`` divided by
    ``s_r``; exact) where nothing was centred, else the Cholesky factor of ``D_k``; and the
    status of every converged voxel decided again by lme4's singular test on that theta."""
    from .theta import cholesky_psd, is_singular, theta_slices, tril_indices

    D, theta = [], res.extras["theta"].copy()
    start = 0
    for Dk, s, sl, f in zip(res.D, per_factor(tr.scales, structure), theta_slices(structure),
                            structure.factors):
        rows, cols = tril_indices(f.n_effects)
        own = tr.intercepts[start:start + f.n_effects]
        if (own >= 0).any():
            M = np.diag(1.0 / s)
            for j in np.flatnonzero(own >= 0):     # T[i0, j] = -c_j, then S^-1
                M[own[j] - start, j] = -tr.centres[start + j] / s[j]
            Dk = np.einsum("ab,vbc,dc->vad", M, Dk, M)
            theta[:, sl] = cholesky_psd(np.nan_to_num(Dk))[:, rows, cols]
            theta[:, sl] = np.where(np.isfinite(res.extras["theta"][:, sl]), theta[:, sl],
                                    np.nan)
            D.append(Dk)
        else:
            D.append(Dk / (s[:, None] * s[None, :]))
            theta[:, sl] = theta[:, sl] / s[rows]
        start += f.n_effects
    done = (res.status == STATUS_CONVERGED) | (res.status == STATUS_SINGULAR)
    singular = done & is_singular(np.nan_to_num(theta, nan=1.0), structure)
    status = np.where(done, np.where(singular, STATUS_SINGULAR, STATUS_CONVERGED), res.status)
    extras = dict(res.extras, theta=theta, singular=singular)
    return dataclasses.replace(res, D=tuple(D), status=status, extras=extras)
