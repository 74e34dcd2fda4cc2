"""Simulated linear mixed model studies with known truth.

This module owns the generation of test studies: longitudinal designs (fixed-effects matrix
``X``, grouping factors with their per-observation random-effects design columns) and voxel
data drawn from the model

    ``Y[:, v] = X beta_v + sum_k Z_k b_kv + e_v``,  ``b_kv ~ N(0, G_kv)`` per level,
    ``e_v ~ N(0, sigma2_v I)``,

where ``G_kv`` is the *absolute* covariance of factor ``k`` at voxel ``v`` (lme4's
``VarCorr``, i.e. ``sigma2 * D_k`` in the notation of the algorithm card).  Covariances may be
singular (zero variances, perfect correlations) to put voxels on the boundary of the parameter
space, and any observation of any voxel may be marked missing.

It is pure: numpy only, every random draw comes from the ``numpy.random.Generator`` passed in,
and nothing is read or written (no files, no MPI).  The reference-data script
(``scripts/make_reference_data.py``) and, later, study writers call these functions.

Conventions
-----------
* Rows are ordered subject by subject, visits in time order within a subject.
* A factor's levels are coded ``0 .. l_k - 1`` **in order of first appearance** in the rows
  (not sorted).  ``Factor.levels[c]`` is the label of code ``c``.
* ``Factor.Z`` holds the ``q_k`` design columns per observation (e.g. ``1`` and ``time``).  The
  full random-effects matrix has column ``offset_k + level * q_k + effect`` (factor, then level,
  then effect); see :meth:`Design.z_dense` and :meth:`Design.z_coo`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "FactorSpec",
    "Factor",
    "Design",
    "Truth",
    "simulate_design",
    "simulate_voxels",
    "missing_mask",
    "covariance",
    "first_appearance_codes",
]

#: Covariates that :func:`simulate_design` makes; fixed and random effects are chosen from them.
COVARIATES = ("intercept", "time", "time2", "age", "sex", "group")


@dataclass(frozen=True)
class FactorSpec:
    """How :func:`simulate_design` draws one grouping factor.

    Parameters
    ----------
    name : str
        Factor name (e.g. ``"subject"``, ``"site"``).
    effects : tuple of str
        Random effects per level, each the name of a covariate (see ``COVARIATES``);
        ``"intercept"`` is the column of ones.  ``q_k = len(effects)``.
    n_levels : int or None
        Number of levels; ``None`` makes the subject factor (one level per subject).  For a
        nested factor, the number of child levels *per parent level*.
    assign : {"subject", "observation"}
        ``"subject"``: a subject keeps one level for all its rows (the subject is nested in the
        factor); ``"observation"``: each row draws its level (crossed with subject).
    nested_in : str or None
        Name of an earlier factor; the level is drawn among the children of the row's parent
        level and labelled ``"<parent label>_<prefix><j>"`` so labels are unique.
    probs : sequence of float or None
        Level probabilities (length ``n_levels``).  Default: equal, unless ``concentration``.
    concentration : float or None
        Draw level probabilities from a symmetric Dirichlet with this concentration
        (small values give very unbalanced levels).
    prefix : str or None
        Label prefix (default: the name).
    """

    name: str
    effects: tuple[str, ...] = ("intercept",)
    n_levels: int | None = None
    assign: str = "subject"
    nested_in: str | None = None
    probs: Sequence[float] | None = None
    concentration: float | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class Factor:
    """One grouping factor of a design.

    Attributes
    ----------
    name : str
        Factor name.
    labels : ndarray of str, shape (n,)
        Level label of every observation.
    codes : ndarray of int, shape (n,)
        Level code of every observation, ``0 .. l_k - 1`` in order of first appearance.
    levels : tuple of str
        Label of each code.
    effect_names : tuple of str
        Names of the ``q_k`` random effects.
    Z : ndarray, shape (n, q_k)
        Random-effects design columns per observation.
    """

    name: str
    labels: np.ndarray
    codes: np.ndarray
    levels: tuple[str, ...]
    effect_names: tuple[str, ...]
    Z: np.ndarray

    @property
    def n_levels(self) -> int:
        """Number of levels ``l_k``."""
        return len(self.levels)

    @property
    def n_effects(self) -> int:
        """Number of random effects per level ``q_k``."""
        return self.Z.shape[1]


@dataclass(frozen=True)
class Design:
    """A simulated study design.

    Attributes
    ----------
    X : ndarray, shape (n, p)
        Fixed-effects design (no automatic intercept: ``"intercept"`` is a column if asked).
    fixed_names : tuple of str
        Names of the columns of ``X``.
    factors : tuple of Factor
        Grouping factors in column order of the full ``Z``.
    covariates : dict of str to ndarray
        Every per-observation covariate made (``"subject"`` codes, ``"visit"`` index and the
        ``COVARIATES``), for writers that want more than ``X``.
    """

    X: np.ndarray
    fixed_names: tuple[str, ...]
    factors: tuple[Factor, ...]
    covariates: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of observations."""
        return self.X.shape[0]

    @property
    def p(self) -> int:
        """Number of fixed effects."""
        return self.X.shape[1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """First column of each factor in the full ``Z``."""
        out, start = [], 0
        for f in self.factors:
            out.append(start)
            start += f.n_levels * f.n_effects
        return tuple(out)

    @property
    def q(self) -> int:
        """Total number of columns of the full ``Z`` (``sum_k l_k q_k``)."""
        return sum(f.n_levels * f.n_effects for f in self.factors)

    def factor(self, name: str) -> Factor:
        """Return the factor called ``name``."""
        for f in self.factors:
            if f.name == name:
                return f
        raise KeyError(name)

    def z_coo(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates of the full ``Z``: ``(rows, cols, values)``, column order factor/level/effect."""
        rows, cols, vals = [], [], []
        idx = np.arange(self.n)
        for off, f in zip(self.offsets, self.factors):
            for e in range(f.n_effects):
                rows.append(idx)
                cols.append(off + f.codes * f.n_effects + e)
                vals.append(f.Z[:, e])
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def z_dense(self) -> np.ndarray:
        """The full ``Z`` as a dense ``(n, q)`` array (for small checks)."""
        z = np.zeros((self.n, self.q))
        r, c, v = self.z_coo()
        np.add.at(z, (r, c), v)
        return z


@dataclass(frozen=True)
class Truth:
    """The parameters a voxel set was drawn from.

    Attributes
    ----------
    beta : ndarray, shape (v, p)
    covariances : dict of str to ndarray, shape (v, q_k, q_k)
        Absolute covariance of each factor's random effects (lme4's ``VarCorr``).
    sigma2 : ndarray, shape (v,)
        Residual variance.
    random_effects : dict of str to ndarray, shape (v, l_k, q_k)
        The drawn random effects.
    missing : ndarray of bool, shape (n, v)
        ``True`` where the observation was set to NaN.
    """

    beta: np.ndarray
    covariances: dict[str, np.ndarray]
    sigma2: np.ndarray
    random_effects: dict[str, np.ndarray]
    missing: np.ndarray


def first_appearance_codes(labels: Sequence | np.ndarray) -> tuple[np.ndarray, tuple]:
    """Code labels ``0 .. l-1`` in order of first appearance.

    Parameters
    ----------
    labels : array_like, shape (n,)

    Returns
    -------
    codes : ndarray of int64, shape (n,)
    levels : tuple
        ``levels[c]`` is the label of code ``c``.
    """
    labels = np.asarray(labels)
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)].astype(np.int64), tuple(uniq[order].tolist())


def covariance(sd: Sequence[float], corr: np.ndarray | float | None = None) -> np.ndarray:
    """Build a covariance matrix from standard deviations and correlations.

    Parameters
    ----------
    sd : sequence of float, length q
        Standard deviations (zeros allowed: a boundary covariance).
    corr : float or ndarray (q, q), optional
        Correlation matrix, or one correlation used for every off-diagonal pair.  ``1.0``
        gives a perfectly correlated (rank-one) covariance.

    Returns
    -------
    ndarray, shape (q, q)
    """
    sd = np.asarray(sd, dtype=float)
    q = sd.size
    if corr is None:
        r = np.eye(q)
    elif np.ndim(corr) == 0:
        r = np.full((q, q), float(corr))
        np.fill_diagonal(r, 1.0)
    else:
        r = np.asarray(corr, dtype=float)
    return r * np.outer(sd, sd)


def _level_probs(rng: np.random.Generator, spec: FactorSpec, n_levels: int) -> np.ndarray:
    if spec.probs is not None:
        p = np.asarray(spec.probs, dtype=float)
        if p.size != n_levels:
            raise ValueError(f"factor {spec.name!r}: {p.size} probabilities for {n_levels} levels")
        return p / p.sum()
    if spec.concentration is not None:
        return rng.dirichlet(np.full(n_levels, float(spec.concentration)))
    return np.full(n_levels, 1.0 / n_levels)


def simulate_design(
    rng: np.random.Generator,
    n_subjects: int,
    n_visits: int | Sequence[int],
    *,
    fixed: Sequence[str] = ("intercept", "age", "time"),
    factors: Sequence[FactorSpec] = (FactorSpec("subject"),),
    time_jitter: float = 0.15,
) -> Design:
    """Draw a longitudinal design.

    Each subject has a baseline age (years, centred and in decades), a sex and a group
    (0/1), and visits at times ``0, 1, 2, ...`` (years) plus uniform jitter.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness.
    n_subjects : int
        Number of subjects.
    n_visits : int or sequence of int
        Visits per subject (one number for all, or one per subject; 1 is allowed).
    fixed : sequence of str
        Columns of ``X``, each a covariate name from ``COVARIATES``: ``"intercept"`` (ones),
        ``"time"`` (years since baseline), ``"time2"`` (time squared), ``"age"`` (age at the
        visit minus 50, in decades), ``"sex"``, ``"group"``.
    factors : sequence of FactorSpec
        Grouping factors, in the column order of ``Z``.  Exactly the spec with
        ``n_levels=None`` is the subject factor.
    time_jitter : float
        Half-width of the uniform jitter added to the visit times.

    Returns
    -------
    Design
    """
    visits = np.broadcast_to(np.asarray(n_visits, dtype=int), (n_subjects,))
    if np.any(visits < 1):
        raise ValueError("every subject needs at least one visit")
    subj = np.repeat(np.arange(n_subjects), visits)
    visit = np.concatenate([np.arange(k) for k in visits])
    n = subj.size
    time = visit + rng.uniform(-time_jitter, time_jitter, n)
    time[visit == 0] = 0.0
    base_age = rng.normal(50.0, 10.0, n_subjects)
    cov = {
        "subject": subj,
        "visit": visit,
        "intercept": np.ones(n),
        "time": time,
        "time2": time**2,
        "age": (base_age[subj] + time - 50.0) / 10.0,
        "sex": rng.integers(0, 2, n_subjects)[subj].astype(float),
        "group": rng.integers(0, 2, n_subjects)[subj].astype(float),
    }
    for name in fixed:
        if name not in COVARIATES:
            raise ValueError(f"unknown fixed effect {name!r}; choose from {COVARIATES}")
    X = np.column_stack([cov[name] for name in fixed])

    made: dict[str, Factor] = {}
    out = []
    for spec in factors:
        for e in spec.effects:
            if e not in COVARIATES:
                raise ValueError(f"factor {spec.name!r}: unknown effect {e!r}")
        prefix = spec.name if spec.prefix is None else spec.prefix
        if spec.n_levels is None:
            labels = np.array([f"{prefix}{s:03d}" for s in subj])
        else:
            units = subj if spec.assign == "subject" else np.arange(n)
            n_units = n_subjects if spec.assign == "subject" else n
            if spec.assign not in ("subject", "observation"):
                raise ValueError(f"factor {spec.name!r}: assign must be 'subject' or 'observation'")
            probs = _level_probs(rng, spec, spec.n_levels)
            draw = rng.choice(spec.n_levels, size=n_units, p=probs)
            if spec.nested_in is None:
                unit_labels = np.array([f"{prefix}{j + 1:02d}" for j in draw])
            else:
                parent = made[spec.nested_in]
                # the parent label of each unit (its first row when units are subjects)
                first_row = np.searchsorted(units, np.arange(n_units)) if spec.assign == "subject" else np.arange(n)
                unit_labels = np.array(
                    [f"{parent.labels[r]}_{prefix}{j + 1}" for r, j in zip(first_row, draw)]
                )
            labels = unit_labels[units]
        codes, levels = first_appearance_codes(labels)
        Z = np.column_stack([cov[e] for e in spec.effects])
        f = Factor(spec.name, labels, codes, tuple(levels), tuple(spec.effects), Z)
        made[spec.name] = f
        out.append(f)
    return Design(X=X, fixed_names=tuple(fixed), factors=tuple(out), covariates=cov)


def _per_voxel(value, n_voxels: int, shape: tuple[int, ...], what: str) -> np.ndarray:
    a = np.asarray(value, dtype=float)
    if a.shape == shape:
        a = np.broadcast_to(a, (n_voxels,) + shape)
    if a.shape != (n_voxels,) + shape:
        raise ValueError(f"{what}: expected shape {shape} or {(n_voxels,) + shape}, got {a.shape}")
    return np.array(a)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """A square root ``L`` with ``L L' = c`` for stacked symmetric PSD matrices (singular allowed)."""
    lam, vec = np.linalg.eigh(c)
    if np.any(lam < -1e-10 * np.maximum(1.0, np.abs(lam).max())):
        raise ValueError("covariance is not positive semi-definite")
    return vec * np.sqrt(np.clip(lam, 0.0, None))[..., None, :]


def simulate_voxels(
    rng: np.random.Generator,
    design: Design,
    n_voxels: int,
    beta,
    covariances: Mapping[str, np.ndarray],
    sigma2,
    missing: np.ndarray | None = None,
) -> tuple[np.ndarray, Truth]:
    """Draw voxel data from the linear mixed model.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness.
    design : Design
        The study design.
    n_voxels : int
        Number of voxels ``v``.
    beta : array_like, shape (p,) or (v, p)
        Fixed effects (a large intercept, e.g. 1000, tests numerical centring).
    covariances : mapping of str to array_like, shape (q_k, q_k) or (v, q_k, q_k)
        Absolute covariance of each factor's random effects; a factor left out has zero
        covariance.  Singular (positive semi-definite) matrices are allowed.
    sigma2 : float or array_like, shape (v,)
        Residual variance.
    missing : ndarray of bool, shape (n, v), optional
        ``True`` marks an observation to set to NaN (see :func:`missing_mask`).

    Returns
    -------
    Y : ndarray, shape (n, v)
        The data, NaN where missing.
    truth : Truth
    """
    n, v = design.n, n_voxels
    b = _per_voxel(beta, v, (design.p,), "beta")
    s2 = _per_voxel(sigma2, v, (), "sigma2")
    unknown = set(covariances) - {f.name for f in design.factors}
    if unknown:
        raise ValueError(f"covariances given for unknown factors {sorted(unknown)}")
    Y = design.X @ b.T
    covs, effects = {}, {}
    for f in design.factors:
        q = f.n_effects
        g = _per_voxel(covariances.get(f.name, np.zeros((q, q))), v, (q, q), f"covariance {f.name}")
        root = _psd_sqrt(0.5 * (g + np.swapaxes(g, -1, -2)))  # (v, q, q)
        u = rng.standard_normal((v, f.n_levels, q))
        re = np.einsum("vij,vlj->vli", root, u)  # (v, l, q)
        Y += np.einsum("nq,vnq->nv", f.Z, re[:, f.codes, :])
        covs[f.name], effects[f.name] = g, re
    Y += rng.standard_normal((n, v)) * np.sqrt(s2)
    if missing is None:
        miss = np.zeros((n, v), dtype=bool)
    else:
        miss = np.asarray(missing, dtype=bool)
        if miss.shape != (n, v):
            raise ValueError(f"missing: expected shape {(n, v)}, got {miss.shape}")
    Y[miss] = np.nan
    return Y, Truth(beta=b, covariances=covs, sigma2=s2, random_effects=effects, missing=miss.copy())


def missing_mask(
    rng: np.random.Generator,
    design: Design,
    n_voxels: int,
    fraction=0.0,
    whole_levels=0,
    factor: str = "subject",
) -> np.ndarray:
    """Per-voxel missingness patterns.

    For each voxel, first ``whole_levels[v]`` randomly chosen levels of ``factor`` lose all
    their rows, then further rows chosen at random are removed until
    ``round(fraction[v] * n)`` rows are missing in total (never fewer than the whole levels
    removed).  Every voxel draws its own pattern.

    Parameters
    ----------
    rng : numpy.random.Generator
    design : Design
    n_voxels : int
    fraction : float or array_like, shape (v,)
        Target fraction of missing rows per voxel (0 keeps the voxel complete).
    whole_levels : int or array_like, shape (v,)
        Number of whole levels of ``factor`` to remove per voxel.
    factor : str
        The factor whose levels are removed whole.

    Returns
    -------
    ndarray of bool, shape (n, v)
        ``True`` where missing.
    """
    n = design.n
    frac = np.broadcast_to(np.asarray(fraction, dtype=float), (n_voxels,))
    whole = np.broadcast_to(np.asarray(whole_levels, dtype=int), (n_voxels,))
    codes = design.factor(factor).codes
    n_levels = design.factor(factor).n_levels
    mask = np.zeros((n, n_voxels), dtype=bool)
    for j in range(n_voxels):
        if whole[j]:
            gone = rng.choice(n_levels, size=whole[j], replace=False)
            mask[np.isin(codes, gone), j] = True
        extra = int(round(frac[j] * n)) - int(mask[:, j].sum())
        if extra > 0:
            free = np.flatnonzero(~mask[:, j])
            mask[rng.choice(free, size=extra, replace=False), j] = True
    return mask
