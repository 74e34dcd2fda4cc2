"""The fast path of packing (mpiblmm.io.nifti.read_stored) against nibabel, value for value.

It must give exactly nibabel's numbers when it applies (float32/float64 single-file NIfTI-1
without scaling, on the first image's geometry byte for byte) and step aside (``None``) for
everything else, which then goes through nibabel as before.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import nibabel as nib  # noqa: E402  runtime dependency: a missing one must fail, not skip

from mpiblmm.io.images import read_grid, read_stored, with_geometry  # noqa: E402
from mpiblmm.io.ingest import pack_images, read_slab  # noqa: E402
from mpiblmm.io.nifti import read_volume  # noqa: E402
from tests.io.helpers import AFFINE, GRID  # noqa: E402


def _write(path, data, affine=AFFINE, endianness=None, slope=None):
    header = nib.Nifti1Header(endianness=endianness) if endianness else None
    img = nib.Nifti1Image(np.asarray(data), affine, header=header)
    img.set_data_dtype(np.asarray(data).dtype)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))
    return path


def _data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(10, 3, size=GRID).astype(dtype)
    d[0, 0, 0], d[1, 2, 0], d[3, 4, 2] = np.nan, np.inf, 0.0
    return d


def _nibabel(path):
    """What nibabel gives in the stored dtype (C-order, flat)."""
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=img.get_data_dtype().newbyteorder("="))).reshape(-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("endianness", [None, ">"])
def test_same_values_as_nibabel(tmp_path, dtype, suffix, endianness):
    first = _write(tmp_path / f"first{suffix}", _data(dtype, 1), endianness=endianness)
    grid = with_geometry(read_grid(first), first)
    other = _write(tmp_path / f"other{suffix}", _data(dtype, 2), endianness=endianness)
    for path in (first, other):
        got = read_stored(path, grid)
        want = _nibabel(path)
        assert got is not None and got.dtype == np.dtype(dtype) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            got, read_volume(path, grid, dtype=dtype).reshape(-1))


def test_steps_aside_for_anything_else(tmp_path):
    first = _write(tmp_path / "first.nii.gz", _data(np.float32))
    grid = with_geometry(read_grid(first), first)
    moved = AFFINE.copy()
    moved[0, 3] += 1e-6  # within nibabel's tolerance of the grid, but other bytes
    cases = {
        "int16": _write(tmp_path / "i.nii.gz", np.arange(60, dtype=np.int16).reshape(GRID)),
        "scaled": _write(tmp_path / "s.nii.gz", _data(np.float32), slope=(2.0, 1.0)),
        "affine": _write(tmp_path / "a.nii.gz", _data(np.float32), affine=moved),
        "shape": _write(tmp_path / "sh.nii.gz", np.zeros((4, 5, 4), np.float32)),
        "endianness": _write(tmp_path / "e.nii.gz", _data(np.float32), endianness=">"),
        "nifti2": tmp_path / "n2.nii",
    }
    nib.save(nib.Nifti2Image(_data(np.float32), AFFINE), str(cases["nifti2"]))
    for name, path in cases.items():
        assert read_stored(path, grid) is None, name
    truncated = tmp_path / "t.nii"
    raw = _write(tmp_path / "full.nii", _data(np.float32)).read_bytes()
    truncated.write_bytes(raw[:-8])
    assert read_stored(truncated, grid) is None
    import gzip  # two gzip members (concatenated files): read whole and verified, as nibabel

    members = tmp_path / "m.nii.gz"
    members.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_stored(members, grid), _nibabel(tmp_path / "full.nii"))
    np.testing.assert_array_equal(read_volume(members, grid).reshape(-1),
                                  _nibabel(tmp_path / "full.nii"))
    assert read_stored(first, read_grid(first)) is None  # a grid without the geometry


def test_packing_mixed_sources_matches_nibabel(tmp_path):
    """float32 (fast path), float64 that float32 cannot hold, and scaled int16 (nibabel)."""
    images = [_write(tmp_path / f"f{i}.nii.gz", _data(np.float32, i)) for i in range(3)]
    images.append(_write(tmp_path / "scaled.nii.gz", np.arange(60, dtype=np.int16).reshape(GRID),
                         slope=(0.5, 2.0)))
    for dtype, name in ((np.float32, "packed32.h5"), (np.float64, "packed64.h5")):
        paths = images + ([_write(tmp_path / "f64.nii", _data(np.float64, 9))]
                          if dtype == np.float64 else [])
        packed = pack_images(paths, tmp_path / name, zero_is_missing=True)
        rows = []
        for p in paths:
            v = np.asarray(nib.load(str(p)).get_fdata()).reshape(-1)
            rows.append(np.where(np.isfinite(v) & (v != 0), v, np.nan))
        want = np.stack(rows)
        want = want[:, np.isfinite(want).any(axis=0)]
        import h5py

        with h5py.File(packed.path, "r") as f:
            assert f["Y"].dtype == dtype
        np.testing.assert_array_equal(read_slab(packed, 0, packed.n_voxels), want.T)


def test_packing_reuses_a_given_fingerprint(tmp_path, monkeypatch):
    """The fit hands packing the fingerprint its setup computed: no second stat of every
    image (40,000 stat calls on rank 0 at UK Biobank size), and the same file."""
    import mpiblmm.io.ingest as ingest

    images = [_write(tmp_path / f"f{i}.nii.gz", _data(np.float32, i)) for i in range(3)]
    fingerprint = ingest._fingerprint(images, None, None, True)

    def no_stat(*args, **kwargs):
        raise AssertionError("stat'ed the images again")

    monkeypatch.setattr(ingest, "_fingerprint", no_stat)
    packed = pack_images(images, tmp_path / "p.h5", fingerprint=fingerprint)
    import h5py

    with h5py.File(packed.path, "r") as f:
        assert f.attrs["source"] == fingerprint
    again = pack_images(images, tmp_path / "p.h5", fingerprint=fingerprint)  # reused
    np.testing.assert_array_equal(read_slab(again, 0, again.n_voxels),
                                  read_slab(packed, 0, packed.n_voxels))


def test_an_image_replaced_with_its_size_and_mtime_kept_is_packed_again(tmp_path):
    """``cp -p`` / ``touch -r`` keep a replaced image's size and modification time (and a
    coarse-time file system may too): its inode differs, so the fingerprint does, and the
    packed file of the old image is not reused (by --overwrite or --resume)."""
    import shutil

    import mpiblmm.io.ingest as ingest

    images = [_write(tmp_path / f"f{i}.nii", _data(np.float32, i)) for i in range(3)]
    before = ingest._fingerprint(images, None, None, True)
    old = pack_images(images, tmp_path / "p.h5", fingerprint=before)
    old_rows = read_slab(old, 0, old.n_voxels)
    st = images[1].stat()
    fixed = _write(tmp_path / "fixed.nii", _data(np.float32, 1) * 10)
    assert fixed.stat().st_size == st.st_size
    os.utime(fixed, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(fixed, tmp_path / "new.nii")
    os.replace(tmp_path / "new.nii", images[1])            # same path, size and mtime
    assert images[1].stat().st_mtime_ns == st.st_mtime_ns
    after = ingest._fingerprint(images, None, None, True)
    assert after != before
    again = pack_images(images, tmp_path / "p.h5", fingerprint=after)
    assert not np.array_equal(read_slab(again, 0, again.n_voxels), old_rows)
    assert ingest._fingerprint(images, None, None, True) == after  # stable while unchanged


def test_values_beyond_float32_are_packed_as_float64_without_a_warning(tmp_path):
    import warnings

    images = [_write(tmp_path / f"f{i}.nii", _data(np.float64, i)) for i in range(2)]
    big = _data(np.float64, 5)
    big[2, 2, 1], big[2, 3, 1] = 1e300, -1e300
    images.append(_write(tmp_path / "big.nii", big))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "overflow encountered in cast" would leak to stderr
        packed = pack_images(images, tmp_path / "p.h5")
    rows = read_slab(packed, 0, packed.n_voxels)
    assert rows.dtype == np.float64 and 1e300 in rows and -1e300 in rows


def test_the_fingerprint_ignores_what_does_not_change_content(tmp_path):
    """chmod, touch -a, a hard link and a read change an image's change time (or access
    time) but not a byte: the fingerprint stays (a --resume is not refused, packed.h5 is
    reused); writing other bytes of the same size does change it."""
    import mpiblmm.io.ingest as ingest

    images = [_write(tmp_path / f"f{i}.nii", _data(np.float32, i)) for i in range(3)]
    mask = _write(tmp_path / "m.nii", np.ones(GRID, dtype=np.float32))

    def fp():
        return ingest._fingerprint(images, None, mask, True)

    before = fp()
    st1 = images[1].stat()
    os.chmod(images[1], 0o600)
    os.chmod(mask, 0o640)
    st = images[2].stat()
    os.utime(images[2], ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))   # touch -a
    os.link(images[0], tmp_path / "another-name.nii")
    images[0].read_bytes()
    assert images[1].stat().st_ctime_ns != st1.st_ctime_ns      # what the old key held
    assert fp() == before
    raw = bytearray(images[1].read_bytes())
    raw[-1] ^= 0x01                                      # one bit of the data, same size
    images[1].write_bytes(bytes(raw))
    # (the clock may not have ticked since the file was written: the write's own mtime)
    os.utime(images[1], ns=(st1.st_atime_ns, st1.st_mtime_ns + 10**6))
    assert fp() != before
