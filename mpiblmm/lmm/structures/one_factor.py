"""One random factor: Z'Z, S and M are block diagonal, one ``q_1 x q_1`` block per level.

The evaluation, the score and information sums and the Satterthwaite sums are per-level
closed forms (:mod:`.levels`, :mod:`.level_satterthwaite`) on (v, l) arrays; the profiled
fit forms the level sums of the scores in the same pass.  A chunk is fitted by Fisher Scoring
then the theta polish (:mod:`~mpiblmm.lmm.scoring`), with few step halvings before the polish
and the halvings evaluated in groups, lazily (for ``l`` only).
"""

from __future__ import annotations

import numpy as np

from ..likelihood import VinvProducts
from ..row_outer import row_outer_matrix, weighted_sums
from ..satterthwaite import level_sum
from ..scores import vech_information, vech_score, z_score_information
from ..scoring import fit_scoring_polish
from .base import Algebra, batched_halving_groups, scoring_bytes
from .level_satterthwaite import level_setup
from . import level_kernel
from .levels import (LevelSums, level_sums, products_and_sums, profiled_llh, vinv_single,
                     vinv_single_fast)

#: Step halvings of one-factor Fisher Scoring when the polish follows.  A voxel that no
#: halving down to 1/8 helps is on (or next to) the boundary, where the eigenvalue clip
#: stalls; the polish takes it from there.  On a demo-like chunk only 10% of the voxels that
#: tried the halvings 1/16 .. 1/1024 took one (tiny progress) and the polish reached the same
#: optimum without them, at ~2.4 evaluations per voxel less (10-15% of the fit).
FS_HALVINGS_BEFORE_POLISH = 3

#: When the polish follows, Fisher Scoring hands a voxel over to it once two steps in a row
#: end with a clipped eigenvalue of D (below HANDOVER relative: rounding): FS only creeps
#: along the boundary there, and the polish is what finds the boundary optimum.  (After one
#: such step the optimum is often interior -- an overshoot -- and the polish, started on the
#: boundary, took up to 34 iterations where FS took 10.)  Demo-like study: FS iterations per
#: voxel 5.0 -> 4.6 (complete data) and 6.2 -> 5.3 (missing data), the slowest voxel's
#: 12 -> 9 and 18 -> 13; polish unchanged on average; l within 1e-12.
HANDOVER = 1e-12


def _sums_at(pf, lam, vp, beta, s2, method: str) -> LevelSums:
    """The :class:`LevelSums` at a point evaluated without them (its ``vp``, GLS ``beta`` and
    ``s2``), with the bits an evaluation with the sums gives them: where the kernel applies,
    its one call again (the sums at its own GLS fit, A by the Cholesky factor -- not at
    numpy's inverse of X'V^-1X); else the numpy path at ``A = (X'V^-1X)^-1``."""
    if level_kernel.applies(lam.shape[-1]):
        return profiled_llh(pf, lam, method, True)[4]
    A = np.linalg.inv(vp.XtViX) if method == "REML" else None
    return level_sums(pf, lam, beta, s2, A)


