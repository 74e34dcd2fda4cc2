"""Products along the voxel axis whose result for a voxel depends on that voxel alone.

BLAS kernels round a row (or column) of a matrix product differently depending on where it
falls in the kernel's register blocks, and switch kernels with the matrix size, so with
``np.matmul`` a voxel's last bits, and at a voxel converging right at the tolerance its
iteration count, would depend on which voxels share its chunk, and so on the number of
ranks.  These products run numpy's own einsum loops instead, which treat every voxel the
same way: a fit gives the same bits at any rank count.  They are several times slower than
BLAS; on the demo study they cost about 5% of the fit phase.
"""

from __future__ import annotations

import numpy as np


def rows_at(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` for ``A`` (v, k) with one voxel per row and ``B`` (k, m) shared: (v, m).

    The faster of two numpy loops for the shapes is used: the choice depends on ``B`` alone,
    never on the number of voxels, so it is the same for every chunk.
    """
    k, m = B.shape
    if k <= m:
        return np.einsum("vk,km->vm", A, B)
    out = np.empty((A.shape[0], m))
    for j in range(m):                           # few columns: one reduction each
        np.einsum("vk,k->v", A, B[:, j], out=out[:, j])
    return out


def cols_at(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``(A.T @ B).T`` for ``A`` (n, k) shared and ``B`` (n, v) with one voxel per column:
    (v, k)."""
    out = np.empty((B.shape[1], A.shape[1]))
    for j in range(A.shape[1]):
        np.einsum("nv,n->v", B, A[:, j], out=out[:, j])
    return out


def voxel_sum(products: np.ndarray, axes: int) -> np.ndarray:
    """Sum over the last ``axes`` axes of a per-voxel array (v, ...), in one order for every
    voxel: the summed axes flattened into one contiguous last axis, which numpy reduces row
    by row the same way whatever the leading shape.  (einsum reducing over two axes, or
    over one when the voxel axis has length one, chose another loop order by the shape: a
    voxel alone got other last bits than among others.)"""
    a = np.ascontiguousarray(products)
    return a.reshape(a.shape[:a.ndim - axes] + (-1,)).sum(axis=-1)
