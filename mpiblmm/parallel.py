"""MPI helpers: who owns which voxels, how a rank's job ends on error, agreed user errors,
and the few reductions the pipeline needs.

Rules kept here:

- Every function takes the communicator it works on; nothing touches ``COMM_WORLD`` at
  import time, and importing this module does not initialise MPI (mpi4py is imported by
  the functions that need its constants).
- Ownership is pure arithmetic (:func:`partition`): any rank can compute any rank's slab
  without communicating. Ranks that own no voxels still take part in every collective.
- A rank's whole job runs inside :func:`run_guarded`. A :class:`~mpiblmm.errors.UserError`
  must be raised *together* on all ranks, which :func:`agree_on_user_error` arranges (call
  it after validating input and before any collective I/O); it ends as one line on stderr,
  printed by rank 0, and exit code 2 on every rank. Any other exception is a bug: the rank
  prints ``rank N: <Type>: <message>`` and its traceback, then aborts the whole job so no
  rank waits forever in a collective.
- A finished rank leaves through :func:`exit_now`: MPI finalized, no interpreter teardown.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Mapping, NamedTuple, NoReturn

import numpy as np

from mpiblmm.errors import USER_ERROR_EXIT_CODE, UserError

#: Exit code of a rank that aborts the job after an unexpected exception.
ABORT_EXIT_CODE = 1

#: Exit code when the launcher started several processes but MPI sees only one each.
LAUNCHER_MISMATCH_EXIT_CODE = 1

#: Environment variables in which common launchers publish the number of processes started.
LAUNCHER_SIZE_VARIABLES = (
    "PMI_SIZE",  # MPICH hydra, Intel MPI, Cray PMI
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "MV2_COMM_WORLD_SIZE",  # MVAPICH
    "SLURM_STEP_NUM_TASKS",  # srun
)


# --------------------------------------------------------------------------- decomposition
class Slab(NamedTuple):
    """A contiguous range ``[start, stop)`` of items owned by one rank."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        """Number of items in the slab (0 for a rank that owns none)."""
        return self.stop - self.start

    def as_slice(self) -> slice:
        """The slab as a ``slice`` for indexing arrays."""
        return slice(self.start, self.stop)


def partition(n_items: int, n_parts: int, part: int) -> Slab:
    """Contiguous, balanced split of ``n_items`` into ``n_parts``; the range of ``part``.

    Sizes differ by at most one; the first ``n_items % n_parts`` parts take one extra item.
    When ``n_items < n_parts`` the last parts are empty (``start == stop``).

    Parameters
    ----------
    n_items
        Number of items (voxels) to share, ``>= 0``.
    n_parts
        Number of parts (ranks), ``>= 1``.
    part
        Which part, ``0 <= part < n_parts``.

    Returns
    -------
    Slab
        ``(start, stop)`` of that part.
    """
    if n_items < 0 or n_parts < 1 or not 0 <= part < n_parts:
        raise ValueError(f"partition({n_items}, {n_parts}, {part}): invalid arguments")
    base, extra = divmod(n_items, n_parts)
    start = part * base + min(part, extra)
    return Slab(start, start + base + (1 if part < extra else 0))


def partition_by_cost(costs: np.ndarray, n_parts: int, part: int) -> Slab:
    """Contiguous split of items with per-item ``costs`` so each part's total is about equal.

    Part ``k`` starts at the first item whose cumulative cost (before it) reaches
    ``k / n_parts`` of the total. Every item belongs to exactly one part; with equal costs
    the split equals :func:`partition` up to where the remainder goes.

    Parameters
    ----------
    costs
        Non-negative cost of each item, shape ``(n_items,)``.
    n_parts, part
        As in :func:`partition`.
    """
    costs = np.asarray(costs, dtype=float)
    if costs.ndim != 1 or np.any(costs < 0) or n_parts < 1 or not 0 <= part < n_parts:
        raise ValueError("partition_by_cost: need 1-d non-negative costs and 0 <= part < n_parts")
    total = costs.sum()
    if total <= 0:
        return partition(costs.size, n_parts, part)
    before = np.concatenate(([0.0], np.cumsum(costs)[:-1]))  # cost of items before item i
    targets = total * np.arange(n_parts + 1) / n_parts
    bounds = np.searchsorted(before, targets[:-1], side="left")
    bounds = np.append(bounds, costs.size)
    bounds[0] = 0
    return Slab(int(bounds[part]), int(bounds[part + 1]))


def slab(comm: Any, n_items: int) -> Slab:
    """This rank's contiguous share of ``n_items`` on ``comm`` (see :func:`partition`)."""
    return partition(n_items, comm.Get_size(), comm.Get_rank())


# --------------------------------------------------------------------------- errors
class AgreedUserError(UserError):
    """A user error that every rank of the communicator raises together.

    Raised by :func:`agree_on_user_error`; :func:`run_guarded` turns it into one message
    (printed by rank 0) and exit code 2 on every rank.

    Parameters
    ----------
    message
        The message of the first rank (lowest rank number) that found a problem.
    origin_rank
        That rank.
    """

    def __init__(self, message: str, origin_rank: int) -> None:
        super().__init__(message)
        self.origin_rank = origin_rank


