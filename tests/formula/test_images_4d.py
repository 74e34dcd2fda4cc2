"""`images` as one 4-D NIfTI (one volume per observation, FSL randomise's convention)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from mpiblmm.errors import SpecError
from mpiblmm.spec import load_spec
from tests.cli.studies import assert_same_datasets, read_results, write_reference_study
from tests.refdata import load_dataset


def _stack(folder, names, out="all.nii", fifth=False):
    """The images as one 4-D file (``fifth``: of shape (x, y, z, n, 1), as some tools write)."""
    import nibabel as nib

    vols = [nib.load(folder / n) for n in names]
    data = np.stack([np.asanyarray(v.dataobj) for v in vols], axis=-1)
    if fifth:
        data = data[..., None]
    nib.save(nib.Nifti1Image(data, vols[0].affine), folder / out)
    return out


def test_spec_reads_volumes(tmp_path):
    ds = load_dataset("intercept")
    path = write_reference_study(ds, tmp_path)
    spec = json.loads(path.read_text())
    spec["images"] = _stack(tmp_path, spec["images"])
    path.write_text(json.dumps(spec))
    loaded = load_spec(path)
    assert len(loaded.images) == ds.n
    assert [p.volume for p in loaded.images[:3]] == [0, 1, 2]
    back = pickle.loads(pickle.dumps(loaded))
    assert back.images[5].volume == 5 and str(back.images[5]) == str(tmp_path / "all.nii")


def test_a_3d_image_alone_is_an_error(tmp_path):
    ds = load_dataset("intercept")
    path = write_reference_study(ds, tmp_path)
    spec = json.loads(path.read_text())
    spec["images"] = spec["images"][0]
    path.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=r"images: one image given, an image of shape \(.*\): "
                                        "expected a 4-D NIfTI"):
        load_spec(path)


def test_a_4d_image_of_one_volume_alone_says_so(tmp_path):
    """A fault audit's one-volume 4-D file was told it should be 4-D ("got shape (6, 6, 4, 1)")."""
    import nibabel as nib

    ds = load_dataset("intercept")
    path = write_reference_study(ds, tmp_path)
    spec = json.loads(path.read_text())
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2, 1), np.float32), np.eye(4)), tmp_path / "one.nii")
    spec["images"] = "one.nii"
    path.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="images: one image given, a 4-D NIfTI with 1 volume: "
                                        "expected a 4-D NIfTI with one volume per observation"):
        load_spec(path)


@pytest.mark.spawns_mpiexec
def test_4d_fit_equals_the_list_of_images(tmp_path, run_mpi, mpiblmm_command):
    ds = load_dataset("slope")
    listed = write_reference_study(ds, tmp_path)
    spec = json.loads(listed.read_text())
    names = spec["images"]
    spec["images"] = _stack(tmp_path, names)
    spec["output"] = "results4d"
    (tmp_path / "4d.json").write_text(json.dumps(spec))
    # (x, y, z, n, 1) is n volumes too (it was refused as "an image of shape ...")
    spec["images"] = _stack(tmp_path, names, "all5.nii", fifth=True)
    spec["output"] = "results5d"
    (tmp_path / "5d.json").write_text(json.dumps(spec))
    for path in (listed, tmp_path / "4d.json", tmp_path / "5d.json"):
        run = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(path)], timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    a = read_results(tmp_path / "results" / "results.h5")
    for other in ("results4d", "results5d"):
        assert_same_datasets(a, read_results(tmp_path / other / "results.h5"))
