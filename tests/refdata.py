"""Loader for the lme4/lmerTest reference datasets in ``tests/reference/``.

The folder layout and the meaning of every field are described in
``tests/reference/README.md``.  This module needs numpy and scipy only (not mpiblmm), so any
test can use it::

    from refdata import list_datasets, load_dataset, build_z

    ds = load_dataset("slope")
    ds.X, ds.Y                      # (n, p), (n, v) with NaN for missing
    ds.factors[0].codes             # (n,) level codes 0..l-1, order of first appearance
    ds.z_sparse()                   # scipy.sparse csr (n, q), our column order
    ref = ds.reference["REML"]      # also "ML"
    ref.llh, ref.beta, ref.cov["subject"], ref.contrasts["age"]["df"]

Level coding: the levels of a factor are coded ``0 .. l_k - 1`` **in order of first
appearance** in ``factor_<name>.csv`` (row order), not sorted.  The full random-effects matrix
has column ``offset_k + level * q_k + effect`` (factor, then level, then effect), with the
factors in the order of ``dataset.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
METHODS = ("REML", "ML")

__all__ = [
    "REFERENCE_DIR",
    "Factor",
    "Contrast",
    "Reference",
    "Dataset",
    "list_datasets",
    "load_dataset",
    "build_z",
    "level_codes",
]


@dataclass(frozen=True)
class Factor:
    """A grouping factor: labels, codes (order of first appearance), design columns ``Z``."""

    name: str
    labels: np.ndarray  # (n,) str
    codes: np.ndarray  # (n,) int64, 0..l-1
    levels: tuple[str, ...]  # label of each code
    effect_names: tuple[str, ...]
    Z: np.ndarray  # (n, q_k)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_effects(self) -> int:
        return self.Z.shape[1]


@dataclass(frozen=True)
class Contrast:
    """A contrast: ``L`` is always 2-D ``(r, p)``; ``kind`` is ``"T"`` (one row) or ``"F"``."""

    name: str
    L: np.ndarray
    kind: str

    @property
    def rank(self) -> int:
        return self.L.shape[0]


@dataclass(frozen=True)
class Reference:
    """lme4 + lmerTest values for one fitting method; NaN (or ``None``) where lme4 failed.

    Attributes
    ----------
    method : "REML" or "ML"
    llh, sigma2 : ndarray (v,)
    beta : ndarray (v, p)
    cov : dict factor name -> ndarray (v, q_k, q_k), absolute covariance (``VarCorr``)
    theta : ndarray (v, n_theta), lme4's theta grouped by factor in our factor order
    singular : ndarray of bool (v,), ``isSingular(tol = 1e-4)``
    optimizer : list of str (v,), which fit was kept
    n, warnings : ndarray of int (v,), observations used and warnings seen (-1 if failed)
    vcov_beta : ndarray (v, p, p), ``vcov()`` of the kept fit
    llh_by_optimizer : dict optimiser -> ndarray (v,)
    contrasts : dict contrast name -> dict field -> ndarray (v,); T fields ``estimate``,
        ``se``, ``t``, ``df``, ``p``; F fields ``F``, ``df_num``, ``df_den``, ``p``.
    """

    method: str
    llh: np.ndarray
    beta: np.ndarray
    sigma2: np.ndarray
    cov: dict[str, np.ndarray]
    theta: np.ndarray
    singular: np.ndarray
    optimizer: list
    n: np.ndarray
    warnings: np.ndarray
    vcov_beta: np.ndarray
    llh_by_optimizer: dict[str, np.ndarray]
    contrasts: dict[str, dict[str, np.ndarray]]
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def fitted(self) -> np.ndarray:
        """Voxels lme4 fitted (bool, (v,))."""
        return np.isfinite(self.llh)


@dataclass(frozen=True)
class Dataset:
    """One reference dataset (see ``tests/reference/README.md``)."""

    name: str
    description: str
    path: Path
    X: np.ndarray
    fixed_names: tuple[str, ...]
    factors: tuple[Factor, ...]
    Y: np.ndarray
    contrasts: tuple[Contrast, ...]
    truth: dict
    reference: dict[str, Reference]
    meta: dict = field(repr=False, default_factory=dict)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def v(self) -> int:
        return self.Y.shape[1]

    @property
    def q(self) -> int:
        return sum(f.n_levels * f.n_effects for f in self.factors)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, start = [], 0
        for f in self.factors:
            out.append(start)
            start += f.n_levels * f.n_effects
        return tuple(out)

    @property
    def observed(self) -> np.ndarray:
        """``(n, v)`` bool, True where ``Y`` is observed."""
        return np.isfinite(self.Y)

    def factor(self, name: str) -> Factor:
        for f in self.factors:
            if f.name == name:
                return f
        raise KeyError(name)

    def contrast(self, name: str) -> Contrast:
        for c in self.contrasts:
            if c.name == name:
                return c
        raise KeyError(name)

    def z_sparse(self) -> sp.csr_matrix:
        """The full random-effects matrix, ``(n, q)`` csr, our column order."""
        return build_z([f.codes for f in self.factors], [f.Z for f in self.factors],
                       [f.n_levels for f in self.factors])

    def z_dense(self) -> np.ndarray:
        return self.z_sparse().toarray()


def level_codes(labels) -> tuple[np.ndarray, tuple]:
    """Code labels ``0 .. l-1`` in order of first appearance; returns ``(codes, levels)``."""
    labels = np.asarray(labels)
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)].astype(np.int64), tuple(uniq[order].tolist())


def build_z(codes, zs, n_levels=None) -> sp.csr_matrix:
    """Build the sparse random-effects matrix from per-factor codes and design columns.

    Parameters
    ----------
    codes : sequence of ndarray (n,) int
        Level code of each observation, per factor.
    zs : sequence of ndarray (n, q_k)
        Random-effects design columns per factor.
    n_levels : sequence of int, optional
        Levels per factor (default ``codes.max() + 1``).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n, q)
        Column ``offset_k + level * q_k + effect``; ``q = sum_k l_k q_k``.
    """
    if n_levels is None:
        n_levels = [int(np.max(c)) + 1 for c in codes]
    n = np.asarray(codes[0]).shape[0]
    rows, cols, vals = [], [], []
    offset = 0
    for c, z, lk in zip(codes, zs, n_levels):
        c = np.asarray(c, dtype=np.int64)
        z = np.asarray(z, dtype=float).reshape(n, -1)
        qk = z.shape[1]
        for e in range(qk):
            rows.append(np.arange(n))
            cols.append(offset + c * qk + e)
            vals.append(z[:, e])
        offset += lk * qk
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, offset)
    )


def list_datasets() -> list[str]:
    """Names of the datasets present (folders with a ``dataset.json``), sorted."""
    return sorted(p.parent.name for p in REFERENCE_DIR.glob("*/dataset.json"))


def _read_matrix(path: Path) -> np.ndarray:
    a = np.loadtxt(path, delimiter=",", dtype=float, ndmin=2)
    return a


def _arr(values, shape_tail, dtype=float):
    """List per voxel with ``None`` for failed voxels -> array ``(v, *shape_tail)`` with NaN."""
    out = np.full((len(values),) + tuple(shape_tail), np.nan)
    for i, x in enumerate(values):
        if x is not None:
            out[i] = np.asarray(x, dtype=float).reshape(shape_tail)
    return out


def _reference(path: Path, method: str, p: int, factors: tuple[Factor, ...], contrasts) -> Reference:
    raw = json.loads(path.read_text())
    n_theta = max((len(t) for t in raw["theta"] if t is not None), default=0)
    ints = lambda key: np.array([-1 if x is None else int(x) for x in raw[key]], dtype=np.int64)  # noqa: E731
    contr = {}
    for name, fields in raw["contrasts"].items():
        contr[name] = {k: _arr(vals, ()) for k, vals in fields.items()}
    return Reference(
        method=method,
        llh=_arr(raw["llh"], ()),
        beta=_arr(raw["beta"], (p,)),
        sigma2=_arr(raw["sigma2"], ()),
        cov={f.name: _arr(raw["cov"][f.name], (f.n_effects, f.n_effects)) for f in factors},
        theta=_arr(raw["theta"], (n_theta,)),
        singular=np.array([bool(x) for x in raw["singular"]]),
        optimizer=list(raw["optimizer"]),
        n=ints("n"),
        warnings=ints("warnings"),
        vcov_beta=_arr(raw["vcov_beta"], (p, p)),
        llh_by_optimizer={k: _arr(vals, ()) for k, vals in raw["llh_by_optimizer"].items()},
        contrasts=contr,
        raw=raw,
    )


def load_dataset(name: str) -> Dataset:
    """Load dataset ``name`` with its REML and ML references (those present).

    Returns
    -------
    Dataset
        ``reference`` maps ``"REML"``/``"ML"`` to :class:`Reference`; a method whose
        ``lme4_<method>.json`` is absent is left out.
    """
    folder = REFERENCE_DIR / name
    meta = json.loads((folder / "dataset.json").read_text())
    X = _read_matrix(folder / "X.csv")
    Y = _read_matrix(folder / "Y.csv")
    factors = []
    for f in meta["factors"]:
        labels = np.array((folder / f"factor_{f['name']}.csv").read_text().split("\n")[:-1])
        codes, levels = level_codes(labels)
        Z = _read_matrix(folder / f"Z_{f['name']}.csv")
        factors.append(Factor(f["name"], labels, codes, levels, tuple(f["effect_names"]), Z))
    factors = tuple(factors)
    contrasts = []
    for c in meta["contrasts"]:
        w = np.asarray(c["weights"], dtype=float)
        contrasts.append(Contrast(c["name"], np.atleast_2d(w), "T" if w.ndim == 1 else "F"))
    t = meta.get("truth", {})
    truth = dict(t)
    for key in ("beta", "sigma2", "n_missing"):
        if key in t:
            truth[key] = np.asarray(t[key])
    if "cov" in t:
        truth["cov"] = {k: np.asarray(c, dtype=float) for k, c in t["cov"].items()}
    refs = {}
    for m in METHODS:
        path = folder / f"lme4_{m}.json"
        if path.exists():
            refs[m] = _reference(path, m, X.shape[1], factors, contrasts)
    return Dataset(
        name=meta["name"],
        description=meta.get("description", ""),
        path=folder,
        X=X,
        fixed_names=tuple(meta["fixed_names"]),
        factors=factors,
        Y=Y,
        contrasts=tuple(contrasts),
        truth=truth,
        reference=refs,
        meta=meta,
    )
