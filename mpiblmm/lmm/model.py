"""The data structures the numerical core passes around: random-effects layout, product forms.

Notation (see docs/NOTATION.md): for each voxel ``Y = X beta + Z b + e`` with
``e ~ N(0, s2 I_n)`` and ``b ~ N(0, s2 D)``, ``D = blockdiag_k (I_{l_k} (x) D_k)``.
Factor ``k`` has ``l_k`` levels and ``q_k`` random effects per level.  Columns of ``Z`` are
ordered factor, then level, then effect, so factor ``k`` level ``j`` effect ``e`` is column
``offset_k + j * q_k + e``.  ``D_k`` is *relative* to ``s2``; lme4's ``VarCorr`` is ``s2 * D_k``.

Every per-voxel array has the voxel axis first.  Arrays that are the same for all voxels
(complete data) carry a leading axis of length 1 and broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RandomFactor:
    """One grouping factor: its name, number of levels ``l`` and random effects per level ``q``."""

    name: str
    n_levels: int
    n_effects: int
    effect_names: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Number of columns of Z that belong to this factor (``l * q``)."""
        return self.n_levels * self.n_effects

    @property
    def n_vech(self) -> int:
        """Number of free parameters of the unstructured ``q x q`` covariance."""
        return self.n_effects * (self.n_effects + 1) // 2


@dataclass(frozen=True)
class RandomStructure:
    """The random-effects layout: the factors in column order of ``Z``."""

    factors: tuple[RandomFactor, ...]

    @property
    def q(self) -> int:
        """Total number of columns of Z."""
        return sum(f.width for f in self.factors)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First column of each factor in Z."""
        out, start = [], 0
        for f in self.factors:
            out.append(start)
            start += f.width
        return tuple(out)

    @property
    def is_single_factor(self) -> bool:
        """True when Z'Z and M are block diagonal (``l`` blocks of ``q_1 x q_1``)."""
        return len(self.factors) == 1

    def slices(self) -> tuple[slice, ...]:
        """Column slice of each factor in Z."""
        return tuple(slice(o, o + f.width) for o, f in zip(self.offsets, self.factors))


@dataclass(frozen=True)
class ProductForms:
    """Sufficient statistics of a chunk of ``v`` voxels (the only data a fit needs).

    Shapes (``v`` voxels, or 1 where shared by every voxel of the chunk):

    - ``XtX`` (v|1, p, p), ``XtY`` (v, p), ``YtY`` (v,)
    - ``ZtX`` (v|1, q, p), ``ZtY`` (v, q)
    - ``ZtZ``: in the layout of ``algebra``: one factor (v|1, l, q1, q1), the diagonal
      blocks (the rest is zero); dense (v|1, q, q); blocked (v|1, n_zz), the non-zero blocks.
    - ``n`` (v,) number of observations used at each voxel.
    - ``y_offset`` (v, p): ``Y`` was centred as ``Y - X y_offset`` before forming the products
      (so ``Y'Y`` keeps its digits); add it back to the estimated ``beta``.  Exact for ML and
      REML because ``beta`` is free.
    - ``shared``: X'X, Z'X and Z'Z are shared by every voxel (leading axis 1).  Said
      explicitly, not read from the shapes: with one voxel, per-voxel arrays have a leading
      axis of 1 too, and a voxel must take the same arithmetic path whatever chunk it is in.
    - ``algebra``: the random-effects algebra (:mod:`~mpiblmm.lmm.structures`) chosen once
      from the design: it owns the Z'Z layout, the V^-1 products, the score and information
      sums, Satterthwaite and how a chunk is fitted.  The numerics call its methods and never
      ask which structure it is.
    """

    XtX: np.ndarray
    XtY: np.ndarray
    YtY: np.ndarray
    ZtX: np.ndarray
    ZtY: np.ndarray
    ZtZ: np.ndarray
    n: np.ndarray
    structure: RandomStructure
    y_offset: np.ndarray | None = None
    shared: bool = False
    algebra: object | None = None
    #: (v,) the relative size below which a voxel's residuals count as constant data
    #: (:func:`~mpiblmm.lmm.products.constant_rtol`); None: the float32 one for every voxel
    rtol_constant: np.ndarray | None = None

    @property
    def blocks(self):
        """The blocked pattern of the algebra, or None (for tests and benchmarks)."""
        return self.algebra.pattern

    @property
    def n_voxels(self) -> int:
        return int(self.XtY.shape[0])

    @property
    def p(self) -> int:
        return int(self.XtY.shape[1])

    def subset(self, index: np.ndarray) -> "ProductForms":
        """:meth:`take`, or these forms themselves when ``index`` is every voxel in order (no
        copy; what is prepared from them once, e.g. the blocked kernel's layout, is reused)."""
        index = np.asarray(index)
        if index.size == self.n_voxels and np.array_equal(index, np.arange(index.size)):
            return self
        return self.take(index)

    def voxels(self, index: np.ndarray) -> "ProductForms | VoxelRows":
        """The forms of the voxels ``index`` for an evaluation: :meth:`take`'s copy, or a
        :class:`VoxelRows` of these forms where the algebra reads them in place through the
        rows (``algebra.reads_rows``: the compiled one-factor kernel), which saves copying a
        subset's Z'Z and Z'X every iteration.  Same bits either way."""
        if self.algebra is not None and self.algebra.reads_rows:
            return VoxelRows(self, index)
        return self.take(index)

    def take(self, index: np.ndarray) -> "ProductForms":
        """The product forms of a subset of voxels (shared arrays stay shared)."""

        def pick(a: np.ndarray) -> np.ndarray:
            return a if self.shared else a[index]

        return ProductForms(
            XtX=pick(self.XtX), XtY=self.XtY[index], YtY=self.YtY[index],
            ZtX=pick(self.ZtX), ZtY=self.ZtY[index], ZtZ=pick(self.ZtZ),
            n=self.n[index], structure=self.structure,
            y_offset=None if self.y_offset is None else self.y_offset[index],
            shared=self.shared, algebra=self.algebra,
            rtol_constant=None if self.rtol_constant is None else self.rtol_constant[index],
        )


