"""ML/REML log-likelihood and the V^-1 product forms, from product forms, for many voxels.

Parameterisation.  Each factor's relative covariance is given by a factor ``Lambda_k``
(v, q_k, q_k) with ``D_k = Lambda_k Lambda_k'`` (lme4's relative covariance factor; any square
root works, so a singular ``D_k`` is fine).  With ``Lambda = blockdiag_k(I_{l_k} (x) Lambda_k)``
and ``S = I + Lambda' Z'Z Lambda`` (symmetric, eigenvalues >= 1):

- ``M = D (I + Z'Z D)^-1 = Lambda S^-1 Lambda'``
- ``A' V^-1 B = A'B - (Lambda'Z'A)' S^-1 (Lambda'Z'B)`` for A, B in {X, Y}
- ``Z'V^-1 B = Z'B - Z'Z Lambda S^-1 Lambda' Z'B``
- ``log|V| = log|S|``

Two paths, chosen by the random structure:

- one factor: ``S`` is block diagonal, ``l`` blocks of ``q_1 x q_1``; everything is done per
  level on (v, l, q_1, q_1) arrays in closed form for ``q_1 <= 2``.  Cost O(v l q_1^2 p^2).
- several factors: ``S`` is a dense (v, q, q) matrix, Cholesky-factorised.  Cost O(v q^3).

Log-likelihoods equal lme4's ``logLik`` (constants included):

- ML:   ``-1/2 [n log(2 pi s2) + log|V| + e'V^-1 e / s2]``
- REML: ``-1/2 [(n-p) log(2 pi s2) + log|V| + log|X'V^-1 X| + e'V^-1 e / s2]``, ``beta`` GLS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import ProductForms, RandomStructure

LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class VinvProducts:
    """``A'V^-1B`` for A, B in {X, Y, Z} and ``log|V|`` at one value of the variance parameters.

    ``ZtViZ`` is (v, l, q1, q1) blocks for one factor, (v, q, q) otherwise, or None when not
    requested.  ``ZtViX`` (v, q, p) and ``ZtViY`` (v, q) likewise may be None.
    """

    XtViX: np.ndarray
    XtViY: np.ndarray
    YtViY: np.ndarray
    logdetV: np.ndarray
    ZtViX: np.ndarray | None = None
    ZtViY: np.ndarray | None = None
    ZtViZ: np.ndarray | None = None


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


def _expand_lambda(lambdas: tuple[np.ndarray, ...], structure: RandomStructure,
                   A: np.ndarray, transpose: bool) -> np.ndarray:
    """``Lambda' A`` (transpose=True) or ``Lambda A`` for A (v, q, m) with block-diagonal Lambda."""
    out = np.empty(np.broadcast_shapes(A.shape, (lambdas[0].shape[0],) + A.shape[1:]))
    sub = "vba,vlbm->vlam" if transpose else "vab,vlbm->vlam"
    for lam, f, sl in zip(lambdas, structure.factors, structure.slices()):
        block = A[:, sl].reshape(A.shape[0], f.n_levels, f.n_effects, -1)
        out[:, sl] = np.einsum(sub, lam, block).reshape(out.shape[0], f.width, -1)
    return out


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
    if pf.structure.is_single_factor:
        return _vinv_single(pf, lambdas[0], need_z)
    return _vinv_dense(pf, lambdas, need_z)


