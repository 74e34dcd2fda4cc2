"""A SIGTERM that arrives after a fit's work is done leaves the job's exit code 0.

A fault audit sent SIGTERM to the ranks after the results and maps were complete, while the
ranks were leaving (``MPI_Finalize``): the handlers had been restored by then, so each rank
died of signal 15 and a batch system took a complete job for a killed one.  Here
``MPI_Finalize`` is made slow (or stuck) by a wrapper, the ranks get SIGTERM inside it, and
the job must end with 0 and complete results: after the slow finalize by itself, after the
stuck one through the watchdog (:meth:`mpiblmm.watchdog.Watchdog.finish`).
"""

from __future__ import annotations

import signal
import sys
import textwrap

import h5py
import pytest

from tests.conftest import _run_job

from .test_resume import _act_at, _launch, _mpiblmm, _signal_ranks

pytestmark = pytest.mark.spawns_mpiexec

WRAPPER = textwrap.dedent(
    """
    import sys, time
    from mpiblmm import cli, parallel, watchdog
    watchdog.POLL_SECONDS = 0.2
    watchdog.DONE_AFTER_SIGNAL_SECONDS = 1.0
    finalize = parallel._finalize_without_the_gil
    def slow(MPI):
        print("FINALIZING", flush=True)
        time.sleep({seconds})          # MPI_Finalize waiting on a partner
        finalize(MPI)
    parallel._finalize_without_the_gil = slow
    sys.argv = ["mpiblmm"] + sys.argv[1:]
    cli.run()
    """
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("late")
    run = _run_job(_launch(1, [*_mpiblmm(), "simulate", str(folder / "study"), "--subjects",
                               "10", "--visits", "3", "--shape", "6", "5", "4"]), 120, None, None)
    assert run.returncode == 0, run.stderr
    return folder / "study" / "spec.json"


@pytest.mark.parametrize("ranks, seconds", [(1, 3), (2, 3), (2, 600)])
def test_sigterm_while_leaving_after_the_work_is_done_exits_0(spec, tmp_path, ranks, seconds):
    out = tmp_path / "out"
    cmd = _launch(ranks, [sys.executable, "-c", WRAPPER.format(seconds=seconds), "fit",
                          str(spec), "-o", str(out), "-q"])
    code, _, err, after = _act_at(cmd, lambda line: line.startswith("FINALIZING"),
                                  _signal_ranks(signal.SIGTERM), timeout=120)
    assert code == 0, err
    assert after < 60, after          # the stuck finalize did not keep the job
    if seconds > 60:
        assert "stopped by a signal after its work was done" in err, err
    with h5py.File(out / "results.h5", "r") as f:
        assert bool(f.attrs["complete"]) and bool(f.attrs["maps_complete"])
