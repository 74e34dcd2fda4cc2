"""`mpiblmm check` refuses what `mpiblmm fit` refuses, with the fit's own line (audit B).

Each case is a bad input that `check` used to pass (exit 0) while `fit` stopped at it with
exit code 2: linearly dependent random-effect covariates Z, an output folder that is a file
or lies under one, an analysis mask with no voxel in it, packed HDF5 input the fit refuses
(no affine, no grid_shape, a grid that does not match, duplicate / out-of-grid / unsorted
voxels, text data, odd attributes), and a first image or analysis mask whose header reads
but whose data does not (an error inside check's candidate-voxel count, which at several
ranks came out as ``rank 0: ...`` and an MPI abort).  Audit 10 added: RGB and
complex-valued images (refused from their header's datatype, by check for every image and
by the fit for any), a symbolic link loop, a FIFO or a folder named as an image, a spec that
is not UTF-8, and a memory budget too small to run (its line holds the memory the process
measures: compared with the numbers masked).

The designs no voxel could fit (rank-deficient X, p >= n, lme4's refusals of a grouping
factor, ``min_n`` above n) used to get ``check``'s own wording (and its unscaled rank test);
both now come from :func:`mpiblmm.checks.fittable_problems`.

For every case ``check`` must exit 2 on every rank with exactly one ``mpiblmm: error:`` line
naming the file or key, and ``fit`` must print the very same line (one test per case).  The
cases run in-process through ``bad_inputs_driver.py``, one launch for all of them: at 1 rank
every case, check and fit; at 3 ranks the unreadable-data cases and a few others; plus the
console script itself at 3 ranks.  The files are written with the bad-input suite's helpers.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import _run_job, mpiexec_command

from .test_bad_inputs import (GRID, N, _Y, _mk, _packed_ok, _spec_argv, _t, base_X, base_spec,
                              edit, factor_file, h5, images_replaced, nifti, packed, raw,
                              setkey, with_file, write_base, x_file, z_file)


def _truncated_gz(data: np.ndarray):
    """A .nii.gz whose header reads but whose compressed data ends early."""
    def write(path: Path):
        import nibabel as nib

        img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
        raw = gzip.compress(img.to_bytes())
        path.write_bytes(raw[:len(raw) - 20])
    return write


def _bad_crc_gz(data: np.ndarray):
    """A .nii.gz whose header reads but whose gzip checksum is wrong."""
    def write(path: Path):
        import nibabel as nib

        raw = bytearray(gzip.compress(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
                                      .to_bytes()))
        raw[-8] ^= 0xFF
        path.write_bytes(bytes(raw))
    return write


def _truncated_nii(data: np.ndarray, cut: int = 40):
    """An uncompressed .nii whose header reads but whose data ends ``cut`` bytes early."""
    def write(path: Path):
        import nibabel as nib

        raw = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
        path.write_bytes(raw[:len(raw) - cut])
    return write


def _observation_masks(index: int, writer):
    """Observation masks (all ones) with mask ``index`` written by ``writer`` (bad.nii.gz)."""
    def change(spec, base, case):
        ones = nifti(np.ones(GRID, np.uint8))
        paths = []
        for i in range(N):
            p = case / ("bad.nii.gz" if i == index else f"m{i:02d}.nii")
            (writer if i == index else ones)(p)
            paths.append(str(p))
        spec["observation_masks"] = paths
    return edit(change)


def _masks_nothing_observed():
    """Observation masks that are 0 (one NaN) everywhere (check passed them; the fit's
    packing found no voxel observed)."""
    def change(spec, base, case):
        zeros = np.zeros(GRID + (N,), np.float32)
        zeros[0, 0, 0, 1] = np.nan
        paths = []
        for i in range(N):
            nifti(zeros[..., i])(case / f"m{i:02d}.nii")
            paths.append(str(case / f"m{i:02d}.nii"))
        spec["observation_masks"] = paths
    return edit(change)


def _truncated_4d(keep: float):
    """All images as one 4-D .nii.gz whose compressed data ends after ``keep`` of it (check
    printed gzip's traceback, exit 1, reading the header of a later volume)."""
    def change(spec, base, case):
        import nibabel as nib

        data = np.stack([_Y()[i].reshape(GRID) for i in range(N)], axis=-1).astype(np.float32)
        raw = gzip.compress(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
        (case / "all4d.nii.gz").write_bytes(raw[:int(len(raw) * keep)])
        spec["images"] = str(case / "all4d.nii.gz")
    return edit(change)


def _first_image(writer):
    """The image list with image 0 replaced by ``bad.nii.gz`` written by ``writer``."""
    def change(spec, base, case):
        writer(case / "bad.nii.gz")
        spec["images"] = [str(case / "bad.nii.gz")] + [
            str(base / f"images/obs{i:02d}.nii") for i in range(1, N)]
    return edit(change)


def _with_voxels(vox: np.ndarray, grid=GRID):
    """Packed (N, len(vox)) data listing its voxels in ``/vox``."""
    def build(f):
        d = f.create_dataset("Y", data=np.random.default_rng(1).normal(
            100, 1, size=(N, len(vox))).astype(np.float32))
        d.attrs["grid_shape"] = np.array(grid)
        d.attrs["affine"] = np.diag([2.0, 2.0, 2.0, 1.0])
        d.attrs["voxels"] = "/vox"
        f.create_dataset("vox", data=np.asarray(vox, dtype=np.int32))
    return packed(h5(build))


def _grid_voxels() -> np.ndarray:
    return np.argwhere(np.ones(GRID, dtype=bool)).astype(np.int32)  # C order


def _attrs(**attrs):
    def build(f):
        d = f.create_dataset("Y", data=_Y())
        for k, v in attrs.items():
            d.attrs[k] = v
    return packed(h5(build))


def _packed_with_mask(mask: np.ndarray):
    def change(spec, base, case):
        h5(_packed_ok)(case / "p.h5")
        nifti(mask)(case / "m.nii")
        spec.update(images={"h5": str(case / "p.h5")}, analysis_mask=str(case / "m.nii"))
    return edit(change)


def _dup() -> np.ndarray:
    v = _grid_voxels()
    v[5] = v[4]
    return v


def _oob() -> np.ndarray:
    v = _grid_voxels()
    v[-1] = (GRID[0], 0, 0)
    return v


def _unsorted() -> np.ndarray:
    return _grid_voxels()[::-1].copy()


AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])

