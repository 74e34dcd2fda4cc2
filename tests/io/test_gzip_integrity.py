"""Corrupt ``.nii.gz`` inputs are refused, not read as garbage (audit: n_gzip_bodycorrupt).

nibabel reads only the bytes of a gzip stream it needs and never checks the CRC-32 or the
length at its end, so bytes flipped inside the compressed data gave garbage values (up to
1e38) and a fit "complete" on them.  Every reader of image data now decompresses the stream
to its end (zlib checks both), and a bad one is one line: ``<file>: corrupt gzip data (...)``.
A valid ``.nii.gz`` reads exactly as before (nibabel's numbers, bit for bit).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import nibabel as nib  # noqa: E402  runtime dependency: a missing one must fail, not skip

from mpiblmm.errors import UserError  # noqa: E402
from mpiblmm.io import nifti  # noqa: E402
from mpiblmm.io.images import read_grid, read_stored, read_volume, with_geometry  # noqa: E402
from mpiblmm.io.ingest import pack_images  # noqa: E402
from mpiblmm.spec import volume_path  # noqa: E402
from tests.io.helpers import AFFINE, GRID  # noqa: E402

CRC = "corrupt gzip data (CRC check failed)"


def _data(dtype=np.float32, seed=0, shape=GRID):
    d = np.random.default_rng(seed).normal(10, 3, size=shape).astype(dtype)
    d.reshape(-1)[:3] = np.nan, np.inf, 0.0
    return d


def _write(path: Path, data, slope=None, endianness=None, klass=nib.Nifti1Image) -> Path:
    header = nib.Nifti1Header(endianness=endianness) if endianness else None
    img = klass(np.asarray(data), AFFINE, header=header)
    img.set_data_dtype(np.asarray(data).dtype)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, str(path))
    return path


def _members(raw: bytes) -> int:
    """Where the first gzip member's compressed data ends (its 8-byte trailer follows)."""
    unzip = zlib.decompressobj(31)
    unzip.decompress(raw)
    assert unzip.eof
    return len(raw) - len(unzip.unused_data) - 8


