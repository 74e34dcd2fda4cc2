"""Where the blocked optimiser starts: every factor fitted alone by the one-factor path.

lme4 starts at ``Lambda_k = I`` for every factor (:func:`.newton.theta0`).  From there the
quasi-Newton of :mod:`.newton` took ~9.5 iterations and ~16 gradient evaluations per voxel
on the cohort designs.  A factor fitted alone, ``Y = X beta + Z_k b_k + e``, costs a few
per-level closed forms per evaluation (:mod:`~mpiblmm.lmm.structures.levels`) and already
puts each ``Lambda_k`` near its joint optimum: from these starts (200 voxels of each design,
one fit per factor) the gradient evaluations of the fit fell 15.8 -> 9.3 per voxel on (a)
and 16.6 -> 9.3 on (c), to the same optima (docs/ESTIMATOR.md).  Where a factor's own fit
did not give a finite theta, that factor starts from lme4's identity.

Nested one-effect factors (subject in family in site) start from their own variance minus
their parent's (:func:`single_factor_start`): evaluations per voxel (a) 9.6 -> 8.4, (b)
17.3 -> 14.3 (200 and 24 voxels), same optima.

Everything a factor's fit needs is a slice of the blocked product forms (its Z'X and Z'Y
columns, its diagonal blocks of Z'Z), so the data are not read again.  Memory: the one-factor
fit of a factor of ``l`` levels holds a few (l, q, q + p + 1) arrays per voxel (measured
peak: 30 KB per voxel on (a), 0.5 MB on (b)), less than one blocked evaluation of the same
voxels, whose working set sizes the batches.
"""

from __future__ import annotations

import numpy as np

from ..model import ProductForms, RandomStructure
from ..theta import theta_slices, tril_indices
from .pattern import BlockPattern

#: The factors' own fits stop at this change of the log-likelihood or after this many
#: iterations: a start need not be converged (the optimiser then stops at ``tolerance``
#: itself).  With the compiled kernel the start had become ~20% of (b)'s time; with 3
#: iterations instead of up to 50, (b) took 14.27 -> 14.36 evaluations per voxel and its fit
#: 12.0-12.4 -> 10.9 ms (same process), and none of 1,708 voxel fits (the six several-factor
#: references and 300 voxels each of (a) and (c), REML and ML) differed by more than 5e-12
#: in log-likelihood from the fits started from converged starts or from lme4's theta0.
START_TOLERANCE = 1e-6
START_MAX_ITERATIONS = 3

#: Diagonal entries of a factor's start are at least this.  The deviance is even in every
#: column of ``Lambda_k``, so its gradient vanishes at a zero column whatever the other
#: entries: a factor whose own fit is singular must start off the boundary, or it could never
#: leave it (a start near zero can still end on a saddle there: the optimiser probes such
#: ends, :func:`.newton._escape_saddles`).  Close to zero, though: from 0.3 one crossed
#: reference voxel went to an interior local optimum 0.0186 below lme4's (a boundary fit);
#: from 0.001 to 0.1 none of 1,524 voxel fits (every several-factor reference dataset, REML
#: and ML, and 300 voxels each of (a) and (c)) differed by more than 1e-6 from the fit
#: started at lme4's identity (docs/ESTIMATOR.md).
FLOOR = 0.02


def factor_product_forms(pattern: BlockPattern, pf: ProductForms, a: int) -> ProductForms:
    """The product forms of the model with only the factor at position ``a``."""
    from ..structures.one_factor import OneFactor   # structures imports this package

    k = pattern.order[a]
    factor = pattern.structure.factors[k]
    seg = pattern.zz_diag[a]
    cols = pattern.structure.slices()[k]
    zz = pf.ZtZ[:, seg.offset:seg.offset + seg.size].reshape(-1, seg.qa, seg.qb, seg.n)
    structure = RandomStructure((factor,))
    return ProductForms(
        XtX=pf.XtX, XtY=pf.XtY, YtY=pf.YtY, ZtX=pf.ZtX[:, cols], ZtY=pf.ZtY[:, cols],
        ZtZ=np.ascontiguousarray(np.transpose(zz, (0, 3, 1, 2))), n=pf.n,
        structure=structure, y_offset=pf.y_offset, shared=pf.shared,
        algebra=OneFactor(structure), rtol_constant=pf.rtol_constant)


def single_factor_start(pattern: BlockPattern, pf: ProductForms, method: str,
                        default: np.ndarray) -> np.ndarray:
    """Theta (v, n_theta) with each factor's entries from its fit alone, diagonal entries at
    least :data:`FLOOR`; ``default``'s entries (lme4's start) where that fit gave no finite
    theta.  A one-effect factor nested in a coarser one-effect factor (:func:`nested_in`)
    starts at ``sqrt(theta_alone^2 - theta_parent_alone^2)``: fitted alone, its levels also
    carry the parent's variance (subject alone ~ subject + family + site)."""
    theta = np.array(default, dtype=np.float64)
    slices = theta_slices(pattern.structure)
    alone = {}
    for a, k in enumerate(pattern.order):
        pfa = factor_product_forms(pattern, pf, a)
        alone[a] = pfa.algebra.fit_chunk(pfa, method, START_TOLERANCE, START_MAX_ITERATIONS,
                                         "none")["theta"]
    for a, k in enumerate(pattern.order):
        th = alone[a].copy()
        parent = nested_in(pattern, a)
        if parent is not None:           # fitted alone it carries its parent's variance too
            th = np.sqrt(np.maximum(th ** 2 - alone[parent] ** 2, 0.0))
        rows, cols = tril_indices(pattern.structure.factors[k].n_effects)
        on_diag = rows == cols
        th[:, on_diag] = np.maximum(np.abs(th[:, on_diag]), FLOOR)
        ok = np.isfinite(th).all(axis=1)
        theta[ok, slices[k]] = th[ok]
    return theta


def nested_in(pattern: BlockPattern, b: int) -> int | None:
    """The position of the finest coarser factor in which every level of ``b`` meets one level
    only, when both have one random effect; else None."""
    if pattern.q_at(b) != 1:
        return None
    for a in range(b + 1, pattern.K):
        if pattern.q_at(a) != 1:
            continue
        y = pattern.zz_pairs[a, b][1]
        if y.size and (np.bincount(y, minlength=pattern.l_at(b)) == 1).all():
            return a
    return None
