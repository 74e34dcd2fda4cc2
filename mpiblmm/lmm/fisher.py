"""Simplified Fisher Scoring of the variance parameters ``D_k``, vectorised over voxels.

Owns the first stage of the estimator (ALGORITHM.md, "Iteration").  Every iteration, for the
voxels still active:

1. ``beta`` by GLS and ``s2 = e'V^-1e / dof`` (dof = n for ML, n - p for REML) are profiled out
   (:func:`~mpiblmm.lmm.likelihood.profiled_loglik`);
2. each factor's ``vech D_k`` moves by ``lambda * I_k^-1 s_k``, with ``s_k = Dup' vec(G_k)`` the
   score and ``I_k`` its own block of the expected information (by default with ``s2`` profiled
   out: ``I_DkDk - I_Dk,s2 I_s2s2^-1 I_s2,Dk``), then is projected onto the PSD cone
   (eigenvalues clipped at 0);
3. the log-likelihood ``l`` is evaluated; where it fell, ``lambda`` is halved and the step retried
   from the previous iterate (never keeping the worse point); ``lambda`` is 1 again next
   iteration.  The reference for the first step is ``l`` at the start, so no voxel is halved
   for a bogus comparison.

A voxel stops when ``l`` changed by less than ``tolerance``, when the first-order gain of the
next full step ``s' I^-1 s`` is below it, or when no halving improved ``l`` (stuck, usually on
the boundary: ``stalled``), and is then removed from the active set.  Voxels whose algebra fails (non-finite values, a singular
solve) are isolated by :func:`evaluate`, never touching the others.

The iteration is a generator (:func:`scoring_rounds`) that asks for its evaluations
(:class:`Request`) instead of calling :func:`evaluate`: :func:`fisher_scoring` answers them
one by one (:func:`run`), and a chunk's fit (:mod:`~mpiblmm.lmm.scoring`) answers them
together with the polish's, in shared calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .likelihood import VinvProducts
from .model import ProductForms
from .scores import score_information, unvech, vech_score


# ---------------------------------------------------------------- isolated evaluation
@dataclass(frozen=True)
class Evaluation:
    """The profiled fit at given ``Lambda_k``: ``llh`` (v,), ``beta`` (v, p) centred, ``s2`` (v,),
    ``vp``, and the sums the scores need when the structure's algebra forms them in the same
    pass (``sums``, with ``take``/``put``/``concat``; or None).  ``llh`` is NaN where the
    voxel's algebra failed."""

    llh: np.ndarray
    beta: np.ndarray
    s2: np.ndarray
    vp: VinvProducts
    sums: object | None = None

    def take(self, idx: np.ndarray) -> "Evaluation":
        return Evaluation(self.llh[idx], self.beta[idx], self.s2[idx], self.vp.take(idx),
                          None if self.sums is None else self.sums.take(idx))

    def put(self, idx: np.ndarray, other: "Evaluation") -> None:
        """Overwrite voxels ``idx`` with ``other`` (in place; arrays are owned by the caller)."""
        self.llh[idx] = other.llh
        self.beta[idx] = other.beta
        self.s2[idx] = other.s2
        self.vp.put(idx, other.vp)
        if self.sums is not None:
            self.sums.put(idx, other.sums)


def _lambdas_finite(lambdas: tuple[np.ndarray, ...]) -> np.ndarray:
    ok = np.ones(lambdas[0].shape[0], dtype=bool)
    for lam in lambdas:
        ok &= np.isfinite(lam).all(axis=(-2, -1))
    return ok


def _evaluate_raw(pf: ProductForms, lambdas: tuple[np.ndarray, ...], method: str,
                  need_z: bool) -> Evaluation:
    return Evaluation(*pf.algebra.profiled_llh(pf, lambdas, method, need_z))


