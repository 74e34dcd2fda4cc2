"""Analytic gradient in theta of the blocked path's profiled (RE)ML deviance.

The deviance is ``d(theta) = ld + dof log Q + const`` with ``ld = log|V| (+ log|X'V^-1X|``
for REML), ``Q = e'V^-1e`` at the GLS beta and ``dof = n - p`` (REML) or ``n`` (ML).  With
``V = I + Z Lambda Lambda' Z'``, ``S = I + Lambda'Z'Z Lambda = L L'``, ``A = Z'Z`` and
``dLambda = E_rs`` (theta entry ``(r, s)`` of factor ``k``, at every level ``y`` of ``k``):

(1) ``d log|V| = tr(S^-1 dS) = 2 sum_{y in k} sum_x [Sigma_yx Lambda_x' A_xy]_{s r}``,
    ``Sigma = S^-1``, needed only where ``A_xy != 0`` (the Z'Z pattern, inside L's);
(2) ``dQ = -2 sum_y p_y[r] u_y[s]`` with ``p = Z'V^-1 e`` and ``u = Lambda'p = S^-1 Lambda'Z'e``
    (beta fixed at its GLS value: the envelope theorem);
(3) ``d log|X'V^-1X| = -2 sum_y [U_y (X'V^-1X)^-1 P_y']_{s r}``, ``P = Z'V^-1X``,
    ``U = Lambda'P``; ``d X'V^-1X = -(P' dLambda U + U' dLambda' P)`` (the Satterthwaite
    Jacobian).

``Sigma`` on the pattern of ``L`` by selected inversion (Takahashi recurrences), in the block
pattern of the factorisation (:mod:`.pattern`), last factor first: the dense tail
``Sigma_TT = T^-1`` (LAPACK per voxel); for a prefix factor ``b`` with ``W_xy = L_xy L_yy^-1``,
``Sigma_xy = -sum_x' Sigma_xx' W_x'y`` over the later nodes of column ``y`` (the same pairs as
the factorisation's Schur updates) and ``Sigma_yy = L_yy^-T L_yy^-1 - sum_x W_xy' Sigma_xy``.
``U = S^-1 Lambda'Z'[X Y] = L^-T c`` by block back substitution from the forward-substituted
``c`` of the evaluation, ``P = Z'[X Y] - A Lambda U`` by one product in the Z'Z pattern.
Sums over levels are unit-weight sparse products (fixed order per voxel) or ``colsum``: the
bits of a voxel do not depend on its batch.  Cost per voxel about that of one evaluation.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

from ..likelihood import VinvProducts, gls, logdet_spd, loglik, profiled_s2
from ..theta import theta_slices, tril_indices
from . import kernel
from .cholesky import (Prepared, _cached, _lambda_lead, _mm, _placement, _t, as_slice,
                       blocked_vinv, colsum, colsums, vinv_products)
from .pattern import BlockPattern, aggregator


def lower_inverse(L: np.ndarray) -> np.ndarray:
    """``L^-1`` for lower triangular L (q, q, ...)."""
    q = L.shape[0]
    if q == 1:
        return 1.0 / L
    Inv = np.zeros_like(L)
    for j in range(q):
        Inv[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, q):
            s = L[i, j] * Inv[j, j]
            for k in range(j + 1, i):
                s = s + L[i, k] * Inv[k, j]
            Inv[i, j] = -s / L[i, i]
    return Inv


# ---------------------------------------------------------------- plans (once per design)
def _sinv_plan(pattern: BlockPattern, b: int):
    """Selected inversion of column factor ``b``: per update the entries off the diagonal
    (their transposed contribution), the aggregator of all ``Sigma_xW`` products into the
    cross segments of ``b``, and the aggregator of ``W'Sigma`` into its diagonal blocks."""
    ups = pattern.updates[b][0]
    qb = pattern.q_at(b)
    offs, targets = [], []
    for u in ups:
        qa, qc = pattern.q_at(u.a), pattern.q_at(u.c)
        e1 = np.arange(qa)[:, None, None]
        e2 = np.arange(qb)[None, :, None]
        targets.append(np.broadcast_to(pattern.cross[u.a, b].index(e1, e2, u.i1[None, None]),
                                       (qa, qb, u.i1.size)).ravel())
        off = np.arange(u.i1.size) if u.a != u.c else np.flatnonzero(u.i1 != u.i2)
        offs.append(off if off.size else None)
        if off.size:
            e1 = np.arange(qc)[:, None, None]
            targets.append(np.broadcast_to(
                pattern.cross[u.c, b].index(e1, e2, u.i2[off][None, None]),
                (qc, qb, off.size)).ravel())
    cross = aggregator(np.concatenate(targets)) if targets else None
    dtargets = []
    for a in pattern.row_factors(b):
        y = pattern.pairs[a, b][1]
        e1 = np.arange(qb)[:, None, None]
        e2 = np.arange(qb)[None, :, None]
        dtargets.append(np.broadcast_to(pattern.diag[b].index(e1, e2, y[None, None]) -
                                        pattern.diag[b].offset, (qb, qb, y.size)).ravel())
    diag = aggregator(np.concatenate(dtargets)) if dtargets else None
    return offs, cross, diag


