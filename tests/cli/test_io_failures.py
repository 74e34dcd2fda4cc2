"""I/O failures end the job within seconds as one line, never a hang or a traceback.

A full disk is a small tmpfs mounted for the test (the tests run as root; where mounting is
not allowed the test is skipped and says why): it fills up while the images are packed,
while results.h5 is created, and while the maps are exported.  Then the same folder
read-only, a packed input whose affine holds NaN, and the export of a corrupt file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _run_job, mpiexec_command

from .studies import read_results


def _launch(n: int, argv: list[str]) -> list[str]:
    return [*mpiexec_command(), os.environ.get("MPIEXEC_NUMPROC_FLAG", "-n"), str(n), *argv]


def _mpiblmm() -> list[str]:
    script = Path(sys.prefix, "bin", "mpiblmm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpiblmm"]


def _errors(stderr: str) -> list[str]:
    """stderr lines of mpiblmm (not MPICH's own report of an MPI_Abort)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Abort(")]


def _pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / 4096)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small study and its complete output (for the file sizes and a results file)."""
    folder = tmp_path_factory.mktemp("iofail")
    run = _run_job(_launch(1, [*_mpiblmm(), "simulate", str(folder / "study"), "--subjects",
                               "10", "--visits", "3", "--shape", "8", "6", "4", "--seed", "2"]),
                   120, None, None)
    assert run.returncode == 0, run.stderr
    spec = folder / "study" / "spec.json"
    run = _run_job(_launch(1, [*_mpiblmm(), "fit", str(spec), "-o", str(folder / "out"), "-q"]),
                   300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    return spec, folder / "out"


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_in_pages) -> a folder on a tmpfs of that size; unmounted at the end."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(pages: int, options: str = "") -> Path:
        opts = f"size={pages * 4}k" + (f",{options}" if options else "")
        action = ["-o", f"remount,{opts}"] if mounted else ["-t", "tmpfs", "-o", opts, "tmpfs"]
        run = subprocess.run(["mount", *action, str(where)], capture_output=True, text=True)
        if run.returncode != 0:
            reason = f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode})"
            print(f"SKIPPED: {reason}")
            pytest.skip(reason)
        mounted.append(True)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fails_fast_with_one_line(run, says: str) -> str:
    lines = _errors(run.stderr)
    assert not run.timed_out and run.seconds < 30, f"took {run.seconds:.0f} s"
    assert run.returncode == 4, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("mpiblmm: error: rank ") and says in lines[0], lines[0]
    assert "No space left on device" in lines[0] and "Traceback" not in run.stderr
    return lines[0]


@pytest.mark.spawns_mpiexec
def test_full_disk_at_2_ranks_ends_within_seconds_with_one_line(study, small_disk):
    spec, complete = study
    packed, results = _pages(complete / "packed.h5"), _pages(complete / "results.h5")

    def fit(folder: Path, ranks: int = 2):
        return _run_job(_launch(ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(folder),
                                        "-q"]), 120, None, None)

    disk = small_disk(packed // 2)                               # full while packing
    _fails_fast_with_one_line(fit(disk / "a"), "packed.h5")
    assert not (disk / "a" / "mpiblmm.lock").exists()            # released by the abort

    disk = small_disk(packed + 2 + results // 2)                 # full while creating results
    _fails_fast_with_one_line(fit(disk / "b"), "results.h5")
    assert not (disk / "b" / "mpiblmm.lock").exists()
    shutil.rmtree(disk / "b")
    _fails_fast_with_one_line(fit(disk / "b", ranks=1), "results.h5")  # serial HDF5 too
    # Space freed: --resume starts the fit anew there (the half-created results.h5 holds no
    # fitted voxel) rather than refusing a file that is not readable HDF5.
    shutil.rmtree(disk / "a")
    small_disk(packed + results + 60)
    run = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec), "-o", str(disk / "b"), "-q",
                               "--resume"]), 120, None, None)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert read_results(disk / "b" / "results.h5")["@"]["complete"]

    # Full while exporting the maps: the results are complete, no temporary map is left,
    # and the export succeeds once there is room.
    shutil.rmtree(disk / "b")
    disk = small_disk(packed + results + 4 + 6)
    run = fit(disk / "c")
    line = _fails_fast_with_one_line(run, "nifti")
    assert not line.startswith("mpiblmm: error: rank 0: rank"), line
    assert read_results(disk / "c" / "results.h5")["@"]["complete"]
    assert not [p for p in (disk / "c" / "nifti").iterdir() if ".tmp" in p.name]
    small_disk(packed + results + 60)
    again = _run_job(_launch(2, [*_mpiblmm(), "export", str(disk / "c" / "results.h5")]),
                     120, None, None)
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (disk / "c" / "nifti").iterdir())
    assert "maps.json" in names and not [n for n in names if ".tmp" in n]
    assert len(names) == len(json.loads((disk / "c" / "nifti" / "maps.json").read_text())) + 1

    # The same folder read-only: one line, exit 2, nothing written.
    small_disk(packed + results + 60, "ro")
    for args in (["fit", str(spec), "-o", str(disk / "c"), "--resume"],
                 ["fit", str(spec), "-o", str(disk / "c"), "--overwrite"],
                 ["export", str(disk / "c" / "results.h5")]):
        run = _run_job(_launch(2, [*_mpiblmm(), *args]), 120, None, None)
        lines = _errors(run.stderr)
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert "Traceback" not in run.stderr and "disk/c" in lines[0], lines[0]


@pytest.mark.spawns_mpiexec
def test_nan_affine_in_a_packed_input_is_one_line(study, tmp_path):
    import h5py

    spec, complete = study
    packed = tmp_path / "packed.h5"
    packed.write_bytes((complete / "packed.h5").read_bytes())
    with h5py.File(packed, "r+") as f:
        affine = f["Y"].attrs["affine"]
        affine[0, 0] = float("nan")
        f["Y"].attrs["affine"] = affine
    changed = json.loads(spec.read_text())
    changed["images"] = {"h5": str(packed), "dataset": "/Y"}
    (spec.parent / "nan_affine.json").write_text(json.dumps(changed))
    run = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec.parent / "nan_affine.json"), "-o",
                               str(tmp_path / "out")]), 120, None, None)
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "affine" in lines[0] and "NaN" in lines[0] and str(packed) in lines[0]
    assert not (tmp_path / "out" / "results.h5").exists()

    # a space attribute the maps cannot be written from: refused before the fit too (it
    # was fitted in full, then the export failed, blaming results.h5; surface audit)
    with h5py.File(packed, "r+") as f:
        f["Y"].attrs["affine"] = [[float(i == j) for j in range(4)] for i in range(4)]
        f.attrs["space"] = '{"format": "nifti", "qform_code": 9}'
    for command in ("check", "fit"):
        run = _run_job(_launch(2, [*_mpiblmm(), command, str(spec.parent / "nan_affine.json"),
                                   *(["-o", str(tmp_path / "out")] if command == "fit" else [])]),
                       120, None, None)
        lines = _errors(run.stderr)
        assert run.returncode == 2 and len(lines) == (2 if command == "check" else 1), \
            run.stderr                                        # (check: and its count line)
        assert lines[0] == (f"mpiblmm: error: {packed}: attribute 'space' (the input's "
                            f"format, for the maps): qform_code must be 0-5, got 9"), lines[0]
    assert not (tmp_path / "out" / "results.h5").exists()


@pytest.mark.spawns_mpiexec
def test_export_of_a_corrupt_or_truncated_file_is_one_line(study, tmp_path):
    _, complete = study
    whole = (complete / "results.h5").read_bytes()
    cases = {"garbage.h5": b"\x89HDF\r\n\x1a\n" + b"\0" * 600,
             "truncated.h5": whole[: len(whole) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        run = _run_job(_launch(2, [*_mpiblmm(), "export", str(tmp_path / name),
                                   str(tmp_path / f"maps_{name}")]), 120, None, None)
        lines = _errors(run.stderr)
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert name in lines[0] and "Traceback" not in run.stderr, lines[0]
        folder = tmp_path / f"maps_{name}"
        assert not folder.exists() or not [p for p in folder.iterdir() if ".tmp" in p.name]


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("ranks", [1, 3])
def test_an_io_error_on_one_rank_while_the_others_wait_ends_the_job(ranks, tmp_path):
    """The mechanism itself: the last rank's write fails while the others already wait in a
    collective that can never complete; the job must end at once with one line, and the
    abort hook (the output lock's release) must run."""
    marker = tmp_path / "hook-ran"
    code = f"""
import errno, sys
from mpi4py import MPI
from mpiblmm.parallel import at_abort, no_hang
comm = MPI.COMM_WORLD
at_abort(lambda: open({str(marker)!r}, "w").close())
with no_hang(comm, "/data/results.h5", "writing results"):
    if comm.Get_rank() == comm.Get_size() - 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    comm.Barrier()
print("never here", flush=True)
"""
    run = _run_job(_launch(ranks, [sys.executable, "-c", code]), 60, None, None)
    lines = _errors(run.stderr)
    assert not run.timed_out and run.seconds < 20, run.seconds
    assert run.returncode == 4 and "never here" not in run.stdout, run.stderr
    assert lines == [f"mpiblmm: error: rank {ranks - 1}: /data/results.h5: No space left on "
                     f"device (while writing results)"], run.stderr
    assert marker.exists()


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("ranks", [2, 3])
def test_an_io_error_on_every_rank_at_once_is_still_one_line(ranks, tmp_path):
    """Every rank fails at the same collective (a packed.h5 removed before the ranks open it,
    as seen when the output folder was deleted during a fit): one line, not one per rank;
    and ROMIO's message is reduced to its words (`File does not exist`)."""
    code = """
from mpi4py import MPI
from mpiblmm.parallel import no_hang
comm = MPI.COMM_WORLD
with no_hang(comm, "/data/packed.h5", "opening the packed images"):
    raise OSError("Unable to open file (MPI_File_open failed: MPI error string is 'File does "
                  "not exist, error stack:\\nADIOI_UFS_OPEN(37): File /data/packed.h5 does "
                  "not exist')")
print("never here", flush=True)
"""
    run = _run_job(_launch(ranks, [sys.executable, "-c", code]), 60, None, None)
    lines = _errors(run.stderr)
    assert not run.timed_out and run.seconds < 20, run.seconds
    assert run.returncode == 4 and "never here" not in run.stdout, run.stderr
    assert lines == ["mpiblmm: error: rank 0: /data/packed.h5: File does not exist (while "
                     "opening the packed images)"], run.stderr
