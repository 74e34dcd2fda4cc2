"""T and F contrast statistics with Satterthwaite df and accurate p-values, per voxel.

Each test follows validate -> parameters -> statistic -> p-value -> result:

- T (one row ``l``): ``estimate = l beta``, ``se = sqrt(l Cov l')``, ``t = estimate / se``,
  ``df`` Satterthwaite (:mod:`.satterthwaite`), ``p`` for the chosen alternative.
- F (``r x p`` matrix ``L`` of rank ``r``), as lmerTest's ``contestMD``: eigendecompose
  ``L Cov L' = P diag(d) P'``; the rows of ``P'L`` are independent directions with
  ``t_i^2 = (P'L beta)_i^2 / d_i``; ``F = sum_i t_i^2 / r`` (equal to
  ``(L beta)'(L Cov L')^-1 (L beta) / r``); each direction has its Satterthwaite ``nu_i``;
  the denominator df combines them (:func:`.satterthwaite.combine_f_df`).
  Partial ``R^2 = r F / (r F + df)``.

p-values come from survival functions and their logarithms, never ``1 - cdf``; where
``log sf`` underflows (p below ~1e-308) it is evaluated from the incomplete beta function's
hypergeometric series, so ``-log10 p`` stays finite and accurate.  Voxels without a fit give
NaN in every field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special  # not scipy.stats: its import alone costs ~1 s per rank

from .contrasts import f_weights, t_weights
from .rowwise import rows_at
from .satterthwaite import Precomputed, combine_f_df, contrast_variance_df

ALTERNATIVES = ("two-sided", "greater", "less")
LN10 = float(np.log(10.0))


@dataclass(frozen=True)
class TResult:
    """Per-voxel T contrast (v,) arrays; NaN where not fitted."""

    estimate: np.ndarray
    se: np.ndarray
    t: np.ndarray
    df: np.ndarray
    p: np.ndarray
    neglog10p: np.ndarray
    alternative: str


@dataclass(frozen=True)
class FResult:
    """Per-voxel F contrast (v,) arrays; NaN where not fitted.  ``df_num`` is the rank r."""

    F: np.ndarray
    df_num: int
    df_den: np.ndarray
    p: np.ndarray
    neglog10p: np.ndarray
    r2: np.ndarray


# ---------------------------------------------------------------- log tail probabilities
def _log_betainc_small(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``log I_x(a, b)`` for small ``x`` without underflow (DLMF 8.17.8):
    ``I_x(a,b) = x^a (1-x)^b / (a B(a,b)) 2F1(a+b, 1; a+1; x)``."""
    return (a * np.log(x) + b * np.log1p(-x) - np.log(a) - special.betaln(a, b)
            + np.log(special.hyp2f1(a + b, 1.0, a + 1.0, x)))


def t_logsf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """``log P(T > t)`` for Student's t, finite far into the tail; ``df = inf`` is normal."""
    t, df = np.broadcast_arrays(np.asarray(t, float), np.asarray(df, float))
    with np.errstate(all="ignore"):
        out = np.where(np.isinf(df), special.log_ndtr(-t), np.log(special.stdtr(df, -t)))
        bad = ~np.isfinite(out) & np.isfinite(t) & (t > 0) & np.isfinite(df) & (df > 0)
        if bad.any():
            # P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0.
            x = df[bad] / (df[bad] + t[bad] ** 2)
            out[bad] = np.log(0.5) + _log_betainc_small(x, 0.5 * df[bad], 0.5)
    return out


def f_logsf(F: np.ndarray, d1: float, d2: np.ndarray) -> np.ndarray:
    """``log P(F(d1, d2) > F)``, finite far into the tail; ``d2 = inf`` is chi2(d1)/d1."""
    F, d2 = np.broadcast_arrays(np.asarray(F, float), np.asarray(d2, float))
    with np.errstate(all="ignore"):
        out = np.where(np.isinf(d2), np.log(special.chdtrc(d1, d1 * F)),
                       np.log(special.fdtrc(d1, d2, F)))
        bad = ~np.isfinite(out) & np.isfinite(F) & (F > 0) & np.isfinite(d2) & (d2 > 0)
        if bad.any():
            # P(F > f) = I_{d2/(d2 + d1 f)}(d2/2, d1/2).
            x = d2[bad] / (d2[bad] + d1 * F[bad])
            out[bad] = _log_betainc_small(x, 0.5 * d2[bad], 0.5 * d1)
    return out


