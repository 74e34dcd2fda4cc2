"""Image input through `mpiblmm fit`, `check` and `export`: what an audit found, each refused
in one line (exit 2) or simply working (in-process side: ``tests/io/test_image_input_audit.py``).

- a float64 analysis mask above float32's range: analysed as nibabel reads it, no warning;
- a CIFTI template (kept by path) replaced after the fit: `export` refuses it, exit 2;
- a study in a folder named with a latin-1 byte, or a JSON list naming a surrogate escape:
  fitted at 1 and 2 ranks;
- headers claiming 2000^3 voxels over 24 stored: `fit` says "truncated" (as `check` does)
  within a 3 GB address space, instead of a MemoryError;
- a NaN in the affine: refused at the first image by `fit` and `check`, before any fit;
- a grid of no voxel: `check` refuses it as `fit` does;
- nibabel's header-fix log lines are not printed once per image.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SUBJECTS, VISITS = 4, 3
N = SUBJECTS * VISITS
SHAPE = (4, 3, 2)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _data(seed: int = 0, shape: tuple = SHAPE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    subject = rng.normal(0, 3, (SUBJECTS,) + shape)
    return [100 + subject[i // VISITS] + rng.normal(0, 2, shape) for i in range(N)]


def _spec(folder: Path, images, as_list_file: bool = True, **extra) -> Path:
    """An intercept-only study in the matrix form; ``images`` a list of names (written to a
    list file, or with ``as_list_file=False`` given as a JSON list) and ``extra`` keys."""
    np.savetxt(folder / "X.csv", np.ones((N, 1)), fmt="%g", delimiter=",")
    (folder / "factor.csv").write_text("".join(f"s{i // VISITS}\n" for i in range(N)))
    spec = {"X": "X.csv", "random": [{"name": "subject", "factor": "factor.csv"}],
            "contrasts": [{"name": "mean", "weights": [1]}], "output": "out", **extra}
    if as_list_file:
        (folder / "images.txt").write_text("".join(f"{p}\n" for p in images))
        spec["images"] = "images.txt"
    else:
        spec["images"] = images
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


def _nifti_study(folder: Path, seed: int = 0) -> list[str]:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, a in enumerate(_data(seed)):
        nib.save(nib.Nifti1Image(a.astype(np.float32), AFFINE), str(folder / f"img{i:02d}.nii"))
        names.append(f"img{i:02d}.nii")
    return names


def _run(*argv, cwd=None, limit_bytes=None):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    job = subprocess.run([sys.executable, "-m", "mpiblmm", *map(str, argv)], capture_output=True,
                         text=True, timeout=300, cwd=cwd,
                         preexec_fn=limit if limit_bytes else None)
    return job.returncode, job.stderr


def _one_line(code: int, stderr: str, expected: str) -> str:
    """The refusal: exit 2, no traceback, one error line holding ``expected``."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("mpiblmm: error: ")]
    assert len(errors) == 1 and expected in errors[0], stderr
    return errors[0]


def _voxels(folder: Path) -> np.ndarray:
    import h5py

    with h5py.File(folder / "out" / "results.h5", "r") as f:
        return f["voxels"][...]


# --------------------------------------------------------------------------- 1. masks
def test_a_float64_mask_above_float32_range_is_analysed_without_warning(tmp_path):
    import nibabel as nib

    names = _nifti_study(tmp_path)
    m = np.zeros(SHAPE)
    m[0], m[1], m[2] = 1.0, 1e-50, 1e40
    nib.save(nib.Nifti1Image(m, AFFINE, dtype=np.float64), str(tmp_path / "mask.nii.gz"))
    spec = _spec(tmp_path, names, analysis_mask="mask.nii.gz")
    code, stderr = _run("fit", spec, "--quiet")
    assert code == 0, stderr
    assert "Warning" not in stderr, stderr
    assert sorted(set(_voxels(tmp_path)[:, 0].tolist())) == [0, 1, 2]


# --------------------------------------------------------------------------- 2. CIFTI template
@pytest.fixture(scope="module")
def cifti_big(tmp_path_factory):
    """A fitted CIFTI study whose header is too large for results.h5 (kept by path)."""
    import nibabel as nib
    from nibabel import cifti2

    folder = tmp_path_factory.mktemp("cifti_big")
    rng = np.random.default_rng(30)
    left, right = np.zeros(32492, bool), np.zeros(32492, bool)
    left[rng.choice(32492, 8000, replace=False)] = True
    right[rng.choice(32492, 8000, replace=False)] = True
    models = (cifti2.BrainModelAxis.from_mask(left, name="CortexLeft")
              + cifti2.BrainModelAxis.from_mask(right, name="CortexRight"))
    names = []
    for i, a in enumerate(_data(1, (len(models),))):
        header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(["m"]), models))
        nib.save(cifti2.Cifti2Image(a.astype(np.float32)[None], header),
                 str(folder / f"s{i:02d}.dscalar.nii"))
        names.append(f"s{i:02d}.dscalar.nii")
    code, stderr = _run("fit", _spec(folder, names), "--quiet")
    assert code == 0, stderr
    import h5py

    with h5py.File(folder / "out" / "results.h5", "r") as f:
        assert "template" in json.loads(f.attrs["space"])
    return folder, len(models)


