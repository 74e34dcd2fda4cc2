"""The command line: parser, version, dispatch, user errors and `mpiblmm env`.

Tests marked ``spawns_mpiexec`` launch their own MPI job (with a timeout) and so belong to
the serial suite.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    environ = {}
    pin_blas_threads(environ)
    assert environ == dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS"), "1")
    # OMP_NUM_THREADS is the user's choice for the libraries' own variables left unset
    environ = {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "2"}
    pin_blas_threads(environ)
    assert environ == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4",
                       "MKL_NUM_THREADS": "2"}
    for odd in ("0", "-1", "abc", "2.0", "0x2", "", "99999999"):   # not a choice: 1
        environ = {"OMP_NUM_THREADS": odd}
        pin_blas_threads(environ)
        assert environ["OPENBLAS_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "1", odd


def test_omp_num_threads_reaches_the_blas_of_a_rank(mpiblmm_command):
    """Checked through `mpiblmm env`, which reports the BLAS threads numpy's library runs."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    result = run_cli(mpiblmm_command, "env", env=dict(env, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"BLAS .*\(2 threads\)", result.stdout), result.stdout


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


# --------------------------------------------------------------------------- user errors
def _lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


#: Bad command lines: argv and what the one error line says (argparse's words, after the
#: subcommand); the spec need not exist, the arguments are refused first.
BAD_COMMAND_LINES = {
    "chunk voxels zero": (["fit", "spec.json", "--chunk-voxels", "0"],
                          "fit: argument --chunk-voxels: expected a number of at least 1, got 0"),
    "grace seconds zero": (["fit", "spec.json", "--grace-seconds", "0"],
                           "fit: argument --grace-seconds: expected a positive number, got 0"),
    "resume and overwrite": (["fit", "spec.json", "--resume", "--overwrite"],
                             "fit: argument --overwrite: not allowed with argument --resume"),
    "no spec": (["fit"], "fit: the following arguments are required: SPEC"),
    "unknown command": (["fitt"], "argument COMMAND: invalid choice: 'fitt'"),
    "simulate bad fraction": (["simulate", "out", "--missing-fraction", "2"],
                              "simulate: argument --missing-fraction: expected a fraction"),
    # A fault audit: 1e300 s of grace overflowed signal.setitimer at the SIGTERM (a traceback).
    "grace seconds too large": (["fit", "spec.json", "--grace-seconds", "1e300"],
                                "fit: argument --grace-seconds: expected at most 604800 seconds "
                                "(one week), got 1e300"),
    "progress interval too large": (["fit", "spec.json", "--progress-interval", "1e10"],
                                    "fit: argument --progress-interval: expected at most 604800 "
                                    "seconds (one week), got 1e10"),
    "memory budget too large": (["fit", "spec.json", "--max-memory-mb", "1" + "0" * 400],
                                "fit: argument --max-memory-mb: expected at most 1073741824 MiB "
                                "(1 PiB) per rank, got 1000000000000000000000000000000000000..."),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMAND_LINES))
def test_a_bad_command_line_is_one_line_and_exit_2(case, mpiblmm_command, tmp_path):
    argv, expected = BAD_COMMAND_LINES[case]
    result = subprocess.run([*mpiblmm_command, *argv], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"mpiblmm: error: {expected}"), result.stderr
    assert lines[0].endswith("--help`)") and "usage:" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the simulate folder


