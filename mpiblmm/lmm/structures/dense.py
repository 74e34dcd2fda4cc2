"""Several factors, dense layout: one ``q x q`` system per voxel (``layout="dense"``).

Z'Z is held dense (v|1, q, q); ``S = I + Lambda' Z'Z Lambda`` is Cholesky-factorised per voxel,
O(v q^3) time and O(v q^2) memory, and the scores, information and Satterthwaite sums run over
all level pairs of ``Z'V^-1Z``.  Not chosen by default (the blocked layout is, see
:func:`~mpiblmm.lmm.structures.choose`): kept for tiny ``q`` and as the tests' reference for
the blocked path.  A chunk is fitted by Fisher Scoring (halvings one by one: evaluation
memory grows with the number of candidates) then the theta polish.
"""

from __future__ import annotations

import numpy as np

from ..likelihood import VinvProducts, sym
from ..model import ProductForms, RandomStructure
from ..row_outer import row_outer_matrix, weighted_sums
from ..satterthwaite import covbeta_jacobian, deviance_hessian
from ..scores import vech_information
from ..scoring import fit_scoring_polish
from ..theta import lambdas_from_theta
from .base import Algebra, scoring_bytes


def _expand_lambda(lambdas: tuple[np.ndarray, ...], structure: RandomStructure,
                   A: np.ndarray, transpose: bool) -> np.ndarray:
    """``Lambda' A`` (transpose=True) or ``Lambda A`` for A (v, q, m) with block-diagonal Lambda."""
    out = np.empty(np.broadcast_shapes(A.shape, (lambdas[0].shape[0],) + A.shape[1:]))
    sub = "vba,vlbm->vlam" if transpose else "vab,vlbm->vlam"
    for lam, f, sl in zip(lambdas, structure.factors, structure.slices()):
        block = A[:, sl].reshape(A.shape[0], f.n_levels, f.n_effects, -1)
        out[:, sl] = np.einsum(sub, lam, block).reshape(out.shape[0], f.width, -1)
    return out


def vinv_dense(pf: ProductForms, lambdas: tuple[np.ndarray, ...],
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


class Dense(Algebra):
    """The algebra of several factors with a dense Z'Z (see the module docstring)."""

    name = "dense"

    # -- product forms
    def zz_products(self, rd, weights: np.ndarray) -> np.ndarray:
        """Z'Z, (v|1, q, q)."""
        q = self.structure.q
        P_zz = row_outer_matrix(rd.cols, rd.vals, rd.cols, rd.vals, q, q * q)
        return weighted_sums(P_zz, weights).reshape(-1, q, q)

    def zz_values_per_voxel(self, p: int) -> int:
        return self.structure.q ** 2

    def effect_sums(self, pf) -> tuple[np.ndarray, ...]:
        # Z's columns: factor after factor, level after level, effect after effect
        diag = np.diagonal(pf.ZtZ, axis1=-2, axis2=-1)
        return tuple(diag[:, sl].reshape(diag.shape[0], f.n_levels, f.n_effects)
                     for f, sl in zip(self.structure.factors, self.structure.slices()))

    def fit_bytes_per_voxel(self, p: int) -> int:
        """About 12 dense (q, q) matrices plus the (q, p + 1) products."""
        q = self.structure.q
        return scoring_bytes(12 * q * q + 20 * q * (p + 1), self.structure, p)

    # -- evaluation
    def vinv_products(self, pf, lambdas, need_z: bool) -> VinvProducts:
        return vinv_dense(pf, lambdas, need_z)

    def failed_products(self, pf, need_z: bool):
        q, p, nan = self.structure.q, pf.p, np.full
        z = {}
        if need_z:
            z = dict(ZtViX=nan((1, q, p), np.nan), ZtViY=nan((1, q), np.nan),
                     ZtViZ=nan((1, q, q), np.nan))
        vp = VinvProducts(XtViX=nan((1, p, p), np.nan), XtViY=nan((1, p), np.nan),
                          YtViY=nan(1, np.nan), logdetV=nan(1, np.nan), **z)
        return vp, None

    # -- scores and information
    def diagonal_blocks(self, vp, k: int) -> np.ndarray:
        f, sl = self.structure.factors[k], self.structure.slices()[k]
        l, q = f.n_levels, f.n_effects
        block = vp.ZtViZ[:, sl, sl].reshape(vp.ZtViZ.shape[0], l, q, l, q)
        return np.einsum("vjajb->vjab", block)

    def _pair_blocks(self, vp, k1: int, k2: int) -> np.ndarray:
        """All level pairs ``R_(k1 i)(k2 j)`` as (v, l1, q1, l2, q2)."""
        st = self.structure
        s1, s2 = st.slices()[k1], st.slices()[k2]
        f1, f2 = st.factors[k1], st.factors[k2]
        v = vp.ZtViZ.shape[0]
        return vp.ZtViZ[:, s1, s2].reshape(v, f1.n_levels, f1.n_effects, f2.n_levels,
                                           f2.n_effects)

    def information_dd(self, vp, blocks, cross: bool = False):
        r = len(self.structure.factors)
        grid = [[None] * r for _ in range(r)]
        for k1 in range(r):
            for k2 in range(r):
                if k2 < k1 or (k2 != k1 and not cross):
                    continue
                Rp = self._pair_blocks(vp, k1, k2)
                # I_vec[(a,b),(c,d)] = 1/2 sum_ij R_ij[a,c] R_ij[b,d]
                K = 0.5 * np.einsum("viajc,vibjd->vabcd", Rp, Rp)  # no optimize: rowwise.py
                grid[k1][k2] = vech_information(K)
                if k2 != k1:
                    grid[k2][k1] = np.swapaxes(grid[k1][k2], -1, -2)
        if not cross:
            return tuple(grid[k][k] for k in range(r))
        return np.concatenate([np.concatenate(row, axis=-1) for row in grid], axis=-2)

    # -- Satterthwaite
    def pair_tensor(self, vp, k: int, k2: int, U1, U2, W1, W2, A, s2) -> np.ndarray:
        """Over level pairs ``(i, j)`` of factors ``k`` and ``k2``, ``R_ij = Z_ki'V^-1 Z_k2j``."""
        WA = None if A is None else np.einsum("vjdq,vqp->vjdp", W2, A)
        R = self._pair_blocks(vp, k, k2)
        # Plain einsum loops, one pair of operands at a time: einsum's optimize=True picks
        # contractions whose rounding depends on the number of voxels (see rowwise.py).
        T = -np.einsum("vibjc,viajd->vabcd", R, R)
        uR = np.einsum("via,vibjc->vabjc", U1, R)
        T += (2.0 / s2)[:, None, None, None, None] * np.einsum("vabjc,vjd->vabcd", uR, U2)
        if WA is not None:
            RW = np.einsum("vibjc,viap->vbjcap", R, W1)
            T += 2.0 * np.einsum("vbjcap,vjdp->vabcd", RW, WA)
        return T

    def satterthwaite(self, pf, varpar: np.ndarray, method: str):
        """The exact formulas from the Z parts of one evaluation."""
        vp = vinv_dense(pf, lambdas_from_theta(varpar[:, :-1], self.structure), need_z=True)
        cov, J = covbeta_jacobian(pf, varpar, vp)
        return cov, J, deviance_hessian(pf, varpar, method, vp)

    # -- fitting
    def fit_chunk(self, pf, method: str, tolerance: float, max_iterations: int,
                  polish_mode: str) -> dict:
        return fit_scoring_polish(pf, method, tolerance, max_iterations, polish_mode, {})
