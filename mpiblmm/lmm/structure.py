"""The choice of the random-effects algebra, made once per design.

- one factor: Z'Z block diagonal, per-level closed forms (:mod:`.likelihood`);
- several factors: the blocked Cholesky (:mod:`.blocked`), whose memory per voxel grows with
  the non-zero blocks of Z'Z, never with ``q^2``.

The original dense path for several factors (one ``q x q`` system per voxel) stays available
as ``layout="dense"`` (tests compare the two), but is not chosen: it was faster only for
tiny ``q`` (crossed reference, q = 56: 12 vs 18 ms/voxel), and its batched BLAS products gave
a voxel different last bits in different chunks (tests/lmm/test_analysis.py, crossed), which
the blocked path does not.

:func:`choose` returns None for one factor (or "dense") or the
:class:`~.blocked.pattern.BlockPattern`; the estimator and Satterthwaite dispatch on
``ProductForms.blocks`` alone.
"""

from __future__ import annotations

import numpy as np

from .blocked.pattern import BlockPattern, build_pattern

#: Several factors with at least this many columns of Z use the blocked path ("auto").
BLOCKED_MIN_Q = 1

LAYOUTS = ("auto", "dense", "blocked")

_CACHE: list = []        # (random design, pattern) of the last few designs


def factor_levels(rd) -> list[np.ndarray]:
    """The level of every observation for each factor (structure order)."""
    out, start = [], 0
    for f, off in zip(rd.structure.factors, rd.structure.offsets):
        out.append((rd.cols[:, start] - off) // f.n_effects)
        start += f.n_effects
    return out


def factor_values(rd) -> list[np.ndarray]:
    """The random-effect covariates (n, q_k) of each factor."""
    out, start = [], 0
    for f in rd.structure.factors:
        out.append(rd.vals[:, start:start + f.n_effects])
        start += f.n_effects
    return out


def choose(rd, layout: str = "auto") -> BlockPattern | None:
    """The blocked pattern for ``rd`` (a :class:`~.products.RandomDesign`), or None.

    ``layout``: "auto" (blocked for several factors when ``q >= BLOCKED_MIN_Q``), "dense"
    (never blocked) or "blocked" (always, for several factors; tests use it on small data).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    st = rd.structure
    if st.is_single_factor or layout == "dense":
        return None
    if layout == "auto" and st.q < BLOCKED_MIN_Q:
        return None
    for cached_rd, pattern in _CACHE:
        if cached_rd is rd:
            return pattern
    pattern = build_pattern(st, factor_levels(rd))
    _CACHE.append((rd, pattern))
    del _CACHE[:-4]
    return pattern