def agree_on_user_error(comm: Any, error: BaseException | None) -> None:
    """Collective: raise :class:`AgreedUserError` on every rank if any rank found a problem.

    Call it on every rank at the same point, after validating input and before any
    collective I/O. Costs one small allreduce when nobody has a problem.

    Parameters
    ----------
    comm
        The communicator whose ranks must agree.
    error
        This rank's :class:`UserError` (or other exception to report as a user error), or
        ``None`` if this rank found nothing wrong.

    Raises
    ------
    AgreedUserError
        On every rank, carrying the message of the lowest rank that had an error.
    """
    from mpi4py import MPI

    rank = comm.Get_rank()
    flag = comm.Get_size() if error is None else rank
    first_bad = comm.allreduce(flag, op=MPI.MIN)
    if first_bad == comm.Get_size():
        return
    message = str(error) if rank == first_bad else None
    message = comm.bcast(message, root=first_bad)
    raise AgreedUserError(message, first_bad)


def _print_user_error(message: str) -> None:
    print(f"mpiblmm: error: {message}", file=sys.stderr, flush=True)


def run_guarded(fn: Callable[[], int | None], comm: Any) -> int:
    """Run one rank's whole job; turn errors into exit codes or a job-wide abort.

    Parameters
    ----------
    fn
        The job, called with no arguments on every rank; returns an exit code or ``None``.
    comm
        The communicator the job runs on (aborted on an unexpected exception).

    Returns
    -------
    int
        ``fn``'s exit code (``None`` counts as 0), or 2 after an :class:`AgreedUserError`.
        Does not return after an unexpected exception on a job of several ranks: the job is
        aborted with ``comm.Abort(1)``. On a single rank it returns 1 instead.
    """
    rank = comm.Get_rank()
    size = comm.Get_size()
    try:
        code = fn()
        return 0 if code is None else int(code)
    except AgreedUserError as exc:
        if rank == 0:
            _print_user_error(str(exc))
        return USER_ERROR_EXIT_CODE
    except UserError as exc:
        # Raised on this rank alone, outside agree_on_user_error: the other ranks may be
        # waiting in a collective, so only an abort is safe when there are several.
        _print_user_error(str(exc) if size == 1 else f"rank {rank}: {exc}")
        if size > 1:
            comm.Abort(USER_ERROR_EXIT_CODE)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        # sys.exit() on one rank: the others may be in a collective, so end them too.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0 and size > 1:
            print(f"rank {rank}: exited with code {code}", file=sys.stderr, flush=True)
            comm.Abort(code)
        return code
    except BaseException as exc:  # noqa: BLE001 - the top of a rank's job
        print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        if size > 1:
            comm.Abort(ABORT_EXIT_CODE)
        return ABORT_EXIT_CODE


def open_hdf5_files() -> int:
    """HDF5 files still open in this process (0 if h5py is unused).

    An open dataset, group or attribute keeps its file open, so files are what count (h5py
    itself holds some datatypes open from import on).
    """
    if "h5py" not in sys.modules:
        return 0
    from h5py import h5f

    return int(h5f.get_obj_count(h5f.OBJ_ALL, h5f.OBJ_FILE))


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` once its work is done, skipping interpreter teardown.

    Tearing down an interpreter that has loaded numpy, scipy, h5py and nibabel takes 0.15-0.2 s
    (measured; ``docs/PERFORMANCE.md``), paid by every rank after its results are written.
    This flushes stdout and stderr, runs the ``atexit`` callbacks, finalizes MPI if it was
    initialised (what teardown would do), then leaves with :func:`os._exit`.  If an HDF5
    file is still open it exits normally instead, so HDF5's own shutdown can flush it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced stream
            pass
    if open_hdf5_files():
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    os._exit(code)


# --------------------------------------------------------------------------- launcher check
def launcher_size(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """Number of processes the launcher says it started, and the variable that says so.

    Returns ``None`` when no known launcher variable is set (e.g. a plain ``python`` run).
    """
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value), name
    return None


def launcher_mismatch(comm: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """Describe the classic mpi4py/mpiexec mismatch, or return ``None`` if there is none.

    The mismatch: the job was started as N > 1 processes but MPI sees a communicator of
    one, because mpi4py was built against a different MPI than the launcher used, so
    every process believes it is rank 0 of 1.
    """
    found = launcher_size(environ)
    if found is None:
        return None
    n_launched, variable = found
    if n_launched > 1 and comm.Get_size() == 1:
        return (
            f"the launcher started {n_launched} processes ({variable}={n_launched}) but MPI "
            f"sees only 1: mpi4py was built against a different MPI than the mpiexec used. "
            f"Use the mpiexec of the MPI that mpi4py was built with (.venv/bin/mpiexec), or "
            f"rebuild with `rm -rf .venv && MPICC=<your mpicc> scripts/setup.sh`."
        )
    return None


# --------------------------------------------------------------------------- reductions
def summarise_over_ranks(comm: Any, value: float) -> tuple[float, float, float]:
    """Collective: ``(min, median, max)`` of one number per rank (e.g. a timer), on all ranks."""
    values = np.asarray(comm.allgather(float(value)))
    return float(values.min()), float(np.median(values)), float(values.max())


def allreduce_counts(comm: Any, counts: np.ndarray) -> np.ndarray:
    """Collective: element-wise sum of an integer array over ranks (same shape everywhere).

    Parameters
    ----------
    counts
        This rank's counts (e.g. voxels per status code); any integer dtype.

    Returns
    -------
    numpy.ndarray
        The totals, as int64, on every rank.
    """
    from mpi4py import MPI

    local = np.ascontiguousarray(counts, dtype=np.int64)
    total = np.empty_like(local)
    comm.Allreduce(local, total, op=MPI.SUM)
    return total
