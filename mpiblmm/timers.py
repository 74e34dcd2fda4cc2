"""Per-phase wall-clock timers of one rank, and their summary over ranks.

A :class:`PhaseTimer` accumulates seconds per named phase (``ingest``, ``read``, ``fit``,
``write``, ``export`` ...).  :func:`summarise_phases` turns every rank's timers into
min / median / max per phase (collective), which the pipeline prints and stores in
``results.h5`` so scaling studies can read them back.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class PhaseTimer:
    """Seconds spent per phase on this rank (phases may repeat; times add up)."""

    def __init__(self, on_enter: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()
        self._on_enter = on_enter  # told each phase's name as it starts (progress logs)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block under ``name``."""
        if self._on_enter is not None:
            self._on_enter(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self._start


def summarise_phases(comm: Any, timer: PhaseTimer, phases: list[str]) -> dict[str, list[float]]:
    """Collective: ``{phase: [min, median, max]}`` seconds over the ranks of ``comm``.

    ``phases`` must be the same list on every rank (a phase a rank never ran counts 0 s).
    """
    import numpy as np

    mine = np.array([timer.seconds.get(p, 0.0) for p in phases] + [timer.total()])
    every = np.asarray(comm.allgather(mine)) if comm is not None else mine[None, :]
    names = phases + ["total"]
    return {name: [float(every[:, i].min()), float(np.median(every[:, i])),
                   float(every[:, i].max())] for i, name in enumerate(names)}