#: name -> (writer(base, case) -> fit argv, the text the one error line must contain).
CASES = {
    "Z: the intercept twice": (
        z_file(np.ones((N, 2))),
        "Z.csv: random effects of factor 'subject': column 2"),
    "X: a column a multiple of another": (
        x_file(np.column_stack([base_X(), 2 * base_X()[:, 1]])),
        "{case}/X.csv: column 4 ('x3') is a linear combination of the columns before it: X is "
        "rank deficient"),
    "X: a column dependent up to 1e-7 of its size": (   # check's unscaled rank passed it
        x_file(np.column_stack([base_X(), base_X()[:, 1] + base_X()[:, 2] + 1e-7
                                * np.random.default_rng(3).normal(size=N)])),
        "{case}/X.csv: column 4 ('x3') is nearly a linear combination of the columns before "
        "it (only 7.6e-08 of it lies outside their span"),
    "X: more fixed effects than observations": (
        x_file(np.random.default_rng(2).normal(size=(N, N))),
        "{case}/X.csv: 24 fixed effects (columns) but only 24 observations (rows)"),
    "factor with one level": (
        factor_file(["all"] * N),
        "spec.json: random[0] ('subject'): has 1 level: a grouping factor needs at least 2"),
    "one observation per level": (
        factor_file([f"s{i}" for i in range(N)]),
        "spec.json: random[0] ('subject'): 24 observations for 48 random effects"),
    "min_n above n": (
        setkey("missingness.min_n", N + 1),
        "spec.json: missingness.min_n: 25 is more than the 24 observations"),
    "Z: a column a multiple of another": (
        z_file(np.column_stack([_t(), 3 * _t()])), "Z.csv: random effects of factor 'subject'"),
    "output is a file": (
        edit(lambda s, b, c: s.update(output=str(b / "X.csv"))),
        "spec.json: output: {base}/X.csv exists and is not a folder"),
    "output under a file": (
        edit(lambda s, b, c: s.update(output=str(b / "X.csv" / "sub"))),
        "spec.json: output: cannot create the folder {base}/X.csv/sub (Not a directory)"),
    "output under a dangling link": (
        edit(lambda s, b, c: ((c / "gone").symlink_to(c / "nowhere"),
                              s.update(output=str(c / "gone" / "out")))),
        "spec.json: output: cannot create the folder {case}/gone/out (No such file"),
    "analysis mask all zero": (
        with_file("analysis_mask", "m.nii", nifti(np.zeros(GRID, np.uint8))),
        "{case}/m.nii: no voxel is observed in any image inside the analysis mask: the mask "
        "is empty"),
    "analysis mask all NaN": (
        with_file("analysis_mask", "m.nii", nifti(np.full(GRID, np.nan, np.float32))),
        "{case}/m.nii: no voxel is observed in any image inside the analysis mask"),
    "packed input, analysis mask all zero": (
        _packed_with_mask(np.zeros(GRID, np.uint8)),
        "{case}/m.nii: no voxel is observed in any image inside the analysis mask"),
    "packed input, mask outside the stored voxels": (
        edit(lambda s, b, c: (
            h5(lambda f: (_packed_ok(f, Y=_Y()[:, :4]), f["Y"].attrs.__setitem__(
                "voxels", "/vox"), f.create_dataset("vox", data=_grid_voxels()[:4])))(c / "p.h5"),
            nifti(np.isin(np.arange(18), [10, 11]).reshape(GRID).astype(np.uint8))(c / "m.nii"),
            s.update(images={"h5": str(c / "p.h5")}, analysis_mask=str(c / "m.nii")))),
        "{case}/p.h5: no voxel is observed in any observation inside the analysis mask"),
    "packed without affine": (
        _attrs(grid_shape=np.array(GRID)), "{case}/p.h5: /Y: attribute 'affine' (4x4) is missing"),
    "packed flat without grid_shape": (
        _attrs(affine=AFFINE), "{case}/p.h5: /Y: attribute 'grid_shape' is missing"),
    "packed flat, grid of another size": (
        _attrs(affine=AFFINE, grid_shape=np.array((4, 4, 4))),
        "{case}/p.h5: /Y: 18 columns but the grid has 64 voxels"),
    "packed voxels repeated": (
        _with_voxels(_dup()), "{case}/p.h5: /vox: voxels must be distinct and in C order"),
    "packed voxel outside the grid": (
        _with_voxels(_oob()), "{case}/p.h5: /vox: a voxel lies outside grid_shape (3, 3, 2)"),
    "packed voxels not in C order": (
        _with_voxels(_unsorted()), "{case}/p.h5: /vox: voxels must be distinct and in C order"),
    "packed text data": (
        packed(h5(lambda f: (f.create_dataset("Y", data=np.full((N, 18), b"a")),
                             f["Y"].attrs.__setitem__("affine", AFFINE),
                             f["Y"].attrs.__setitem__("grid_shape", np.array(GRID))))),
        "{case}/p.h5: /Y: expected a numeric (observations x voxels) or (observations x grid) "
        "dataset, got |S1"),
    "packed affine as text": (
        _attrs(affine="eye", grid_shape=np.array(GRID)),
        "{case}/p.h5: /Y: attribute 'affine' must be 4x4 numbers"),
    "packed grid_shape as text": (
        _attrs(affine=AFFINE, grid_shape="3x3x2"),
        "{case}/p.h5: /Y: grid_shape must be 3 positive whole numbers"),
    "packed voxels a group": (
        packed(h5(lambda f: (_packed_ok(f), f["Y"].attrs.__setitem__("voxels", "/g"),
                             f.create_group("g")))),
        "{case}/p.h5: /Y: its voxels '/g' is not a dataset"),
    "an RGB image": (
        images_replaced(5, nifti(np.zeros(GRID, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))),
        "{case}/bad.nii: is an RGB image (datatype RGB24): expected one number per voxel"),
    "a complex-valued image": (
        images_replaced(7, nifti((_Y()[7] + 1j).reshape(GRID).astype(np.complex64))),
        "{case}/bad.nii: is a complex-valued image (datatype complex64): expected one real "
        "number per voxel"),
    "a complex-valued first image": (   # the one image whose data check reads
        images_replaced(0, nifti((_Y()[0] + 0j).reshape(GRID).astype(np.complex128))),
        "{case}/bad.nii: is a complex-valued image (datatype complex128)"),
    "image a symbolic link loop": (
        images_replaced(5, lambda p: p.symlink_to(p)),
        "spec.json: images[5]: symbolic link loop: {case}/bad.nii"),
    "image a FIFO": (
        images_replaced(5, lambda p: os.mkfifo(p)),
        "spec.json: images[5]: not a regular file: {case}/bad.nii"),
    "image a directory, in a list file": (
        edit(lambda s, b, c: ((c / "img.nii").mkdir(), (c / "list.txt").write_text("".join(
            f"{b}/images/obs{i:02d}.nii\n" if i != 4 else "img.nii\n" for i in range(N))),
            s.update(images=str(c / "list.txt")))),
        "{case}/list.txt: row 5: is a directory, not a file: {case}/img.nii"),
    "image list file missing": (
        edit(lambda s, b, c: s.update(images=str(c / "image.txt"))),
        "spec.json: images: file not found: {case}/image.txt"),
    "observation mask list file missing": (
        edit(lambda s, b, c: s.update(observation_masks=str(c / "masks.txt"))),
        "spec.json: observation_masks: file not found: {case}/masks.txt"),
    "spec not UTF-8": (
        raw(b'{"images": "\xe9t\xe9.txt"}'),
        "{case}/spec.json: not UTF-8 text (byte 13 cannot be decoded); save the spec as UTF-8"),
    "max_memory_mb too little to run": (
        setkey("max_memory_mb", 20),
        "spec.json: max_memory_mb: 20 MiB per rank is too little to run: a rank already "
        "holds"),
    "first image data unreadable": (
        _first_image(_truncated_gz(_Y()[0].reshape(GRID))),
        "{case}/bad.nii.gz: truncated gzip data"),
    # check read only the first image's data: a later image's was found by the fit alone
    "a later image truncated (uncompressed)": (
        images_replaced(17, _truncated_nii(_Y()[17].reshape(GRID).astype(np.float32))),
        "{case}/bad.nii: truncated: the header describes 72 bytes of data from byte 352, "
        "424 bytes in all, but the file has 384 bytes"),
    "a later image's gzip data truncated": (
        images_replaced(11, _truncated_gz(_Y()[11].reshape(GRID)), "bad.nii.gz"),
        "{case}/bad.nii.gz: truncated gzip data"),
    "a later image's gzip CRC wrong": (
        images_replaced(N - 1, _bad_crc_gz(_Y()[N - 1].reshape(GRID)), "bad.nii.gz"),
        "{case}/bad.nii.gz: corrupt gzip data (CRC check failed)"),
    # check said nibabel's words ("not a readable NIfTI image (ImageFileError: ...)")
    "a later image an empty file": (
        images_replaced(5, lambda path: path.write_bytes(b""), "bad.nii.gz"),
        "{case}/bad.nii.gz: empty file"),
    "a later image not gzip data": (
        images_replaced(5, lambda path: path.write_bytes(b"plain text\n"), "bad.nii.gz"),
        "{case}/bad.nii.gz: not gzip data (a .gz file must be gzip-compressed)"),
    "a 4-D image's gzip data truncated": (
        _truncated_4d(0.6), "{case}/all4d.nii.gz: truncated gzip data"),
    "an observation mask's gzip CRC wrong": (
        _observation_masks(6, _bad_crc_gz(np.ones(GRID, np.uint8))),
        "{case}/bad.nii.gz: corrupt gzip data (CRC check failed)"),
    "observation masks all zero": (
        _masks_nothing_observed(),
        "{base}/images/obs00.nii: no voxel is observed in any image (this, the first, and "
        "every other) where its observation mask is non-zero (every mask is 0, NaN or Inf "
        "wherever its image is observed)"),
    "analysis mask data unreadable": (
        with_file("analysis_mask", "m.nii.gz", _bad_crc_gz(np.ones(GRID, np.uint8))),
        "{case}/m.nii.gz: corrupt gzip data"),
}

