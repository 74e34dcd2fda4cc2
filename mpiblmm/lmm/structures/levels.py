"""One random factor: the per-level closed forms of the V^-1 products and the score sums.

With one factor ``Z'Z``, ``S = I + Lambda' Z'Z Lambda`` and ``M = Lambda S^-1 Lambda'`` are block
diagonal: ``l`` blocks of ``q_1 x q_1``, one per level (notation of :mod:`~mpiblmm.lmm.likelihood`).
Everything here works per level on (v, l) arrays, in closed form for ``q_1 <= 2``, at a cost
of O(v l q_1^2 p^2); nothing of size (v, q, q) is formed.  Used by
:class:`~.one_factor.OneFactor` (evaluation, scores) and :mod:`.level_satterthwaite`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..likelihood import VinvProducts, gls, profiled_s2, spd_inv_logdet, sym
from ..model import ProductForms
from . import level_kernel


def _mm(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A B`` for small matrices stored with the matrix axes first: (q, r, ...) x (r, s, ...).

    The trailing (voxel, level) axes are contiguous, so each term is one fast elementwise
    operation; numpy's matmul on stacks of 2x2 matrices is an order of magnitude slower.
    """
    out = A[:, 0][:, None] * B[0][None]
    for k in range(1, A.shape[1]):
        out += A[:, k][:, None] * B[k][None]
    return out


