"""The blocked path's optimisers: Newton-type iterations on the profiled (RE)ML deviance in theta.

The objective is lme4's: ``d(theta) = -2 l(theta)`` with ``beta`` (GLS) and ``s2`` profiled
out, ``theta`` the lower triangles of the ``Lambda_k`` (:mod:`~mpiblmm.lmm.theta`).  Each
evaluation is one blocked Cholesky (:func:`.cholesky.profiled`) for all active voxels.  Two
optimisers, chosen by the number ``m`` of theta entries (``ANALYTIC_FROM = 2``: every
several-factor design takes the first; measured, see docs/ESTIMATOR.md):

**Quasi-Newton with the analytic gradient** (:func:`_quasi_newton`,
:func:`.gradient.evaluate`: one evaluation with gradient costs ~2-3 evaluations).  The
Hessian model starts from forward differences of the analytic gradient
(``h_i = 1e-6 max(|theta_i|, 0.1)``, m gradient evaluations), is updated by BFGS after each
step and recomputed where it is indefinite or the step needed four or more halvings (from
lme4's start the Hessian is often indefinite, and pure BFGS then crawled: 60-200 iterations;
recomputing it after every halving too cost more gradients than it saved iterations).
Every trial point of the line search is evaluated with its gradient.  Besides the gain test
below, a voxel stops where the model is positive definite, the Newton decrement is below
``0.1 tolerance`` and the last step gained less than ``1e4 tolerance`` (:data:`DECREMENT`):
the final step that gains nothing is not tried -- its line search halved up to
``max_halvings`` times on rounding noise (b: 28.9 -> 22.1 gradient evaluations per voxel).

**Newton with finite differences of the deviance** (:func:`_fd_newton`, the previous
optimiser, kept as a reference): central differences at ``theta +- h_i e_i`` (gradient,
diagonal of H) and ``theta + h_i e_i + h_j e_j`` (the off-diagonal entries),
``h_i = 1e-4 max(|theta_i|, 0.1)``: ``1 + 2m + m(m-1)/2`` evaluations per iteration.

Common to both:

1. direction ``-|H|^-1 g`` (absolute eigenvalues: a descent direction at saddles too), scaled
   down so that no entry moves by more than ``1.5 max(|theta_i|, 1)`` towards zero or
   ``4 max(|theta_i|, 1)`` away from it (:func:`limit_step`; far from the optimum ``d`` is
   log-like in theta and a Newton step overshot by up to 20x, then came back one halving per
   iteration: 15% fewer evaluations on the cohort designs, same optima.  1.5 rather than a
   round fraction: a cap of 0.5 put theta exactly on 0 from 0.5, where the gradient vanishes
   by symmetry, and such voxels took 25 iterations);
2. step halving until ``d`` does not rise (a worse point is never kept);
3. a voxel stops when the step gained less than ``tolerance`` in ``l`` (or the rounding floor
   of ``l``), or when no halving helped.  (Stopping on a small Newton decrement instead was
   tried and dropped: near a zero column of ``Lambda_k`` the gradient vanishes by symmetry
   whether or not the point is a minimum, and one crossed voxel stopped 0.019 below lme4.)
4. a voxel that ends on the boundary is fitted again from lme4's start and keeps the better
   fit (:func:`_restart_boundary_ends`: boundary local optima near the factors' own start);
   one that stopped just inside it is put on it (:func:`_snap_to_boundary`).

``d`` is even in every column of ``Lambda_k`` (``D_k`` does not change when a column changes
sign), so the iteration is unconstrained and the boundary (a zero column, ``D_k`` singular) is
reached as an ordinary minimum; the result is put in lme4's form (non-negative diagonal) at
the end.  Start: every factor fitted alone (:mod:`.start`; lme4's ``theta0``, identity
``Lambda_k``, where that fit fails): ~40% fewer gradient evaluations on the cohort designs,
to the same optima.  (Starting from the best of ``s theta0``, s = 1 ... 0.03, saved an
iteration but found a worse local optimum of the REML deviance at one crossed reference
voxel, 0.019 below lme4: dropped.)
"""

from __future__ import annotations

import numpy as np

from ..model import ProductForms
from ..polish import canonical_theta
from ..theta import D_from_theta, cholesky_psd, n_theta, theta_slices, tril_indices
from .cholesky import batches, prepare, profiled
from .gradient import evaluate
from .start import single_factor_start

REL_STEP = 1e-4
#: Forward-difference step of the analytic gradient for the Hessian (relative, as REL_STEP).
GRAD_STEP = 1e-6
#: The analytic-gradient quasi-Newton from this many theta entries on, i.e. for every
#: several-factor design; the finite-difference Newton (:func:`_fd_newton`, the previous
#: optimiser) stays as the reference the tests compare it with (see docs/ESTIMATOR.md).
ANALYTIC_FROM = 2

