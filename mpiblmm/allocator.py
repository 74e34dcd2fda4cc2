"""glibc's malloc told to keep freed memory, so numpy's temporaries are not page-faulted anew.

The estimator works through chunks of voxels with many numpy temporaries of a few hundred
KB to a few MB, freed and allocated again at every evaluation.  glibc by default gives the
top of its heap back to the kernel once more than ``M_TRIM_THRESHOLD`` bytes (128 KB, raised
dynamically) are free there, so the next evaluation's arrays fault their pages in again:
under load that was up to a third of the time per voxel on the blocked several-factor path
(design (a) of ``scripts/bench_cohort.py``: 7.3-7.7 -> 5.5-5.6 ms/voxel in one loaded run;
on a quiet machine (a) is unchanged and (b), with MB-sized arrays, 133-145 -> 113 ms).  Keeping up to
:data:`RETAIN_BYTES` of freed memory costs nothing the memory budget does not already
allow: a chunk's peak is reached again at the next chunk.

The equivalent environment variables (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``)
win when the user set either.
Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

#: Freed memory kept at the top of the heap before it is given back to the kernel (bytes).
RETAIN_BYTES = 256 * 2**20

#: Allocations at least this large get their own mapping (glibc's largest allowed value on
#: 64-bit systems).  Setting the trim threshold freezes glibc's otherwise growing mmap
#: threshold at 128 KB, and then every array above it would be mapped and faulted in anew:
#: design (b) ran 2x slower with the trim threshold alone.
HEAP_BYTES = 32 * 2**20


def keep_freed_memory(nbytes: int = RETAIN_BYTES, environ: dict | None = None) -> bool:
    """Raise glibc's trim and mmap thresholds (``nbytes``, :data:`HEAP_BYTES`); True if set."""
    environ = os.environ if environ is None else environ
    chosen = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    if any(name in environ for name in chosen) or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return (mallopt(M_MMAP_THRESHOLD, HEAP_BYTES) == 1
            and mallopt(M_TRIM_THRESHOLD, int(nbytes)) == 1)
