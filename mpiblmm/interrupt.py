"""SIGTERM and SIGINT: stop a job cleanly, within a grace period, agreed by every rank.

A batch system ends a job at its time limit with SIGTERM (``mpiexec`` forwards it to every
rank; ``srun`` sends it to every task), and SIGKILL some time later (Slurm's ``KillWait``,
30 s by default).  Between the two the ranks must keep what they have done:

- :func:`install` replaces the handlers of SIGTERM and SIGINT.  The first signal only sets a
  flag (:func:`requested`) and arms a timer of ``grace_seconds``.  The fit checks the flag at
  the ends of its chunks: a rank finishes the chunk in hand and takes no new one.
- If the chunk in hand is still being computed when the grace period ends (or at a second
  signal), the computation is abandoned: :class:`ChunkAbandoned` is raised inside
  :func:`abandonable` blocks only, which hold no file open for writing, so nothing
  half-written can result.  Outside those blocks the rank finishes what it is doing.
- :class:`StopAgreement` tells the other ranks without waiting for them: a rank that stops
  sends a small message to every other rank, and every rank looks for such messages (a
  non-blocking probe) at its chunk ends.  A rank that was not signalled therefore stops
  at its next chunk end too.  :meth:`StopAgreement.settle` is the one collective: every rank
  calls it once after its chunk loop, and all learn whether the job is stopping.

Nothing here touches files: the pipeline flushes, closes and prints what it has to.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator

#: Grace period (s) between SIGTERM and the abandoning of the chunk in hand.
DEFAULT_GRACE_SECONDS = 30.0

#: The longest grace period (one week, longer than any batch job's time limit; the command
#: line refuses more).  The timer is armed inside the signal handler, where the OverflowError
#: of ``signal.setitimer`` (above about 9.3e9 s) would be a traceback instead of a clean stop.
MAX_GRACE_SECONDS = 7 * 24 * 3600.0

#: Message tag of "I am stopping" (on the agreement's own duplicate communicator).
_STOP_TAG = 71


class ChunkAbandoned(BaseException):
    """The grace period ended while a chunk was being computed: its results are dropped.

    A :class:`BaseException`, so that no ``except Exception`` in numerical code swallows it.
    """


class _State:
    signum: int | None = None
    expired = False
    computing = False
    grace = DEFAULT_GRACE_SECONDS
    previous: dict[int, Any] = {}
    held = False  # hold_until_exit(): the handlers stay to the process's end


_state = _State()


def _on_signal(signum: int, frame: Any) -> None:
    if _state.signum is None:
        _state.signum = signum
        if _state.grace > 0:
            signal.setitimer(signal.ITIMER_REAL, _state.grace)
        else:
            _on_alarm(signal.SIGALRM, frame)
    else:  # a second signal: do not wait for the grace period
        _on_alarm(signal.SIGALRM, frame)


def _on_alarm(signum: int, frame: Any) -> None:
    _state.expired = True
    if _state.computing:
        _state.computing = False
        raise ChunkAbandoned()


def install(grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
    """Handle SIGTERM and SIGINT as requests to stop (call in the main thread).

    Called again while installed, it only changes the grace period: a signal that arrived
    in between is kept.  The command line installs the handlers first thing, so a signal
    during the imports and the setup is not lost either.
    """
    # Bounded here too, for callers other than the command line (whose option is bounded).
    _state.grace = min(float(grace_seconds), MAX_GRACE_SECONDS)
    if _state.previous:
        return
    _state.signum, _state.expired, _state.computing = None, False, False
    for sig, handler in ((signal.SIGTERM, _on_signal), (signal.SIGINT, _on_signal),
                         (signal.SIGALRM, _on_alarm)):
        _state.previous[sig] = signal.signal(sig, handler)


def hold_until_exit() -> None:
    """The command's work is over and the process is about to leave (``MPI_Finalize``, then
    :func:`~mpiblmm.parallel.exit_now`): keep the handlers to the end, so a SIGTERM or SIGINT
    arriving now is only noted and the process leaves with the code its work earned.  With
    the handlers restored, such a signal ended a rank whose results were complete with
    signal 15 (a batch system took the job as killed).  :func:`uninstall` then does nothing;
    a rank stuck inside ``MPI_Finalize`` after such a signal is ended by its watchdog
    (:meth:`~mpiblmm.watchdog.Watchdog.finish`).  For the console script only: the process
    ends right after the command."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    _state.computing = False
    _state.held = True


def uninstall() -> None:
    """Restore the handlers :func:`install` replaced, disarm the timer, forget the signal
    (nothing once :func:`hold_until_exit` was called)."""
    if _state.held:
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig, handler in _state.previous.items():
        signal.signal(sig, handler)
    _state.previous = {}
    _state.signum, _state.expired, _state.computing = None, False, False


def requested() -> bool:
    """True once this rank received SIGTERM or SIGINT."""
    return _state.signum is not None


def signal_name() -> str:
    """The name of the signal received (``SIGTERM``), or ``""``."""
    return "" if _state.signum is None else signal.Signals(_state.signum).name


@contextmanager
def abandonable() -> Iterator[None]:
    """A computation that may be dropped when the grace period ends (raises
    :class:`ChunkAbandoned` then; at once if it has already ended)."""
    if _state.expired:
        raise ChunkAbandoned()
    _state.computing = True
    try:
        yield
    finally:
        _state.computing = False


class StopAgreement:
    """Agreement on stopping among the ranks of ``comm``, with no rank waiting for another
    before :meth:`settle`.  Collective to create (it duplicates ``comm``)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm.Dup() if comm is not None and comm.Get_size() > 1 else None
        self.sent: list[Any] = []
        self.heard = False

    def should_stop(self) -> bool:
        """At a chunk end: True if this rank was signalled or heard that another rank was."""
        if requested() and not self.sent and self.comm is not None:
            rank, size = self.comm.Get_rank(), self.comm.Get_size()
            self.sent = [self.comm.isend(rank, dest=r, tag=_STOP_TAG)
                         for r in range(size) if r != rank]
        if not self.heard and self.comm is not None:
            self.heard = bool(self.comm.iprobe(tag=_STOP_TAG))
        return requested() or self.heard

    def settle(self) -> bool:
        """Collective: True on every rank if any rank stopped; drains the messages."""
        if self.comm is None:
            return requested()
        from mpi4py import MPI

        stop = self.should_stop()
        stopping = bool(self.comm.allreduce(int(stop), op=MPI.MAX))
        senders = int(self.comm.allreduce(int(bool(self.sent)), op=MPI.SUM))
        for _ in range(senders - int(bool(self.sent))):
            self.comm.recv(source=MPI.ANY_SOURCE, tag=_STOP_TAG)
        MPI.Request.Waitall(self.sent)
        self.sent = []
        self.comm.Free()
        self.comm = None
        return stopping
