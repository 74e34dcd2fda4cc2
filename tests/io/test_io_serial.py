"""The io layer on one process without MPI (comm=None): pack, read, write, export."""

from __future__ import annotations

import os

import numpy as np
import pytest

import h5py  # noqa: E402  runtime dependencies: a missing one must fail, not skip
import nibabel as nib  # noqa: E402

from mpiblmm.errors import SpecError, UserError  # noqa: E402
from mpiblmm.io import make_dirs, open_h5, read_hyperslab, write_hyperslab  # noqa: E402
from mpiblmm.io.export import ScatteredMap, export_nifti, vech_indices, volume  # noqa: E402
from mpiblmm.io.ingest import (grid_indices, open_packed, pack_images, prepare_input,  # noqa: E402
                               read_slab)
from mpiblmm.io.nifti import read_volume, save_map  # noqa: E402
from mpiblmm.io.results import ContrastLayout, ResultsLayout, create_results  # noqa: E402
from mpiblmm.spec import load_spec  # noqa: E402
from tests.io.helpers import AFFINE, GRID, make_study, reference, save  # noqa: E402


def test_vech_indices_column_by_column():
    rows, cols = vech_indices(3)
    assert list(zip(rows, cols)) == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2)]


def test_volume_fills_by_dtype():
    vox = np.array([[0, 0, 0], [1, 2, 0]])
    f = volume(np.array([1.5, 2.5]), vox, (2, 3, 1))
    assert np.isnan(f[0, 1, 0]) and f[1, 2, 0] == 2.5
    i = volume(np.array([3, 4], dtype=np.uint8), vox, (2, 3, 1))
    assert i.dtype == np.uint8 and i[0, 1, 0] == 0 and i[0, 0, 0] == 3
    four = volume(np.ones((2, 2)), vox, (2, 3, 1))
    assert four.shape == (2, 3, 1, 2)


def test_save_map_keeps_dtype(tmp_path):
    for dtype in (np.uint8, np.int32, np.float64):
        data = np.arange(24, dtype=dtype).reshape(2, 3, 4)
        save_map(tmp_path / "m.nii.gz", data, AFFINE)
        img = nib.load(str(tmp_path / "m.nii.gz"))
        assert img.get_data_dtype() == dtype
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape, dtype", [((5, 4, 3), np.float64), ((5, 4, 3, 7), np.float64),
                                          ((6, 5, 4), np.uint8), ((6, 5, 4, 2), np.int32)])
def test_a_map_written_a_volume_at_a_time_has_nib_saves_bytes(tmp_path, suffix, shape, dtype):
    """save_map streams the volumes (a memory audit: a whole 4-D beta map went 165 MiB over
    the budget); the file is byte for byte what nib.save writes for the whole array with the
    same header, extensions (AFNI labels) included."""
    import gzip

    data = (np.random.default_rng(1).normal(size=shape) * 10).astype(dtype)
    labels = tuple(f"v{i}" for i in range(shape[3] if len(shape) == 4 else 1))
    save_map(tmp_path / f"a{suffix}", data, AFFINE, description="d", labels=labels,
             idcode="ID")
    written = nib.load(str(tmp_path / f"a{suffix}"))
    whole = nib.Nifti1Image(data, None, header=written.header.copy())
    nib.save(whole, str(tmp_path / f"b{suffix}"))
    a, b = ((tmp_path / f"{x}{suffix}").read_bytes() for x in "ab")
    if suffix == ".nii.gz":
        a, b = gzip.decompress(a), gzip.decompress(b)
    assert a == b and len(written.header.extensions) == 1


def test_a_scattered_map_reads_its_values_in_groups(tmp_path, monkeypatch):
    """A wide map read from the results file a few volumes at a time gives the volumes of the
    whole array, and the same file."""
    from mpiblmm.io import export

    rng = np.random.default_rng(2)
    vox = np.array([[0, 0, 0], [1, 2, 0], [1, 1, 3]])
    values = rng.normal(size=(3, 7))
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f["beta"] = values
        monkeypatch.setattr(export, "VALUES_READ_BYTES", 2 * 3 * 8)     # 2 volumes a read
        lazy = ScatteredMap(f["beta"], vox, (2, 3, 4))
        assert lazy.shape == (2, 3, 4, 7) and lazy.dtype == np.float64
        whole = volume(values, vox, (2, 3, 4))
        for k in (0, 1, 2, 6, 3):
            np.testing.assert_array_equal(lazy.volume(k), whole[..., k])
        np.testing.assert_array_equal(np.asarray(lazy), whole)
        save_map(tmp_path / "lazy.nii", lazy, AFFINE)
    save_map(tmp_path / "whole.nii", whole, AFFINE)
    assert (tmp_path / "lazy.nii").read_bytes() == (tmp_path / "whole.nii").read_bytes()


def test_grid_indices_are_unravel_index():
    shape = (7, 5, 3)
    flat = np.random.default_rng(3).choice(105, size=40, replace=False)
    got = grid_indices(flat, shape)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.column_stack(np.unravel_index(flat, shape)))


