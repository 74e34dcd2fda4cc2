"""The memory budget per rank (``--max-memory-mb``, the spec's ``max_memory_mb``), honestly.

The budget is the peak resident memory of a rank, interpreter included.  What a rank holds
before any work (Python, numpy, scipy, h5py, nibabel, MPI: about 100-150 MiB) is measured
at the start of a fit and subtracted; what is left is the *work budget* that sizes packing
caches and voxel chunks.  A budget that leaves less than :data:`MIN_WORK_MB` for the work, or
less than one voxel's fit of the design (:func:`one_voxel_problem`), is a user error stating
the minimum.

Only Linux's ``/proc/self/statm`` gives the current resident size; elsewhere the peak so far
(``getrusage``) stands in, which is the same at the start of a fit.
"""

from __future__ import annotations

import math
import os
from typing import Any

from mpiblmm.errors import UserError

MIB = 2**20

#: Least memory (MiB) the work of a rank may have: buffers of HDF5 and MPI-IO, one image in
#: flight while packing, one chunk of voxels and the allocator's slack.  (48 was measured
#: short by a memory audit: rank 0 of a 2-rank formula fit at the minimum budget peaked
#: 7 MiB above it, packing's buffers kept.)
MIN_WORK_MB = 64.0
#: One voxel's fit needs this many times the algebra's estimate of its working memory in the
#: work budget: the estimate is of one voxel's arrays, not of the allocator's slack nor of
#: what the design's first evaluation keeps (index plans, the dense tail's blocks).  Measured
#: for a voxel alone, crossed designs: 1,000 subjects x 1,296 raters 1.26x the estimate,
#: 600 x 900 raters 1.41x.
ONE_VOXEL_MARGIN = 1.6


def resident_mb() -> float:
    """This process's resident memory now (MiB)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return peak_mb()


#: What initialising MPI adds to a rank (mpi4py and MPICH's shared-memory segments: 11 MiB
#: measured at 1 and 2 ranks), where a process measuring itself has not initialised it.
MPI_INIT_MB = 12.0
#: What a rank of the fit holds at its start beyond a ``check`` process of the same spec
#: (the fit's own setup; a cohort design: check 107 MiB, the fit's ranks 112 at -n 2).
FIT_SETUP_MB = 6.0


def rank_baseline_mb() -> float:
    """What a rank of the fit would hold at its start, measured in this process: its resident
    memory, plus :data:`FIT_SETUP_MB`, and :data:`MPI_INIT_MB` where MPI is not initialised
    here (``mpiblmm check`` measured itself only: it accepted budgets the fit then refused,
    107 MiB against the ranks' 112; a fault audit).  A little generous rather than short:
    check may then ask a few MiB more than the fit would."""
    import sys

    return (resident_mb() + FIT_SETUP_MB
            + (0.0 if "mpi4py.MPI" in sys.modules else MPI_INIT_MB))


def peak_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


#: Added to the least budget a refusal advises: what a rank holds at its start varies by 1-2
#: MiB between runs and ranks, and a memory audit's fit at the advised minimum (167 MiB) was
#: refused in two of six runs, now asking for 168.
ADVICE_MARGIN_MB = 4.0


def minimum_budget_mb(baseline_mb: float) -> int:
    """The budget (whole MiB) a refusal advises: :data:`MIN_WORK_MB` above ``baseline_mb``,
    and :data:`ADVICE_MARGIN_MB` for the start's variation, so that it is then accepted."""
    return int(-(-(baseline_mb + MIN_WORK_MB + ADVICE_MARGIN_MB) // 1))


def work_budget_mb(budget_mb: float, baseline_mb: float, where: str) -> float:
    """What ``budget_mb`` leaves for the work once ``baseline_mb`` is resident.

    Raises
    ------
    UserError
        When that is below :data:`MIN_WORK_MB`; the message states the minimum budget.
    """
    work = budget_mb - baseline_mb
    if work < MIN_WORK_MB:
        raise UserError(
            f"{budget_mb:g} MiB per rank is too little to run: a rank already holds "
            f"{math.ceil(baseline_mb)} MiB at its start (interpreter, libraries, the study's "
            f"design and its results datasets), and the work needs at least "
            f"{MIN_WORK_MB:.0f} MiB more; give at least {minimum_budget_mb(baseline_mb)} MiB",
            where)
    return work


def one_voxel_problem(budget_mb: float, work_mb: float, voxel_mb: float,
                      where: str) -> UserError | None:
    """The error for a budget whose work part (``work_mb`` of ``budget_mb``) cannot hold one
    voxel's fit, whose arrays the design's algebra estimates at ``voxel_mb``: chunks are at
    least one voxel, so the fit would go over the budget (a memory audit: a crossed design
    with 1,296 raters at 160 MiB peaked at 194).  ``None`` when it can."""
    need = ONE_VOXEL_MARGIN * voxel_mb
    if work_mb >= need:
        return None
    least = math.ceil(budget_mb - work_mb + need + ADVICE_MARGIN_MB)
    return UserError(
        f"{budget_mb:g} MiB per rank is too little for this design: one voxel's fit needs "
        f"about {math.ceil(need)} MiB (its arrays, estimated at {math.ceil(voxel_mb)} MiB, and "
        f"the allocator's slack) and {math.floor(work_mb)} MiB are left after what a rank "
        f"holds at its start; give at least {least} MiB", where)


def agreed_work_budget_mb(comm: Any, budget_mb: float, where: str,
                          held_mb: float = 0.0) -> float:
    """Collective: :func:`work_budget_mb` with the largest baseline over the ranks of ``comm``
    (plus ``held_mb``, what each will hold beyond it whatever the chunks: the results
    file's open datasets), so every rank sizes its work alike and a too small budget is
    refused by all together."""
    from mpi4py import MPI

    from mpiblmm.parallel import agree_on_user_error

    baseline = comm.allreduce(resident_mb(), op=MPI.MAX) + held_mb
    try:
        work, problem = work_budget_mb(budget_mb, baseline, where), None
    except UserError as exc:
        work, problem = 0.0, exc
    agree_on_user_error(comm, problem)
    return work
