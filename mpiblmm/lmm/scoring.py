"""Fisher Scoring then the theta polish, within one iteration budget: how a chunk is fitted by
the structures that evaluate with Z parts or level sums (one factor, dense).

1. Fisher Scoring (:func:`~mpiblmm.lmm.fisher.scoring_rounds`: simplified Fisher Scoring in
   ``D``, from ``D = 0``), then
2. the polish (:func:`~mpiblmm.lmm.polish.polish_rounds`: Newton in lme4's theta with an
   escape from singular ``D_k``), which guarantees the boundary optimum that the eigenvalue
   clip of step 1 misses, on the voxels that need it (``polish_mode``: "auto", "all" or
   "none"), and then
3. with the polish, a second start for voxels that ended on the boundary where a probe of
   lme4's start beats the end (:mod:`~mpiblmm.lmm.probe`).

A voxel goes to the polish as soon as Fisher Scoring finishes it, and the two run side by
side: both are generators that ask for their evaluations (:class:`~mpiblmm.lmm.fisher.Request`)
and :func:`_drive` answers the requests pending at each step with one
:func:`~mpiblmm.lmm.fisher.evaluate` call where they can share one.  A chunk then takes as
many rounds as its slowest voxel's Fisher Scoring and polish together, not the slowest Fisher
Scoring plus the slowest polish, and each round pays the fixed cost of an evaluation call
(what small chunks pay for: docs/ESTIMATOR.md) once for both.  Every voxel runs exactly the
iterations it would run alone, and an evaluation's bits do not depend on the voxels that
share its call, so the results are those of Fisher Scoring followed by the polish.

The polish gets what Fisher Scoring left of a voxel's ``max_iterations``.
"""

from __future__ import annotations

import numpy as np

from .fisher import Evaluation, evaluate, near_boundary, scoring_rounds
from .model import ProductForms
from .polish import PolishState, polish_rounds
from .probe import restart_boundary_ends
from .theta import n_theta, theta_from_D

#: Relative eigenvalue of a D_k below which a voxel is polished in theta (mode "auto").
NEAR_BOUNDARY = 1e-6

#: Fisher Scoring iterations after which a voxel still going is handed to the polish (with
#: the rest of its budget).  Where a factor is weakly replicated the expected information
#: is far from the observed one and FS converges linearly at a rate near 1: an lme4 audit's
#: voxel (120 subjects, 15% seen twice) crept for 300 iterations at lme4's logLik to 2e-10
#: and ended "not converged"; Newton in theta finishes it.
FS_ITERATIONS = 50


