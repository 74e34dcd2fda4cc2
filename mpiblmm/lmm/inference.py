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

p-values come from survival functions and their logarithms, never ``1 - cdf``; where p is
below 1e-200 (scipy's survival functions lose digits near 1e-300 and give subnormal numbers
with few digits, or 0, below 2.2e-308) ``log p`` is evaluated in log space, from the
continued fractions of the incomplete beta function (T, F) or of the incomplete gamma
function (F with infinite denominator df), so ``-log10 p`` stays finite and accurate to
~1e-12 relative however small p is.  Voxels without a fit give NaN in every field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special  # not scipy.stats: its import alone costs ~1 s per rank

from .contrasts import f_weights, t_weights
from .rowwise import rows_at, voxel_sum
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
#: Below this p scipy's ``stdtr``, ``fdtrc`` and ``chdtrc`` are not used: under ~2.2e-308
#: they return subnormal numbers (a few significant digits: -log10 p 323.31 for 323.52) or
#: 0, and ``fdtrc`` already loses digits from ~1e-285 on (relative error 1e-5 in -log10 p
#: at 1e-299 for F(20, 40)).  From 1e-200 on ``log p`` is evaluated in log space instead.
_LOG_TINY_P = float(np.log(1e-200))


def _log_betainc_small(log_x: np.ndarray, log_1mx: np.ndarray, a: np.ndarray,
                       b: np.ndarray) -> np.ndarray:
    """``log I_x(a, b)`` without underflow, for ``x < (a + 1) / (a + b + 2)`` (the lower
    tail, where the statistic's p is small): ``I_x(a,b) = x^a (1-x)^b / (a B(a,b)) * CF``
    with the continued fraction of DLMF 8.17.22, evaluated by the modified Lentz method
    to machine precision.  ``log x`` and ``log(1 - x)`` are given (each computed from the
    statistic directly: ``1 - x`` by subtraction would lose digits where ``x`` is near 1,
    with large df).  Elsewhere NaN."""
    with np.errstate(all="ignore"):
        return _log_betainc_cf(*np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                                      for v in (log_x, log_1mx, a, b))))


def _log_betainc_cf(log_x: np.ndarray, log_1mx: np.ndarray, a: np.ndarray,
                    b: np.ndarray) -> np.ndarray:
    x = np.exp(log_x)
    ok = x < (a + 1.0) / (a + b + 2.0)
    tiny = 1e-300
    c = np.ones(x.shape)
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    active = ok.copy()
    for m in range(1, 20000):
        if not active.any():
            break
        m2 = 2.0 * m
        for aa in (m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
                   -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2))):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            delta = np.where(active, d * c, 1.0)
            h = h * delta
        active &= np.abs(delta - 1.0) > 4e-16  # (1 + eps is 2.2e-16 away)
    out = a * log_x + b * log_1mx - np.log(a) - special.betaln(a, b) + np.log(h)
    return np.where(ok, out, np.nan)