def _back_plan(pattern: BlockPattern, b: int, r: int):
    """Per row factor of column factor ``b``: ``(direct, order)``; ``direct`` when its pairs,
    taken in ``order``, meet every level ``y`` of ``b`` once in turn (nesting: one parent per
    level), so ``L_xy' U_x`` is subtracted in place; and the aggregator of the other
    factors' products into ``b``'s rows (q_b, l_b, r), or None."""
    lb, qb = pattern.l_at(b), pattern.q_at(b)
    modes, targets = [], []
    for a in _back_rows(pattern, b):
        y = pattern.pairs[a, b][1]
        order = np.argsort(y, kind="stable")
        if y.size == lb and (y[order] == np.arange(lb)).all():
            modes.append((True, None if (order == np.arange(lb)).all() else order))
            continue
        modes.append((False, None))
        e = np.arange(qb)[:, None, None]
        s = np.arange(r)[None, None, :]
        targets.append(np.broadcast_to((e * lb + y[None, :, None]) * r + s,
                                       (qb, y.size, r)).ravel())
    return modes, (aggregator(np.concatenate(targets)) if targets else None)


def _back_rows(pattern: BlockPattern, b: int) -> list[int]:
    dense = pattern.dense_tail[b] is not None
    return [a for a in pattern.row_factors(b) if not (dense and a >= pattern.n_prefix)]


def _rows_index(pattern: BlockPattern, a: int, x: np.ndarray, r: int) -> np.ndarray:
    """Flat positions (q_a, n, r) in the right-hand side layout of factor ``a``'s levels x."""
    offs, tail, _ = pattern.rhs_layout(r)
    e = np.arange(pattern.q_at(a))[:, None, None]
    s = np.arange(r)[None, None, :]
    if a < pattern.n_prefix:
        return offs[a] + (e * pattern.l_at(a) + x[None, :, None]) * r + s
    return tail + pattern.tail_index(a, x[None, :, None], e) * r + s


def _zz_plan(pattern: BlockPattern, r: int):
    """Aggregator of the ``A Lambda U`` products (order of :func:`_zz_products`) into the
    right-hand side layout."""
    targets = []
    for seg, (a, b), _ in _cached(pattern, "placement", lambda: _placement(pattern)):
        if a == b:
            x = np.arange(pattern.l_at(a))
            targets.append(_rows_index(pattern, a, x, r).ravel())
        else:
            x, y, _ = pattern.zz_pairs[a, b]
            targets.append(_rows_index(pattern, a, x, r).ravel())
            targets.append(_rows_index(pattern, b, y, r).ravel())
    return aggregator(np.concatenate(targets))


