"""Advice that works when followed: an incomplete results file and --resume with --overwrite.

``export`` and ``report`` of an incomplete ``results.h5`` name ``--resume`` (a plain second
``fit`` is refused without it); a command that had ``--overwrite`` and was given ``--resume``
too, as the stop line says, is told to replace the one with the other.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _mpiblmm(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "mpiblmm", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_advice") / "study"
    assert _mpiblmm("simulate", str(folder), "--subjects", "6", "--visits", "3", "--shape",
                    "4", "3", "3", "--form", "formula").returncode == 0
    job = _mpiblmm("fit", "spec.json", "--quiet", cwd=folder)
    assert job.returncode == 0, job.stderr
    return folder


@pytest.fixture
def incomplete(fitted):
    """The fitted study with its results.h5 marked incomplete, as a stopped fit leaves it."""
    import h5py

    results = fitted / "results" / "results.h5"
    with h5py.File(results, "r+") as f:
        f.attrs["complete"] = False
    return fitted, results


@pytest.mark.parametrize("command", ["export", "report"])
def test_an_incomplete_results_file_says_resume(incomplete, command):
    folder, results = incomplete
    job = _mpiblmm(command, str(results), cwd=folder)
    assert job.returncode == 2
    lines = [line for line in job.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in job.stderr, job.stderr
    assert lines[0].startswith(f"mpiblmm: error: {results}: the results are incomplete")
    assert "re-run `mpiblmm fit` on the spec with --resume" in lines[0]
    # the advice works: the fit resumes (nothing left to do here) and exits 0
    again = _mpiblmm("fit", "spec.json", "--quiet", "--resume", cwd=folder)
    assert again.returncode == 0, again.stderr


def test_resume_with_overwrite_says_which_to_keep(tmp_path):
    for argv in (["--overwrite", "--resume"], ["--resume", "--overwrite"]):
        job = _mpiblmm("fit", "spec.json", *argv, cwd=tmp_path)
        assert job.returncode == 2
        line, = [line for line in job.stderr.splitlines() if line.strip()]
        assert "not allowed with argument" in line  # argparse's words first
        assert "to continue a stopped fit, replace --overwrite with --resume" in line
