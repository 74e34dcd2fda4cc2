"""One random factor: Cov(beta), its Jacobian and the deviance Hessian from level sums.

The same formulas as :func:`~mpiblmm.lmm.satterthwaite.covbeta_jacobian` and
:func:`~mpiblmm.lmm.satterthwaite.deviance_hessian` (eqs. 1-2 and 6 there), with every sum over
level pairs reduced to the diagonal (``Z'V^-1Z`` is block diagonal) and formed entry by entry
from the per-level closed forms of :mod:`.levels`: no (v, l, q, p) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..likelihood import gls
from ..model import ProductForms
from ..satterthwaite import (inv_sym, lambda_directions, second_direction_trace,
                             split_varpar)
from ..theta import tril_indices
from . import level_kernel
from .levels import (dot, kernel_products, level_core, level_layout, level_residuals, level_T_R,
                     level_zx_a_zx, lsum, products_block, voxel_blocks)


@dataclass(frozen=True)
class _SattSums:
    """Level sums of the one-factor model at the estimate (everything J and H need).

    ``WW`` (v, q, p, q, p) = sum_j W_j (x) W_j; ``WU`` (v, q, p, q) = sum_j W_j (x) u_j;
    ``UU``, ``R`` (v, q, q); ``T`` (v, q, q, q, q) the single-factor pair tensor in the
    ``[b, c, a, d]`` order of :func:`_pair_tensor` before its final transpose (without the
    REML term when ``A`` is not used); plus ``A``, ``XtViX`` (v, p, p) and ``Q`` = e'V^-1e (v,).
    """

    WW: np.ndarray
    WU: np.ndarray
    UU: np.ndarray
    R: np.ndarray
    T: np.ndarray
    A: np.ndarray
    Q: np.ndarray


def _satt_sums_block(pf: ProductForms, lam: np.ndarray, s2: np.ndarray, reml: bool):
    q, p, v = lam.shape[-1], pf.p, pf.n_voxels
    B, ZX, ZY = level_layout(pf)
    M, _ = level_core(B, lam, want_logdet=False)
    vp = products_block(pf, B, ZX, ZY, M, np.zeros(v))     # (log|V| is not needed)
    beta, Q = gls(vp)
    A = inv_sym(vp.XtViX)
    T, R = level_T_R(B, M)
    r = level_residuals(ZX, ZY, beta)
    u = [dot(T[a], r) for a in range(q)]
    W = [[dot(T[a], [ZX[c][s] for c in range(q)]) for s in range(p)] for a in range(q)]
    # W_j A W_j' = T_j P_j T_j', P_j = ZX_j A ZX_j'
    P = level_zx_a_zx(ZX, A)
    TP = [[dot(T[a], [P[c][d] for c in range(q)]) for d in range(q)] for a in range(q)]
    WAW = [[None] * q for _ in range(q)]
    for a in range(q):
        for b in range(a, q):
            WAW[a][b] = WAW[b][a] = dot(TP[a], T[b])
    uu = [[None] * q for _ in range(q)]
    for a in range(q):
        for b in range(a, q):
            uu[a][b] = uu[b][a] = u[a] * u[b]
    WW = np.empty((v, q, p, q, p))
    flat = [(a, s) for a in range(q) for s in range(p)]
    for i, (a, s) in enumerate(flat):
        for b, t in flat[i:]:
            WW[:, a, s, b, t] = WW[:, b, t, a, s] = lsum(W[a][s], W[b][t])
    WU = np.empty((v, q, p, q))
    for a in range(q):
        for s in range(p):
            for b in range(q):
                WU[:, a, s, b] = lsum(W[a][s], u[b])
    UU = np.empty((v, q, q))
    Rs = np.empty((v, q, q))
    for a in range(q):
        for b in range(a, q):
            UU[:, a, b] = UU[:, b, a] = lsum(u[a], u[b])
            Rs[:, a, b] = Rs[:, b, a] = R[a][b].sum(axis=-1)
    # T[b, c, a, d] = sum_j R[b,c] (-R[a,d] + 2/s2 u[a] u[d] + 2 (W A W')[a,d])  (REML term)
    X = [[None] * q for _ in range(q)]
    for a in range(q):
        for d in range(a, q):
            x = uu[a][d] * (2.0 / s2)[:, None]
            x -= R[a][d]
            if reml:
                x += 2.0 * WAW[a][d]
            X[a][d] = X[d][a] = x
    Tt = np.empty((v, q, q, q, q))
    done: dict = {}
    for b in range(q):
        for c in range(b, q):
            for a in range(q):
                for d in range(a, q):
                    key = (b, c, a, d)
                    if key not in done:
                        done[key] = lsum(R[b][c], X[a][d])
                    val = done[key]
                    for bb, cc in {(b, c), (c, b)}:
                        for aa, dd in {(a, d), (d, a)}:
                            Tt[:, bb, cc, aa, dd] = val
    return _SattSums(WW=WW, WU=WU, UU=UU, R=Rs, T=Tt, A=A, Q=Q)


def _satt_sums(pf: ProductForms, lam: np.ndarray, s2: np.ndarray, reml: bool) -> _SattSums:
    if level_kernel.applies(lam.shape[-1]):
        vp = kernel_products(pf, lam)
        beta, Q = gls(vp)
        A = inv_sym(vp.XtViX)
        WW, WU, UU, R, T = level_kernel.satterthwaite_sums(pf, lam, beta, s2, A if reml else None)
        return _SattSums(WW=WW, WU=WU, UU=UU, R=R, T=T, A=A, Q=Q)
    parts = [_satt_sums_block(pf.take(sl), lam[sl], s2[sl], reml) for sl in voxel_blocks(pf)]
    if len(parts) == 1:
        return parts[0]
    return _SattSums(*(np.concatenate([getattr(s, k) for s in parts])
                       for k in ("WW", "WU", "UU", "R", "T", "A", "Q")))


def level_setup(pf: ProductForms, varpar: np.ndarray, method: str):
    """``Cov(beta)``, its Jacobian and the deviance Hessian of the one-factor model from level
    sums (the same formulas as :func:`covbeta_jacobian` and :func:`deviance_hessian`)."""
    st = pf.structure
    (lam,), sigma = split_varpar(varpar, st)
    s2 = sigma ** 2
    reml = method == "REML"
    S = _satt_sums(pf, lam, s2, reml)
    A, Q = S.A, S.Q
    v, m, p = varpar.shape[0], varpar.shape[1], pf.p
    q = lam.shape[-1]
    # Jacobian: dCov/dLambda[r, c] = s2 (M_rc + M_rc'), M_rc = sum_e A WW[r, :, e, :] A Lambda[e, c]
    Y = A[:, None, None] @ np.transpose(S.WW, (0, 1, 3, 2, 4)) @ A[:, None, None]  # (v,r,e,p,p)
    Mrc = np.einsum("vrepq,vec->vrcpq", Y, lam)
    J = np.empty((v, m, p, p))
    J[:, -1] = 2.0 * sigma[:, None, None] * A
    rows, cols = tril_indices(q)
    for t, (r, c) in enumerate(zip(rows, cols)):
        J[:, t] = s2[:, None, None] * (Mrc[:, r, c] + np.swapaxes(Mrc[:, r, c], 1, 2))
    # Hessian
    dof = pf.n - pf.p if reml else pf.n
    F, rows, cols = lambda_directions(lam)
    nt = rows.size
    H = np.zeros((v, m, m))
    w = np.einsum("vapb,vtab->vtp", S.WU, F)
    Mk = S.R - S.UU / s2[:, None, None]
    if reml:
        Mk = Mk - np.einsum("vapbq,vpq->vab", S.WW, A)
    H[:, :nt, :nt] += second_direction_trace(Mk, rows, cols)
    T = np.transpose(S.T, (0, 3, 1, 2, 4))
    FT = np.einsum("vtab,vabcd->vtcd", F, T)              # plain einsum: see _pair_tensor
    H[:, :nt, :nt] += np.einsum("vtcd,vucd->vtu", FT, F)
    H[:, :nt, :nt] -= 2.0 * np.einsum("vtp,vpq,vuq->vtu", w, A, w) / s2[:, None, None]
    if reml:
        Qt = np.einsum("vapbq,vtab->vtpq", S.WW, F)
        AQ = A[:, None] @ Qt
        H[:, :nt, :nt] -= np.einsum("vtpr,vurp->vtu", AQ, AQ)
    eVte = np.einsum("vab,vtab->vt", S.UU, F)
    H[:, -1, -1] = -2.0 * dof / s2 + 6.0 * Q / s2 ** 2
    H[:, :nt, -1] = H[:, -1, :nt] = 2.0 * eVte / sigma[:, None] ** 3
    H = 0.5 * (H + np.swapaxes(H, 1, 2))
    return s2[:, None, None] * A, J, H
