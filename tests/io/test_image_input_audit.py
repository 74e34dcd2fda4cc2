"""Image input, as an audit found it wanting (in-process; the CLI side is in
``tests/cli/test_image_input_cli.py``).

- float64 masks: any non-zero finite value is inside (1e-50 is not 0, 1e40 is not Inf);
- a CIFTI template (the first input, kept by path when its header is too large for HDF5)
  replaced after the fit is refused, not written into the maps;
- paths that are not UTF-8 (a latin-1 byte, a surrogate escape) are hashed and stored;
- a NaN or Inf affine is refused at the image, a grid of no voxel at the first image;
- nibabel's header-fix log lines and numpy's cast warnings are silenced while inputs are read.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2

from mpiblmm.errors import UserError
from mpiblmm.io import images, ingest, surface

SHAPE = (4, 3, 2)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _study(folder: Path, n: int = 6, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(100, 2, SHAPE).astype(np.float32), AFFINE), str(p))
        paths.append(p)
    return paths


def _f64(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float64), AFFINE, dtype=np.float64),
             str(path))
    return path


# --------------------------------------------------------------------------- 1. masks
def test_a_float64_analysis_mask_counts_every_non_zero_finite_value(tmp_path):
    paths = _study(tmp_path)
    m = np.zeros(SHAPE)
    m[0], m[1], m[2] = 1.0, 1e-50, 1e40  # float32 would make these 0 and Inf: outside
    mask = _f64(tmp_path / "mask.nii.gz", m)
    grid = images.read_grid(paths[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast"
        inside = ingest.analysis_mask_voxels(mask, grid, reference=str(paths[0]))
    assert inside[:3].all() and not inside[3].any()


def test_a_float64_observation_mask_counts_every_non_zero_finite_value(tmp_path):
    paths = _study(tmp_path)
    masks = []
    for i in range(len(paths)):
        m = np.ones(SHAPE)
        m[0, 0, 0], m[0, 0, 1] = 1e-50, 1e40  # observed in every image
        m[3] = 0.0  # not observed
        masks.append(_f64(tmp_path / f"om{i}.nii.gz", m))
    packed = ingest.pack_images(paths, tmp_path / "packed.h5", observation_masks=masks)
    seen = {tuple(v) for v in packed.voxels.tolist()}
    assert (0, 0, 0) in seen and (0, 0, 1) in seen and not any(v[0] == 3 for v in seen)
    row = [tuple(v) for v in packed.voxels.tolist()].index((0, 0, 0))
    assert packed.n_observed[row] == len(paths)


def test_a_float64_gifti_mask_is_read_as_stored(tmp_path):
    from nibabel import gifti

    img = gifti.GiftiImage()
    img.add_gifti_data_array(gifti.GiftiDataArray(np.array([0.0, 1e-50, 1e40, 1.0]),
                                                  datatype="NIFTI_TYPE_FLOAT64"))
    (tmp_path / "m.func.gii").write_bytes(img.to_xml(mode="force"))  # float64: not GIfTI 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = images.read_mask(tmp_path / "m.func.gii")
    assert inside.reshape(-1).tolist() == [False, True, True, True]


# --------------------------------------------------------------------------- 2. CIFTI template
def _cifti(path: Path, mask: np.ndarray, name: str = "CortexLeft") -> Path:
    models = cifti2.BrainModelAxis.from_mask(mask, name=name)
    header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(["m"]), models))
    nib.save(cifti2.Cifti2Image(np.ones((1, int(mask.sum())), np.float32), header), str(path))
    return path


@pytest.fixture
def template(tmp_path, monkeypatch):
    """A CIFTI input whose header is kept by path (too large for an HDF5 attribute), and
    the ``space`` the fit stores for it."""
    monkeypatch.setattr(surface, "MAX_HEADER_CHARS", 10)
    mask = np.zeros(40, bool)
    mask[::2] = True
    path = _cifti(tmp_path / "s00.dscalar.nii", mask)
    return path, images.read_grid(path).space


def test_the_template_digest_is_stored_and_an_unchanged_template_exports(template, tmp_path):
    path, space = template
    info = json.loads(space)
    assert info["template"] == str(path.resolve())
    assert info[surface.TEMPLATE_COUNT] == 20 and len(info[surface.TEMPLATE_DIGEST]) == 64
    surface.save_surface_map(tmp_path / "b.dscalar.nii", np.ones((20, 1)), space, ("b",))
    assert nib.load(str(tmp_path / "b.dscalar.nii")).header.get_axis(1) == \
        cifti2.BrainModelAxis.from_mask(np.arange(40) % 2 == 0, name="CortexLeft")


@pytest.mark.parametrize("count, structure", [(20, "CortexRight"), (20, "CortexLeft"),
                                              (25, "CortexLeft")])
def test_a_replaced_template_is_refused_in_one_line(template, tmp_path, count, structure):
    path, space = template
    mask = np.zeros(40, bool)
    mask[:count] = True  # other vertices (or structure, or count) than the fit read
    _cifti(path, mask, structure)
    with pytest.raises(UserError, match="changed since the fit") as err:
        surface.save_surface_map(tmp_path / "b.dscalar.nii", np.ones((20, 1)), space, ("b",))
    assert str(path.resolve()) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "b.dscalar.nii").exists()


def test_a_template_replaced_by_a_plain_nifti_is_refused(template, tmp_path):
    path, space = template
    nib.save(nib.Nifti1Image(np.ones((20, 1, 1), np.float32), np.eye(4)), str(path))
    with pytest.raises(UserError, match="changed since the fit"):
        surface.save_surface_map(tmp_path / "b.dscalar.nii", np.ones((20, 1)), space, ("b",))


def test_an_older_space_without_digest_keeps_working_and_refuses_another_count(template,
                                                                              tmp_path):
    path, space = template
    old = json.dumps({"format": "cifti", "template": str(path.resolve())})  # before the digest
    surface.save_surface_map(tmp_path / "a.dscalar.nii", np.ones((20, 1)), old, ("a",))
    mask = np.zeros(40, bool)
    mask[:25] = True
    _cifti(path, mask)
    with pytest.raises(UserError, match="changed since the fit"):
        surface.save_surface_map(tmp_path / "b.dscalar.nii", np.ones((20, 1)), old, ("b",))
    # a packed file of such a space is packed again, to record the digest
    assert not ingest._space_complete(old) and ingest._space_complete(space)


# --------------------------------------------------------------------------- 3. non-UTF-8 paths
def test_a_path_that_is_not_utf8_is_fingerprinted_by_its_stat_alone(tmp_path):
    """A latin-1 name is stat'ed, not encoded (it was a UnicodeEncodeError); the key holds
    no path at all, so the same files reached through a symbolic link (a fault audit's
    ``--resume`` through ``biglink/``) have the same fingerprint, and the order counts."""
    name = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"img_\xe9.nii")))
    name.write_bytes(b"x")
    st = os.stat(name)
    assert ingest._stat_key(name) == f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode()
    plain = tmp_path / "plain.nii"
    plain.write_bytes(b"xy")
    (tmp_path / "link").symlink_to(tmp_path)
    via_link = [tmp_path / "link" / "plain.nii", tmp_path / "link" / name.name]
    assert ingest._fingerprint([plain, name], None, None, True) == \
        ingest._fingerprint(via_link, None, None, True)
    assert ingest._fingerprint([plain, name], None, None, True) != \
        ingest._fingerprint([name, plain], None, None, True)


def test_a_study_in_a_latin1_folder_is_packed(tmp_path):
    folder = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"etude_\xe9")))
    paths = _study(folder, n=4)
    packed = ingest.pack_images(paths, folder / "out" / "packed.h5")
    assert packed.n_voxels == int(np.prod(SHAPE))
    import h5py

    with h5py.File(packed.path, "r") as f:
        assert [bytes(x) for x in f["images"][...]] == [os.fsencode(str(p)) for p in paths]


# --------------------------------------------------------------------------- 4. huge header
def test_the_first_image_s_short_data_is_refused_before_packing(tmp_path):
    paths = _study(tmp_path, n=3)
    p = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), str(p))
    raw = bytearray(p.read_bytes())
    struct.pack_into("<3h", raw, 42, 50, 40, 30)  # the header claims 60,000 voxels
    p.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="truncated") as err:
        images.verify_size(p)
    assert str(p) in str(err.value)
    with pytest.raises(UserError, match="truncated"):
        ingest.pack_images([p] + paths, tmp_path / "packed.h5")


# --------------------------------------------------------------------------- 5. NaN affine
def _nan_affine(path: Path, data: np.ndarray) -> Path:
    img = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    img.set_qform(AFFINE, 1)
    img.set_sform(AFFINE, 2)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, 280, float("nan"))  # srow_x[0]
    path.write_bytes(bytes(raw))
    return path


def test_a_nan_affine_is_refused_at_the_image(tmp_path):
    paths = _study(tmp_path, n=2)
    bad = _nan_affine(tmp_path / "nan.nii", np.ones(SHAPE))
    with pytest.raises(UserError, match="affine holds NaN or Inf") as err:
        images.read_grid(bad)
    assert str(bad) in str(err.value)
    grid = images.read_grid(paths[0])
    with pytest.raises(UserError, match="affine holds NaN or Inf"):  # not "differs by nan mm"
        images.read_volume(bad, grid, str(paths[0]))


# --------------------------------------------------------------------------- 6. minor
def test_a_grid_of_no_voxel_is_refused_at_its_header(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 2), np.float32), np.eye(4)), str(tmp_path / "e.nii"))
    with pytest.raises(UserError, match=r"holds no voxel: its grid is \(4, 0, 2\)"):
        images.read_grid(tmp_path / "e.nii")
    from nibabel import gifti

    img = gifti.GiftiImage()
    img.add_gifti_data_array(gifti.GiftiDataArray(np.zeros(0, np.float32)))
    nib.save(img, str(tmp_path / "e.func.gii"))
    with pytest.raises(UserError, match="holds no vertex"):
        images.read_grid(tmp_path / "e.func.gii")


def test_nibabel_s_header_fixes_are_not_logged_while_inputs_are_read(tmp_path, monkeypatch):
    import logging

    p = tmp_path / "odd.nii"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), str(p))
    raw = bytearray(p.read_bytes())
    raw = raw[:352] + b"\0" * 8 + raw[352:]
    struct.pack_into("<f", raw, 108, 360.0)  # vox_offset not divisible by 16: logged
    p.write_bytes(bytes(raw))
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("nibabel.global")
    handler = Catch()
    logger.addHandler(handler)
    try:
        nib.load(str(p)).header  # nibabel alone logs it
        assert seen
        seen.clear()
        grid = images.read_grid(p)
        images.read_volume(p, grid)
        images.verify_data(p)
        assert seen == []
    finally:
        logger.removeHandler(handler)
    assert logger.level == logging.NOTSET  # restored after reading


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_single_file_nifti_whose_data_offset_is_inside_its_header_is_refused(tmp_path,
                                                                            suffix):
    """vox_offset 0 in a .nii: nibabel reads the data from byte 0 (the header's bytes as
    values: every voxel ended at status 7), FSL from 352; refused, naming the offset."""
    import gzip

    path = tmp_path / f"a{suffix}"
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(4, 3, 2), np.eye(4)),
             str(tmp_path / "a.nii"))
    raw = bytearray((tmp_path / "a.nii").read_bytes())
    struct.pack_into("<f", raw, 108, 0.0)
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    grid = images.read_grid(path)
    for read in (lambda: images.read_volume(path, grid), lambda: images.verify_data(path)):
        with pytest.raises(UserError, match=r"a\.nii(\.gz)?: corrupt header: vox_offset is 0, "
                                            r"but the data .* start at byte 352 or later"):
            read()
