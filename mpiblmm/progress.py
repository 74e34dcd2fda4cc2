"""What a fit tells the user while it runs: rank 0's log lines and job-wide progress.

Two objects, both made on every rank:

- :class:`JobLog` is where lines go.  Rank 0 writes them to stdout (unless ``--quiet``) and
  to ``--log-file``; on an interactive terminal progress is drawn as a bar on one line, in a
  batch log every report is a plain line.  With ``--rank-logs DIR`` every rank also writes
  its own ``DIR/rank-NNNNN.log`` (its slab, its chunks, its phases), for finding a slow
  rank.  A heartbeat thread on rank 0 prints the phase being run when no line has been
  printed for ``--progress-interval`` seconds, so a long ingest or export is not silent.
  :meth:`JobLog.phase` is the :class:`~mpiblmm.timers.PhaseTimer` hook that names phases.
- :class:`Progress` counts fitted voxels over **all** ranks.  Each rank calls
  :meth:`Progress.chunk_done` at the end of every chunk; rank 0 reports
  ``done / total`` voxels, the rate, the time left and how many ranks have finished, every
  ``interval`` seconds.  The time left is the slowest rank's (:func:`time_left`): the job
  ends when its last rank does, so a rank that stalls or has the costly voxels sets it.
  Every rank calls :meth:`Progress.close` once after its last chunk.

How counts reach rank 0 without stalling anyone.  A rank posts its running count to rank 0
with a non-blocking send of four 8-byte integers (``Isend``: done, resumed, final, slab size),
at most once per half interval
plus a last one marked *final* as soon as its chunk loop ends (:meth:`Progress.chunks_done`,
before the collective that waits for the slower ranks: else a finished rank's last chunks
went uncounted, and "ranks finished" read 0/N, until the end); it never waits for it before
its next chunk.  Rank 0 takes
whatever has arrived (``Iprobe`` + ``Recv``) at its own chunk ends, from the heartbeat thread
when MPI grants ``MPI_THREAD_MULTIPLE``, and in :meth:`Progress.close`, where it stays until
every rank's final count has arrived: it would wait for them in the next collective anyway.
Messages from one sender arrive in order, so after a rank's final message nothing of it is
left in flight, and the other ranks' ``Waitall`` in ``close`` completes.

Why not the alternatives.  Non-blocking collectives (``Iallreduce``) must be called the same
number of times on every rank, but ranks have different numbers of chunks (a rank may have
none), so per-chunk reductions deadlock or need an agreed schedule.  A one-sided counter
(``Win.Accumulate`` into a window on rank 0) avoids that, but passive-target RMA completes
only when the target makes MPI progress in many implementations (MPICH's active-message path
without asynchronous progress): a rank's ``Unlock`` could wait until rank 0 finishes its own
chunk, which is the stall we must avoid.  An eager ``Isend`` completes locally.

The communicator is duplicated at the start (collective), so these messages never meet
anyone else's.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from mpiblmm.errors import UserError, warn_unwritable

#: Seconds between progress lines unless ``--progress-interval`` says otherwise.
DEFAULT_INTERVAL = 10.0
#: How every line of the job log starts (a file that starts otherwise is not a log).
LOG_PREFIX = b"mpiblmm:"
#: Message tag of progress counts (on a private duplicate of the communicator).
TAG = 12
#: How often rank 0 looks for counts while it waits in :meth:`Progress.close` (s).
POLL_SECONDS = 0.02
#: Phases of the timer that are one user-visible phase: the chunk loop is "fit".
PHASE_NAMES = {"read": "fit", "write": "fit"}
#: Width of the terminal progress bar (characters between the brackets).
BAR_WIDTH = 30
#: Buffers of sends released by :meth:`Progress.abandon` (32 bytes each, at most a few).
_IN_FLIGHT: list[np.ndarray] = []


@dataclass(frozen=True)
class LogOptions:
    """Where a fit's lines go (``mpiblmm fit --log-file --progress-interval --rank-logs``)."""

    log_file: str | None = None
    progress_interval: float = DEFAULT_INTERVAL
    rank_logs: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> "LogOptions":
        """The options of an argparse namespace (missing attributes take the defaults)."""
        interval = getattr(args, "progress_interval", None)
        return cls(log_file=getattr(args, "log_file", None),
                   progress_interval=DEFAULT_INTERVAL if interval is None else float(interval),
                   rank_logs=getattr(args, "rank_logs", None))


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"`` or ``"2 h 07 min"``: a duration for a log line."""
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(done: int, total: int, elapsed: float, fresh: int, ranks_done: int,
                  ranks: int, left: float | None = None, unit: str = "voxels") -> str:
    """One progress report: voxels done of total, rate, time left, ranks finished.

    ``fresh`` is the part of ``done`` fitted in this run (not resumed), which sets the rate;
    ``left`` the time left when known better (:func:`time_left`), else from that rate;
    ``unit``: what the study counts (voxels, or a surface's vertices or grayordinates).
    """
    share = 100.0 * done / total if total else 100.0
    rate = fresh / elapsed if elapsed > 0 else 0.0
    if left is None:
        left = (total - done) / rate if rate > 0 else (0.0 if done >= total else math.inf)
    text = (f"fit {done:,}/{total:,} {unit} ({share:.1f}%), {_rate(rate)} {unit}/s, "
            f"{format_seconds(elapsed)} elapsed")
    if done < total:
        text += (f", about {format_seconds(left)} left" if math.isfinite(left)
                 else ", time left unknown")
    return text + f"; {ranks_done}/{ranks} ranks finished"