def test_read_volume_errors(tmp_path):
    (tmp_path / "junk.nii").write_bytes(b"not an image")
    with pytest.raises(UserError, match="junk.nii: not a readable NIfTI image"):
        read_volume(tmp_path / "junk.nii")
    save(tmp_path / "four.nii", np.zeros((2, 2, 2, 3)))
    with pytest.raises(UserError, match="expected a 3-D image"):
        read_volume(tmp_path / "four.nii")
    save(tmp_path / "one.nii", np.ones((2, 2, 2, 1)))
    assert read_volume(tmp_path / "one.nii").shape == (2, 2, 2)


def test_empty_hyperslabs(tmp_path):
    with open_h5(tmp_path / "a.h5", "w") as f:
        d = f.create_dataset("d", shape=(3, 4), dtype="f8", fillvalue=np.nan)
        write_hyperslab(d, (1, 0), np.ones((0, 4)))
        write_hyperslab(d, (1, 1), np.full((2, 2), 7.0))
        assert read_hyperslab(d, (0, 0), (3, 0)).shape == (3, 0)
        np.testing.assert_array_equal(read_hyperslab(d, (1, 1), (1, 2)), [[7.0, 7.0]])
        assert np.isnan(d[0, 0])


def test_pack_and_read_serially(tmp_path):
    study = make_study(tmp_path / "s", with_masks=True)
    packed = pack_images(study["images"], tmp_path / "out" / "packed.h5",
                         analysis_mask=study["analysis_mask"],
                         observation_masks=study["observation_masks"])
    voxels, Y = reference(study)
    np.testing.assert_array_equal(packed.voxels, voxels)
    np.testing.assert_array_equal(read_slab(packed, 0, packed.n_voxels), Y.T)
    np.testing.assert_array_equal(read_slab(packed, 2, 5), Y[:, 2:5].T)
    assert read_slab(packed, 3, 3).shape == (0, len(study["images"]))


def test_prepare_input_from_a_spec(tmp_path):
    study = make_study(tmp_path, n=4)
    (tmp_path / "images.txt").write_text("".join(f"{p.name}\n" for p in study["images"]))
    (tmp_path / "X.csv").write_text("1\n1\n1\n1\n")
    (tmp_path / "f.csv").write_text("a\na\nb\nb\n")
    (tmp_path / "spec.json").write_text(
        '{"images": "images.txt", "X": "X.csv", "random": [{"name": "s", "factor": "f.csv"}]}')
    packed = prepare_input(load_spec(tmp_path / "spec.json"), n_expected=4)
    assert packed.path == tmp_path / "results" / "packed.h5"
    # and the packed file as input of a second spec: the number of rows must match
    (tmp_path / "spec2.json").write_text(
        '{"images": {"h5": "results/packed.h5"}, "X": "X.csv", "random": [{"name": "s", "factor": "f.csv"}]}')
    again = prepare_input(load_spec(tmp_path / "spec2.json"), n_expected=4)
    np.testing.assert_array_equal(again.voxels, packed.voxels)
    with pytest.raises(SpecError, match=r"packed.h5: /Y has 4 observations but .*X.csv has 5 rows"):
        prepare_input(load_spec(tmp_path / "spec2.json"), n_expected=5)


@pytest.mark.parametrize("make, message", [
    (lambda f: f.create_dataset("Z", data=np.zeros((2, 3))), "has no dataset '/Y'"),
    (lambda f: f.create_dataset("Y", data=np.zeros((2, 3))), "attribute 'affine' (4x4) is missing"),
    (lambda f: f.create_dataset("Y", data=np.zeros((2, 3, 4))), "expected a numeric (observations x voxels)"),
])
def test_packed_file_errors(tmp_path, make, message):
    with h5py.File(tmp_path / "p.h5", "w") as f:
        make(f)
    with pytest.raises(SpecError) as info:
        open_packed(tmp_path / "p.h5", "/Y")
    assert message in str(info.value) and str(tmp_path / "p.h5") in str(info.value)


def test_packed_flat_needs_voxels_or_full_grid(tmp_path):
    with h5py.File(tmp_path / "p.h5", "w") as f:
        d = f.create_dataset("Y", data=np.ones((2, 5)))
        d.attrs["affine"] = AFFINE
        d.attrs["grid_shape"] = GRID
    with pytest.raises(SpecError, match="no 'voxels' attribute"):
        open_packed(tmp_path / "p.h5")
    with h5py.File(tmp_path / "p.h5", "a") as f:
        f["Y"].attrs["voxels"] = "/vox"
        f["vox"] = np.array([[0, 0, 1], [0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 2]])
    with pytest.raises(SpecError, match="distinct and in C order"):
        open_packed(tmp_path / "p.h5")


