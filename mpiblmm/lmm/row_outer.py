"""Sparse matrices of row-wise outer products: per-voxel sums over observed rows as one product.

Every observation contributes the outer product of two short rows (its non-zeros of ``Z`` and
of ``X``, or of ``Z`` twice) to a product form; :func:`row_outer_matrix` lays these out as the
rows of a sparse (n, m) matrix ``P``, and :func:`weighted_sums` sums them for every voxel with
its observation mask as weights (``P' W``).  Used by :mod:`.products` and by each structure's
Z'Z layout (:mod:`.structures`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def row_outer_matrix(
    left_cols: np.ndarray, left_vals: np.ndarray,
    right_cols: np.ndarray, right_vals: np.ndarray, n_right: int, n_cols: int,
) -> sp.csc_matrix:
    """Sparse (n, n_cols) matrix whose row i holds the outer product of row i's two parts.

    Entry ``(i, a * n_right + b)`` is ``left_vals[i, s] * right_vals[i, t]`` where
    ``a = left_cols[i, s]`` and ``b = right_cols[i, t]``; duplicates add up.
    """
    n = left_cols.shape[0]
    cols = (left_cols[:, :, None] * n_right + right_cols[:, None, :]).reshape(n, -1)
    vals = (left_vals[:, :, None] * right_vals[:, None, :]).reshape(n, -1)
    rows = np.repeat(np.arange(n), cols.shape[1])
    return sp.csc_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n, n_cols))


def weighted_sums(P: sp.spmatrix, weights: np.ndarray) -> np.ndarray:
    """``(P' W)'``: for each voxel (column of ``weights``), the weighted sum of P's rows."""
    return np.asarray((P.T @ weights).T)
