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

from ..likelihood import gls, logdet_spd
from ..model import ProductForms
from .cholesky import batches, blocked_vinv, prepare
from .gradient import evaluate

#: The analytic scheme from this many theta entries on: every several-factor design.  The
#: Richardson scheme on the deviance (:func:`_richardson_setup`, 13 evaluations at m = 2) is
#: the tests' reference; it was as fast at m = 2 with cache-sized batches, and 1.3-1.6x
#: slower than the analytic one since the batches are ~96 MB (docs/ESTIMATOR.md).
ANALYTIC_FROM = 2
#: Central-difference step of the analytic gradient (relative to max(|theta_i|, 0.1)).
REL_STEP = 1e-4
#: Steps h and h/2 of the Richardson scheme on the deviance (the tests' reference).
RICHARDSON_STEP = 1e-2


def _pieces(pattern, pf: ProductForms, theta: np.ndarray, reml: bool):
    """``ld`` (v,), ``Q`` (v,) and ``A`` (v, p, p) at ``theta``."""
    vp = blocked_vinv(pattern, pf, theta)
    _, Q = gls(vp)
    ld = vp.logdetV + (logdet_spd(vp.XtViX) if reml else 0.0)
    A = np.linalg.inv(vp.XtViX)
    return ld, Q, 0.5 * (A + np.swapaxes(A, 1, 2))


def _derivatives(pattern, prep, theta: np.ndarray, h: np.ndarray, reml: bool, base):
    """Central differences at steps ``h`` (v, m): ``Q'`` (v, m), ``ld''``, ``Q''`` (v, m, m)
    and ``A'`` (v, m, p, p)."""
    ld0, Q0, _ = base
    v, m = theta.shape
    dQ, d2ld, d2Q = np.empty((v, m)), np.empty((v, m, m)), np.empty((v, m, m))
    dA = np.empty((v, m) + base[2].shape[1:])
    axis = {}
    for i in range(m):
        tp, tm = theta.copy(), theta.copy()
        tp[:, i] += h[:, i]
        tm[:, i] -= h[:, i]
        ldp, Qp, Ap = _pieces(pattern, prep, tp, reml)
        ldm, Qm, Am = _pieces(pattern, prep, tm, reml)
        axis[i] = (ldp + ldm, Qp + Qm)
        hi = h[:, i]
        dQ[:, i] = (Qp - Qm) / (2.0 * hi)
        d2ld[:, i, i] = (ldp - 2.0 * ld0 + ldm) / hi ** 2
        d2Q[:, i, i] = (Qp - 2.0 * Q0 + Qm) / hi ** 2
        dA[:, i] = (Ap - Am) / (2.0 * hi)[:, None, None]
    # mixed: [f(+i+j) + f(-i-j) - f(+-i) - f(+-j) + 2 f] / (2 h_i h_j), O(h^2) like the
    # four-point formula (so Richardson applies), with two evaluations instead of four
    for i in range(m):
        for j in range(i):
            tp, tm = theta.copy(), theta.copy()
            tp[:, i] += h[:, i]
            tp[:, j] += h[:, j]
            tm[:, i] -= h[:, i]
            tm[:, j] -= h[:, j]
            plus = _pieces(pattern, prep, tp, reml)[:2]
            minus = _pieces(pattern, prep, tm, reml)[:2]
            den = 2.0 * h[:, i] * h[:, j]
            for k, (out, f0) in enumerate(((d2ld, ld0), (d2Q, Q0))):
                mixed = (plus[k] + minus[k] - axis[i][k] - axis[j][k] + 2.0 * f0) / den
                out[:, i, j] = out[:, j, i] = mixed
    return dQ, d2ld, d2Q, dA


def blocked_setup(pattern, pf: ProductForms, varpar: np.ndarray, method: str):
    """``Cov(beta)`` (v, p, p), its Jacobian (v, m+1, p, p) and the deviance Hessian
    (v, m+1, m+1) at ``varpar = (theta, sigma)`` (v, m+1), in voxel batches
    (:func:`.cholesky.batches`)."""
    run = _setup if varpar.shape[1] - 1 >= ANALYTIC_FROM else _richardson_setup
    parts = [run(pattern, pf.subset(idx), varpar[idx], method)
             for idx in batches(pattern, pf.p, pf.n_voxels)]
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))


def _setup(pattern, pf: ProductForms, varpar: np.ndarray, method: str):
    reml = method == "REML"
    theta, sigma = varpar[:, :-1], varpar[:, -1]
    v, m = theta.shape
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
    return _assemble(pf, reml, sigma, Q0, dQ, d2ld, d2Q, A0, dA)


def _richardson_setup(pattern, pf: ProductForms, varpar: np.ndarray, method: str):
    reml = method == "REML"
    theta, sigma = varpar[:, :-1], varpar[:, -1]
    h = RICHARDSON_STEP * np.maximum(np.abs(theta), 0.1)
    prep = prepare(pattern, pf)
    base = _pieces(pattern, prep, theta, reml)
    # Richardson: (4 D(h/2) - D(h)) / 3 cancels the h^2 error term of central differences
    coarse = _derivatives(pattern, prep, theta, h, reml, base)
    fine = _derivatives(pattern, prep, theta, 0.5 * h, reml, base)
    dQ, d2ld, d2Q, dA = ((4.0 * b - a) / 3.0 for a, b in zip(coarse, fine))
    ld0, Q0, A0 = base
    return _assemble(pf, reml, sigma, Q0, dQ, d2ld, d2Q, A0, dA)


def _assemble(pf: ProductForms, reml: bool, sigma, Q0, dQ, d2ld, d2Q, A0, dA):
    """``Cov(beta)``, its Jacobian and the deviance Hessian in ``(theta, sigma)`` from the
    theta derivatives of ``ld``, ``Q = e'V^-1e`` and ``A = (X'V^-1X)^-1``; the sigma ones
    are closed form: ``d = ld + Q / s2 + dof log s2`` (lmerTest's deviance)."""
    s2 = sigma ** 2
    v, m = dQ.shape
    p = pf.p
    dof = (pf.n - p if reml else pf.n).astype(float)
    H = np.empty((v, m + 1, m + 1))
    H[:, :m, :m] = d2ld + d2Q / s2[:, None, None]
    H[:, :m, m] = H[:, m, :m] = -2.0 * dQ / sigma[:, None] ** 3
    H[:, m, m] = -2.0 * dof / s2 + 6.0 * Q0 / s2 ** 2
    J = np.empty((v, m + 1, p, p))
    J[:, :m] = s2[:, None, None, None] * dA
    J[:, m] = 2.0 * sigma[:, None, None] * A0
    return s2[:, None, None] * A0, J, H
