"""The blocked pattern of a design, for callers outside the numerics (the pipeline's memory
estimate and its early check of a design).

The choice of the random-effects algebra itself is made once per design by
:func:`mpiblmm.lmm.structures.choose`; :func:`choose` here returns its blocked pattern
(:class:`~.blocked.pattern.BlockPattern`) or None.
"""

from __future__ import annotations

from . import structures
from .structures.blocked import factor_levels, factor_values

__all__ = ["choose", "factor_levels", "factor_values"]


def choose(rd, layout: str = "auto"):
    """The blocked pattern of ``rd``'s algebra (:func:`mpiblmm.lmm.structures.choose`), or None."""
    return structures.choose(rd, layout).pattern
