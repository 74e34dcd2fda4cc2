"""The compiled evaluation of the blocked path (``_kernel.c``, loaded with ctypes).

It serves designs whose random factors all have one effect and whose factorisation has no
dense tail (nested chains such as site / family / subject): one pass per stage with the
voxels of a tile innermost,
where the numpy path (:mod:`.cholesky`, :mod:`.gradient`) makes dozens of passes over arrays
of (entries x voxels).  Same equations, same outputs (log|V|, ``c'c``, and for the gradient
``F`` of equation (1) and the Gram matrices of ``U`` per factor); the numpy path stays as the
reference the tests compare with, and serves every other design.

The plan (index arrays of the pattern) is built once per design.  Set
``MPIBLMM_BLOCKED_KERNEL=0`` to use the numpy path everywhere.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..compiled import load, turned_off
from ..theta import theta_slices
from .pattern import BlockPattern

_i64p = ctypes.POINTER(ctypes.c_int64)
_i32p = ctypes.POINTER(ctypes.c_int32)
_dp = ctypes.POINTER(ctypes.c_double)


#: The version of the C call this module makes (``mpiblmm_kernel_abi`` in ``_kernel.c``).
ABI = 1

#: The switch that turns the kernel off (``=0``).
ENV = "MPIBLMM_BLOCKED_KERNEL"
TURNED_OFF = turned_off(ENV)


def _load():
    lib, why_not = load(f"{__package__}._kernel", ENV, "mpiblmm_kernel_abi", ABI)
    if lib is None:
        return None, 0, why_not
    fn = lib.mpiblmm_scalar_eval
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_int64] * 5 + [_i64p] * 5 + [_i32p] * 2 + [_i64p] + [_i32p] * 3
                   + [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [_i32p] * 3
                   + [ctypes.c_int64, _i32p]
                   + [_dp, ctypes.c_int64, _dp]
                   + [_dp, _dp, ctypes.c_int64]
                   + [_dp, _dp, _i64p, _dp, _dp, _dp, _dp]
                   + [ctypes.c_int, _dp, _dp, _dp])
    return fn, int(lib.mpiblmm_kernel_tile()), ""


#: Why the kernel is not in use ("" when it is): for ``mpiblmm env``.
_EVAL, TILE, WHY_NOT = _load()


def available() -> bool:
    """Whether the compiled kernel was built and loaded."""
    return _EVAL is not None


def applies(pattern: BlockPattern) -> bool:
    """Whether the kernel serves this design: built, one effect per factor, no dense tail."""
    return (_EVAL is not None and pattern.m == 0
            and all(pattern.q_at(a) == 1 for a in range(pattern.K)))


@dataclass(frozen=True, eq=False)
class Plan:
    """The pattern's index arrays in the kernel's layout (see ``_kernel.c``)."""

    levels: np.ndarray
    node_off: np.ndarray
    diag_off: np.ndarray
    cross_off: np.ndarray
    col_start: np.ndarray
    col_row: np.ndarray
    col_y: np.ndarray
    upd_start: np.ndarray
    upd_tgt: np.ndarray
    upd_i1: np.ndarray
    upd_i2: np.ndarray
    upd_off: np.ndarray
    asm_dst: np.ndarray
    asm_pa: np.ndarray
    asm_pb: np.ndarray
    n_diag: int
    fill: np.ndarray
    node_level: np.ndarray
    zz_order: np.ndarray
    theta_cols: np.ndarray

    @property
    def n_nodes(self) -> int:
        return int(self.node_off[-1])


def _i32(parts) -> np.ndarray:
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert out.size == 0 or (out.min() >= 0 and out.max() < 2 ** 31)
    return np.ascontiguousarray(out, np.int32)


def level_ranks(pattern: BlockPattern) -> list[np.ndarray]:
    """Per position, the kernel's place of each level: the coarsest factor keeps its order,
    each finer factor's levels are sorted by their parents' places (the nearest coarser factor
    first), so that consecutive levels meet the same or neighbouring rows (subjects of one
    family, families of one site): the sweeps then walk memory in order instead of at random."""
    K = pattern.K
    rank = [np.empty(0, np.int64)] * K
    for a in reversed(range(K)):
        n = pattern.l_at(a)
        keys = []
        for c in range(a + 1, K):
            x, y, _ = pattern.pairs[c, a]
            if x.size:
                key = np.full(n, np.iinfo(np.int64).max)
                np.minimum.at(key, y, rank[c][x])
                keys.append(key)
        order = np.lexsort([np.arange(n)] + keys[::-1])
        rank[a] = np.empty(n, np.int64)
        rank[a][order] = np.arange(n)
    return rank


def build_plan(pattern: BlockPattern) -> Plan:
    """The kernel's plan of ``pattern`` (which :func:`applies`): the pattern's S values and
    nodes renumbered by :func:`level_ranks` (log|V|, c'c, F and the Gram sums do not depend on
    the numbering)."""
    K = pattern.K
    levels = np.array([pattern.l_at(a) for a in range(K)], np.int64)
    node_off = np.concatenate([[0], np.cumsum(levels)]).astype(np.int64)
    diag_off = np.array([pattern.diag[a].offset for a in range(K)], np.int64)
    rank = level_ranks(pattern)
    node_level = np.empty(node_off[-1], np.int64)
    new = np.empty(pattern.n_vals, np.int64)            # the pattern's S index -> the kernel's
    for a in range(K):
        node_level[node_off[a] + rank[a]] = np.arange(levels[a])
        new[diag_off[a] + np.arange(levels[a])] = diag_off[a] + rank[a]
    col_row, col_y, col_start, cross_off = [], [], [0], np.zeros(K, np.int64)
    for b in range(K):
        if b + 1 < K:                   # column b's cross segments follow one another
            cross_off[b] = pattern.cross[b + 1, b].offset
        old, row, y, fac = [], [], [], []
        for a in pattern.row_factors(b):
            cs = pattern.cross[a, b]
            xa, ya, _ = pattern.pairs[a, b]
            old.append(cs.offset + np.arange(cs.n))
            row.append(node_off[a] + rank[a][xa])
            y.append(rank[b][ya])
            fac.append(np.full(cs.n, a))
        if old:
            old, row, y, fac = (np.concatenate(z) for z in (old, row, y, fac))
            order = np.lexsort((row, fac, y))            # by column level, then row
            new[old[order]] = cross_off[b] + np.arange(old.size)
            col_row.append(row[order])
            col_y.append(y[order])
        col_start.append(col_start[-1] + (old.size if len(old) else 0))
    tgt, i1, i2, off, upd_start = [], [], [], [], [0]
    for b in range(K):
        ups = pattern.updates[b][0]
        if ups:
            t = np.concatenate([new[u.target] for u in ups])
            j1 = np.concatenate([new[pattern.cross[u.a, b].offset + u.i1] for u in ups])
            j2 = np.concatenate([new[pattern.cross[u.c, b].offset + u.i2] for u in ups])
            o = np.concatenate([(u.a != u.c) | (u.i1 != u.i2) for u in ups])
            order = np.lexsort((j2, j1))                 # in the order of the column's entries
            for lst, z in ((tgt, t), (i1, j1), (i2, j2), (off, o)):
                lst.append(z[order])
        upd_start.append(upd_start[-1] + sum(u.i1.size for u in ups))
    asm_dst = np.empty(pattern.n_zz, np.int64)
    asm_pa = np.empty(pattern.n_zz, np.int64)
    asm_pb = np.empty(pattern.n_zz, np.int64)
    segs = [(pattern.zz_diag[a], a, a) for a in range(K)]
    segs += [(seg, a, b) for (a, b), seg in pattern.zz_cross.items()]
    for seg, a, b in segs:
        x = np.arange(seg.n)
        if a == b:
            dest = pattern.diag[a].index(0, 0, x)
        else:
            x0, y0, _ = pattern.zz_pairs[a, b]
            dest = pattern.cross[a, b].index(0, 0, pattern.lookup(a, b, x0, y0))
        asm_dst[seg.offset:seg.offset + seg.n] = new[dest]
        asm_pa[seg.offset:seg.offset + seg.n] = a
        asm_pb[seg.offset:seg.offset + seg.n] = b
    n_diag = int(levels.sum())                # the diagonal segments come first in zz
    assert all(pattern.zz_diag[a].offset == node_off[a] for a in range(K))
    zz_order = np.argsort(asm_dst, kind="stable")    # zz rows in the order of S (diagonal
    asm_dst, asm_pa, asm_pb = asm_dst[zz_order], asm_pa[zz_order], asm_pb[zz_order]  # first)
    assert (asm_dst[:n_diag] == np.arange(n_diag)).all()
    written = np.zeros(pattern.n_vals, bool)
    written[asm_dst] = True
    fill = np.flatnonzero(~written)           # cross entries Z'Z does not store
    slices = theta_slices(pattern.structure)
    theta_cols = np.array([slices[k].start for k in pattern.order], np.int64)
    return Plan(levels, node_off, diag_off, cross_off, np.array(col_start, np.int64),
                _i32(col_row), _i32(col_y), np.array(upd_start, np.int64), _i32(tgt),
                _i32(i1), _i32(i2), np.ascontiguousarray(np.concatenate(off) if off else
                                                         np.zeros(0, bool), np.uint8),
                _i32([asm_dst]), _i32([asm_pa]), _i32([asm_pb]), n_diag, _i32([fill]),
                node_level, zz_order, theta_cols)


def plan_of(pattern: BlockPattern) -> Plan:
    store = pattern.__dict__.setdefault("_numeric_cache", {})
    if "kernel_plan" not in store:
        store["kernel_plan"] = build_plan(pattern)
    return store["kernel_plan"]


def kernel_forms(pattern: BlockPattern, pf) -> tuple:
    """``(zz, (ZX,), (ZY,))``: the product forms in the kernel's order, voxel axis last (done
    once per chunk): ``zz`` (n_zz, v|1) rows in the order of the S values, Z'X (nodes, p, v|1)
    and Z'Y (nodes, v) rows in node order, so that every sweep reads them in turn."""
    plan = plan_of(pattern)
    slices = pattern.structure.slices()
    zx, zy = [], []
    for a, k in enumerate(pattern.order):
        lev = plan.node_level[plan.node_off[a]:plan.node_off[a + 1]]
        zx.append(pf.ZtX[:, slices[k]][:, lev])                                 # (v|1, l, p)
        zy.append(pf.ZtY[:, slices[k]][:, lev])                                 # (v, l)
    ZX = np.ascontiguousarray(np.transpose(np.concatenate(zx, axis=1), (1, 2, 0)))
    ZY = np.ascontiguousarray(np.concatenate(zy, axis=1).T)
    zz = np.ascontiguousarray(pf.ZtZ[:, plan.zz_order].T)
    return zz, (ZX,), (ZY,)


