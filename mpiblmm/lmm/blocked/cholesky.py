"""Numeric blocked Cholesky of ``S = I + Lambda' Z'Z Lambda`` for many voxels at once.

Given the symbolic factorisation (:class:`.pattern.BlockPattern`) and ``theta``, for every
voxel of a chunk (voxel axis *last* here, so each small matrix entry is one contiguous row of
voxels):

1. ``S`` is assembled in the block pattern: ``Lambda_a' (Z'Z)_{xy} Lambda_b`` per stored block,
   plus ``I``;
2. prefix factors (block diagonal, largest first): ``L_bb = chol(S_bb)`` per level,
   ``L_ab = S_ab L_bb^-T`` in the cross pattern, and the Schur updates ``-L_ab L_cb'`` summed
   into the later blocks by unit-weight sparse aggregation (fixed order per voxel);
3. the dense tail (crossed factors, ``m x m``) by LAPACK per voxel;
4. ``log|V| = log|S| = 2 sum log diag L``;
5. ``c = L^-1 Lambda' Z'[X Y]`` by block forward substitution; then
   ``[X Y]' V^-1 [X Y] = [X Y]'[X Y] - c'c`` (ALGORITHM.md, "Product forms").

Cost per voxel ``O(sum_b l_b q_b^3 + sum (nnz of the updates) q^2 + m^3)`` time and
``O(n_vals + q (p + 1))`` memory: no q x q array.  Sums over levels are sparse-dense products
with unit weights (or row sums per voxel), so a voxel gets the same bits in any chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ..likelihood import VinvProducts, gls, loglik, profiled_s2
from ..model import ProductForms
from ..theta import lambdas_from_theta
from . import kernel
from .pattern import BlockPattern, blocked_bytes_per_voxel

#: Voxels per evaluation batch: about this many bytes of evaluation working set.  Larger
#: batches spread the fixed cost of the ~100 numpy calls of an evaluation over more voxels;
#: with freed memory kept by the allocator (:mod:`mpiblmm.allocator`) a batch need not fit
#: in the CPU cache (measured on 400 voxels, same run: (a) 5.7-8.2 ms/voxel at 4 MB against
#: 3.0-3.2 at 64-256 MB; (c) 2.1-2.5 against 1.5-2.1; (b), 6 MB per voxel, stays at
#: ``MIN_BATCH``: 41-voxel batches were 10% slower).  A batch is never larger than the
#: chunk, which the memory budget sizes.  Not fewer than ``MIN_BATCH`` voxels.  Every
#: voxel's arithmetic is its own column's, so the batching changes no bits.
BATCH_BYTES = 96 << 20
MIN_BATCH = 16


def batches(pattern: BlockPattern, p: int, v: int) -> list[np.ndarray]:
    """Voxel index batches (consecutive) for evaluations of a chunk of ``v`` voxels.  The
    compiled kernel works tile by tile with scratch for one tile: the whole chunk is one
    batch."""
    if kernel.applies(pattern):                 # (:func:`prepare` takes the kernel's layout)
        return [np.arange(v)]
    per = blocked_bytes_per_voxel(pattern, p, gradient=False)      # the evaluation's own set
    size = max(MIN_BATCH, BATCH_BYTES // max(per, 1))
    return [np.arange(i, min(i + size, v)) for i in range(0, v, size)] or [np.arange(0)]


# ---------------------------------------------------------------- small matrices, axes first
def _mm(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A B`` over the two leading axes; trailing axes broadcast elementwise."""
    if A.shape[:2] == (1, 1) and B.shape[0] == 1:
        return A * B
    out = np.empty((A.shape[0], B.shape[1]) + np.broadcast_shapes(A.shape[2:], B.shape[2:]))
    tmp = np.empty(out.shape[2:]) if A.shape[1] > 1 else None
    for i in range(A.shape[0]):             # each entry summed over j in order, in place:
        for k in range(B.shape[1]):         # the bits of s = s + A_ij B_jk
            o = out[i, k]
            np.multiply(A[i, 0], B[0, k], out=o)
            for j in range(1, A.shape[1]):
                o += np.multiply(A[i, j], B[j, k], out=tmp)
    return out