def _rate(rate: float) -> str:
    """Voxels per second as a person reads them: whole numbers from 10 on, two significant
    digits below (a cohort audit: 0.13 voxels/s, 5.6 s per voxel, read "0 voxels/s" for the
    whole fit, as if it had stalled)."""
    return f"{rate:,.0f}" if rate >= 10 or rate == 0 else f"{rate:.2g}"


def time_left(table: np.ndarray, total: int, elapsed: float, resumed_total: int = 0) -> float:
    """Seconds until the slowest rank is done, from each rank's own rate.

    ``table`` (ranks, 4): each rank's latest count (voxels done, of those resumed, final,
    voxels of its slab); a row of zeros is a rank not heard from.  A rank with voxels left
    takes ``left_r / (fresh_r / elapsed)``; one with none fitted yet, or not heard from
    (its voxels left: what the heard ranks' slabs and the earlier run's voxels leave of
    ``total``, shared evenly; ``resumed_total`` as :class:`Progress` has it), takes the
    mean rate of the ranks that fitted some.  Infinite where no rank has fitted anything
    yet.  (The job's mean rate understated the time left whenever the ranks' rates differ:
    with most ranks finished it kept falling while a slow rank still had most of its
    slab; a stalled rank now makes it grow.)"""
    done, resumed, final, mine = (table[:, k].astype(np.float64) for k in range(4))
    heard = (mine > 0) | (final > 0)
    unheard = int((~heard).sum())
    remaining = np.where(heard & (final == 0), np.maximum(mine - done, 0.0), 0.0)
    if unheard:
        earlier = max(resumed_total - resumed[heard].sum(), 0.0)
        remaining[~heard] = max(total - mine[heard].sum() - earlier, 0.0) / unheard
    fresh = done - resumed
    fitting = fresh > 0
    if not (remaining > 0).any():
        return 0.0
    if elapsed <= 0 or not fitting.any():
        return math.inf
    rate = fresh / elapsed
    rate = np.where(fitting, rate, rate[fitting].mean())
    return float((remaining / rate).max())


def compact(text: str) -> str:
    """A progress line shortened for a terminal's bar: ``fit 200/3,072 (6.5%), 92/s, ~31 s
    left; 0/2 ranks finished`` (the elapsed time is the bar's own line's)."""
    text = re.sub(r", [^,;]* elapsed", "", text)
    text = re.sub(r" (voxels|vertices|grayordinates)/s", "/s", text)
    return re.sub(r" (voxels|vertices|grayordinates)\b", "", text).replace("about ", "~")


