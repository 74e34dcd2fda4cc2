"""Satterthwaite quantities of the blocked path, as lmerTest computes them.

lmerTest differentiates numerically the deviance in ``varpar = (theta, sigma)`` (beta at its GLS
value) and ``Cov(beta) = sigma^2 A(theta)``, ``A = (X'V^-1X)^-1``.  With ``ld(theta) = log|V|
(+ log|X'V^-1X|`` for REML) and ``Q(theta) = e'V^-1e`` at the GLS beta, the deviance is
``dof log sigma^2 + ld + Q / sigma^2 + const`` (dof = n - p for REML, n for ML), so (6)

- ``H_tt = ld'' + Q'' / sigma^2``, ``H_t,sigma = -2 Q' / sigma^3``,
  ``H_sigma,sigma = -2 dof / sigma^2 + 6 Q / sigma^4``;
- ``dCov/dtheta_i = sigma^2 dA/dtheta_i``, ``dCov/dsigma = 2 sigma A``.

``Q'`` and ``dA/dtheta_i = -A (dX'V^-1X/dtheta_i) A`` are analytic (:mod:`.gradient`, one
evaluation with the Jacobian at ``theta``); ``ld''`` and ``Q''`` are central differences of
the analytic ``ld'`` and ``Q'`` at ``theta +- h_i e_i``, ``h_i = 1e-4 max(|theta_i|, 0.1)``
(error O(h^2) ~ 1e-8 relative, rounding ~ eps / h), symmetrised: ``1 + 2m`` evaluations with
gradient for ``m`` theta entries (the Richardson scheme on the deviance this replaces took
``2 (2m + m(m-1)) + 1``).
The output feeds :class:`~mpiblmm.lmm.satterthwaite.Precomputed` unchanged.
"""

from __future__ import annotations

import numpy as np

from ..model import ProductForms
from .cholesky import batches, prepare
from .gradient import evaluate

#: Central-difference step of the analytic gradient (relative to max(|theta_i|, 0.1)).
REL_STEP = 1e-4


def blocked_setup(pattern, pf: ProductForms, varpar: np.ndarray, method: str):
    """``Cov(beta)`` (v, p, p), its Jacobian (v, m+1, p, p) and the deviance Hessian
    (v, m+1, m+1) at ``varpar = (theta, sigma)`` (v, m+1), in cache-sized voxel batches
    (:func:`.cholesky.batches`)."""
    parts = [_setup(pattern, pf.take(idx), varpar[idx], method)
             for idx in batches(pattern, pf.p, pf.n_voxels)]
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))


def _setup(pattern, pf: ProductForms, varpar: np.ndarray, method: str):
    reml = method == "REML"
    theta, sigma = varpar[:, :-1], varpar[:, -1]
    s2 = sigma ** 2
    v, m = theta.shape
    p, n = pf.p, pf.n
    prep = prepare(pattern, pf)
    base = evaluate(pattern, prep, theta, method, jacobian=True)
    A0, Q0, dQ = base["A"], base["Q"], base["dQ"]
    # ld'' and Q'': central differences of the analytic first derivatives
    h = REL_STEP * np.maximum(np.abs(theta), 0.1)
    d2ld, d2Q = np.empty((v, m, m)), np.empty((v, m, m))
    for i in range(m):
        tp, tm = theta.copy(), theta.copy()
        tp[:, i] += h[:, i]
        tm[:, i] -= h[:, i]
        ep = evaluate(pattern, prep, tp, method)
        em = evaluate(pattern, prep, tm, method)
        den = (2.0 * h[:, i])[:, None]
        d2ld[:, :, i] = (ep["dld"] - em["dld"]) / den
        d2Q[:, :, i] = (ep["dQ"] - em["dQ"]) / den
    d2ld = 0.5 * (d2ld + np.swapaxes(d2ld, 1, 2))
    d2Q = 0.5 * (d2Q + np.swapaxes(d2Q, 1, 2))
    # dA/dtheta_i = -A (dX'V^-1X/dtheta_i) A, analytic
    dA = -np.matmul(np.matmul(A0[:, None], base["dXtViX"]), A0[:, None])
    dA = 0.5 * (dA + np.swapaxes(dA, 2, 3))
    dof = (n - p if reml else n).astype(float)
    H = np.empty((v, m + 1, m + 1))
    H[:, :m, :m] = d2ld + d2Q / s2[:, None, None]
    H[:, :m, m] = H[:, m, :m] = -2.0 * dQ / sigma[:, None] ** 3
    H[:, m, m] = -2.0 * dof / s2 + 6.0 * Q0 / s2 ** 2
    J = np.empty((v, m + 1, p, p))
    J[:, :m] = s2[:, None, None, None] * dA
    J[:, m] = 2.0 * sigma[:, None, None] * A0
    return s2[:, None, None] * A0, J, H