def _p(a: np.ndarray, kind=_dp):
    return a.ctypes.data_as(kind)


@dataclass(frozen=True, eq=False)
class Result:
    """``logdet`` (v,) log|V|; ``G`` (v, r, r) ``c'c``; with the gradient ``F`` (v, K) of
    equation (1) per position and ``gram`` (v, K, r, r) ``sum_x U_x U_x'`` per position."""

    logdet: np.ndarray
    G: np.ndarray
    F: np.ndarray | None = None
    gram: np.ndarray | None = None


def fit_bytes_per_voxel(pattern: BlockPattern, p: int) -> int:
    """Working memory of one voxel in a fit on the kernel's path (bytes, generous): its
    product forms' rows three times over (the chunk's, the kernel's copy in its order, a
    subset's copy in the optimiser), the factors' own fits of the start (a few (levels,
    p + 2) arrays), a tile's scratch as if the voxel had it alone (S values, S^-1 and the
    right-hand sides) and the optimiser's and Satterthwaite's small arrays.  Measured peak
    on issue 9's (b) (tracemalloc, fit + Satterthwaite + a contrast, 64 voxels): 0.5 MB per
    voxel with complete data, 3.3 MB with missing data; this gives 6.3 MB."""
    q, r = pattern.structure.q, p + 1
    forms = q * r + pattern.n_zz
    per = 3 * forms + 3 * q * (p + 2) + 2 * pattern.n_vals + q * r + 20 * (
        p * p + pattern.K * r * r + 64)
    return 8 * int(per)


