"""Satterthwaite degrees of freedom in lmerTest's parameterisation, vectorised over voxels.

lmerTest's variance parameters are ``varpar = (theta, sigma)``: ``theta`` lists the lower
triangles of the Cholesky factors ``Lambda_k`` of the relative covariances
``D_k = Lambda_k Lambda_k'`` (column by column, factor after factor; see :mod:`.theta`) and
``sigma = sqrt(s2)``.  For a contrast row ``l`` (length ``p``):

- ``S2(varpar) = l Cov(beta) l'`` with ``Cov(beta) = s2 (X'V^-1 X)^-1 = s2 A``        (1)
- ``g = dS2/dvarpar`` through the Jacobian ``J_i = dCov(beta)/dvarpar_i``:            (2)
  ``dCov/dsigma = 2 sigma A``; for ``W_kj = Z_kj'V^-1 X``, ``B_kj = A W_kj'`` (p x q_k)
  and ``C_kj = B_kj Lambda_k``, the entry ``(r, c)`` of ``Lambda_k`` gives
  ``dCov/dLambda_k,rc = s2 sum_j [B_kj[:, r] C_kj[:, c]' + C_kj[:, c] B_kj[:, r]']``
  (from ``dCov/dD_k,ab = s2 sum_j B_kj[:, a] B_kj[:, b]'`` and ``dD = dLambda Lambda' +
  Lambda dLambda'``).
- ``Avp = 2 H^+``, ``H`` the Hessian of the deviance ``-2 l(theta, sigma)`` with ``beta`` at
  its GLS value for ``theta`` (REML deviance for REML fits, ML for ML fits), ``H^+`` the
  pseudo-inverse over its positive eigenvalues (lmerTest drops eigenvalues below 1e-8; we
  apply that threshold after scaling the sigma row and column by sigma, so the result does not
  depend on the units of Y and equals lmerTest's whenever the Hessian is well conditioned). (3)
- ``df = 2 S2^2 / (g' Avp g)``                                                          (4)

``H`` is the central finite difference (with one Richardson extrapolation) of the analytic
gradient of the deviance (5):
``dDev/ds2 = m/s2 - e'V^-1e/s2^2`` (m = n for ML, n - p for REML), ``dDev/dsigma = 2 sigma
dDev/ds2``; ``dDev/dD_k = sum_j [R_kjkj - u_kj u_kj'/s2]`` (REML: ``- sum_j W_kj A W_kj'``),
with ``u = Z'V^-1 e``, ``R = Z'V^-1 Z``; ``dDev/dLambda_k = 2 (dDev/dD_k) Lambda_k``.

At a singular fit a column of ``Lambda_k`` that is zero makes its theta entries drop out of
(2) (``S2`` depends on them only through their squares), exactly as in lmerTest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .likelihood import gls, vinv_products
from .model import ProductForms, RandomStructure
from .theta import lambdas_from_theta, n_theta, theta_from_D, theta_slices, tril_indices

# lmerTest's threshold on the eigenvalues of the deviance Hessian (kept when above it).
HESSIAN_EIG_TOL = 1e-8
# Tolerance under which per-direction F df count as equal (lmerTest: then their mean).
F_DF_EQUAL_TOL = 1e-8


@dataclass(frozen=True)
class Precomputed:
    """What every contrast at a set of voxels needs (voxel axis first, NaN where not fitted).

    Attributes
    ----------
    cov_beta
        (v, p, p) ``Cov(beta) = s2 (X'V^-1 X)^-1``.
    jacobian
        (v, m, p, p) ``dCov(beta)/dvarpar_i``, ``varpar = (theta, sigma)``, ``m = n_theta + 1``.
    vcov_varpar
        (v, m, m) ``2 H^+``, the asymptotic covariance of ``varpar``.
    fitted
        (v,) bool, voxels that hold a fit; all other arrays are NaN elsewhere.
    method
        "REML" or "ML": the deviance whose Hessian gave ``vcov_varpar``.
    """

    cov_beta: np.ndarray
    jacobian: np.ndarray
    vcov_varpar: np.ndarray
    fitted: np.ndarray
    method: str

    @property
    def n_voxels(self) -> int:
        return int(self.cov_beta.shape[0])


# ---------------------------------------------------------------- per-level blocks
def _factor_blocks(vp, structure: RandomStructure, k: int):
    """Diagonal blocks ``R_kjkj`` (v, l, q_k, q_k) and ``W_kj`` (v, l, q_k, p) of factor k."""
    f, sl = structure.factors[k], structure.slices()[k]
    v, p = vp.ZtViX.shape[0], vp.ZtViX.shape[2]
    W = vp.ZtViX[:, sl].reshape(v, f.n_levels, f.n_effects, p)
    if structure.is_single_factor:
        R = vp.ZtViZ
    else:
        R5 = vp.ZtViZ[:, sl, sl].reshape(v, f.n_levels, f.n_effects, f.n_levels, f.n_effects)
        R = np.einsum("vjajb->vjab", R5)
    return R, W


def _split(varpar: np.ndarray, structure: RandomStructure):
    theta, sigma = varpar[:, :-1], varpar[:, -1]
    return lambdas_from_theta(theta, structure), sigma


def _inv_sym(M: np.ndarray) -> np.ndarray:
    """Inverse of a stack of SPD matrices, symmetrised."""
    Minv = np.linalg.inv(M)
    return 0.5 * (Minv + np.swapaxes(Minv, -1, -2))


# ---------------------------------------------------------------- deviance derivatives
def deviance_gradient(pf: ProductForms, varpar: np.ndarray, method: str) -> np.ndarray:
    """Gradient (v, m) of the deviance ``-2 l`` at ``varpar = (theta, sigma)`` (eq. 5).

    ``beta`` is at its GLS value for ``theta`` (lmerTest's deviance for both ML and REML).
    """
    st = pf.structure
    lambdas, sigma = _split(varpar, st)
    s2 = sigma ** 2
    vp = vinv_products(pf, lambdas, need_z=True)
    beta, ete = gls(vp)
    dof = pf.n - pf.p if method == "REML" else pf.n
    grad = np.empty_like(varpar, dtype=np.float64)
    grad[:, -1] = 2.0 * sigma * (dof / s2 - ete / s2 ** 2)          # chain rule s2 = sigma^2
    u = vp.ZtViY - np.einsum("vqp,vp->vq", vp.ZtViX, beta)          # Z'V^-1 e
    A = _inv_sym(vp.XtViX) if method == "REML" else None
    v = varpar.shape[0]
    for k, (f, tsl, lam) in enumerate(zip(st.factors, theta_slices(st), lambdas)):
        R, W = _factor_blocks(vp, st, k)
        uk = u[:, st.slices()[k]].reshape(v, f.n_levels, f.n_effects)
        G = R.sum(axis=1) - np.einsum("vja,vjb->vab", uk, uk) / s2[:, None, None]
        if A is not None:                                           # REML: - sum_j W A W'
            G = G - np.einsum("vjap,vpq,vjbq->vab", W, A, W)
        dlam = 2.0 * G @ lam                                        # dDev/dLambda_k
        rows, cols = tril_indices(f.n_effects)
        grad[:, tsl] = dlam[:, rows, cols]
    return grad


def fd_steps(varpar: np.ndarray, rel_step: float = 1e-4) -> np.ndarray:
    """Finite-difference steps (v, m): relative to sigma; relative to theta, floored at 0.1."""
    h = rel_step * np.maximum(np.abs(varpar), 0.1)
    h[:, -1] = rel_step * np.abs(varpar[:, -1])
    return h


def deviance_hessian(pf: ProductForms, varpar: np.ndarray, method: str,
                     rel_step: float = 1e-4) -> np.ndarray:
    """Observed Hessian (v, m, m) of the deviance at ``varpar`` (lmerTest's ``H``).

    Central differences of the analytic gradient at steps ``h`` and ``h/2`` combined by
    Richardson extrapolation, ``(4 D(h/2) - D(h)) / 3`` (error O(h^4)); then symmetrised.
    """
    v, m = varpar.shape
    h = fd_steps(varpar, rel_step)
    H = np.empty((v, m, m))
    for i in range(m):
        cols = []
        for step in (h[:, i], 0.5 * h[:, i]):
            plus, minus = varpar.copy(), varpar.copy()
            plus[:, i] += step
            minus[:, i] -= step
            diff = deviance_gradient(pf, plus, method) - deviance_gradient(pf, minus, method)
            cols.append(diff / (2.0 * step[:, None]))
        H[:, :, i] = (4.0 * cols[1] - cols[0]) / 3.0
    return 0.5 * (H + np.swapaxes(H, 1, 2))


def covbeta_jacobian(pf: ProductForms, varpar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Cov(beta)`` (v, p, p) and its Jacobian (v, m, p, p) in ``varpar`` (eqs. 1-2)."""
    st = pf.structure
    lambdas, sigma = _split(varpar, st)
    s2 = sigma ** 2
    vp = vinv_products(pf, lambdas, need_z=True)
    A = _inv_sym(vp.XtViX)
    v, m, p = varpar.shape[0], varpar.shape[1], pf.p
    J = np.empty((v, m, p, p))
    J[:, -1] = 2.0 * sigma[:, None, None] * A
    for k, (f, tsl, lam) in enumerate(zip(st.factors, theta_slices(st), lambdas)):
        _, W = _factor_blocks(vp, st, k)
        B = np.einsum("vpq,vjaq->vjpa", A, W)                        # A W_kj'
        C = B @ lam[:, None]                                         # A W_kj' Lambda_k
        M = np.einsum("vjar,vjbc->varbc", B, C)                      # sum_j B[:, r] C[:, c]'
        rows, cols = tril_indices(f.n_effects)
        for t, (r, c) in enumerate(zip(rows, cols)):
            Mrc = M[:, :, r, :, c]
            J[:, tsl.start + t] = s2[:, None, None] * (Mrc + np.swapaxes(Mrc, 1, 2))
    return s2[:, None, None] * A, J


def varpar_covariance(H: np.ndarray, sigma: np.ndarray,
                      tol: float = HESSIAN_EIG_TOL) -> np.ndarray:
    """``2 H^+`` over the positive eigenvalues of ``H`` (eq. 3), in sigma-scaled coordinates."""
    scale = np.ones(H.shape[:2])
    scale[:, -1] = sigma
    Hs = H * scale[:, :, None] * scale[:, None, :]
    w, U = np.linalg.eigh(Hs)
    keep = w > tol
    winv = np.where(keep, 1.0 / np.where(keep, w, 1.0), 0.0)
    Hplus = np.einsum("vij,vj,vkj->vik", U, winv, U)
    return 2.0 * Hplus * scale[:, :, None] * scale[:, None, :]


# ---------------------------------------------------------------- setup and df
def satterthwaite_setup(
    pf: ProductForms,
    s2: np.ndarray,
    D: tuple[np.ndarray, ...],
    method: str,
    fitted: np.ndarray | None = None,
    theta: np.ndarray | None = None,
    rel_step: float = 1e-4,
) -> Precomputed:
    """Everything contrasts need at the estimates of ``v`` voxels.

    Parameters
    ----------
    pf
        Product forms of the voxels (as fitted).
    s2
        (v,) residual variance estimates.
    D
        Relative covariances ``D_k`` (v, q_k, q_k) per factor (``VarCorr / s2``).
    method
        "REML" or "ML": the criterion of the fit, whose deviance Hessian is used.
    fitted
        (v,) bool, voxels that hold a fit (default: all).  Others, and any voxel with
        non-finite estimates, are skipped and get NaN.
    theta
        Optional (v, n_theta) lme4 theta; by default the Cholesky factors of ``D`` (lme4's
        convention, zeros at the boundary).
    """
    if method not in ("REML", "ML"):
        raise ValueError(f"method must be 'REML' or 'ML', got {method!r}")
    st = pf.structure
    v, p, m = pf.n_voxels, pf.p, n_theta(st) + 1
    s2 = np.asarray(s2, dtype=np.float64)
    if theta is None:
        theta = theta_from_D(tuple(np.asarray(d, dtype=np.float64) for d in D), st)
    ok = np.ones(v, bool) if fitted is None else np.asarray(fitted, bool).copy()
    ok &= np.isfinite(s2) & (s2 > 0) & np.isfinite(theta).all(axis=1)
    cov = np.full((v, p, p), np.nan)
    J = np.full((v, m, p, p), np.nan)
    Avp = np.full((v, m, m), np.nan)
    idx = np.flatnonzero(ok)
    if idx.size:
        sub = pf.take(idx)
        varpar = np.concatenate([theta[idx], np.sqrt(s2[idx])[:, None]], axis=1)
        cov[idx], J[idx] = covbeta_jacobian(sub, varpar)
        H = deviance_hessian(sub, varpar, method, rel_step)
        Avp[idx] = varpar_covariance(H, varpar[:, -1])
    return Precomputed(cov_beta=cov, jacobian=J, vcov_varpar=Avp, fitted=ok, method=method)


def contrast_variance_df(pre: Precomputed, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``S2 = l Cov l'`` and its Satterthwaite df (eq. 4) for one row per voxel.

    ``rows`` is (p,) (the same contrast everywhere) or (v, p).  A zero gradient gives
    ``df = inf`` (as lmerTest); voxels not fitted give NaN.
    """
    rows = np.broadcast_to(rows, pre.cov_beta.shape[:2])
    var = np.einsum("vp,vpq,vq->v", rows, pre.cov_beta, rows)
    g = np.einsum("vp,vmpq,vq->vm", rows, pre.jacobian, rows)
    denom = np.einsum("vm,vmn,vn->v", g, pre.vcov_varpar, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, 2.0 * var ** 2 / np.where(denom > 0, denom, 1.0), np.inf)
    df = np.where(np.isfinite(var), df, np.nan)
    return var, df


def combine_f_df(nu: np.ndarray) -> np.ndarray:
    """lmerTest's denominator df of an F test from per-direction df ``nu`` (v, r).

    ``r = 1``: ``nu``.  All equal (within 1e-8): their mean.  Any ``nu_i <= 2``: 2.
    Otherwise ``E = sum nu_i / (nu_i - 2)`` and ``2 E / (E - r)``.  An infinite ``nu_i``
    contributes its limit 1 to ``E``.  NaN in, NaN out.
    """
    v, r = nu.shape
    if r == 1:
        return nu[:, 0].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isinf(nu), 1.0, nu / (nu - 2.0))
        E = ratio.sum(axis=1)
        out = 2.0 * E / (E - r)
    out = np.where((nu <= 2.0).any(axis=1), 2.0, out)
    equal = (np.abs(np.diff(nu, axis=1)) < F_DF_EQUAL_TOL).all(axis=1)
    out = np.where(equal, nu.mean(axis=1), out)
    return np.where(np.isnan(nu).any(axis=1), np.nan, out)
