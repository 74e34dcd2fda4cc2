"""Validation of contrast weights: the user-facing checks before any statistic is computed.

A T contrast is one row of ``p`` weights; an F contrast is an ``r x p`` matrix of full row rank
``r``.  Every failure is a :class:`~mpiblmm.errors.ContrastError` whose one-line message names
the contrast and says what is wrong.
"""

from __future__ import annotations

import numpy as np

from ..errors import ContrastError


def _as_matrix(weights, p: int, name: str) -> np.ndarray:
    """Weights as a finite float (r, p) array, or a ContrastError naming the contrast."""
    try:
        L = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ContrastError(f"weights are not numbers: {weights!r}", where=f"contrast {name!r}")
    if L.ndim == 1:
        L = L[None, :]
    if L.ndim != 2 or L.shape[0] == 0:
        raise ContrastError(
            f"weights must be a vector of length {p} or a matrix with {p} columns, "
            f"got shape {L.shape}", where=f"contrast {name!r}")
    if L.shape[1] != p:
        raise ContrastError(
            f"has {L.shape[1]} weights per row but the design has {p} fixed effects",
            where=f"contrast {name!r}")
    if not np.isfinite(L).all():
        raise ContrastError("weights contain NaN or Inf", where=f"contrast {name!r}")
    return L


def t_weights(weights, p: int, name: str = "T") -> np.ndarray:
    """Validate a T contrast: ``p`` finite weights, not all zero.  Returns a (p,) array."""
    L = _as_matrix(weights, p, name)
    if L.shape[0] != 1:
        raise ContrastError(
            f"a T contrast has one row of weights, got {L.shape[0]} rows (use an F contrast)",
            where=f"contrast {name!r}")
    if not np.any(L):
        raise ContrastError("all weights are zero", where=f"contrast {name!r}")
    return L[0]


def f_weights(weights, p: int, name: str = "F") -> np.ndarray:
    """Validate an F contrast: an (r, p) matrix of full row rank ``r``.  Returns it as float.

    The rank is judged from the singular values relative to the largest (tolerance
    ``max(r, p) * eps * s_max``, numpy's convention).
    """
    L = _as_matrix(weights, p, name)
    r = L.shape[0]
    s = np.linalg.svd(L, compute_uv=False)
    tol = max(L.shape) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    rank = int((s > tol).sum())
    if rank < r:
        raise ContrastError(
            f"the {r} rows of weights have rank {rank}: the matrix is rank deficient "
            f"(drop the redundant rows)", where=f"contrast {name!r}")
    return L


def doolittle_lower(A: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """The unit lower triangular ``L`` of ``A = L U`` (LU without pivoting) of each matrix of
    the stack ``A`` (v, p, p), as ``lmerTest:::doolittle`` computes it: a column whose pivot
    ``|U_ii|`` is below ``eps`` is left 0, and entries below ``eps`` are set to 0 (absolute
    thresholds, as lmerTest's).  Entry by entry over the small ``p``, vectorised over ``v``;
    every sum left to right, as lmerTest's loops."""
    v, p = A.shape[0], A.shape[-1]
    L = np.zeros((v, p, p))
    U = np.zeros((v, p, p))
    for i in range(p):
        L[:, i, i] = 1.0
        for j in range(p):                                  # U[i, j] = A[i, j] - sum L U
            acc = A[:, i, j].copy()
            for k in range(i):
                acc -= L[:, i, k] * U[:, k, j]
            U[:, i, j] = acc
        pivot = U[:, i, i]
        small = np.abs(pivot) < eps
        for j in range(i + 1, p):                           # L[j, i] = (A - sum L U) / U_ii
            acc = A[:, j, i].copy()
            for k in range(i):
                acc -= L[:, j, k] * U[:, k, i]
            L[:, j, i] = np.where(small, 0.0, acc / np.where(small, 1.0, pivot))
    L[np.abs(L) < eps] = 0.0
    return L


def sequential_rows(XtX: np.ndarray, cols) -> np.ndarray:
    """lmerTest's type I (sequential) hypothesis rows of the term whose columns of X are
    ``cols``, for each voxel's own ``X'X`` (v, p, p): rows ``cols`` of ``t(L)``, ``L`` of
    :func:`doolittle_lower` (``lmerTest:::get_contrasts_type1``), (v, r, p).  Its ``anova``
    tests these when the fixed part has one term; with missing data each voxel's fit has
    its own rows of X, so its own rows here."""
    return np.swapaxes(doolittle_lower(XtX), 1, 2)[:, list(cols), :]