#: A voxel also stops where the Hessian model is positive definite, the Newton decrement
#: ``g'H^-1 g / 2`` is below ``DECREMENT`` times the tolerance and the last step gained less
#: than ``1e4`` times it: the step that would gain nothing is not tried (near convergence its
#: line search halved up to ``max_halvings`` times on rounding noise).
DECREMENT = 0.1

#: Largest Newton step per theta entry towards zero (``MAX_STEP``) and away from it
#: (``MAX_GROW``), relative to max(|theta_i|, 1) (:func:`limit_step`).
MAX_STEP = 1.5
MAX_GROW = 4.0

#: A voxel that ends with a diagonal entry of ``Lambda_k`` below ``PROBE_BELOW`` (ten times
#: lme4's singular-fit tolerance) has the deviance probed with that entry at ``PROBE``
#: (:func:`_escape_saddles`).
PROBE_BELOW = 1e-3
PROBE = 1e-2
#: Further values tried beside :data:`PROBE`: an interior optimum closer to the boundary than
#: ``PROBE / sqrt(2)`` can have the deviance at ``PROBE`` above the boundary's (a quartic
#: minimum at 0.006), and the escape missed it (a cohort audit voxel, left on a zero column
#: by the rank probe, 3e-7 below lme4 and flagged singular where lme4 is not).
PROBES = (PROBE, PROBE / 4)

#: A voxel that ends with a diagonal entry of ``Lambda_k`` below this (lme4's singular-fit
#: tolerance, ``theta.SINGULAR_TOL``) is optimised again from lme4's start
#: (:func:`_restart_boundary_ends`).
RESTART_BELOW = 1e-4

#: Every ``RANK_PROBE_EVERY`` iterations the quasi-Newton evaluates, for each voxel still
#: going whose ``D_k = Lambda_k Lambda_k'`` (q_k >= 2) has its smallest eigenvalue below
#: ``RANK_PROBE_BELOW`` times its largest, the nearest singular ``D_k`` (that eigenvalue
#: removed), and moves there where the deviance is not higher (:func:`_probe_rank`).
RANK_PROBE_EVERY = 10
RANK_PROBE_BELOW = 1e-2

#: Scalings of lme4's start and of a boundary end at which :func:`_ladder_boundary_ends`
#: looks for a better basin.
LADDER = (0.1, 10.0)

#: A second fit (:func:`_restart_boundary_ends`) stops when every theta entry is within this
#: of the first fit's end and its deviance is not lower: it is in the same basin.
SAME_END = 1e-2


def theta0(pf: ProductForms) -> np.ndarray:
    """lme4's start: ``Lambda_k = I`` for every factor (v, n_theta)."""
    st = pf.structure
    out = np.zeros((pf.n_voxels, n_theta(st)))
    for f, sl in zip(st.factors, theta_slices(st)):
        rows, cols = tril_indices(f.n_effects)
        out[:, sl] = (rows == cols).astype(float)
    return out


def steps(theta: np.ndarray, rel: float = REL_STEP) -> np.ndarray:
    """Finite-difference steps (v, m): relative to theta, floored at 0.1 (theta is ~ sd ratio)."""
    return rel * np.maximum(np.abs(theta), 0.1)


def deviance(pattern, pf, theta: np.ndarray, method: str) -> np.ndarray:
    """``-2 l`` (v,) at ``theta``; +inf where the evaluation failed."""
    llh = profiled(pattern, pf, theta, method)[0]
    return np.where(np.isfinite(llh), -2.0 * llh, np.inf)


def fd_gradient_hessian(pattern, pf, theta: np.ndarray, f0: np.ndarray,
                        method: str) -> tuple[np.ndarray, np.ndarray]:
    """Gradient (v, m) and Hessian (v, m, m) of the deviance by finite differences."""
    v, m = theta.shape
    h = steps(theta)
    plus = np.empty((v, m))
    g = np.empty((v, m))
    H = np.empty((v, m, m))
    for i in range(m):
        tp, tm = theta.copy(), theta.copy()
        tp[:, i] += h[:, i]
        tm[:, i] -= h[:, i]
        fp = deviance(pattern, pf, tp, method)
        fm = deviance(pattern, pf, tm, method)
        plus[:, i] = fp
        g[:, i] = (fp - fm) / (2.0 * h[:, i])
        H[:, i, i] = (fp - 2.0 * f0 + fm) / h[:, i] ** 2
    for i in range(m):
        for j in range(i):
            t = theta.copy()
            t[:, i] += h[:, i]
            t[:, j] += h[:, j]
            fij = deviance(pattern, pf, t, method)
            H[:, i, j] = H[:, j, i] = (fij - plus[:, i] - plus[:, j] + f0) / (h[:, i] * h[:, j])
    return g, H


