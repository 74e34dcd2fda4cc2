"""Second starts for boundary ends of the Fisher Scoring + polish fit (one factor, dense).

Fisher Scoring starts from ``D = 0``.  Where a factor is barely identified (a voxel with a
dozen observations on ten levels, only two of them repeated) the profiled (RE)ML
log-likelihood can have a local maximum at ``D_k = 0`` and its global one far inside
(``theta`` 1.5-100): the fit ends singular, up to 11 below lme4's logLik, while lme4, from
its start ``Lambda_k = I``, climbs to the interior optimum (found by a BLMM audit; in
simulated voxels with 11-15 observations on 10 subjects about one boundary end in ten).

So a voxel that ends with some diagonal entry of ``Lambda_k`` below lme4's singular
tolerance, and whose factors are weakly replicated (:func:`replication` below
:data:`WEAK_BELOW`: no probe ever helped a better replicated voxel, and probing every
boundary end cost ~20% of the fit on the demo study), has its log-likelihood evaluated at
``Lambda_k = c I`` (every factor) for each ``c`` in :data:`PROBES` (lme4's start and a
ladder above and below it: one evaluation call for all of them); where the best of these
is higher than the end by more than ``max(tolerance, 1e-12 |l|)``, the polish (:func:`~mpiblmm.lmm.polish.polish`) runs again
from it with what is left of the voxel's iteration budget, and the higher log-likelihood
is kept (the first fit on a tie, so every other voxel keeps its bits).  Iterations count
both runs.  The blocked structure restarts its boundary ends from lme4's start instead
(``blocked/newton.py``).
"""

from __future__ import annotations

import numpy as np

from .fisher import evaluate
from .model import ProductForms
from .polish import polish
from .theta import is_singular, lambdas_from_theta, tril_indices

#: Scales ``c`` of the probes ``Lambda_k = c I``: lme4's start (1) and a ladder around it.
PROBES = tuple(float(c) for c in np.geomspace(0.25, 64.0, 17))

#: Only voxels whose replication (:func:`replication`) of some effect is below this are
#: probed.  In simulated searches every voxel a probe improved had 0.11-0.63; four complete
#: visits per subject give 0.75, three 0.67, two 0.5, one visit each about 0.
WEAK_BELOW = 0.7


def _probe_theta(c: float, structure, v: int) -> np.ndarray:
    """theta of ``Lambda_k = c I`` for every factor, (v, n_theta)."""
    parts = []
    for f in structure.factors:
        rows, cols = tril_indices(f.n_effects)
        parts.append(np.where(rows == cols, c, 0.0))
    return np.tile(np.concatenate(parts), (v, 1))


def replication(pf: ProductForms, method: str) -> np.ndarray:
    """(v,): per voxel, the smallest over the factors' effects of ``1 - (sum_j a_j)^2 /
    (dof sum_j a_j^2)``, ``a_j`` the effect's sum of squares over level j's observed rows
    (``n_j`` for an intercept) and ``dof`` ``n - p`` (REML) or ``n`` (ML).  It is the
    information about ``D_k`` at ``D = 0`` left once s2 is profiled out, relative to all of
    it: near 1 when every level repeats, 0 or below when few do (then REML's profiled
    information is not positive definite and the profile can have a local maximum at
    zero variance)."""
    dof = (pf.n - pf.p if method == "REML" else pf.n).astype(np.float64)
    out = np.full(pf.n_voxels, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in pf.algebra.effect_sums(pf):
            total, squares = a.sum(axis=1), (a * a).sum(axis=1)          # (v|1, q_k)
            rep = 1.0 - total**2 / (dof[:, None] * squares)
            rep = np.where(squares > 0, rep, np.inf).min(axis=1)
            out = np.minimum(out, rep)
    return out


def restart_boundary_ends(pf: ProductForms, method: str, tolerance: float,
                          max_iterations: int, out: dict) -> dict:
    """``out`` (the dict of :func:`~mpiblmm.lmm.scoring.fit_scoring_polish`) with the
    boundary ends that a probe beats fitted again (see the module docstring)."""
    st = pf.structure
    used = out["fs_iterations"] + out["polish_iterations"]
    todo = np.flatnonzero(np.isfinite(out["llh"]) & is_singular(out["theta"], st)
                          & (used < max_iterations))
    if todo.size:
        todo = todo[replication(pf.subset(todo), method) < WEAK_BELOW]
    if todo.size == 0:
        return out
    k = len(PROBES)
    starts = np.concatenate([_probe_theta(c, st, todo.size) for c in PROBES])
    ev = evaluate(pf.voxels(np.tile(todo, k)), lambdas_from_theta(starts, st), method,
                  need_z=False)
    llh = np.where(np.isfinite(ev.llh), ev.llh, -np.inf).reshape(k, todo.size)
    best = np.argmax(llh, axis=0)
    best_llh = llh[best, np.arange(todo.size)]
    end = out["llh"][todo]
    floor = np.maximum(tolerance, 1e-12 * np.abs(end))
    go = best_llh > end + floor
    if not go.any():
        return out
    idx = todo[go]
    theta0 = starts.reshape(k, todo.size, -1)[best[go], np.flatnonzero(go)]
    again = polish(pf.subset(idx), theta0, method, tolerance,
                   max_iterations=max_iterations - used[idx])
    out = {key: val.copy() for key, val in out.items()}
    out["polish_iterations"][idx] += again.iterations
    better = np.isfinite(again.ev.llh) & (again.ev.llh > end[go] + floor[go])
    sel, at = idx[better], np.flatnonzero(better)
    out["theta"][sel] = again.theta[at]
    out["llh"][sel] = again.ev.llh[at]
    out["beta"][sel] = again.ev.beta[at]
    out["s2"][sel] = again.ev.s2[at]
    out["XtViX"][sel] = again.ev.vp.XtViX[at]
    out["converged"][sel] = again.converged[at]
    return out