def flip_middle(path: Path) -> Path:
    """Flip bytes in the middle of the compressed data until zlib decodes it to the end with
    only the CRC-32 wrong (the silent kind: nibabel reads such a file without a word)."""
    raw = path.read_bytes()
    end = _members(raw)
    for pos in range(end // 2, end):
        bad = bytearray(raw)
        bad[pos] ^= 0x55
        try:
            zlib.decompress(bytes(bad), 31)
        except zlib.error as exc:
            if "incorrect data check" in str(exc):
                path.write_bytes(bytes(bad))
                return path
    raise AssertionError("no flip gives a CRC failure")


def corrupt(path: Path, how: str) -> Path:
    """``path`` (a valid .nii.gz) damaged in one of several ways."""
    raw = bytearray(path.read_bytes())
    end = _members(bytes(raw))
    if how == "middle":
        return flip_middle(path)
    if how == "zeroed":          # a run of zeros in the middle of the compressed data
        raw[end // 2: end // 2 + 16] = bytes(16)
    elif how == "crc":           # the CRC-32 in the trailer
        raw[end] ^= 0xFF
    elif how == "length":        # the length in the trailer
        raw[end + 4] ^= 0x01
    elif how == "no trailer":    # cut inside the trailer: nibabel read such files too
        raw = raw[:end + 3]
    elif how == "garbage after":
        raw += b"junk"
    path.write_bytes(bytes(raw))
    return path


WHY = {"middle": CRC, "zeroed": "corrupt gzip data", "crc": CRC,
       "length": "corrupt gzip data (length check failed)",
       "no trailer": "truncated gzip data", "garbage after": "corrupt gzip data"}


# --------------------------------------------------------------------------- function level
@pytest.mark.parametrize("how", sorted(WHY))
def test_a_damaged_stream_is_refused_by_every_reader(tmp_path, how):
    first = _write(tmp_path / "first.nii.gz", _data(seed=1))
    grid = with_geometry(read_grid(first), first)
    bad = corrupt(_write(tmp_path / "bad.nii.gz", _data(seed=2)), how)
    why = re.escape(f"{bad}: {WHY[how]}")
    with pytest.raises(UserError, match=f"^{why}"):
        read_stored(bad, grid)              # the fast path of packing
    with pytest.raises(UserError, match=f"^{why}"):
        read_volume(bad, grid, dtype=np.float64)
    with pytest.raises(UserError, match=f"^{why}") as info:
        pack_images([first, bad], tmp_path / "packed.h5")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "packed.h5").exists()


def test_the_audit_case_bytes_flipped_in_the_middle(tmp_path):
    """The audit's file: zlib decodes it to the end, only the CRC-32 is wrong (nibabel, which
    never reads that far, gave no error, only other values)."""
    good = _write(tmp_path / "good.nii.gz", _data(seed=3))
    bad = flip_middle(_write(tmp_path / "bad.nii.gz", _data(seed=3)))
    grid = with_geometry(read_grid(good), good)
    with pytest.raises(UserError, match=r"bad.nii.gz: corrupt gzip data \(CRC check failed\)"):
        read_volume(bad, grid)
    assert read_grid(bad).shape == GRID      # the header alone is fine (`check` reads it)


@pytest.mark.parametrize("kind", ["int16 scaled", "other geometry", "nifti2", "mask"])
def test_images_off_the_fast_path_are_verified_too(tmp_path, kind):
    """Images read_stored steps aside for (after a look at the header only) are verified
    where nibabel reads them: read_volume, which packing, masks and `check` use."""
    first = _write(tmp_path / "first.nii.gz", _data(seed=1))
    grid = with_geometry(read_grid(first), first)
    path = tmp_path / "bad.nii.gz"
    if kind == "int16 scaled":
        _write(path, np.arange(60, dtype=np.int16).reshape(GRID), slope=(0.5, 2.0))
    elif kind == "other geometry":
        img = nib.Nifti1Image(_data(seed=2), AFFINE)
        img.header["pixdim"][4] = 3.0          # other bytes, the same grid
        nib.save(img, str(path))
    elif kind == "nifti2":
        _write(path, _data(seed=2), klass=nib.Nifti2Image)
    else:
        _write(path, (_data(seed=2) > 9).astype(np.uint8))
    corrupt(path, "crc")
    assert read_stored(path, grid) is None
    with pytest.raises(UserError, match=r"bad.nii.gz: corrupt gzip data \(CRC check failed\)"):
        read_volume(path, grid)
    masks = [path, path] if kind == "mask" else None
    images = [first, first] if kind == "mask" else [first, path]
    with pytest.raises(UserError, match=r"bad.nii.gz: corrupt gzip data \(CRC check failed\)"):
        pack_images(images, tmp_path / "packed.h5", observation_masks=masks)
    if kind == "mask":
        with pytest.raises(UserError, match=r"bad.nii.gz: corrupt gzip data"):
            pack_images([first, first], tmp_path / "packed2.h5", analysis_mask=path)


def test_other_gzip_problems_are_one_line(tmp_path):
    first = _write(tmp_path / "first.nii.gz", _data(seed=1))
    grid = with_geometry(read_grid(first), first)
    raw = first.read_bytes()
    plain = tmp_path / "plain.nii.gz"       # not compressed at all
    plain.write_bytes(gzip.decompress(raw))
    with pytest.raises(UserError, match=r"plain.nii.gz: not gzip data"):
        read_volume(plain, grid)
    assert read_stored(plain, grid) is None
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.nii.gz: "):
        read_volume(empty, grid)
    padded = tmp_path / "padded.nii.gz"      # NUL padding after the stream: gzip allows it
    padded.write_bytes(raw + bytes(5))
    np.testing.assert_array_equal(read_volume(padded, grid), read_volume(first, grid))
    np.testing.assert_array_equal(read_stored(padded, grid), read_stored(first, grid))


# --------------------------------------------------------------------------- valid files
def _nibabel(path: Path, dtype) -> np.ndarray:
    """What read_volume gave before: nibabel reading the file by name."""
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float64 if dtype == np.float64 else np.float32)
                      ).reshape(GRID).astype(dtype, copy=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_valid_files_read_bit_identically(tmp_path, dtype):
    first = _write(tmp_path / "first.nii.gz", _data(seed=1))
    grid = with_geometry(read_grid(first), first)
    files = {
        "float32": _write(tmp_path / "f32.nii.gz", _data(np.float32, 2)),
        "float64": _write(tmp_path / "f64.nii.gz", _data(np.float64, 3)),
        "big-endian": _write(tmp_path / "be.nii.gz", _data(np.float32, 4), endianness=">"),
        "int16 scaled": _write(tmp_path / "i16.nii.gz", np.arange(60, dtype=np.int16
                                                                  ).reshape(GRID), slope=(0.5, 2)),
        "nifti2": _write(tmp_path / "n2.nii.gz", _data(np.float32, 5), klass=nib.Nifti2Image),
        "uncompressed": _write(tmp_path / "u.nii", _data(np.float32, 6)),
    }
    raw = files["float32"].read_bytes()  # two gzip members: gzip (and nibabel) read both
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(gzip.decompress(raw)[:500])
                                          + gzip.compress(gzip.decompress(raw)[500:]))
    files["two members"] = tmp_path / "two.nii.gz"
    for name, path in files.items():
        got = read_volume(path, grid, dtype=dtype)
        want = _nibabel(path, dtype)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name
        stored = read_stored(path, grid)
        if stored is not None:
            stored_want = np.asarray(nib.load(str(path)).get_fdata(
                dtype=stored.dtype)).reshape(-1)
            assert stored.tobytes() == stored_want.tobytes(), name