def fit_scoring_polish(pf: ProductForms, method: str, tolerance: float, max_iterations: int,
                       polish_mode: str, halvings: dict) -> dict:
    """Fisher Scoring then the polish, both within one budget of ``max_iterations`` per voxel.

    ``halvings``: keyword arguments of :func:`~.fisher.fisher_scoring` chosen by the structure
    (e.g. fewer step halvings when the polish follows).  Returns the dict of
    :func:`~.estimate._fit_chunk`."""
    st, v = pf.structure, pf.n_voxels
    state = PolishState(v, n_theta(st)) if polish_mode != "none" else None

    def hand_over(idx, D, ev, iterations, converged, stalled):
        """Voxels ``idx`` that Fisher Scoring finished: to the polish if they need it."""
        if polish_mode == "all":
            need = np.ones(idx.size, dtype=bool)
        else:  # "auto": the boundary, and wherever Fisher Scoring could not finish
            need = near_boundary(D, NEAR_BOUNDARY) | stalled | ~converged
        need &= np.isfinite(ev.llh[idx])
        left = max_iterations - iterations
        need &= left > 0              # (no budget left: stays not converged, status 1)
        if need.any():
            sel = np.flatnonzero(need)
            # the polish writes its voxels' rows of Fisher Scoring's evaluation (final there)
            state.add(idx[sel], theta_from_D(tuple(Dk[sel] for Dk in D), st), ev, left[sel], st)

    fs_cap = max_iterations if state is None else min(max_iterations, FS_ITERATIONS)
    rounds = [scoring_rounds(pf, method, tolerance=tolerance, max_iterations=fs_cap,
                             on_done=None if state is None else hand_over, **halvings)]
    if state is not None:
        rounds.append(polish_rounds(pf, state, method, tolerance))
    results = _drive(pf, method, rounds, state)
    fs = results[0]
    theta = theta_from_D(fs.D, st)
    ev = fs.ev
    out = dict(theta=theta, llh=ev.llh, beta=ev.beta, s2=ev.s2, XtViX=ev.vp.XtViX,
               fs_iterations=fs.iterations, polish_iterations=np.zeros(v, dtype=np.int64),
               converged=fs.converged.copy())
    if state is None:
        return out
    # voxels that needed the polish when Fisher Scoring had spent the budget: not converged
    spent = near_boundary(fs.D, NEAR_BOUNDARY) | fs.stalled | ~fs.converged \
        if polish_mode == "auto" else np.ones(v, dtype=bool)
    out["converged"][spent & np.isfinite(ev.llh) & (fs.iterations >= max_iterations)] = False
    sel = np.flatnonzero(state.cap > 0)
    if sel.size:
        pev = state.ev.take(sel)
        for key, val in (("theta", state.theta[sel]), ("llh", pev.llh), ("beta", pev.beta),
                         ("s2", pev.s2), ("XtViX", pev.vp.XtViX),
                         ("polish_iterations", state.iterations[sel]),
                         ("converged", state.converged[sel])):
            out[key][sel] = val
    # boundary ends that lme4's start (or a ladder around it) beats: fitted again from there
    return restart_boundary_ends(pf, method, tolerance, max_iterations, out)


def _drive(pf: ProductForms, method: str, rounds: list, state: PolishState | None) -> list:
    """Run the iteration generators side by side until all return; returns their results.

    At every step each generator has one pending request; those asking for the same kind
    of evaluation (with or without score sums) are answered by one :func:`evaluate` call
    over their voxels together, split back in order.  Fisher Scoring (the first) is resumed
    first, so voxels it hands over join the polish in the same step; when it returns, the
    polish is told that no more will come."""
    results: list = [None] * len(rounds)
    pending = {}
    for i, gen in enumerate(rounds):
        pending[i] = _advance(gen, None, i, results, state, first=True)
    pending = {i: r for i, r in pending.items() if r is not _FINISHED}
    while pending:
        answers: dict[int, Evaluation | None] = {i: None for i in pending}
        for need_z in (True, False):
            asks = [i for i, r in pending.items() if r is not None and r.need_z == need_z]
            if not asks:
                continue
            if len(asks) == 1:
                r = pending[asks[0]]
                answers[asks[0]] = evaluate(pf.voxels(r.idx), r.lambdas, method, need_z)
                continue
            idx = np.concatenate([pending[i].idx for i in asks])
            lambdas = tuple(np.concatenate(parts)
                            for parts in zip(*(pending[i].lambdas for i in asks)))
            ev = evaluate(pf.voxels(idx), lambdas, method, need_z)
            start = 0
            for i in asks:
                size = pending[i].idx.size
                answers[i] = ev.take(slice(start, start + size))     # views
                start += size
        nxt = {}
        for i in sorted(pending):
            r = _advance(rounds[i], answers[i], i, results, state)
            if r is not _FINISHED:
                nxt[i] = r
        pending = nxt
    return results


_FINISHED = object()


def _advance(gen, answer, i, results, state, first=False):
    """Resume generator ``i`` with ``answer``; its next request, or ``_FINISHED``."""
    try:
        return next(gen) if first else gen.send(answer)
    except StopIteration as stop:
        results[i] = stop.value
        if i == 0 and state is not None:
            state.closed = True
        return _FINISHED