def _mm_tn(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A' B`` for small matrices stored with the matrix axes first."""
    return _mm(np.swapaxes(A, 0, 1), B)


def _spd_inv_logdet_lead(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spd_inv_logdet` for matrices stored with the matrix axes first (q, q, ...)."""
    if S.shape[0] <= 2:
        inv, logdet = spd_inv_logdet(np.moveaxis(S, (0, 1), (-2, -1)))
        return np.ascontiguousarray(np.moveaxis(inv, (-2, -1), (0, 1))), logdet
    inv, logdet = spd_inv_logdet(np.ascontiguousarray(np.moveaxis(S, (0, 1), (-2, -1))))
    return np.ascontiguousarray(np.moveaxis(inv, (-2, -1), (0, 1))), logdet


def _lead(a: np.ndarray, n_small: int) -> np.ndarray:
    """Move the last ``n_small`` axes to the front (contiguous copy)."""
    nd = a.ndim
    return np.ascontiguousarray(a.transpose(tuple(range(nd - n_small, nd))
                                            + tuple(range(nd - n_small))))


def _trail(a: np.ndarray, n_small: int) -> np.ndarray:
    """Inverse of :func:`_lead`: move the first ``n_small`` axes to the end."""
    nd = a.ndim
    return np.moveaxis(a, tuple(range(n_small)), tuple(range(nd - n_small, nd)))


def vinv_single(pf: ProductForms, lam: np.ndarray, need_z: bool) -> VinvProducts:
    # Work with the small matrix axes first and (voxel, level) last: (q1, q1, v, l).
    f = pf.structure.factors[0]
    l, q1, p, v = f.n_levels, f.n_effects, pf.p, pf.n_voxels
    B = _lead(pf.ZtZ, 2)                                   # (q1, q1, v|1, l)
    ZX = _lead(pf.ZtX.reshape(-1, l, q1, p), 2)            # (q1, p, v|1, l)
    ZY = _lead(pf.ZtY.reshape(v, l, q1), 1)                # (q1, v, l)
    L = _lead(lam, 2)[..., None]                           # (q1, q1, v, 1)
    BL = _mm(B, L)                                         # Z'Z Lambda per level
    S = _mm_tn(L, BL)
    for i in range(q1):
        S[i, i] += 1.0
    Sinv, logdet = _spd_inv_logdet_lead(S)                 # S^-1, log|S| (v, l)
    AY = _mm_tn(L, ZY[:, None])[:, 0]                      # Lambda'Z'Y  (q1, v, l)
    SAY = _mm(Sinv, AY[:, None])[:, 0]
    AX = _mm_tn(L, ZX)                                     # Lambda'Z'X  (q1, p, v, l)
    SAX = _mm(Sinv, AX)
    corr_xx = np.empty((v, p, p))
    for a in range(p):
        for b in range(a, p):
            corr_xx[:, a, b] = corr_xx[:, b, a] = (AX[:, a] * SAX[:, b]).sum(axis=(0, 2))
    corr_xy = np.stack([(AX[:, a] * SAY).sum(axis=(0, 2)) for a in range(p)], axis=1)
    out = dict(XtViX=pf.XtX - corr_xx, XtViY=pf.XtY - corr_xy,
               YtViY=pf.YtY - (AY * SAY).sum(axis=(0, 2)), logdetV=logdet.sum(-1))
    if need_z:
        # Z'V^-1B = Z'B - Z'Z Lambda S^-1 Lambda'Z'B
        ZtViX = ZX - _mm(BL, SAX)
        ZtViY = ZY - _mm(BL, SAY[:, None])[:, 0]
        ZtViZ = B - _mm(_mm(BL, Sinv), np.swapaxes(BL, 0, 1))
        out.update(ZtViX=_trail(ZtViX, 2).reshape(v, l * q1, p),
                   ZtViY=_trail(ZtViY, 1).reshape(v, l * q1),
                   ZtViZ=sym(_trail(ZtViZ, 2)))
    return VinvProducts(**out)


# ---------------------------------------------------------------- one factor, entry by entry
# The one-factor algebra without Z parts, with every small matrix held as a nested list of
# contiguous (v|1, l) arrays, one per entry: a product of 2x2 matrices is then a handful of
# fast elementwise operations, symmetric results are formed once and nothing is transposed.
# Voxels are processed in blocks of about _BLOCK_ELEMENTS (voxel, level) pairs so that the
# temporaries stay in cache.
_BLOCK_ELEMENTS = 16384


def level_layout(pf: ProductForms):
    """Z'Z blocks ``B[a][b]`` (v|1, l), Z'X ``ZX[a][r]`` (v|1, l) and Z'Y ``ZY[a]`` (v, l)."""
    f = pf.structure.factors[0]
    l, q, p = f.n_levels, f.n_effects, pf.p
    B = _lead(pf.ZtZ, 2)                                   # (q, q, v|1, l)
    ZX = _lead(pf.ZtX.reshape(-1, l, q, p), 2)             # (q, p, v|1, l)
    ZY = _lead(pf.ZtY.reshape(-1, l, q), 1)                # (q, v, l)
    return B, ZX, ZY


def dot(xs, ys) -> np.ndarray:
    """``sum_i xs[i] * ys[i]`` for broadcastable arrays."""
    out = xs[0] * ys[0]
    for x, y in zip(xs[1:], ys[1:]):
        out += x * y
    return out


@functools.lru_cache(maxsize=None)
def pair_plan(q: int):
    """Index plan of the symmetric q x q entries, fixed per q (formed once).

    Returns ``(ua, ub, full, diag)``: the upper entries ``(ua[o], ub[o])``, ``a <= b``, in the
    order the sums visit them; ``full`` (q, q) the upper entry holding ``[a, b]`` and
    ``[b, a]``; ``diag`` the upper entries on the diagonal.
    """
    pairs = [(a, b) for a in range(q) for b in range(a, q)]
    ua = np.array([a for a, _ in pairs], dtype=np.intp)
    ub = np.array([b for _, b in pairs], dtype=np.intp)
    full = np.empty((q, q), dtype=np.intp)
    for o, (a, b) in enumerate(pairs):
        full[a, b] = full[b, a] = o
    diag = [o for o, (a, b) in enumerate(pairs) if a == b]
    return ua, ub, full, diag


def _sandwich(C: np.ndarray, X, q: int, add_identity: bool = False) -> np.ndarray:
    """``Y = C' X C`` for a symmetric ``X`` given by entries ``X[a][b]`` (v|1, l) and a
    per-voxel ``C`` (v, q, q): the upper entries of ``Y`` stacked, (q(q+1)/2, v, l).

    ``Y[c][d] = sum_{a<=b} w_ab X[a][b]`` with per-voxel weights ``w_ab = C[a,c] C[b,d]
    (+ C[b,c] C[a,d] for a != b)``, all formed by a few operations on (v, pairs, pairs)
    arrays; the sum over ``(a, b)`` runs in a fixed order for every output entry at once.
    """
    ua, ub, _, diag = pair_plan(q)
    W = C[:, ua[:, None], ua[None, :]] * C[:, ub[:, None], ub[None, :]]   # (v, in, out)
    off = np.flatnonzero(ua != ub)
    if off.size:
        W[:, off] = W[:, off] + (C[:, ub[off][:, None], ua[None, :]]
                                 * C[:, ua[off][:, None], ub[None, :]])
    W = np.ascontiguousarray(W.transpose(1, 2, 0))[..., None]           # (in, out, v, 1)
    Y = W[0] * X[ua[0]][ub[0]]
    for e in range(1, ua.size):
        Y += W[e] * X[ua[e]][ub[e]]
    if add_identity:
        for o in diag:
            Y[o] += 1.0
    return Y


def _sum_log(det: np.ndarray) -> np.ndarray:
    """``sum_l log det`` (v,) for det (v, l) >= 1, one log per pair of levels where safe.

    "Safe" is decided per voxel, so a voxel's value never depends on the others in its chunk.
    """
    l = det.shape[-1]
    h = l // 2
    if not h:
        return np.log(det).sum(axis=-1)
    safe = det.max(axis=-1) < 1e150                    # the pair products cannot overflow
    with np.errstate(over="ignore"):
        out = np.log(det[:, :h] * det[:, h:2 * h]).sum(axis=-1)
    if l % 2:
        out += np.log(det[:, -1])
    if safe.all():
        return out
    return np.where(safe, out, np.log(det).sum(axis=-1))


def level_core(B, lam: np.ndarray, want_logdet: bool = True):
    """``M_j = Lambda S_j^-1 Lambda'`` per level, (q, q, v, l) (entries ``M[a][b]``,
    symmetric to the bit), and ``sum_j log|S_j|`` (v,), ``S_j = I + Lambda' B_j Lambda``.
    q <= 2 in closed form."""
    q = lam.shape[-1]
    ua, ub, full, _ = pair_plan(q)
    S = _sandwich(lam, B, q, add_identity=True)                  # upper entries of S
    if q == 1:
        Si = 1.0 / S
        logdet = _sum_log(S[0]) if want_logdet else None
    elif q == 2:
        det = S[0] * S[2]
        det -= S[1] * S[1]
        r = 1.0 / det
        Si = np.empty_like(S)
        np.multiply(S[2], r, out=Si[0])
        np.multiply(S[0], r, out=Si[2])
        r *= -1.0
        np.multiply(S[1], r, out=Si[1])
        logdet = _sum_log(det) if want_logdet else None
    else:
        Sm = np.moveaxis(S[full], (0, 1), (-2, -1))                   # (v, l, q, q)
        logdet = None
        if want_logdet:
            C = np.linalg.cholesky(Sm)
            logdet = 2.0 * np.log(np.diagonal(C, axis1=-2, axis2=-1)).sum(axis=(-2, -1))
        inv = np.linalg.inv(Sm)
        Si = np.ascontiguousarray(np.moveaxis(inv[..., ua, ub], -1, 0))
    M = _sandwich(np.swapaxes(lam, 1, 2), Si[full], q)
    return M[full], logdet


def lsum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_l a * b`` over the trailing (level) axis: (v, l) x (v, l) -> (v,)."""
    return np.einsum("vl,vl->v", a, b)


def lsums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`lsum` of many pairs at once: (..., v, l) x (..., v, l) -> (..., v).  The same
    loop over the levels for every pair and voxel (the same bits as :func:`lsum` per pair)."""
    lead = a.shape[:-2]
    out = np.einsum("evl,evl->ev", a.reshape((-1,) + a.shape[-2:]),
                    b.reshape((-1,) + b.shape[-2:]))
    return out.reshape(lead + out.shape[-1:])


def seq_sum(a: np.ndarray) -> np.ndarray:
    """``a[0] + a[1] + ...`` over the leading axis, left to right (a new array)."""
    out = a[0].copy()
    for x in a[1:]:
        out += x
    return out


def products_block(pf: ProductForms, B, ZX, ZY, M, logdet) -> VinvProducts:
    """X'V^-1X, X'V^-1Y, Y'V^-1Y: ``X'V^-1B = X'B - sum_j ZX_j' M_j Z_j'B``.  Every
    small-matrix product is formed for all entries at once (stacked (q, ..., v, l) arrays),
    each level sum by numpy's einsum loop (no BLAS: the same bits in any chunk)."""
    p, v = pf.p, pf.n_voxels
    MZY = _mm(M, ZY[:, None])[:, 0]                        # (q, v, l): M_j Z_j'Y
    corr_yy = seq_sum(lsums(ZY, MZY))
    # Z'X (q, p, v|1, l) shared or per voxel: the same arithmetic (a shared Z'X broadcast),
    # so a voxel gets the same bits in either kind of group
    MZX = np.einsum("abvl,bsvl->asvl", M, ZX)              # (q, p, v, l)
    pr, ps, _, _ = pair_plan(p)
    # every (r, s) at once, the upper ones kept (each its own loop over the levels)
    c = seq_sum(np.einsum("arvl,asvl->arsv", ZX, MZX))[pr, ps].T         # (v, pairs)
    corr_xx = np.empty((v, p, p))
    corr_xx[:, pr, ps] = c
    corr_xx[:, ps, pr] = c
    corr_xy = seq_sum(np.einsum("arvl,avl->arv", ZX, MZY)).T
    return VinvProducts(XtViX=pf.XtX - corr_xx, XtViY=pf.XtY - corr_xy,
                        YtViY=pf.YtY - corr_yy, logdetV=logdet)


@dataclass(frozen=True)
class LevelSums:
    """What the scores and information of the one-factor model need, summed over levels.

    ``R`` (v, q, q) = ``sum_j R_jj``; ``G`` (v, q, q) = ``dl/dD`` (:func:`~mpiblmm.lmm.scores.d_scores`,
    at the GLS beta and the given ``s2``); ``RR`` (v, q, q, q, q) with ``RR[a, b, c, d] =
    sum_j R_jj[a, c] R_jj[b, d]``.
    """

    R: np.ndarray
    G: np.ndarray
    RR: np.ndarray

    def take(self, idx) -> "LevelSums":
        return LevelSums(self.R[idx], self.G[idx], self.RR[idx])

    def put(self, idx, other: "LevelSums") -> None:
        self.R[idx] = other.R
        self.G[idx] = other.G
        self.RR[idx] = other.RR

    @staticmethod
    def concat(parts: list["LevelSums"]) -> "LevelSums":
        return LevelSums(*(np.concatenate([getattr(s, k) for s in parts]) for k in ("R", "G", "RR")))

    @staticmethod
    def nan(v: int, q: int) -> "LevelSums":
        return LevelSums(np.full((v, q, q), np.nan), np.full((v, q, q), np.nan),
                         np.full((v, q, q, q, q), np.nan))


def level_T_R(B, M):
    """Per level: ``T_j = I - B_j M_j`` (q, q, v, l) and ``R_jj = B_j - B_j M_j B_j``
    (q, q, v, l, symmetric to the bit), entries ``T[a][b]``, ``R[a][b]``.

    ``B_j = Z_j'Z_j``; ``R_jj = Z_j'V^-1Z_j`` and ``T_j Z_j'b = Z_j'V^-1 b`` for any b.
    """
    T, Ru = _level_T_Ru(B, M)
    return T, Ru[pair_plan(len(M))[2]]


def _level_T_Ru(B, M):
    """:func:`level_T_R` with the upper entries of ``R`` only, (q(q+1)/2, v, l)."""
    q = len(M)
    ua, ub, _, _ = pair_plan(q)
    BM = _mm(B, M)
    T = np.negative(BM)
    for a in range(q):
        np.subtract(1.0, BM[a, a], out=T[a, a])
    R = B - _mm(BM, B)
    return T, R[ua, ub]


def level_residuals(ZX, ZY, beta: np.ndarray) -> np.ndarray:
    """Per level ``r_j = Z_j'(Y - X beta)``, (q, v, l) (one (v, l) array per effect)."""
    p = ZX.shape[1]
    fit = ZX[:, 0] * beta[:, 0, None]          # shared Z'X (v = 1) broadcast: the same bits
    for s in range(1, p):
        fit += ZX[:, s] * beta[:, s, None]
    return ZY - fit


def level_zx_a_zx(ZX, A: np.ndarray) -> np.ndarray:
    """Per level ``P_j = Z_j'X A X'Z_j`` (q, q, v, l), symmetric to the bit."""
    return _zx_a_zx_upper(ZX, A)[pair_plan(ZX.shape[0])[2]]


def _zx_a_zx_upper(ZX, A: np.ndarray) -> np.ndarray:
    """The upper entries ``c <= d`` of :func:`level_zx_a_zx`, (q(q+1)/2, v, l).

    ``AZX[d, s] = sum_t ZX[d, t] A[s, t]``, ``P[c, d] = sum_s ZX[c, s] AZX[d, s]``: plain
    einsum loops, the sums over t and s in order; a shared Z'X (v = 1) is broadcast, the
    same arithmetic and bits as per voxel."""
    ua, ub, _, _ = pair_plan(ZX.shape[0])
    AZX = np.einsum("dtvl,vst->dsvl", ZX, A)
    return np.einsum("csvl,dsvl->cdvl", ZX, AZX)[ua, ub]


@functools.lru_cache(maxsize=None)
def _rr_plan(q: int):
    """``sum_j R_jj[a, c] R_jj[b, d]`` takes few distinct values: the pairs of upper entries
    ``(i1, i2)`` to sum, and ``keymap`` (q, q, q, q) saying which of them ``[a, b, c, d]`` is."""
    _, _, full, _ = pair_plan(q)
    keys: dict = {}
    i1, i2 = [], []
    keymap = np.empty((q, q, q, q), dtype=np.intp)
    for a in range(q):
        for b in range(q):
            for c in range(q):
                for d in range(q):
                    key = tuple(sorted((tuple(sorted((a, c))), tuple(sorted((b, d))))))
                    if key not in keys:
                        keys[key] = len(keys)
                        i1.append(full[a, c])
                        i2.append(full[b, d])
                    keymap[a, b, c, d] = keys[key]
    return np.array(i1, dtype=np.intp), np.array(i2, dtype=np.intp), keymap


def _sums_block(pf: ProductForms, B, ZX, ZY, M, beta: np.ndarray, s2: np.ndarray,
                A: np.ndarray | None) -> LevelSums:
    """:class:`LevelSums` from the per-level ``M`` (see :func:`level_sums`)."""
    q, v = len(M), pf.n_voxels
    ua, ub, full, _ = pair_plan(q)
    T, Ru = _level_T_Ru(B, M)
    # Q_j = r_j r_j' / s2 (+ P_j = ZX_j A ZX_j' for REML), r_j = Z_j'(Y - X beta)
    r = level_residuals(ZX, ZY, beta)
    rs = r * (1.0 / s2)[:, None]
    Q = rs[ua] * r[ub]
    if A is not None:
        Q += _zx_a_zx_upper(ZX, A)
    # G = 1/2 sum_j (T_j Q_j T_j' - R_jj)
    TQ = _mm(T, Q[full])
    # g[a, b] = sum_d sum_j TQ[a, d] T[b, d]: every (a, b, d) at once, the upper (a, b) kept
    g = seq_sum(np.einsum("advl,bdvl->dabv", TQ, T))[ua, ub]   # (pairs, v)
    Rsum = Ru.sum(axis=-1)
    Gu = 0.5 * (g - Rsum)
    Rs = np.empty((v, q, q))
    G = np.empty((v, q, q))
    Rs[:, ua, ub] = Rs[:, ub, ua] = Rsum.T
    G[:, ua, ub] = G[:, ub, ua] = Gu.T
    i1, i2, keymap = _rr_plan(q)
    U = np.einsum("ivl,jvl->ijv", Ru, Ru)[i1, i2]         # sum_j R[a, c] R[b, d], distinct
    RR = np.ascontiguousarray(U[keymap].transpose(4, 0, 1, 2, 3))
    return LevelSums(R=Rs, G=G, RR=RR)


def voxel_blocks(pf: ProductForms):
    """Voxel slices of about ``_BLOCK_ELEMENTS`` (voxel, level) pairs each, of equal size: the
    number of blocks rounded, not raised, so no block is a small remainder (a 300-voxel
    chunk at 60 levels was 273 + 27 voxels: one evaluation cost 2.9 ms, as one block 2.2).
    Sizes differ by one at most, so no block holds one voxel of several (100 voxels in
    blocks of 9 left one alone, whose level sums then took einsum's loop for a voxel axis of
    length one, other bits: see :func:`_alone`)."""
    l = pf.structure.factors[0].n_levels
    size = max(8, _BLOCK_ELEMENTS // max(l, 1))
    v = pf.n_voxels
    n_blocks = max(1, int(round(v / size)))
    base, extra = divmod(v, n_blocks)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(n_blocks)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _twice(*arrays: np.ndarray) -> list[np.ndarray]:
    """Per-voxel arrays of one voxel, doubled (see :func:`_alone`)."""
    return [None if a is None else np.repeat(a, 2, axis=0) for a in arrays]


def _alone(pf: ProductForms) -> bool:
    """A single voxel is evaluated as two copies of itself: numpy's einsum reduces over the
    levels by another loop when the voxel axis has length one (a contiguous reduction with
    partial sums), whose last bits differ from the same voxel's in any wider block; so a
    missing-data voxel alone in its chunk's group got other bits than at another rank count
    (seen at 10,000 and 15,703 levels; 2 to 17 voxels all agree)."""
    return pf.n_voxels == 1


def vinv_single_fast(pf: ProductForms, lam: np.ndarray) -> VinvProducts:
    """The one-factor V^-1 products without Z parts, entry by entry, in voxel blocks."""
    if _alone(pf):
        return vinv_single_fast(pf.take(np.array([0, 0])), *_twice(lam)).take(slice(0, 1))
    if level_kernel.applies(lam.shape[-1]):
        return kernel_products(pf, lam)
    parts = []
    for sl in voxel_blocks(pf):
        sub = pf.take(sl)
        B, ZX, ZY = level_layout(sub)
        M, logdet = level_core(B, lam[sl])
        parts.append(products_block(sub, B, ZX, ZY, M, logdet))
    return VinvProducts.concat(parts)


def kernel_products(pf: ProductForms, lam: np.ndarray) -> VinvProducts:
    """:func:`vinv_single_fast` by the compiled kernel (:mod:`.level_kernel`)."""
    cxx, cxy, cyy, logdet = level_kernel.products(pf, lam)
    return VinvProducts(XtViX=pf.XtX - cxx, XtViY=pf.XtY - cxy, YtViY=pf.YtY - cyy,
                        logdetV=logdet)


def profiled_llh(pf: ProductForms, lam: np.ndarray, method: str, want_sums: bool):
    """The profiled fit, its log-likelihood and (``want_sums``) the :class:`LevelSums` there, in
    one call of the compiled kernel: ``(llh, beta, s2, vp, sums)``.  Only where
    :func:`level_kernel.applies`; a voxel's arithmetic is its own, so no :func:`_alone`."""
    llh, beta, s2, vp, sums = level_kernel.evaluate(pf, lam, method, want_sums)
    return llh, beta, s2, vp, None if sums is None else LevelSums(*sums)


def products_and_sums(pf: ProductForms, lam: np.ndarray, method: str):
    """One-factor V^-1 products (no Z parts), the GLS fit and the :class:`LevelSums` there, by
    numpy: four or more effects, the kernel turned off, and the reference the kernel's one
    call (:func:`profiled_llh`) is tested against.

    Returns ``(vp, beta, ete, s2, sums)``; ``s2`` is the profiled residual variance.  Each
    voxel block is done in one pass (the per-level ``M_j`` is formed once).
    """
    if _alone(pf):
        vp, beta, ete, s2, sums = products_and_sums(pf.take(np.array([0, 0])), *_twice(lam),
                                                    method)
        return vp.take(slice(0, 1)), beta[:1], ete[:1], s2[:1], sums.take(slice(0, 1))
    out = []
    for sl in voxel_blocks(pf):
        sub = pf.take(sl)
        B, ZX, ZY = level_layout(sub)
        M, logdet = level_core(B, lam[sl])
        vp = products_block(sub, B, ZX, ZY, M, logdet)
        beta, ete = gls(vp)
        s2 = profiled_s2(ete, sub.n, sub.p, method)
        A = np.linalg.inv(vp.XtViX) if method == "REML" else None
        out.append((vp, beta, ete, s2, _sums_block(sub, B, ZX, ZY, M, beta, s2, A)))
    if len(out) == 1:
        return out[0]
    return (VinvProducts.concat([o[0] for o in out]),
            *(np.concatenate([o[i] for o in out]) for i in (1, 2, 3)),
            LevelSums.concat([o[4] for o in out]))


def level_sums(pf: ProductForms, lam: np.ndarray, beta: np.ndarray, s2: np.ndarray,
               A: np.ndarray | None = None) -> LevelSums:
    """:class:`LevelSums` of the one-factor model at ``Lambda`` (v, q, q), ``beta`` (v, p), ``s2``.

    Per level ``Z_j'V^-1 = T_j Z_j'`` with ``T_j = I - B_j M_j`` (``B_j = Z_j'Z_j``), so
    ``R_jj = B_j - B_j M_j B_j``, ``u_j = T_j r_j`` (``r_j = Z_j'(Y - X beta)``), ``W_j = T_j
    Z_j'X`` and ``u_j u_j'/s2 + W_j A W_j' = T_j (r_j r_j'/s2 + Z_j'X A X'Z_j) T_j'``: nothing
    of size (v, l, q, p) is formed.  ``A`` (v, p, p) = ``(X'V^-1X)^-1`` adds the REML term.
    """
    if _alone(pf):
        return level_sums(pf.take(np.array([0, 0])), *_twice(lam, beta, s2, A)).take(
            slice(0, 1))
    if level_kernel.applies(lam.shape[-1]):
        return LevelSums(*level_kernel.sums(pf, lam, beta, s2, A))
    parts = []
    for sl in voxel_blocks(pf):
        sub = pf.take(sl)
        B, ZX, ZY = level_layout(sub)
        M, _ = level_core(B, lam[sl], want_logdet=False)
        parts.append(_sums_block(sub, B, ZX, ZY, M, beta[sl], s2[sl],
                                 None if A is None else A[sl]))
    return parts[0] if len(parts) == 1 else LevelSums.concat(parts)