@pytest.mark.parametrize("extra", [0, 5])  # other brain models of the same, or another, count
def test_export_refuses_a_template_replaced_since_the_fit(cifti_big, extra):
    import nibabel as nib
    from nibabel import cifti2

    folder, count = cifti_big
    first = folder / "s00.dscalar.nii"
    kept = first.read_bytes()
    try:
        mask = np.zeros(32492, bool)
        mask[:count + extra] = True
        models = cifti2.BrainModelAxis.from_mask(mask, name="CortexRight")
        header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(["m"]), models))
        nib.save(cifti2.Cifti2Image(np.ones((1, count + extra), np.float32), header), str(first))
        code, stderr = _run("export", folder / "out" / "results.h5")
        line = _one_line(code, stderr, "changed since the fit")
        assert str(first) in line
        assert stderr.strip() == line, stderr  # no nibabel warning before it
    finally:
        first.write_bytes(kept)
    code, stderr = _run("export", folder / "out" / "results.h5")
    assert code == 0, stderr


# --------------------------------------------------------------------------- 3. non-UTF-8 paths
@pytest.mark.spawns_mpiexec
def test_a_study_in_a_folder_named_in_latin1_is_fitted(tmp_path, run_mpi):
    folder = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"etude_\xe9")))
    spec = _spec(folder, _nifti_study(folder))
    code, stderr = _run("fit", spec, "--quiet")
    assert code == 0, stderr
    job = run_mpi(2, [sys.executable, "-m", "mpiblmm", "fit", str(spec), "--quiet",
                      "--overwrite"], timeout=300)
    assert job.returncode == 0, job.stderr


def test_a_json_list_naming_a_surrogate_escape_is_fitted(tmp_path):
    import nibabel as nib

    names = []
    for i, a in enumerate(_data(2)):
        raw = os.path.join(os.fsencode(tmp_path), f"img{i:02d}_".encode() + b"\xe9.nii")
        nib.save(nib.Nifti1Image(a.astype(np.float32), AFFINE), os.fsdecode(raw))
        names.append(os.path.basename(os.fsdecode(raw)))
    assert "\udce9" in names[0]
    spec = _spec(tmp_path, names, as_list_file=False)
    code, stderr = _run("fit", spec, "--quiet")
    assert code == 0, stderr
    assert _voxels(tmp_path).shape == (int(np.prod(SHAPE)), 3)


# --------------------------------------------------------------------------- 4. huge header
def test_a_header_claiming_a_huge_grid_is_refused_as_truncated_in_bounded_memory(tmp_path):
    import nibabel as nib

    names = []
    for i, a in enumerate(_data(3)):
        p = tmp_path / f"i{i:02d}.nii"
        nib.save(nib.Nifti1Image(a.astype(np.float32), np.eye(4)), str(p))
        raw = bytearray(p.read_bytes())
        struct.pack_into("<3h", raw, 42, 2000, 2000, 2000)
        p.write_bytes(bytes(raw))
        names.append(p.name)
    spec = _spec(tmp_path, names)
    code, stderr = _run("fit", spec, "--quiet", limit_bytes=3 * 10**9)
    fit_line = _one_line(code, stderr, "truncated")
    assert str(tmp_path / "i00.nii") in fit_line
    code, stderr = _run("check", spec)
    assert code == 2 and "truncated" in stderr and "Traceback" not in stderr, stderr


# --------------------------------------------------------------------------- 5. NaN affine
def test_a_nan_affine_is_refused_at_the_first_image_by_fit_and_check(tmp_path):
    from tests.io.test_image_input_audit import _nan_affine

    names = [_nan_affine(tmp_path / f"img{i:02d}.nii", a).name for i, a in enumerate(_data(4))]
    spec = _spec(tmp_path, names)
    code, stderr = _run("fit", spec, "--quiet")
    fit_line = _one_line(code, stderr, "affine holds NaN or Inf")
    assert str(tmp_path / "img00.nii") in fit_line
    assert not (tmp_path / "out" / "results.h5").exists()  # refused before the fit
    code, stderr = _run("check", spec)
    assert _one_line(code, stderr, "affine holds NaN or Inf") == fit_line


# --------------------------------------------------------------------------- 6. minor
def test_check_refuses_a_grid_of_no_voxel_as_fit_does(tmp_path):
    import nibabel as nib

    names = []
    for i in range(N):
        nib.save(nib.Nifti1Image(np.zeros((4, 0, 2), np.float32), np.eye(4)),
                 str(tmp_path / f"i{i:02d}.nii.gz"))
        names.append(f"i{i:02d}.nii.gz")
    spec = _spec(tmp_path, names)
    code, stderr = _run("fit", spec, "--quiet")
    fit_line = _one_line(code, stderr, "holds no voxel")
    code, stderr = _run("check", spec)
    assert _one_line(code, stderr, "holds no voxel") == fit_line


def test_nibabel_header_fixes_are_not_printed_per_image(tmp_path):
    import nibabel as nib

    names = []
    for i, a in enumerate(_data(5)):
        p = tmp_path / f"img{i:02d}.nii"
        nib.save(nib.Nifti1Image(a.astype(np.float32), AFFINE), str(p))
        raw = bytearray(p.read_bytes())
        raw = raw[:352] + b"\0" * 8 + raw[352:]
        struct.pack_into("<f", raw, 108, 360.0)  # "vox offset (=360) not divisible by 16"
        p.write_bytes(bytes(raw))
        names.append(p.name)
    spec = _spec(tmp_path, names)
    code, stderr = _run("check", spec)
    assert code == 0 and stderr == "", stderr
    code, stderr = _run("fit", spec, "--quiet")
    assert code == 0, stderr
    # (the spec's parsing, in mpiblmm/spec.py, still reads the first and last headers
    # through nibabel itself: at most those two lines, never one per image)
    assert len(stderr.splitlines()) <= 2, stderr