def evaluate(pf: ProductForms, lambdas: tuple[np.ndarray, ...], method: str,
             need_z: bool = True) -> Evaluation:
    """Profiled (RE)ML fit at ``D_k = Lambda_k Lambda_k'`` with one voxel's failure kept to itself.

    Non-finite ``Lambda`` is replaced by 0 before the algebra and its voxel's ``llh`` set to NaN.
    A batched LAPACK error (raised for the whole stack when one matrix is singular) is handled
    by bisecting the voxel set until the failing voxels are alone; they get NaN.
    """
    v = pf.n_voxels
    finite = _lambdas_finite(lambdas)
    if not finite.all():
        lambdas = tuple(np.where(finite[:, None, None], lam, 0.0) for lam in lambdas)
    with np.errstate(all="ignore"):
        try:
            ev = _evaluate_raw(pf, lambdas, method, need_z)
        except np.linalg.LinAlgError:
            if v == 1:
                return _failed(pf, need_z)
            half = v // 2
            idx = [np.arange(half), np.arange(half, v)]
            parts = [evaluate(pf.take(i), tuple(lam[i] for lam in lambdas), method, need_z)
                     for i in idx]
            ev = Evaluation(np.concatenate([p.llh for p in parts]),
                            np.concatenate([p.beta for p in parts]),
                            np.concatenate([p.s2 for p in parts]),
                            VinvProducts.concat([p.vp for p in parts]),
                            None if parts[0].sums is None
                            else type(parts[0].sums).concat([p.sums for p in parts]))
    bad = ~finite | ~np.isfinite(ev.llh) | ~np.isfinite(ev.s2) | (ev.s2 <= 0)
    if bad.any():
        ev.llh[bad] = np.nan
    return ev


def _with_sums(ev: Evaluation, pf: ProductForms, lambdas: tuple[np.ndarray, ...],
               method: str) -> Evaluation:
    """``ev`` (evaluated without Z parts, a lazy halving) with its score sums added.

    Only for accepted steps: their l is finite, so X'V^-1X is positive definite.  The sums
    have the bits of an eager evaluation's (the algebra's :meth:`score_sums`), so a voxel's
    path does not depend on how many voxels its halvings shared a call with."""
    with np.errstate(all="ignore"):
        sums = pf.algebra.score_sums(pf, lambdas, ev, method)
    return dataclasses.replace(ev, sums=sums)


def _failed(pf: ProductForms, need_z: bool) -> Evaluation:
    """A single voxel whose algebra failed: NaN everywhere, shapes as a real evaluation."""
    vp, sums = pf.algebra.failed_products(pf, need_z)
    p, nan = pf.p, np.full
    return Evaluation(nan(1, np.nan), nan((1, p), np.nan), nan(1, np.nan), vp, sums)


@dataclass(frozen=True)
class Sizes:
    """What the scores and information at an evaluation that carries its own sums (or Z
    parts) need of the product forms: ``n`` (v,), ``p``, the structure and its algebra --
    without copying a subset's product forms every iteration.  Anything else raises."""

    n: np.ndarray
    p: int
    structure: object
    algebra: object

    @property
    def n_voxels(self) -> int:
        return int(self.n.shape[0])

    @staticmethod
    def of(pf: ProductForms, idx: np.ndarray) -> "Sizes":
        return Sizes(pf.n[idx], pf.p, pf.structure, pf.algebra)


