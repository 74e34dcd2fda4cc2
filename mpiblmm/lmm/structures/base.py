"""The interface every random-effects structure implements, and what they share.

An :class:`Algebra` is chosen once per design (:func:`~mpiblmm.lmm.structures.choose`) and
stored on :class:`~mpiblmm.lmm.model.ProductForms` as ``pf.algebra``.  Fisher Scoring, the
scores, the polish, Satterthwaite, the estimator and the chunk analysis call its methods and
never ask which structure it is.  What a structure owns:

- the layout of Z'Z in the product forms (:meth:`zz_products`) and of Z'V^-1Z
  (:meth:`diagonal_blocks`);
- the evaluation: the V^-1 products and log|V| (:meth:`vinv_products`), the profiled fit with
  whatever sums the scores need formed in the same pass (:meth:`profiled`);
- the score and information sums (:meth:`score_information`, :meth:`information_dd`,
  :meth:`score_sums`) and the Satterthwaite sums (:meth:`pair_tensor`, :meth:`satterthwaite`);
- how a chunk is fitted (:meth:`fit_chunk`) and the step-halving policy of Fisher Scoring
  (:meth:`halving_groups`, :attr:`lazy_halvings`);
- its memory per voxel (:meth:`fit_bytes_per_voxel`, :meth:`zz_values_per_voxel`).

A structure that cannot do something (the blocked path has no Z parts) raises
``NotImplementedError`` with the reason.
"""

from __future__ import annotations

import numpy as np

from ..likelihood import gls, loglik, profiled_s2
from ..model import RandomStructure
from ..scores import z_score_information
from ..theta import n_theta


def batched_halving_groups(max_halvings: int) -> list[list[int]]:
    """Halving exponents evaluated together: [0], [1, 2, 3], [4, ..., max_halvings]."""
    hs = list(range(max_halvings + 1))
    return [g for g in (hs[:1], hs[1:4], hs[4:]) if g]


def single_halving_groups(max_halvings: int) -> list[list[int]]:
    """Halving exponents one by one: [0], [1], ..., [max_halvings]."""
    return [[h] for h in range(max_halvings + 1)]


def scoring_bytes(per: int, structure: RandomStructure, p: int) -> int:
    """Bytes per voxel of a Fisher Scoring fit whose own arrays take ``per`` values."""
    m = n_theta(structure)
    return 8 * (per + 20 * (p * p + m * m + p) + 64)


