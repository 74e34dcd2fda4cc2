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


def _dlabel(path, labels, structure="CortexLeft"):
    models = cifti2.BrainModelAxis.from_mask(np.ones(len(labels), bool), name=structure)
    table = {0: ("???", (0.0, 0.0, 0.0, 0.0)), 1: ("a", (1.0, 0.0, 0.0, 1.0)),
             2: ("b", (0.0, 1.0, 0.0, 1.0)), 3: ("c", (0.0, 0.0, 1.0, 1.0))}
    header = cifti2.Cifti2Header.from_axes((cifti2.LabelAxis(["roi"], table), models))
    img = cifti2.Cifti2Image(np.asarray(labels, np.float32)[None], header)
    img.nifti_header.set_intent("ConnDenseLabel")
    nib.save(img, str(path))
    return path


def test_a_cifti_dense_label_file_is_a_mask_and_other_cifti_kinds_are_named(tmp_path):
    # as .label.gii for GIfTI: CIFTI's usual ROI file is a mask of its study (it was read
    # as a NIfTI volume and refused as "expected a 3-D image"; surface audit)
    first = _cifti(tmp_path / "a.dscalar.nii", _values())
    grid = images.read_grid(first)
    labels = np.array([0, 3, 3, 0, 1, 0, 2, 2])
    roi = _dlabel(tmp_path / "roi.dlabel.nii", labels)
    assert surface.surface_format(roi) == "cifti"
    inside = analysis_mask_voxels(roi, grid, reference=str(first))
    assert inside.reshape(-1).tolist() == (labels != 0).tolist()
    right = _dlabel(tmp_path / "rh.dlabel.nii", labels, structure="CortexRight")
    with pytest.raises(UserError, match="brain models of CORTEX_RIGHT"):
        analysis_mask_voxels(right, grid, reference=str(first))
    # data and other kinds, by name, in the words of what they are
    assert surface.cifti_kind_problem("s.dtseries.nii", mask=False) == (
        "a dense time series (.dtseries.nii): CIFTI images are read from dense scalar files "
        "(.dscalar.nii), one map per observation; masks may also be dense label files "
        "(.dlabel.nii)")
    assert "a dense label file (a mask, not data)" in surface.cifti_kind_problem(
        "roi.dlabel.nii", mask=False)
    assert surface.cifti_kind_problem("roi.dlabel.nii", mask=True) is None
    assert "a parcel scalar file" in surface.cifti_kind_problem("p.pscalar.nii", mask=True)
    assert surface.cifti_kind_problem("a.dscalar.nii", mask=False) is None
    assert surface.cifti_kind_problem("brain.nii.gz", mask=False) is None


def test_a_cifti_cut_short_in_its_data_is_one_line(tmp_path):
    # its header reads well, its data does not: was nibabel's OSError and a traceback
    path = _cifti(tmp_path / "a.dscalar.nii", _values())
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError) as err:
        images.read_grid(path)
    assert str(err.value) == (f"{path}: its data could not be read, the file is cut short or "
                              f"damaged (Expected 32 bytes, got 20 bytes)")


@pytest.mark.parametrize("space, why", [
    ("garbage{", "not the JSON mpiblmm writes (Expecting value: line 1 column 1 (char 0))"),
    ("[1]", "not a JSON object"),
    ('{"format": "minc"}', "format 'minc': expected nifti, gifti or cifti"),
    ('{"format": "nifti", "qform_code": 9}', "qform_code must be 0-5, got 9"),
    ('{"format": "nifti", "xyz_units": "parsec"}', "not a NIfTI space mpiblmm can write"),
    ('{"format": "gifti", "meta": {"a": 1}}', "its GIfTI 'meta' must be an object of text"),
    ('{"format": "cifti", "header": "AAAA"}', "its CIFTI brain models cannot be read (error: "
                                              "Error -3 while decompressing data"),
])
def test_a_stored_space_that_cannot_give_the_maps_back_is_named(space, why):
    # a hand-packed input's space attribute, refused before the fit (was: the whole fit,
    # then a traceback or "results.h5: not a readable results file" at the export)
    assert images.stored_space_problem(space, (N, 1, 1)).startswith(why)


def test_stored_spaces_of_real_inputs_pass(tmp_path):
    for path in (_gifti(tmp_path / "lh.func.gii", _values()),
                 _cifti(tmp_path / "a.dscalar.nii", _values())):
        grid = images.read_grid(path)
        assert images.stored_space_problem(grid.space, grid.shape) is None
    # a CIFTI space knows its grayordinates (a GIfTI one does not know its vertex count)
    assert images.stored_space_problem(grid.space, (N + 1, 1, 1)) == (
        f"its CIFTI brain models hold {N} grayordinates, the data {N + 1}")
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), str(volume))
    grid = images.read_grid(volume)
    assert images.stored_space_problem(grid.space, grid.shape) is None
    assert images.stored_space_problem("", (2, 3, 4)) is None
    assert "grid_shape (N, 1, 1)" in images.stored_space_problem(
        images.read_grid(tmp_path / "lh.func.gii").space, (2, 3, 4))


def test_a_stored_cifti_space_without_models_or_with_its_template_gone(tmp_path):
    assert images.stored_space_problem('{"format": "cifti"}', (N, 1, 1)) == (
        "its CIFTI brain models are missing (neither 'header' nor 'template')")
    gone = tmp_path / "gone.dscalar.nii"
    with pytest.raises(UserError, match=f"^{gone}: the CIFTI template .* is gone"):
        images.stored_space_problem(f'{{"format": "cifti", "template": "{gone}"}}', (N, 1, 1))