def test_help_still_prints_the_usage(mpiblmm_command):
    result = run_cli(mpiblmm_command, "fit", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: mpiblmm fit") and "--chunk-voxels" in result.stdout


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("case", ["chunk voxels zero", "grace seconds zero",
                                  "resume and overwrite"])
def test_a_bad_command_line_under_three_ranks_is_printed_once(run_mpi, mpiblmm_command,
                                                               tmp_path, case):
    argv, expected = BAD_COMMAND_LINES[case]
    job = run_mpi(3, [*mpiblmm_command, *argv], timeout=60, cwd=tmp_path)
    assert not job.timed_out
    assert job.returncode == 2, job.stderr
    lines = _lines(job.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"mpiblmm: error: {expected}"), job.stderr
    assert "usage:" not in job.stderr and "Traceback" not in job.stderr


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("argv, first", [(["--help"], "usage: mpiblmm "),
                                         (["fit", "--help"], "usage: mpiblmm fit "),
                                         (["--version"], "mpiblmm ")])
def test_help_and_version_under_three_ranks_are_printed_once(run_mpi, mpiblmm_command,
                                                             tmp_path, argv, first):
    """argparse printed them once per process (three usages at -n 3)."""
    job = run_mpi(3, [*mpiblmm_command, *argv], timeout=60, cwd=tmp_path)
    assert not job.timed_out and job.returncode == 0, job.stderr
    assert job.stdout.startswith(first) and job.stdout.count(first) == 1, job.stdout
    assert job.stderr == ""


def test_launcher_rank_is_read_from_the_launchers_variables(monkeypatch):
    from mpiblmm.cli import LAUNCHER_RANK_VARIABLES, launcher_rank

    for name in LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launcher_rank() is None
    for name in LAUNCHER_RANK_VARIABLES:
        monkeypatch.setenv(name, "2")
        assert launcher_rank() == 2
        monkeypatch.delenv(name)


def test_a_folder_given_as_spec_is_named_a_directory(mpiblmm_command, tmp_path):
    for command in ("fit", "check"):
        result = run_cli(mpiblmm_command, command, str(tmp_path))
        assert result.returncode == 2
        assert result.stderr == f"mpiblmm: error: SPEC is a directory, not a file: {tmp_path}\n"


@pytest.mark.parametrize("key", ["images", "X"])
def test_a_folder_given_as_a_file_is_named_a_directory(mpiblmm_command, tmp_path, key):
    """`fit` used to say 'file not found' where `check` said 'Is a directory'."""
    (tmp_path / "images").mkdir()
    (tmp_path / "list.txt").write_text("a.nii\n")
    spec = tmp_path / "spec.json"
    raw = {"images": "list.txt", "X": "X.csv", "random": [{"name": "subject", "factor": "f.csv"}]}
    raw[key] = "images"
    spec.write_text(json.dumps(raw))
    expected = f"mpiblmm: error: {spec}: {key}: is a directory, not a file: {tmp_path / 'images'}"
    for command in ("fit", "check") if key == "images" else ("check",):
        result = run_cli(mpiblmm_command, command, str(spec))
        assert result.returncode == 2, result.stderr
        errors = [line for line in _lines(result.stderr) if line.startswith("mpiblmm: error:")]
        assert errors == [expected], result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def _bad_output_folders(tmp_path):
    """OUT_DIR values `simulate` cannot write into, and the start of the expected message."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "has_images_file").mkdir()
    (tmp_path / "has_images_file" / "images").write_text("x")
    cases = {
        "a file": (afile, f"OUT_DIR: {afile} exists and is not a folder"),
        "under a file": (afile / "sub",
                         f"OUT_DIR: cannot create the folder {afile / 'sub'} (Not a directory)"),
        "images is a file": (tmp_path / "has_images_file",
                             f"OUT_DIR: {tmp_path / 'has_images_file' / 'images'} exists and is "
                             "not a folder"),
    }
    if Path("/proc/self").is_dir():
        cases["under /proc"] = (Path("/proc/mpiblmm-test"),
                                "OUT_DIR: cannot create the folder /proc/mpiblmm-test (")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):  # root may write anywhere
        cases["read-only"] = (read_only, f"OUT_DIR: cannot write into the folder {read_only}")
    return cases


def test_simulate_into_a_bad_folder_is_one_line_and_exit_2(mpiblmm_command, tmp_path):
    for name, (out, expected) in _bad_output_folders(tmp_path).items():
        result = run_cli(mpiblmm_command, "simulate", str(out), "--subjects", "4", "--visits",
                         "2", "--shape", "2", "2", "2")
        assert result.returncode == 2, (name, result.stderr)
        lines = _lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"mpiblmm: error: {expected}"), (
            name, result.stderr)


@pytest.mark.spawns_mpiexec
def test_simulate_errors_under_three_ranks_are_printed_once(run_mpi, mpiblmm_command, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, expected in (
            ([str(afile)], f"mpiblmm: error: OUT_DIR: {afile} exists and is not a folder"),
            ([str(tmp_path / "out"), "--slopes", "site"],
             "mpiblmm: error: --slopes: no factor 'site' in this study (factors: subject; or "
             "'none')")):
        job = run_mpi(3, [*mpiblmm_command, "simulate", *argv, "--subjects", "4", "--visits",
                          "2", "--shape", "2", "2", "2"], timeout=90)
        assert not job.timed_out
        assert job.returncode == 2, job.stderr
        assert _lines(job.stderr) == [expected], job.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- long names
@pytest.fixture(scope="module")
def formula_study(tmp_path_factory):
    from mpiblmm.study import write_study

    folder = tmp_path_factory.mktemp("names")
    write_study(folder, subjects=4, visits=3, shape=(2, 2, 2), seed=2, form="formula")
    return folder


def _check_and_fit_refuse(mpiblmm_command, spec_path, expected):
    """`check` and `fit` both end with the one line ``expected`` and exit 2, before any work."""
    for command in ("check", "fit"):
        result = run_cli(mpiblmm_command, command, str(spec_path), timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        errors = [line for line in _lines(result.stderr) if line.startswith("mpiblmm: error:")]
        assert errors == [expected], result.stderr
        assert "Traceback" not in result.stderr
    assert not (spec_path.parent / "out_long").exists()


def test_a_contrast_name_too_long_for_a_file_name_is_refused(formula_study, mpiblmm_command):
    """Its maps (con_<name>_<stat>.nii.gz) could not be written: `fit` used to fit every voxel
    and fail at the end (exit 4)."""
    spec = json.loads((formula_study / "spec.json").read_text())
    spec.update(output="out_long", contrasts=[{"name": "a" * 300, "weights": {"time": 1}}])
    path = formula_study / "long_contrast.json"
    path.write_text(json.dumps(spec))
    _check_and_fit_refuse(mpiblmm_command, path, (
        f'mpiblmm: error: {path}: contrasts[0] ("{"a" * 37}..."): name too long: 300 bytes, at '
        "most 217 (it names the map files, e.g. con_<name>_neglog10p.nii.gz, and a file name "
        "has at most 255 bytes)"))


def test_a_default_contrast_named_by_a_long_column_is_refused(formula_study, mpiblmm_command):
    """Without "contrasts" the formula form names a T contrast by each coefficient: a
    covariate column with a very long name would make a map name too long."""
    spec = json.loads((formula_study / "spec.json").read_text())
    spec.pop("contrasts", None)
    long = "b" * 230
    table = (formula_study / spec["covariates"]).read_text().replace("time", long)
    (formula_study / "long_column.csv").write_text(table)
    spec.update(output="out_long", covariates="long_column.csv",
                formula=spec["formula"].replace("time", long))
    path = formula_study / "long_column.json"
    path.write_text(json.dumps(spec))
    _check_and_fit_refuse(mpiblmm_command, path, (
        f"mpiblmm: error: {path}: formula: the default contrast of '{'b' * 37}...': name too "
        "long: 230 bytes, at most 217 (it names the map files, e.g. "
        "con_<name>_neglog10p.nii.gz, and a file name has at most 255 bytes); rename the "
        'column, or give "contrasts" with shorter names'))
    spec["contrasts"] = [{"name": "slope", "weights": {long: 1}}]  # explicit: fine
    path.write_text(json.dumps(spec))
    result = run_cli(mpiblmm_command, "check", str(path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- simulate's folder
def _simulate_args(out):
    return get_parser().parse_args(["simulate", str(out), "--subjects", "4"])


def test_simulate_refuses_a_folder_that_holds_files(tmp_path):
    """A fault audit simulated 9 images into a study of 30: images.txt listed the 9 and the
    other 21 stayed, silently.  New and empty folders (also one with an empty images/, which
    another rank may have made) are taken."""
    from mpiblmm.cli import check_inputs_exist

    for name, make in (("new", lambda f: None), ("empty", lambda f: f.mkdir()),
                       ("empty images", lambda f: (f / "images").mkdir(parents=True))):
        folder = tmp_path / name
        make(folder)
        check_inputs_exist(_simulate_args(folder))
        assert sorted(p.name for p in folder.iterdir()) == ["images"]
    for name, make in (("a file", lambda f: (f / "spec.json").write_text("{}")),
                       ("old images", lambda f: (f / "images" / "obs_00000.nii.gz").write_text("")),
                       ("a folder", lambda f: (f / "results").mkdir())):
        folder = tmp_path / name.replace(" ", "_")
        (folder / "images").mkdir(parents=True)
        make(folder)
        before = sorted(str(p) for p in folder.rglob("*"))
        with pytest.raises(UserError) as info:
            check_inputs_exist(_simulate_args(folder))
        assert str(info.value) == (f"OUT_DIR: {folder} is not empty: choose a new or empty folder "
                                   "(simulate writes a whole study and would mix it with the "
                                   "files already there)"), name
        assert sorted(str(p) for p in folder.rglob("*")) == before    # nothing written


def test_simulate_into_an_earlier_study_is_one_line_and_exit_2(mpiblmm_command, tmp_path):
    study = tmp_path / "study"
    argv = ["simulate", str(study), "--subjects", "4", "--visits", "2", "--shape", "2", "2", "2"]
    assert run_cli(mpiblmm_command, *argv).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in study.rglob("*")}
    result = run_cli(mpiblmm_command, *argv[:3], "3")
    assert result.returncode == 2, result.stderr
    assert _lines(result.stderr) == [f"mpiblmm: error: OUT_DIR: {study} is not empty: choose a "
                                     "new or empty folder (simulate writes a whole study and "
                                     "would mix it with the files already there)"]
    assert {p: p.stat().st_mtime_ns for p in study.rglob("*")} == before
