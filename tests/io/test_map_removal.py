"""Which maps go, and which folders an export may write into: the maps of an export that was
interrupted before its ``maps.json`` are still found (``maps.pending.json``) and removed by
``fit --overwrite`` and by the next export, never a file no export wrote; an export refuses
the ``nifti/`` folder of another fit and a folder whose lock another job holds; one process,
no MPI."""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import h5py  # noqa: E402  runtime dependencies: a missing one must fail, not skip

from mpiblmm.errors import UserError  # noqa: E402
from mpiblmm.io import export  # noqa: E402
from mpiblmm.io.export import (MAPS_INDEX, MAPS_PENDING, export_nifti, forget_maps,  # noqa: E402
                               listed_maps, maps_state, run_export)
from mpiblmm.io.lock import LOCK_NAME, acquire_lock  # noqa: E402
from mpiblmm.io.results import ContrastLayout, ResultsLayout, create_results  # noqa: E402
from mpiblmm.parallel import IOFailure  # noqa: E402
from mpiblmm.report.data import load_report_data  # noqa: E402
from tests.io.helpers import AFFINE, GRID  # noqa: E402

#: Files in a maps folder that no export wrote: they must survive every removal.
THEIRS = {"mine.nii.gz": b"x", "notes.txt": b"x", "maps.json.bak": b"x"}


def _results(path: Path, contrasts=("b",)) -> Path:
    """A complete results file of 6 voxels with T contrasts ``contrasts``."""
    lay = ResultsLayout(n_voxels=6, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=tuple(ContrastLayout(c, "T", ((0.0, 1.0),)) for c in contrasts),
                        method="REML", grid_shape=GRID, affine=tuple(map(tuple, AFFINE.tolist())))
    vox = np.column_stack(np.unravel_index(np.arange(6) * 7, GRID)).astype(np.int32)
    w = create_results(path, lay, vox, input_hash="abc")
    w.write(0, 6, {"status": np.zeros(6, dtype=np.uint8)})
    w.finish()
    return path


def _fail_at(monkeypatch, k: int, exc: BaseException) -> None:
    """Make the export's ``k``-th map write (from 0) raise ``exc``, as a full disk or a kill."""
    real, count = export.write_map, [0]

    def write_map(target, *args, **kwargs):
        count[0] += 1
        if count[0] > k:
            raise exc
        return real(target, *args, **kwargs)

    monkeypatch.setattr(export, "write_map", write_map)


def _map_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".nii.gz")}


def _theirs(folder: Path) -> None:
    for name, data in THEIRS.items():
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 KeyboardInterrupt()])  # a failed write, a kill (no clean-up)
def test_overwrite_removes_the_maps_of_an_export_interrupted_at_a_map(tmp_path, monkeypatch, exc):
    """The audit's case: the first export of a fit stops at its 6th map (disk full, or the
    job killed), so there is no maps.json; --overwrite must still remove those 5 maps."""
    from mpiblmm.pipeline import _forget_maps

    path = _results(tmp_path / "results.h5", contrasts=("age", "sex"))
    out = tmp_path / "nifti"
    out.mkdir()
    _theirs(out)
    _fail_at(monkeypatch, 5, exc)
    with pytest.raises(IOFailure if isinstance(exc, OSError) else KeyboardInterrupt):
        export_nifti(path)
    assert len(_map_files(out) - set(THEIRS)) == 5 and not (out / MAPS_INDEX).exists()
    assert maps_state(path) == (True, False)
    pending = json.loads((out / MAPS_PENDING).read_text())
    assert _map_files(out) - set(THEIRS) <= set(pending) == listed_maps(out)
    assert {"con_age_t.nii.gz", "con_sex_z.nii.gz", "beta.nii.gz"} <= set(pending)

    path.unlink()
    _forget_maps(path)  # fit --overwrite, once it removed the old results file
    assert {p.name for p in out.iterdir()} == set(THEIRS)
    assert all((out / n).read_bytes() == d for n, d in THEIRS.items())
    _forget_maps(path)  # nothing left to remove: no error


