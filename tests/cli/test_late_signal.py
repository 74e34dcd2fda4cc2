"""A SIGTERM that arrives after a fit's work is done leaves the job's exit code 0.

A fault audit sent SIGTERM to the ranks after the results and maps were complete, while the
ranks were leaving (``MPI_Finalize``): the handlers had been restored by then, so each rank
died of signal 15 and a batch system took a complete job for a killed one.  Here
``MPI_Finalize`` is made slow (or stuck) by a wrapper, the ranks get SIGTERM inside it, and
the job must end with 0 and complete results: after the slow finalize by itself, after the
stuck one through the watchdog (:meth:`mpiblmm.watchdog.Watchdog.finish`; there the launcher
may say 1, see the test).
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
    watchdog.DONE_AFTER_SIGNAL_SECONDS = {done_after}
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
    stuck = seconds > 60
    # the slow finalize ends by itself, well before the watchdog would end it; the stuck one
    # is ended by the watchdog a second after the signal
    wrapper = WRAPPER.format(seconds=seconds, done_after=1.0 if stuck else 60.0)
    cmd = _launch(ranks, [sys.executable, "-c", wrapper, "fit", str(spec), "-o", str(out),
                          "-q"])
    code, _, err, after = _act_at(cmd, lambda line: line.startswith("FINALIZING"),
                                  _signal_ranks(signal.SIGTERM), timeout=120)
    assert after < 60, after          # the stuck finalize did not keep the job
    if stuck:
        # every rank leaves with 0 from inside MPI_Finalize; MPICH's hydra then reports 0,
        # or 1 when it sees a rank leave without finishing MPI_Finalize before it began
        # ending the job itself (measured: 1 in 1 of 40 runs on a loaded machine; the
        # docs say so).  Never a death by signal 15 (143), which the handlers prevent.
        assert code in (0, 1), err
        assert "stopped by a signal after its work was done" in err, err
    else:
        assert code == 0, err
        assert "stopped by a signal" not in err, err
    with h5py.File(out / "results.h5", "r") as f:
        assert bool(f.attrs["complete"]) and bool(f.attrs["maps_complete"])