def _t(A: np.ndarray) -> np.ndarray:
    return np.swapaxes(A, 0, 1)


def chol_lead(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of symmetric positive definite ``S`` (q, q, ...)."""
    q = S.shape[0]
    L = np.zeros_like(S)
    for j in range(q):
        d = S[j, j].copy()
        for k in range(j):
            d -= L[j, k] * L[j, k]
        L[j, j] = np.sqrt(d)
        for i in range(j + 1, q):
            s = S[i, j].copy()
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / L[j, j]
    return L


def rsolve_lt(X: np.ndarray, L: np.ndarray) -> np.ndarray:
    """``X L^-T`` for X (qa, qb, ...) and lower triangular L (qb, qb, ...)."""
    if L.shape[0] == 1:
        return X / L
    Y = np.empty(np.broadcast_shapes(X.shape, X.shape[:1] + L.shape[1:]))
    for e in range(L.shape[0]):
        s = X[:, e].copy()
        for f in range(e):
            s -= Y[:, f] * L[e, f]
        Y[:, e] = s / L[e, e]
    return Y


def solve_lower(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``L^-1 B`` for L (q, q, l, v) lower triangular and B (q, l, r, v)."""
    if L.shape[0] == 1:
        return B / L[:, :, :, None, :][0]
    c = np.empty_like(B)
    for e in range(L.shape[0]):
        s = B[e].copy()
        for f in range(e):
            s -= L[e, f][:, None] * c[f]
        c[e] = s / L[e, e][:, None]
    return c


@lru_cache(maxsize=64)
def _ones(n: int) -> sp.csr_matrix:
    return sp.csr_matrix(np.ones((1, n)))


def colsum(A: np.ndarray) -> np.ndarray:
    """Sum over the first axis of A (N, v) in a fixed order per voxel: (v,)."""
    if A.shape[0] == 0:
        return np.zeros(A.shape[1])
    return np.asarray(_ones(A.shape[0]) @ A)[0]


def colsums(A: np.ndarray) -> np.ndarray:
    """:func:`colsum` of every trailing entry of A (N, ...) in one call: (...).  The unit row
    adds each column's N entries in turn whatever the number of columns (sparse times dense
    is one axpy per row), so ``colsums(A)[k]`` has the bits of ``colsum(A[:, k])``."""
    flat = np.ascontiguousarray(A).reshape(A.shape[0], int(np.prod(A.shape[1:])))
    return colsum(flat).reshape(A.shape[1:])


def as_slice(rows: np.ndarray):
    """``rows`` (sorted unique indices) as a slice when they are one contiguous range: an
    in-place update of a slice is one pass, of fancy-indexed rows a gather and a scatter."""
    rows = np.asarray(rows)
    if rows.size and rows[-1] - rows[0] + 1 == rows.size and (np.diff(rows) == 1).all():
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _cached(pattern: BlockPattern, name: str, fn):
    store = pattern.__dict__.setdefault("_numeric_cache", {})
    if name not in store:
        store[name] = fn()
    return store[name]


def _placement(pattern: BlockPattern) -> list[tuple[str, tuple, np.ndarray]]:
    """Where each stored Z'Z segment goes in the flat S values (after the Lambda sandwich)."""
    out = []
    K, npre, m, t0 = pattern.K, pattern.n_prefix, pattern.m, pattern.tail_offset
    for a in range(K):
        q, l = pattern.q_at(a), pattern.l_at(a)
        e1 = np.arange(q)[:, None, None]
        e2 = np.arange(q)[None, :, None]
        x = np.arange(l)[None, None, :]
        if a < npre:
            dest = pattern.diag[a].index(e1, e2, x)
        else:
            dest = t0 + pattern.tail_index(a, x, e1) * m + pattern.tail_index(a, x, e2)
        out.append((pattern.zz_diag[a], (a, a), as_slice(np.broadcast_to(dest, (q, q, l)).ravel())))
    for (a, b), seg in sorted(pattern.zz_cross.items()):
        x0, y0, _ = pattern.zz_pairs[a, b]
        e1 = np.arange(seg.qa)[:, None, None]
        e2 = np.arange(seg.qb)[None, :, None]
        if b < npre:
            t = pattern.lookup(a, b, x0, y0)
            dest = pattern.cross[a, b].index(e1, e2, t[None, None, :])
        else:
            dest = (t0 + pattern.tail_index(a, x0[None, None, :], e1) * m
                    + pattern.tail_index(b, y0[None, None, :], e2))
        out.append((seg, (a, b), as_slice(np.broadcast_to(dest, (seg.qa, seg.qb, seg.n)).ravel())))
    return out


def _identity_rows(pattern: BlockPattern) -> np.ndarray:
    rows = []
    for a in range(pattern.K):
        q, l = pattern.q_at(a), pattern.l_at(a)
        e = np.arange(q)[:, None]
        x = np.arange(l)[None, :]
        if a < pattern.n_prefix:
            rows.append(pattern.diag[a].index(e, e, x).ravel())
        else:
            r = pattern.tail_index(a, x, e).ravel()
            rows.append(pattern.tail_offset + r * pattern.m + r)
    return np.concatenate(rows)


# ---------------------------------------------------------------- the evaluation
def _lambda_lead(pattern: BlockPattern, theta: np.ndarray) -> list[np.ndarray]:
    """Per position, Lambda (q, q, 1, v)."""
    lams = lambdas_from_theta(theta, pattern.structure)
    return [np.ascontiguousarray(np.moveaxis(lams[k], 0, -1))[:, :, None, :]
            for k in pattern.order]


@dataclass(frozen=True, eq=False)
class Prepared:
    """The product forms of a chunk in the blocked layout, voxel axis last (done once per
    chunk, reused by every evaluation): ``zz`` (n_zz, v|1); per position ``WX[a]``
    (q, l, p, v|1) = Z'X and ``WY[a]`` (q, l, v) = Z'Y of that factor.  With ``kernel``,
    the compiled kernel's layout instead (:func:`.kernel.kernel_forms`: the rows of all
    factors in one ``WX[0]`` (nodes, p, v|1) and ``WY[0]`` (nodes, v), in its order)."""

    pf: ProductForms
    zz: np.ndarray
    WX: tuple
    WY: tuple
    kernel: bool = False

    def take(self, idx: np.ndarray) -> "Prepared":
        # np.take along the last axis: C-ordered and ~10x faster than ``a[..., idx]`` (which
        # gathers into a Fortran-ordered array)
        cols = (lambda a: np.take(a, idx, axis=-1))
        pick = (lambda a: a) if self.pf.shared else cols
        return Prepared(self.pf.take(idx), pick(self.zz), tuple(pick(w) for w in self.WX),
                        tuple(cols(w) for w in self.WY), self.kernel)


def prepare(pattern: BlockPattern, pf: ProductForms, for_kernel: bool | None = None) -> Prepared:
    """:class:`Prepared` forms of ``pf`` (whose ``ZtZ`` is in ``pattern``'s layout): in the
    compiled kernel's layout where it serves the design (or as ``for_kernel`` says)."""
    if kernel.applies(pattern) if for_kernel is None else for_kernel:
        memo = pf.__dict__.setdefault("_kernel_prepared", {})   # the fit, its saddle probes
        if id(pattern) in memo:                                  # and Satterthwaite share it
            return memo[id(pattern)][1]
        forms = kernel.kernel_forms(pattern, pf)
        # the kernel's copies replace Z'X, Z'Y, Z'Z: subsets (take) then copy no q-sized rows
        v, p = pf.n_voxels, pf.p
        slim = replace(pf, ZtX=np.empty((pf.ZtX.shape[0], 0, p)), ZtY=np.empty((v, 0)),
                       ZtZ=np.empty((pf.ZtZ.shape[0], 0)))
        memo[id(pattern)] = (pattern, Prepared(slim, *forms, kernel=True))
        return memo[id(pattern)][1]
    v, p = pf.n_voxels, pf.p
    slices = pattern.structure.slices()
    WX, WY = [], []
    for a, k in enumerate(pattern.order):
        q, l = pattern.q_at(a), pattern.l_at(a)
        zx = pf.ZtX[:, slices[k]].reshape(-1, l, q, p)
        WX.append(np.ascontiguousarray(np.transpose(zx, (2, 1, 3, 0))))
        WY.append(np.ascontiguousarray(np.transpose(pf.ZtY[:, slices[k]].reshape(v, l, q),
                                                    (2, 1, 0))))
    return Prepared(pf, np.ascontiguousarray(pf.ZtZ.T), tuple(WX), tuple(WY))


def _rhs(pattern: BlockPattern, prep: Prepared, lam: list, v: int) -> np.ndarray:
    """``Lambda' Z'[X Y]`` in the flat layout of :meth:`BlockPattern.rhs_layout` (N, v)."""
    p = prep.pf.p
    r = p + 1
    offs, tail, total = pattern.rhs_layout(r)
    B = np.empty((total, v))
    for a in range(pattern.K):
        q, l = pattern.q_at(a), pattern.l_at(a)
        if a < pattern.n_prefix:
            out = B[offs[a]:offs[a] + q * l * r].reshape(q, l, r, v)
        else:
            start = tail + pattern.tail_start[a] * r
            out = np.moveaxis(B[start:start + l * q * r].reshape(l, q, r, v), 1, 0)
        WX, WY, lam_a = prep.WX[a], prep.WY[a], lam[a][:, :, 0]       # lam_a (q, q, v)
        for e in range(q):
            np.multiply(lam_a[0, e], WX[0], out=out[e, :, :p])
            np.multiply(lam_a[0, e], WY[0], out=out[e, :, p])
            for f in range(1, q):
                out[e, :, :p] += lam_a[f, e] * WX[f]
                out[e, :, p] += lam_a[f, e] * WY[f]
    return B


@dataclass(eq=False)
class Factor:
    """One blocked factorisation at ``theta`` for the voxels of a batch (voxel axis last):
    ``lam[a]`` Lambda (q, q, 1, v); ``Ld[b]`` (q, q, l, v) and ``Lc[a, b]`` (q_a, q_b, n, v)
    the prefix factor; ``Lt[b]`` the dense tail rows of column factor ``b`` (v, m, l_b q_b);
    ``C`` (v, m, m) the lower Cholesky factor of the tail's Schur complement ``T = C C'``;
    ``B`` the forward-substituted right-hand
    sides ``c = L^-1 Lambda'Z'[X Y]`` (prefix part; tail part before the tail solve), ``XT``
    (v, m, r) ``T^-1`` times the tail part; ``G`` (v, r, r) ``c'c``."""

    lam: list
    Ld: dict
    Lc: dict
    Lt: dict
    C: np.ndarray | None
    B: np.ndarray
    XT: np.ndarray | None
    G: np.ndarray
    logdet: np.ndarray


def factorise(pattern: BlockPattern, prep: Prepared, theta: np.ndarray) -> Factor:
    """The blocked Cholesky of S and the forward substitution at finite ``theta`` (v, n_theta)
    (numpy; ``prep`` in the numpy layout)."""
    assert not prep.kernel
    pf = prep.pf
    v, p = pf.n_voxels, pf.p
    lam = _lambda_lead(pattern, theta)
    npre, m = pattern.n_prefix, pattern.m
    # 1. S in the block pattern
    zz = prep.zz                                                              # (n_zz, v|1)
    vals = np.zeros((pattern.n_vals, v))
    for seg, (a, b), dest in _cached(pattern, "placement", lambda: _placement(pattern)):
        Z = zz[seg.offset:seg.offset + seg.size].reshape(seg.qa, seg.qb, seg.n, -1)
        vals[dest] = _mm(_mm(_t(lam[a]), Z), lam[b]).reshape(-1, v)
    vals[_cached(pattern, "identity", lambda: _identity_rows(pattern))] += 1.0
    # 2. prefix factors
    Ld, Lc, Lt, logs = {}, {}, {}, []
    for b in range(npre):
        seg = pattern.diag[b]
        L = chol_lead(vals[seg.offset:seg.offset + seg.size].reshape(seg.qa, seg.qa, seg.n, v))
        Ld[b] = L
        logs.extend(np.log(L[e, e]) for e in range(seg.qa))
        for a in pattern.row_factors(b):
            cs = pattern.cross[a, b]
            X = vals[cs.offset:cs.offset + cs.size].reshape(cs.qa, cs.qb, cs.n, v)
            Lc[a, b] = rsolve_lt(X, L[:, :, pattern.pairs[a, b][1]])
        dense = pattern.dense_tail[b]
        if dense is not None:                  # tail x tail update: one product per voxel
            Lt[b] = _dense_tail_block(pattern, b, dense, Lc, v)
            upd = np.matmul(Lt[b], np.swapaxes(Lt[b], 1, 2))
            vals[pattern.tail_offset:] -= upd.reshape(v, m * m).T
        ups, uniq, A = pattern.updates[b]
        uniq = _cached(pattern, f"upd_rows{b}", lambda: as_slice(uniq))
        if ups:
            prods = [_mm(Lc[u.a, b][:, :, u.i1], _t(Lc[u.c, b][:, :, u.i2])).reshape(-1, v)
                     for u in ups]
            vals[uniq] -= A @ np.concatenate(prods)
    logdet = 2.0 * colsum(np.concatenate(logs)) if logs else np.zeros(v)
    # 3. dense tail
    C = None
    if m:                                      # LAPACK reads the lower triangle only, so the
        T = np.moveaxis(vals[pattern.tail_offset:].reshape(m, m, v), -1, 0)  # upper is left
        C = np.linalg.cholesky(T)
        logdet = logdet + 2.0 * np.log(np.diagonal(C, axis1=1, axis2=2)).sum(axis=1)
    # 5. forward substitution
    r = p + 1
    B = _rhs(pattern, prep, lam, v)
    offs, tail, _ = pattern.rhs_layout(r)
    plans = pattern.solve_plan(r)
    for b in range(npre):
        q, l = pattern.q_at(b), pattern.l_at(b)
        Bb = B[offs[b]:offs[b] + q * l * r].reshape(q, l, r, v)
        if q == 1:                             # in place: one pass less over the rows
            c = np.divide(Bb, Ld[b][:, :, :, None, :][0], out=Bb)
        else:
            c = solve_lower(Ld[b], Bb)
            Bb[...] = c
        if b in Lt:                            # tail rows: one product per voxel
            cv = np.moveaxis(np.swapaxes(c, 0, 1).reshape(l * q, r, v), -1, 0)
            B[tail:] -= np.moveaxis(np.matmul(Lt[b], cv), 0, -1).reshape(m * r, v)
        if plans[b] is None:
            continue
        prods = []
        for a in pattern.row_factors(b):
            if b in Lt and a >= npre:
                continue
            cy = c[:, pattern.pairs[a, b][1]]                                # (q_b, n, r, v)
            La = Lc[a, b]
            if La.shape[:2] == (1, 1):         # in place on the gathered copy
                prods.append(np.multiply(cy, La[0, 0][:, None], out=cy).reshape(-1, v))
            else:
                prods.append(_cross_rhs(La, cy).reshape(-1, v))
        uniq, A = plans[b]
        uniq = _cached(pattern, f"solve_rows{b}_{r}", lambda: as_slice(uniq))
        B[uniq] -= A @ (prods[0] if len(prods) == 1 else np.concatenate(prods))
    G = np.empty((v, r, r))
    n_pre = tail // r
    cp = B[:tail].reshape(n_pre, r, v)
    XT = None
    if m:
        BT = np.moveaxis(B[tail:].reshape(m, r, v), -1, 0)                   # (v, m, r)
        XT = sla.cho_solve((C, True), BT, check_finite=False)   # T^-1 BT = C^-T C^-1 BT
    for s1 in range(r):
        gs = colsums(cp[:, s1:s1 + 1] * cp[:, s1:])        # G[s1, s2] for s2 >= s1 at once
        for s2 in range(s1, r):
            g = gs[s2 - s1]
            if m:
                g = g + (BT[:, :, s1] * XT[:, :, s2]).sum(axis=1)
            G[:, s1, s2] = G[:, s2, s1] = g
    return Factor(lam, Ld, Lc, Lt, C, B, XT, G, logdet)


def blocked_vinv(pattern: BlockPattern, pf, theta: np.ndarray,
                 factor_out: list | None = None) -> VinvProducts:
    """X'V^-1X, X'V^-1Y, Y'V^-1Y and log|V| (voxel axis first) at ``theta`` (v, n_theta).

    ``pf``: :class:`~mpiblmm.lmm.model.ProductForms` or their :class:`Prepared` form.
    Voxels with non-finite ``theta`` get NaN (and do not disturb the others).  When
    ``factor_out`` is a list, the :class:`Factor` is appended to it (for the gradient).
    """
    prep = pf if isinstance(pf, Prepared) else prepare(pattern, pf)
    bad = ~np.isfinite(theta).all(axis=1)
    theta = np.where(bad[:, None], 0.0, theta)
    if prep.kernel:
        assert factor_out is None, "the compiled kernel keeps no factor"
        res = kernel.evaluate(pattern, prep, theta, gradient=False)
        return vinv_products(prep.pf, res.G, res.logdet, bad)
    fac = factorise(pattern, prep, theta)
    if factor_out is not None:
        factor_out.append(fac)
    return vinv_products(prep.pf, fac.G, fac.logdet, bad)


def vinv_products(pf: ProductForms, G: np.ndarray, logdet: np.ndarray,
                  bad: np.ndarray) -> VinvProducts:
    """``[X Y]'V^-1[X Y] = [X Y]'[X Y] - c'c`` from ``G = c'c`` (v, r, r), with log|V|; NaN
    for the ``bad`` voxels."""
    p = pf.p
    out = VinvProducts(XtViX=pf.XtX - G[:, :p, :p], XtViY=pf.XtY - G[:, :p, p],
                       YtViY=pf.YtY - G[:, p, p], logdetV=logdet)
    if bad.any():
        for a in (out.XtViX, out.XtViY, out.YtViY, out.logdetV):
            a[bad] = np.nan
    return out


def _dense_tail_block(pattern: BlockPattern, b: int, dense, Lc: dict, v: int) -> np.ndarray:
    """``L[T, b]`` as a dense (v, m, l_b q_b) matrix (the tail rows of column factor b)."""
    tails, flat = dense
    width = pattern.l_at(b) * pattern.q_at(b)
    out = np.zeros((v, pattern.m * width))            # scattered straight into voxel-first
    out[:, flat] = np.concatenate([Lc[a, b].reshape(-1, v) for a in tails]).T  # (3x faster
    return out.reshape(v, pattern.m, width)           # than scatter, then transpose)


def _cross_rhs(La: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """``L_ab[t] c_b[y_t]`` per pair: La (q_a, q_b, n, v), cy (q_b, n, r, v) -> (q_a, n, r, v)."""
    out = np.empty((La.shape[0],) + cy.shape[1:])
    for e in range(La.shape[0]):
        np.multiply(La[e, 0][:, None], cy[0], out=out[e])
        for f in range(1, La.shape[1]):
            out[e] += La[e, f][:, None] * cy[f]
    return out


def profiled(pattern: BlockPattern, pf, theta: np.ndarray, method: str):
    """Profiled fit at ``theta``: ``(llh, beta, s2, vp)`` (beta for the centred data);
    ``pf`` as in :func:`blocked_vinv`."""
    vp = blocked_vinv(pattern, pf, theta)
    pf = pf.pf if isinstance(pf, Prepared) else pf
    ok = np.isfinite(vp.XtViX).all(axis=(1, 2))
    XtViX = np.where(ok[:, None, None], vp.XtViX, np.eye(pf.p))
    vp2 = VinvProducts(XtViX=XtViX, XtViY=np.where(ok[:, None], vp.XtViY, 0.0),
                       YtViY=np.where(ok, vp.YtViY, 1.0), logdetV=vp.logdetV)
    beta, ete = gls(vp2)
    s2 = profiled_s2(ete, pf.n, pf.p, method)
    llh = loglik(vp2, pf.n, s2, ete, method)
    llh = np.where(ok, llh, np.nan)
    return llh, beta, s2, vp
