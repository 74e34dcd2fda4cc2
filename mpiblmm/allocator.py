"""glibc's malloc told to keep freed memory, so numpy's temporaries are not page-faulted anew.

The estimator works through chunks of voxels with many numpy temporaries of a few hundred
KB to a few MB, freed and allocated again at every evaluation.  glibc by default gives the
top of its heap back to the kernel once more than ``M_TRIM_THRESHOLD`` bytes (128 KB, raised
dynamically) are free there, so the next evaluation's arrays fault their pages in again:
on the blocked several-factor path that was a third of the time per voxel (design (a) of
``scripts/bench_cohort.py``: 7.3-7.7 -> 5.5-5.6 ms/voxel, same run).  Keeping up to
:data:`RETAIN_BYTES` of freed memory costs nothing the memory budget does not already
allow: a chunk's peak is reached again at the next chunk.

The equivalent environment variable ``MALLOC_TRIM_THRESHOLD_`` wins when the user set it.
Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameter number of the trim threshold (glibc's malloc.h).
M_TRIM_THRESHOLD = -1

#: Freed memory kept at the top of the heap before it is given back to the kernel (bytes).
RETAIN_BYTES = 256 * 2**20


def keep_freed_memory(nbytes: int = RETAIN_BYTES, environ: dict | None = None) -> bool:
    """Raise glibc's trim threshold to ``nbytes``; True if it was set here."""
    environ = os.environ if environ is None else environ
    if "MALLOC_TRIM_THRESHOLD_" in environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_TRIM_THRESHOLD, int(nbytes)) == 1