def test_the_next_export_removes_what_an_interrupted_one_and_the_one_before_wrote(
        tmp_path, monkeypatch):
    """An export killed after the index was removed must not lose the earlier index's q
    maps: the pending list carries them, and the next complete export removes them."""
    path = _results(tmp_path / "results.h5")
    out = tmp_path / "nifti"
    export_nifti(path, fdr=True)
    assert (out / "con_b_q.nii.gz").is_file() and not (out / MAPS_PENDING).exists()
    _theirs(out)
    with monkeypatch.context() as patch:
        _fail_at(patch, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            export_nifti(path)  # without --fdr, killed at its third map
    assert not (out / MAPS_INDEX).exists() and "con_b_q.nii.gz" in listed_maps(out)
    export_nifti(path)
    index = json.loads((out / MAPS_INDEX).read_text())
    assert not (out / "con_b_q.nii.gz").exists() and not (out / MAPS_PENDING).exists()
    assert {p.name for p in out.iterdir()} == set(index) | {MAPS_INDEX} | set(THEIRS)
    assert maps_state(path) == (True, True)


def test_lists_name_only_map_files_of_the_folder(tmp_path):
    """A damaged or hand-made list never makes a removal reach another folder or a file
    that is not a map."""
    (tmp_path / MAPS_PENDING).write_text(json.dumps(
        ["beta.nii.gz", "../x.nii.gz", "/etc/y.nii.gz", "notes.txt", 3, "", "sub/z.nii.gz"]))
    (tmp_path / MAPS_INDEX).write_text(json.dumps({"n.func.gii": {}, "..": {}}))
    assert listed_maps(tmp_path) == {"beta.nii.gz", "n.func.gii"}
    (tmp_path / MAPS_PENDING).write_text("{half")
    (tmp_path / MAPS_INDEX).write_text('"a string"')
    assert listed_maps(tmp_path) == set()
    (tmp_path / "beta.nii.gz").write_bytes(b"x")
    forget_maps(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"beta.nii.gz"}  # listed by neither now


def test_export_refuses_the_maps_folder_of_another_fit(tmp_path):
    a = _results(tmp_path / "a" / "results.h5")
    b = _results(tmp_path / "b" / "results.h5")
    export_nifti(b)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / "nifti").iterdir()}
    (tmp_path / "link").symlink_to(tmp_path / "b" / "nifti")
    for target in (tmp_path / "b" / "nifti", tmp_path / "link"):
        with pytest.raises(UserError, match="maps folder of another fit") as caught:
            export_nifti(a, target)
        assert str(b) in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "b" / "moved.h5").write_bytes(a.read_bytes())  # another file beside b's
    with pytest.raises(UserError, match="maps folder of another fit"):
        export_nifti(tmp_path / "b" / "moved.h5")            # its default: b/nifti
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / "nifti").iterdir()} == before
    assert maps_state(b) == (True, True)

    export_nifti(a)                                            # its own folder
    export_nifti(a, tmp_path / "elsewhere")                    # a plain folder
    export_nifti(a, tmp_path / "plain" / "nifti")              # named nifti, no results beside
    (tmp_path / "same.h5").symlink_to(b)
    export_nifti(tmp_path / "same.h5", tmp_path / "b" / "nifti")  # b itself, by another name
    assert maps_state(a) == (True, True) and maps_state(b) == (True, True)


def _args(results: Path, out: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(results=str(results), out_dir=None if out is None else str(out),
                              fdr=False)


def test_export_command_holds_the_lock_and_refuses_a_folder_another_job_holds(
        tmp_path, monkeypatch):
    a = _results(tmp_path / "a" / "results.h5")
    held = []
    real = export.export_nifti

    def spy(*args, **kwargs):  # the lock is there while the maps are written
        held.append(sorted(p.name for p in (tmp_path / "a").iterdir()))
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_nifti", spy)
    assert run_export(_args(a)) == 0
    assert LOCK_NAME in held[0] and not (tmp_path / "a" / LOCK_NAME).exists()

    running = acquire_lock(tmp_path / "a")  # a fit (this live process) writing into a/
    try:
        with pytest.raises(UserError, match="another mpiblmm job is writing"):
            run_export(_args(a))
    finally:
        running.release()
    (tmp_path / "p").mkdir()
    running = acquire_lock(tmp_path / "p")  # another export into a plain folder
    try:
        with pytest.raises(UserError, match="another mpiblmm job is writing"):
            run_export(_args(a, tmp_path / "p"))
        assert not (tmp_path / "p" / MAPS_PENDING).exists()
    finally:
        running.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "a" / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "start": 0}))  # a killed job's
    assert run_export(_args(a)) == 0 and not (tmp_path / "a" / LOCK_NAME).exists()
    assert maps_state(a) == (True, True)


