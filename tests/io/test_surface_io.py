"""GIfTI / CIFTI reading and writing behind the NIfTI reader interface (no fit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import nibabel as nib  # noqa: E402
from nibabel import cifti2, gifti  # noqa: E402

from mpiblmm.errors import UserError
from mpiblmm.io import images, surface


def _gifti(path, values, n_arrays=1):
    img = gifti.GiftiImage(meta=gifti.GiftiMetaData({"AnatomicalStructurePrimary": "CortexRight"}))
    for _ in range(n_arrays):
        img.add_gifti_data_array(gifti.GiftiDataArray(np.asarray(values, np.float32),
                                                      datatype="NIFTI_TYPE_FLOAT32"))
    nib.save(img, str(path))
    return path


def _cifti(path, values):
    models = cifti2.BrainModelAxis.from_mask(np.ones(len(values), bool), name="CortexLeft")
    header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(["x"]), models))
    img = cifti2.Cifti2Image(np.asarray(values, np.float32)[None, :], header)
    img.nifti_header.set_intent("ConnDenseScalar")
    nib.save(img, str(path))
    return path


def test_gifti_reads_as_a_column_grid_and_writes_named_arrays(tmp_path):
    path = _gifti(tmp_path / "a.func.gii", np.arange(7.0))
    grid = images.read_grid(path)
    assert grid.shape == (7, 1, 1) and json.loads(grid.space)["meta"] == {
        "AnatomicalStructurePrimary": "CortexRight"}
    data = images.read_volume(path, grid, dtype=np.float64)
    assert data.shape == (7, 1, 1) and data[3, 0, 0] == 3.0
    with pytest.raises(UserError, match="b.func.gii: not on the surface of a: 5 vertices, expected 7"):
        images.read_volume(_gifti(tmp_path / "b.func.gii", np.ones(5)), grid, reference="a")
    with pytest.raises(UserError, match="expected one data array"):
        images.read_grid(_gifti(tmp_path / "c.func.gii", np.ones(7), n_arrays=2))
    out = tmp_path / "m.func.gii"
    surface.save_surface_map(out, np.arange(14, dtype=np.int32).reshape(7, 2), grid.space,
                             ("u", "v"))
    back = nib.load(str(out))
    assert [d.meta["Name"] for d in back.darrays] == ["u", "v"]
    assert back.darrays[1].data.dtype == np.int32 and back.darrays[1].data[3] == 7
    assert back.meta["AnatomicalStructurePrimary"] == "CortexRight"
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed


def test_cifti_header_travels_in_space_or_as_a_template(tmp_path, monkeypatch):
    path = _cifti(tmp_path / "a.dscalar.nii", np.arange(6.0))
    grid = images.read_grid(path)
    assert grid.shape == (6, 1, 1) and "header" in json.loads(grid.space)
    surface.save_surface_map(tmp_path / "m.dscalar.nii", np.ones((6, 2)), grid.space, ("p", "q"))
    back = nib.load(str(tmp_path / "m.dscalar.nii"))
    assert list(back.header.get_axis(0).name) == ["p", "q"] and back.shape == (2, 6)
    assert back.header.get_axis(1) == nib.load(str(path)).header.get_axis(1)

    # CIFTI counts grayordinates (vertices and voxels), in read_volume and in check's words
    other = _cifti(tmp_path / "b.dscalar.nii", np.arange(5.0))
    with pytest.raises(UserError, match="b.dscalar.nii: not on the surface of a: 5 "
                                        "grayordinates, expected 6"):
        images.read_volume(other, grid, reference="a")
    assert images.grid_problem(grid, other, images.read_grid(other), "a") == (
        "not on the surface of a: 5 grayordinates, expected 6")

    monkeypatch.setattr(surface, "MAX_HEADER_CHARS", 10)  # a header too large for HDF5 attrs
    big = images.read_grid(path)
    info = json.loads(big.space)    # the path, and what its brain models must be at export
    assert (info["format"], info["template"], info[surface.TEMPLATE_COUNT]) == (
        "cifti", str(path.resolve()), 6)
    assert info[surface.TEMPLATE_DIGEST] == surface.models_digest(
        nib.load(str(path)).header.get_axis(1))
    surface.save_surface_map(tmp_path / "t.dscalar.nii", np.ones((6, 1)), big.space, ("p",))
    assert nib.load(str(tmp_path / "t.dscalar.nii")).shape == (1, 6)
    path.unlink()
    with pytest.raises(UserError, match="CIFTI template .* is gone"):
        surface.save_surface_map(tmp_path / "u.dscalar.nii", np.ones((6, 1)), big.space, ("p",))


def test_a_cifti_with_several_maps_is_refused(tmp_path):
    models = cifti2.BrainModelAxis.from_mask(np.ones(4, bool), name="CortexLeft")
    header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(["a", "b"]), models))
    nib.save(cifti2.Cifti2Image(np.ones((2, 4), np.float32), header), str(tmp_path / "x.dscalar.nii"))
    with pytest.raises(UserError, match="one map"):
        images.read_grid(tmp_path / "x.dscalar.nii")
