"""The watchdog (:mod:`mpiblmm.watchdog`) ends a job whose ranks are stuck inside MPI calls.

An audit found two ways a job could wait for ever where Python never gets control back: a full
disk under parallel HDF5, where one rank's failed write inside ``H5Fflush`` sent it to another
MPI call than its partner (both waited in C, and SIGTERM was ignored: its Python handler
cannot run there), and a SIGTERM after which the launcher killed a rank the others then
waited for.  Here a rank's main thread is stuck the same way (rank 0 in a barrier rank 1
never enters, or one process waiting on nothing), the file system's free space is given as a
function, and the job must end with the promised line and exit code.  The full-disk case was
also checked by hand on a 16 kB and a 48 kB tmpfs with ``mpiexec -n 2 mpiblmm fit`` (a hang
before, exit 4 after ~24 s now); mounting needs root, so it is not a test.
"""

import sys
import textwrap

import pytest

pytestmark = pytest.mark.spawns_mpiexec

STUCK = textwrap.dedent(
    """
    import os, signal, sys, threading, pathlib
    from mpi4py import MPI
    from mpiblmm import interrupt, watchdog
    watchdog.POLL_SECONDS = 0.2
    watchdog.FULL_DISK_SECONDS = 1.0
    watchdog.STUCK_AFTER_SIGNAL_SECONDS = 1.0
    comm = MPI.COMM_WORLD
    interrupt.install(0.5)
    dog = watchdog.start(comm, 0.5, free=lambda folder: {free})
    dog.watch(pathlib.Path("."), lambda: "ingest")
    if {signal_self}:
        os.kill(os.getpid(), signal.SIGTERM)
    if comm.Get_size() > 1 and comm.Get_rank() == 0:
        comm.Barrier()               # rank 1 never comes: stuck in C, as inside HDF5
    else:
        threading.Event().wait()     # stuck for ever
    """
)


@pytest.mark.parametrize("n_ranks", [1, 2])
def test_a_full_disk_ends_a_stuck_job_with_exit_4(run_mpi, n_ranks, tmp_path):
    job = run_mpi(n_ranks, [sys.executable, "-c", STUCK.format(free=0, signal_self=False)],
                  timeout=60, cwd=tmp_path)
    assert not job.timed_out, "the job hung"
    assert job.returncode == 4, job.stderr
    lines = [ln for ln in job.stderr.splitlines() if ln.startswith("mpiblmm: error:")]
    assert len(lines) == 1, job.stderr
    assert "No space left on device (in phase ingest" in lines[0]
    assert "--resume" in lines[0]


def test_free_space_keeps_the_job_going(run_mpi, tmp_path):
    code = STUCK.format(free=10, signal_self=False).replace(
        "threading.Event().wait()", "threading.Event().wait(3); sys.exit(0)")
    job = run_mpi(1, [sys.executable, "-c", code], timeout=60, cwd=tmp_path)
    assert not job.timed_out and job.returncode == 0, job.stderr
    assert "mpiblmm: error" not in job.stderr


@pytest.mark.parametrize("n_ranks", [1, 2])
def test_a_rank_stuck_after_sigterm_ends_the_job_with_exit_3(run_mpi, n_ranks, tmp_path):
    job = run_mpi(n_ranks, [sys.executable, "-c", STUCK.format(free=10, signal_self=True)],
                  timeout=60, cwd=tmp_path)
    assert not job.timed_out, "the job hung"
    assert job.returncode == 3, job.stderr
    assert "stopped by a signal, but still inside an MPI or HDF5 call" in job.stderr
    assert "--resume" in job.stderr
