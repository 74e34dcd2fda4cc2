"""The compiled per-level evaluation of the one-factor model (``_level_kernel.c``, ctypes).

It serves one random factor with one to three effects per level (random intercepts,
intercept and slope, quadratic trajectories): the V^-1 products and log|V|
(:func:`products`), the level sums of the scores and information (:func:`sums`) and those of
the Satterthwaite setup (:func:`satterthwaite_sums`), in one pass over the levels each with
the voxels of a tile innermost, where the numpy path of :mod:`.levels` makes ~200 passes
over (voxel, level) arrays.  Same equations; the numpy path stays as the reference the tests
compare with and serves four or more effects.  Set ``MPIBLMM_LEVEL_KERNEL=0`` to use the numpy path.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..compiled import load, turned_off

#: The version of the C call this module makes (``mpiblmm_level_kernel_abi``).
ABI = 3
#: The switch that turns the kernel off (``=0``).
ENV = "MPIBLMM_LEVEL_KERNEL"
TURNED_OFF = turned_off(ENV)


class _Args(ctypes.Structure):
    """``Args`` of ``_level_kernel.c``: the same fields in the same order."""

    _fields_ = ([(k, ctypes.c_int64) for k in ("v", "l", "q", "p")]
                + [f for k in ("zz", "zx", "zy") for f in ((k, ctypes.c_void_p),
                                                           (k + "_sv", ctypes.c_int64),
                                                           (k + "_se", ctypes.c_int64))]
                + [(k, ctypes.c_void_p) for k in ("lam", "cxx", "cxy", "cyy", "logdet",
                                                  "beta", "s2inv", "A", "R", "g", "RR")]
                + [("products", ctypes.c_int), ("sums", ctypes.c_int)]
                + [(k, ctypes.c_void_p) for k in ("WW", "WU", "UU", "Tt")]
                + [("satt", ctypes.c_int)])


def _load():
    lib, why_not = load(f"{__package__}._level_kernel", ENV, "mpiblmm_level_kernel_abi", ABI)
    if lib is None:
        return None, why_not
    fn = lib.mpiblmm_level_eval
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_Args)]
    return fn, ""


#: Why the kernel is not in use ("" when it is): for ``mpiblmm env``.
_EVAL, WHY_NOT = _load()


def available() -> bool:
    """Whether the compiled kernel was built and loaded."""
    return _EVAL is not None


def applies(q: int) -> bool:
    """Whether the kernel serves a factor of ``q`` effects: built, and q = 1, 2 or 3."""
    return _EVAL is not None and q in (1, 2, 3)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _rows(a: np.ndarray) -> tuple[np.ndarray, dict]:
    """``a`` (v | 1, ...) as a (voxel, entry) array the kernel reads in place: the chunk's
    forms (voxels innermost) and a subset's (voxel first) both are, with their element
    strides; a shared array (one row) gets voxel stride 0.  Anything else is copied."""
    rows = a.reshape(a.shape[0], -1)                     # a view for both layouts
    if rows.dtype != np.float64 or any(s % 8 for s in rows.strides):
        rows = np.ascontiguousarray(rows, np.float64)
    sv, se = (s // 8 for s in rows.strides)
    return rows, dict(sv=0 if rows.shape[0] == 1 else sv, se=se)


def _call(pf, lam: np.ndarray, **out) -> None:
    """The C call on the product forms of ``pf`` (one factor) at ``Lambda`` (v, q, q);
    ``out`` names the other fields (arrays, kept alive by the caller)."""
    f = pf.structure.factors[0]
    l, q, p, v = f.n_levels, f.n_effects, pf.p, pf.n_voxels
    fields, keep = {}, []            # keep: the arrays behind the pointers, alive for the call
    for name, a in (("zz", pf.ZtZ), ("zx", pf.ZtX), ("zy", pf.ZtY)):
        rows, st = _rows(a)
        keep.append(rows)
        fields.update({name: rows.ctypes.data, name + "_sv": st["sv"], name + "_se": st["se"]})
    lam = np.ascontiguousarray(lam, np.float64)                     # (v, q, q)
    args = _Args(v=v, l=l, q=q, p=p, lam=lam.ctypes.data, **fields,
                 **{k: (_ptr(a) if isinstance(a, np.ndarray) or a is None else a)
                    for k, a in out.items()})
    if _EVAL(ctypes.byref(args)) != 0:
        raise MemoryError("the one-factor kernel could not allocate its scratch")


def _at_fit(beta: np.ndarray, s2: np.ndarray, A: np.ndarray | None) -> dict:
    """The fields of the passes at a fit: ``beta`` (v, p), ``1 / s2`` (v,), ``A`` or None."""
    return dict(beta=np.ascontiguousarray(beta, np.float64),
                s2inv=np.ascontiguousarray(1.0 / s2, np.float64),
                A=None if A is None else np.ascontiguousarray(A, np.float64))


def products(pf, lam: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(corr_xx, corr_xy, corr_yy, logdet)``: ``sum_j X'Z_j M_j Z_j'X`` (v, p, p), the same
    for X'.. Y (v, p) and Y'.. Y (v,), and log|V| (v,) (NaN where some |S_j| is not positive
    and normal), so that ``X'V^-1X = X'X - corr_xx`` etc."""
    v, p = pf.n_voxels, pf.p
    cxx, cxy, cyy, logdet = np.empty((v, p, p)), np.empty((v, p)), np.empty(v), np.empty(v)
    _call(pf, lam, cxx=cxx, cxy=cxy, cyy=cyy, logdet=logdet, products=1, sums=0, satt=0)
    return cxx, cxy, cyy, logdet