def _plan(pattern: BlockPattern, name: str, fn):
    return _cached(pattern, name, fn)


# ---------------------------------------------------------------- numeric pieces
def factor_rows(pattern: BlockPattern, F: np.ndarray, a: int, r: int) -> np.ndarray:
    """View (q_a, l_a, r, v) of factor ``a``'s rows of a right-hand side array F (N, v)."""
    offs, tail, _ = pattern.rhs_layout(r)
    q, l, v = pattern.q_at(a), pattern.l_at(a), F.shape[-1]
    if a < pattern.n_prefix:
        return F[offs[a]:offs[a] + q * l * r].reshape(q, l, r, v)
    start = tail + pattern.tail_start[a] * r
    return np.moveaxis(F[start:start + l * q * r].reshape(l, q, r, v), 1, 0)


def selected_inverse(pattern: BlockPattern, fac, v: int) -> np.ndarray:
    """``S^-1`` on the pattern of L, flat in the layout of the S values (n_vals, v); the
    tail (m, m) in full."""
    sig = np.zeros((pattern.n_vals, v))
    m, t0 = pattern.m, pattern.tail_offset
    ST = None
    if m:
        Ci = sla.inv(fac.C, assume_a="lower triangular", check_finite=False)
        ST = np.matmul(np.swapaxes(Ci, 1, 2), Ci)                    # T^-1 = C^-T C^-1
        ST = 0.5 * (ST + np.swapaxes(ST, 1, 2))
        sig[t0:] = ST.reshape(v, m * m).T
    for b in reversed(range(pattern.n_prefix)):
        Li = lower_inverse(fac.Ld[b])                                        # (q, q, l, v)
        rows = pattern.row_factors(b)
        W = {a: _mm(fac.Lc[a, b], Li[:, :, pattern.pairs[a, b][1]]) for a in rows}
        offs, cross, diag = _plan(pattern, f"sinv{b}", lambda: _sinv_plan(pattern, b))
        ups = pattern.updates[b][0]
        if cross is not None:
            prods = []
            for u, off in zip(ups, offs):
                S = sig[u.target].reshape(pattern.q_at(u.a), pattern.q_at(u.c), -1, v)
                prods.append(_mm(S, W[u.c][:, :, u.i2]).reshape(-1, v))
                if off is not None:
                    prods.append(_mm(_t(S[:, :, off]), W[u.a][:, :, u.i1[off]]).reshape(-1, v))
            uniq, A = cross
            uniq = _cached(pattern, f"sinv_rows{b}", lambda: as_slice(uniq))
            sig[uniq] -= A @ np.concatenate(prods)
        if b in fac.Lt:                       # tail x tail: one dense product per voxel
            tails, flat = pattern.dense_tail[b]
            width = pattern.l_at(b) * pattern.q_at(b)
            if pattern.q_at(b) == 1:          # W = L_Tb L_bb^-1: the factor's dense tail
                WT = fac.Lt[b] * np.ascontiguousarray(Li[0, 0].T)[:, None, :]  # rows scaled,
            else:                             # the same products as W (same bits)
                WT = np.zeros((v, m * width))
                WT[:, flat] = np.concatenate([W[a].reshape(-1, v) for a in tails]).T
                WT = WT.reshape(v, m, width)
            SW = np.matmul(ST, WT).reshape(v, m * width).T
            s0 = pattern.cross[tails[0], b].offset
            s1 = pattern.cross[tails[-1], b].offset + pattern.cross[tails[-1], b].size
            sig[s0:s1] -= SW[flat]
        seg = pattern.diag[b]
        D = _mm(_t(Li), Li).reshape(-1, v)
        if diag is not None:
            prods = []
            for a in rows:
                cs = pattern.cross[a, b]
                S = sig[cs.offset:cs.offset + cs.size].reshape(cs.qa, cs.qb, cs.n, v)
                prods.append(_mm(_t(W[a]), S).reshape(-1, v))
            uniq, A = diag
            D[uniq] -= A @ np.concatenate(prods)
        sig[seg.offset:seg.offset + seg.size] = D
    return sig