class OneFactor(Algebra):
    """The algebra of a single grouping factor (see the module docstring)."""

    name = "one factor"
    lazy_halvings = True
    joint_groups = True          # levels.py: shared Z'X is broadcast, the same arithmetic

    # -- product forms
    def zz_products(self, rd, weights: np.ndarray) -> np.ndarray:
        """The diagonal blocks of Z'Z, (v|1, l, q1, q1)."""
        f = self.structure.factors[0]
        q1, n_levels, n = f.n_effects, f.n_levels, rd.n
        level, eff = rd.cols[:, 0] // q1, np.arange(q1)
        # Column of (level j, a, b) in the flattened (l, q1, q1) layout.
        left = level[:, None] * q1 + eff[None, :]
        P_zz = row_outer_matrix(left, rd.vals, np.broadcast_to(eff, (n, q1)), rd.vals,
                                q1, n_levels * q1 * q1)
        return weighted_sums(P_zz, weights).reshape(-1, n_levels, q1, q1)

    def zz_values_per_voxel(self, p: int) -> int:
        f = self.structure.factors[0]
        return f.n_levels * f.n_effects**2

    def effect_sums(self, pf) -> tuple[np.ndarray, ...]:
        return (np.diagonal(pf.ZtZ, axis1=-2, axis2=-1),)

    def fit_bytes_per_voxel(self, p: int) -> int:
        """About 40 arrays of (l, q1, q1 + p + 1) values."""
        f = self.structure.factors[0]
        return scoring_bytes(40 * f.n_levels * f.n_effects * (f.n_effects + p + 1),
                             self.structure, p)

    # -- evaluation
    def vinv_products(self, pf, lambdas, need_z: bool) -> VinvProducts:
        if not need_z:
            return vinv_single_fast(pf, lambdas[0])
        return vinv_single(pf, lambdas[0], need_z)

    @property
    def reads_rows(self) -> bool:
        """The compiled kernel reads a subset's forms in place (:class:`~..model.VoxelRows`)."""
        return level_kernel.applies(self.structure.factors[0].n_effects)

    def profiled_llh(self, pf, lambdas, method: str, need_z: bool):
        """One call of the compiled kernel where it applies (:func:`.levels.profiled_llh`)."""
        if level_kernel.applies(lambdas[0].shape[-1]):
            return profiled_llh(pf, lambdas[0], method, need_z)
        return super().profiled_llh(pf, lambdas, method, need_z)

    def profiled(self, pf, lambdas, method: str, need_z: bool):
        if need_z:
            # the level sums of the scores instead of the Z parts, in the same pass
            return products_and_sums(pf, lambdas[0], method)
        return super().profiled(pf, lambdas, method, need_z)

    def failed_products(self, pf, need_z: bool):
        p, nan = pf.p, np.full
        vp = VinvProducts(XtViX=nan((1, p, p), np.nan), XtViY=nan((1, p), np.nan),
                          YtViY=nan(1, np.nan), logdetV=nan(1, np.nan))
        sums = LevelSums.nan(1, self.structure.factors[0].n_effects) if need_z else None
        return vp, sums

    # -- scores and information
    def diagonal_blocks(self, vp, k: int) -> np.ndarray:
        return vp.ZtViZ                                      # (v, l, q, q) already

    def information_dd(self, vp, blocks, cross: bool = False):
        """Only ``i = j`` survives: ``M`` is block diagonal, so ``R_ij = 0`` for i != j."""
        R = blocks[0].R
        K = 0.5 * np.einsum("vjac,vjbd->vabcd", R, R)
        info = vech_information(K)
        return info if cross else (info,)

    def score_information(self, pf, lambdas, vp, beta, s2, method: str, cross: bool = False,
                          sums=None):
        """From the :class:`~.levels.LevelSums` when ``vp`` has no Z parts (no (v, l, q, p)
        arrays), else from the Z parts."""
        if vp.ZtViZ is not None:
            return z_score_information(self, vp, beta, s2, method, cross)
        if sums is None:
            sums = _sums_at(pf, lambdas[0], vp, beta, s2, method)
        info = vech_information(0.5 * sums.RR)
        return (sums.G,), (info if cross else (info,)), (vech_score(sums.R),)

    def score_sums(self, pf, lambdas, ev, method: str) -> LevelSums:
        return _sums_at(pf, lambdas[0], ev.vp, ev.beta, ev.s2, method)

    def halving_groups(self, max_halvings: int) -> list[list[int]]:
        """[1], [1/2 .. 1/8], the rest: evaluation memory is bounded by the voxel blocks of
        :mod:`.levels`, so the halvings go in a few calls instead of max_halvings small ones
        (voxels stuck on the boundary try them all)."""
        return batched_halving_groups(max_halvings)

    # -- Satterthwaite
    def pair_tensor(self, vp, k: int, k2: int, U1, U2, W1, W2, A, s2) -> np.ndarray:
        """One factor: ``Z'V^-1Z`` is block diagonal, only ``i = j`` contributes."""
        WA = None if A is None else np.einsum("vjdq,vqp->vjdp", W2, A)
        R = vp.ZtViZ                                                 # (v, l, q, q), i = j
        T = -level_sum(R, R)                                         # [b,c,a,d]
        uu = U1[:, :, :, None] * U2[:, :, None, :]                   # u_j[a] u_j[d]
        T += (2.0 / s2)[:, None, None, None, None] * level_sum(R, uu)
        if WA is not None:
            T += 2.0 * level_sum(R, np.einsum("vjdp,vjap->vjad", WA, W1))
        return np.transpose(T, (0, 3, 1, 2, 4))                      # to [a,b,c,d]

    def satterthwaite(self, pf, varpar: np.ndarray, method: str):
        return level_setup(pf, varpar, method)

    # -- fitting
    def fit_chunk(self, pf, method: str, tolerance: float, max_iterations: int,
                  polish_mode: str) -> dict:
        halvings = {}
        if polish_mode != "none":
            halvings = dict(max_halvings=FS_HALVINGS_BEFORE_POLISH, handover=HANDOVER)
        return fit_scoring_polish(pf, method, tolerance, max_iterations, polish_mode, halvings)
