"""The symbolic blocked Cholesky of ``S = I + Lambda' Z'Z Lambda``: done once per design.

Nodes are the levels of the factors; factor ``k``'s level ``x`` is a ``q_k x q_k`` block.
Factors are eliminated in order of their number of levels, largest first (position ``a`` of
the elimination order is factor ``order[a]``).  Z'Z couples two factors only where their
levels co-occur in an observation, so its lower block pattern is, per pair of positions
``a > b``, a list of level pairs ``(x, y)`` (``x`` of ``a``, ``y`` of ``b``).

Eliminating factor ``b`` (block diagonal, one Cholesky per level) adds, for every level ``y``
of ``b``, ``L[x, y] L[x', y]'`` to every pair of nodes ``(x, x')`` of column ``y``.  Within a
later factor ``a`` that is a diagonal block when each level of ``b`` meets one level of ``a``
(nesting: subject in family in site) and fill between two levels of ``a`` otherwise
(crossing: subjects x raters).  Factors stay block diagonal (the *prefix*) until the first one
whose block has fill; from it on the remaining factors form one dense matrix (the *tail*, of
size ``m = sum l_k q_k`` over them), which must be small.  Fill between two prefix factors
(``a != c``) is added to their cross pattern.

Everything the numeric factorisation (:mod:`.cholesky`) needs is precomputed here as index
arrays into one flat value array per voxel (see :class:`BlockPattern`), and the sums of the
updates as sparse aggregation matrices with unit weights, so the numeric phase is gathers,
elementwise products and sparse-dense products: each voxel's result depends on its own column
only (bitwise stable under chunking, :mod:`~mpiblmm.lmm.rowwise`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from ...errors import SpecError
from ..model import RandomStructure

#: Largest dense remainder (tail) the blocked path accepts: ``m`` rows of ``m x m`` per voxel.
MAX_TAIL = 2000

#: The tail update of a column factor is one dense (m x l_b q_b) product per voxel when that
#: costs at most this many times the pair-by-pair updates (BLAS against gathers/scatters).
DENSE_TAIL_FACTOR = 32


def join_on(ya: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, k)`` with ``ya[i] == yc[k]``, ordered by ``i`` then ``k``."""
    order = np.argsort(yc, kind="stable")
    ys = yc[order]
    start = np.searchsorted(ys, ya, "left")
    count = np.searchsorted(ys, ya, "right") - start
    i1 = np.repeat(np.arange(ya.size), count)
    first = np.repeat(np.cumsum(count) - count, count)
    i2 = order[np.repeat(start, count) + np.arange(i1.size) - first]
    return i1, i2


