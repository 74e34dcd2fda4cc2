"""ML/REML log-likelihood and the V^-1 product forms, from product forms, for many voxels.

Parameterisation.  Each factor's relative covariance is given by a factor ``Lambda_k``
(v, q_k, q_k) with ``D_k = Lambda_k Lambda_k'`` (lme4's relative covariance factor; any square
root works, so a singular ``D_k`` is fine).  With ``Lambda = blockdiag_k(I_{l_k} (x) Lambda_k)``
and ``S = I + Lambda' Z'Z Lambda`` (symmetric, eigenvalues >= 1):

- ``M = D (I + Z'Z D)^-1 = Lambda S^-1 Lambda'``
- ``A' V^-1 B = A'B - (Lambda'Z'A)' S^-1 (Lambda'Z'B)`` for A, B in {X, Y}
- ``Z'V^-1 B = Z'B - Z'Z Lambda S^-1 Lambda' Z'B``
- ``log|V| = log|S|``

How they are formed depends on the random-effects structure and is owned by its algebra
(``pf.algebra``, :mod:`~mpiblmm.lmm.structures`): :func:`vinv_products` asks it.  This module
holds what every structure shares: the GLS fit, the log-likelihood and small batched algebra.

Log-likelihoods equal lme4's ``logLik`` (constants included):

- ML:   ``-1/2 [n log(2 pi s2) + log|V| + e'V^-1 e / s2]``
- REML: ``-1/2 [(n-p) log(2 pi s2) + log|V| + log|X'V^-1 X| + e'V^-1 e / s2]``, ``beta`` GLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import ProductForms

LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class VinvProducts:
    """``A'V^-1B`` for A, B in {X, Y, Z} and ``log|V|`` at one value of the variance parameters.

    ``ZtViZ`` is in the layout of the structure's algebra ((v, l, q1, q1) blocks for one
    factor, (v, q, q) dense), or None when not requested.  ``ZtViX`` (v, q, p) and ``ZtViY`` (v, q) likewise may be None.
    """

    XtViX: np.ndarray
    XtViY: np.ndarray
    YtViY: np.ndarray
    logdetV: np.ndarray
    ZtViX: np.ndarray | None = None
    ZtViY: np.ndarray | None = None
    ZtViZ: np.ndarray | None = None

    FIELDS = ("XtViX", "XtViY", "YtViY", "logdetV", "ZtViX", "ZtViY", "ZtViZ")

    def take(self, idx) -> "VinvProducts":
        """The products of the voxels ``idx`` (an index array or a slice)."""
        return VinvProducts(*(None if a is None else a[idx]
                              for a in (getattr(self, k) for k in self.FIELDS)))

    def put(self, idx, other: "VinvProducts") -> None:
        """Overwrite voxels ``idx`` with ``other``'s (in place; the fields not computed stay
        None)."""
        for k in self.FIELDS:
            mine = getattr(self, k)
            if mine is not None:
                mine[idx] = getattr(other, k)

    @staticmethod
    def concat(parts: list["VinvProducts"]) -> "VinvProducts":
        """The products of consecutive voxel sets, in order (one part: itself)."""
        if len(parts) == 1:
            return parts[0]
        return VinvProducts(*(None if getattr(parts[0], k) is None
                              else np.concatenate([getattr(p, k) for p in parts])
                              for k in VinvProducts.FIELDS))


# ---------------------------------------------------------------- small batched algebra
def sym(A: np.ndarray) -> np.ndarray:
    """Symmetric part of a stack of square matrices."""
    return 0.5 * (A + np.swapaxes(A, -1, -2))


def spd_inv_logdet(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse and log-determinant of a stack of symmetric positive definite matrices.

    Closed forms for 1x1 and 2x2 (the common random-intercept / intercept+slope cases), where
    numpy's batched LAPACK calls would be dominated by per-matrix overhead.
    """
    q = S.shape[-1]
    if q == 1:
        return 1.0 / S, np.log(S[..., 0, 0])
    if q == 2:
        a, b, c = S[..., 0, 0], S[..., 0, 1], S[..., 1, 1]
        det = a * c - b * b
        inv = np.empty_like(S)
        inv[..., 0, 0] = c / det
        inv[..., 1, 1] = a / det
        inv[..., 0, 1] = inv[..., 1, 0] = -b / det
        return inv, np.log(det)
    C = np.linalg.cholesky(S)
    logdet = 2.0 * np.log(np.diagonal(C, axis1=-2, axis2=-1)).sum(-1)
    eye = np.broadcast_to(np.eye(q), S.shape)
    return np.linalg.solve(S, eye), logdet