# --------------------------------------------------------------------------- 4-D inputs
def test_four_d_volumes_are_verified_once_and_read_as_before(tmp_path):
    four = _write(tmp_path / "four.nii.gz", _data(np.float32, 7, shape=GRID + (5,)))
    grid = read_grid(volume_path(four, 0))
    img = nib.load(str(four))
    for i in range(5):
        got = read_volume(volume_path(four, i), grid, dtype=np.float64)
        want = np.asarray(img.slicer[..., i].get_fdata(dtype=np.float64))
        assert got.tobytes() == want.tobytes()
        assert read_stored(volume_path(four, i), grid) is None   # nibabel reads volumes

    # the CRC of the whole file is wrong: volume 0 lies far before it, and is refused too
    corrupt(four, "crc")
    st = four.stat()
    os.utime(four, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # another version of it
    for i in (0, 4):
        with pytest.raises(UserError, match=r"four.nii.gz: corrupt gzip data \(CRC check failed\)"):
            read_volume(volume_path(four, i), grid)

    again = flip_middle(_write(tmp_path / "again.nii.gz", _data(np.float32, 8, shape=GRID + (5,))))
    with pytest.raises(UserError, match=r"again.nii.gz: corrupt gzip data \(CRC check failed\)"):
        pack_images([volume_path(again, i) for i in range(5)], tmp_path / "packed.h5")
    cut = corrupt(_write(tmp_path / "cut.nii.gz", _data(np.float32, 9, shape=GRID + (5,))),
                  "no trailer")
    with pytest.raises(UserError, match=r"cut.nii.gz: truncated gzip data"):
        read_volume(volume_path(cut, 0), grid)


def test_a_four_d_file_is_decompressed_once_per_process(tmp_path, monkeypatch):
    four = _write(tmp_path / "four.nii.gz", _data(np.float32, 7, shape=GRID + (4,)))
    grid = read_grid(volume_path(four, 0))
    opened = []
    real = nifti._read_to_end

    def counting(fh, name):
        opened.append(name)
        return real(fh, name)

    monkeypatch.setattr(nifti, "_read_to_end", counting)
    for i in range(4):
        read_volume(volume_path(four, i), grid)
    assert opened == [str(four)]
    assert any(key[0] == str(four) for key in nifti._VERIFIED)


# --------------------------------------------------------------------------- the command line
def _study(tmp_path: Path) -> tuple[Path, list[dict], dict]:
    """The bad-input suite's valid study and cases on top of it: (base, cases, culprits)."""
    from tests.cli.test_bad_inputs import GRID as CLI_GRID, N, base_spec, _spec_argv, write_base

    base = tmp_path / "base"
    write_base(base)

    def images_with(case: Path, index: int, how: str | None) -> list[str]:
        paths = [str(base / f"images/obs{i:02d}.nii") for i in range(N)]
        data = np.asanyarray(nib.load(paths[index]).dataobj)
        bad = case / "obs_gz.nii.gz"
        nib.save(nib.Nifti1Image(data, nib.load(paths[index]).affine), str(bad))
        if how is not None:
            corrupt(bad, how)
        paths[index] = str(bad)
        return paths

    cases, culprits = [], {}
    for name, how, index in (("control: a valid .nii.gz", None, 7),
                             ("bytes flipped in the middle", "middle", 7),
                             ("bytes zeroed in the middle", "zeroed", 0),
                             ("CRC flipped", "crc", N - 1)):
        case = tmp_path / name.split(":")[0].replace(" ", "_")
        case.mkdir()
        spec = base_spec(base, case)
        spec["images"] = images_with(case, index, how)
        cases.append({"name": name, "argv": _spec_argv(case, spec)})
        culprits[name] = (f"obs_gz.nii.gz: {WHY[how]}" if how else None, case)
    case = tmp_path / "four_d"
    case.mkdir()
    Y = np.stack([np.asanyarray(nib.load(str(base / f"images/obs{i:02d}.nii")).dataobj)
                  for i in range(N)], axis=-1)
    assert Y.shape == CLI_GRID + (N,)
    nib.save(nib.Nifti1Image(Y, np.diag([2.0, 2.0, 2.0, 1.0])), str(case / "four.nii.gz"))
    corrupt(case / "four.nii.gz", "middle")
    spec = base_spec(base, case)
    spec["images"] = str(case / "four.nii.gz")
    cases.append({"name": "4-D file, bytes flipped", "argv": _spec_argv(case, spec)})
    culprits["4-D file, bytes flipped"] = (f"four.nii.gz: {CRC}", case)
    return base, cases, culprits


def _complete(case: Path) -> bool:
    import h5py

    for res in case.rglob("results.h5"):
        with h5py.File(res, "r") as f:
            if bool(f.attrs.get("complete", False)):
                return True
    return False


def _judge(name: str, codes: list[int], err: str, culprit: str | None, case: Path) -> str | None:
    lines = err.strip().splitlines()
    if culprit is None:
        ok = all(c == 0 for c in codes) and _complete(case)
    else:
        ok = (all(c == 2 for c in codes) and len(lines) == 1
              and lines[0].startswith("mpiblmm: error: ") and culprit in lines[0]
              and "Traceback" not in err and not _complete(case))
    return None if ok else f"{name}: codes {codes}, expected {culprit!r} in: {err[-800:]!r}"


@pytest.mark.spawns_mpiexec
def test_fit_refuses_a_corrupt_gz_at_three_ranks(tmp_path, run_mpi):
    """Exit code 2 on every rank, one line naming the file, no complete results file."""
    _, cases, culprits = _study(tmp_path)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    driver = Path(__file__).parents[1] / "cli" / "bad_inputs_driver.py"
    job = run_mpi(3, [sys.executable, str(driver), str(tmp_path / "cases.json"),
                      str(tmp_path / "out.json")], timeout=600)
    assert not job.timed_out and job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    problems = []
    for r in json.loads((tmp_path / "out.json").read_text()):
        culprit, case = culprits[r["name"]]
        problems.append(_judge(r["name"], [x["code"] for x in r["ranks"]],
                               "".join(x["stderr"] for x in r["ranks"]), culprit, case))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_fit_refuses_a_corrupt_gz_at_one_rank(tmp_path, mpiblmm_command):
    """The `mpiblmm` command itself (one process): exit code 2, one line, nothing complete."""
    import subprocess

    _, cases, culprits = _study(tmp_path)
    problems = []
    for c in cases[1:2] + cases[-1:]:     # flipped bytes in a 3-D file and in a 4-D file
        proc = subprocess.run([*mpiblmm_command, *c["argv"]], capture_output=True, text=True,
                              timeout=300)
        culprit, case = culprits[c["name"]]
        problems.append(_judge(c["name"], [proc.returncode], proc.stderr, culprit, case))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)
