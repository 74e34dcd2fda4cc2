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
- An error inside or around collective HDF5 (disk full, I/O error, quota) must not unwind
  through a collective ``close``, which would wait forever for ranks that are elsewhere:
  such code runs inside :func:`no_hang`, which prints one line naming the rank, the file and
  the cause and ends the whole job at once (:func:`die`, exit code
  :data:`IO_FAILURE_EXIT_CODE`).  Clean-up that must happen even then (the output lock) is
  registered with :func:`at_abort`.
- A finished rank leaves through :func:`exit_now`: MPI finalized, no interpreter teardown.

Exit codes: 0 done; 1 a bug (the job was aborted); 2 a user error; 3 stopped by SIGTERM or
SIGINT (the work done so far is kept: rerun with ``--resume``); 4 an I/O failure while
writing or reading (disk full, quota, I/O error; the job was aborted).
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, NamedTuple, NoReturn

import numpy as np

from mpiblmm.errors import USER_ERROR_EXIT_CODE, UserError

#: Exit code of a rank that aborts the job after an unexpected exception.
ABORT_EXIT_CODE = 1

#: Exit code of a job stopped by SIGTERM/SIGINT whose work so far is kept (``--resume``).
INTERRUPTED_EXIT_CODE = 3

#: Exit code of a job aborted because reading or writing a file failed (disk full, EIO, ...).
IO_FAILURE_EXIT_CODE = 4

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

    def __init__(self, message: str, origin_rank: int,
                 exit_code: int = USER_ERROR_EXIT_CODE) -> None:
        super().__init__(message)
        self.origin_rank = origin_rank
        self.exit_code = exit_code


class IOFailure(UserError):
    """Reading or writing a file failed (disk full, I/O error) where every rank can still
    agree on it (no collective I/O under way): one line, exit code 4 on every rank."""

    exit_code = 4


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
    mine = None
    if rank == first_bad:
        mine = (str(error), int(getattr(error, "exit_code", USER_ERROR_EXIT_CODE)))
    message, code = comm.bcast(mine, root=first_bad)
    raise AgreedUserError(message, first_bad, code)


def _print_user_error(message: str) -> None:
    say(f"mpiblmm: error: {message}")


def say(line: str) -> None:
    """Print ``line`` on stderr, or nothing if stderr cannot be written (``2>/dev/full``, a
    closed pipe): the exit code must stay what the error calls for (2 for a user error), not
    become a traceback or an abort about the message."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: a closed stream
        pass


def _print_traceback(exc: BaseException) -> None:
    """:func:`say` for a traceback."""
    try:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- ending a job
_ABORT_HOOKS: list[Callable[[], None]] = []


def at_abort(hook: Callable[[], None]) -> Callable[[], None]:
    """Register ``hook`` to run before this rank aborts the job (e.g. release a lock).

    Returns ``hook``; remove it again with :func:`forget_abort_hook`.  Hooks must be quick,
    never raise into the caller (errors are ignored) and are safe to run more than once.
    """
    _ABORT_HOOKS.append(hook)
    return hook


def forget_abort_hook(hook: Callable[[], None]) -> None:
    """Unregister a hook of :func:`at_abort` (no error if it is not registered)."""
    if hook in _ABORT_HOOKS:
        _ABORT_HOOKS.remove(hook)


def _run_abort_hooks() -> None:
    for hook in list(_ABORT_HOOKS):
        try:
            hook()
        except Exception:  # noqa: BLE001 - clean-up must not stop the abort
            pass


#: Seconds a rank waits between printing its last words and ``MPI_Abort``: the launcher
#: forwards a rank's stderr through a pipe and tears the job down on the abort, and under load
#: MPICH's hydra dropped the one error line still in that pipe (tests/cli/test_io_failures.py
#: failed 2 runs in 3 with both cores busy; the line was there with this pause).
ABORT_LINGER = 0.5


def abort_job(comm: Any, code: int) -> None:
    """``comm.Abort(code)`` after the standard streams are flushed and the launcher had
    :data:`ABORT_LINGER` seconds to forward them."""
    _flush_std_streams()
    time.sleep(ABORT_LINGER)
    comm.Abort(code)


def _abort(comm: Any, code: int) -> NoReturn:
    """End the whole job now: other ranks may be inside a collective that never completes."""
    _run_abort_hooks()
    if comm is not None and comm.Get_size() > 1:
        abort_job(comm, code)
    _flush_std_streams()
    os._exit(code)  # one rank: no interpreter teardown, which would close HDF5 files again


def die(comm: Any, message: str, code: int = IO_FAILURE_EXIT_CODE) -> NoReturn:
    """Print ``mpiblmm: error: <message>`` and end the whole job with ``code``, at once.

    Several ranks often fail together (a file removed under a collective open, a full disk
    under a collective write): each would print its own line.  So rank r > 0 first waits
    ``min(r, 4)`` x (:data:`ABORT_LINGER` + 0.5 s): a lower rank failing too ends the job
    (its line the only one) before r prints.  A rank failing alone still ends the job within
    seconds.
    """
    rank = 0 if comm is None else comm.Get_rank()
    if rank > 0:
        time.sleep(min(rank, 4) * (ABORT_LINGER + _DIE_STAGGER_SECONDS))
    say(f"mpiblmm: error: {message}")
    _abort(comm, code)


_DIE_STAGGER_SECONDS = 0.5  # MPI_Abort's reach to the other ranks, with room to spare


_KNOWN_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES,
                 errno.EPERM, errno.EFBIG, errno.ENOENT, errno.ESTALE)


def _from_h5py(exc: BaseException) -> bool:
    """True when ``exc`` was raised inside h5py (HDF5 turns I/O failures into ValueError,
    KeyError or RuntimeError as well as OSError)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "h5py" in frames[-1].filename.replace("\\", "/")


