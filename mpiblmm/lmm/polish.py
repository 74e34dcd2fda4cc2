"""Boundary-safe polish of a Fisher Scoring fit in lme4's theta parameterisation.

Fisher Scoring in ``D`` with eigenvalue clipping stalls below the optimum when a ``D_k`` is
singular at the optimum (q_k >= 2): the clipped step is no projected gradient step.  lme4
optimises the profiled log-likelihood over ``theta`` (the Cholesky entries of each ``Lambda_k``,
diagonal entries bounded below by 0), where the boundary is a simple bound.  This module
maximises the same profiled log-likelihood, vectorised over voxels, by alternating two
candidate moves per iteration:

1. **Newton in theta.**  Gradient by the chain rule from the D-score:
   ``dl/dLambda_k = 2 G_k Lambda_k`` (G_k symmetric), restricted to the lower triangle.
   Hessian ``H = -J' I_p J + C``: ``J = d vech(D) / d theta`` (``dD = dLambda Lambda' +
   Lambda dLambda'``), ``I_p`` the expected information of ``vech D`` with ``s2`` profiled out
   (all factor pairs), and ``C[m, n] = 2 delta(c_m, c_n) G[r_m, r_n]`` the curvature of
   ``D = Lambda Lambda'`` itself (``theta_m = Lambda[r_m, c_m]``).  ``H`` is made negative
   definite by taking absolute eigenvalues ("saddle-free" Newton); the step is halved until
   ``l`` does not fall.  lme4's bound ``Lambda[c, c] >= 0`` only fixes the sign of each
   column (``D`` is unchanged when a column of ``Lambda`` changes sign), so the iteration is
   unconstrained and every accepted point is put back into lme4's form by flipping the sign
   of columns with a negative diagonal.  (A bound would be wrong here: at ``Lambda[c, c] = 0``
   the likelihood may rise by *decreasing* it, i.e. by flipping the column below it.)
2. **Escape from a singular D_k.**  Where ``D_k`` has a null space ``N`` (and the Newton move
   gained less than ``tolerance``), the theta gradient of the zero columns vanishes whatever
   the data, so Newton cannot leave.  The D-score can: if ``N'G_kN`` has a positive
   eigenvalue ``mu`` with vector ``z``, ``D_k + t ww'`` (``w = Nz``) raises ``l`` for small
   ``t``; we try ``t = mu / (e' I_kk e)``, ``e = vech(ww')`` (the 1-D scoring step), halving.

A voxel stops when neither move gains ``tolerance`` in ``l``: the first-order conditions hold
in theta, and no direction out of the boundary raises ``l`` (the second-order condition of the
PSD-cone problem, ``N'GN <= 0``).

The iteration is a generator (:func:`polish_rounds`) over a :class:`PolishState` that voxels
may join while it runs: a chunk's fit (:mod:`~mpiblmm.lmm.scoring`) hands each voxel over as
Fisher Scoring finishes it and answers both iterations' evaluation requests in shared calls;
:func:`polish` runs it alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .fisher import Evaluation, Request, Sizes, eigh_sym, evaluate, run
from .model import ProductForms, RandomStructure
from .scores import score_information, vech
from .theta import lambdas_from_theta, theta_from_D, tril_indices


def _jacobian(lam: np.ndarray) -> np.ndarray:
    """``J[:, n, m] = d vech(D)_n / d theta_m`` for one factor, D = Lambda Lambda' (v, m, m).

    With ``theta_m = Lambda[r, c]``: ``dD[a, b] = delta(a, r) Lambda[b, c] + delta(b, r)
    Lambda[a, c]`` (the index pattern built once per q, :func:`_jacobian_plan`).
    """
    v, q = lam.shape[0], lam.shape[-1]
    m = q * (q + 1) // 2
    pos1, src1, pos2, src2 = _jacobian_plan(q)
    flat = lam.reshape(v, q * q)
    J = np.zeros((v, m * m))
    J[:, pos1] = 0.0 + flat[:, src1]
    J[:, pos2] += flat[:, src2]
    return J.reshape(v, m, m)


@functools.lru_cache(maxsize=None)
def _jacobian_plan(q: int) -> tuple[np.ndarray, ...]:
    """Flat positions in J and flat entries of Lambda of the first and second term of
    :func:`_jacobian` (the second where both deltas hold)."""
    rows, cols = tril_indices(q)
    m = rows.size
    pos1, src1, pos2, src2 = [], [], [], []
    for n_, (a, b) in enumerate(zip(rows, cols)):
        for m_, (r, c) in enumerate(zip(rows, cols)):
            terms = ([b * q + c] if a == r else []) + ([a * q + c] if b == r else [])
            if terms:
                pos1.append(n_ * m + m_)
                src1.append(terms[0])
            if len(terms) == 2:
                pos2.append(n_ * m + m_)
                src2.append(terms[1])
    return tuple(np.array(x, dtype=np.intp) for x in (pos1, src1, pos2, src2))


def _curvature(G: np.ndarray) -> np.ndarray:
    """``C[m, n] = 2 delta(c_m, c_n) G[r_m, r_n]``: ``tr(G d2D)`` for one factor (v, m, m)."""
    rows, cols = tril_indices(G.shape[-1])
    same_col = (cols[:, None] == cols[None, :]).astype(float)
    return 2.0 * same_col * G[:, rows[:, None], rows[None, :]]


def _block_diag(blocks: list[np.ndarray]) -> np.ndarray:
    if len(blocks) == 1:
        return blocks[0]
    sizes = [b.shape[-1] for b in blocks]
    out = np.zeros((blocks[0].shape[0], sum(sizes), sum(sizes)))
    start = 0
    for b, s in zip(blocks, sizes):
        out[:, start:start + s, start:start + s] = b
        start += s
    return out


@dataclass(frozen=True)
class Derivatives:
    """theta gradient (v, m), negative Hessian approximation (v, m, m), D-scores ``G_k``, and
    per factor the vech information diagonal blocks ``I_kk`` with ``s2`` profiled out and,
    ``plain_kk``, without (the escape's step length where the profiled one is degenerate)."""

    grad: np.ndarray
    neg_hess: np.ndarray
    G: tuple[np.ndarray, ...]
    info_kk: tuple[np.ndarray, ...]
    plain_kk: tuple[np.ndarray, ...]

    def take(self, idx: np.ndarray) -> "Derivatives":
        return Derivatives(self.grad[idx], self.neg_hess[idx], tuple(G[idx] for G in self.G),
                           tuple(I[idx] for I in self.info_kk),
                           tuple(I[idx] for I in self.plain_kk))


def derivatives(ev: Evaluation, pf: ProductForms, lambdas: tuple[np.ndarray, ...],
                method: str) -> Derivatives:
    """Gradient and (profiled, expected) negative Hessian in theta, and the full D-scoring step."""
    st = pf.structure
    G, info, ts = score_information(pf, lambdas, ev.vp, ev.beta, ev.s2, method, cross=True,
                                    sums=ev.sums)
    dof = (pf.n - pf.p if method == "REML" else pf.n).astype(float)
    # s2 profiled out: I_DD - I_Ds2 I_s2s2^-1 I_s2D = I_DD - t t' / (2 dof)
    t = np.concatenate(ts, axis=-1)
    plain = info
    info = info - t[:, :, None] * t[:, None, :] / (2.0 * dof[:, None, None])
    grads, Js, Cs = [], [], []
    for f, Gk, lam in zip(st.factors, G, lambdas):
        rows, cols = tril_indices(f.n_effects)
        grads.append((2.0 * Gk @ lam)[:, rows, cols])      # dl/dLambda = 2 G Lambda
        Js.append(_jacobian(lam))
        Cs.append(_curvature(Gk))
    J = _block_diag(Js)
    neg_hess = np.swapaxes(J, 1, 2) @ info @ J - _block_diag(Cs)
    info_kk, plain_kk, start = [], [], 0
    for f in st.factors:
        block = slice(start, start + f.n_vech)
        info_kk.append(info[:, block, block])
        plain_kk.append(plain[:, block, block])
        start += f.n_vech
    return Derivatives(np.concatenate(grads, axis=-1), neg_hess, G, tuple(info_kk),
                       tuple(plain_kk))


def newton_direction(der: Derivatives) -> np.ndarray:
    """Saddle-free Newton direction ``|H|^-1 g`` (absolute eigenvalues of the Hessian)."""
    g, N = der.grad, der.neg_hess
    m = g.shape[1]
    ok = np.isfinite(N).all(axis=(1, 2)) & np.isfinite(g).all(axis=1)
    N = np.where(ok[:, None, None], N, np.eye(m))
    g = np.where(ok[:, None], g, 0.0)
    w, U = np.linalg.eigh(0.5 * (N + np.swapaxes(N, 1, 2)))
    aw = np.abs(w)
    floor = 1e-10 * aw.max(axis=1, keepdims=True) + 1e-300
    inv = 1.0 / np.maximum(aw, floor)
    # U diag(inv) U' g with plain einsum loops (optimize=True rounds by batch size: rowwise.py)
    d = np.einsum("vij,vj->vi", U, inv * np.einsum("vkj,vk->vj", U, g))
    return np.where(ok[:, None], d, 0.0)


#: Correct the polish's Hessian model by the secant of the last Newton step (below).
SECANT = True


def _secant_corrected(der: Derivatives, theta: np.ndarray, prev_theta: np.ndarray,
                      prev_grad: np.ndarray, has_prev: np.ndarray) -> Derivatives:
    """The negative Hessian model ``N = J' I_p J - C`` corrected so that it reproduces the
    change of the gradient along the last Newton step (Powell-symmetric-Broyden update):
    with ``s = theta - theta_prev``, ``y = g - g_prev`` and ``r = -y - N s``,
    ``N + (r s' + s r')/(s's) - (r's) s s'/(s's)^2`` satisfies ``N s = -y``.

    The expected information in ``N`` differs from the observed one by a fixed amount near
    the optimum, so the uncorrected Newton iteration converges linearly (gains falling by a
    factor of only ~20-100 per iteration on boundary voxels); the secant supplies the
    missing curvature along the path.  Only where the pair has positive curvature
    (``-s'y > 0``) and everything is finite; elsewhere ``N`` is kept.
    """
    s = theta - prev_theta
    y = der.grad - prev_grad
    N = der.neg_hess
    Ns = np.einsum("vij,vj->vi", N, s)
    ss = np.einsum("vi,vi->v", s, s)
    sy = -np.einsum("vi,vi->v", s, y)
    ok = has_prev & (ss > 0) & (sy > 0) & np.isfinite(N).all(axis=(1, 2)) \
        & np.isfinite(y).all(axis=1)
    if not ok.any():
        return der
    idx = np.flatnonzero(ok)
    s, y, Ns, ss = s[idx], y[idx], Ns[idx], ss[idx][:, None, None]
    r = -y - Ns
    rs = np.einsum("vi,vi->v", r, s)[:, None, None]
    E = (r[:, :, None] * s[:, None, :] + s[:, :, None] * r[:, None, :]) / ss \
        - rs * s[:, :, None] * s[:, None, :] / ss ** 2
    N = N.copy()
    N[idx] = N[idx] + E
    return Derivatives(der.grad, N, der.G, der.info_kk, der.plain_kk)


def canonical_theta(theta: np.ndarray, structure: RandomStructure) -> np.ndarray:
    """lme4's form: flip the sign of every Lambda_k column whose diagonal is negative."""
    diag = _column_diagonals(tuple(f.n_effects for f in structure.factors))
    return theta * np.where(theta[:, diag] < 0, -1.0, 1.0)


@functools.lru_cache(maxsize=None)
def _column_diagonals(qs: tuple[int, ...]) -> np.ndarray:
    """For every theta entry, the position of its Lambda_k column's diagonal entry."""
    out, start = [], 0
    for q in qs:
        rows, cols = tril_indices(q)
        diag_of = {int(c): start + int(i) for i, (r, c) in enumerate(zip(rows, cols)) if r == c}
        out += [diag_of[int(c)] for c in cols]
        start += rows.size
    return np.array(out, dtype=np.intp)


def escape_directions(lambdas: tuple[np.ndarray, ...], der: Derivatives,
                      null_tol: float = 1e-9) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Per factor, the rank-one move ``t ww'`` out of the null space of ``D_k`` (see module doc).

    Returns the moves (v, q_k, q_k) (zero where there is none) and a (v,) mask of voxels with
    at least one.
    """
    moves, any_move = [], None
    for lam, Gk, Ik, Pk in zip(lambdas, der.G, der.info_kk, der.plain_kk):
        D = lam @ np.swapaxes(lam, 1, 2)
        finite = np.isfinite(D).all(axis=(1, 2)) & np.isfinite(Gk).all(axis=(1, 2))
        D = np.where(finite[:, None, None], D, 0.0)
        Gs = np.where(finite[:, None, None], Gk, 0.0)
        w, U = eigh_sym(D)
        null = w <= null_tol * np.maximum(w[:, -1:], 1.0)
        # G restricted to the null space: N'GN with N the null eigenvectors (others masked)
        Un = U * null[:, None, :]
        GN = np.swapaxes(Un, 1, 2) @ Gs @ Un
        mu, Z = eigh_sym(0.5 * (GN + np.swapaxes(GN, 1, 2)))
        top, z = mu[:, -1], Z[:, :, -1]
        wvec = np.einsum("vij,vj->vi", Un, z)
        E = wvec[:, :, None] * wvec[:, None, :]
        e = vech(E)
        # 1-D scoring step along E: t = tr(G E) / (e' I e), tr(G E) = w'Gw = mu
        curv = np.einsum("vi,vij,vj->v", e, Ik, e)
        # REML's profiled information (traces of V^-1 against dof n - p) can be <= 0 along E
        # where the factor is barely identified (n = 12 on 10 levels, 2 of them repeated):
        # there the information without s2 profiled out sizes the step (the line search
        # halves it as needed); with no step at all the voxel stayed at D_k = 0, up to 5
        # below lme4's logLik (BLMM audit, tests/lmm/test_probe.py)
        plain = np.einsum("vi,vij,vj->v", e, Pk, e)
        curv = np.where(curv > 0, curv, plain)
        has = finite & (top > 0) & null.any(axis=1) & (curv > 0)
        t = np.where(has, top / np.where(curv > 0, curv, 1.0), 0.0)
        moves.append(t[:, None, None] * E)
        any_move = has if any_move is None else (any_move | has)
    return tuple(moves), any_move


@dataclass(frozen=True)
class PolishResult:
    """Polished ``theta`` (v, n_theta), ``lambdas``, the evaluation there, iterations (v,),
    and ``converged`` (v,) (False where the iteration cap was hit)."""

    theta: np.ndarray
    lambdas: tuple[np.ndarray, ...]
    ev: Evaluation
    iterations: np.ndarray
    converged: np.ndarray


#: Step halvings the line search evaluates together, after the full step alone: a voxel keeps
#: the first step of the sequence that does not lower ``l``, exactly as one by one, in fewer
#: calls (their fixed cost is what small chunks pay: docs/ESTIMATOR.md).
HALVING_BATCH = 3


def _alpha_groups(max_halvings: int) -> list[list[float]]:
    """[1], [1/2 .. 1/8], [1/16 ..], ...: ``max_halvings + 1`` step lengths in groups."""
    alphas = [0.5 ** h for h in range(max_halvings + 1)]
    return [alphas[:1]] + [alphas[i:i + HALVING_BATCH]
                           for i in range(1, len(alphas), HALVING_BATCH)]


def _line_search(index, theta, llh, direction_fn, st, max_halvings, predicted=None,
                 min_gain=0.0):
    """Try ``theta(alpha)`` for alpha = 1, 1/2, ...; keep the first that does not lower ``l``.

    A generator (``yield from``): it yields a :class:`~.fisher.Request` per evaluation, for
    voxels ``index`` (v,) of the chunk's product forms.  ``direction_fn(idx, alpha)``
    returns candidate theta for voxels ``idx`` (``alpha`` a scalar or one per voxel,
    (len(idx), 1)).  When ``predicted`` (v,) is given (the first-order gain of the full
    step), a voxel stops halving once ``alpha * predicted`` falls below ``min_gain`` (nothing
    worth an evaluation is left).  The halvings are evaluated in groups
    (:func:`_alpha_groups`); the step kept is the one the sequence would keep.  Returns the
    new theta, its llh (NaN where nothing was accepted), the accepted mask and the
    evaluations of the accepted voxels as (index, Evaluation) pairs.
    """
    v = theta.shape[0]
    new_theta = theta.copy()
    new_llh = np.full(v, np.nan)
    accepted = np.zeros(v, dtype=bool)
    evs: list[tuple[np.ndarray, Evaluation]] = []
    pending = np.arange(v)
    gain_floor = None if predicted is None else np.broadcast_to(min_gain, (v,))
    for group in _alpha_groups(max_halvings):
        vox, alphas = [], []
        for alpha in group:
            if predicted is not None:
                pending = pending[alpha * predicted[pending] > gain_floor[pending]]
            vox.append(pending)
            alphas.append(np.full(pending.size, alpha))
        vox = np.concatenate(vox)
        if vox.size == 0:
            break
        alphas = np.concatenate(alphas)[:, None]
        cand = direction_fn(vox, alphas)
        ev = yield Request(index[vox], lambdas_from_theta(cand, st), True)
        ok = np.flatnonzero(ev.llh >= llh[vox])
        if ok.size:
            idx, first = np.unique(vox[ok], return_index=True)   # the largest step kept
            sel = ok[first]
            new_theta[idx] = cand[sel]
            new_llh[idx] = ev.llh[sel]
            accepted[idx] = True
            evs.append((idx, ev.take(sel)))
            pending = pending[~accepted[pending]]
    return new_theta, new_llh, accepted, evs


def polish(pf: ProductForms, theta0: np.ndarray, method: str = "REML",
           tolerance: float = 1e-12, max_iterations: int | np.ndarray = 100,
           max_halvings: int = 30, ev0: Evaluation | None = None) -> PolishResult:
    """Maximise the profiled (RE)ML log-likelihood over theta from ``theta0`` (v, n_theta).

    See the module docstring for the two moves.  ``max_iterations`` is one cap or a cap per
    voxel (v,) (what is left of a voxel's budget after Fisher Scoring); a voxel that reaches
    its cap stops with ``converged`` False.  Voxels whose evaluation fails at ``theta0``
    are returned unchanged with ``llh`` NaN and ``converged`` False.  ``ev0``: the evaluation
    at ``theta0`` when the caller has it (Fisher Scoring's last one: the profiled fit and its
    level sums depend on ``D = Lambda Lambda'`` alone, so any square root's evaluation
    serves); it is not evaluated again.
    """
    st, v = pf.structure, pf.n_voxels
    theta0 = np.array(theta0, dtype=np.float64)
    if ev0 is None:
        ev0 = evaluate(pf, lambdas_from_theta(canonical_theta(theta0, st), st), method,
                       need_z=True)
    state = PolishState(v, theta0.shape[1])
    state.add(np.arange(v), theta0, ev0, max_iterations, st)
    state.closed = True
    run(pf, method, polish_rounds(pf, state, method, tolerance, max_halvings))
    return PolishResult(theta=state.theta, lambdas=lambdas_from_theta(state.theta, st),
                        ev=state.ev, iterations=state.iterations, converged=state.converged)


class PolishState:
    """The polish's voxels of one chunk of ``v``: per voxel theta (v, n_theta), the
    evaluation there (``ev``, an :class:`~.fisher.Evaluation` of all ``v`` voxels, written at
    the polished ones only), iterations, cap and ``converged``.  Voxels join with
    :meth:`add` -- also while :func:`polish_rounds` runs (Fisher Scoring hands voxels over
    as it finishes them); ``closed`` says that no more will come."""

    def __init__(self, v: int, m: int):
        self.theta = np.full((v, m), np.nan)
        self.iterations = np.zeros(v, dtype=np.int64)
        self.converged = np.zeros(v, dtype=bool)
        self.cap = np.zeros(v, dtype=np.int64)
        self.ev: Evaluation | None = None
        self.incoming: list[np.ndarray] = []
        self.closed = False

    def add(self, idx: np.ndarray, theta0: np.ndarray, ev: Evaluation, cap, st) -> None:
        """Voxels ``idx`` start at ``theta0`` (put into lme4's form) and ``cap`` iterations,
        with their evaluation in the rows ``idx`` of ``ev`` (all ``v`` voxels; the same
        object at every call, kept and written at the polished voxels only: Fisher Scoring
        hands over its own, whose rows of finished voxels it no longer writes).  Voxels
        whose evaluation failed never start."""
        if self.ev is None:
            self.ev = ev
        elif ev is not self.ev:
            raise ValueError("every voxel of a polish must come with the same evaluation")
        self.theta[idx] = canonical_theta(theta0, st)
        self.cap[idx] = cap
        self.incoming.append(idx[np.isfinite(ev.llh[idx])])


def polish_rounds(pf: ProductForms, state: PolishState, method: str = "REML",
                  tolerance: float = 1e-12, max_halvings: int = 30):
    """The polish (:func:`polish`) as a generator over the voxels of ``state``: yields a
    :class:`~.fisher.Request` per evaluation (``None`` while it waits for voxels) and is
    sent its :class:`~.fisher.Evaluation`.  Every voxel runs the same iterations whenever it
    joins, so its result does not depend on the others."""
    st = pf.structure
    theta, iterations, converged, cap = state.theta, state.iterations, state.converged, state.cap
    v = theta.shape[0]
    active = np.zeros(0, dtype=np.int64)
    prev_theta = np.zeros_like(theta)
    prev_grad = np.zeros_like(theta)
    has_prev = np.zeros(v, dtype=bool)
    while True:
        if state.incoming:
            active = np.concatenate([active] + state.incoming)
            state.incoming.clear()
        active = active[iterations[active] < cap[active]]
        if active.size == 0:
            if state.closed:
                return
            yield None
            continue
        ev = state.ev
        ev_a = ev.take(active)
        th_a = theta[active]
        lam_a = lambdas_from_theta(th_a, st)
        der = derivatives(ev_a, Sizes.of(pf, active), lam_a, method)
        if SECANT:
            der = _secant_corrected(der, th_a, prev_theta[active], prev_grad[active],
                                    has_prev[active])
            prev_theta[active], prev_grad[active] = th_a, der.grad
        d = newton_direction(der)
        floor = np.maximum(tolerance, 1e-14 * np.abs(ev_a.llh))   # rounding floor of l
        # first-order gain of the full Newton step, g'd (>= 0 for the saddle-free direction)
        predicted = np.einsum("vi,vi->v", der.grad, d)
        new_th, new_llh, acc, evs = yield from _line_search(
            active, th_a, ev_a.llh, lambda idx, alpha: th_a[idx] + alpha * d[idx],
            st, max_halvings, predicted=predicted, min_gain=0.01 * floor)
        gain = np.where(acc, new_llh - ev_a.llh, 0.0)
        # where Newton gained (almost) nothing, try to leave the boundary of the PSD cone
        # (the escape directions only for those voxels: mostly none, or the few finishing)
        retry = np.flatnonzero(gain < floor)
        if retry.size:
            lam_r = tuple(lam[retry] for lam in lam_a)
            mv_r, has = escape_directions(lam_r, der.take(retry))
            retry, lam_r = retry[has], tuple(lam[has] for lam in lam_r)
            mv_r = tuple(m[has] for m in mv_r)
        if retry.size:
            D_r = tuple(lam @ np.swapaxes(lam, 1, 2) for lam in lam_r)

            def escape(idx, alpha):
                alpha = np.reshape(alpha, (-1, 1, 1))
                return theta_from_D(tuple(Dk[idx] + alpha * mk[idx]
                                          for Dk, mk in zip(D_r, mv_r)), st)

            base = ev_a.llh[retry] + np.maximum(gain[retry], 0.0)
            # first-order gain of the escape: sum_k tr(G_k t_k w_k w_k')
            pred = sum(np.einsum("vab,vab->v", Gk[retry], mk) for Gk, mk in zip(der.G, mv_r))
            s_th, s_llh, s_acc, s_evs = yield from _line_search(
                active[retry], th_a[retry], base, escape, st, max_halvings=20,
                predicted=pred, min_gain=0.01 * floor[retry])
            better = s_acc & (s_llh > base)
            if better.any():
                idx = retry[better]
                new_th[idx] = s_th[better]
                new_llh[idx] = s_llh[better]
                acc[idx] = True
                gain[idx] = s_llh[better] - ev_a.llh[idx]
                for sub_idx, sub_ev in s_evs:
                    sel = np.flatnonzero(better[sub_idx])
                    if sel.size:
                        evs.append((retry[sub_idx[sel]], sub_ev.take(sel)))
        # write back accepted moves (the escape, appended last, wins where it was better)
        for idx, sub_ev in evs:
            ev.put(active[idx], sub_ev)
        canon = canonical_theta(new_th[acc], st)
        theta[active[acc]] = canon
        # a secant pair needs two points of one Newton path: not across an escape (a jump
        # out of the boundary) or a column flipped back to lme4's sign
        newton = acc.copy()
        newton[retry] = False
        newton[np.flatnonzero(acc)[(canon != new_th[acc]).any(axis=1)]] = False
        has_prev[active] = newton
        iterations[active] += 1
        done = gain < floor
        converged[active[done]] = True
        active = active[~done]