def test_results_and_export_serially(tmp_path):
    lay = ResultsLayout(n_voxels=3, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=(ContrastLayout("b", "T", ((0.0, 1.0),)),), method="ML",
                        grid_shape=GRID, affine=tuple(map(tuple, AFFINE.tolist())),
                        spec_text="x" * 100_000)   # attributes beyond 64 KiB are fine
    vox = np.array([[0, 0, 0], [1, 2, 1], [3, 4, 2]], dtype=np.int32)
    w = create_results(tmp_path / "r" / "results.h5", lay, vox)
    w.write(0, 2, {"beta": np.ones((2, 2)), "status": np.array([0, 3], dtype=np.uint8)})
    counts = w.finish({"t": 1.0})
    assert counts == {0: 1, 3: 1, 255: 1}
    export_nifti(tmp_path / "r" / "results.h5")
    beta = np.asanyarray(nib.load(str(tmp_path / "r" / "nifti" / "beta.nii.gz")).dataobj)
    assert beta[0, 0, 0, 1] == 1 and np.isnan(beta[3, 4, 2]).all()
    status = np.asanyarray(nib.load(str(tmp_path / "r" / "nifti" / "status.nii.gz")).dataobj)
    assert status[3, 4, 2] == 255 and status[1, 2, 1] == 3 and status[0, 0, 1] == 8  # background
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create the folder .*file/maps"):
        export_nifti(tmp_path / "r" / "results.h5", tmp_path / "file" / "maps")


def test_make_dirs_names_the_key_and_the_problem(tmp_path):
    (tmp_path / "f").write_text("")
    make_dirs(tmp_path / "a" / "b", "spec.json: output")
    assert (tmp_path / "a" / "b").is_dir()
    make_dirs(tmp_path / "a" / "b")                       # exists already: fine
    with pytest.raises(UserError, match=r"^spec.json: output: .* exists and is not a folder"):
        make_dirs(tmp_path / "f", "spec.json: output")
    with pytest.raises(UserError, match=r"^k: cannot create the folder .*\(Not a directory\)"):
        make_dirs(tmp_path / "f" / "sub", "k")


def test_a_folder_on_a_read_only_mount_is_not_called_permission_denied(tmp_path, monkeypatch):
    """A fault audit's output folder on a read-only file system was reported as "permission
    denied"; os.access answers no alike for both.  (The mount is made read-only for statvfs
    and os.access: mounting needs root.)"""
    import mpiblmm.io as mio

    folder = tmp_path / "out"
    folder.mkdir()
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, real):
            self._real = real
            self.f_flag = real.f_flag | os.ST_RDONLY

        def __getattr__(self, name):
            return getattr(self._real, name)

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly(real_statvfs(path)))
    expected = f"--output: cannot write into the folder {folder} (read-only file system)"
    with pytest.raises(UserError) as raised:
        make_dirs(folder, "--output")
    assert str(raised.value) == expected
    assert str(mio.folder_problem(folder, "--output")) == expected
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    with pytest.raises(UserError, match=r"\(permission denied\)$"):
        make_dirs(folder, "--output")


def test_an_unreadable_image_is_worded_alike_for_header_and_data(tmp_path, monkeypatch):
    """`check` reads headers, `fit` data: both say the same of a file they may not read.
    (Opening it is made to fail as for mode 000 by another user: CI runs as root.)"""
    from mpiblmm.io.nifti import read_grid

    save(tmp_path / "locked.nii", np.ones((2, 2, 2)))
    real_open = os.open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("locked.nii"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    for read in (read_grid, read_volume):
        with pytest.raises(UserError, match=r"locked.nii: cannot read the file \(Permission "
                                            r"denied\)$"):
            read(tmp_path / "locked.nii")


def test_a_fifo_or_a_folder_as_an_image_is_refused_without_reading(tmp_path):
    """Opening a FIFO to read it would wait for a writer forever."""
    from mpiblmm.io.nifti import read_grid

    os.mkfifo(tmp_path / "fifo.nii")
    (tmp_path / "dir.nii").mkdir()
    for read in (read_grid, read_volume):
        with pytest.raises(UserError, match=r"fifo.nii: not a regular file$"):
            read(tmp_path / "fifo.nii")
        with pytest.raises(UserError, match=r"dir.nii: is a directory, not a file$"):
            read(tmp_path / "dir.nii")


def test_an_affine_that_differs_says_by_how_much():
    """A BLMM audit's mask differed from the images' affine; "affine differs" alone did not
    say whether by a rounding or by a voxel."""
    from mpiblmm.io.nifti import Grid

    grid = Grid((2, 2, 2), np.eye(4))
    other = np.eye(4)
    other[0, 3] = 5e-5
    assert grid.differs((2, 2, 2), other) is None
    other[1, 3] = -0.25
    assert grid.differs((2, 2, 2), other) == ("affine differs (by up to 0.25 mm; at most "
                                              "0.0001 is the same grid)")


def test_all_zero_images_are_refused_saying_zero_is_missing(tmp_path):
    """A fault audit: images that are 0 everywhere gave "<first image>: no voxel is observed
    in any image", as if that image were the culprit, and not why 0 is unobserved."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"z{i}.nii")
        save(paths[-1], np.zeros(GRID, dtype=np.float32))
    with pytest.raises(UserError) as info:
        pack_images(paths, tmp_path / "out" / "packed.h5")
    assert str(info.value) == (
        f"{paths[0]}: no voxel is observed in any image (this, the first, and every other): "
        "every value is 0 (missing while zero_is_missing is true), NaN or Inf")