def describe_io_error(exc: BaseException) -> str:
    """The cause of an I/O error in a few words (``No space left on device``).

    HDF5 reports the ``errno`` of a failed system call inside its message; that errno's
    text is what a user needs.  Otherwise the first line of the message, shortened.
    """
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    text = str(exc)
    for known in _KNOWN_ERRNOS:  # MPI-IO reports the system's words, without the errno
        if os.strerror(known) in text:
            return os.strerror(known)
    found = re.search(r"errno\s*=\s*(\d+)", text)
    if found and int(found.group(1)) > 0:
        return os.strerror(int(found.group(1)))
    found = re.search(r"error message\s*=\s*'([^']+)'", text)
    if found:
        return found.group(1)
    found = re.search(r"MPI error string is '([^,'\n]+)", text)  # ROMIO: 'File does not exist, ...
    if found and found.group(1).strip():
        return found.group(1).strip()
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


@contextmanager
def no_hang(comm: Any, path: Any, doing: str = "writing") -> Iterator[None]:
    """Run a block of (collective) file I/O; on any error end the job at once, never hang.

    An error on one rank while the others are inside, or on their way into, a collective HDF5
    call would leave them waiting forever, and closing the file (collective too) would hang
    this rank as well.  So nothing is unwound: an ``OSError`` (disk full, quota, EIO,
    permission), ``RuntimeError`` or any error raised inside h5py (HDF5 reports a failed
    MPI-IO write as a ``ValueError``) becomes one line,
    ``mpiblmm: error: rank N: <file>: <cause> (while <doing>)``, and exit code
    :data:`IO_FAILURE_EXIT_CODE` for the whole job; a :class:`UserError` of this rank alone
    becomes its line and exit code 2 (on one process it passes through); any other exception
    is a bug: its traceback, then exit code :data:`ABORT_EXIT_CODE`.  An
    :class:`AgreedUserError` (raised on every rank together) passes through.
    """
    swallowed: list[BaseException] = []
    previous = sys.unraisablehook

    def keep(unraisable: Any) -> None:
        # Serial HDF5 may report a failed write only when h5py frees an object, where
        # Python can merely print it ("Exception ignored in ... __dealloc__"): keep it.
        if unraisable.exc_value is not None and "h5py" in repr(unraisable.object) + str(
                getattr(unraisable, "err_msg", "")):
            swallowed.append(unraisable.exc_value)
        else:
            previous(unraisable)

    previous_excepthook = sys.excepthook

    def keep_printed(kind: Any, value: Any, tb: Any) -> None:
        # Cython prints the traceback of such an error through sys.excepthook first.
        frames = traceback.extract_tb(tb)
        if frames and "h5py" in frames[-1].filename and value is not None:
            swallowed.append(value)
        else:
            previous_excepthook(kind, value, tb)

    sys.unraisablehook = keep
    sys.excepthook = keep_printed
    try:
        yield
        if swallowed:
            raise swallowed[0]
    except AgreedUserError:
        raise
    except UserError as exc:
        if comm is None or comm.Get_size() == 1:
            raise  # one process: an ordinary user error
        die(comm, f"rank {comm.Get_rank()}: {exc}", int(getattr(exc, "exit_code",
                                                             USER_ERROR_EXIT_CODE)))
    except Exception as exc:  # noqa: BLE001 - sorted below: I/O failure or bug
        if not isinstance(exc, (OSError, RuntimeError)) and not _from_h5py(exc):
            _bug(comm, exc)
        rank = 0 if comm is None else comm.Get_rank()
        die(comm, f"rank {rank}: {path}: {describe_io_error(exc)} (while {doing})",
            IO_FAILURE_EXIT_CODE)
    except BaseException as exc:  # noqa: BLE001 - a bug inside collective I/O: abort now
        _bug(comm, exc)
    finally:
        sys.unraisablehook = previous
        sys.excepthook = previous_excepthook


