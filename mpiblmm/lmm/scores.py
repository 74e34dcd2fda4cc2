"""Scores and Fisher information of the variance parameters, from V^-1 product forms.

Everything here is computed from a :class:`~mpiblmm.lmm.likelihood.VinvProducts` (with its Z
parts), the GLS ``beta`` and ``s2``, for a stack of ``v`` voxels.  Notation (ALGORITHM.md):

- ``u_kj = Z_kj' V^-1 e`` (q_k), ``R_(k1 i)(k2 j) = Z_k1i' V^-1 Z_k2j``, ``W_kj = Z_kj' V^-1 X``.
- score of ``D_k`` (a symmetric q_k x q_k matrix ``G_k``, with ``dl = tr(G_k dD_k)``)::

      G_k = 1/2 sum_j [u_kj u_kj' / s2 - R_kjkj]          (+ 1/2 sum_j W_kj A W_kj'  REML)

  with ``A = (X'V^-1 X)^-1``.
- expected information of ``vec D``: ``I_Dk1,Dk2 = 1/2 sum_ij R_ij (x) R_ij`` over all level pairs
  (for one factor only ``i = j`` survives: ``M`` is block diagonal so ``R_ij = 0`` for i != j);
  ``I_s2,Dk = vec(sum_j R_kjkj) / (2 s2)``; ``I_s2s2 = n / (2 s2^2)``.

Vech convention: the lower triangle column by column (the order of lme4's theta, see
:mod:`~mpiblmm.lmm.theta`).  With the duplication matrix ``Dup`` (vec = Dup vech), the vech score
is ``Dup' vec G`` and the vech information ``Dup' I_vec Dup``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .likelihood import VinvProducts
from .model import ProductForms
from .theta import tril_indices


# ---------------------------------------------------------------- vech helpers
@functools.lru_cache(maxsize=None)
def duplication(q: int) -> np.ndarray:
    """Duplication matrix ``Dup`` (q*q, q(q+1)/2): ``vec(A) = Dup vech(A)`` for symmetric A.

    Cached (read-only): every scoring step asks for it."""
    rows, cols = tril_indices(q)
    dup = np.zeros((q * q, rows.size))
    for m, (a, b) in enumerate(zip(rows, cols)):
        dup[a * q + b, m] = 1.0
        dup[b * q + a, m] = 1.0
    dup.flags.writeable = False
    return dup


def vech(A: np.ndarray) -> np.ndarray:
    """Lower triangle of (..., q, q) column by column -> (..., q(q+1)/2)."""
    rows, cols = tril_indices(A.shape[-1])
    return A[..., rows, cols]


def unvech(x: np.ndarray, q: int) -> np.ndarray:
    """Symmetric (..., q, q) from its vech (..., q(q+1)/2)."""
    rows, cols = tril_indices(q)
    out = np.zeros(x.shape[:-1] + (q, q))
    out[..., rows, cols] = x
    out[..., cols, rows] = x
    return out


def vech_score(G: np.ndarray) -> np.ndarray:
    """``Dup' vec(G)``: the gradient with respect to vech(D) of ``tr(G D)`` (off-diagonals twice)."""
    q = G.shape[-1]
    rows, cols = tril_indices(q)
    return np.where(rows == cols, 1.0, 2.0) * G[..., rows, cols]


def vech_information(K: np.ndarray) -> np.ndarray:
    """``Dup1' K Dup2`` for K (..., q1, q1, q2, q2) indexed [a, b, c, d] = I_vec[(a,b),(c,d)]."""
    q1, q2 = K.shape[-3], K.shape[-1]
    Kf = K.reshape(K.shape[:-4] + (q1 * q1, q2 * q2))
    return duplication(q1).T @ Kf @ duplication(q2)


# ---------------------------------------------------------------- per-level blocks
@dataclass(frozen=True)
class LevelBlocks:
    """Per-level pieces of one factor: ``R`` (v, l, q, q) diagonal blocks ``R_kjkj``, ``W``
    (v, l, q, p) = ``Z_kj'V^-1 X``, ``u`` (v, l, q) = ``Z_kj'V^-1 e``."""

    R: np.ndarray
    W: np.ndarray
    u: np.ndarray


def level_blocks(vp: VinvProducts, beta: np.ndarray, algebra) -> tuple[LevelBlocks, ...]:
    """Split the Z parts of ``vp`` into per-factor, per-level blocks at GLS ``beta`` (v, p).

    ``algebra``: the structure's algebra (``pf.algebra``), which knows the layout of
    ``vp.ZtViZ`` and gives its diagonal blocks ``R_kjkj``."""
    if vp.ZtViZ is None:
        raise ValueError("level_blocks needs VinvProducts computed with need_z=True")
    v, p = beta.shape
    # u = Z'V^-1 (Y - X beta) = Z'V^-1 Y - Z'V^-1 X beta
    u_all = vp.ZtViY - np.einsum("vqp,vp->vq", vp.ZtViX, beta)
    out = []
    structure = algebra.structure
    for k, (f, sl) in enumerate(zip(structure.factors, structure.slices())):
        l, q = f.n_levels, f.n_effects
        R = algebra.diagonal_blocks(vp, k)
        out.append(LevelBlocks(R=R, W=vp.ZtViX[:, sl].reshape(v, l, q, p),
                               u=u_all[:, sl].reshape(v, l, q)))
    return tuple(out)


