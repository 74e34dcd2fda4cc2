"""Product forms (X'X, X'Y, Y'Y, Z'X, Z'Y, Z'Z, n) from a design and a block of voxel data.

This module is the only place that touches observation-level data; everything downstream
(likelihood, Fisher Scoring, inference) works from the :class:`~mpiblmm.lmm.model.ProductForms`
it returns.

Z is never formed densely.  It is held as a *row structure*: every observation has the same
number ``r = sum_k q_k`` of non-zeros (one block of ``q_k`` per factor), so two ``(n, r)``
arrays ``cols`` and ``vals`` describe it.  Per-voxel sums over observed rows, such as
``Z' diag(m_v) X``, are then one sparse-dense product ``P' m`` with ``P`` an ``(n, q*p)``
sparse matrix of row-wise outer products and ``m`` the ``(n, v)`` observation mask.

Centring: ``Y`` is replaced by ``Y - X b0`` with ``b0`` the per-voxel OLS fit on the observed
rows, before any product is formed; ``Y'Y`` then holds a residual sum of squares and keeps
its digits whatever the mean.  The likelihood and all variance estimates are unchanged (beta is
free); ``beta = b0 + beta_centred``, which is what ``ProductForms.y_offset`` records.

Cost per chunk of ``v`` voxels with missing data: ``O(n v (p^2 + r p + r^2))``; memory
``O(v (p^2 + q p + q^2))`` for several factors (dense Z'Z) and ``O(v (p^2 + q p + l q_1^2))``
for one factor (block-diagonal Z'Z).  Complete voxels share X'X, Z'X and Z'Z.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .model import ProductForms, RandomFactor, RandomStructure
from .rowwise import cols_at, rows_at
from .row_outer import row_outer_matrix, weighted_sums
from .structures import choose


@dataclass(frozen=True)
class RandomDesign:
    """Z as a row structure: observation ``i`` has values ``vals[i]`` in columns ``cols[i]``.

    ``cols`` and ``vals`` are (n, r) with ``r = sum_k q_k``; the first ``q_1`` entries of a row
    belong to factor 1, and so on.
    """

    structure: RandomStructure
    cols: np.ndarray
    vals: np.ndarray

    @property
    def n(self) -> int:
        return int(self.cols.shape[0])

    def sparse(self) -> sp.csr_matrix:
        """Z as a scipy CSR matrix (n, q)."""
        n, r = self.cols.shape
        indptr = np.arange(0, n * r + 1, r)
        return sp.csr_matrix(
            (self.vals.ravel(), self.cols.ravel(), indptr), shape=(n, self.structure.q)
        )


def random_design(
    codes: list[np.ndarray],
    designs: list[np.ndarray],
    names: list[str] | None = None,
    effect_names: list[tuple[str, ...]] | None = None,
) -> RandomDesign:
    """Build the random-effects design from level codes and per-factor covariates.

    Parameters
    ----------
    codes
        One (n,) integer array per factor, levels coded ``0 .. l_k - 1``.
    designs
        One (n, q_k) array per factor: the random-effect covariates (a column of ones is a
        random intercept).
    names, effect_names
        Factor names and per-factor effect names (for reporting only).
    """
    factors, col_blocks, val_blocks, offset = [], [], [], 0
    for k, (code, design) in enumerate(zip(codes, designs)):
        code = np.asarray(code, dtype=np.int64)
        design = np.asarray(design, dtype=np.float64)
        if design.ndim == 1:
            design = design[:, None]
        n_levels = int(code.max()) + 1 if code.size else 0
        q_k = design.shape[1]
        name = names[k] if names else f"factor{k}"
        enames = tuple(effect_names[k]) if effect_names else tuple(f"z{e}" for e in range(q_k))
        factors.append(RandomFactor(name, n_levels, q_k, enames))
        col_blocks.append(offset + code[:, None] * q_k + np.arange(q_k)[None, :])
        val_blocks.append(design)
        offset += n_levels * q_k
    return RandomDesign(
        RandomStructure(tuple(factors)),
        np.concatenate(col_blocks, axis=1),
        np.concatenate(val_blocks, axis=1),
    )


def _ols_offset(XtX: np.ndarray, XtY: np.ndarray) -> np.ndarray:
    """Per-voxel OLS coefficients by a pseudo-inverse (safe for rank-deficient voxels) of
    X'X with its columns scaled to unit length (:func:`unit_scaled`): ``b = S (S X'X S)^+ S
    X'Y``.  Unscaled, a column of 1e6 (head size in mm^3) beside an intercept put the
    intercept's eigenvalue below the 1e-12 cut: the offset was not the least-squares fit,
    the centred data not the residuals, and a constant voxel was fitted (status 2, sigma2
    1e-14) instead of refused as constant (status 7)."""
    d = np.diagonal(XtX, axis1=-2, axis2=-1)
    scale = np.where(d > 0, 1.0 / np.sqrt(np.where(d > 0, d, 1.0)), 0.0)   # S (zero columns: 0)
    w, U = np.linalg.eigh(XtX * scale[..., :, None] * scale[..., None, :])
    tol = w[..., -1:] * 1e-12
    inv_w = np.where(w > tol, 1.0 / np.where(w > tol, w, 1.0), 0.0)
    proj = np.einsum("...ij,...j,...kj->...ik", U, inv_w, U)
    return scale * np.einsum("...ij,...j->...i", proj, scale * XtY)


def product_forms(
    X: np.ndarray,
    rd: RandomDesign,
    Y: np.ndarray,
    observed: np.ndarray | None = None,
    centre: bool = True,
    layout: str = "auto",
) -> ProductForms:
    """Product forms of the voxels in ``Y`` (n, v), summed over each voxel's observed rows.

    Parameters
    ----------
    X
        Fixed-effects design (n, p).
    rd
        Random-effects design, see :func:`random_design`.
    Y
        Voxel data (n, v); float32 or float64.
    observed
        (n, v) boolean mask of observations to use.  Default: the finite entries of ``Y``.
        When every voxel is complete, X'X, Z'X and Z'Z are computed once and shared
        (leading axis 1).
    centre
        Subtract each voxel's OLS fit before forming products (recommended; exact).
    layout
        "auto", "dense" or "blocked": the Z'Z layout for several factors.  The structure's
        algebra is chosen here, once (:func:`~mpiblmm.lmm.structures.choose`), and stored on
        the product forms as ``algebra``; it also forms Z'Z in its layout.
    """
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[1] == 1:
        # One voxel alone: numpy's einsum reduces a single column by another loop (a
        # contiguous dot product with partial sums), whose last bits differ from the same
        # voxel's in any wider set, so a missing-data voxel alone in its chunk's group got
        # other bits than at another rank count.  As two equal columns it takes the loop
        # every wider set takes.
        twice = product_forms(X, rd, np.repeat(Y, 2, axis=1),
                              None if observed is None else np.repeat(observed, 2, axis=1),
                              centre, layout)
        return twice.take(np.array([0]))
    if observed is None:
        observed = np.isfinite(Y)
    # C order (voxels innermost) whatever the caller's layout: einsum then reduces over the
    # observations with the voxels as its inner loop, the same sequence of additions for
    # every voxel; on an F-ordered slice (a chunk's ``Y[group].T``) it took a contiguous
    # reduction per voxel whose partial sums follow the data's address alignment, so a
    # voxel's last bits changed with the chunking
    observed = np.ascontiguousarray(observed, dtype=bool)
    v = Y.shape[1]
    structure = rd.structure
    q = structure.q
    Y0 = np.ascontiguousarray(np.where(observed, Y, 0.0), dtype=np.float64)
    shared = bool(observed.all())
    weights = np.ones((n, 1)) if shared else observed.astype(np.float64)

    # X'X: shared or per voxel as sums of row outer products.
    xx_rows = (X[:, :, None] * X[:, None, :]).reshape(n, p * p)
    XtX = cols_at(xx_rows, weights).reshape(-1, p, p)
    XtY = cols_at(X, Y0)
    y_offset = None
    if centre:
        y_offset = np.broadcast_to(_ols_offset(XtX, XtY), (v, p)).copy()
        # C order whatever the number of voxels (the product is F-ordered for some widths):
        # einsum's loops, and so a voxel's bits, follow the layout
        Y0 = np.ascontiguousarray(Y0 - rows_at(y_offset, X.T).T * weights)
        XtY = cols_at(X, Y0)
    YtY = np.einsum("iv,iv->v", Y0, Y0)
    rtol_constant = constant_rtol(Y, observed)
    Zs = rd.sparse()
    ZtY = np.asarray((Zs.T @ Y0).T)

    x_cols = np.broadcast_to(np.arange(p), (n, p))
    P_zx = row_outer_matrix(rd.cols, rd.vals, x_cols, X, p, q * p)
    ZtX = weighted_sums(P_zx, weights).reshape(-1, q, p)

    algebra = choose(rd, layout)
    ZtZ = algebra.zz_products(rd, weights)

    n_obs = observed.sum(axis=0).astype(np.int64)
    return ProductForms(
        XtX=XtX, XtY=XtY, YtY=YtY, ZtX=ZtX, ZtY=ZtY, ZtZ=ZtZ,
        n=n_obs, structure=structure, y_offset=y_offset, shared=shared, algebra=algebra,
        rtol_constant=rtol_constant,
    )


#: Residual RMS, relative to the data's RMS, below which a voxel's data count as constant
#: (:func:`~mpiblmm.lmm.estimate.constant_data`), where its values are float32 numbers (how
#: images are packed when they fit: float32 rounds a value by up to 2^-24 ~ 6e-8 of its size,
#: RMS about 3.5e-8, so residuals below 1e-7 of the data are rounding, not variance) ...
CONSTANT_RTOL_FLOAT32 = 1e-7
#: ... and where they are not (packed as float64): residuals of float64 data keep about 15
#: digits, so 1e-10 leaves a wide margin above rounding.  With 1e-7 for all data, Y + 1e7 (a
#: large mean, unit variation) was refused as constant at a tenth of the voxels.
CONSTANT_RTOL_FLOAT64 = 1e-10


def constant_rtol(Y: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Per voxel (v,): :data:`CONSTANT_RTOL_FLOAT32` where every observed value of the
    voxel is a float32 number (it may have been rounded to one) and not all are whole
    numbers (whole numbers up to 2^24 are float32 numbers without any rounding: int32
    images near 2^24 varying by 1-2 were refused as constant), else
    :data:`CONSTANT_RTOL_FLOAT64`.  A voxel's own values decide, so chunking cannot."""
    Y = np.asarray(Y)
    with np.errstate(over="ignore", invalid="ignore"):
        exact = ((Y.astype(np.float32) == Y) | ~observed).all(axis=0)
        whole = ((np.floor(Y) == Y) | ~observed).all(axis=0)
    return np.where(exact & ~whole, CONSTANT_RTOL_FLOAT32, CONSTANT_RTOL_FLOAT64)


def unit_scaled(XtX: np.ndarray) -> np.ndarray:
    """``S X'X S`` with ``S = diag(X'X)^-1/2``: X'X of X's columns scaled to unit length
    (a column zero on the observed rows stays zero), for each matrix of the stack."""
    d = np.diagonal(XtX, axis1=-2, axis2=-1)
    s = 1.0 / np.sqrt(np.where(d > 0, d, 1.0))
    return XtX * s[..., :, None] * s[..., None, :]


def full_rank(XtX: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Per-voxel check that X restricted to the observed rows has full column rank.

    Uses the eigenvalues (smallest relative to largest) of X'X with its columns scaled to
    unit length, ``S X'X S`` with ``S = diag(X'X)^-1/2``, so it is vectorised and units do not
    decide the rank: head size in mm^3 next to an intercept, or age cubed, is as full rank as
    the same column in litres (the criterion of ``checks.dependent_column``).  A column that
    is zero on the observed rows is rank deficient.
    """
    ok = (np.diagonal(XtX, axis1=-2, axis2=-1) > 0).all(axis=-1)
    w = np.linalg.eigvalsh(unit_scaled(XtX))
    return ok & (w[..., 0] > rtol * w[..., -1]) & (w[..., -1] > 0)
