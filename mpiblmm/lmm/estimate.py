"""The estimator's driver: screen voxels, chunk them by memory, fit, assemble a FitResult.

``fit`` is the one public entry point of the estimator.  Each chunk of voxels is fitted as
the random-effects structure's algebra fits it (``pf.algebra.fit_chunk``,
:mod:`~mpiblmm.lmm.structures`): one factor and the dense layout by Fisher Scoring then the
theta polish (:mod:`~mpiblmm.lmm.scoring`), the blocked layout by Newton in theta
(:mod:`~mpiblmm.lmm.blocked.newton`).  ``fit`` reports per voxel ``beta`` (with the centring
offset added back), ``s2``, ``D_k`` (relative; ``FitResult.cov`` gives lme4's ``VarCorr``),
lme4's ``logLik``, iterations and a status code (:data:`~mpiblmm.lmm.model.STATUS_CODES`).

Screening happens before any fit, so one voxel's trouble never reaches another: no
observations (6), ``n <= p`` (3), non-finite product forms (5), rank-deficient ``X`` on the
observed rows (4), data that are constant after the fixed effects (7,
:func:`constant_data`).  A voxel whose algebra fails during the fit gets 5; the others are
unaffected (:func:`~mpiblmm.lmm.fisher.evaluate` isolates failures).

One budget of ``max_iterations`` and one ``tolerance`` bound a voxel's whole fit: the polish
gets what Fisher Scoring left, and a voxel stopped by the budget gets status 1.
"""

from __future__ import annotations

import numpy as np

from .model import (
    STATUS_CONSTANT, STATUS_CONVERGED, STATUS_EMPTY, STATUS_MAX_ITER, STATUS_NUMERICAL,
    STATUS_RANK_DEFICIENT, STATUS_SINGULAR, STATUS_TOO_FEW, FitResult, ProductForms,
)
from .products import full_rank
from .products import CONSTANT_RTOL_FLOAT32
from .theta import D_from_theta, is_singular, n_theta


#: Residual RMS, relative to the data's RMS, below which a voxel's data count as constant,
#: where product forms do not say (their ``rtol_constant``): float32 data's.
CONSTANT_RTOL = CONSTANT_RTOL_FLOAT32

#: Default ``tolerance``: a voxel stops when its log-likelihood changes by less than this.
DEFAULT_TOLERANCE = 1e-12

#: Default iteration cap of a voxel's whole fit (Fisher Scoring + polish; before the cap
#: covered both, they had 200 and 100 of their own).
DEFAULT_MAX_ITERATIONS = 300

#: Default memory budget of one chunk of voxels (bytes).
DEFAULT_MEMORY = 512 * 2**20


def bytes_per_voxel(pf: ProductForms) -> int:
    """A generous estimate of the working memory one voxel needs inside a fit (the
    structure's algebra knows its arrays)."""
    return pf.algebra.fit_bytes_per_voxel(pf.p)


def constant_data(pf: ProductForms, rtol: float | None = None) -> np.ndarray:
    """Voxels whose observed data are constant after the fixed effects (v,) bool.

    With centred products (``y_offset`` = the OLS fit ``b0``), ``Y'Y`` is the residual sum of
    squares ``RSS`` and the uncentred sum of squares is ``b0' X'X b0 + RSS``; the data are
    constant when ``RSS <= rtol^2 (b0' X'X b0 + RSS)`` (zero data included).  Measured
    against the data's own size, not their variance, because rounding (float32 input) is
    relative to the size.  ``rtol``: each voxel's ``pf.rtol_constant`` (by its data's
    precision), else :data:`CONSTANT_RTOL`.  Uncentred products carry no such split:
    nothing is flagged.
    """
    if rtol is None:
        rtol = CONSTANT_RTOL if pf.rtol_constant is None else pf.rtol_constant
    if pf.y_offset is None:
        return np.zeros(pf.n_voxels, dtype=bool)
    b0 = np.where(np.isfinite(pf.y_offset), pf.y_offset, 0.0)
    XtX = np.where(np.isfinite(pf.XtX), pf.XtX, 0.0)
    XtX = np.broadcast_to(XtX, (pf.n_voxels,) + XtX.shape[1:])
    fitted_ss = np.einsum("vi,vij,vj->v", b0, XtX, b0)
    return pf.YtY <= rtol * rtol * (fitted_ss + pf.YtY)


def screen(pf: ProductForms) -> np.ndarray:
    """Status before fitting: -1 for voxels to fit, else the code saying why not."""
    v, p = pf.n_voxels, pf.p
    status = np.full(v, -1, dtype=np.int64)

    def per_voxel(a: np.ndarray) -> np.ndarray:
        ok = np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
        return np.broadcast_to(ok, (v,)) if a.shape[0] == 1 else ok

    finite = np.ones(v, dtype=bool)
    for a in (pf.XtX, pf.XtY, pf.YtY[:, None], pf.ZtX, pf.ZtY, pf.ZtZ):
        finite &= per_voxel(a)
    if pf.y_offset is not None:
        finite &= per_voxel(pf.y_offset)
    XtX = np.where(np.isfinite(pf.XtX), pf.XtX, 0.0)
    rank_ok = np.broadcast_to(full_rank(XtX), (v,))
    status[constant_data(pf)] = STATUS_CONSTANT
    status[~rank_ok] = STATUS_RANK_DEFICIENT
    status[~finite] = STATUS_NUMERICAL
    status[pf.n <= p] = STATUS_TOO_FEW
    status[pf.n <= 0] = STATUS_EMPTY
    return status