def _scratch(pattern: BlockPattern, r: int) -> tuple:
    """The kernel's scratch for one tile of :data:`TILE` voxels, kept with the pattern and
    reused by every call (a fresh ~40 MB per call on (b) cost its page faults; one rank
    evaluates one design at a time): S values, right-hand sides, the log accumulators, the
    tile's sums and S^-1."""
    store = pattern.__dict__.setdefault("_numeric_cache", {})
    key = ("kernel_scratch", r)
    if key not in store:
        for old in [k for k in store if k[:1] == ("kernel_scratch",)]:
            del store[old]
        plan, T, K = plan_of(pattern), TILE, pattern.K
        store[key] = (np.empty(pattern.n_vals * T), np.empty(plan.n_nodes * r * T),
                      np.empty(2 * T, np.int64), np.empty(T), np.empty((r * r + K) * T),
                      np.empty(pattern.n_vals * T))
    return store[key]


def _plan_args(pattern: BlockPattern) -> tuple:
    """The plan's arguments of the C call (pointers into the plan's arrays), made once."""
    store = pattern.__dict__.setdefault("_numeric_cache", {})
    if "kernel_args" not in store:
        plan = plan_of(pattern)
        store["kernel_args"] = (
            _p(plan.levels, _i64p), _p(plan.node_off, _i64p), _p(plan.diag_off, _i64p),
            _p(plan.cross_off, _i64p), _p(plan.col_start, _i64p), _p(plan.col_row, _i32p),
            _p(plan.col_y, _i32p), _p(plan.upd_start, _i64p), _p(plan.upd_tgt, _i32p),
            _p(plan.upd_i1, _i32p), _p(plan.upd_i2, _i32p), plan.upd_off.ctypes.data,
            pattern.n_zz, plan.n_diag, _p(plan.asm_dst, _i32p), _p(plan.asm_pa, _i32p),
            _p(plan.asm_pb, _i32p), plan.fill.size, _p(plan.fill, _i32p))
    return store["kernel_args"]


