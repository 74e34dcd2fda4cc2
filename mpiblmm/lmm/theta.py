"""lme4's parameterisation of the random-effect covariances: theta, the Cholesky entries.

lme4 writes each factor's relative covariance ``D_k = Sigma_k / s2`` as ``Lambda_k Lambda_k'``
with ``Lambda_k`` lower triangular, and ``theta`` lists the lower triangles column by column,
factor after factor.  lmerTest's variance parameters are ``(theta, sigma)``.  Near and on the
boundary (singular ``D_k``) this parameterisation is smooth where ``D`` is not, which is why
both the boundary polish of the estimator and the Satterthwaite df work in it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .model import RandomStructure


@lru_cache(maxsize=None)
def tril_indices(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the lower triangle of a q x q matrix, column by column.

    Cached (read-only arrays): the estimator asks for them thousands of times per chunk, and
    building them costs more than the small products they index.
    """
    cols, rows = np.triu_indices(q)
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


def n_theta(structure: RandomStructure) -> int:
    """Number of theta entries (free covariance parameters) over all factors."""
    return sum(f.n_vech for f in structure.factors)


def theta_slices(structure: RandomStructure) -> tuple[slice, ...]:
    """Slice of each factor's entries in the theta vector."""
    out, start = [], 0
    for f in structure.factors:
        out.append(slice(start, start + f.n_vech))
        start += f.n_vech
    return tuple(out)


#: lme4's ``isSingular`` tolerance on the diagonal of each Lambda_k (theta relative to sigma).
SINGULAR_TOL = 1e-4


def is_singular(theta: np.ndarray, structure: RandomStructure,
                tol: float = SINGULAR_TOL) -> np.ndarray:
    """lme4's ``isSingular``: some diagonal entry of some Lambda_k below ``tol`` (v,)."""
    out = np.zeros(theta.shape[0], dtype=bool)
    for f, sl in zip(structure.factors, theta_slices(structure)):
        rows, cols = tril_indices(f.n_effects)
        out |= (np.abs(theta[:, sl][:, rows == cols]) < tol).any(axis=1)
    return out


def lambdas_from_theta(theta: np.ndarray, structure: RandomStructure) -> tuple[np.ndarray, ...]:
    """Lower-triangular factors ``Lambda_k`` (v, q_k, q_k) from theta (v, n_theta)."""
    out = []
    for f, sl in zip(structure.factors, theta_slices(structure)):
        lam = np.zeros((theta.shape[0], f.n_effects, f.n_effects))
        rows, cols = tril_indices(f.n_effects)
        lam[:, rows, cols] = theta[:, sl]
        out.append(lam)
    return tuple(out)


def cholesky_psd(D: np.ndarray) -> np.ndarray:
    """Lower-triangular ``L`` with ``L L' = D`` for a stack of PSD (possibly singular) matrices.

    Positive definite matrices use LAPACK's Cholesky; singular ones a column-by-column
    factorisation that puts zeros where the pivot vanishes (lme4's convention at the boundary).
    """
    D = 0.5 * (D + np.swapaxes(D, -1, -2))
    q = D.shape[-1]
    L = np.zeros_like(D)
    A = D.copy()
    for j in range(q):  # loop over the (tiny) matrix dimension, vectorised over voxels
        piv = A[..., j, j]
        ok = piv > 1e-14 * np.maximum(1.0, np.abs(D).max(axis=(-2, -1)))
        root = np.sqrt(np.where(ok, piv, 1.0))
        col = np.where(ok[..., None], A[..., j:, j] / root[..., None], 0.0)
        L[..., j:, j] = col
        A[..., j:, j:] -= col[..., :, None] * col[..., None, :]
    return L


def theta_from_D(Ds: tuple[np.ndarray, ...], structure: RandomStructure) -> np.ndarray:
    """theta (v, n_theta) from relative covariances ``D_k`` (v, q_k, q_k)."""
    parts = []
    for f, D in zip(structure.factors, Ds):
        L = cholesky_psd(D)
        rows, cols = tril_indices(f.n_effects)
        parts.append(L[:, rows, cols])
    return np.concatenate(parts, axis=1)


def D_from_theta(theta: np.ndarray, structure: RandomStructure) -> tuple[np.ndarray, ...]:
    """Relative covariances ``D_k = Lambda_k Lambda_k'`` from theta."""
    return tuple(lam @ np.swapaxes(lam, -1, -2) for lam in lambdas_from_theta(theta, structure))