class JobLog:
    """Rank 0's lines (stdout, ``--log-file``) and each rank's own log (``--rank-logs``).

    Made on every rank (not collective).  Lines are flushed as they are written: a batch
    job killed at its time limit keeps everything said so far.

    Parameters
    ----------
    rank
        This rank's number; only rank 0 writes to stdout and the log file.
    quiet
        No lines on stdout (the log files are still written).
    options
        Log file, interval and per-rank log folder.
    stream
        Where rank 0's lines go (default: ``sys.stdout``).
    """

    @classmethod
    def open(cls, comm: Any, quiet: bool = False, options: LogOptions = LogOptions()) -> "JobLog":
        """Collective: the log of every rank; a log file that cannot be opened is a user error
        raised on every rank together (before anything else is collective)."""
        from mpiblmm.parallel import agree_on_user_error

        log, problem = None, None
        try:
            log = cls(comm.Get_rank(), quiet, options)
        except UserError as exc:
            problem = exc
        try:
            agree_on_user_error(comm, problem)
        except UserError:
            if log is not None:
                log.close()
            raise
        assert log is not None
        return log

    def __init__(self, rank: int, quiet: bool = False, options: LogOptions = LogOptions(),
                 stream: TextIO | None = None) -> None:
        self.rank = rank
        self.interval = float(options.progress_interval)
        self.started = time.monotonic()
        self.current = "start"
        self._stream = None if quiet or rank != 0 else (stream or sys.stdout)
        self._tty = bool(self._stream is not None and getattr(self._stream, "isatty",
                                                                lambda: False)())
        self._bar_shown = False
        self._file = self._rank_file = None
        if rank == 0 and options.log_file:
            _refuse_other_files(Path(options.log_file))
            self._file = _open(Path(options.log_file), "a", "--log-file")
        if options.rank_logs:
            self._rank_file = _open(Path(options.rank_logs) / f"rank-{rank:05d}.log", "w",
                                    "--rank-logs")
        self._lock = threading.RLock()  # one writer at a time (main thread, heartbeat)
        self._last_line = self.started
        #: What the heartbeat reports when nothing else was said for an interval.
        self.status: Callable[[], str] = self._phase_status
        self._stop = threading.Event()
        self._thread = None
        if rank == 0 and self.interval > 0 and (self._stream or self._file):
            self._thread = threading.Thread(target=self._heartbeat, name="mpiblmm-progress",
                                            daemon=True)
            self._thread.start()

    # ----------------------------------------------------------------- output
    @property
    def active(self) -> bool:
        """Whether rank 0's lines go anywhere (stdout or a log file)."""
        return self._stream is not None or self._file is not None

    def say(self, text: str) -> None:
        """A line from rank 0 (other ranks: nothing); also into this rank's own log."""
        self._line(text, stdout=True)

    def to_log_file(self, text: str) -> None:
        """A line rank 0 printed on stderr (a stopped fit's last line) also into the log file
        (``--log-file``: a batch user reads the job there) and this rank's own log; not on
        stdout.  Other ranks: their own log only."""
        self._line(text, stdout=False)

    def _line(self, text: str, stdout: bool) -> None:
        with self._lock:
            if stdout:
                self._last_line = time.monotonic()
            if stdout and self._stream is not None:
                if self._bar_shown:
                    self._stream.write("\n")
                    self._bar_shown = False
                self._stream.write(text + "\n")
                self._stream.flush()
            self._to_file("_file", text + "\n")
        self.note(text)

    def report(self, text: str, fraction: float | None = None) -> None:
        """A progress report: a plain line, or a bar redrawn in place on a terminal."""
        line = f"mpiblmm: [{format_seconds(self.elapsed())}] {text}"
        if not self._tty or fraction is None:
            self.say(line)
            return
        with self._lock:
            self._last_line = time.monotonic()
            short = compact(text)
            columns = shutil.get_terminal_size().columns
            # the words first (the time left was cut off at 80 columns): the bar takes what
            # is left, 10 to BAR_WIDTH characters, on one line (no wrap)
            bar_width = min(BAR_WIDTH, max(10, columns - len(short) - 4))
            filled = int(round(bar_width * min(max(fraction, 0.0), 1.0)))
            bar = "#" * filled + "-" * (bar_width - filled)
            assert self._stream is not None  # _tty implies a stream
            width = columns - bar_width - 4
            self._stream.write(f"\r[{bar}] {short[:max(width, 10)]}\033[K")
            self._stream.flush()
            self._bar_shown = True
            self._to_file("_file", line + "\n")
        self.note(line)

    def note(self, text: str) -> None:
        """A line for this rank's own log only (``--rank-logs``), stamped with its time."""
        if self._rank_file is not None:
            with self._lock:
                self._to_file("_rank_file", f"{self.elapsed():9.3f} {text}\n")

    def _to_file(self, which: str, text: str) -> None:
        """Write and flush to the log file ``which`` (an attribute); one that cannot be
        written any more (a full disk) is closed with a warning on stderr and the job goes
        on: a log is never worth a job's results."""
        f = getattr(self, which)
        if f is None:
            return
        try:
            f.write(text)
            f.flush()
        except (OSError, ValueError) as exc:
            setattr(self, which, None)
            _close_quietly(f)
            warn_unwritable(f"rank {self.rank}'s log {f.name}", exc)

    def elapsed(self) -> float:
        """Seconds since this log was made (the start of the job)."""
        return time.monotonic() - self.started

    # ----------------------------------------------------------------- phases
    def phase(self, name: str) -> None:
        """Hook of :class:`~mpiblmm.timers.PhaseTimer`: a phase starts (``read`` and
        ``write`` count as ``fit``); a change of phase is logged."""
        name = PHASE_NAMES.get(name, name)
        if name == self.current:
            return
        self.current = name
        if name == "fit":  # the fit announces itself with its counts (Progress)
            self.note(f"phase {name}")
        else:
            self.report(f"phase {name}")

    def _phase_status(self) -> str:
        return f"phase {self.current} running"

    def _heartbeat(self) -> None:
        """Rank 0's thread: a line when nothing was said for an interval."""
        tick = min(0.5, self.interval / 4)
        while not self._stop.wait(tick):
            if time.monotonic() - self._last_line >= self.interval:
                try:
                    with self._lock:  # counts taken and printed in one go: lines stay in order
                        text, fraction = _split(self.status())
                        self.report(text, fraction)
                except Exception as exc:  # noqa: BLE001 - never let reporting kill a fit
                    self.note(f"progress report failed: {type(exc).__name__}: {exc}")
                    self._last_line = time.monotonic()

    def close(self) -> None:
        """Stop the heartbeat and close the log files (every rank, at the end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._bar_shown and self._stream is not None:
                self._stream.write("\n")
                self._stream.flush()
                self._bar_shown = False
            for f in (self._file, self._rank_file):
                if f is not None:
                    _close_quietly(f)
            self._file = self._rank_file = None


def _close_quietly(f: TextIO) -> None:
    """Close a log file whose last flush may fail (a full disk): its lines are lost, not
    the job."""
    try:
        f.close()
    except OSError:
        pass


def _split(status: Any) -> tuple[str, float | None]:
    """A status is a line, or ``(line, fraction done)`` for the terminal's bar."""
    if isinstance(status, tuple):
        return status[0], status[1]
    return str(status), None


