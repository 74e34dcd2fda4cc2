"""What ``fit --overwrite`` and ``export`` leave in a maps folder, end to end at 2 ranks.

- A fit whose export failed at a map (a full disk: a small tmpfs, mounted as in
  test_io_failures.py; skipped where mounting is not allowed) leaves no ``maps.json``; a
  ``fit --overwrite`` with a model without contrasts must still remove its contrast maps.
- ``export A/results.h5 B/nifti`` into the maps of another fit, or into a folder whose lock a
  running job holds, is one line and exit 2, and leaves that folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _run_job

from .studies import read_results
from .test_io_failures import _errors, _launch, _mpiblmm, _pages, small_disk  # noqa: F401


def _run(ranks: int, *args: str, timeout: float = 120):
    return _run_job(_launch(ranks, [*_mpiblmm(), *args]), timeout, None, None)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small study (as test_io_failures.py's) and its complete output."""
    folder = tmp_path_factory.mktemp("guards")
    run = _run(1, "simulate", str(folder / "study"), "--subjects", "10", "--visits", "3",
               "--shape", "8", "6", "4", "--seed", "2")
    assert run.returncode == 0, run.stderr
    spec = folder / "study" / "spec.json"
    run = _run(1, "fit", str(spec), "-o", str(folder / "out"), "-q", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return spec, folder / "out"


def _maps(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".nii.gz")}


@pytest.mark.spawns_mpiexec
def test_overwrite_after_an_export_that_failed_at_a_map_leaves_no_old_map(fitted, small_disk):
    spec, complete = fitted
    nocon = spec.parent / "nocon.json"
    nocon.write_text(json.dumps(dict(json.loads(spec.read_text()), contrasts=[])))
    packed, results = _pages(complete / "packed.h5"), _pages(complete / "results.h5")
    n_maps = len(_maps(complete / "nifti"))
    for spare in (12, 16, 20, 26, 34):  # room for the first maps, not for all
        disk = small_disk(packed + results + spare)
        shutil.rmtree(disk / "o", ignore_errors=True)
        run = _run(2, "fit", str(spec), "-o", str(disk / "o"), "-q")
        if run.returncode == 4 and any(n.startswith("con_") for n in _maps(disk / "o" / "nifti")):
            break
        assert run.returncode in (0, 4), run.stderr
    else:
        pytest.fail("no disk size made the export fail after a contrast map")
    assert 0 < len(_maps(disk / "o" / "nifti")) < n_maps
    assert not (disk / "o" / "nifti" / "maps.json").exists()
    # the line says the results are complete and how to get the maps (a fault audit)
    (line,) = _errors(run.stderr)
    assert "No space left on device (while writing maps; " in line, line
    assert f"{disk / 'o' / 'results.h5'} is complete: free space or fix the folder, then run " \
        f"`mpiblmm export {disk / 'o' / 'results.h5'}`)" in line, line

    small_disk(packed + results + 200)
    run = _run(2, "fit", str(nocon), "-o", str(disk / "o"), "--overwrite", "-q")
    assert run.returncode == 0, run.stderr
    names = {p.name for p in (disk / "o" / "nifti").iterdir()}
    index = json.loads((disk / "o" / "nifti" / "maps.json").read_text())
    assert not [n for n in names if n.startswith("con_")], names   # none of the old model
    assert names == set(index) | {"maps.json"}
    assert read_results(disk / "o" / "results.h5")["@"]["maps_complete"]


@pytest.mark.spawns_mpiexec
def test_export_refuses_another_fits_maps_and_a_locked_folder(fitted, tmp_path):
    spec, complete = fitted
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        shutil.copy(complete / "results.h5", folder / "results.h5")
        shutil.copytree(complete / "nifti", folder / "nifti")
    stamp = {p.name: p.stat().st_mtime_ns for p in (b / "nifti").iterdir()}

    run = _run(2, "export", str(a / "results.h5"), str(b / "nifti"))
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "maps folder of another fit" in lines[0] and str(b / "results.h5") in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in (b / "nifti").iterdir()} == stamp
    assert sorted(os.listdir(b)) == ["nifti", "results.h5"]

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a fit running in b/ (its lock, as fit writes it)
        (b / "mpiblmm.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "start": time.time(),
             "command": "mpiblmm fit spec.json"}) + "\n")
        run = _run(2, "export", str(b / "results.h5"))
        lines = _errors(run.stderr)
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert "another mpiblmm job is writing" in lines[0] and f"PID {holder.pid}" in lines[0]
        assert {p.name: p.stat().st_mtime_ns for p in (b / "nifti").iterdir()} == stamp
    finally:
        holder.kill()
        holder.wait()
    (b / "mpiblmm.lock").unlink()

    for args in ([str(a / "results.h5")], [str(a / "results.h5"), str(tmp_path / "plain")],
                 [str(b / "results.h5"), "--fdr"]):
        run = _run(2, "export", *args)
        assert run.returncode == 0, run.stderr
    assert (b / "nifti" / "con_age_q.nii.gz").is_file()
    assert not [p for p in tmp_path.rglob("mpiblmm.lock*")]   # every export released its lock
    for folder in (a / "nifti", tmp_path / "plain", b / "nifti"):
        assert {p.name for p in folder.iterdir()} == \
            set(json.loads((folder / "maps.json").read_text())) | {"maps.json"}
    assert read_results(b / "results.h5")["@"]["maps_complete"]


@pytest.mark.spawns_mpiexec
def test_export_of_a_packed_input_or_a_foreign_file_says_what_it_is(fitted, tmp_path):
    """A fault audit: `export results/packed.h5` was told its folder held another fit's maps,
    and a foreign HDF5 file was "incomplete: re-run fit with --resume" (export and report)."""
    import h5py

    _, complete = fitted
    run = _run(1, "export", str(complete / "packed.h5"))
    assert run.returncode == 2, run.stderr
    assert _errors(run.stderr) == [
        f"mpiblmm: error: {complete / 'packed.h5'}: not a results file: it is a fit's packed "
        "input (the results are in results.h5 of the fit's output folder)"]
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1.0]
    for command in (["export", str(tmp_path / "other.h5"), str(tmp_path / "maps")],
                    ["report", str(tmp_path / "other.h5")]):
        run = _run(1, *command)
        assert run.returncode == 2, run.stderr
        assert _errors(run.stderr) == [
            f"mpiblmm: error: {tmp_path / 'other.h5'}: not an mpiblmm results file (no "
            "attribute format = 'mpiblmm-results-1')"], run.stderr


@pytest.mark.spawns_mpiexec
def test_a_refused_export_leaves_no_folder_it_made(fitted, tmp_path):
    """An incomplete results file is refused; the folders the export made for its maps (a
    fault audit: an empty one was left) are removed, an existing folder stays."""
    import h5py

    _, complete = fitted
    results = tmp_path / "results.h5"
    shutil.copy(complete / "results.h5", results)
    with h5py.File(results, "a") as f:
        f.attrs["complete"] = False
    for ranks in (1, 2):
        run = _run(ranks, "export", str(results), str(tmp_path / "new" / "maps"))
        assert run.returncode == 2, run.stderr
        assert "the results are incomplete" in run.stderr
        assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    run = _run(1, "export", str(results), str(tmp_path / "there"))
    assert run.returncode == 2, run.stderr
    assert (tmp_path / "there").is_dir() and not any((tmp_path / "there").iterdir())
