"""Infrastructure for tests that run inside an MPI job.

``scripts/test.sh`` runs this folder as ``mpiexec -n N python -m pytest tests/mpi`` for
N = 1, 2, 3: every rank runs the same tests in the same order, so collectives inside a test
match up. Write tests with the ``mpi`` fixture:

.. code-block:: python

    def test_something(mpi):
        part = slab(mpi.comm, 10)
        mpi.check(part.size <= 4, "slab too big")   # collective assert: all ranks fail together
        folder = mpi.shared_tmp_path                # same folder on every rank

Rules: call collectives on every rank (also those with nothing to do); use ``mpi.check``
rather than a bare ``assert``: a test that fails on some ranks only aborts the whole run
(the others would wait in a collective), and its failure is printed from that rank's log;
derive random seeds from ``mpi.seed``. A test that hangs is killed after
``MPIBLMM_TEST_TIMEOUT`` seconds (default 120) with the traceback of where it waited.

Only rank 0 writes pytest's report to the terminal; the other ranks write theirs to
``$MPIBLMM_MPI_TEST_LOGDIR/rank-<N>.log`` (or nowhere when that is unset), which
``scripts/test.sh`` prints when a run fails, with any ``rank-<N>-fatal.log``.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from mpi4py import MPI

_HERE = Path(__file__).resolve().parent


class CollectiveAssertionError(AssertionError):
    """A failed :meth:`MPIContext.check`: raised on every rank together."""


class MPIContext:
    """What an MPI test gets: a private communicator and collective helpers.

    Parameters
    ----------
    comm
        A duplicate of ``COMM_WORLD`` owned by this test.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.seed = comm.bcast(int.from_bytes(os.urandom(4), "little"), root=0)
        self._tmp: Path | None = None

    def check(self, condition: Any, message: str = "") -> None:
        """Collective assert: raise ``AssertionError`` on every rank if any rank failed.

        The message names the ranks where ``condition`` was false.
        """
        verdicts = self.comm.allgather(bool(condition))
        failed = [rank for rank, ok in enumerate(verdicts) if not ok]
        if failed:
            raise CollectiveAssertionError(f"failed on rank(s) {failed} of {self.size}: {message}")

    @property
    def shared_tmp_path(self) -> Path:
        """Collective on first use: a fresh folder made by rank 0, the same on every rank."""
        if self._tmp is None:
            name = tempfile.mkdtemp(prefix="mpiblmm-mpitest-") if self.rank == 0 else None
            self._tmp = Path(self.comm.bcast(name, root=0))
        return self._tmp

    def close(self) -> None:
        """Collective: remove the shared folder and free the communicator."""
        self.comm.Barrier()
        if self._tmp is not None and self.rank == 0:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self.comm.Free()


@pytest.fixture
def mpi():
    """An :class:`MPIContext` on a duplicate of ``COMM_WORLD``."""
    context = MPIContext(MPI.COMM_WORLD.Dup())
    yield context
    context.close()


@pytest.fixture
def comm(mpi):
    """The test's own communicator (a duplicate of COMM_WORLD)."""
    return mpi.comm


@pytest.fixture
def tmp(mpi):
    """One folder shared by all ranks."""
    return mpi.shared_tmp_path


_HANG_LOG = None


def _hang_log():
    """Where a rank writes a hang traceback or a lone failure (pytest captures stderr)."""
    global _HANG_LOG
    if _HANG_LOG is None:
        logdir = os.environ.get("MPIBLMM_MPI_TEST_LOGDIR")
        if logdir:
            Path(logdir).mkdir(parents=True, exist_ok=True)
            rank = MPI.COMM_WORLD.Get_rank()
            _HANG_LOG = open(Path(logdir, f"rank-{rank}-fatal.log"), "w")  # noqa: SIM115
        else:
            _HANG_LOG = sys.__stderr__
    return _HANG_LOG


@pytest.fixture(autouse=True)
def _hang_guard():
    """Kill this rank (and so the job) if a test waits longer than MPIBLMM_TEST_TIMEOUT s.

    The rank's traceback at that moment goes to ``rank-<N>-fatal.log`` in
    ``$MPIBLMM_MPI_TEST_LOGDIR``, which scripts/test.sh prints.
    """
    faulthandler.dump_traceback_later(float(os.environ.get("MPIBLMM_TEST_TIMEOUT", "120")),
                                      exit=True, file=_hang_log())
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails on some ranks only (not via ``mpi.check``) aborts the whole job.

    The other ranks would otherwise wait in the test's next collective until the hang
    guard fires. The failure goes to this rank's log (printed by scripts/test.sh).
    """
    outcome = yield
    report = outcome.get_result()
    if not report.failed or MPI.COMM_WORLD.Get_size() == 1:
        return
    if call.excinfo is not None and call.excinfo.errisinstance(CollectiveAssertionError):
        return
    rank = MPI.COMM_WORLD.Get_rank()
    log = _hang_log()
    log.write(f"rank {rank}: {item.nodeid} failed on this rank ({report.when}); "
              f"aborting the job so no rank waits in a collective:\n{report.longreprtext}\n")
    log.flush()
    MPI.COMM_WORLD.Abort(1)


def pytest_collection_modifyitems(config, items):
    """Mark every test in this folder as an MPI test."""
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.mpi)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """On ranks other than 0, send pytest's terminal report to a per-rank log file."""
    rank = MPI.COMM_WORLD.Get_rank()
    if rank == 0:
        return
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is None:
        return
    from _pytest.terminal import TerminalReporter

    logdir = os.environ.get("MPIBLMM_MPI_TEST_LOGDIR")
    if logdir:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        stream = open(Path(logdir, f"rank-{rank}.log"), "w")  # noqa: SIM115 - lives as long as pytest
    else:
        stream = open(os.devnull, "w")  # noqa: SIM115
    config.pluginmanager.unregister(reporter)
    config.pluginmanager.register(TerminalReporter(config, stream), "terminalreporter")
    sys.stdout.flush()