class VoxelRows:
    """Some voxels of a chunk's :class:`ProductForms`, not copied: voxel ``i`` is row
    ``rows[i]`` of ``forms``.  The compiled one-factor kernel reads the rows in place
    (``level_kernel.py``); any other reader of an array (``XtX``, ``ZtZ``, ``n``, ...) gets
    that of :meth:`ProductForms.take`'s copy, made once."""

    _COPIED = frozenset(("XtX", "XtY", "YtY", "ZtX", "ZtY", "ZtZ", "n", "y_offset",
                         "rtol_constant"))

    def __init__(self, forms: ProductForms, rows):
        self.forms = forms
        self.rows = np.arange(forms.n_voxels)[rows] if isinstance(rows, slice) else rows
        self.structure, self.algebra, self.shared = forms.structure, forms.algebra, forms.shared
        self._copy = None

    @property
    def n_voxels(self) -> int:
        return int(self.rows.shape[0])

    @property
    def p(self) -> int:
        return self.forms.p

    def __getattr__(self, name: str):
        if name not in VoxelRows._COPIED:
            raise AttributeError(name)
        if self._copy is None:
            self._copy = self.forms.take(self.rows)
        return getattr(self._copy, name)

    def take(self, index) -> "VoxelRows":
        return VoxelRows(self.forms, self.rows[index])

    voxels = take


@dataclass(frozen=True)
class Parameters:
    """Variance parameters of ``v`` voxels: ``s2`` (v,) and one ``D_k`` (v, q_k, q_k) per factor.

    ``D_k`` is relative to ``s2``: the random-effect covariance is ``s2 * D_k``.
    """

    s2: np.ndarray
    D: tuple[np.ndarray, ...]

    def covariances(self) -> tuple[np.ndarray, ...]:
        """Absolute random-effect covariances (lme4's ``VarCorr``): ``s2 * D_k``."""
        return tuple(self.s2[:, None, None] * Dk for Dk in self.D)


# Per-voxel statistics of a T and of an F contrast (the results file's dataset names).
T_STATS = ("estimate", "se", "t", "df", "p", "neglog10p")
F_STATS = ("F", "df_num", "df_den", "p", "neglog10p", "r2")