def _fit_chunk(pf: ProductForms, method: str, tolerance: float, max_iterations: int,
               polish_mode: str) -> dict:
    """One chunk, fitted as the structure's algebra fits it (within one budget of
    ``max_iterations`` per voxel): a dict of per-voxel ``theta``, ``llh``, ``beta``, ``s2``,
    ``XtViX``, ``fs_iterations``, ``polish_iterations`` and ``converged``."""
    return pf.algebra.fit_chunk(pf, method, tolerance, max_iterations, polish_mode)


def fit(pf: ProductForms, method: str = "REML", tolerance: float = DEFAULT_TOLERANCE,
        max_iterations: int = DEFAULT_MAX_ITERATIONS, polish: str = "auto",
        memory_budget: int = DEFAULT_MEMORY) -> FitResult:
    """Fit the voxel-wise LMM by (RE)ML to every voxel of ``pf``.

    Parameters
    ----------
    pf
        Product forms of ``v`` voxels (shared or per-voxel design products).
    method
        ``"REML"`` (default, as lme4) or ``"ML"``.
    tolerance
        Fisher Scoring and the polish stop a voxel when its log-likelihood changes by less
        than this.
    max_iterations
        Iteration cap of the whole fit of a voxel, Fisher Scoring and polish together; a
        voxel stopped by it (or that needed the polish when Fisher Scoring had spent it) gets
        status 1.
    polish
        Which voxels the theta polish (:mod:`~mpiblmm.lmm.polish`) refines: ``"auto"``
        (default: voxels with a nearly singular ``D_k`` and those Fisher Scoring could not
        finish), ``"all"`` or ``"none"``.
    memory_budget
        Bytes of working memory for one chunk of voxels (see :func:`bytes_per_voxel`).

    Returns
    -------
    FitResult
        NaN parameters where not fitted.  ``extras``: ``XtViX`` (v, p, p) at the estimate,
        ``theta`` (v, n_theta) lme4's theta, ``converged`` and ``singular`` (v,) bool,
        ``fs_iterations`` and ``polish_iterations`` (v,).
    """
    if method not in ("REML", "ML"):
        raise ValueError(f"method must be 'REML' or 'ML', not {method!r}")
    if polish not in ("auto", "all", "none"):
        raise ValueError(f"polish must be 'auto', 'all' or 'none', not {polish!r}")
    st, v, p = pf.structure, pf.n_voxels, pf.p
    m = n_theta(st)
    status = screen(pf)
    todo = np.flatnonzero(status < 0)
    theta = np.full((v, m), np.nan)
    llh = np.full(v, np.nan)
    beta = np.full((v, p), np.nan)
    s2 = np.full(v, np.nan)
    XtViX = np.full((v, p, p), np.nan)
    fs_it = np.zeros(v, dtype=np.int64)
    pol_it = np.zeros(v, dtype=np.int64)
    converged = np.zeros(v, dtype=bool)
    chunk = max(1, int(memory_budget // bytes_per_voxel(pf)))
    for start in range(0, todo.size, chunk):
        idx = todo[start:start + chunk]
        out = _fit_chunk(pf.subset(idx), method, tolerance, max_iterations, polish)
        theta[idx], llh[idx], beta[idx], s2[idx] = out["theta"], out["llh"], out["beta"], out["s2"]
        XtViX[idx] = out["XtViX"]
        fs_it[idx], pol_it[idx] = out["fs_iterations"], out["polish_iterations"]
        converged[idx] = out["converged"]
    if pf.y_offset is not None:
        beta = beta + pf.y_offset                    # undo the centring (products.py)
    fitted = np.zeros(v, dtype=bool)
    fitted[todo] = True
    failed = fitted & ~(np.isfinite(llh) & np.isfinite(s2) & np.isfinite(beta).all(axis=1))
    singular = fitted & ~failed & is_singular(np.nan_to_num(theta, nan=1.0), st)
    status[fitted] = STATUS_CONVERGED
    status[singular] = STATUS_SINGULAR
    status[fitted & ~converged] = STATUS_MAX_ITER
    status[failed] = STATUS_NUMERICAL
    bad = ~fitted | failed
    for a in (theta, llh, beta, s2, XtViX):
        a[bad] = np.nan
    D = D_from_theta(np.nan_to_num(theta), st)
    D = tuple(np.where(bad[:, None, None], np.nan, Dk) for Dk in D)
    return FitResult(
        beta=beta, s2=s2, D=D, llh=llh, iterations=fs_it + pol_it, status=status,
        method=method,
        extras=dict(XtViX=XtViX, theta=theta, converged=converged & ~bad, singular=singular,
                    fs_iterations=fs_it, polish_iterations=pol_it),
    )
