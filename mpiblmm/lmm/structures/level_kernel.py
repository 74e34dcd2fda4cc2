"""The compiled per-level evaluation of the one-factor model (``_level_kernel.c``, ctypes).

It serves one random factor with one to three effects per level (random intercepts,
intercept and slope, quadratic trajectories): a whole evaluation in one call
(:func:`evaluate`: the V^-1 products, log|V|, the GLS fit, lme4's logLik and the level sums of
the scores and information), the V^-1 products alone (:func:`products`), the level sums at a
given fit (:func:`sums`) and those of the Satterthwaite setup (:func:`satterthwaite_sums`),
in passes over the levels each with the voxels of a tile innermost, reading a subset's
product forms in place (:class:`~..model.VoxelRows`), where the numpy path of :mod:`.levels`
makes ~200 passes over (voxel, level) arrays.  Same equations; the numpy path stays as the
reference the tests compare with and serves four or more effects.  Set
``MPIBLMM_LEVEL_KERNEL=0`` to use the numpy path.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..compiled import load, turned_off
from ..likelihood import LOG_2PI, VinvProducts
from ..model import VoxelRows

#: The version of the C call this module makes (``mpiblmm_level_kernel_abi``).
ABI = 4
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
                + [("satt", ctypes.c_int), ("rows", ctypes.c_void_p)]
                + [f for k in ("xx", "xy", "yy") for f in ((k, ctypes.c_void_p),
                                                           (k + "_sv", ctypes.c_int64),
                                                           (k + "_se", ctypes.c_int64))]
                + [("nobs", ctypes.c_void_p), ("n_sv", ctypes.c_int64), ("gls", ctypes.c_int),
                   ("reml", ctypes.c_int), ("log2pi", ctypes.c_double)]
                + [(k, ctypes.c_void_p) for k in ("xvx", "xvy", "yvy", "ete", "s2", "llh")])


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


def _rows(a: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``a`` (v | 1, ...) as a (voxel, entry) array the kernel reads in place, with its voxel
    and entry strides in elements: the chunk's forms (voxels innermost) and a subset's (voxel
    first) both are; a shared array (one row) gets voxel stride 0.  Anything else is copied."""
    rows = a.reshape(a.shape[0], -1)                     # a view for both layouts
    if rows.dtype != np.float64 or any(s % 8 for s in rows.strides):
        rows = np.ascontiguousarray(rows, np.float64)
    sv, se = (s // 8 for s in rows.strides)
    return rows, 0 if rows.shape[0] == 1 else sv, se


def _forms_args(forms) -> _Args:
    """The fields of a call that come from the product forms ``forms`` (addresses, strides,
    sizes): made once per forms and kept on them with the arrays behind the addresses, as
    the blocked kernel keeps its layout on its pattern; a call copies them (a fit calls the
    kernel ~20 times on the same chunk's forms)."""
    cached = forms.__dict__.get("_level_kernel_args")
    if cached is not None:
        return cached[0]
    f = forms.structure.factors[0]
    fields, keep = {}, []
    for name, a in (("zz", forms.ZtZ), ("zx", forms.ZtX), ("zy", forms.ZtY), ("xx", forms.XtX),
                    ("xy", forms.XtY), ("yy", forms.YtY)):
        rows, sv, se = _rows(a)
        keep.append(rows)
        fields.update({name: rows.ctypes.data, name + "_sv": sv, name + "_se": se})
    n = np.ascontiguousarray(forms.n, np.int64)
    keep.append(n)
    args = _Args(l=f.n_levels, q=f.n_effects, p=forms.p, nobs=n.ctypes.data,
                 n_sv=0 if n.shape[0] == 1 else 1, log2pi=LOG_2PI, **fields)
    forms.__dict__["_level_kernel_args"] = (args, keep)
    return args


def _call(pf, lam: np.ndarray, **out) -> None:
    """The C call on the product forms of ``pf`` (one factor; a :class:`~..model.VoxelRows`
    is read in place through its rows) at ``Lambda`` (v, q, q); ``out`` names the other
    fields (arrays, kept alive by the caller, or flags)."""
    forms, rows = (pf.forms, pf.rows) if isinstance(pf, VoxelRows) else (pf, None)
    args = _Args.from_buffer_copy(_forms_args(forms))
    args.v = pf.n_voxels
    lam = np.ascontiguousarray(lam, np.float64)                     # (v, q, q)
    args.lam = lam.ctypes.data
    if rows is not None:
        rows = np.ascontiguousarray(rows, np.int64)
        args.rows = rows.ctypes.data
    for k, a in out.items():
        setattr(args, k, a.ctypes.data if isinstance(a, np.ndarray) else a)
    if _EVAL(ctypes.byref(args)) != 0:
        raise MemoryError("the one-factor kernel could not allocate its scratch")


def _at_fit(beta: np.ndarray, s2: np.ndarray, A: np.ndarray | None) -> dict:
    """The fields of the passes at a fit: ``beta`` (v, p), ``1 / s2`` (v,), ``A`` or None."""
    return dict(beta=np.ascontiguousarray(beta, np.float64),
                s2inv=np.ascontiguousarray(1.0 / s2, np.float64),
                A=None if A is None else np.ascontiguousarray(A, np.float64))


def evaluate(pf, lam: np.ndarray, method: str, want_sums: bool):
    """The profiled (RE)ML fit at ``Lambda`` (v, q, q) in one call: ``(llh, beta, s2, vp,
    sums)`` as :meth:`~.base.Algebra.profiled_llh` (``vp`` without Z parts; ``sums`` the
    ``(R, G, RR)`` of :class:`.levels.LevelSums` when ``want_sums``, else None).  The GLS
    fit is formed in the kernel by the Cholesky factor of X'V^-1X (pass "gls"): where that
    is not positive definite, ``beta``, ``s2`` and ``llh`` are NaN (the voxel failed)."""
    v, q, p = pf.n_voxels, lam.shape[-1], pf.p
    xvx, xvy, beta = np.empty((v, p, p)), np.empty((v, p)), np.empty((v, p))
    yvy, logdet, ete, s2, llh = (np.empty(v) for _ in range(5))
    out = dict(xvx=xvx, xvy=xvy, yvy=yvy, logdet=logdet, beta=beta, ete=ete, s2=s2, llh=llh)
    if want_sums:
        nq = q * (q + 1) // 2
        R, g, RRu = np.empty((v, q, q)), np.empty((v, q, q)), np.empty((v, nq, nq))
        out.update(R=R, g=g, RR=RRu)
    _call(pf, lam, gls=1, reml=int(method == "REML"), products=1, sums=int(want_sums), **out)
    vp = VinvProducts(XtViX=xvx, XtViY=xvy, YtViY=yvy, logdetV=logdet)
    return llh, beta, s2, vp, _level_sums(R, g, RRu) if want_sums else None


def products(pf, lam: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(corr_xx, corr_xy, corr_yy, logdet)``: ``sum_j X'Z_j M_j Z_j'X`` (v, p, p), the same
    for X'.. Y (v, p) and Y'.. Y (v,), and log|V| (v,) (NaN where some |S_j| is not positive
    and normal), so that ``X'V^-1X = X'X - corr_xx`` etc."""
    v, p = pf.n_voxels, pf.p
    cxx, cxy, cyy, logdet = np.empty((v, p, p)), np.empty((v, p)), np.empty(v), np.empty(v)
    _call(pf, lam, cxx=cxx, cxy=cxy, cyy=cyy, logdet=logdet, products=1)
    return cxx, cxy, cyy, logdet


def sums(pf, lam: np.ndarray, beta: np.ndarray, s2: np.ndarray,
         A: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(R, G, RR)`` of :class:`.levels.LevelSums` at the GLS ``beta`` (v, p), ``s2`` (v,)
    and, for REML, ``A = (X'V^-1X)^-1`` (v, p, p)."""
    v, q = pf.n_voxels, lam.shape[-1]
    nq = q * (q + 1) // 2
    R, g, RRu = np.empty((v, q, q)), np.empty((v, q, q)), np.empty((v, nq, nq))
    _call(pf, lam, **_at_fit(beta, s2, A), R=R, g=g, RR=RRu, sums=1)
    return _level_sums(R, g, RRu)


def _level_sums(R: np.ndarray, g: np.ndarray, RRu: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(R, G, RR)`` from the kernel's sums of R_jj, T_j Q_j T_j' and R_jj's upper-entry
    products."""
    G = 0.5 * (g - R)                                  # dl/dD = 1/2 sum_j (T Q T' - R_jj)
    i1, i2 = _rr_index(R.shape[-1])
    return R, G, RRu[:, i1, i2]


def satterthwaite_sums(pf, lam: np.ndarray, beta: np.ndarray, s2: np.ndarray,
                       A: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(WW, WU, UU, R, T)`` of :class:`.level_satterthwaite._SattSums` (``T`` with the REML
    term when ``A`` is given) at the GLS ``beta``, ``s2`` and ``A = (X'V^-1X)^-1``."""
    v, q, p = pf.n_voxels, lam.shape[-1], pf.p
    WW, WU = np.empty((v, q, p, q, p)), np.empty((v, q, p, q))
    UU, R, Tt = np.empty((v, q, q)), np.empty((v, q, q)), np.empty((v, q, q, q, q))
    _call(pf, lam, **_at_fit(beta, s2, A), R=R, WW=WW, WU=WU, UU=UU, Tt=Tt, satt=1)
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
