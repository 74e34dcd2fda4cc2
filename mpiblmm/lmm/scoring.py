"""Fisher Scoring then the theta polish, within one iteration budget: how a chunk is fitted by
the structures that evaluate with Z parts or level sums (one factor, dense).

1. :func:`~mpiblmm.lmm.fisher.fisher_scoring` (simplified Fisher Scoring in ``D``, from
   ``D = 0``), then
2. :func:`~mpiblmm.lmm.polish.polish` (Newton in lme4's theta with an escape from singular
   ``D_k``), which guarantees the boundary optimum that the eigenvalue clip of step 1 misses,
   on the voxels that need it (``polish_mode``: "auto", "all" or "none").

The polish gets what Fisher Scoring left of a voxel's ``max_iterations``.
"""

from __future__ import annotations

import numpy as np

from .fisher import fisher_scoring, near_boundary
from .model import ProductForms
from .polish import polish as polish_theta
from .theta import theta_from_D

#: Relative eigenvalue of a D_k below which a voxel is polished in theta (mode "auto").
NEAR_BOUNDARY = 1e-6


def fit_scoring_polish(pf: ProductForms, method: str, tolerance: float, max_iterations: int,
                       polish_mode: str, halvings: dict) -> dict:
    """Fisher Scoring then the polish, both within one budget of ``max_iterations`` per voxel.

    ``halvings``: keyword arguments of :func:`~.fisher.fisher_scoring` chosen by the structure
    (e.g. fewer step halvings when the polish follows).  Returns the dict of
    :func:`~.estimate._fit_chunk`."""
    fs = fisher_scoring(pf, method, tolerance=tolerance, max_iterations=max_iterations,
                        **halvings)
    theta = theta_from_D(fs.D, pf.structure)
    ev = fs.ev
    v = pf.n_voxels
    out = dict(theta=theta, llh=ev.llh, beta=ev.beta, s2=ev.s2, XtViX=ev.vp.XtViX,
               fs_iterations=fs.iterations, polish_iterations=np.zeros(v, dtype=np.int64),
               converged=fs.converged.copy())
    if polish_mode == "none":
        return out
    if polish_mode == "all":
        sel = np.arange(v)
    else:  # "auto": the boundary, and wherever Fisher Scoring could not finish
        sel = np.flatnonzero(near_boundary(fs.D, NEAR_BOUNDARY) | fs.stalled | ~fs.converged)
    sel = sel[np.isfinite(ev.llh[sel])]
    left = max_iterations - fs.iterations[sel]
    out["converged"][sel[left <= 0]] = False     # needs the polish, but the budget is spent
    sel, left = sel[left > 0], left[left > 0]
    if sel.size:
        pol = polish_theta(pf.take(sel), theta[sel], method, tolerance=tolerance,
                           max_iterations=left, ev0=ev.take(sel))
        for key, val in (("theta", pol.theta), ("llh", pol.ev.llh), ("beta", pol.ev.beta),
                         ("s2", pol.ev.s2), ("XtViX", pol.ev.vp.XtViX),
                         ("polish_iterations", pol.iterations), ("converged", pol.converged)):
            out[key][sel] = val
    return out
