"""Maps derived at export from stored per-voxel statistics: z scores, FDR q-values, the mask.

Pure numpy/scipy on arrays shaped (voxels,); nothing here re-fits or re-tests anything, it
only re-expresses p-values that ``results.h5`` already holds:

- :func:`z_from_neglog10p`: the standard normal z with the same p as the stored test
  (FSL's ``zstat``/``zfstat`` convention), computed from ``log p`` so it stays finite and
  accurate far beyond where ``p`` itself underflows;
- :func:`bh_qvalues`: Benjamini-Hochberg q-values over a set of voxels;
- :data:`STATUS_NOT_ANALYSED`: the status code written in maps outside the candidate voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import special

#: Status code of the map background: voxels outside the analysis mask or never observed.
#: Appears in the ``status`` maps only (``results.h5`` holds candidate voxels alone).
STATUS_NOT_ANALYSED = 8
#: Meaning of :data:`STATUS_NOT_ANALYSED`, for ``maps.json`` and the docs.
NOT_ANALYSED_MEANING = "not analysed (outside the analysis mask, or never observed)"

LN10 = float(np.log(10.0))
#: Below this upper-tail probability ``ndtri(q)`` loses accuracy (q near the subnormal
#: range): the Newton solve on ``log_ndtr`` takes over.
_TINY_Q = 1e-300
_LOG_2PI = float(np.log(2.0 * np.pi))


def z_upper(log_q: np.ndarray) -> np.ndarray:
    """The z with ``P(Z > z) = q``, given ``log q`` (natural log); NaN stays NaN.

    ``z = -ndtri(q)`` where ``q >= 1e-300``; below, Newton's method on
    ``log Phi(-z) = log q`` started from the asymptotic inverse
    ``z0 = sqrt(-2 log q - log(-2 log q) - log 2 pi)`` (from ``Phi(-z) ~ phi(z) / z``).
    """
    log_q = np.minimum(np.asarray(log_q, dtype=np.float64), 0.0)
    z = np.full(log_q.shape, np.nan)
    finite = np.isfinite(log_q)
    tiny = finite & (log_q < np.log(_TINY_Q))
    ok = finite & ~tiny
    z[ok] = -special.ndtri(np.exp(log_q[ok]))
    z[np.isneginf(log_q)] = np.inf
    if tiny.any():
        L = log_q[tiny]
        zz = np.sqrt(-2.0 * L - np.log(-2.0 * L) - _LOG_2PI)
        for _ in range(8):  # quadratic convergence: 2-3 steps reach machine precision
            lsf = special.log_ndtr(-zz)
            # d/dz log Phi(-z) = -phi(z) / Phi(-z)
            slope = -np.exp(-0.5 * zz * zz - 0.5 * _LOG_2PI - lsf)
            zz = zz - (lsf - L) / slope
        z[tiny] = zz
    return z


def z_from_neglog10p(neglog10p: np.ndarray, kind: str = "T", alternative: str = "two-sided",
                     sign: np.ndarray | None = None, t: np.ndarray | None = None,
                     df: np.ndarray | None = None) -> np.ndarray:
    """z with the same p as a stored test: ``neglog10p = -log10 p`` (voxels,).

    - T, two-sided: ``z = sign(estimate) * isf(p / 2)`` (same two-sided p, signed);
    - T, ``greater``: ``z = isf(p)``; T, ``less``: ``z = -isf(p)`` (one-sided p, so the
      sign is already in p);
    - F: ``z = isf(p)`` (FSL's ``zfstat``: same upper-tail p).

    ``sign`` is the estimate (or t) for two-sided T contrasts; voxels where it or p is NaN
    are NaN.  Computed from ``log p = -neglog10p * ln 10``, so p below 1e-308 still gives
    the right finite z.  A one-sided p near 1 (the estimate far the other way) keeps no
    digits of its small complement: where ``t`` and ``df`` are given, z there is
    ``sign(t) * isf(P(T > |t|))`` from them (:func:`~mpiblmm.lmm.inference.t_logsf`), the
    same as the two-sided z (it was +-inf from t of about 10 at df 118, and short of
    the two-sided z before that).
    """
    log_p = -np.asarray(neglog10p, dtype=np.float64) * LN10
    if kind == "F":
        return z_upper(log_p)
    if alternative in ("greater", "less"):
        z = z_upper(log_p) if alternative == "greater" else -z_upper(log_p)
        if t is not None and df is not None:
            t = np.asarray(t, dtype=np.float64)
            other_way = (t < 0) if alternative == "greater" else (t > 0)
            if other_way.any():
                from mpiblmm.lmm.inference import t_logsf

                tail = t_logsf(np.abs(t[other_way]), np.asarray(df, dtype=np.float64)[other_way])
                z[other_way] = np.sign(t[other_way]) * z_upper(tail)
        return z
    z = z_upper(log_p - np.log(2.0))
    if sign is not None:
        s = np.sign(np.asarray(sign, dtype=np.float64))
        z = np.where(s < 0, -z, z)
        z = np.where(np.isnan(s), np.nan, z)
    return z


def bh_qvalues(p: np.ndarray, include: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of ``p`` over the voxels where ``include`` is true.

    ``q_(i) = min_{j >= i} min(1, p_(j) m / j)`` over the m included voxels with a finite p,
    sorted by p (Benjamini & Hochberg 1995; the adjusted p of R's ``p.adjust(method="BH")``).
    Elsewhere NaN.
    """
    p = np.asarray(p, dtype=np.float64)
    use = np.asarray(include, dtype=bool) & np.isfinite(p)
    q = np.full(p.shape, np.nan)
    vals = p[use]
    m = vals.size
    if m == 0:
        return q
    order = np.argsort(vals, kind="stable")
    ranked = vals[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[use] = out
    return q


__all__ = ["STATUS_NOT_ANALYSED", "NOT_ANALYSED_MEANING", "z_upper", "z_from_neglog10p",
           "bh_qvalues"]