def result_datasets(p: int, factors, contrasts) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every per-voxel result, in creation order: path -> (shape after the voxel axis, dtype).

    The one description of the results layout: a chunk's output
    (:func:`~mpiblmm.lmm.analysis.empty_results`) and the results file
    (:class:`mpiblmm.io.results.ResultsLayout`) are both made from it.  ``factors``: (name,
    q_k) pairs; ``contrasts``: (name, kind) pairs, kind "T" or "F".
    """
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "status": ((), "u1"), "n": ((), "i4"), "iterations": ((), "i4"),
        "beta": ((p,), "f8"), "sigma2": ((), "f8"), "llh": ((), "f8"),
        "cov_beta": ((p, p), "f8"),
    }
    for name, q in factors:
        out[f"random/{name}/cov"] = ((q, q), "f8")
    for name, kind in contrasts:
        for stat in T_STATS if kind == "T" else F_STATS:
            out[f"contrasts/{name}/{stat}"] = ((), "f8")
    return out


# Status codes of a voxel, shared by the estimator and the results file.
STATUS_CODES: dict[int, str] = {
    0: "fitted and converged",
    1: "fitted; hit the iteration cap before converging",
    2: "fitted; singular fit (a random-effect covariance is on the boundary)",
    3: ("not fitted: too few observations (below min_n or min_fraction, or not more than "
        "the rank of X on the observed rows)"),
    4: ("not fitted: design matrix X is nearly rank deficient on the observed rows "
        "(exactly rank deficient: fitted without the dependent columns, as lme4)"),
    5: ("not fitted: numerical failure (non-finite values in the fit, or observed values "
        "beyond 1e100 or, not zero, all below 1e-100 in size: rescale such images)"),
    6: "not fitted: no observations",
    7: "not fitted: observed data are constant (no residual variance)",
    9: ("not fitted: random effects not identifiable on the observed rows (every factor "
        "needs 2 or more observed levels, and observations must exceed levels x effects of "
        "every factor); or the fixed and random effects fit the observed rows exactly "
        "(rank of [X Z] equals the observations) or fit the data exactly (the fit's "
        "residual variance vanishes, e.g. data constant within each subject), so the "
        "residual variance is not identifiable; or, under REML, the fixed effects absorb a "
        "random effect on the observed rows (its column on every observed level lies in the "
        "span of X), so its variance is not identifiable"),
}
STATUS_CONVERGED = 0
STATUS_MAX_ITER = 1
STATUS_SINGULAR = 2
STATUS_TOO_FEW = 3
STATUS_RANK_DEFICIENT = 4
STATUS_NUMERICAL = 5
STATUS_EMPTY = 6
STATUS_CONSTANT = 7
STATUS_UNIDENTIFIABLE = 9


def dropped_column_voxels(beta: np.ndarray, status: np.ndarray) -> int:
    """How many fitted voxels (status 0-2) went without some columns of X (NaN in their
    ``beta``: lme4's "fixed-effect model matrix is rank deficient so dropping ..."); ``beta``
    (v, p), ``status`` (v,)."""
    return int(np.isnan(beta[status <= STATUS_SINGULAR]).any(axis=1).sum())


@dataclass(frozen=True)
class FitResult:
    """Per-voxel outcome of the estimator (voxel axis first; NaN where not fitted).

    ``beta`` (v, p) includes ``y_offset``; ``s2`` (v,); ``D`` relative covariances per factor;
    ``cov`` absolute covariances per factor (``s2 * D_k``); ``llh`` (v,) lme4's ``logLik`` for
    ``method``; ``iterations`` (v,); ``status`` (v,) codes of :data:`STATUS_CODES`.
    """

    beta: np.ndarray
    s2: np.ndarray
    D: tuple[np.ndarray, ...]
    llh: np.ndarray
    iterations: np.ndarray
    status: np.ndarray
    method: str
    extras: dict = field(default_factory=dict)

    @property
    def cov(self) -> tuple[np.ndarray, ...]:
        return tuple(self.s2[:, None, None] * Dk for Dk in self.D)

    @property
    def fitted(self) -> np.ndarray:
        """Boolean mask of voxels that hold a fit (status 0, 1 or 2)."""
        return self.status <= STATUS_SINGULAR
