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


def unscale(res: FitResult, scales: np.ndarray, structure: RandomStructure) -> FitResult:
    """A fit made with ``Z S^-1`` in the units of ``Z``: ``D_k = S^-1 D~_k S^-1``, lme4's theta
    ``Lambda_k = S^-1 Lambda~_k`` (its entry ``[r, c]`` divided by ``s_r``), and the status of
    every converged voxel decided again by lme4's singular test on that theta."""
    from .estimate import is_singular
    from .theta import theta_slices, tril_indices

    D, theta = [], res.extras["theta"].copy()
    for Dk, s, sl, f in zip(res.D, per_factor(scales, structure), theta_slices(structure),
                            structure.factors):
        D.append(Dk / (s[:, None] * s[None, :]))
        rows, _ = tril_indices(f.n_effects)
        theta[:, sl] = theta[:, sl] / s[rows]
    done = (res.status == STATUS_CONVERGED) | (res.status == STATUS_SINGULAR)
    singular = done & is_singular(np.nan_to_num(theta, nan=1.0), structure)
    status = np.where(done, np.where(singular, STATUS_SINGULAR, STATUS_CONVERGED), res.status)
    extras = dict(res.extras, theta=theta, singular=singular)
    return dataclasses.replace(res, D=tuple(D), status=status, extras=extras)
