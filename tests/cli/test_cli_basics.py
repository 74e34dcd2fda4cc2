"""The command line: parser, version, dispatch, user errors and `mpiblmm env`.

Tests marked ``spawns_mpiexec`` launch their own MPI job (with a timeout) and so belong to
the serial suite.
"""

import subprocess
import sys

import pytest

from mpiblmm import __version__
from mpiblmm.cli import DISPATCH, get_parser, pin_blas_threads, resolve_handler
from mpiblmm.errors import UserError

SUBCOMMANDS = {"env", "fit", "export", "simulate", "check", "schema", "convert-blmm", "report"}


def run_cli(command, *args, env=None, timeout=60):
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_parser_has_the_subcommands_and_their_options():
    parser = get_parser()
    assert set(DISPATCH) == SUBCOMMANDS
    fit = parser.parse_args(["fit", "spec.json", "--output", "out.h5", "--max-memory-mb", "512",
                             "--quiet"])
    assert (fit.command, fit.spec, fit.output, fit.max_memory_mb, fit.quiet) == (
        "fit", "spec.json", "out.h5", 512, True)
    export = parser.parse_args(["export", "results.h5"])
    assert (export.results, export.out_dir) == ("results.h5", None)
    sim = parser.parse_args(["simulate", "out", "--subjects", "5", "--visits", "2",
                             "--shape", "4", "5", "6", "--seed", "7", "--missing-fraction", "0.3"])
    assert (sim.subjects, sim.visits, sim.shape, sim.seed, sim.missing_fraction) == (
        5, 2, [4, 5, 6], 7, 0.3)


@pytest.mark.parametrize("bad", [["fit", "s.json", "--max-memory-mb", "0"],
                                 ["simulate", "o", "--missing-fraction", "1.5"],
                                 ["simulate", "o", "--shape", "1", "2"], []])
def test_parser_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit) as caught:
        get_parser().parse_args(bad)
    assert caught.value.code == 2


def test_cli_module_imports_neither_mpi4py_nor_h5py():
    code = ("import sys, mpiblmm.cli, mpiblmm.manpage; mpiblmm.cli.get_parser(); "
            "sys.exit(sorted({'mpi4py', 'h5py', 'numpy'} & set(sys.modules)) != [])")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_version(mpiblmm_command):
    result = run_cli(mpiblmm_command, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mpiblmm {__version__}" == "mpiblmm 0.1.0"


def test_blas_threads_are_pinned_unless_set():
    environ = {"OMP_NUM_THREADS": "4"}
    pin_blas_threads(environ)
    assert environ == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "1",
                       "MKL_NUM_THREADS": "1"}


def test_a_missing_module_is_a_clear_user_error(monkeypatch):
    monkeypatch.setitem(DISPATCH, "fit", ("mpiblmm.no_such_module", "run_fit"))
    with pytest.raises(UserError, match="not available in this version"):
        resolve_handler("fit")


def test_env_handler_resolves():
    assert resolve_handler("env").__name__ == "run_env"


def test_missing_spec_is_one_line_and_exit_2(mpiblmm_command, tmp_path):
    result = run_cli(mpiblmm_command, "fit", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert result.stderr == f"mpiblmm: error: SPEC file not found: {tmp_path / 'nope.json'}\n"


def test_env_reports_a_healthy_single_process(mpiblmm_command):
    result = run_cli(mpiblmm_command, "env")
    assert result.returncode == 0, result.stdout + result.stderr
    for key in ("MPI library", "ranks", "h5py", "HDF5", "h5py MPI", "numpy", "BLAS"):
        assert f"\n{key} " in result.stdout
    assert "status" in result.stdout and result.stdout.rstrip().endswith("OK")


def test_env_detects_launcher_mismatch(mpiblmm_command):
    """Simulates a foreign launcher that started 3 processes: MPI sees 1, so env must fail."""
    import os

    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="3")
    result = run_cli(mpiblmm_command, "env", env=env)
    assert result.returncode != 0
    assert "launcher started 3 processes" in result.stdout
    assert "different MPI" in result.stdout
    fit = run_cli(mpiblmm_command, "fit", "spec.json", env=env)
    assert fit.returncode != 0 and "different MPI" in fit.stderr


@pytest.mark.spawns_mpiexec
def test_env_under_three_ranks_reports_three_ranks_and_parallel_hdf5(run_mpi, mpiblmm_command):
    job = run_mpi(3, [*mpiblmm_command, "env"], timeout=90)
    assert not job.timed_out
    assert job.returncode == 0, job.stdout + job.stderr
    assert "\nranks " in job.stdout and " 3 on " in job.stdout
    assert "h5py MPI         yes" in job.stdout or "yes" in job.stdout.split("h5py MPI")[1][:20]
    assert job.stdout.count("status") == 1  # printed once, by rank 0


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("n_ranks", [1, 2, 3])
def test_missing_spec_under_mpi_prints_once_and_exits_2(run_mpi, mpiblmm_command, tmp_path,
                                                        n_ranks):
    job = run_mpi(n_ranks, [*mpiblmm_command, "fit", str(tmp_path / "nope.json")], timeout=60)
    assert not job.timed_out
    assert job.returncode == 2, job.stderr
    lines = [line for line in job.stderr.splitlines() if line.startswith("mpiblmm: error:")]
    assert lines == [f"mpiblmm: error: SPEC file not found: {tmp_path / 'nope.json'}"]
    assert "Traceback" not in job.stderr