def _p_and_neglog10(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logp = np.minimum(logp, 0.0)
    return np.exp(logp), -logp / LN10


# ---------------------------------------------------------------- contrasts
def t_contrast(pre: Precomputed, beta: np.ndarray, weights, alternative: str = "two-sided",
               name: str = "T") -> TResult:
    """T test of ``l beta = 0`` at every voxel.

    Parameters
    ----------
    pre
        From :func:`.satterthwaite.satterthwaite_setup` at the same voxels.
    beta
        (v, p) fixed-effect estimates (``y_offset`` included).
    weights
        The ``p`` contrast weights ``l``.
    alternative
        "two-sided" (default), "greater" (``l beta > 0``) or "less".
    name
        The contrast's name, for error messages.
    """
    # validate
    beta = np.asarray(beta, dtype=np.float64)
    l = t_weights(weights, beta.shape[1], name)
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    # parameters
    var, df = contrast_variance_df(pre, l)
    # statistic
    estimate = np.where(pre.fitted, rows_at(beta, l[:, None])[:, 0], np.nan)
    se = np.sqrt(var)
    t = estimate / se
    # p-value: two-sided 2 P(T > |t|); greater P(T > t); less P(T > -t)
    if alternative == "two-sided":
        logp = np.log(2.0) + t_logsf(np.abs(t), df)
    else:
        logp = t_logsf(t if alternative == "greater" else -t, df)
    p, nl = _p_and_neglog10(logp)
    return TResult(estimate=estimate, se=se, t=t, df=df, p=p, neglog10p=nl,
                   alternative=alternative)


def f_contrast(pre: Precomputed, beta: np.ndarray, weights, name: str = "F") -> FResult:
    """F test of ``L beta = 0`` at every voxel (lmerTest's ``contestMD``, Satterthwaite).

    Parameters
    ----------
    pre
        From :func:`.satterthwaite.satterthwaite_setup` at the same voxels.
    beta
        (v, p) fixed-effect estimates.
    weights
        (r, p) contrast matrix of full row rank (a single row is allowed: then ``F = t^2``).
    name
        The contrast's name, for error messages.
    """
    # validate
    beta = np.asarray(beta, dtype=np.float64)
    L = f_weights(weights, beta.shape[1], name)
    r = L.shape[0]
    fit = pre.fitted
    # parameters: eigen-directions of L Cov L' (identity stand-in where not fitted)
    S2 = np.einsum("ip,vpq,jq->vij", L, pre.cov_beta, L)
    S2 = np.where(fit[:, None, None], S2, np.eye(r))
    d, P = np.linalg.eigh(0.5 * (S2 + np.swapaxes(S2, 1, 2)))
    rows = np.einsum("vir,ip->vrp", P, L)                 # rows of P'L, (v, r, p)
    nu = np.stack([contrast_variance_df(pre, rows[:, i])[1] for i in range(r)], axis=1)
    df_den = combine_f_df(nu)
    # statistic: F = sum_i (P'L beta)_i^2 / d_i / r
    proj = np.einsum("vrp,vp->vr", rows, beta)
    F = np.where(fit, (proj ** 2 / d).sum(axis=1) / r, np.nan)
    # p-value
    p, nl = _p_and_neglog10(f_logsf(F, float(r), df_den))
    with np.errstate(invalid="ignore"):
        r2 = r * F / (r * F + df_den)
    r2 = np.where(np.isinf(df_den), 0.0, r2)
    r2 = np.where(fit, r2, np.nan)
    return FResult(F=F, df_num=r, df_den=df_den, p=p, neglog10p=nl, r2=r2)