def back_substitute(pattern: BlockPattern, fac, r: int, v: int) -> np.ndarray:
    """``U = S^-1 Lambda'Z'[X Y] = L^-T c`` in the right-hand side layout (N, v)."""
    offs, tail, _ = pattern.rhs_layout(r)
    U = np.empty_like(fac.B)
    m = pattern.m
    if m:
        U[tail:] = np.moveaxis(fac.XT, 0, -1).reshape(m * r, v)
    for b in reversed(range(pattern.n_prefix)):
        q, l = pattern.q_at(b), pattern.l_at(b)
        modes, agg = _plan(pattern, f"back{b}_{r}", lambda: _back_plan(pattern, b, r))
        c = fac.B[offs[b]:offs[b] + q * l * r].reshape(q, l, r, v)
        Ub = U[offs[b]:offs[b] + q * l * r].reshape(q, l, r, v)
        rows = _back_rows(pattern, b)
        if (q == 1 and rows and all(d for d, _ in modes) and b not in fac.Lt
                and all(pattern.q_at(a) == 1 for a in rows)):
            # one parent per level in every later factor (nesting), one-effect factors:
            # (c - sum_a L_xy U_x) / L_yy on the gathered copies, in the order of the general
            # path below (same bits)
            t = None
            for a, (_, order) in zip(rows, modes):
                x, La = pattern.pairs[a, b][0], fac.Lc[a, b]
                if order is not None:
                    x, La = x[order], La[:, :, order]
                u = factor_rows(pattern, U, a, r)[0, x]                      # (l, r, v)
                u *= La[0, 0][:, None]
                if t is None:
                    t = np.subtract(c[0], u, out=u)
                else:
                    t -= u
            np.divide(t, fac.Ld[b][0, 0][:, None], out=Ub[0])
            continue
        rhs = c.copy()
        prods = []
        for a, (direct, order) in zip(_back_rows(pattern, b), modes):
            x = pattern.pairs[a, b][0]
            La = fac.Lc[a, b]                                                # (q_a, q_b, n, v)
            if order is not None:
                x, La = x[order], La[:, :, order]
            Ux = factor_rows(pattern, U, a, r)[:, x]                         # (q_a, n, r, v)
            if direct:
                for f in range(q):
                    for e in range(La.shape[0]):
                        rhs[f] -= La[e, f][:, None] * Ux[e]
                continue
            out = np.empty((q,) + Ux.shape[1:])
            for f in range(q):
                np.multiply(La[0, f][:, None], Ux[0], out=out[f])
                for e in range(1, La.shape[0]):
                    out[f] += La[e, f][:, None] * Ux[e]
            prods.append(out.reshape(-1, v))
        if prods:
            uniq, A = agg
            rhs.reshape(-1, v)[uniq] -= A @ np.concatenate(prods)
        if b in fac.Lt:
            UT = np.moveaxis(fac.XT, 0, 0)                                   # (v, m, r)
            LtU = np.matmul(np.swapaxes(fac.Lt[b], 1, 2), UT)                # (v, l q, r)
            rhs -= np.transpose(LtU.reshape(v, l, q, r), (2, 1, 3, 0))
        Ld = fac.Ld[b]
        for e in reversed(range(q)):
            s = rhs[e]
            for f in range(e + 1, q):
                s = s - Ld[f, e][:, None] * Ub[f]
            Ub[e] = s / Ld[e, e][:, None]
    return U


def _zr(pattern: BlockPattern, prep: Prepared, r: int, v: int) -> np.ndarray:
    """``Z'[X Y]`` in the right-hand side layout (N, v)."""
    p = r - 1
    _, _, total = pattern.rhs_layout(r)
    out = np.empty((total, v))
    for a in range(pattern.K):
        rows = factor_rows(pattern, out, a, r)
        rows[:, :, :p] = prep.WX[a]
        rows[:, :, p] = prep.WY[a]
    return out