def _refuse_other_files(path: Path) -> None:
    """The job log is appended to (a resumed job continues its log), so a file that is not
    one, such as an input of the spec named by mistake, is refused before a line goes into
    it: an existing non-empty file must start as every log does (``mpiblmm:``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LOG_PREFIX))
    except OSError:
        return  # missing (created below), or not readable: _open names the problem
    if head and head != LOG_PREFIX:
        raise UserError(f"{path} exists and is not an mpiblmm log (its first line does not "
                        "start with 'mpiblmm:'): name a new file, or this job's earlier log",
                        where="--log-file")


def _open(path: Path, mode: str, flag: str) -> TextIO:
    """A log file opened for writing (its folder made); a :class:`UserError` naming the flag
    if that fails.  Closed by :meth:`JobLog.close`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode)  # noqa: SIM115
    except OSError as exc:
        why = "its folder is a file" if path.parent.is_file() else exc.strerror or str(exc)
        raise UserError(f"cannot write {path}: {why}", where=flag) from None


class Progress:
    """Voxels fitted over all ranks, reported by rank 0 (see the module docstring).

    Collective to make (duplicates ``comm``).  Then each rank calls :meth:`chunk_done`
    after each chunk (any number of times, none at all is fine) and :meth:`close` once (or
    :meth:`abandon`, when all ranks stop early).  A resumed fit reports the voxels of its
    slab that an earlier run did with ``chunk_done(n, resumed=True)`` first: they count as
    done but not towards the rate.

    Parameters
    ----------
    comm
        The communicator of the fit.
    total
        Voxels of the whole job (all ranks' slabs together).
    log
        The job's :class:`JobLog` (its interval sets how often rank 0 reports).
    mine, chunks
        Voxels and chunks of this rank's slab (for its own log).
    resumed_total
        Voxels of the whole job an earlier run did (a resumed fit; every rank knows them):
        counted as done from the first line, also for the ranks whose count has not
        arrived yet (the first line of a resumed fit said "fit 0/18,000" right after
        "resuming: 9300 of 18000 voxels already done").
    """

    def __init__(self, comm: Any, total: int, log: JobLog, mine: int = 0,
                 chunks: int = 0, resumed_total: int = 0, unit: str = "voxels") -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.total, self.mine, self.log = int(total), int(mine), log
        self.unit = unit
        self.interval = log.interval
        self.started = time.monotonic()
        self.done = 0  # this rank's voxels done, resumed ones included
        self.resumed = 0  # of those, done by an earlier run
        self.chunks = 0
        self.resumed_total = int(resumed_total)
        self._pending: list[tuple[Any, np.ndarray]] = []
        self._last_sent = -math.inf
        self._closed = False
        self._final_sent = False
        self._freed = False
        # rank 0: every rank's latest (done, resumed, final, slab size)
        self._table = np.zeros((self.size, 4), dtype=np.int64)
        self._table[0, 3] = self.mine
        self._buffer = np.zeros(4, dtype=np.int64)
        self._lock = threading.Lock()
        self._threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._last_report = time.monotonic()
        log.phase("fit")
        log.note(f"slab of {self.mine} {unit} in {chunks} chunk(s); {self.total} {unit} over "
                 f"{self.size} rank(s)")
        if self.rank == 0:
            log.status = self._status
            log.report(f"fit {self.resumed_total:,}/{self.total:,} {unit} on {self.size} "
                       f"rank(s)" + (" (resumed)" if self.resumed_total else ""), 0.0)

    # ----------------------------------------------------------------- every rank
    def chunk_done(self, n_voxels: int, resumed: bool = False) -> None:
        """``n_voxels`` more of this rank's voxels are done (``resumed``: by an earlier run,
        so they do not count towards the rate).  Never waits for another rank."""
        self.done += int(n_voxels)
        self.resumed += int(n_voxels) if resumed else 0
        self.chunks += 1
        self.log.note(f"chunk {self.chunks} done: {n_voxels} {self.unit}"
                      f"{' (resumed)' if resumed else ''}, {self.done}/{self.mine} of the slab")
        if self.rank == 0:
            self._record(0, (self.done, self.resumed, 0, self.mine))
            self._poll()
            if self.interval > 0 and time.monotonic() - self._last_report >= self.interval:
                self._report()
        elif self.interval > 0 and time.monotonic() - self._last_sent >= self.interval / 2:
            self._send(final=False)

    def chunks_done(self) -> None:
        """Every rank, as its chunk loop ends (before any collective that waits for the
        others): its final count is on its way, so rank 0's lines count this rank's last
        chunks and "ranks finished" while the slower ranks still work.  Never waits."""
        if self._final_sent or self._closed:
            return
        self._final_sent = True
        if self.rank == 0:
            self._record(0, (self.done, self.resumed, 1, self.mine))
        else:
            self._send(final=True)

    def close(self) -> None:
        """Every rank, once, after its last chunk.  Rank 0 waits for every rank's final count
        and reports the last line; the others complete their sends.  Frees the duplicate."""
        if self._closed:
            return
        self.chunks_done()
        self._closed = True
        if self.rank != 0:
            self._MPI.Request.Waitall([request for request, _ in self._pending])
            self._pending.clear()
        else:
            while not self._table[:, 2].all():
                if not self._poll():
                    time.sleep(POLL_SECONDS)
                if self.interval > 0 and time.monotonic() - self._last_report >= self.interval:
                    self._report()
            self.log.status = self.log._phase_status
            self._report(final=True)
        self.log.note(f"fit done: {self.done} {self.unit} in {self.chunks} chunk(s)")
        with self._lock:  # the heartbeat may be polling
            self._freed = True
            self.comm.Free()

    def abandon(self, done_total: int | None = None) -> None:
        """Instead of :meth:`close`, when every rank stops early together (e.g. at a signal,
        after the ranks agreed to stop): nobody waits.  Rank 0 reports ``done_total`` (the
        voxels done over all ranks, when the caller has agreed on it) or else what has
        arrived; the others release their pending sends (MPI lets a send request be freed
        while active: the message is still delivered).  The duplicate is not freed (that is
        collective), so abandon is safe on an error path too."""
        if self._closed:
            return
        self._closed = True
        if self.rank == 0:
            self._poll()
            self.log.status = self.log._phase_status
            done = self._counts()[0] if done_total is None else int(done_total)
            self.log.report(f"fit stopped at {done:,}/{self.total:,} {self.unit}")
        else:
            for request, buffer in self._pending:
                request.Free()
                _IN_FLIGHT.append(buffer)  # MPI may still read it: never garbage-collected
            self._pending.clear()
        with self._lock:
            self._freed = True  # no more polling

    # ----------------------------------------------------------------- internals
    def _send(self, final: bool) -> None:
        buffer = np.array([self.done, self.resumed, int(final), self.mine], dtype=np.int64)
        request = self.comm.Isend([buffer, self._MPI.INT64_T], dest=0, tag=TAG)
        self._pending.append((request, buffer))  # the buffer lives until the send completes
        self._pending = [(r, b) for r, b in self._pending if not r.Test()]
        self._last_sent = time.monotonic()

    def _record(self, rank: int, row: Any) -> None:
        self._table[rank] = row

    def _poll(self) -> bool:
        """Rank 0: take every count that has arrived; whether there was any."""
        MPI = self._MPI
        status = MPI.Status()
        got = False
        with self._lock:
            while not self._freed and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status):
                source = status.Get_source()
                self.comm.Recv([self._buffer, MPI.INT64_T], source=source, tag=TAG)
                self._record(source, self._buffer)
                got = True
        return got

    def _counts(self) -> tuple[int, int, int]:
        """Voxels done over all ranks (the earlier run's of ranks not heard from yet
        included), of those fitted in this run, and ranks finished."""
        done, resumed, final = self._table[:, :3].sum(axis=0)
        return int(done + self.resumed_total - resumed), int(done - resumed), int(final)

    def _status(self) -> tuple[str, float]:
        """The heartbeat's report during the fit (polls first if MPI allows threads)."""
        if self._threaded and not self._closed:
            self._poll()
        done, fresh, finished = self._counts()
        self._last_report = time.monotonic()
        return (self._line(done, fresh, finished, self._last_report - self.started),
                done / self.total if self.total else 1.0)

    def _line(self, done: int, fresh: int, finished: int, elapsed: float) -> str:
        left = time_left(self._table, self.total, elapsed, self.resumed_total)
        return progress_line(done, self.total, elapsed, fresh, finished, self.size, left,
                             self.unit)

    def _report(self, final: bool = False) -> None:
        with self.log._lock:  # against the heartbeat: lines stay in order
            done, fresh, finished = self._counts()
            self._last_report = time.monotonic()
            text = self._line(done, fresh, finished, self._last_report - self.started)
            fraction = None if final else (done / self.total if self.total else 1.0)
            self.log.report(text, fraction)