def _bug(comm: Any, exc: BaseException) -> NoReturn:
    rank = 0 if comm is None else comm.Get_rank()
    say(f"rank {rank}: {type(exc).__name__}: {exc}")
    _print_traceback(exc)
    _abort(comm, ABORT_EXIT_CODE)


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
        return exc.exit_code
    except UserError as exc:
        # Raised on this rank alone, outside agree_on_user_error: the other ranks may be
        # waiting in a collective, so only an abort is safe when there are several.
        code = int(getattr(exc, "exit_code", USER_ERROR_EXIT_CODE))
        _print_user_error(str(exc) if size == 1 else f"rank {rank}: {exc}")
        _run_abort_hooks()
        if size > 1:
            abort_job(comm, code)
        return code
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        # sys.exit() on one rank: the others may be in a collective, so end them too.
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0 and size > 1:
            say(f"rank {rank}: exited with code {code}")
            _run_abort_hooks()
            abort_job(comm, code)
        return code
    except BaseException as exc:  # noqa: BLE001 - the top of a rank's job
        say(f"rank {rank}: {type(exc).__name__}: {exc}")
        _print_traceback(exc)
        _run_abort_hooks()
        if size > 1:
            abort_job(comm, ABORT_EXIT_CODE)
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


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced stream
            pass


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` once its work is done, skipping interpreter teardown.

    Tearing down an interpreter that has loaded numpy, scipy, h5py and nibabel takes 0.15-0.2 s
    (measured; ``docs/PERFORMANCE.md``), paid by every rank after its results are written.
    This flushes stdout and stderr, runs the ``atexit`` callbacks, finalizes MPI if it was
    initialised (what teardown would do), then leaves with :func:`os._exit`.  If an HDF5
    file is still open it exits normally instead, so HDF5's own shutdown can flush it.
    """
    _flush_std_streams()
    if open_hdf5_files():
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    _flush_std_streams()                 # what the callbacks printed (os._exit drops buffers)
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            _finalize_without_the_gil(MPI)
    os._exit(code)


_finalizing = False


def finalizing() -> bool:
    """True once :func:`exit_now` has begun ``MPI_Finalize``: every result is written, and a
    watchdog that has to end this process then just leaves (``MPI_Abort`` is no longer
    allowed)."""
    return _finalizing


def _finalize_without_the_gil(MPI: Any) -> None:
    """``MPI_Finalize`` through ctypes, which lets go of the GIL (mpi4py's ``Finalize`` holds
    it): where a partner the launcher killed leaves it waiting for ever, the watchdog thread
    (:mod:`mpiblmm.watchdog`) can still run and end the process."""
    global _finalizing
    _finalizing = True
    try:
        import ctypes

        finalize = ctypes.CDLL(MPI.__file__).MPI_Finalize
    except (OSError, AttributeError):
        MPI.Finalize()
        return
    finalize()


# --------------------------------------------------------------------------- launcher check
def world_if_parallel() -> Any:
    """``COMM_WORLD`` when running under MPI with several ranks, else ``None`` (the handlers
    of commands that also run without MPI, such as ``export`` and ``report``)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


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