def _log_gammaincc_large(a: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``log Q(a, z)`` (regularised upper incomplete gamma) for ``z > a + 1``, without
    underflow: ``Q = z^a e^-z / Gamma(a) * CF`` with the continued fraction
    ``CF = 1/(z+1-a- 1(1-a)/(z+3-a- 2(2-a)/(z+5-a- ...)))`` (DLMF 8.9.2) by the modified
    Lentz method, to machine precision."""
    tiny = 1e-300
    b = z + 1.0 - a
    c = np.full(z.shape, 1.0 / tiny)
    d = 1.0 / b
    h = d.copy()
    for i in range(1, 500):
        an = -i * (i - a)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = b + an / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 4e-16):
            break
    return a * np.log(z) - z - special.gammaln(a) + np.log(h)


def t_logsf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """``log P(T > t)`` for Student's t, accurate far into the tail (from p = 1e-200 on in
    log space, so also where p is subnormal or 0 in double precision); ``df = inf`` is
    normal."""
    t, df = np.broadcast_arrays(np.asarray(t, float), np.asarray(df, float))
    with np.errstate(all="ignore"):
        out = np.where(np.isinf(df), special.log_ndtr(-t), np.log(special.stdtr(df, -t)))
        tail = (~(out >= _LOG_TINY_P) & np.isfinite(t) & (t > 0) & np.isfinite(df)
                & (df > 0))
        if tail.any():
            # P(T > t) = I_x(df/2, 1/2) / 2 for t > 0, x = df / (df + t^2) = 1 / (1 + u),
            # u = t^2 / df (its log from t / sqrt(df): no overflow, no cancellation).
            log_u = 2.0 * np.log(t[tail] / np.sqrt(df[tail]))
            series = np.log(0.5) + _log_betainc_small(-np.logaddexp(0.0, log_u),
                                                      -np.logaddexp(0.0, -log_u),
                                                      0.5 * df[tail], 0.5)
            out[tail] = np.where(np.isnan(series), out[tail], series)
    return out


def f_logsf(F: np.ndarray, d1: float, d2: np.ndarray) -> np.ndarray:
    """``log P(F(d1, d2) > F)``, accurate far into the tail (from p = 1e-200 on in log
    space, so also where p is subnormal or 0 in double precision); ``d2 = inf`` is
    chi2(d1)/d1."""
    F, d2 = np.broadcast_arrays(np.asarray(F, float), np.asarray(d2, float))
    with np.errstate(all="ignore"):
        out = np.where(np.isinf(d2), np.log(special.chdtrc(d1, d1 * F)),
                       np.log(special.fdtrc(d1, d2, F)))
        tail = ~(out >= _LOG_TINY_P) & np.isfinite(F) & (F > 0) & (d2 > 0)
        finite = tail & np.isfinite(d2)
        if finite.any():
            # P(F > f) = I_x(d2/2, d1/2), x = d2 / (d2 + d1 f) = 1 / (1 + u), u = d1 f / d2.
            log_u = np.log(d1) + np.log(F[finite] / d2[finite])
            series = _log_betainc_small(-np.logaddexp(0.0, log_u), -np.logaddexp(0.0, -log_u),
                                        0.5 * d2[finite], 0.5 * d1)
            out[finite] = np.where(np.isnan(series), out[finite], series)
        half_all = 0.5 * d1 * F
        chi2 = tail & np.isinf(d2) & np.isfinite(half_all) & (half_all > 0.5 * d1 + 1.0)
        if chi2.any():
            # P(chi2(d1) > d1 f) = Q(d1/2, d1 f / 2).
            half = half_all[chi2]
            out[chi2] = _log_gammaincc_large(np.full(half.shape, 0.5 * d1), half)
    return out


def _p_and_neglog10(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logp = np.minimum(logp, 0.0)
    return np.exp(logp), -logp / LN10 + 0.0          # (+ 0.0: p = 1 gives 0, not -0)


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
        (r, p) contrast matrix of full row rank (a single row is allowed: then ``F = t^2``),
        or (v, r, p): each voxel's own rows (:func:`.contrasts.sequential_rows`; the same
        hypothesis written by other rows: Satterthwaite's df depends on the rows).
    name
        The contrast's name, for error messages.
    """
    # validate
    beta = np.asarray(beta, dtype=np.float64)
    per_voxel = np.ndim(weights) == 3
    L = np.asarray(weights, dtype=np.float64) if per_voxel else \
        f_weights(weights, beta.shape[1], name)[None]
    r = L.shape[1]
    fit = pre.fitted
    if per_voxel:   # a voxel not fitted may have rows of a singular X'X: never used
        L = np.where(fit[:, None, None], L, np.eye(r, L.shape[2]))
    # parameters: eigen-directions of L Cov L' (identity stand-in where not fitted)
    # reductions over one contiguous axis (rowwise.voxel_sum): a voxel's bits in any company
    S2 = voxel_sum(L[:, :, None, :, None] * pre.cov_beta[:, None, None]
                   * L[:, None, :, None, :], 2)
    S2 = np.where(fit[:, None, None], S2, np.eye(r))
    d, P = np.linalg.eigh(0.5 * (S2 + np.swapaxes(S2, 1, 2)))
    rows = voxel_sum(np.swapaxes(P, 1, 2)[:, :, None, :]
                     * np.swapaxes(L, 1, 2)[:, None, :, :], 1)   # rows of P'L, (v, r, p)
    nu = np.stack([contrast_variance_df(pre, rows[:, i])[1] for i in range(r)], axis=1)
    df_den = combine_f_df(nu)
    # statistic: F = sum_i (P'L beta)_i^2 / d_i / r
    proj = voxel_sum(rows * beta[:, None, :], 1)
    F = np.where(fit, (proj ** 2 / d).sum(axis=1) / r, np.nan)
    # p-value
    p, nl = _p_and_neglog10(f_logsf(F, float(r), df_den))
    with np.errstate(invalid="ignore"):
        r2 = r * F / (r * F + df_den)
    r2 = np.where(np.isinf(df_den), 0.0, r2)
    r2 = np.where(fit, r2, np.nan)
    return FResult(F=F, df_num=r, df_den=df_den, p=p, neglog10p=nl, r2=r2)