def _mm(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A B`` for small matrices stored with the matrix axes first: (q, r, ...) x (r, s, ...).

    The trailing (voxel, level) axes are contiguous, so each term is one fast elementwise
    operation; numpy's matmul on stacks of 2x2 matrices is an order of magnitude slower.
    """
    out = A[:, 0][:, None] * B[0][None]
    for k in range(1, A.shape[1]):
        out += A[:, k][:, None] * B[k][None]
    return out


def _mm_tn(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A' B`` for small matrices stored with the matrix axes first."""
    return _mm(np.swapaxes(A, 0, 1), B)


def _spd_inv_logdet_lead(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spd_inv_logdet` for matrices stored with the matrix axes first (q, q, ...)."""
    if S.shape[0] <= 2:
        inv, logdet = spd_inv_logdet(np.moveaxis(S, (0, 1), (-2, -1)))
        return np.ascontiguousarray(np.moveaxis(inv, (-2, -1), (0, 1))), logdet
    inv, logdet = spd_inv_logdet(np.ascontiguousarray(np.moveaxis(S, (0, 1), (-2, -1))))
    return np.ascontiguousarray(np.moveaxis(inv, (-2, -1), (0, 1))), logdet


def _lead(a: np.ndarray, n_small: int) -> np.ndarray:
    """Move the last ``n_small`` axes to the front (contiguous copy)."""
    nd = a.ndim
    return np.ascontiguousarray(np.moveaxis(a, tuple(range(nd - n_small, nd)),
                                            tuple(range(n_small))))


def _trail(a: np.ndarray, n_small: int) -> np.ndarray:
    """Inverse of :func:`_lead`: move the first ``n_small`` axes to the end."""
    nd = a.ndim
    return np.moveaxis(a, tuple(range(n_small)), tuple(range(nd - n_small, nd)))


def _x_corrections_shared(ZX: np.ndarray, L: np.ndarray, Sinv: np.ndarray,
                          MZY: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``X'Z M Z'X`` and ``X'Z M Z'Y`` when Z'X is shared by every voxel (complete data).

    ``ZX`` (q1, p, l) shared, ``M = Lambda S^-1 Lambda'`` per voxel and level; the sums over
    levels become matrix products with the shared per-level outer products of Z'X (BLAS).
    """
    M = _mm(L, _mm(Sinv, np.swapaxes(L, 0, 1)))            # (q1, q1, v, l)
    q1, p, l = ZX.shape
    v = M.shape[2]
    corr_xx = np.zeros((v, p * p))
    for i in range(q1):
        for j in range(q1):
            outer = (ZX[i][:, None, :] * ZX[j][None, :, :]).reshape(p * p, l)
            corr_xx += M[i, j] @ outer.T
    corr_xy = sum(MZY[i] @ ZX[i].T for i in range(q1))
    return sym(corr_xx.reshape(v, p, p)), corr_xy


def _vinv_single(pf: ProductForms, lam: np.ndarray, need_z: bool) -> VinvProducts:
    # Work with the small matrix axes first and (voxel, level) last: (q1, q1, v, l).
    f = pf.structure.factors[0]
    l, q1, p, v = f.n_levels, f.n_effects, pf.p, pf.n_voxels
    B = _lead(pf.ZtZ, 2)                                   # (q1, q1, v|1, l)
    ZX = _lead(pf.ZtX.reshape(-1, l, q1, p), 2)            # (q1, p, v|1, l)
    ZY = _lead(pf.ZtY.reshape(v, l, q1), 1)                # (q1, v, l)
    L = _lead(lam, 2)[..., None]                           # (q1, q1, v, 1)
    BL = _mm(B, L)                                         # Z'Z Lambda per level
    S = _mm_tn(L, BL)
    for i in range(q1):
        S[i, i] += 1.0
    Sinv, logdet = _spd_inv_logdet_lead(S)                 # S^-1, log|S| (v, l)
    AY = _mm_tn(L, ZY[:, None])[:, 0]                      # Lambda'Z'Y  (q1, v, l)
    SAY = _mm(Sinv, AY[:, None])[:, 0]
    if ZX.shape[2] == 1 and not need_z:
        corr_xx, corr_xy = _x_corrections_shared(ZX[:, :, 0], L, Sinv, _mm(L, SAY[:, None])[:, 0])
    else:
        AX = _mm_tn(L, ZX)                                 # Lambda'Z'X  (q1, p, v, l)
        SAX = _mm(Sinv, AX)
        corr_xx = np.empty((v, p, p))
        for a in range(p):
            for b in range(a, p):
                corr_xx[:, a, b] = corr_xx[:, b, a] = (AX[:, a] * SAX[:, b]).sum(axis=(0, 2))
        corr_xy = np.stack([(AX[:, a] * SAY).sum(axis=(0, 2)) for a in range(p)], axis=1)
    out = dict(XtViX=pf.XtX - corr_xx, XtViY=pf.XtY - corr_xy,
               YtViY=pf.YtY - (AY * SAY).sum(axis=(0, 2)), logdetV=logdet.sum(-1))
    if need_z:
        # Z'V^-1B = Z'B - Z'Z Lambda S^-1 Lambda'Z'B
        ZtViX = ZX - _mm(BL, SAX)
        ZtViY = ZY - _mm(BL, SAY[:, None])[:, 0]
        ZtViZ = B - _mm(_mm(BL, Sinv), np.swapaxes(BL, 0, 1))
        out.update(ZtViX=_trail(ZtViX, 2).reshape(v, l * q1, p),
                   ZtViY=_trail(ZtViY, 1).reshape(v, l * q1),
                   ZtViZ=sym(_trail(ZtViZ, 2)))
    return VinvProducts(**out)


def _vinv_dense(pf: ProductForms, lambdas: tuple[np.ndarray, ...],
                need_z: bool) -> VinvProducts:
    st = pf.structure
    v, q, p = pf.n_voxels, st.q, pf.p
    ZtZ = np.broadcast_to(pf.ZtZ, (v, q, q))
    # S = I + Lambda' Z'Z Lambda, applying the block-diagonal Lambda on both sides.
    LZZ = _expand_lambda(lambdas, st, ZtZ, transpose=True)             # Lambda'Z'Z
    S = np.swapaxes(_expand_lambda(lambdas, st, np.swapaxes(LZZ, 1, 2), transpose=True), 1, 2)
    S = sym(S) + np.eye(q)
    C = np.linalg.cholesky(S)
    logdet = 2.0 * np.log(np.diagonal(C, axis1=-2, axis2=-1)).sum(-1)
    ZXY = np.concatenate([np.broadcast_to(pf.ZtX, (v, q, p)), pf.ZtY[:, :, None]], axis=2)
    A = _expand_lambda(lambdas, st, ZXY, transpose=True)                # Lambda'Z'[X Y]
    SA = np.linalg.solve(S, A)
    AX, AY, SAX, SAY = A[..., :p], A[..., p], SA[..., :p], SA[..., p]
    XtViX = pf.XtX - np.einsum("vap,vaq->vpq", AX, SAX)
    XtViY = pf.XtY - np.einsum("vap,va->vp", AX, SAY)
    YtViY = pf.YtY - np.einsum("va,va->v", AY, SAY)
    out = dict(XtViX=XtViX, XtViY=XtViY, YtViY=YtViY, logdetV=logdet)
    if need_z:
        ZZL = np.swapaxes(LZZ, 1, 2)                                    # Z'Z Lambda
        corr = ZZL @ SA                                                  # Z'Z M Z'[X Y]
        ZtViX = ZXY[..., :p] - corr[..., :p]
        ZtViY = ZXY[..., p] - corr[..., p]
        ZtViZ = ZtZ - ZZL @ np.linalg.solve(S, LZZ)
        out.update(ZtViX=ZtViX, ZtViY=ZtViY, ZtViZ=sym(ZtViZ))
    return VinvProducts(**out)


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
