"""Fixed-effect columns a voxel's observed rows cannot separate, dropped as lme4 drops them.

Where a voxel misses every image of a group, or sees a group at one time point only, X
restricted to its observed rows is rank deficient.  lme4 fits such data all the same:
``chkRank.drop.cols`` takes R's pivoted QR of X (LINPACK ``dqrdc2`` at ``tol = 1e-7``),
which moves a column whose norm, after the columns before it are projected out, is below
``tol`` times its own norm to the end, and drops the columns so moved.  The kept columns
keep their order and span X's column space, so the fit on them is the fit of the full model,
reported in the kept columns' coefficients (``fixef``).

This module decides the kept columns from each voxel's observed rows and which contrasts of
the full parameterisation the voxel can estimate.  A contrast ``L beta`` is estimable when
``L n = 0`` for every null vector ``n`` of X on the observed rows; its value and test are then
those of ``L[:, kept]`` in the reduced fit (the reduced fit's beta, zero in the dropped
columns, solves the full normal equations).  A contrast that is not estimable gets no
statistic.  Pure numpy, vectorised over voxels.
"""

from __future__ import annotations

import numpy as np

from .products import unit_scaled

#: lme4's tolerance: a column is dropped when the norm of its part outside the span of the
#: kept columns before it is below this fraction of its norm (``chkRank.drop.cols``).
LME4_TOL = 1e-7

#: A contrast row is estimable when its product with every unit null vector of the
#: column-scaled X is below this fraction of its own (column-scaled) norm.
ESTIMABLE_TOL = 1e-6


#: Entries of the (voxels, n, p) masked copies of X a batch of :func:`kept_columns` holds.
_BATCH_ENTRIES = 1 << 22


def kept_columns(X: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The columns lme4 keeps at each voxel, (k, p) bool: ``X`` (n, p), ``observed`` (k, n).

    dqrdc2's test on the voxel's observed rows of X: column ``j`` is kept when the norm of
    its part orthogonal to the kept columns before it is at least ``LME4_TOL`` times its own
    norm; a column zero on the observed rows is dropped.  The orthogonal part is formed by
    classical Gram-Schmidt applied twice (accurate to rounding, as a QR is; a residual from
    X'X loses half the digits, and an exactly dependent column after correlated ones
    passed for independent).  Vectorised over voxels, in batches.
    """
    k, p = observed.shape[0], X.shape[1]
    keep = np.zeros((k, p), dtype=bool)
    step = max(1, _BATCH_ENTRIES // max(1, X.size))
    for lo in range(0, k, step):
        Xm = np.asarray(observed[lo:lo + step], dtype=np.float64)[:, :, None] * X  # (b, n, p)
        Q = np.zeros_like(Xm)
        for j in range(p):   # over the few columns, vectorised over voxels
            v = Xm[:, :, j].copy()
            for _ in range(2):
                v -= np.einsum("bni,bi->bn", Q[:, :, :j], np.einsum("bni,bn->bi", Q[:, :, :j], v))
            size = np.linalg.norm(v, axis=1)
            kept = size >= LME4_TOL * np.linalg.norm(Xm[:, :, j], axis=1)
            kept &= size > 0
            Q[:, :, j] = np.where(kept[:, None], v / np.where(kept, size, 1.0)[:, None], 0.0)
            keep[lo:lo + step, j] = kept
    return keep


def null_vectors(XtX: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Unit null vectors of the column-scaled X at each voxel, one per dropped column,
    (k, p, d): for dropped column ``j``, ``e_j - C_K^-1 c_j`` on the kept columns ``K``
    (``keep`` (p,) bool, the same at every voxel), normalised."""
    C = unit_scaled(XtX)
    kept, dropped = np.flatnonzero(keep), np.flatnonzero(~keep)
    coef = np.linalg.solve(C[:, kept][:, :, kept], C[:, kept][:, :, dropped])   # (k, K, d)
    n = np.zeros((C.shape[0], C.shape[1], dropped.size))
    n[:, kept, :] = -coef
    n[:, dropped, np.arange(dropped.size)] = 1.0
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def estimable(L: np.ndarray, XtX: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Whether every row of ``L`` (r, p) is estimable at each voxel, (k,) bool: ``|l S n|``
    below ``ESTIMABLE_TOL |l S|`` for every unit null vector ``n`` (:func:`null_vectors`),
    with ``S`` the column scaling, so a column's units do not decide."""
    d = np.diagonal(XtX, axis1=-2, axis2=-1)
    scale = np.sqrt(np.where(d > 0, d, 1.0))                    # l S, with S = diag^-1/2
    Ls = np.asarray(L, dtype=np.float64)[None] / scale[:, None, :]  # (k, r, p)
    along = np.einsum("krp,kpd->krd", Ls, null_vectors(XtX, keep))
    size = np.linalg.norm(Ls, axis=2)[:, :, None]
    return (np.abs(along) <= ESTIMABLE_TOL * size).all(axis=(1, 2))