def cov_factor(D: np.ndarray) -> np.ndarray:
    """A square root ``Lambda`` of a stack of PSD matrices, ``Lambda Lambda' = D``.

    Uses the eigendecomposition so singular (and slightly indefinite, clipped) ``D`` is fine.
    """
    w, U = np.linalg.eigh(sym(D))
    return U * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


# ---------------------------------------------------------------- V^-1 products
def vinv_products(pf: ProductForms, lambdas: tuple[np.ndarray, ...],
                  need_z: bool = True) -> VinvProducts:
    """V^-1 product forms at ``D_k = Lambda_k Lambda_k'`` for every voxel of ``pf``.

    Parameters
    ----------
    pf
        Product forms of ``v`` voxels.
    lambdas
        One (v, q_k, q_k) covariance factor per random factor (relative to ``s2``).
    need_z
        Also return Z'V^-1X, Z'V^-1Y and Z'V^-1Z (needed for scores and information).
    """
    return pf.algebra.vinv_products(pf, lambdas, need_z)


# ---------------------------------------------------------------- GLS and likelihood
def gls(vp: VinvProducts) -> tuple[np.ndarray, np.ndarray]:
    """GLS ``beta`` (v, p) and ``e'V^-1 e`` at it (v,)."""
    beta = np.linalg.solve(vp.XtViX, vp.XtViY[..., None])[..., 0]
    ete = vp.YtViY - np.einsum("vp,vp->v", beta, vp.XtViY)
    return beta, np.maximum(ete, 0.0)


def residual_quadratic(vp: VinvProducts, beta: np.ndarray) -> np.ndarray:
    """``e'V^-1 e`` at a given ``beta`` (v, p)."""
    return (vp.YtViY - 2.0 * np.einsum("vp,vp->v", beta, vp.XtViY)
            + np.einsum("vp,vpq,vq->v", beta, vp.XtViX, beta))


def logdet_spd(A: np.ndarray) -> np.ndarray:
    """Log-determinant of a stack of SPD matrices (NaN where not positive definite)."""
    sign, logdet = np.linalg.slogdet(A)
    return np.where(sign > 0, logdet, np.nan)


def loglik(vp: VinvProducts, n: np.ndarray, s2: np.ndarray, ete: np.ndarray,
           method: str) -> np.ndarray:
    """lme4's ``logLik`` at ``s2`` given ``e'V^-1e`` (for REML: at the GLS beta)."""
    p = vp.XtViX.shape[-1]
    if method == "ML":
        return -0.5 * (n * (LOG_2PI + np.log(s2)) + vp.logdetV + ete / s2)
    dof = n - p
    return -0.5 * (dof * (LOG_2PI + np.log(s2)) + vp.logdetV + logdet_spd(vp.XtViX)
                   + ete / s2)


def profiled_s2(ete: np.ndarray, n: np.ndarray, p: int, method: str) -> np.ndarray:
    """The ``s2`` that maximises the (RE)ML log-likelihood for fixed ``D``."""
    return ete / (n - p if method == "REML" else n)


def profiled_loglik(pf: ProductForms, lambdas: tuple[np.ndarray, ...], method: str,
                    need_z: bool = False):
    """Profiled log-likelihood at ``D_k = Lambda_k Lambda_k'``: ``beta`` GLS, ``s2`` optimal.

    Returns
    -------
    llh (v,), beta (v, p) for the centred data (add ``pf.y_offset``), s2 (v,), VinvProducts.
    """
    vp = vinv_products(pf, lambdas, need_z=need_z)
    beta, ete = gls(vp)
    s2 = profiled_s2(ete, pf.n, pf.p, method)
    return loglik(vp, pf.n, s2, ete, method), beta, s2, vp