# ---------------------------------------------------------------- scores
def d_scores(vp: VinvProducts, blocks: tuple[LevelBlocks, ...], s2: np.ndarray,
             method: str) -> tuple[np.ndarray, ...]:
    """Score ``G_k = dl/dD_k`` (v, q_k, q_k) for every factor (symmetric; ``dl = tr(G dD)``).

    ``G_k = 1/2 sum_j (u_kj u_kj'/s2 - R_kjkj)``; REML adds ``1/2 sum_j W_kj A W_kj'``.
    """
    A = np.linalg.inv(vp.XtViX) if method == "REML" else None
    out = []
    for b in blocks:
        uu = np.einsum("vja,vjb->vab", b.u, b.u)
        G = uu / s2[:, None, None] - b.R.sum(axis=1)
        if A is not None:
            # REML: + sum_j W_kj A W_kj' (derivative of -1/2 log|X'V^-1X|)
            WA = np.einsum("vjap,vpr->vjar", b.W, A)    # plain einsum loops (rowwise.py)
            G = G + np.einsum("vjar,vjbr->vab", WA, b.W)
        out.append(0.5 * G)
    return tuple(out)


def s2_score(ete: np.ndarray, n: np.ndarray, s2: np.ndarray, p: int, method: str) -> np.ndarray:
    """``dl/ds2 = -dof/(2 s2) + e'V^-1e/(2 s2^2)``, dof = n (ML) or n - p (REML)."""
    dof = n - p if method == "REML" else n
    return -0.5 * dof / s2 + 0.5 * ete / s2**2


def beta_score(vp: VinvProducts, beta: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """``dl/dbeta = X'V^-1 e / s2`` (zero at the GLS beta)."""
    return (vp.XtViY - np.einsum("vpr,vr->vp", vp.XtViX, beta)) / s2[:, None]


# ---------------------------------------------------------------- information
def information_s2d(blocks: tuple[LevelBlocks, ...], s2: np.ndarray) -> np.ndarray:
    """``I_s2,vech(D)`` (v, m): ``Dup' vec(sum_j R_kjkj) / (2 s2)``, factors in turn."""
    parts = [vech_score(b.R.sum(axis=1)) for b in blocks]
    return np.concatenate(parts, axis=-1) / (2.0 * s2[:, None])


def information_s2s2(n: np.ndarray, s2: np.ndarray, p: int = 0) -> np.ndarray:
    """``I_s2s2 = dof / (2 s2^2)`` (dof = n, or n - p for the REML variant)."""
    return (n - p) / (2.0 * s2**2)


def profiled_information(I_dd: np.ndarray, I_s2d: np.ndarray, I_s2s2: np.ndarray) -> np.ndarray:
    """Information of vech(D) with s2 profiled out: ``I_DD - I_Ds2 I_s2s2^-1 I_s2D``."""
    return I_dd - I_s2d[:, :, None] * I_s2d[:, None, :] / I_s2s2[:, None, None]


# ---------------------------------------------------------------- everything a step needs
def score_information(pf: ProductForms, lambdas: tuple[np.ndarray, ...], vp: VinvProducts,
                      beta: np.ndarray, s2: np.ndarray, method: str, cross: bool = False,
                      sums=None):
    """D-scores ``G_k``, the vech information and ``t_k = Dup' vec(sum_j R_kjkj)`` at one fit.

    The structure's algebra forms them (``pf.algebra.score_information``): from the Z parts of
    ``vp`` (:func:`z_score_information`) or, when ``vp`` has none, from the score sums of the
    evaluation (``sums``; computed from ``lambdas`` when not given).  Returns ``(G, info,
    t)``: ``G`` and ``t`` tuples over factors; ``info`` the (v, m, m) vech information over
    all factors when ``cross``, else its diagonal blocks, one (v, m_k, m_k) per factor.
    """
    return pf.algebra.score_information(pf, lambdas, vp, beta, s2, method, cross, sums)


def z_score_information(algebra, vp: VinvProducts, beta: np.ndarray, s2: np.ndarray,
                        method: str, cross: bool = False):
    """:func:`score_information` from the Z parts of ``vp`` (:func:`level_blocks`), with the
    information sums of the structure (``algebra.information_dd``)."""
    blocks = level_blocks(vp, beta, algebra)
    G = d_scores(vp, blocks, s2, method)
    info = algebra.information_dd(vp, blocks, cross=cross)
    return G, info, tuple(vech_score(b.R.sum(axis=1)) for b in blocks)