def zvz(pattern: BlockPattern, prep: Prepared, lam: list, U: np.ndarray, r: int,
        v: int) -> np.ndarray:
    """``P = Z'V^-1[X Y] = Z'[X Y] - Z'Z Lambda U`` in the right-hand side layout (N, v)."""
    LU = []
    for a in range(pattern.K):
        Ua = factor_rows(pattern, U, a, r)
        lam_a = lam[a][:, :, 0]                                               # (q, q, v)
        out = np.empty(Ua.shape)
        for e in range(Ua.shape[0]):
            np.multiply(lam_a[e, 0], Ua[0], out=out[e])
            for f in range(1, e + 1):
                out[e] += lam_a[e, f] * Ua[f]
        LU.append(out)
    zz = prep.zz
    prods = []
    for seg, (a, b), _ in _cached(pattern, "placement", lambda: _placement(pattern)):
        Z = zz[seg.offset:seg.offset + seg.size].reshape(seg.qa, seg.qb, seg.n, 1, -1)
        if a == b:
            prods.append(_zmul(Z, LU[a]))
        else:
            x, y, _ = pattern.zz_pairs[a, b]
            prods.append(_zmul(Z, LU[b][:, y]))
            prods.append(_zmul(_t(Z), LU[a][:, x]))
    uniq, A = _plan(pattern, f"zz{r}", lambda: _zz_plan(pattern, r))
    P = _zr(pattern, prep, r, v)
    P[uniq] -= A @ np.concatenate(prods)
    return P


#: ``P = Lambda^-T U`` needs a well-conditioned ``Lambda_k`` (q_k > 1); below this ratio of the
#: smallest to the largest diagonal entry the voxel takes the product ``Z'Z Lambda U``.
MIN_DIAG_RATIO = 1e-3


def lambda_inverses(pattern: BlockPattern, lam: list, v: int):
    """Per position ``Lambda_k^-1`` (q, q, v) and the voxels (v,) where some ``Lambda_k``
    (q_k > 1) is too close to singular for ``P_k = Lambda_k^-T U_k``.  One-effect factors:
    ``1 / theta_k``, 0 where ``theta_k = 0`` (then ``U_k = 0`` and every term that uses
    ``P_k`` has a factor ``U_k``: the limit is 0)."""
    out, slow = [], np.zeros(v, bool)
    for a in range(pattern.K):
        L = lam[a][:, :, 0]                                                    # (q, q, v)
        q = L.shape[0]
        diag = np.abs(np.stack([L[e, e] for e in range(q)]))
        if q > 1:
            slow |= diag.min(axis=0) < MIN_DIAG_RATIO * diag.max(axis=0)
        safe = L.copy()
        for e in range(q):
            safe[e, e] = np.where(diag[e] == 0.0, 1.0, L[e, e])
        inv = lower_inverse(safe)
        if q == 1:
            inv = inv * (diag[0] != 0.0)
        out.append(inv)
    return out, slow


def _zmul(Z: np.ndarray, Vx: np.ndarray) -> np.ndarray:
    """``Z_t V_t`` per pair: Z (qa, qb, n, 1, v|1), Vx (qb, n, r, v) -> flat (qa n r, v)."""
    out = np.empty((Z.shape[0],) + Vx.shape[1:])
    for e in range(Z.shape[0]):
        np.multiply(Z[e, 0], Vx[0], out=out[e])
        for f in range(1, Z.shape[1]):
            out[e] += Z[e, f] * Vx[f]
    return out.reshape(-1, Vx.shape[-1])