#: Cases whose line holds what the process measures (the memory it holds): check and fit
#: must print the same words, the numbers may differ by a few MiB.
MEASURED = ("max_memory_mb too little to run",)

#: Also run at 3 ranks (check and fit): the errors inside check's candidate count, and others.
AT_THREE_RANKS = ("first image data unreadable", "analysis mask data unreadable",
                  "a later image truncated (uncompressed)", "a later image's gzip CRC wrong",
                  "a complex-valued image", "observation masks all zero",
                  "Z: the intercept twice", "output under a file", "analysis mask all zero",
                  "packed voxels repeated")


def _run(tmp_path: Path, ranks: int, names) -> dict:
    """Write the cases, run check then fit for each in one job of ``ranks`` ranks; return
    per case its folder and the check's and the fit's results ({"ranks": [...]})."""
    base = tmp_path / "base"
    write_base(base)
    jobs, folders = [], {}
    control = _mk(tmp_path / "control")
    control_spec = _spec_argv(control, base_spec(base, control))[1]
    jobs.append({"name": "control", "argv": ["check", control_spec]})
    for i, name in enumerate(names):
        case = _mk(tmp_path / f"case{i:02d}")
        argv = CASES[name][0](base, case)
        assert argv[0] == "fit"
        jobs.append({"name": f"check: {name}", "argv": ["check", argv[1]]})
        jobs.append({"name": f"fit: {name}", "argv": argv})
        folders[name] = case
    (tmp_path / "cases.json").write_text(json.dumps(jobs))
    driver = Path(__file__).with_name("bad_inputs_driver.py")
    launcher = mpiexec_command()
    assert launcher is not None, "no mpiexec found (run scripts/setup.sh)"
    job = _run_job([*launcher, os.environ.get("MPIEXEC_NUMPROC_FLAG", "-n"), str(ranks),
                    sys.executable, str(driver), str(tmp_path / "cases.json"),
                    str(tmp_path / "out.json")], timeout=600, env=None, cwd=None)
    assert not job.timed_out, job.stdout[-2000:] + job.stderr[-3000:]
    assert job.returncode == 0, (f"the job ended at {job.stdout.strip().splitlines()[-1:]}: "
                                 f"{job.stderr[-3000:]}")
    out = {r["name"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert [r["code"] for r in out["control"]["ranks"]] == [0] * ranks, out["control"]
    return {n: {"base": base, "case": folders[n], "check": out[f"check: {n}"],
                "fit": out[f"fit: {n}"]} for n in names}


def _agree(name: str, result: dict, ranks: int) -> None:
    """check: exit 2 on every rank, one error line naming the culprit; fit: that very line."""
    culprit = CASES[name][1].format(base=result["base"], case=result["case"])
    err = "".join(r["stderr"] for r in result["check"]["ranks"])
    fit_err = "".join(r["stderr"] for r in result["fit"]["ranks"])
    lines = [ln for ln in err.splitlines() if ln.startswith("mpiblmm: error:")]
    assert [r["code"] for r in result["check"]["ranks"]] == [2] * ranks, err
    assert len(lines) == 1 and culprit in lines[0], f"expected {culprit!r} in {err!r}"
    assert "Traceback" not in err and "rank 0" not in err, err
    assert [r["code"] for r in result["fit"]["ranks"]] == [2] * ranks, fit_err
    fit_lines = [ln for ln in fit_err.splitlines() if ln.strip()]
    if name in MEASURED:
        fit_lines, lines = ([re.sub(r"\d+", "#", ln) for ln in x] for x in (fit_lines, lines))
    assert fit_lines == lines, fit_err


@pytest.fixture(scope="module")
def at_one_rank(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one_rank"), 1, list(CASES))


@pytest.fixture(scope="module")
def at_three_ranks(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("three_ranks"), 3, AT_THREE_RANKS)


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("name", list(CASES))
def test_check_refuses_what_fit_refuses_with_the_same_line(name, at_one_rank):
    _agree(name, at_one_rank[name], 1)


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("name", AT_THREE_RANKS)
def test_at_three_ranks_one_line_and_exit_2_on_every_rank(name, at_three_ranks):
    _agree(name, at_three_ranks[name], 3)


@pytest.mark.spawns_mpiexec
def test_check_through_the_command_at_three_ranks(tmp_path, run_mpi, mpiblmm_command):
    """The console script itself (not the in-process driver): the first image's data cannot
    be read, and check at 3 ranks says so once, with exit code 2 from the launcher."""
    base = tmp_path / "base"
    write_base(base)
    case = _mk(tmp_path / "case")
    spec = CASES["first image data unreadable"][0](base, case)[1]
    run = run_mpi(3, [*mpiblmm_command, "check", spec], timeout=120)
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("mpiblmm: error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr
    assert f"{case}/bad.nii.gz: truncated gzip data" in errors[0]
    assert "Traceback" not in run.stderr and "Abort" not in run.stderr, run.stderr