# ---------------------------------------------------------------- small batched algebra
def solve_small_spd(A: np.ndarray, b: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """``A^+ b`` for a stack of small symmetric PSD matrices (pseudo-inverse; never raises).

    Non-finite systems give NaN for their voxel only.
    """
    m = A.shape[-1]
    ok = np.isfinite(A).all(axis=(-2, -1)) & np.isfinite(b).all(axis=-1)
    A = np.where(ok[:, None, None], A, np.eye(m))
    b = np.where(ok[:, None], b, 0.0)
    if m == 1:
        a = A[:, 0, 0]
        x = np.where(a > 0, b[:, 0] / np.where(a > 0, a, 1.0), 0.0)[:, None]
    else:
        A = 0.5 * (A + np.swapaxes(A, -1, -2))
        # well-conditioned systems (every pivot > 1e-8 of the largest diagonal entry): a
        # Cholesky solve, unrolled over the tiny matrix dimension; the pseudo-inverse keeps
        # every eigenvalue of these, so it is the same solution.  The rest: eigh.
        x, good = _cholesky_solve(A, b, 1e-8)
        bad = np.flatnonzero(~good)
        if bad.size:
            w, U = np.linalg.eigh(A[bad])
            cut = rcond * np.maximum(w[:, -1:], 0.0)
            inv_w = np.where(w > cut, 1.0 / np.where(w > cut, w, 1.0), 0.0)
            x[bad] = np.einsum("vij,vj,vkj,vk->vi", U, inv_w, U, b[bad])
    return np.where(ok[:, None], x, np.nan)


def _cholesky_solve(A: np.ndarray, b: np.ndarray, rel: float) -> tuple[np.ndarray, np.ndarray]:
    """``A^-1 b`` for a stack of small SPD matrices by Cholesky, vectorised over voxels.

    Returns ``(x, good)``; ``good`` is False (and ``x`` meaningless) where a pivot is not
    above ``rel`` times the largest diagonal entry.  Entry by entry on (v,) vectors (few
    numpy calls: small chunks pay per call), every inner sum left to right.
    """
    m = A.shape[-1]
    a = [[A[:, i, j] for j in range(m)] for i in range(m)]
    scale = np.abs(np.diagonal(A, axis1=-2, axis2=-1)).max(axis=-1)
    good = np.isfinite(scale)
    L = [[None] * m for _ in range(m)]
    for j in range(m):
        d = a[j][j] - _dot(L[j], L[j], range(j)) if j else a[j][j]
        good &= d > rel * scale
        L[j][j] = np.sqrt(np.where(good, d, 1.0))
        for i in range(j + 1, m):
            num = a[i][j] - _dot(L[i], L[j], range(j)) if j else a[i][j]
            L[i][j] = num / L[j][j]
    y = [None] * m
    for i in range(m):
        y[i] = (b[:, i] - _dot(L[i], y, range(i)) if i else b[:, i]) / L[i][i]
    x = [None] * m
    for i in reversed(range(m)):
        col = [L[t][i] for t in range(m)]
        x[i] = (y[i] - _dot(col, x, range(i + 1, m)) if i < m - 1 else y[i]) / L[i][i]
    return np.stack(x, axis=1), good


def _dot(u: list, w: list, ts) -> np.ndarray:
    """``sum_t u[t] w[t]`` over ``ts``, left to right (as numpy sums a short axis)."""
    ts = list(ts)
    acc = u[ts[0]] * w[ts[0]]
    for t in ts[1:]:
        acc = acc + u[t] * w[t]
    return acc


def eigh_sym(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.linalg.eigh`` of a stack of symmetric matrices (eigenvalues ascending), in
    closed form for 2 x 2 (intercept + slope), where batched LAPACK is mostly per-matrix
    overhead; the same formulas for every voxel, so a voxel's bits do not depend on its chunk.

    2 x 2, ``[[a, b], [b, c]]``: ``w = (a + c)/2 -+ r``, ``r = hypot((a - c)/2, b)``; the top
    eigenvector is ``(cos t, sin t)``, ``t = atan2(b, (a - c)/2) / 2``.  The small eigenvalue
    carries an absolute rounding error of about eps * |largest|, as LAPACK's.
    """
    if A.shape[-1] != 2:
        return np.linalg.eigh(A)
    a, b, c = A[..., 0, 0], A[..., 1, 0], A[..., 1, 1]
    half = 0.5 * (a - c)
    mid = 0.5 * (a + c)
    r = np.hypot(half, b)
    t = 0.5 * np.arctan2(b, half)
    co, si = np.cos(t), np.sin(t)
    w = np.stack([mid - r, mid + r], axis=-1)
    U = np.empty(A.shape)
    U[..., 0, 0], U[..., 1, 0] = -si, co       # eigenvector of the small eigenvalue
    U[..., 0, 1], U[..., 1, 1] = co, si        # ... and of the large one
    return w, U


def positive_definite(A: np.ndarray) -> np.ndarray:
    """(v,) bool: each of a stack of symmetric matrices is positive definite (Sylvester's
    leading minors, in closed form up to 3 x 3; eigenvalues beyond).  Non-finite: False."""
    m = A.shape[-1]
    with np.errstate(invalid="ignore"):
        if m > 3:
            ok = np.isfinite(A).all(axis=(-2, -1))
            w = np.linalg.eigvalsh(np.where(ok[:, None, None], A, np.eye(m)))
            return ok & (w[:, 0] > 0)
        a = A[:, 0, 0]
        if m == 1:
            return a > 0
        b, d = A[:, 1, 0], A[:, 1, 1]
        minor2 = a * d - b * b
        if m == 2:
            return (a > 0) & (minor2 > 0)
        c, e, f = A[:, 2, 0], A[:, 2, 1], A[:, 2, 2]
        det3 = a * (d * f - e * e) - b * (b * f - e * c) + c * (b * e - d * c)
        return (a > 0) & (minor2 > 0) & (det3 > 0)


def near_boundary(D: tuple[np.ndarray, ...], tol: float) -> np.ndarray:
    """Voxels where some ``D_k`` has an eigenvalue below ``tol * max(1, largest)``."""
    out = np.zeros(D[0].shape[0], dtype=bool)
    for Dk in D:
        w = eigh_sym(np.where(np.isfinite(Dk), Dk, 0.0))[0]
        out |= w[:, 0] <= tol * np.maximum(1.0, w[:, -1])
    return out


def psd_project(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project a stack of symmetric matrices onto the PSD cone (eigenvalues clipped at 0).

    Returns ``(D_plus, Lambda)`` with ``Lambda Lambda' = D_plus``.
    """
    q = D.shape[-1]
    if q == 1:
        d = np.clip(D, 0.0, None)
        return d, np.sqrt(d)
    finite = np.isfinite(D).all(axis=(-2, -1))
    Ds = np.where(finite[:, None, None], 0.5 * (D + np.swapaxes(D, -1, -2)), 0.0)
    w, U = eigh_sym(Ds)
    lam = U * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
    lam = np.where(finite[:, None, None], lam, np.nan)
    if q == 2:                      # Lambda Lambda' entry by entry (a (v, 2, 2) matmul is slower)
        Dp = np.empty_like(lam)
        l00, l01, l10, l11 = lam[:, 0, 0], lam[:, 0, 1], lam[:, 1, 0], lam[:, 1, 1]
        Dp[:, 0, 0] = l00 * l00 + l01 * l01
        Dp[:, 1, 1] = l10 * l10 + l11 * l11
        Dp[:, 0, 1] = Dp[:, 1, 0] = l00 * l10 + l01 * l11
        return Dp, lam
    return lam @ np.swapaxes(lam, -1, -2), lam


# ---------------------------------------------------------------- one scoring step
def scoring_steps(ev: Evaluation, pf: ProductForms, method: str,
                  profiled: bool = True, lambdas: tuple[np.ndarray, ...] | None = None,
                  ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Simplified Fisher Scoring directions ``I_k^-1 s_k`` (v, q_k, q_k), one per factor, and
    the first-order gain of the full step, ``sum_k s_k' I_k^-1 s_k`` (v,).

    ``lambdas`` (the ``Lambda_k`` of ``ev``) are needed when ``ev.vp`` has no Z parts (one
    factor: the level sums are recomputed from them)."""
    st = pf.structure
    G, info, ts = score_information(pf, lambdas, ev.vp, ev.beta, ev.s2, method, cross=False,
                                    sums=ev.sums)
    dof = pf.n - pf.p if method == "REML" else pf.n
    out = []
    gain = np.zeros(pf.n_voxels)
    # (the caller also measures the step size: flat directions gain little for a big step)
    for f, t, Gk, Ik in zip(st.factors, ts, G, info):
        if profiled:
            # I_DD - I_Ds2 I_s2s2^-1 I_s2D with I_s2D = t/(2 s2), I_s2s2 = dof/(2 s2^2).
            # For REML the traces are V^-1's against dof = n - p, and where the factor is
            # barely identified (n = 11 on 9 levels, 2 repeated) this is not positive
            # definite: its pseudo-inverse dropped the step and the voxel stopped as
            # converged, up to 0.4 below lme4.  There I_DD itself scales the step.
            Ip = Ik - t[:, :, None] * t[:, None, :] / (2.0 * dof[:, None, None])
            Ik = np.where(positive_definite(Ip)[:, None, None], Ip, Ik)
        s = vech_score(Gk)
        step = solve_small_spd(Ik, s)
        gain += np.einsum("vi,vi->v", s, step)
        out.append(unvech(step, f.n_effects))
    return tuple(out), gain


#: A halving group of at most this many trial voxels is evaluated with its score sums at
#: once even where the algebra evaluates halvings lazily: one call instead of two.  Which
#: way changes no bits (the sums of a point are the same whether formed with its evaluation
#: or after it); it only trades the per-call cost against sums for rejected trials.
EAGER_HALVINGS = 48


def rounding_floor(llh: np.ndarray) -> np.ndarray:
    """Smallest change of ``l`` that is not rounding: ``1e-14 |l|``."""
    return 1e-14 * np.abs(llh)


# ---------------------------------------------------------------- the iteration
@dataclass(frozen=True)
class ScoringResult:
    """Outcome of Fisher Scoring: final ``D``/``Lambda`` per factor, the evaluation there,
    iterations (v,), ``converged`` (v,) bool (False: hit the cap, or failed) and ``stalled``
    (v,) bool (no halving of the last step raised ``l``: converged as far as FS can tell)."""

    D: tuple[np.ndarray, ...]
    lambdas: tuple[np.ndarray, ...]
    ev: Evaluation
    iterations: np.ndarray
    converged: np.ndarray
    stalled: np.ndarray


def fisher_scoring(pf: ProductForms, method: str = "REML", tolerance: float = 1e-12,
                   max_iterations: int = 200, max_halvings: int = 10,
                   step_tolerance: float = 1e-6,
                   D0: tuple[np.ndarray, ...] | None = None,
                   profiled: bool = True,
                   handover: float | None = None) -> ScoringResult:
    """Simplified Fisher Scoring for every voxel of ``pf`` (see the module docstring).

    Parameters
    ----------
    pf
        Product forms of ``v`` voxels (each with ``n > p`` and full-rank ``X``).
    method
        ``"REML"`` or ``"ML"``.
    tolerance
        Stop a voxel when its log-likelihood changes by less than this (or ``1e-14 |l|``,
        the rounding floor), or when the first-order gain of its next full step is below it.
    max_iterations
        Iteration cap; voxels still active then have ``converged = False``.
    step_tolerance
        ... and when the full step would change ``D`` by less than this, relative to its
        largest entry.
    max_halvings
        Step halvings tried before a voxel is declared stuck (treated as converged).
    D0
        Starting relative covariances; default ``D_k = 0`` (the first step is then one
        scoring step from ``D = 0``, as in the card).
    profiled
        Use the information with ``s2`` profiled out (default) or the plain ``I_DkDk``.
    handover
        When given (a polish follows), a voxel stops as ``stalled`` once two accepted steps
        in a row leave some ``D_k`` with an eigenvalue below ``handover`` times its largest
        (or 1): on the boundary, where the eigenvalue clip only creeps.
    """
    return run(pf, method, scoring_rounds(pf, method, tolerance, max_iterations, max_halvings,
                                          step_tolerance, D0, profiled, handover))


# ---------------------------------------------------------------- evaluations on request
@dataclass(frozen=True)
class Request:
    """An evaluation an iteration asks for (:func:`scoring_rounds`, ``polish.polish_rounds``):
    voxels ``idx`` of the chunk's product forms at ``lambdas``, with score sums if
    ``need_z``.  The driver answers with the :func:`evaluate` of exactly those voxels --
    alone (:func:`run`) or within one call with other requests (``scoring``): a voxel's
    evaluation has the same bits either way (``rowwise.py``)."""

    idx: np.ndarray
    lambdas: tuple[np.ndarray, ...]
    need_z: bool


def run(pf: ProductForms, method: str, rounds):
    """Drive one iteration generator alone: answer each :class:`Request` by :func:`evaluate`
    (``None``, an idle step, by ``None``); returns the generator's result."""
    try:
        req = next(rounds)
        while True:
            ev = None if req is None else evaluate(pf.voxels(req.idx), req.lambdas, method,
                                                    req.need_z)
            req = rounds.send(ev)
    except StopIteration as stop:
        return stop.value


def scoring_rounds(pf: ProductForms, method: str = "REML", tolerance: float = 1e-12,
                   max_iterations: int = 200, max_halvings: int = 10,
                   step_tolerance: float = 1e-6,
                   D0: tuple[np.ndarray, ...] | None = None,
                   profiled: bool = True,
                   handover: float | None = None, on_done=None):
    """:func:`fisher_scoring` as a generator: yields a :class:`Request` for each evaluation
    and is sent its :class:`Evaluation`; returns the :class:`ScoringResult`.

    ``on_done(idx, D, ev, iterations, converged, stalled)``, when given, is called at the end
    of every iteration with the voxels ``idx`` that left the active set in it (and at the end
    with those stopped by the cap): their final values (``ev`` of all voxels, final at
    ``idx``), never changed afterwards.
    """
    st, v = pf.structure, pf.n_voxels
    if D0 is None:
        D0 = tuple(np.zeros((v, f.n_effects, f.n_effects)) for f in st.factors)
    D, lambdas = zip(*(psd_project(np.array(Dk, dtype=np.float64)) for Dk in D0))
    D, lambdas = list(D), list(lambdas)
    ev = yield Request(np.arange(v), tuple(lambdas), True)
    iterations = np.zeros(v, dtype=np.int64)
    converged = np.zeros(v, dtype=bool)
    stalled = np.zeros(v, dtype=bool)
    on_edge = np.zeros(v, dtype=bool)
    # a voxel that failed at the start is finished (not converged); the driver flags it
    active = np.flatnonzero(np.isfinite(ev.llh))
    ev_a = ev.take(active)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        lam_a = tuple(lam[active] for lam in lambdas)
        steps, predicted = scoring_steps(ev_a, Sizes.of(pf, active), method, profiled, lam_a)
        floor = np.maximum(tolerance, rounding_floor(ev_a.llh))
        D_a = [Dk[active] for Dk in D]
        new_D = [Dk.copy() for Dk in D_a]
        new_lam = [lam.copy() for lam in lam_a]
        old_llh = ev_a.llh.copy()
        new_ev = ev_a                  # (a copy of its own: accepted steps are put into it)
        # converged: the full step would gain less than the tolerance and move D by less than
        # step_tolerance relative (flat directions gain little even far from the optimum)
        size = np.zeros(active.size)
        for Dk, s in zip(D_a, steps):
            scale = np.abs(Dk).max(axis=(1, 2)) + 1e-3
            size = np.maximum(size, np.abs(s).max(axis=(1, 2)) / scale)
        small = ~(predicted >= floor) & ~(size > step_tolerance)
        pending = np.flatnonzero(~small)
        # Step halving, lambda = 1, 1/2, 1/4, ...: a voxel keeps the first (largest) step
        # that does not lower l.  The structure's algebra says which halvings are evaluated
        # together (the same steps are accepted as one by one, in fewer calls).
        for group in pf.algebra.halving_groups(max_halvings):
            if pending.size == 0:
                break
            vox, lam_steps = [], []
            for h in group:
                lam_step = 0.5 ** h
                # stop halving once the predicted gain is rounding (stuck, e.g. on the boundary)
                pending = pending[(lam_step * predicted[pending] >= 0.01 * floor[pending])
                                  | (lam_step * size[pending] > step_tolerance)]
                vox.append(pending)
                lam_steps.append(np.full(pending.size, lam_step))
            vox = np.concatenate(vox)
            if vox.size == 0:
                break
            lam_steps = np.concatenate(lam_steps)[:, None, None]
            trial = [psd_project(Dk[vox] + lam_steps * s[vox]) for Dk, s in zip(D_a, steps)]
            t_lam = tuple(t[1] for t in trial)
            # halvings are mostly rejected: where the algebra says so, they are evaluated for
            # l only and the score sums are formed for the accepted steps afterwards -- unless
            # they are few, where the extra call costs more than the sums (same bits either way)
            lazy = group[0] > 0 and pf.algebra.lazy_halvings and vox.size > EAGER_HALVINGS
            t_ev = yield Request(active[vox], t_lam, not lazy)
            ok = np.flatnonzero(t_ev.llh >= old_llh[vox])     # never keep a worse point
            if ok.size:
                accepted, first = np.unique(vox[ok], return_index=True)
                sel = ok[first]                                   # the largest step that did
                got = t_ev.take(sel)
                if lazy:
                    got = _with_sums(got, pf.voxels(active[accepted]),
                                     tuple(t[1][sel] for t in trial), method)
                new_ev.put(accepted, got)
                for k, t in enumerate(trial):
                    new_D[k][accepted] = t[0][sel]
                    new_lam[k][accepted] = t[1][sel]
                taken = np.zeros(active.size, dtype=bool)
                taken[accepted] = True
                pending = pending[~taken[pending]]
        stuck = ~small & ~(new_ev.llh > old_llh)      # no halving raised l
        if handover is not None:
            # on (next to) the boundary after two steps in a row: the polish that follows
            # takes the voxel from here (FS creeps along the boundary; one step on it is
            # often an overshoot of an interior optimum, where the polish would be slow)
            edge = near_boundary(tuple(new_D), handover)
            stuck |= edge & on_edge[active]
            on_edge[active] = edge
        iterations[active] += 1
        change = new_ev.llh - old_llh
        done = ((np.abs(change) < floor) & (size <= step_tolerance)) | small | stuck
        for k in range(len(D)):
            D[k][active] = new_D[k]
            lambdas[k][active] = new_lam[k]
        ev.put(active, new_ev)
        converged[active[done]] = True
        stalled[active[stuck]] = True
        if on_done is not None and done.any():
            on_done(active[done], tuple(Dk[active[done]] for Dk in D), ev,
                    iterations[active[done]], converged[active[done]], stalled[active[done]])
        keep = ~done
        active = active[keep]
        if active.size:
            ev_a = new_ev if keep.all() else new_ev.take(np.flatnonzero(keep))
    if on_done is not None and active.size:                    # stopped by the cap
        on_done(active, tuple(Dk[active] for Dk in D), ev, iterations[active],
                converged[active], stalled[active])
    return ScoringResult(D=tuple(D), lambdas=tuple(lambdas), ev=ev,
                         iterations=iterations, converged=converged, stalled=stalled)