def logdet_gradient(pattern: BlockPattern, prep: Prepared, lam: list, sig: np.ndarray,
                    v: int) -> list[np.ndarray]:
    """Per position ``a``: ``F_a = sum_y sum_x Sigma_yx Lambda_x' A_xy`` (q_a, q_a, v), so that
    ``d log|V| / d theta_(r,s) = 2 F[s, r]`` (equation (1))."""
    F = [np.zeros((pattern.q_at(a),) * 2 + (v,)) for a in range(pattern.K)]
    zz = prep.zz
    for seg, (a, b), dest in _cached(pattern, "placement", lambda: _placement(pattern)):
        Z = zz[seg.offset:seg.offset + seg.size].reshape(seg.qa, seg.qb, seg.n, -1)
        S = sig[dest].reshape(seg.qa, seg.qb, seg.n, v)
        Fb = _mm(_t(S), _mm(_t(lam[a]), Z))                                # (qb, qb, n, v)
        F[b] += colsums(np.moveaxis(Fb, 2, 0))                # each entry summed over n
        if a != b:
            Fa = _mm(_mm(S, _t(lam[b])), _t(Z))                            # (qa, qa, n, v)
            F[a] += colsums(np.moveaxis(Fa, 2, 0))
    return F


def level_grams(pattern: BlockPattern, U: np.ndarray, r: int) -> list[np.ndarray]:
    """Per position the Gram matrix of ``U_k`` over the levels,
    ``G[s, i, t, j] = sum_x U_x[s, i] U_x[t, j]`` (q, r, q, r, v): ``q r (q r + 1) / 2``
    level sums."""
    out = []
    for a in range(pattern.K):
        Ua = factor_rows(pattern, U, a, r)
        q, v = Ua.shape[0], Ua.shape[-1]
        G = np.empty((q, r, q, r, v))
        Ul = np.moveaxis(Ua, 1, 0)                        # (l, q, r, v): levels first
        for s in range(q):
            for i in range(r):      # column (s, i) against the later ones, two sums at once
                ui = Ul[:, s, i, None, :]
                same = colsums(ui * Ul[:, s, i:])                          # (r - i, v)
                later = colsums(ui[:, None] * Ul[:, s + 1:])              # (q - s - 1, r, v)
                for j in range(i, r):
                    G[s, i, s, j] = G[s, j, s, i] = same[j - i]
                for t in range(s + 1, q):
                    for j in range(r):
                        G[s, i, t, j] = G[t, j, s, i] = later[t - s - 1, j]
        out.append(G)
    return out


def _gram_terms(grams: list, Linv: list, w: np.ndarray, At: np.ndarray, r: int, reml: bool,
                jacobian: bool) -> list:
    """Per position ``(UQ, M, N)`` from the Gram matrix ``G`` of ``U_k`` (:func:`level_grams`)
    and ``P_k = Lambda_k^-T U_k`` (:func:`lambda_inverses`): ``UQ[s, r] = sum_x u_x[s] p_x[r]``,
    ``M[s, r] = sum_x (U_x A P_x')[s, r]`` (REML), ``N[r, s][j, l] = sum_x P_x[r, j] U_x[s, l]``
    (Jacobian)."""
    p = r - 1
    out = []
    for G, Li in zip(grams, Linv):
        q, v = G.shape[0], G.shape[-1]
        Gw = np.empty((q, q, v))
        K = np.empty((q, q, v)) if reml else None
        for s in range(q):
            for t in range(q):
                acc = 0.0
                for i in range(r):
                    row = G[s, i, t, 0] * w[0]
                    for j in range(1, r):
                        row = row + G[s, i, t, j] * w[j]
                    acc = acc + w[i] * row
                Gw[s, t] = acc
                if reml:
                    acc = 0.0
                    for i in range(p):
                        row = G[s, i, t, 0] * At[i, 0]
                        for j in range(1, p):
                            row = row + G[s, i, t, j] * At[i, j]
                        acc = acc + row
                    K[s, t] = acc
        UQ, M = _times_linv(Gw, Li), (_times_linv(K, Li) if reml else None)
        N = None
        if jacobian:
            N = np.empty((q, q, p, p, v))
            for rr in range(q):
                for s in range(q):
                    for j in range(p):
                        for ll in range(p):
                            acc = Li[0, rr] * G[0, j, s, ll]
                            for t in range(1, q):
                                acc = acc + Li[t, rr] * G[t, j, s, ll]
                            N[rr, s, j, ll] = acc
        out.append((UQ, M, N))
    return out


