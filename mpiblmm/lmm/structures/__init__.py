"""The random-effects algebra, one module per structure, chosen once per design.

- :mod:`.one_factor`: one grouping factor, per-level closed forms (:mod:`.levels`,
  :mod:`.level_satterthwaite`);
- :mod:`.blocked`: several factors, the blocked Cholesky of :mod:`~mpiblmm.lmm.blocked`,
  whose memory per voxel grows with the non-zero blocks of Z'Z, never with ``q^2``;
- :mod:`.dense`: several factors, one dense ``q x q`` system per voxel (``layout="dense"``).

:func:`choose` picks the structure from the design (its factors and, for several factors, the
fill pattern of Z'Z) when the product forms are built; the result is stored on
:class:`~mpiblmm.lmm.model.ProductForms` as ``pf.algebra`` and every other module calls its
methods (:class:`.base.Algebra`).  This package is the only place that knows which structure
it is working with.

The dense layout is not chosen for several factors: it was faster only for tiny ``q``
(crossed reference, q = 56: 12 vs 18 ms/voxel), and its batched BLAS products gave a voxel
different last bits in different chunks (tests/lmm/test_analysis.py, crossed), which the
blocked path does not.
"""

from __future__ import annotations

from ..model import RandomStructure
from .base import Algebra
from .blocked import Blocked, pattern_of
from .dense import Dense
from .one_factor import OneFactor

#: Several factors with at least this many columns of Z use the blocked path ("auto").
BLOCKED_MIN_Q = 1

LAYOUTS = ("auto", "dense", "blocked")

_CACHE: list = []        # (random design, blocked algebra) of the last few designs


def for_structure(structure: RandomStructure, pattern=None) -> Algebra:
    """The algebra of ``structure``: blocked with ``pattern`` when one is given."""
    if pattern is not None:
        return Blocked(structure, pattern)
    if structure.is_single_factor:
        return OneFactor(structure)
    return Dense(structure)


def choose(rd, layout: str = "auto") -> Algebra:
    """The algebra for ``rd`` (a :class:`~mpiblmm.lmm.products.RandomDesign`).

    ``layout``: "auto" (blocked for several factors when ``q >= BLOCKED_MIN_Q``), "dense"
    (never blocked) or "blocked" (always, for several factors; tests use it on small data).
    One factor is always :class:`.OneFactor`.  The blocked pattern of the last few designs is
    kept (building it is the expensive part of the choice).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    st = rd.structure
    if st.is_single_factor or layout == "dense" or (layout == "auto" and st.q < BLOCKED_MIN_Q):
        return for_structure(st)
    for cached_rd, algebra in _CACHE:
        if cached_rd is rd:
            return algebra
    algebra = Blocked(st, pattern_of(rd))
    _CACHE.append((rd, algebra))
    del _CACHE[:-4]
    return algebra


__all__ = ["Algebra", "Blocked", "Dense", "OneFactor", "choose", "for_structure"]