def test_export_command_refuses_another_fits_folder_before_touching_it(tmp_path):
    a = _results(tmp_path / "a" / "results.h5")
    b = _results(tmp_path / "b" / "results.h5")
    with pytest.raises(UserError, match="maps folder of another fit"):
        run_export(_args(a, tmp_path / "b" / "nifti"))
    assert sorted(os.listdir(tmp_path / "b")) == ["results.h5"]  # no nifti/, no lock
    with h5py.File(b, "r") as f:
        assert not f.attrs["maps_complete"]


@pytest.mark.parametrize("removed", ["contrasts/b/t", "sigma2", "random/s/cov"])
def test_export_refuses_a_results_file_with_a_dataset_removed_after_the_fit(tmp_path, removed):
    """A dataset deleted by hand (h5py, h5copy of a subset): the export wrote the other maps
    and marked the set complete without a word (the report stopped with a KeyError); now
    one line names what is missing, and no map is written."""
    path = _results(tmp_path / "results.h5", contrasts=("b", "c"))
    with h5py.File(path, "r+") as f:
        del f[removed]
    with pytest.raises(UserError, match=rf"dataset '{removed}' missing \(removed or renamed "
                                        r"after the fit\?\).*fit again with --overwrite"):
        export_nifti(path)
    assert not (tmp_path / "nifti").exists() or not _map_files(tmp_path / "nifti")
    with h5py.File(path, "r") as f:
        assert not f.attrs["maps_complete"]
    with pytest.raises(UserError, match=rf"'{removed}' missing .*the report cannot be made"):
        load_report_data(path)             # (it stopped with a KeyError)
    with h5py.File(path, "r+") as f:       # two gone: the first is named and the count
        del f["contrasts/c/p"], f["llh"]
    with pytest.raises(UserError, match=r"dataset '[^']+' and 2 more missing"):
        export_nifti(path)


@pytest.mark.parametrize("change", ["t_scalar", "t_two_columns", "beta_wide", "voxel_off_grid",
                                    "string_sigma2", "codes_list"])
def test_export_and_report_refuse_a_dataset_replaced_by_another_shape_or_type(tmp_path, change):
    """A fault audit replaced datasets by hand: a scalar t gave a map of 1.0 everywhere, a
    (V, 2) t a 4-D map, a wider beta 7 volumes, a voxel row of -1 a voxel at the grid's other
    end, a string dataset or a list of codes a traceback.  One line now, no map written."""
    path = _results(tmp_path / "results.h5", contrasts=("b",))
    with h5py.File(path, "r+") as f:
        V = f["voxels"].shape[0]
        if change == "t_scalar":
            del f["contrasts/b/t"]
            f["contrasts/b/t"] = 1.0
        elif change == "t_two_columns":
            del f["contrasts/b/t"]
            f["contrasts/b/t"] = np.ones((V, 2))
        elif change == "beta_wide":
            beta = f["beta"][...]
            del f["beta"]
            f["beta"] = np.hstack([beta, beta])
        elif change == "voxel_off_grid":
            vox = f["voxels"][...]
            vox[0] = -1
            f["voxels"][...] = vox
        elif change == "string_sigma2":
            del f["sigma2"]
            f["sigma2"] = np.array(["x"] * V, dtype=h5py.string_dtype())
        else:
            f["status"].attrs["codes"] = json.dumps([1, 2])
    if change == "codes_list":
        with pytest.raises(UserError, match="not a readable results file"):
            export_nifti(path)
        return
    with pytest.raises(UserError, match=r"not as the fit wrote it \(another shape or type"):
        export_nifti(path)
    assert not (tmp_path / "nifti").exists() or not _map_files(tmp_path / "nifti")
    with pytest.raises(UserError, match="not as the fit wrote it|the report cannot be made"):
        load_report_data(path)