def saddle_free_direction(g: np.ndarray, H: np.ndarray) -> np.ndarray:
    """``-|H|^-1 g`` with absolute eigenvalues floored relative to the largest (v, m)."""
    ok = np.isfinite(g).all(axis=1) & np.isfinite(H).all(axis=(1, 2))
    m = g.shape[1]
    Hs = np.where(ok[:, None, None], 0.5 * (H + np.swapaxes(H, 1, 2)), np.eye(m))
    w, U = np.linalg.eigh(Hs)
    aw = np.abs(w)
    inv = 1.0 / np.maximum(aw, 1e-10 * aw.max(axis=1, keepdims=True) + 1e-300)
    proj = np.einsum("vji,vj->vi", U, np.where(ok[:, None], g, 0.0))
    d = -np.einsum("vij,vj->vi", U, inv * proj)
    return np.where(ok[:, None], d, 0.0)


def limit_step(d: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``d`` scaled (per voxel) so that no entry moves by more than
    ``MAX_STEP max(|theta_i|, 1)`` towards zero or ``MAX_GROW max(|theta_i|, 1)`` away from it:
    far from the optimum the deviance is log-like in theta, where a Newton step overshoots by
    orders of magnitude (and then comes back one halving per iteration)."""
    cap = np.where(d * theta < 0, MAX_STEP, MAX_GROW) * np.maximum(np.abs(theta), 1.0)
    ratio = np.max(np.abs(d) / cap, axis=1)
    scale = np.minimum(1.0, 1.0 / np.maximum(ratio, 1e-300))
    return d * scale[:, None]


def newton(pattern, pf: ProductForms, method: str, theta_start: np.ndarray | None = None,
           tolerance: float = 1e-12, max_iterations: int = 200,
           max_halvings: int = 30) -> dict:
    """Minimise the profiled deviance for every voxel of ``pf``; see the module docstring.

    Returns a dict of (v,)-arrays: ``theta`` (lme4's form), ``llh``, ``beta`` (centred),
    ``s2``, ``XtViX``, ``iterations``, ``evaluations`` and ``converged``.

    Each voxel is fitted from the factors' own fits (:mod:`.start`) in batches
    (:func:`.cholesky.batches`; each voxel's iterations are its own); saddles are escaped
    (:func:`_escape_saddles`); a voxel that ends on the boundary is fitted again from
    lme4's start and keeps the better fit (:func:`_restart_boundary_ends`); one that stopped
    just inside the boundary is put on it (:func:`_snap_to_boundary`).
    """
    # the factors' own fits for the whole chunk at once (their memory per voxel is a small
    # part of a blocked evaluation's; per batch, their fixed cost per call would be paid
    # per 16 voxels on (b))
    if theta_start is None:
        theta_start = single_factor_start(pattern, pf, method, theta0(pf))
    run = _quasi_newton if n_theta(pf.structure) >= ANALYTIC_FROM else _fd_newton
    parts = []
    for idx in batches(pattern, pf.p, pf.n_voxels):
        sub = pf.subset(idx)
        out = run(pattern, sub, method, np.asarray(theta_start)[idx], tolerance,
                  max_iterations, max_halvings)
        parts.append(_escape_saddles(pattern, sub, method, out, run, tolerance,
                                     max_iterations, max_halvings))
    out = {k: np.concatenate([d[k] for d in parts]) for k in parts[0]}
    out = _restart_boundary_ends(pattern, pf, method, out, run, tolerance, max_iterations,
                                 max_halvings)
    out = _ladder_boundary_ends(pattern, pf, method, out, run, tolerance, max_iterations,
                                max_halvings)
    return _snap_to_boundary(pattern, pf, method, out)


def _budget_left(max_iterations, out: dict) -> np.ndarray:
    """Iterations each voxel of ``out`` may still take: ``max_iterations`` (a number, or one
    per voxel) bounds all its runs together -- the first, the escapes and the restarts
    (``estimation.max_iterations``: the whole fit).  Each later run used to get the whole
    budget again, so a voxel could report up to twice the cap (contract audit)."""
    return np.maximum(np.asarray(max_iterations, dtype=np.int64) - out["iterations"], 0)


def _escape_saddles(pattern, pf: ProductForms, method: str, out: dict, run,
                    tolerance: float, max_iterations: int, max_halvings: int) -> dict:
    """Voxels that ended with a diagonal entry of some ``Lambda_k`` below :data:`PROBE_BELOW`:
    the deviance is evaluated with that entry at each of :data:`PROBES` (two evaluations per
    such entry); where it falls by more than its rounding, the end was a saddle, and the voxel is
    optimised again from the best such point.  The higher log-likelihood is kept (the first on
    a tie); iterations and evaluations count both runs.

    The deviance is even in every column of ``Lambda_k``, so its gradient in a zero column is
    zero whether that is a minimum or not, and the optimiser can stop there.  Seen from the
    factors' own fits (:mod:`.start`) with a floor of 0.005: a slope voxel of the unbalanced
    reference ended at ``L22 = 4e-7``, 0.138 below lme4's fit; with ``L22 = 0.01`` the deviance
    was 6e-4 lower."""
    st = pf.structure
    out = dict(out, evaluations=out["evaluations"].copy())
    theta = out["theta"]
    f_end = np.where(np.isfinite(out["llh"]), -2.0 * out["llh"], np.inf)
    best_f, best_th = f_end.copy(), theta.copy()
    prep = None
    for f, sl in zip(st.factors, theta_slices(st)):
        rows, cols = tril_indices(f.n_effects)
        for j in np.flatnonzero(rows == cols) + sl.start:
            idx = np.flatnonzero(np.abs(theta[:, j]) < PROBE_BELOW)
            if idx.size == 0:
                continue
            prep = prep if prep is not None else prepare(pattern, pf)
            for value in PROBES:
                cand = theta[idx].copy()
                cand[:, j] = value
                fc = deviance(pattern, prep.take(idx), cand, method)
                out["evaluations"][idx] += 1
                better = fc < best_f[idx]
                best_f[idx[better]] = fc[better]
                best_th[idx[better]] = cand[better]
    floor = 2.0 * np.maximum(tolerance, 1e-12 * np.abs(f_end))
    left = np.broadcast_to(_budget_left(max_iterations, out), f_end.shape)
    idx = np.flatnonzero((best_f < f_end - floor) & (left > 0))
    if idx.size == 0:
        return out
    # without the rank probe: the escape starts beside a zero column, which the probe could
    # send straight back to (the deviance there is not higher than at the escape's start)
    plain = dict(rank_probe=False) if run is _quasi_newton else {}
    again = run(pattern, pf.take(idx), method, best_th[idx], tolerance, left[idx],
                max_halvings, **plain)
    return _keep_better(out, idx, again, 0.0)


def _diagonal_entries(st) -> np.ndarray:
    """Positions in theta of the diagonal entries of every ``Lambda_k``."""
    out = []
    for f, sl in zip(st.factors, theta_slices(st)):
        rows, cols = tril_indices(f.n_effects)
        out.extend(np.flatnonzero(rows == cols) + sl.start)
    return np.array(out, dtype=np.intp)


def _boundary_ends(out: dict, st) -> np.ndarray:
    """The voxels of ``out`` whose fit ended with a diagonal entry of some ``Lambda_k`` below
    :data:`RESTART_BELOW` (lme4's singular-fit tolerance)."""
    diag = _diagonal_entries(st)
    return np.flatnonzero(np.isfinite(out["llh"])
                          & (np.abs(out["theta"][:, diag]) < RESTART_BELOW).any(axis=1))


def _keep_better(out: dict, idx: np.ndarray, again: dict, floor) -> dict:
    """``out`` with the voxels ``idx`` replaced by ``again``'s fits where those are higher by
    more than ``floor`` (a tie keeps the first fit, so its bits) or the first fit failed; the
    iterations and evaluations of both runs are summed."""
    l0 = out["llh"][idx]
    better = np.isfinite(again["llh"]) & (~np.isfinite(l0) | (again["llh"] > l0 + floor))
    out = {k: v.copy() for k, v in out.items()}
    for key in ("iterations", "evaluations"):
        out[key][idx] += again[key]
    for key in ("theta", "llh", "beta", "s2", "XtViX", "converged"):
        out[key][idx[better]] = again[key][better]
    return out


def _restart_boundary_ends(pattern, pf: ProductForms, method: str, out: dict, run,
                           tolerance: float, max_iterations: int, max_halvings: int) -> dict:
    """Voxels that ended on the boundary (a diagonal entry of some ``Lambda_k`` below
    :data:`RESTART_BELOW`, lme4's singular-fit tolerance) are optimised again from lme4's own
    start (:func:`theta0`, identity ``Lambda_k``), saddles escaped as in the first run, and
    keep the log-likelihood higher by more than ``max(tolerance, 1e-12 |l|)`` (else the
    first fit, :func:`_keep_better`).

    From the factors' own fits (:mod:`.start`) a factor whose fit alone is singular starts
    near zero, and with heavy missingness the deviance can have a boundary local minimum
    there while lme4, from the identity, reaches a better optimum: a cohort audit found 4 of
    2,363 voxels (``(1 + time | subject) + (1 | site)`` and three crossed factors) 1e-4 to
    0.13 below lme4's log-likelihood, all ending singular; from the identity each reached
    lme4's optimum (reference datasets ``local_optima`` and ``local_optima_slope``,
    tests/lmm/test_blocked_restart.py).

    A second fit that comes within :data:`SAME_END` of the first fit's end (in every theta
    entry, lme4's column signs) without a lower deviance is in that optimum's basin and
    stops there (it cannot end better): most boundary voxels are truly on the boundary, and
    from the identity their second fit mostly crawls back to it (docs/ESTIMATOR.md)."""
    theta = out["theta"]
    left = _budget_left(max_iterations, out)
    todo = _boundary_ends(out, pf.structure)
    todo = todo[left[todo] > 0]
    for batch in batches(pattern, pf.p, todo.size) if todo.size else []:
        idx = todo[batch]
        sub = pf.take(idx)
        near = dict(near=(theta[idx], -2.0 * out["llh"][idx])) \
            if run is _quasi_newton else {}
        again = run(pattern, sub, method, theta0(sub), tolerance, left[idx],
                    max_halvings, **near)
        again = _escape_saddles(pattern, sub, method, again, run, tolerance, left[idx],
                                max_halvings)
        floor = np.maximum(tolerance, 1e-12 * np.abs(np.nan_to_num(out["llh"][idx])))
        out = _keep_better(out, idx, again, floor)
    return out


def _ladder_boundary_ends(pattern, pf: ProductForms, method: str, out: dict, run,
                          tolerance: float, max_iterations: int, max_halvings: int) -> dict:
    """Voxels that still end on the boundary (as in :func:`_restart_boundary_ends`) have the
    deviance evaluated at lme4's start and at their end, each scaled by every factor of
    :data:`LADDER` (four evaluations); where the best of those is lower than the end by more
    than its rounding, the voxel is optimised again from there and keeps the better fit.

    Both starts can lie in the basin of a local optimum that a far one beats: a nested
    ``(1 | site/subject)`` audit voxel (151 rows, age varying within subjects) has the
    profiled log-likelihood along the subject theta (site on zero) peak at 1.07 (-290.45,
    ML), where lme4's start at 1 leads, and again at 14 (-273.01), which every lme4
    optimiser reached (its first steps are large) and ours did not: 17.4 below lme4 (20.7
    with REML).  One voxel in ~9,000 audited fits."""
    left = _budget_left(max_iterations, out)
    todo = _boundary_ends(out, pf.structure)
    todo = todo[left[todo] > 0]
    if todo.size == 0:
        return out
    out = dict(out, evaluations=out["evaluations"].copy())
    for batch in batches(pattern, pf.p, todo.size):
        idx = todo[batch]
        sub = pf.take(idx)
        prep = prepare(pattern, sub)
        f_end = -2.0 * out["llh"][idx]
        best_f, best_th = f_end.copy(), out["theta"][idx].copy()
        for base in (theta0(sub), out["theta"][idx]):
            for scale in LADDER:
                cand = base * scale
                fc = deviance(pattern, prep, cand, method)
                out["evaluations"][idx] += 1
                better = fc < best_f
                best_f[better], best_th[better] = fc[better], cand[better]
        floor = 2.0 * np.maximum(tolerance, 1e-12 * np.abs(f_end))
        far = np.flatnonzero(best_f < f_end - floor)
        if far.size == 0:
            continue
        budget = left[idx[far]]
        again = run(pattern, sub.take(far), method, best_th[far], tolerance, budget,
                    max_halvings)
        again = _escape_saddles(pattern, sub.take(far), method, again, run, tolerance,
                                budget, max_halvings)
        out = _keep_better(out, idx[far], again, floor[far])
    return out


def _snap_to_boundary(pattern, pf: ProductForms, method: str, out: dict) -> dict:
    """Voxels that stopped just inside the boundary: a diagonal entry of ``Lambda_k`` in
    ``(0, PROBE_BELOW)`` is set to zero where the deviance there is not higher (one
    evaluation per such entry, entries taken in turn); the fit is then evaluated at the new
    theta.  Near a zero column the deviance is flat (even in the column), and the optimiser
    stopped at 2.3e-8 of subject variance where lme4's bounded optimiser sits on zero (and
    reports a singular fit)."""
    diag = _diagonal_entries(pf.structure)
    near = (out["theta"][:, diag] != 0) & (np.abs(out["theta"][:, diag]) < PROBE_BELOW)
    todo = np.flatnonzero(np.isfinite(out["llh"]) & near.any(axis=1))
    if todo.size == 0:
        return out
    out = {k: v.copy() for k, v in out.items()}
    for batch in batches(pattern, pf.p, todo.size):
        idx = todo[batch]
        prep = prepare(pattern, pf.take(idx))
        theta = out["theta"][idx]
        best_f = -2.0 * out["llh"][idx]
        best_th = theta.copy()
        for j in diag:
            rows = np.flatnonzero((best_th[:, j] != 0) & (np.abs(best_th[:, j]) < PROBE_BELOW))
            if rows.size == 0:
                continue
            cand = best_th[rows].copy()
            cand[:, j] = 0.0
            fc = deviance(pattern, prep.take(rows), cand, method)
            out["evaluations"][idx[rows]] += 1
            ok = fc <= best_f[rows]
            best_f[rows[ok]] = fc[ok]
            best_th[rows[ok]] = cand[ok]
        moved = np.flatnonzero((best_th != theta).any(axis=1))
        if moved.size == 0:
            continue
        at = idx[moved]
        snapped = _result(pattern, prep.take(moved), pf.structure, best_th[moved], method,
                          out["iterations"][at], out["evaluations"][at], out["converged"][at])
        keep = np.isfinite(snapped["llh"]) & (snapped["llh"] >= out["llh"][at])
        for key in ("theta", "llh", "beta", "s2", "XtViX"):
            out[key][at[keep]] = snapped[key][keep]
    return out


def fd_hessian(pattern, prep, theta: np.ndarray, g: np.ndarray, method: str,
               rel: float = GRAD_STEP) -> np.ndarray:
    """Hessian (v, m, m) by forward differences of the analytic gradient, symmetrised."""
    v, m = theta.shape
    h = steps(theta, rel)
    H = np.empty((v, m, m))
    for i in range(m):
        t = theta.copy()
        t[:, i] += h[:, i]
        H[:, :, i] = (evaluate(pattern, prep, t, method)["g"] - g) / h[:, i, None]
    return 0.5 * (H + np.swapaxes(H, 1, 2))


def bfgs_update(H: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """BFGS update of the Hessian approximations (v, m, m) with steps ``s`` and gradient
    changes ``y`` (v, m); skipped where the curvature ``s'y`` is not safely positive."""
    Hs = np.einsum("vij,vj->vi", H, s)
    sHs = np.einsum("vi,vi->v", s, Hs)
    sy = np.einsum("vi,vi->v", s, y)
    ok = (sy > 1e-10 * np.sqrt(np.einsum("vi,vi->v", s, s) * np.einsum("vi,vi->v", y, y))) \
        & (sHs > 0) & np.isfinite(sy)
    sy_ = np.where(ok, sy, 1.0)
    sHs_ = np.where(ok, sHs, 1.0)
    upd = y[:, :, None] * y[:, None, :] / sy_[:, None, None] \
        - Hs[:, :, None] * Hs[:, None, :] / sHs_[:, None, None]
    return np.where(ok[:, None, None], H + upd, H), ok


def decrement(H: np.ndarray, g: np.ndarray, pd: np.ndarray) -> np.ndarray:
    """Newton decrement ``g'H^-1 g / 2`` (v,) where ``H`` is positive definite (``pd``), else
    inf."""
    Hs = np.where(pd[:, None, None], H, np.eye(H.shape[1]))
    dec = 0.5 * np.einsum("vi,vi->v", g, np.linalg.solve(Hs, g[:, :, None])[:, :, 0])
    return np.where(pd, dec, np.inf)


def _result(pattern, prep, st, theta: np.ndarray, method: str, iterations: np.ndarray,
            evaluations: np.ndarray, converged: np.ndarray) -> dict:
    """An optimiser's outcome: theta with lme4's column signs and the fit at it."""
    theta = canonical_theta(theta, st)
    llh, beta, s2, vp = profiled(pattern, prep, theta, method)
    return dict(theta=theta, llh=llh, beta=beta, s2=s2, XtViX=vp.XtViX,
                iterations=iterations, evaluations=evaluations, converged=converged)


def halving_search(th: np.ndarray, fa: np.ndarray, d: np.ndarray, max_halvings: int,
                   deviance_at, evaluations: np.ndarray, active: np.ndarray):
    """Step halving that never keeps a worse point: per voxel the first of ``th + d``,
    ``th + d/2``, ... (``max_halvings`` halvings) whose deviance is at most ``fa``, else
    ``th`` itself.  ``deviance_at(rows, points)`` evaluates the pending rows (an infinite
    value rejects a point); each call counts one evaluation in ``evaluations[active[rows]]``.
    Returns the new ``(theta, deviance)``."""
    new_th, new_f = th.copy(), fa.copy()
    pending = np.arange(th.shape[0])
    alpha = 1.0
    for _ in range(max_halvings + 1):
        if pending.size == 0:
            break
        cand = th[pending] + alpha * d[pending]
        fc = deviance_at(pending, cand)
        evaluations[active[pending]] += 1
        ok = fc <= fa[pending]
        new_th[pending[ok]] = cand[ok]
        new_f[pending[ok]] = fc[ok]
        pending = pending[~ok]
        alpha *= 0.5
    return new_th, new_f


def alpha_used(s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Fraction of the direction ``d`` taken by step ``s`` (v,)."""
    num = np.einsum("vi,vi->v", s, d)
    den = np.einsum("vi,vi->v", d, d)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def rank_reduced(theta: np.ndarray, st, below: float = RANK_PROBE_BELOW):
    """theta with, in every ``Lambda_k`` (q_k >= 2) whose ``D_k`` has its smallest
    eigenvalue between ``1e-10`` and ``below`` times its largest (a ``D_k`` already singular
    is left), that eigenvalue removed: ``D_k - w u u'``, the nearest singular ``D_k`` (its
    lme4 factor, :func:`~mpiblmm.lmm.theta.cholesky_psd`, has a zero column).  Returns the
    candidates (v, m) and the (v,) mask of voxels changed."""
    cand = theta.copy()
    has = np.zeros(theta.shape[0], dtype=bool)
    for f, D, sl in zip(st.factors, D_from_theta(theta, st), theta_slices(st)):
        if f.n_effects < 2:
            continue
        w, U = np.linalg.eigh(D)
        small = (w[:, 0] > 1e-10 * w[:, -1]) & (w[:, 0] < below * w[:, -1])
        if not small.any():
            continue
        rows = np.flatnonzero(small)
        u = U[rows, :, 0]
        L = cholesky_psd(D[rows] - w[rows, 0, None, None] * u[:, :, None] * u[:, None, :])
        r, c = tril_indices(f.n_effects)
        cand[rows, sl] = L[:, r, c]
        has |= small
    return canonical_theta(cand, st), has


def _probe_rank(pattern, prep, st, method: str, active: np.ndarray, theta, f, g, refresh,
                evaluations) -> None:
    """Move the voxels ``active`` whose :func:`rank_reduced` point has a deviance (with a
    finite gradient) not above their own there, in place, with a fresh Hessian.

    Where the optimum is singular with correlated effects (``D_k`` of rank one), theta's
    Cholesky form approaches it along a curved valley (``L22 -> 0`` while ``L21`` grows, the
    variances nearly fixed) in which the deviance changes by ~1e-8 per quasi-Newton step:
    a crossed ``(1 + time | subject) + (1 | scanner)`` audit voxel crept there for 300
    iterations and ended at the cap (status 1) at lme4's logLik; about 1 in 10 such voxels
    took 100-300 iterations.  The nearest singular ``D_k`` is one evaluation away."""
    cand, has = rank_reduced(theta[active], st)
    rows = np.flatnonzero(has)
    if rows.size == 0:
        return
    at = active[rows]
    evc = evaluate(pattern, prep.take(at), cand[rows], method)
    evaluations[at] += 1
    fc = np.where(np.isfinite(evc["g"]).all(axis=1), evc["f"], np.inf)
    ok = fc <= f[at]
    theta[at[ok]] = cand[rows[ok]]
    f[at[ok]] = fc[ok]
    g[at[ok]] = evc["g"][ok]
    refresh[at[ok]] = True


def _quasi_newton(pattern, pf: ProductForms, method: str, theta_start, tolerance: float,
            max_iterations, max_halvings: int, near=None, rank_probe: bool = True) -> dict:
    """The quasi-Newton of the module docstring.  ``near``: ``(theta, deviance)`` (v, m),
    (v,) of an earlier fit's end; a voxel also stops when it comes within :data:`SAME_END`
    of that end without a lower deviance (:func:`_restart_boundary_ends`).  ``rank_probe``:
    every :data:`RANK_PROBE_EVERY` iterations, :func:`_probe_rank`.  ``max_iterations``: a
    number, or one per voxel (what a voxel's earlier runs left of its budget)."""
    st, v = pf.structure, pf.n_voxels
    prep = prepare(pattern, pf)
    theta = theta0(pf) if theta_start is None else np.array(theta_start, dtype=np.float64)
    m = theta.shape[1]
    ev = evaluate(pattern, prep, theta, method)
    f, g = ev["f"], ev["g"]
    H = np.zeros((v, m, m))
    refresh = np.ones(v, bool)
    evaluations = np.ones(v, dtype=np.int64)
    iterations = np.zeros(v, dtype=np.int64)
    converged = np.zeros(v, dtype=bool)
    caps = np.broadcast_to(np.asarray(max_iterations, dtype=np.int64), (v,))
    active = np.flatnonzero(np.isfinite(f) & np.isfinite(g).all(axis=1))
    active = active[caps[active] > 0]
    for it in range(int(caps.max()) if v else 0):
        if active.size == 0:
            break
        if rank_probe and it and it % RANK_PROBE_EVERY == 0:
            _probe_rank(pattern, prep, st, method, active, theta, f, g, refresh, evaluations)
        sub = prep.take(active)
        th, fa, ga = theta[active], f[active], g[active]
        fresh = np.flatnonzero(refresh[active])
        if fresh.size:
            H[active[fresh]] = fd_hessian(pattern, sub.take(fresh), th[fresh], ga[fresh], method)
            evaluations[active[fresh]] += m
        d = limit_step(saddle_free_direction(ga, H[active]), th)
        new_g = ga.copy()

        def with_gradient(rows, cand):      # a point needs a finite gradient too
            evc = evaluate(pattern, sub.take(rows), cand, method)
            fc = np.where(np.isfinite(evc["g"]).all(axis=1), evc["f"], np.inf)
            kept = fc <= fa[rows]
            new_g[rows[kept]] = evc["g"][kept]
            return fc

        new_th, new_f = halving_search(th, fa, d, max_halvings, with_gradient,
                                       evaluations, active)
        gain = 0.5 * (fa - new_f)
        floor = np.maximum(tolerance, 1e-14 * np.abs(0.5 * fa))
        Hn, upd = bfgs_update(H[active], new_th - th, new_g - ga)
        H[active] = Hn
        # a fresh Hessian where the model is indefinite or failed badly (four halvings);
        # refreshing after every halving cost more gradients than it saved iterations
        pd = np.linalg.eigvalsh(Hn)[:, 0] > 0
        refresh[active] = (alpha_used(new_th - th, d) < 1.0 / 16) | ~pd
        theta[active] = new_th
        f[active] = new_f
        g[active] = new_g
        iterations[active] += 1
        done = (gain < floor) | (pd & (decrement(Hn, new_g, pd) < DECREMENT * floor)
                                 & (gain < 1e4 * floor))
        if near is not None:
            ref_theta, ref_f = near[0][active], near[1][active]
            done |= (np.abs(canonical_theta(new_th, st) - ref_theta) <= SAME_END).all(axis=1) \
                & (new_f >= ref_f - 2.0 * floor)
        converged[active[done]] = True
        active = active[~done & (iterations[active] < caps[active])]  # a voxel's own cap
    return _result(pattern, prep, st, theta, method, iterations, evaluations, converged)


def _fd_newton(pattern, pf: ProductForms, method: str, theta_start, tolerance: float,
            max_iterations, max_halvings: int) -> dict:
    st, v = pf.structure, pf.n_voxels
    prep = prepare(pattern, pf)
    theta = theta0(pf) if theta_start is None else np.array(theta_start, dtype=np.float64)
    f = deviance(pattern, prep, theta, method)
    iterations = np.zeros(v, dtype=np.int64)
    evaluations = np.ones(v, dtype=np.int64)
    m = theta.shape[1]
    converged = np.zeros(v, dtype=bool)
    caps = np.broadcast_to(np.asarray(max_iterations, dtype=np.int64), (v,))
    active = np.flatnonzero(np.isfinite(f))
    active = active[caps[active] > 0]
    for _ in range(int(caps.max()) if v else 0):
        if active.size == 0:
            break
        sub = prep.take(active)
        th, fa = theta[active], f[active]
        g, H = fd_gradient_hessian(pattern, sub, th, fa, method)
        evaluations[active] += 2 * m + m * (m - 1) // 2
        d = limit_step(saddle_free_direction(g, H), th)
        new_th, new_f = halving_search(
            th, fa, d, max_halvings,
            lambda rows, cand: deviance(pattern, sub.take(rows), cand, method),
            evaluations, active)
        # gain in l (= half the fall of d); the rounding floor of l as in polish
        gain = 0.5 * (fa - new_f)
        floor = np.maximum(tolerance, 1e-14 * np.abs(0.5 * fa))
        theta[active] = new_th
        f[active] = new_f
        iterations[active] += 1
        done = gain < floor
        converged[active[done]] = True
        active = active[~done & (iterations[active] < caps[active])]  # a voxel's own cap
    return _result(pattern, prep, st, theta, method, iterations, evaluations, converged)