def _times_linv(K: np.ndarray, Li: np.ndarray) -> np.ndarray:
    """``out[s, r] = sum_t K[s, t] Li[t, r]`` for (q, q, v) arrays."""
    q = K.shape[0]
    out = np.empty_like(K)
    for s in range(q):
        for rr in range(q):
            acc = K[s, 0] * Li[0, rr]
            for t in range(1, q):
                acc = acc + K[s, t] * Li[t, rr]
            out[s, rr] = acc
    return out


def _p_terms(pattern: BlockPattern, U: np.ndarray, P: np.ndarray, w: np.ndarray,
             At: np.ndarray, r: int, reml: bool, jacobian: bool) -> list:
    """``(UQ, M, N)`` of :func:`_gram_terms` from an explicit ``P`` (nearly singular
    ``Lambda_k``)."""
    p = r - 1
    out = []
    for a in range(pattern.K):
        Ua = factor_rows(pattern, U, a, r)
        Pa = factor_rows(pattern, P, a, r)
        q, v = Ua.shape[0], Ua.shape[-1]
        ue, pe = Ua[:, :, 0] * w[0], Pa[:, :, 0] * w[0]                      # (q, l, v)
        for j in range(1, r):
            ue = ue + Ua[:, :, j] * w[j]
            pe = pe + Pa[:, :, j] * w[j]
        UQ = _level_sum(ue, pe)
        M = None
        if reml:
            UA = np.zeros(Ua[:, :, :p].shape)
            for j in range(p):
                for i in range(p):
                    UA[:, :, j] += Ua[:, :, i] * At[i, j]
            M = np.zeros((q, q, v))
            for j in range(p):
                M += _level_sum(UA[:, :, j], Pa[:, :, j])
        N = None
        if jacobian:
            N = np.empty((q, q, p, p, v))
            for rr in range(q):
                for s in range(q):
                    for j in range(p):
                        for ll in range(p):
                            N[rr, s, j, ll] = colsum(Pa[rr, :, j] * Ua[s, :, ll])
        out.append((UQ, M, N))
    return out


def _level_sum(Xa: np.ndarray, Ya: np.ndarray) -> np.ndarray:
    """``sum_x Xa[s, x] Ya[r, x]`` for Xa (q, l, v), Ya (q, l, v): (q, q, v) indexed [s, r]."""
    q = Xa.shape[0]
    out = np.empty((q, q, Xa.shape[-1]))
    for s in range(q):
        for t in range(q):
            out[s, t] = colsum(Xa[s] * Ya[t])
    return out