class Algebra:
    """The random-effects algebra of one structure (see the module docstring)."""

    #: Name of the structure (for messages and benchmarks).
    name = "?"
    #: The blocked pattern (:class:`~mpiblmm.lmm.blocked.pattern.BlockPattern`) or None.
    pattern = None
    #: Fisher Scoring evaluates halved steps for ``l`` only, and forms the score sums of the
    #: accepted ones afterwards (:meth:`score_sums`).
    lazy_halvings = False
    #: A chunk may fit its complete-data (shared product forms) and missing-data voxels as one
    #: group: the algebra gives a voxel the same bits with shared or per-voxel product forms.
    joint_groups = False
    #: Evaluations read the chunk's product forms in place through a subset's rows
    #: (:class:`~mpiblmm.lmm.model.VoxelRows`) instead of a copy of them.
    reads_rows = False

    def __init__(self, structure: RandomStructure):
        self.structure = structure

    # -- product forms
    def zz_products(self, rd, weights: np.ndarray) -> np.ndarray:
        """Z'Z of every voxel (column of ``weights`` (n, v|1)) in this structure's layout."""
        raise NotImplementedError

    def zz_values_per_voxel(self, p: int) -> int:
        """Number of float64 values of one voxel's Z'Z (the chunk memory estimate)."""
        raise NotImplementedError

    def effect_sums(self, pf) -> tuple[np.ndarray, ...]:
        """Per factor, the diagonal of each level's block of Z'Z, (v|1, l_k, q_k): an
        effect's sum of squares over the level's observed rows (its row count for an
        intercept); what :mod:`~mpiblmm.lmm.probe` measures replication with."""
        raise NotImplementedError

    def fit_bytes_per_voxel(self, p: int) -> int:
        """A generous estimate of the working memory of one voxel inside a fit (bytes)."""
        raise NotImplementedError

    # -- evaluation
    def vinv_products(self, pf, lambdas: tuple[np.ndarray, ...], need_z: bool):
        """:class:`~mpiblmm.lmm.likelihood.VinvProducts` at ``D_k = Lambda_k Lambda_k'``."""
        raise NotImplementedError

    def profiled(self, pf, lambdas: tuple[np.ndarray, ...], method: str, need_z: bool):
        """``(vp, beta, ete, s2, sums)``: the V^-1 products, GLS ``beta``, ``e'V^-1e``, the
        profiled ``s2`` and the score sums formed in the same pass (None: the scores use the
        Z parts of ``vp``).  ``need_z``: the scores will be needed at this point."""
        vp = self.vinv_products(pf, lambdas, need_z)
        beta, ete = gls(vp)
        s2 = profiled_s2(ete, pf.n, pf.p, method)
        return vp, beta, ete, s2, None

    def profiled_llh(self, pf, lambdas: tuple[np.ndarray, ...], method: str, need_z: bool):
        """``(llh, beta, s2, vp, sums)``: :meth:`profiled` and lme4's ``logLik`` there."""
        vp, beta, ete, s2, sums = self.profiled(pf, lambdas, method, need_z)
        with np.errstate(divide="ignore", invalid="ignore"):
            llh = loglik(vp, pf.n, s2, ete, method)
        return llh, beta, s2, vp, sums

    def failed_products(self, pf, need_z: bool):
        """``(vp, sums)`` of one voxel whose algebra failed: NaN, shaped as :meth:`profiled`'s."""
        raise NotImplementedError

    # -- scores and information
    def diagonal_blocks(self, vp, k: int) -> np.ndarray:
        """``R_kjkj = Z_kj'V^-1Z_kj`` (v, l_k, q_k, q_k) from the Z parts of ``vp``."""
        raise NotImplementedError

    def information_dd(self, vp, blocks, cross: bool = False):
        """Expected information of the vech(D_k), ``I_Dk1,Dk2 = 1/2 sum_ij R_ij (x) R_ij``
        (:mod:`~mpiblmm.lmm.scores`): the (v, m, m) matrix over all factors when ``cross``,
        else its diagonal blocks, one (v, m_k, m_k) per factor."""
        raise NotImplementedError

    def score_information(self, pf, lambdas, vp, beta, s2, method: str, cross: bool = False,
                          sums=None):
        """See :func:`~mpiblmm.lmm.scores.score_information`."""
        return z_score_information(self, vp, beta, s2, method, cross)

    def score_sums(self, pf, lambdas, ev, method: str):
        """The score sums of :meth:`profiled` at a point evaluated without them (``ev``, a
        :class:`~mpiblmm.lmm.fisher.Evaluation`), with the bits :meth:`profiled_llh` would
        have given them."""
        raise NotImplementedError

    def halving_groups(self, max_halvings: int) -> list[list[int]]:
        """Step-halving exponents Fisher Scoring evaluates together, in order."""
        return single_halving_groups(max_halvings)

    # -- Satterthwaite
    def pair_tensor(self, vp, k: int, k2: int, U1, U2, W1, W2, A, s2) -> np.ndarray:
        """``T[a,b,c,d]`` of :func:`~mpiblmm.lmm.satterthwaite.deviance_hessian` for the factor
        pair ``(k, k2)``: its sums over level pairs."""
        raise NotImplementedError

    def satterthwaite(self, pf, varpar: np.ndarray, method: str):
        """``Cov(beta)`` (v, p, p), its Jacobian (v, m, p, p) and the deviance Hessian
        (v, m, m) at ``varpar = (theta, sigma)`` (:mod:`~mpiblmm.lmm.satterthwaite`)."""
        raise NotImplementedError

    # -- fitting
    def fit_chunk(self, pf, method: str, tolerance: float, max_iterations: int,
                  polish_mode: str) -> dict:
        """Fit every voxel of ``pf`` (see :func:`~mpiblmm.lmm.estimate._fit_chunk`)."""
        raise NotImplementedError
