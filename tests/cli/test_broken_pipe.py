"""Standard output whose reader has gone (``mpiblmm check spec.json | head -1``).

No traceback and no "bug" exit code: mpiblmm stops printing, quietly, runs to its end and
exits with the code it would have had.  A fit keeps working: its results are complete and
its lock released, on one rank and under ``mpiexec`` when rank 0's own reader goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _with_closed_stdout(argv, cwd=None, timeout=300):
    """Run ``argv`` with stdout a pipe whose read end is already closed (every write: EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, cwd=cwd,
                              timeout=timeout)
    finally:
        os.close(write)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken_pipe") / "study"
    job = subprocess.run([sys.executable, "-m", "mpiblmm", "simulate", str(folder),
                          "--subjects", "8", "--visits", "3", "--shape", "5", "4", "3",
                          "--form", "formula"], capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    return folder


def _complete(results):
    import h5py

    with h5py.File(results, "r") as f:
        return bool(f.attrs["complete"])


@pytest.mark.parametrize("argv", [["env"], ["schema"], ["--help"], ["check", "spec.json"]],
                         ids=["env", "schema", "help", "check"])
def test_a_closed_reader_ends_the_printing_not_the_command(study, argv):
    normal = subprocess.run([sys.executable, "-m", "mpiblmm", *argv], capture_output=True,
                            text=True, cwd=study, timeout=300)
    assert normal.stdout
    job = _with_closed_stdout([sys.executable, "-m", "mpiblmm", *argv], cwd=study)
    assert job.returncode == normal.returncode, job.stderr
    assert "Traceback" not in job.stderr and "BrokenPipe" not in job.stderr, job.stderr


def test_a_fit_whose_reader_goes_finishes_and_releases_its_lock(study, tmp_path):
    out = tmp_path / "fit"
    job = _with_closed_stdout([sys.executable, "-m", "mpiblmm", "fit", "spec.json", "--output",
                               str(out), "--progress-interval", "0.01"], cwd=study)
    assert job.returncode == 0, job.stderr
    assert "Traceback" not in job.stderr and "BrokenPipe" not in job.stderr, job.stderr
    assert _complete(out / "results.h5") and (out / "nifti" / "maps.json").is_file()
    assert not (out / "mpiblmm.lock").exists()


@pytest.mark.spawns_mpiexec
def test_under_mpiexec_rank_0_whose_reader_goes_keeps_fitting(study, tmp_path, run_mpi):
    """Each rank's stdout is piped into ``true``, which exits at once: rank 0's lines meet a
    closed pipe, not the launcher's.  (A reader of ``mpiexec``'s own output that goes kills
    MPICH's ``mpiexec`` and with it the ranks: nothing in them can prevent that.)"""
    out = tmp_path / "fit"
    command = " ".join([sys.executable, "-m", "mpiblmm", "fit", "spec.json", "--output",
                        str(out), "--progress-interval", "0.01"])
    job = run_mpi(2, ["bash", "-c", f"{command} | true; exit ${{PIPESTATUS[0]}}"], cwd=study,
                  timeout=300)
    assert not job.timed_out
    assert job.returncode == 0, job.stderr
    assert "Traceback" not in job.stderr and "BrokenPipe" not in job.stderr, job.stderr
    assert _complete(out / "results.h5")
    assert not (out / "mpiblmm.lock").exists()
    maps = json.loads((out / "nifti" / "maps.json").read_text())
    assert maps
