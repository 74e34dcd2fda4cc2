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

The gradient of the deviance (5):
``dDev/ds2 = m/s2 - e'V^-1e/s2^2`` (m = n for ML, n - p for REML), ``dDev/dsigma = 2 sigma
dDev/ds2``; ``dDev/dD_k = sum_j [R_kjkj - u_kj u_kj'/s2]`` (REML: ``- sum_j W_kj A W_kj'``),
with ``u = Z'V^-1 e``, ``R = Z'V^-1 Z``; ``dDev/dLambda_k = 2 (dDev/dD_k) Lambda_k``.
``H`` is exact (6, see :func:`deviance_hessian`): second derivatives of ``log|V|``,
``log|X'V^-1X|`` (REML) and ``e'V^-1e / s2`` at the GLS beta in theta, through
``dD_k/dtheta_t = E_rc Lambda_k' + Lambda_k E_cr`` and its (constant) second derivative, from
one evaluation of the V^-1 products; finite differences of (5) check it in the tests.

At a singular fit a column of ``Lambda_k`` that is zero makes its theta entries drop out of
(2) (``S2`` depends on them only through their squares), exactly as in lmerTest.

:func:`satterthwaite_setup` gets ``Cov(beta)``, ``J`` and ``H`` from the structure's algebra
(``pf.algebra.satterthwaite``, :mod:`~mpiblmm.lmm.structures`): one factor from level sums,
the blocked path by finite differences of blocked evaluations, the dense layout by the exact
formulas here, whose sums over level pairs (the diagonal blocks of ``Z'V^-1Z`` and the pair
tensor) the algebra provides too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .likelihood import gls, vinv_products
from .model import ProductForms, RandomStructure
from .rowwise import voxel_sum
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
def _factor_blocks(vp, pf: ProductForms, k: int):
    """Diagonal blocks ``R_kjkj`` (v, l, q_k, q_k) and ``W_kj`` (v, l, q_k, p) of factor k."""
    st = pf.structure
    f, sl = st.factors[k], st.slices()[k]
    v, p = vp.ZtViX.shape[0], vp.ZtViX.shape[2]
    W = vp.ZtViX[:, sl].reshape(v, f.n_levels, f.n_effects, p)
    return pf.algebra.diagonal_blocks(vp, k), W


