"""A thread on every rank that ends the job when its main thread cannot: stuck inside MPI or HDF5.

:func:`~mpiblmm.parallel.no_hang` turns every I/O error that reaches Python into one line and
``MPI_Abort``.  Some never reach Python: on a full disk, parallel HDF5 can fail a write on one
rank inside a collective call (``H5Fflush`` of ``packed.h5`` or ``results.h5``) and go on to a
different MPI call there than the other ranks, so both wait in C forever (an audit: rank 0 in
``MPI_Barrier``, rank 1 in ``MPI_Bcast``; one rank failed cleanly).  A Python signal handler
cannot run either while the main thread is in C, so SIGTERM was ignored too.  And a rank whose
partner was killed by the launcher (ranks started through a wrapper script) waited in the
last barrier for ever.

So :func:`start` runs a daemon thread that, every :data:`POLL_SECONDS`:

- ends the job with ``<folder>: No space left on device (while <phase>)`` and exit code
  :data:`~mpiblmm.parallel.IO_FAILURE_EXIT_CODE` once the output folder's file system has had
  no free block for :data:`FULL_DISK_SECONDS` (the clean path fails within seconds);
- ends the job with exit code :data:`~mpiblmm.parallel.INTERRUPTED_EXIT_CODE` when SIGTERM or
  SIGINT arrived (seen through :func:`signal.set_wakeup_fd`, written by the C-level handler
  even while the main thread is stuck) and the process is still alive
  :data:`STUCK_AFTER_SIGNAL_SECONDS` after the grace period.

Both end the job through :func:`~mpiblmm.parallel.die` (``MPI_Abort`` from this thread: mpi4py
asks for ``MPI_THREAD_MULTIPLE``), so the lock is released and the results file keeps
``complete`` false: ``--resume`` takes it from there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

#: Seconds between the thread's checks.
POLL_SECONDS = 2.0
#: Seconds the output file system must stay full before the job is ended.
FULL_DISK_SECONDS = 20.0
#: Seconds after a signal's grace period after which a rank still running ends the job.
STUCK_AFTER_SIGNAL_SECONDS = 60.0
#: Seconds a rank whose work is done (:meth:`Watchdog.finish`) may stay after a signal.
DONE_AFTER_SIGNAL_SECONDS = 10.0


def free_blocks(folder: Path) -> int | None:
    """Blocks this process may still write in ``folder``'s file system (root may use the
    reserved ones); ``None`` where the file system reports no size at all (some FUSE and
    object-store mounts say 0 blocks of 0: not full)."""
    st = os.statvfs(folder)
    if st.f_blocks == 0:
        return None
    return st.f_bfree if os.geteuid() == 0 else st.f_bavail


class Watchdog:
    """The thread of the module docstring (:func:`start`; :meth:`stop` at the end)."""

    def __init__(self, comm: Any, grace: float,
                 free: Callable[[Path], int | None] = free_blocks) -> None:
        self.comm, self.grace, self.free = comm, grace, free
        self.rank = comm.Get_rank()   # (not asked later: MPI may be finalizing by then)
        self.folder: Path | None = None
        self._code: int | None = None   # the exit code of the job this thread is ending
        self._done_code: int | None = None   # finish(): the work is done, with this code
        self.phase: Callable[[], str] = lambda: "setup"
        self._stop = threading.Event()
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="mpiblmm-watchdog", daemon=True)
        self._thread.start()

    def watch(self, folder: Path, phase: Callable[[], str]) -> None:
        """From now on also watch ``folder``'s free space; ``phase()`` names the phase."""
        self.folder, self.phase = folder, phase

    def finish(self, code: int) -> None:
        """The work is done and the process leaves with ``code``: stop watching the disk;
        a rank still alive :data:`DONE_AFTER_SIGNAL_SECONDS` after a SIGTERM or SIGINT
        (stuck in ``MPI_Finalize``, its partner gone) leaves with ``code``, since nothing
        is left to save.  The thread runs on to the process's end (no :meth:`stop`)."""
        self.folder = None
        self._done_code = code

    def stop(self) -> None:
        """Stop the thread and give the wakeup fd back (main thread)."""
        self._stop.set()
        self._thread.join(timeout=2 * POLL_SECONDS)
        signal.set_wakeup_fd(self._previous_fd)
        for fd in (self._read_fd, self._write_fd):
            os.close(fd)

    def _signalled(self) -> bool:
        try:
            data = os.read(self._read_fd, 64)   # non-blocking: nothing there raises
        except OSError:
            return False
        return any(b in (signal.SIGTERM, signal.SIGINT) for b in data)

    def _run(self) -> None:
        try:
            self._watch()
        except BaseException:  # noqa: BLE001
            if self._code is None:
                raise            # a fault of the watchdog itself: the job goes on
            os._exit(self._code)  # MPI_Abort failed (e.g. inside MPI_Finalize)

    def _watch(self) -> None:
        from .parallel import INTERRUPTED_EXIT_CODE, IO_FAILURE_EXIT_CODE, die, finalizing

        def end(message: str, code: int) -> None:
            self._code = code
            if finalizing():   # inside MPI_Finalize: everything is written, just leave
                print(f"mpiblmm: error: {message}", file=sys.stderr, flush=True)
                os._exit(code)
            die(self.comm, message, code)

        full_since = signalled_at = None
        while not self._stop.wait(POLL_SECONDS):
            now = time.monotonic()
            if signalled_at is None and self._signalled():
                signalled_at = now
            if signalled_at is not None and self._done_code is not None and \
                    now - signalled_at >= DONE_AFTER_SIGNAL_SECONDS:
                print(f"mpiblmm: rank {self.rank}: stopped by a signal after its work was done "
                      f"and still inside MPI {now - signalled_at:.0f} s later: leaving",
                      file=sys.stderr, flush=True)
                os._exit(self._done_code)
            if signalled_at is not None and \
                    now - signalled_at > self.grace + STUCK_AFTER_SIGNAL_SECONDS:
                end(f"rank {self.rank}: stopped by a signal, but still inside an "
                    f"MPI or HDF5 call {now - signalled_at:.0f} s later (in phase "
                    f"{self.phase()}): the job is ended; run the same command with --resume",
                    INTERRUPTED_EXIT_CODE)
            try:
                full = self.folder is not None and self.free(self.folder) == 0
            except OSError:
                full = False
            full_since = (full_since or now) if full else None
            if full_since is not None and now - full_since >= FULL_DISK_SECONDS:
                end(f"{self.folder}: {os.strerror(28)} (in phase {self.phase()}; no rank "
                    f"could go on for {now - full_since:.0f} s): free space, then run the same "
                    f"command with --resume", IO_FAILURE_EXIT_CODE)


def start(comm: Any, grace: float,
          free: Callable[[Path], int | None] = free_blocks) -> Watchdog | None:
    """A :class:`Watchdog` on this rank (main thread only: it takes the signal wakeup fd);
    ``None`` where one cannot run (not the main thread).  It watches for signals at once, and
    a folder's free space once told (:meth:`Watchdog.watch`)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return Watchdog(comm, grace, free)
