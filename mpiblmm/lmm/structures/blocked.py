"""Several factors at cohort scale: the blocked Cholesky (:mod:`~mpiblmm.lmm.blocked`).

Z'Z is stored in the block pattern of the design (:class:`~mpiblmm.lmm.blocked.pattern.
BlockPattern`, built once per design): memory per voxel grows with the non-zero blocks,
never with ``q^2``.  The evaluation is :func:`~mpiblmm.lmm.blocked.cholesky.profiled` (no Z
parts), a chunk is fitted by Newton in theta (:func:`~mpiblmm.lmm.blocked.newton.newton`,
whose iterations are reported as Fisher Scoring iterations: there is no separate polish) and
Satterthwaite is :func:`~mpiblmm.lmm.blocked.inference.blocked_setup`.  This module only
adapts those entry points to the :class:`~.base.Algebra` interface.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..blocked import kernel
from ..blocked.inference import blocked_setup
from ..blocked.newton import newton
from ..blocked.pattern import BlockPattern, blocked_bytes_per_voxel, build_pattern, zz_rows
from ..model import RandomStructure
from ..row_outer import weighted_sums
from .base import Algebra

_NO_Z_PARTS = ("the blocked structure has no Z parts: it evaluates, fits and computes "
               "Satterthwaite through mpiblmm.lmm.blocked")


def factor_levels(rd) -> list[np.ndarray]:
    """The level of every observation for each factor (structure order)."""
    out, start = [], 0
    for f, off in zip(rd.structure.factors, rd.structure.offsets):
        out.append((rd.cols[:, start] - off) // f.n_effects)
        start += f.n_effects
    return out


def factor_values(rd) -> list[np.ndarray]:
    """The random-effect covariates (n, q_k) of each factor."""
    out, start = [], 0
    for f in rd.structure.factors:
        out.append(rd.vals[:, start:start + f.n_effects])
        start += f.n_effects
    return out


def pattern_of(rd) -> BlockPattern:
    """The symbolic blocked factorisation of a random design."""
    return build_pattern(rd.structure, factor_levels(rd))


def _zz_matrix(rd, blocks: BlockPattern) -> sp.csc_matrix:
    """Sparse (n, n_zz): row i holds observation i's contributions to the blocked Z'Z."""
    cached = blocks.__dict__.get("_zz_matrix")
    if cached is not None and cached[0] is rd:
        return cached[1]
    cols, vals = zz_rows(blocks, factor_levels(rd), factor_values(rd))
    rows = np.repeat(np.arange(cols.shape[0]), cols.shape[1])
    P = sp.csc_matrix((vals.ravel(), (rows, cols.ravel())), shape=(cols.shape[0], blocks.n_zz))
    blocks.__dict__["_zz_matrix"] = (rd, P)
    return P


class Blocked(Algebra):
    """The algebra of several factors in the blocked layout (see the module docstring)."""

    name = "blocked"

    def __init__(self, structure: RandomStructure, pattern: BlockPattern):
        super().__init__(structure)
        self.pattern = pattern

    # -- product forms
    def zz_products(self, rd, weights: np.ndarray) -> np.ndarray:
        """The non-zero blocks of Z'Z, (v|1, n_zz)."""
        return weighted_sums(_zz_matrix(rd, self.pattern), weights)

    def zz_values_per_voxel(self, p: int) -> int:
        # the compiled kernel's fit needs a few copies of the product forms (its own sizing,
        # fit_bytes_per_voxel, bounds the fit): the Z'Z values themselves; the numpy path's
        # working set is many times that, so the chunk is sized by it: twice it, as
        # analysis.bytes_per_voxel counts 8 copies of this (counted 8 times, chunks were 1
        # voxel at 2 GiB for a crossed design with 1,296 raters, and 4 where 138 fitted in
        # the budget: ~10x the measured peak per voxel; memory audit)
        if kernel.applies(self.pattern):
            return self.pattern.n_zz
        return blocked_bytes_per_voxel(self.pattern, p) // 32

    def fit_bytes_per_voxel(self, p: int) -> int:
        if kernel.applies(self.pattern):
            return kernel.fit_bytes_per_voxel(self.pattern, p)
        return blocked_bytes_per_voxel(self.pattern, p)

    # -- evaluation, scores: through blocked.cholesky inside newton / blocked_setup
    def vinv_products(self, pf, lambdas, need_z: bool):
        raise NotImplementedError(_NO_Z_PARTS)

    def failed_products(self, pf, need_z: bool):
        raise NotImplementedError(_NO_Z_PARTS)

    def score_information(self, pf, lambdas, vp, beta, s2, method, cross=False, sums=None):
        raise NotImplementedError(_NO_Z_PARTS)

    # -- Satterthwaite
    def satterthwaite(self, pf, varpar: np.ndarray, method: str):
        return blocked_setup(self.pattern, pf, varpar, method)

    # -- fitting
    def fit_chunk(self, pf, method: str, tolerance: float, max_iterations: int,
                  polish_mode: str) -> dict:
        """Newton in theta; ``polish_mode`` does not apply (no separate polish)."""
        out = newton(self.pattern, pf, method, tolerance=tolerance,
                     max_iterations=max_iterations)
        return dict(theta=out["theta"], llh=out["llh"], beta=out["beta"], s2=out["s2"],
                    XtViX=out["XtViX"], fs_iterations=out["iterations"],
                    polish_iterations=np.zeros(pf.n_voxels, dtype=np.int64),
                    converged=out["converged"])