def sums(pf, lam: np.ndarray, beta: np.ndarray, s2: np.ndarray,
         A: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(R, G, RR)`` of :class:`.levels.LevelSums` at the GLS ``beta`` (v, p), ``s2`` (v,)
    and, for REML, ``A = (X'V^-1X)^-1`` (v, p, p)."""
    v, q = pf.n_voxels, lam.shape[-1]
    nq = q * (q + 1) // 2
    R, g, RRu = np.empty((v, q, q)), np.empty((v, q, q)), np.empty((v, nq, nq))
    _call(pf, lam, **_at_fit(beta, s2, A), R=R, g=g, RR=RRu, products=0, sums=1, satt=0)
    G = 0.5 * (g - R)                                  # dl/dD = 1/2 sum_j (T Q T' - R_jj)
    i1, i2 = _rr_index(q)
    return R, G, RRu[:, i1, i2]


def satterthwaite_sums(pf, lam: np.ndarray, beta: np.ndarray, s2: np.ndarray,
                       A: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(WW, WU, UU, R, T)`` of :class:`.level_satterthwaite._SattSums` (``T`` with the REML
    term when ``A`` is given) at the GLS ``beta``, ``s2`` and ``A = (X'V^-1X)^-1``."""
    v, q, p = pf.n_voxels, lam.shape[-1], pf.p
    WW, WU = np.empty((v, q, p, q, p)), np.empty((v, q, p, q))
    UU, R, Tt = np.empty((v, q, q)), np.empty((v, q, q)), np.empty((v, q, q, q, q))
    _call(pf, lam, **_at_fit(beta, s2, A), R=R, WW=WW, WU=WU, UU=UU, Tt=Tt, products=0, sums=0,
          satt=1)
    return WW, WU, UU, R, Tt


@functools.lru_cache(maxsize=None)
def _rr_index(q: int) -> tuple[np.ndarray, np.ndarray]:
    """``RR[a, b, c, d] = sum_j R_jj[a, c] R_jj[b, d]`` from the sums over pairs of upper
    entries: the upper entries holding ``[a, c]`` and ``[b, d]``, each (q, q, q, q)."""
    full = np.empty((q, q), dtype=np.intp)
    o = 0
    for a in range(q):
        for b in range(a, q):
            full[a, b] = full[b, a] = o
            o += 1
    a, b, c, d = np.indices((q, q, q, q))
    return full[a, c], full[b, d]