def level_sum(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``sum_j X_j (x) Y_j`` for X (v, l, *a), Y (v, l, *b): (v, *a, *b), one batched matmul."""
    v, l = X.shape[:2]
    out = np.swapaxes(X.reshape(v, l, -1), 1, 2) @ Y.reshape(Y.shape[0], l, -1)
    return out.reshape((out.shape[0],) + X.shape[2:] + Y.shape[2:])


def split_varpar(varpar: np.ndarray, structure: RandomStructure):
    theta, sigma = varpar[:, :-1], varpar[:, -1]
    return lambdas_from_theta(theta, structure), sigma


def inv_sym(M: np.ndarray) -> np.ndarray:
    """Inverse of a stack of SPD matrices, symmetrised."""
    Minv = np.linalg.inv(M)
    return 0.5 * (Minv + np.swapaxes(Minv, -1, -2))


# ---------------------------------------------------------------- deviance derivatives
def deviance_gradient(pf: ProductForms, varpar: np.ndarray, method: str) -> np.ndarray:
    """Gradient (v, m) of the deviance ``-2 l`` at ``varpar = (theta, sigma)`` (eq. 5).

    ``beta`` is at its GLS value for ``theta`` (lmerTest's deviance for both ML and REML).
    """
    st = pf.structure
    lambdas, sigma = split_varpar(varpar, st)
    s2 = sigma ** 2
    vp = vinv_products(pf, lambdas, need_z=True)
    beta, ete = gls(vp)
    dof = pf.n - pf.p if method == "REML" else pf.n
    grad = np.empty_like(varpar, dtype=np.float64)
    grad[:, -1] = 2.0 * sigma * (dof / s2 - ete / s2 ** 2)          # chain rule s2 = sigma^2
    u = vp.ZtViY - np.einsum("vqp,vp->vq", vp.ZtViX, beta)          # Z'V^-1 e
    A = inv_sym(vp.XtViX) if method == "REML" else None
    v = varpar.shape[0]
    for k, (f, tsl, lam) in enumerate(zip(st.factors, theta_slices(st), lambdas)):
        R, W = _factor_blocks(vp, pf, k)
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


def deviance_hessian_fd(pf: ProductForms, varpar: np.ndarray, method: str,
                        rel_step: float = 1e-4) -> np.ndarray:
    """Hessian (v, m, m) of the deviance by finite differences of its analytic gradient.

    An independent check of :func:`deviance_hessian` (17 V^-1 evaluations for 4 parameters
    instead of one).  Central differences of the analytic gradient at steps ``h`` and ``h/2`` combined by
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


def lambda_directions(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``F_t = dD_k/dtheta_t = E_rc Lambda' + Lambda E_cr`` (v, n_t, q, q) and the (r, c) of t."""
    v, q, _ = lam.shape
    rows, cols = tril_indices(q)
    F = np.zeros((v, rows.size, q, q))
    for t, (r, c) in enumerate(zip(rows, cols)):
        F[:, t, r, :] += lam[:, :, c]
        F[:, t, :, r] += lam[:, :, c]
    return F, rows, cols


def second_direction_trace(M: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``tr(M d2D/dtheta_t dtheta_u)`` (v, n_t, n_t): ``d2D = [c = c'] (E_rr' + E_r'r)``."""
    Ms = M + np.swapaxes(M, -1, -2)
    same_col = (cols[:, None] == cols[None, :]).astype(float)
    return Ms[:, rows[:, None], rows[None, :]] * same_col


def deviance_hessian(pf: ProductForms, varpar: np.ndarray, method: str,
                     vp=None) -> np.ndarray:
    """Exact Hessian (v, m, m) of the deviance at ``varpar = (theta, sigma)`` (lmerTest's H, eq. 6).

    With ``V_t = dV/dtheta_t = sum_j Z_kj F_t Z_kj'``, ``V_tu`` its second derivative,
    ``Q = e'V^-1 e`` at the GLS beta and ``A = (X'V^-1 X)^-1``:

    - ``d2/dt du [log|V|] = tr(V^-1 V_tu) - tr(V^-1 V_u V^-1 V_t)``
    - REML ``d2/dt du [log|X'V^-1X|] = -tr(A Q_u A Q_t) + 2 tr(A X'V^-1 V_u V^-1 V_t V^-1 X)
      - tr(A X'V^-1 V_tu V^-1 X)``, ``Q_t = X'V^-1 V_t V^-1 X``
    - ``d2/dt du [Q] = 2 e'V^-1 V_u V^-1 V_t V^-1 e - 2 w_u' A w_t - e'V^-1 V_tu V^-1 e``,
      ``w_t = X'V^-1 V_t V^-1 e`` (the second term is beta moving with theta)
    - sigma: ``Dev = m log sigma^2 + Q / sigma^2 + ...``.

    Every trace is a sum over level pairs of the blocks of ``Z'V^-1Z``, ``Z'V^-1X``,
    ``Z'V^-1e``: one evaluation of the V^-1 products in all (``vp``, computed when not given).
    """
    st = pf.structure
    lambdas, sigma = split_varpar(varpar, st)
    s2 = sigma ** 2
    if vp is None:
        vp = vinv_products(pf, lambdas, need_z=True)
    beta, Q = gls(vp)
    reml = method == "REML"
    dof = pf.n - pf.p if reml else pf.n
    A = inv_sym(vp.XtViX)
    u = vp.ZtViY - np.einsum("vqp,vp->vq", vp.ZtViX, beta)
    v, m = varpar.shape
    K = len(st.factors)
    H = np.zeros((v, m, m))
    F, W, U, tsl = [], [], [], theta_slices(st)
    for k, (f, sl, lam) in enumerate(zip(st.factors, st.slices(), lambdas)):
        Fk, rows, cols = lambda_directions(lam)
        F.append((Fk, rows, cols))
        W.append(_factor_blocks(vp, pf, k)[1])
        U.append(u[:, sl].reshape(v, f.n_levels, f.n_effects))
    # w_t = sum_j W_j' F_t u_j (v, n_t, p); Q_t = sum_j W_j' F_t W_j (v, n_t, p, p)
    w = [np.einsum("vapb,vtab->vtp", level_sum(W[k], U[k]), F[k][0]) for k in range(K)]
    Qt = ([np.einsum("vapbq,vtab->vtpq", level_sum(W[k], W[k]), F[k][0]) for k in range(K)]
          if reml else None)
    for k in range(K):
        Fk, rows, cols = F[k]
        R_kk, _ = _factor_blocks(vp, pf, k)
        # Terms in V_tu (same factor only): tr(S_tu M) for M = sum_j R_jj, W A W', u u'/s2.
        M = R_kk.sum(axis=1) - level_sum(U[k], U[k]) / s2[:, None, None]
        if reml:
            M = M - np.einsum("vapbq,vpq->vab", level_sum(W[k], W[k]), A)
        H[:, tsl[k], tsl[k]] += second_direction_trace(M, rows, cols)
        for k2 in range(K):
            T = pf.algebra.pair_tensor(vp, k, k2, U[k], U[k2], W[k], W[k2],
                                       A if reml else None, s2)
            H[:, tsl[k], tsl[k2]] += np.einsum("vtab,vucd,vabcd->vtu", Fk, F[k2][0], T)
    # beta moving with theta, and tr(A Q_u A Q_t) (REML)
    wall = np.concatenate(w, axis=1)
    nt = wall.shape[1]
    H[:, :nt, :nt] -= 2.0 * np.einsum("vtp,vpq,vuq->vtu", wall, A, wall) / s2[:, None, None]
    if reml:
        Qall = np.concatenate(Qt, axis=1)
        AQ = np.einsum("vpq,vtqr->vtpr", A, Qall)
        H[:, :nt, :nt] -= np.einsum("vtpr,vurp->vtu", AQ, AQ)
    # sigma: d2/dsigma2 = -2 m/sigma^2 + 6 Q/sigma^4; d2/dsigma dtheta_t = 2 e'V^-1V_tV^-1e/sigma^3
    eVte = np.concatenate([np.einsum("vab,vtab->vt", level_sum(U[k], U[k]), F[k][0])
                           for k in range(K)], axis=1)
    H[:, -1, -1] = -2.0 * dof / s2 + 6.0 * Q / s2 ** 2
    H[:, :nt, -1] = H[:, -1, :nt] = 2.0 * eVte / sigma[:, None] ** 3
    return 0.5 * (H + np.swapaxes(H, 1, 2))


def covbeta_jacobian(pf: ProductForms, varpar: np.ndarray,
                     vp=None) -> tuple[np.ndarray, np.ndarray]:
    """``Cov(beta)`` (v, p, p) and its Jacobian (v, m, p, p) in ``varpar`` (eqs. 1-2).

    ``vp``: the V^-1 products at ``varpar`` (with Z), computed when not given.
    """
    st = pf.structure
    lambdas, sigma = split_varpar(varpar, st)
    s2 = sigma ** 2
    if vp is None:
        vp = vinv_products(pf, lambdas, need_z=True)
    A = inv_sym(vp.XtViX)
    v, m, p = varpar.shape[0], varpar.shape[1], pf.p
    J = np.empty((v, m, p, p))
    J[:, -1] = 2.0 * sigma[:, None, None] * A
    for k, (f, tsl, lam) in enumerate(zip(st.factors, theta_slices(st), lambdas)):
        _, W = _factor_blocks(vp, pf, k)
        B = np.swapaxes(W @ A[:, None], 2, 3)                         # A W_kj' (v, l, p, q_k)
        C = B @ lam[:, None]                                         # A W_kj' Lambda_k
        M = level_sum(B, C)                                         # sum_j B[:, r] C[:, c]'
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
        sub = pf.subset(idx)
        varpar = np.concatenate([theta[idx], np.sqrt(s2[idx])[:, None]], axis=1)
        if idx.size == 1:
            # one voxel as two copies of itself: numpy's einsum reduces a voxel axis of
            # length one by another loop, whose last bits differ from the same voxel's among
            # others (structures/levels.py: _alone)
            parts = pf.algebra.satterthwaite(sub.take(np.array([0, 0])),
                                             np.repeat(varpar, 2, axis=0), method)
            cov[idx], J[idx], H = (a[:1] for a in parts)
        else:
            cov[idx], J[idx], H = pf.algebra.satterthwaite(sub, varpar, method)
        Avp[idx] = varpar_covariance(H, varpar[:, -1])
    return Precomputed(cov_beta=cov, jacobian=J, vcov_varpar=Avp, fitted=ok, method=method)


def contrast_variance_df(pre: Precomputed, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``S2 = l Cov l'`` and its Satterthwaite df (eq. 4) for one row per voxel.

    ``rows`` is (p,) (the same contrast everywhere) or (v, p).  A zero gradient gives
    ``df = inf`` (as lmerTest); voxels not fitted give NaN, and so does a variance that
    rounding made non-positive (Cov(beta) is positive definite at any fit): no statistic
    where nothing could be estimated.
    """
    rows = np.broadcast_to(rows, pre.cov_beta.shape[:2])
    # the quadratic forms reduce over one contiguous axis: a voxel's bits in any company
    var = voxel_sum(rows[:, :, None] * pre.cov_beta * rows[:, None, :], 2)
    var = np.where(var > 0, var, np.nan)
    g = voxel_sum(rows[:, None, :, None] * pre.jacobian * rows[:, None, None, :], 2)
    denom = voxel_sum(g[:, :, None] * pre.vcov_varpar * g[:, None, :], 2)
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