def aggregator(targets: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
    """``(uniq, A)``: ``A @ values`` sums the rows of ``values`` with equal ``targets`` into the
    rows ``uniq``.  Unit weights, canonical CSR order: a fixed sequence of additions per
    output entry, the same for every voxel (column)."""
    uniq, inv = np.unique(targets, return_inverse=True)
    A = sp.csr_matrix((np.ones(targets.size), (inv.ravel(), np.arange(targets.size))),
                      shape=(uniq.size, targets.size))
    A.sum_duplicates()
    A.sort_indices()
    return uniq, A


@dataclass(frozen=True, eq=False)
class Segment:
    """A stored block list: ``(q_a, q_b, n)`` values from ``offset`` (entry-major)."""

    offset: int
    qa: int
    qb: int
    n: int

    @property
    def size(self) -> int:
        return self.qa * self.qb * self.n

    def index(self, e1, e2, t) -> np.ndarray:
        return self.offset + (np.asarray(e1) * self.qb + e2) * self.n + t


@dataclass(frozen=True, eq=False)
class Update:
    """Products ``L[a, b][:, :, i1] L[c, b][:, :, i2]'`` of one pair of row factors;
    ``target`` (q_a q_c n,): their flat positions in the S values (lower triangle)."""

    a: int
    c: int
    i1: np.ndarray
    i2: np.ndarray
    target: np.ndarray


@dataclass(frozen=True, eq=False)
class BlockPattern:
    """Symbolic factorisation of one random design (see module docstring).

    Positions ``a`` index the elimination order; ``levels[a]`` and ``q[a]`` are the number of
    levels and effects of factor ``order[a]``.

    - ``zz``: layout of the Z'Z values a voxel stores (``ProductForms.ZtZ`` (v|1, n_zz)):
      ``zz_diag[a]`` (q_a, q_a, l_a) diagonal blocks, ``zz_cross[a, b]`` (q_a, q_b, n) for the
      co-occurring level pairs ``zz_pairs[a, b]`` (a > b).
    - ``S`` values (:mod:`.cholesky`, flat (n_vals, v)): ``diag[b]`` (q_b, q_b, l_b) for prefix
      positions, ``cross[a, b]`` (q_a, q_b, n) for ``b`` in the prefix, pairs ``pairs[a, b]``
      (co-occurrence and fill), and the tail (m, m) at ``tail_offset`` (lower triangle used).
    """

    structure: RandomStructure
    order: tuple[int, ...]
    n_prefix: int
    zz_pairs: dict
    pairs: dict
    n_zz: int = 0
    zz_diag: dict = field(default_factory=dict)
    zz_cross: dict = field(default_factory=dict)
    diag: dict = field(default_factory=dict)
    cross: dict = field(default_factory=dict)
    tail_offset: int = 0
    tail_start: tuple = ()
    m: int = 0
    n_vals: int = 0

    @property
    def K(self) -> int:
        return len(self.order)

    def q_at(self, a: int) -> int:
        return self.structure.factors[self.order[a]].n_effects

    def l_at(self, a: int) -> int:
        return self.structure.factors[self.order[a]].n_levels

    def tail_index(self, a: int, x, e) -> np.ndarray:
        """Row of the tail matrix of factor position ``a``, level ``x``, effect ``e``."""
        return self.tail_start[a] + np.asarray(x) * self.q_at(a) + e

    def lookup(self, a: int, b: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Index of level pairs ``(x, y)`` in ``pairs[a, b]`` (they must be present)."""
        keys = self.pairs[a, b][2]
        want = np.asarray(x, np.int64) * self.l_at(b) + y
        t = np.searchsorted(keys, want)
        assert (keys[np.minimum(t, keys.size - 1)] == want).all()
        return t

    def row_factors(self, b: int) -> list[int]:
        """Later positions with blocks in column factor ``b``."""
        return [a for a in range(b + 1, self.K) if self.pairs[a, b][0].size]

    # ------------------------------------------------------------ numeric plans
    @cached_property
    def updates(self) -> dict:
        """Per prefix position ``b``: the updates and ``(uniq, A)`` that sum them into S."""
        plans = {}
        for b in range(self.n_prefix):
            ups, targets = [], []
            rows = self.row_factors(b)
            dense = self.dense_tail[b] is not None
            for ia, a in enumerate(rows):
                for c in rows[:ia + 1]:
                    if dense and c >= self.n_prefix:
                        continue                 # tail x tail: one dense product per voxel
                    xa, ya, _ = self.pairs[a, b]
                    xc, yc, _ = self.pairs[c, b]
                    i1, i2 = join_on(ya, yc)
                    x1, x2 = xa[i1], xc[i2]
                    if a == c:
                        keep = x1 >= x2
                        i1, i2, x1, x2 = i1[keep], i2[keep], x1[keep], x2[keep]
                    qa, qc = self.q_at(a), self.q_at(c)
                    e1 = np.arange(qa)[:, None, None]
                    e2 = np.arange(qc)[None, :, None]
                    if a == c and a < self.n_prefix:
                        assert (x1 == x2).all()
                        seg = self.diag[a]
                        tgt = seg.index(e1, e2, x1[None, None, :])
                    elif c < self.n_prefix:
                        t = self.lookup(a, c, x1, x2)
                        tgt = self.cross[a, c].index(e1, e2, t[None, None, :])
                    else:
                        r = self.tail_index(a, x1[None, None, :], e1)
                        s = self.tail_index(c, x2[None, None, :], e2)
                        tgt = self.tail_offset + r * self.m + s
                    flat = np.broadcast_to(tgt, (qa, qc, i1.size)).ravel()
                    ups.append(Update(a, c, i1, i2, flat))
                    targets.append(flat)
            if targets:
                plans[b] = (ups, *aggregator(np.concatenate(targets)))
            else:
                plans[b] = (ups, np.zeros(0, np.int64), None)
        return plans

    @cached_property
    def dense_tail(self) -> dict:
        """Per prefix position ``b``: None, or the flat positions in a (m, l_b q_b) matrix of
        the tail rows' blocks ``L[a, b]`` (row factors in order, entries (e1, e2, pair)) when
        the tail's update ``L_Tb L_Tb'`` is cheaper as one dense product per voxel (BLAS,
        the same call for every voxel) than pair by pair (crossed factors)."""
        out = {}
        for b in range(self.n_prefix):
            tails = [a for a in self.row_factors(b) if a >= self.n_prefix]
            qb, lb = self.q_at(b), self.l_at(b)
            if not tails:
                out[b] = None
                continue
            counts = np.zeros(lb, np.int64)
            for a in tails:
                counts += np.bincount(self.pairs[a, b][1], minlength=lb) * self.q_at(a)
            sparse_cost = float((counts * (counts + 1) // 2).sum()) * qb
            if self.m * self.m * lb * qb > DENSE_TAIL_FACTOR * sparse_cost:
                out[b] = None
                continue
            flat = []
            for a in tails:
                x, y, _ = self.pairs[a, b]
                e1 = np.arange(self.q_at(a))[:, None, None]
                e2 = np.arange(qb)[None, :, None]
                row = self.tail_index(a, x[None, None, :], e1)
                col = y[None, None, :] * qb + e2
                flat.append(np.broadcast_to(row * (lb * qb) + col,
                                            (self.q_at(a), qb, x.size)).ravel())
            out[b] = (tails, np.concatenate(flat))
        return out

    def rhs_layout(self, r: int) -> tuple[dict, int, int]:
        """Flat layout of ``Lambda' Z'[X Y]`` with ``r`` columns: prefix positions
        (q_b, l_b, r) from their offsets, then the tail (m, r); returns offsets, tail offset
        and total size."""
        offs, start = {}, 0
        for b in range(self.n_prefix):
            offs[b] = start
            start += self.q_at(b) * self.l_at(b) * r
        return offs, start, start + self.m * r

    def solve_plan(self, r: int) -> dict:
        """Per prefix position ``b``: ``(uniq, A)`` that sums ``L[a, b] c_b`` into the rows
        of the later factors (layout :meth:`rhs_layout`), for ``r`` right-hand sides."""
        cache = self.__dict__.setdefault("_solve_plans", {})
        if r in cache:
            return cache[r]
        offs, tail, _ = self.rhs_layout(r)
        plans = {}
        for b in range(self.n_prefix):
            targets = []
            for a in self.row_factors(b):
                if a >= self.n_prefix and self.dense_tail[b] is not None:
                    continue
                x = self.pairs[a, b][0]
                e = np.arange(self.q_at(a))[:, None, None]
                s = np.arange(r)[None, None, :]
                if a < self.n_prefix:
                    tgt = offs[a] + (e * self.l_at(a) + x[None, :, None]) * r + s
                else:
                    tgt = tail + self.tail_index(a, x[None, :, None], e) * r + s
                targets.append(np.broadcast_to(tgt, (self.q_at(a), x.size, r)).ravel())
            plans[b] = aggregator(np.concatenate(targets)) if targets else None
        cache[r] = plans
        return plans


def _unique_pairs(x: np.ndarray, y: np.ndarray, ly: int) -> tuple:
    keys = np.unique(x.astype(np.int64) * ly + y)
    return keys // ly, keys % ly, keys


def build_pattern(structure: RandomStructure, levels: list[np.ndarray]) -> BlockPattern:
    """The symbolic factorisation from each observation's level of each factor.

    ``levels[k]`` (n,) holds the level of factor ``k`` (structure order) of every observation.
    Raises :class:`~mpiblmm.errors.SpecError` when the dense remainder is too large.
    """
    K = len(structure.factors)
    order = tuple(sorted(range(K), key=lambda k: (-structure.factors[k].n_levels, k)))
    lv = [np.asarray(levels[k], np.int64) for k in order]
    nl = [structure.factors[k].n_levels for k in order]
    zz_pairs = {(a, b): _unique_pairs(lv[a], lv[b], nl[b])
                for a in range(K) for b in range(a)}
    # pass 1: fill and the first factor whose block is not block diagonal
    keys = {ab: set(v[2].tolist()) for ab, v in zz_pairs.items()}
    n_prefix = K
    offdiag = [False] * K
    for b in range(K):
        if offdiag[b]:
            n_prefix = b
            break
        rows = [a for a in range(b + 1, K) if keys[a, b]]
        arr = {a: np.array(sorted(keys[a, b]), np.int64) for a in rows}
        for ia, a in enumerate(rows):
            for c in rows[:ia + 1]:
                xa, ya = arr[a] // nl[b], arr[a] % nl[b]
                xc, yc = arr[c] // nl[b], arr[c] % nl[b]
                i1, i2 = join_on(ya, yc)
                if a == c:
                    offdiag[a] |= bool((xa[i1] != xc[i2]).any())
                else:
                    keys[a, c].update((xa[i1] * nl[c] + xc[i2]).tolist())
    pairs = {}
    for (a, b), s in keys.items():
        k = np.array(sorted(s), np.int64)
        pairs[a, b] = (k // nl[b], k % nl[b], k)
    # layouts
    q = [structure.factors[k].n_effects for k in order]
    zz_diag, zz_cross, start = {}, {}, 0
    for a in range(K):
        zz_diag[a] = Segment(start, q[a], q[a], nl[a])
        start += zz_diag[a].size
    for (a, b), pr in sorted(zz_pairs.items()):
        zz_cross[a, b] = Segment(start, q[a], q[b], pr[0].size)
        start += zz_cross[a, b].size
    n_zz = start
    diag, cross, start = {}, {}, 0
    for b in range(n_prefix):
        diag[b] = Segment(start, q[b], q[b], nl[b])
        start += diag[b].size
    for b in range(n_prefix):
        for a in range(b + 1, K):
            cross[a, b] = Segment(start, q[a], q[b], pairs[a, b][0].size)
            start += cross[a, b].size
    tail_start, m = [0] * K, 0
    for a in range(n_prefix, K):
        tail_start[a] = m
        m += nl[a] * q[a]
    if m > MAX_TAIL:
        names = ", ".join(structure.factors[order[a]].name for a in range(n_prefix, K))
        raise SpecError(
            f"the random factors {names} are crossed with {m} random effects in all; the "
            f"blocked estimator handles at most {MAX_TAIL} (nest them, or use fewer levels)",
            where="random effects")
    return BlockPattern(structure, order, n_prefix, zz_pairs, pairs, n_zz=n_zz,
                        zz_diag=zz_diag, zz_cross=zz_cross, diag=diag, cross=cross,
                        tail_offset=start, tail_start=tuple(tail_start), m=m,
                        n_vals=start + m * m)


def zz_rows(pattern: BlockPattern, levels: list[np.ndarray],
            zvals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row structure of the Z'Z values: observation ``i`` adds ``vals[i]`` at ``cols[i]`` of
    the flat ``zz`` layout.  ``levels[k]`` (n,) and ``zvals[k]`` (n, q_k) per factor
    (structure order)."""
    lv = [np.asarray(levels[k], np.int64) for k in pattern.order]
    zv = [np.asarray(zvals[k], np.float64) for k in pattern.order]
    cols, vals = [], []
    K = pattern.K
    for a in range(K):
        for b in range(a + 1):
            if a == b:
                seg, t = pattern.zz_diag[a], lv[a]
            else:
                seg = pattern.zz_cross[a, b]
                keys = pattern.zz_pairs[a, b][2]
                t = np.searchsorted(keys, lv[a] * pattern.l_at(b) + lv[b])
            e1 = np.arange(seg.qa)[None, :, None]
            e2 = np.arange(seg.qb)[None, None, :]
            cols.append(seg.index(e1, e2, t[:, None, None]).reshape(t.size, -1))
            vals.append((zv[a][:, :, None] * zv[b][:, None, :]).reshape(t.size, -1))
    return np.concatenate(cols, axis=1), np.concatenate(vals, axis=1)


def blocked_bytes_per_voxel(pattern: BlockPattern, p: int, gradient: bool = True) -> int:
    """Working memory of one voxel in the blocked estimator (bytes, generous).

    The S values and their Schur update products (about three copies of the update list), the
    right-hand sides ``Lambda' Z'[X Y]`` (a few copies of q (p + 1)), the dense tail and its
    factor, the per-voxel Z'Z values, and (``gradient``) what the analytic gradient adds.
    """
    n_updates = sum(A.shape[1] for _, _, A in pattern.updates.values() if A is not None)
    q, m = pattern.structure.q, pattern.m
    width = max([pattern.l_at(b) * pattern.q_at(b) for b, d in pattern.dense_tail.items()
                 if d is not None] or [0])
    per = (3 * pattern.n_vals + 3 * n_updates + 6 * q * (p + 1) + 3 * m ** 2
           + 2 * pattern.n_zz + 20 * (p * p + 64))
    # the analytic gradient (:mod:`.gradient`): S^-1 on the pattern, U and the Gram sums'
    # products, the tail's inverse and its dense products with the tail rows of L
    if gradient:
        per += 2 * pattern.n_vals + 4 * q * (p + 1) + 2 * m ** 2 + 4 * m * width
    return 8 * int(per)
