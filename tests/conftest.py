"""Shared test fixtures for the serial suite (everything under tests/ except tests/mpi).

Imports neither mpi4py nor h5py: the serial suite must not initialise MPI in the pytest
process. Tests that need several ranks either live in ``tests/mpi/`` (run by
``scripts/test.sh`` under ``mpiexec -n 1, 2, 3``) or launch their own job with the
``run_mpi`` fixture below (mark them ``@pytest.mark.spawns_mpiexec``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def mpiexec_command() -> list[str] | None:
    """The launcher to use: $MPIEXEC, else the venv's mpiexec link, else mpiexec on PATH."""
    if os.environ.get("MPIEXEC"):
        return shlex.split(os.environ["MPIEXEC"])
    beside_python = Path(sys.prefix, "bin", "mpiexec")
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("mpiexec")
    return [found] if found else None


@dataclass
class MPIRun:
    """Outcome of a spawned MPI job."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def _run_job(command: Sequence[str], timeout: float, env: Mapping[str, str] | None,
             cwd: Path | None) -> MPIRun:
    """Run a job in its own session; on timeout kill the whole process group."""
    start = time.monotonic()
    proc = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return MPIRun(proc.returncode, out, err, time.monotonic() - start, timed_out)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture
def run_mpi() -> Callable[..., MPIRun]:
    """Launch ``mpiexec -n N <argv>`` with a timeout; returns an :class:`MPIRun`.

    Usage: ``run_mpi(3, [sys.executable, "-c", code], timeout=60, env=None)``.
    ``$MPIEXEC`` and ``$MPIEXEC_NUMPROC_FLAG`` (default ``-n``) select the launcher.
    """
    launcher = mpiexec_command()
    if launcher is None:
        pytest.fail("no mpiexec found (run scripts/setup.sh)")
    flag = os.environ.get("MPIEXEC_NUMPROC_FLAG", "-n")

    def run(n_ranks: int, argv: Sequence[str], timeout: float = 60.0,
            env: Mapping[str, str] | None = None, cwd: Path | None = None) -> MPIRun:
        return _run_job([*launcher, flag, str(n_ranks), *argv], timeout, env, cwd)

    return run


@pytest.fixture
def mpiblmm_command() -> list[str]:
    """How to start the ``mpiblmm`` command of the environment under test."""
    script = Path(sys.prefix, "bin", "mpiblmm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpiblmm"]
