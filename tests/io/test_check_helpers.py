"""What `mpiblmm check` shares with the fit's I/O (one process, no MPI): the output-folder
prediction agrees with :func:`make_dirs`, the analysis mask's emptiness is refused naming
the mask, and odd packed files are one-line :class:`SpecError`s, never an exception of
h5py or numpy."""

from __future__ import annotations


import numpy as np
import pytest

import h5py  # noqa: E402  runtime dependencies: a missing one must fail, not skip

from mpiblmm.errors import SpecError, UserError  # noqa: E402
from mpiblmm.io import folder_problem, make_dirs  # noqa: E402
from mpiblmm.io.ingest import analysis_mask_voxels, describe_packed  # noqa: E402
from mpiblmm.io.nifti import read_grid  # noqa: E402
from tests.io.helpers import AFFINE, GRID, save  # noqa: E402


def _paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    return {
        "new folder": tmp_path / "a" / "b" / "c",
        "existing folder": tmp_path / "dir",
        "a file": tmp_path / "file",
        "under a file": tmp_path / "file" / "sub",
        "deep under a file": tmp_path / "file" / "sub" / "subsub",
        "a dangling link": tmp_path / "dangling",
        "under a dangling link": tmp_path / "dangling" / "sub",
    }


@pytest.mark.parametrize("case", ["new folder", "existing folder", "a file", "under a file",
                                  "deep under a file", "a dangling link",
                                  "under a dangling link"])
def test_folder_problem_predicts_make_dirs_without_creating(tmp_path, case):
    path = _paths(tmp_path)[case]
    predicted = folder_problem(path, "spec.json: output")
    if case == "new folder":
        assert not path.parent.exists()          # nothing created by the prediction
    try:
        make_dirs(path, "spec.json: output")
        actual = None
    except UserError as exc:
        actual = str(exc)
    assert (None if predicted is None else str(predicted)) == actual


def test_an_empty_analysis_mask_is_named(tmp_path):
    save(tmp_path / "img.nii.gz", np.ones(GRID, np.float32))
    grid = read_grid(tmp_path / "img.nii.gz")
    for name, data in (("zeros", np.zeros(GRID, np.uint8)),
                       ("nan", np.full(GRID, np.nan, np.float32))):
        save(tmp_path / f"{name}.nii.gz", data)
        with pytest.raises(UserError, match=rf"^{tmp_path}/{name}.nii.gz: no voxel is observed "
                                            "in any image inside the analysis mask: the mask "
                                            "is empty"):
            analysis_mask_voxels(tmp_path / f"{name}.nii.gz", grid, str(tmp_path / "img.nii.gz"))
    one = np.zeros(GRID, np.float32)
    one[1, 2, 0] = 3.0
    save(tmp_path / "one.nii.gz", one)
    inside = analysis_mask_voxels(tmp_path / "one.nii.gz", grid)
    assert inside.dtype == bool and inside.sum() == 1 and inside[1, 2, 0]


def _packed(tmp_path, build):
    with h5py.File(tmp_path / "p.h5", "w") as f:
        build(f)
    return tmp_path / "p.h5"


def _Y(f, columns=int(np.prod(GRID))):
    return f.create_dataset("Y", data=np.ones((5, columns), np.float32))


@pytest.mark.parametrize("build, says", [
    (lambda f: _Y(f).attrs.update(affine="eye", grid_shape=GRID),
     "/Y: attribute 'affine' must be 4x4 numbers"),
    (lambda f: _Y(f).attrs.update(affine=AFFINE, grid_shape="4x5x3"),
     "/Y: grid_shape must be 3 positive whole numbers"),
    (lambda f: _Y(f).attrs.update(affine=AFFINE, grid_shape=[4.5, 5, 3]),
     "/Y: grid_shape must be 3 positive whole numbers"),
    (lambda f: (_Y(f, 2).attrs.update(affine=AFFINE, grid_shape=GRID, voxels="/g"),
                f.create_group("g")), "/Y: its voxels '/g' is not a dataset"),
    (lambda f: (_Y(f, 2).attrs.update(affine=AFFINE, grid_shape=GRID, voxels="/v"),
                f.create_dataset("v", data=np.full((2, 3), b"a"))),
     "/v: expected integer voxel coordinates"),
    (lambda f: (_Y(f).attrs.update(affine=AFFINE, grid_shape=GRID),
                f.attrs.update(space="garbage{")),
     r"attribute 'space' \(the input's format, for the maps\): not the JSON mpiblmm writes"),
    (lambda f: (_Y(f).attrs.update(affine=AFFINE, grid_shape=GRID),
                f.attrs.update(space='{"format": "gifti"}')),
     r"attribute 'space' \(the input's format, for the maps\): a GIfTI surface needs "
     r"grid_shape \(N, 1, 1\), got \(4, 5, 3\)"),
])
def test_odd_packed_files_are_spec_errors(tmp_path, build, says):
    path = _packed(tmp_path, build)
    with pytest.raises(SpecError, match=f"^{path}: {says}"):
        describe_packed(path, "/Y", None)


def test_packed_grid_shape_in_whole_floats_is_accepted(tmp_path):
    path = _packed(tmp_path, lambda f: _Y(f).attrs.update(affine=AFFINE,
                                                          grid_shape=np.array(GRID, float)))
    n, shape = describe_packed(path, "/Y", None)[:2]
    assert n == 5 and shape == GRID


def test_packed_input_and_an_empty_mask(tmp_path):
    path = _packed(tmp_path, lambda f: _Y(f).attrs.update(affine=AFFINE, grid_shape=GRID))
    save(tmp_path / "m.nii.gz", np.zeros(GRID, np.uint8))
    with pytest.raises(UserError, match=f"^{tmp_path}/m.nii.gz: no voxel is observed"):
        describe_packed(path, "/Y", tmp_path / "m.nii.gz")