def evaluate(pattern: BlockPattern, prep: Prepared, theta: np.ndarray, method: str,
             jacobian: bool = False) -> dict:
    """The profiled deviance and its gradient at ``theta`` (v, n_theta).

    Returns ``f`` (v,) the deviance ``-2 l`` (inf where the evaluation failed), ``g`` (v, m)
    its gradient, ``ld``, ``Q`` (v,) and their gradients ``dld``, ``dQ`` (v, m) (``ld`` as in
    the module docstring), ``vp``, ``beta``, ``s2``, ``llh``; with ``jacobian`` also
    ``dXtViX`` (v, m, p, p).
    """
    pf = prep.pf
    v, p = pf.n_voxels, pf.p
    r = p + 1
    reml = method == "REML"
    bad = ~np.isfinite(theta).all(axis=1)
    th = np.where(bad[:, None], 0.0, theta)
    K = pattern.K
    fac = None
    if prep.kernel:                           # compiled: one pass per stage
        kr = kernel.evaluate(pattern, prep, th, gradient=True)
        vp = vinv_products(pf, kr.G, kr.logdet, np.zeros(v, bool))
        lam = _lambda_lead(pattern, th)
        F = [kr.F[:, a].reshape(1, 1, v) for a in range(K)]
        grams = [np.moveaxis(kr.gram[:, a], 0, -1).reshape(1, r, 1, r, v) for a in range(K)]
    else:
        facs = []
        vp = blocked_vinv(pattern, prep, th, factor_out=facs)
        fac = facs[0]
        lam = fac.lam
    ok = np.isfinite(vp.XtViX).all(axis=(1, 2)) & ~bad
    XtViX = np.where(ok[:, None, None], vp.XtViX, np.eye(p))
    vp2 = VinvProducts(XtViX=XtViX, XtViY=np.where(ok[:, None], vp.XtViY, 0.0),
                       YtViY=np.where(ok, vp.YtViY, 1.0), logdetV=vp.logdetV)
    beta, Q = gls(vp2)
    s2 = profiled_s2(Q, pf.n, p, method)
    llh = np.where(ok, loglik(vp2, pf.n, s2, Q, method), np.nan)
    Ainv = np.linalg.inv(XtViX)
    Ainv = 0.5 * (Ainv + np.swapaxes(Ainv, 1, 2))
    ld = vp.logdetV + (logdet_spd(XtViX) if reml else 0.0)
    # pieces of the gradient
    if fac is not None:
        sig = selected_inverse(pattern, fac, v)
        F = logdet_gradient(pattern, prep, fac.lam, sig, v)
        U = back_substitute(pattern, fac, r, v)
        grams = level_grams(pattern, U, r)
    w = np.concatenate([-beta, np.ones((v, 1))], axis=1).T                    # (r, v)
    At = np.moveaxis(Ainv, 0, -1)                                             # (p, p, v)
    Linv, slow = lambda_inverses(pattern, lam, v)
    terms = _gram_terms(grams, Linv, w, At, r, reml, jacobian)
    if slow.any():          # P = Z'V^-1[X Y] by the product in Z'Z (q_k > 1: numpy path only)
        idx = np.flatnonzero(slow)
        Us = np.ascontiguousarray(U[:, idx])
        Ps = zvz(pattern, prep.take(idx), [x[..., idx] for x in fac.lam], Us, r, idx.size)
        sub = _p_terms(pattern, Us, Ps, w[:, idx], At[..., idx], r, reml, jacobian)
        for full, part in zip(terms, sub):
            for x, y in zip(full, part):
                if x is not None:
                    x[..., idx] = y
    m = theta.shape[1]
    dld = np.empty((v, m))
    dQ = np.empty((v, m))
    dX = np.empty((v, m, p, p)) if jacobian else None
    slices = theta_slices(pattern.structure)
    for a, k in enumerate(pattern.order):
        UQ, M, N = terms[a]
        rows, cols = tril_indices(pattern.q_at(a))
        for t, (rr, ss) in enumerate(zip(rows, cols)):
            i = slices[k].start + t
            dld[:, i] = 2.0 * F[a][ss, rr] - (2.0 * M[ss, rr] if reml else 0.0)
            dQ[:, i] = -2.0 * UQ[ss, rr]
            if jacobian:
                Nt = np.moveaxis(N[rr, ss], -1, 0)                           # (v, p, p)
                dX[:, i] = -(Nt + np.swapaxes(Nt, 1, 2))
    dof = (pf.n - p if reml else pf.n).astype(float)
    g = dld + dof[:, None] * dQ / Q[:, None]
    f = np.where(np.isfinite(llh), -2.0 * llh, np.inf)
    out = dict(f=f, g=g, ld=ld, Q=Q, dld=dld, dQ=dQ, vp=vp, beta=beta, s2=s2, llh=llh,
               A=Ainv)
    if jacobian:
        out["dXtViX"] = dX
    return out