def evaluate(pattern: BlockPattern, prep, theta: np.ndarray, gradient: bool) -> Result:
    """One evaluation at finite ``theta`` (v, n_theta) of the voxels of ``prep``
    (:class:`~.cholesky.Prepared` in the kernel's layout, voxel axis last)."""
    assert prep.kernel, "prepare() gave the numpy layout"
    plan = plan_of(pattern)
    v, p = prep.pf.n_voxels, prep.pf.p
    r, K = p + 1, pattern.K
    zz = np.ascontiguousarray(prep.zz, np.float64)                          # (n_zz, v|1)
    th = np.ascontiguousarray(theta[:, plan.theta_cols].T, np.float64)       # (K, v)
    zx = np.ascontiguousarray(prep.WX[0], np.float64)                       # (nodes, p, v|1)
    zy = np.ascontiguousarray(prep.WY[0], np.float64)                       # (nodes, v)
    vals, c, expo, mant, acc, sig = _scratch(pattern, r)
    logdet = np.empty(v)
    G = np.empty((v, r, r))
    if gradient:
        F, gram = np.empty((v, K)), np.empty((v, K, r, r))
    else:
        F = gram = np.empty(1)
    _EVAL(v, K, r, pattern.n_vals, plan.n_nodes, *_plan_args(pattern),
          _p(zz), int(zz.shape[-1] != 1), _p(th), _p(zx), _p(zy), int(zx.shape[-1] != 1),
          _p(vals), _p(c), _p(expo, _i64p), _p(mant), _p(acc), _p(logdet), _p(G),
          int(gradient), _p(sig), _p(F), _p(gram))
    if not gradient:
        return Result(logdet, G)
    return Result(logdet, G, F, gram)
