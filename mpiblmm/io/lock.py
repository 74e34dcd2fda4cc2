"""One writer per output folder: an exclusive lock file held by the job that writes there.

``<output>/mpiblmm.lock`` is created atomically (``O_CREAT | O_EXCL``) by rank 0 before the
job writes anything into the folder, and holds one JSON line: host, PID, start time and the
command.  A second job that finds it refuses to start, naming the job that holds it.

A lock is *stale* when it names a process on this host that no longer runs (a job killed
with SIGKILL, or by the batch system), or an earlier run of this very batch job (Slurm keeps a
requeued job's ``SLURM_JOB_ID`` and counts ``SLURM_RESTART_COUNT`` up: the earlier run has
ended, on whichever node it ran): it is then replaced.  Any other lock of another host cannot
be checked from here; the message says to delete the file if that job is no longer running.
Under PBS the lock records ``PBS_JOBID``: ``scripts/pbs/fit.pbs`` removes a lock that names
the job it continues (passed on at resubmission), which has ended.

The holder releases the lock at exit (:meth:`OutputLock.release`), including after an error
or a signal; a job that aborts releases it from whichever rank aborts first (every rank knows
the lock's token, see :func:`mpiblmm.parallel.at_abort`).  Releasing only removes the file if
it still holds this job's token, so a job never removes another job's lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mpiblmm.errors import UserError

LOCK_NAME = "mpiblmm.lock"


@dataclass(frozen=True)
class OutputLock:
    """A lock this job holds: the file and the exact text it wrote (its token)."""

    path: Path
    token: str

    def release(self) -> None:
        """Remove the lock file if it is still ours (safe to call more than once, any rank)."""
        try:
            if self.path.read_text() == self.token:
                self.path.unlink()
        except OSError:
            pass


#: An unreadable lock file older than this (s) is no longer said to be "a job starting now".
UNREADABLE_LOCK_AGE = 60.0


def _describe(text: str, path: Path) -> str:
    """Who holds the lock (its ``text``): host, PID and start, or for a file that is empty or
    half written (created, then written: a node that crashed between the two leaves it)
    a job starting now, or, once it is older than :data:`UNREADABLE_LOCK_AGE`, its age."""
    try:
        info = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["start"])))
        return f"host {info['host']}, PID {info['pid']}, started {started}"
    except (ValueError, KeyError, TypeError):
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            age = 0.0
        if age < UNREADABLE_LOCK_AGE:
            return "a job that is starting now"
        ago = (f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.0f} h" if age < 172800
               else f"{age / 86400:.0f} days")
        return (f"an empty or unreadable lock written {ago} ago: a job that stopped while "
                "starting, if none is running")


def _batch_run() -> dict:
    """This process's Slurm job and restart count, or its PBS job (empty outside both).  A
    PBS job's id in the lock lets ``scripts/pbs/fit.pbs`` remove the lock its predecessor
    left when it was killed (the resubmitted job has a new id and often another host)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if job:
        return {"slurm_job": job, "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")}
    pbs = os.environ.get("PBS_JOBID", "")
    return {"pbs_job": pbs} if pbs else {}


def _is_stale(text: str) -> bool:
    """True when the lock names a process of this host that no longer exists, or an earlier
    run of this requeued Slurm job."""
    try:
        info = json.loads(text)
        host, pid = str(info["host"]), int(info["pid"])
    except (ValueError, KeyError, TypeError):
        return False  # empty or half written: a job is creating it right now
    run = _batch_run()
    if run.get("slurm_job") and info.get("slurm_job") == run["slurm_job"] \
            and str(info.get("slurm_restart")) != run["slurm_restart"]:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, owned by someone else
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that was killed but not yet reaped (state Z in /proc): it still has its PID
    but runs no more.  In containers whose init does not reap orphans, the ranks of a job
    killed whole (mpiexec and its proxies first) stay like that."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux): trust kill(pid, 0)
    return stat[stat.rfind(")") + 2:].startswith(("Z", "X"))


def acquire_lock(folder: Path, where: str = "output") -> OutputLock:
    """Create the lock of ``folder`` or raise :class:`UserError` naming the job holding it.

    A stale lock (same host, dead PID) is replaced: it is first renamed to a name of our
    own, and removed only if it is still the stale one (two jobs replacing the same stale
    lock at once cannot both win).
    """
    path = Path(folder) / LOCK_NAME
    token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
                        "command": " ".join(sys.argv)[:500], **_batch_run()}) + "\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                held = path.read_text()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError as exc:
                raise UserError(f"cannot read the lock file {path} ({exc.strerror})", where) from None
            if not _is_stale(held):
                raise UserError(
                    f"another mpiblmm job is writing into this folder "
                    f"({_describe(held, path)}; lock file {path}); wait for it, or delete the "
                    f"lock file if that job is no longer running", where) from None
            aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.replace(path, aside)
                if aside.read_text() != held:  # someone else's fresh lock: put it back
                    try:
                        os.link(aside, path)
                    except OSError:
                        pass
                aside.unlink()
            except FileNotFoundError:
                pass
            continue
        except OSError as exc:
            raise UserError(f"cannot create the lock file {path} ({exc.strerror or exc})",
                            where) from None
        try:
            with os.fdopen(fd, "w") as out:
                out.write(token)
        except OSError as exc:
            try:
                path.unlink()
            except OSError:
                pass
            raise UserError(f"cannot write the lock file {path} ({exc.strerror or exc})",
                            where) from None
        return OutputLock(path, token)
    raise UserError(f"cannot take the lock file {path}: it keeps changing (another job is "
                    f"starting in this folder)", where)


__all__ = ["LOCK_NAME", "OutputLock", "acquire_lock"]
