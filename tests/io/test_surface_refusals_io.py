"""Surface readers refuse what is not one surface of one kind (no fit, no MPI).

A study is of one kind (NIfTI, GIfTI or CIFTI) and, on a surface, of one structure: a right
hemisphere among left ones has the same vertex count, so only the metadata can tell.  A
``.label.gii`` reads as a mask, and a file of several maps is named as such.
"""

from __future__ import annotations

import numpy as np
import pytest

import nibabel as nib  # noqa: E402
from nibabel import cifti2, gifti  # noqa: E402

from mpiblmm.errors import UserError
from mpiblmm.io import images, surface
from mpiblmm.io.ingest import analysis_mask_voxels

N = 8


def _gifti(path, values, structure="CortexLeft", n_arrays=1, intent="NIFTI_INTENT_NONE"):
    meta = {} if structure is None else {"AnatomicalStructurePrimary": structure}
    img = gifti.GiftiImage(meta=gifti.GiftiMetaData(meta))
    values = np.asarray(values)
    for _ in range(n_arrays):
        img.add_gifti_data_array(gifti.GiftiDataArray(
            values, intent=intent, datatype="NIFTI_TYPE_INT32" if values.dtype.kind == "i"
            else "NIFTI_TYPE_FLOAT32"))
    nib.save(img, str(path))
    return path


def _cifti(path, values, structure="CortexLeft", maps=("x",)):
    models = cifti2.BrainModelAxis.from_mask(np.ones(len(values), bool), name=structure)
    header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(list(maps)), models))
    data = np.tile(np.asarray(values, np.float32), (len(maps), 1))
    img = cifti2.Cifti2Image(data, header)
    img.nifti_header.set_intent("ConnDenseScalar")
    nib.save(img, str(path))
    return path


def _values():
    return np.arange(1.0, N + 1, dtype=np.float32)


def test_a_gifti_of_another_hemisphere_is_refused_naming_both_structures(tmp_path):
    first = _gifti(tmp_path / "lh.func.gii", _values())
    grid = images.read_grid(first)
    right = _gifti(tmp_path / "rh.func.gii", _values(), structure="CortexRight")
    with pytest.raises(UserError) as err:
        images.read_volume(right, grid, reference=str(first))
    assert str(err.value) == (f"{right}: anatomical structure CortexRight, but {first} is "
                              "CortexLeft: every image and mask of a surface study must be of "
                              "one structure")
    # header only (what `check` compares): the same words
    assert images.grid_problem(grid, right, images.read_grid(right), str(first)) == \
        err.value.message
    # same structure, or none recorded: read as before
    assert images.read_volume(_gifti(tmp_path / "b.func.gii", _values()), grid).shape == (N, 1, 1)
    bare = _gifti(tmp_path / "c.shape.gii", _values(), structure=None)
    assert images.read_volume(bare, grid)[2, 0, 0] == 3.0
    assert images.grid_problem(grid, bare, images.read_grid(bare)) is None


def test_a_cifti_with_other_brain_models_is_refused(tmp_path):
    first = _cifti(tmp_path / "a.dscalar.nii", _values())
    grid = images.read_grid(first)
    other = _cifti(tmp_path / "b.dscalar.nii", _values(), structure="CortexRight")
    with pytest.raises(UserError, match=r"b.dscalar.nii: brain models of CORTEX_RIGHT, but "
                                        r"a has CORTEX_LEFT: every image and mask of a CIFTI"):
        images.read_volume(other, grid, reference="a")
    assert "brain models" in images.grid_problem(grid, other, images.read_grid(other))
    # the same brain models under another map name: one surface
    same = _cifti(tmp_path / "c.dscalar.nii", _values(), maps=("thickness",))
    assert images.read_volume(same, grid, dtype=np.float64)[3, 0, 0] == 4.0


def test_files_of_another_kind_are_refused(tmp_path):
    first = _gifti(tmp_path / "lh.func.gii", _values())
    grid = images.read_grid(first)
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(_values().reshape(N, 1, 1), np.eye(4)), str(volume))
    # a NIfTI of N x 1 x 1 voxels has the grid's shape and affine: only its kind differs
    assert images.read_stored(volume, grid) is None
    with pytest.raises(UserError, match=rf"v.nii.gz: a NIfTI file, but {first} is GIfTI: the "
                                        "images and masks of a study must all be of one kind"):
        images.read_volume(volume, grid, reference=str(first))
    with pytest.raises(UserError, match="a NIfTI file, but"):  # as an analysis mask
        analysis_mask_voxels(volume, grid, reference=str(first))
    with pytest.raises(UserError, match=r"lh.func.gii: a GIfTI file, but v is NIfTI"):
        images.read_volume(first, images.read_grid(volume), reference="v")
    cifti = _cifti(tmp_path / "c.dscalar.nii", _values())
    with pytest.raises(UserError, match="a CIFTI file, but .* is GIfTI"):
        images.read_volume(cifti, grid, reference=str(first))
    assert "one kind" in images.grid_problem(grid, volume, images.read_grid(volume))


def test_a_label_gifti_is_a_mask(tmp_path):
    first = _gifti(tmp_path / "lh.func.gii", _values())
    grid = images.read_grid(first)
    labels = np.array([0, 3, 3, 0, 1, 0, 2, 2], dtype=np.int32)
    path = _gifti(tmp_path / "roi.label.gii", labels, structure=None, intent="NIFTI_INTENT_LABEL")
    assert surface.surface_format(path) == "gifti"
    inside = analysis_mask_voxels(path, grid, reference=str(first))
    assert inside.reshape(-1).tolist() == (labels != 0).tolist()


def test_files_of_several_maps_are_named_as_such(tmp_path):
    path = _gifti(tmp_path / "all.func.gii", _values(), n_arrays=3)
    with pytest.raises(UserError, match="all.func.gii: a GIfTI file with 3 data arrays: expected "
                                        r"one data array \(give one file per observation\)"):
        images.read_grid(path)
    assert surface.count_maps(path) == 3
    path = _cifti(tmp_path / "all.dscalar.nii", _values(), maps=("a", "b"))
    with pytest.raises(UserError, match="a CIFTI file with 2 maps: expected one map"):
        images.read_grid(path)
    assert surface.count_maps(path) == 2
