"""What a surface (or 4-D) study gets wrong is refused by `check` and `fit` in one line, exit 2.

A small GIfTI study in the formula form (left hemisphere, one file per observation), then
specs that break one rule each: a right hemisphere among the left ones, a NIfTI observation
or mask in the GIfTI study, every observation in one GIfTI or CIFTI file, a 4-D NIfTI inside
a list, a glob for ``images``.  A ``.label.gii`` analysis mask is accepted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

SUBJECTS, VISITS, VERTICES = 6, 3, 24
N = SUBJECTS * VISITS
FORMULA = "y ~ age + (1 | subject)"

def _save_gifti(path, values, structure="CortexLeft", n_arrays=1, intent="NIFTI_INTENT_NONE"):
    import nibabel as nib
    from nibabel import gifti

    img = gifti.GiftiImage(meta=gifti.GiftiMetaData(
        {} if structure is None else {"AnatomicalStructurePrimary": structure}))
    for j in range(n_arrays):
        data = np.asarray(values if np.ndim(values) == 1 else values[j])
        img.add_gifti_data_array(gifti.GiftiDataArray(
            data, intent=intent,
            datatype="NIFTI_TYPE_INT32" if data.dtype.kind == "i" else "NIFTI_TYPE_FLOAT32"))
    nib.save(img, str(path))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The folder of a fittable GIfTI study: ``images.txt``, ``participants.csv``, and the
    same data as NIfTI volumes of VERTICES x 1 x 1 voxels (identity affine) and as one
    48-array GIfTI and one CIFTI of N maps."""
    import nibabel as nib
    from nibabel import cifti2

    folder = tmp_path_factory.mktemp("surface_refusals")
    (folder / "gii").mkdir()
    (folder / "nii").mkdir()
    rng = np.random.default_rng(11)
    rows, names, data = ["subject,age"], [], []
    for s in range(SUBJECTS):
        u = rng.normal(0, 1, VERTICES)
        for v in range(VISITS):
            age = 20 + 3 * s + v
            y = (5 + 0.1 * age + u + rng.normal(0, 1, VERTICES)).astype(np.float32)
            i = len(names)
            _save_gifti(folder / f"gii/lh_{i:02d}.func.gii", y)
            _save_gifti(folder / f"gii/rh_{i:02d}.func.gii", y, structure="CortexRight")
            nib.save(nib.Nifti1Image(y.reshape(VERTICES, 1, 1), np.eye(4)),
                     str(folder / f"nii/v_{i:02d}.nii.gz"))
            names.append(f"gii/lh_{i:02d}.func.gii")
            rows.append(f"s{s},{age}")
            data.append(y)
    (folder / "participants.csv").write_text("\n".join(rows) + "\n")
    (folder / "images.txt").write_text("\n".join(names) + "\n")
    labels = np.where(np.arange(VERTICES) % 4 == 0, 0, 1 + np.arange(VERTICES) % 3).astype(np.int32)
    _save_gifti(folder / "roi.label.gii", labels, structure=None, intent="NIFTI_INTENT_LABEL")
    _save_gifti(folder / "all.func.gii", np.array(data), n_arrays=N)
    models = cifti2.BrainModelAxis.from_mask(np.ones(VERTICES, bool), name="CortexLeft")
    header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis([f"o{i}" for i in range(N)]),
                                            models))
    nib.save(cifti2.Cifti2Image(np.array(data), header), str(folder / "all.dscalar.nii"))
    nib.save(nib.Nifti1Image(np.array(data).T.reshape(VERTICES, 1, 1, N), np.eye(4)),
             str(folder / "all4d.nii.gz"))
    return folder


def _spec(study, name, **changes):
    spec = {"images": "images.txt", "covariates": "participants.csv", "formula": FORMULA,
            "contrasts": [{"name": "age", "weights": {"age": 1}}], "output": f"out_{name}"}
    spec.update(changes)
    (study / f"{name}.json").write_text(json.dumps(spec))
    return f"{name}.json"


def _list(study, name, paths):
    (study / name).write_text("\n".join(paths) + "\n")
    return name


def _run(study, *argv, ranks=1, run_mpi=None):
    command = [sys.executable, "-m", "mpiblmm", *argv]
    if ranks == 1:
        job = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=study)
        return job.returncode, job.stderr
    job = run_mpi(ranks, command, timeout=300, cwd=study)
    assert not job.timed_out
    return job.returncode, job.stderr


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("mpiblmm: error: ")]


def _refused(study, command, spec, expected, ranks=1, run_mpi=None):
    code, stderr = _run(study, command, spec, *(["--quiet"] if command == "fit" else []),
                        ranks=ranks, run_mpi=run_mpi)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = _errors(stderr)
    assert errors and expected in errors[0], stderr
    if command == "fit":
        assert len(errors) == 1, stderr
    return errors[0]


def _hemi(study):
    paths = [f"gii/lh_{i:02d}.func.gii" for i in range(N)]
    paths[5] = "gii/rh_05.func.gii"
    return _spec(study, "hemi", images=_list(study, "hemi.txt", paths))


def _mix(study):
    paths = [f"gii/lh_{i:02d}.func.gii" for i in range(N)]
    paths[4] = "nii/v_04.nii.gz"
    return _spec(study, "mix", images=_list(study, "mix.txt", paths))


@pytest.mark.spawns_mpiexec
def test_fit_refuses_a_right_hemisphere_among_left_ones(study, run_mpi):
    line = _refused(study, "fit", _hemi(study), "gii/rh_05.func.gii: anatomical structure "
                    "CortexRight, but gii/lh_00.func.gii is CortexLeft", ranks=2, run_mpi=run_mpi)
    assert line.endswith("must be of one structure")
    assert not (study / "out_hemi" / "results.h5").exists()
    mask = _spec(study, "hemi_mask", analysis_mask="gii/rh_00.func.gii")
    for command in ("check", "fit"):
        _refused(study, command, mask, "gii/rh_00.func.gii: anatomical structure CortexRight")


def test_check_refuses_a_right_hemisphere_among_left_ones(study):
    _refused(study, "check", _hemi(study), "gii/rh_05.func.gii: anatomical structure CortexRight")


@pytest.mark.spawns_mpiexec
def test_a_first_image_without_structure_does_not_let_hemispheres_mix(study, run_mpi):
    # with no AnatomicalStructurePrimary in the first image, the files that name one were
    # never compared with each other: a right hemisphere among left ones was fitted, and the
    # maps named no structure (surface audit).  Now the files that name one must agree
    # (at any rank count: the ranks each read some), and the maps carry theirs.
    import nibabel as nib

    y = nib.load(str(study / "gii/lh_00.func.gii")).darrays[0].data
    _save_gifti(study / "gii/bare_00.func.gii", y, structure=None)
    paths = ["gii/bare_00.func.gii"] + [f"gii/lh_{i:02d}.func.gii" for i in range(1, N)]
    left = _spec(study, "bare_left", images=_list(study, "bare_left.txt", paths))
    paths[N - 2] = f"gii/rh_{N - 2:02d}.func.gii"
    mixed = _spec(study, "bare_mixed", images=_list(study, "bare_mixed.txt", paths))
    expected = (f"gii/rh_{N - 2:02d}.func.gii: anatomical structure CortexRight, but "
                "gii/lh_01.func.gii is CortexLeft: every image and mask of a surface study "
                "must be of one structure")
    assert _refused(study, "check", mixed, expected) == f"mpiblmm: error: {expected}"
    for ranks in (1, 3):
        assert _refused(study, "fit", mixed, expected, ranks=ranks, run_mpi=run_mpi) == \
            f"mpiblmm: error: {expected}"
    assert not (study / "out_bare_mixed" / "results.h5").exists()
    code, stderr = _run(study, "fit", left, "--quiet", ranks=2, run_mpi=run_mpi)
    assert code == 0, stderr
    maps = nib.load(str(study / "out_bare_left/nifti/beta.func.gii"))
    assert maps.meta["AnatomicalStructurePrimary"] == "CortexLeft"


def test_a_nifti_mask_or_observation_in_a_gifti_study_is_refused(study):
    mask = _spec(study, "nifti_mask", analysis_mask="nii/v_00.nii.gz")
    for command in ("check", "fit"):
        _refused(study, command, mask, "nii/v_00.nii.gz: a NIfTI file, but "
                 "gii/lh_00.func.gii is GIfTI: the images and masks of a study must all be of "
                 "one kind")
    _refused(study, "fit", _mix(study), "nii/v_04.nii.gz: a NIfTI file, but "
             "gii/lh_00.func.gii is GIfTI")


def test_check_refuses_a_nifti_observation_in_a_gifti_study(study):
    _refused(study, "check", _mix(study), "nii/v_04.nii.gz: a NIfTI file, but")


def test_a_surface_of_another_size_is_worded_alike_by_check_and_fit(study):
    """A fault audit: `check` called a GIfTI of 20 vertices in a 24-vertex study "not on the
    grid ...: shape (20, 1, 1) differs", `fit` "not on the surface ...: 20 vertices"; and
    `check` tested a NIfTI mask's shape before its kind, `fit` the kind first."""
    import nibabel as nib

    _save_gifti(study / "gii/short.func.gii", np.ones(20, np.float32))
    paths = [f"gii/lh_{i:02d}.func.gii" for i in range(N)]
    paths[3] = "gii/short.func.gii"
    nib.save(nib.Nifti1Image(np.ones((20, 1, 1), np.float32), np.eye(4)),
             str(study / "nii/short.nii.gz"))
    cases = [(_spec(study, "short", images=_list(study, "short.txt", paths)),
              "gii/short.func.gii: not on the surface of gii/lh_00.func.gii: 20 vertices, "
              "expected 24"),
             (_spec(study, "short_mask", analysis_mask="gii/short.func.gii"),
              "gii/short.func.gii: not on the surface of gii/lh_00.func.gii: 20 vertices, "
              "expected 24"),
             (_spec(study, "short_nifti_mask", analysis_mask="nii/short.nii.gz"),
              "nii/short.nii.gz: a NIfTI file, but gii/lh_00.func.gii is GIfTI")]
    for spec, expected in cases:
        lines = {command: _refused(study, command, spec, expected) for command in ("check", "fit")}
        assert lines["check"] == lines["fit"]


def test_a_label_gifti_analysis_mask_is_accepted(study):
    import nibabel as nib

    spec = _spec(study, "label_mask", analysis_mask="roi.label.gii")
    code, stderr = _run(study, "check", spec)
    assert code == 0, stderr
    job = subprocess.run([sys.executable, "-m", "mpiblmm", "check", spec], capture_output=True,
                         text=True, timeout=300, cwd=study)
    # counted in the surface's words (was "of 24 on the grid"; surface audit)
    assert f"(in the analysis mask, of {VERTICES} vertices of the surface;" in job.stdout, \
        job.stdout
    code, stderr = _run(study, "fit", spec, "--quiet")
    assert code == 0, stderr
    labels = nib.load(str(study / "roi.label.gii")).darrays[0].data
    fitted = nib.load(str(study / "out_label_mask/nifti/mask.func.gii")).darrays[0].data
    assert fitted.any() and not fitted[labels == 0].any()


@pytest.mark.parametrize("images, where, expected", [
    ("all.func.gii", "images", "a GIfTI file with 18 data arrays: expected one data array "
                               "(give one file per observation)"),
    (["all.func.gii"], "images[0]", "a GIfTI file with 18 data arrays"),
    ("all.dscalar.nii", "images", "a CIFTI file with 18 maps: expected one map (give one file "
                                  "per observation)"),
    (["all.dscalar.nii"], "images[0]", "a CIFTI file with 18 maps"),
    ("gii/lh_00.func.gii", "images", "one GIfTI file given: expected one file per observation"),
    (["all4d.nii.gz"], "images[0]", "a 4-D NIfTI with 18 volumes in a list of images"),
    ("gii/*.func.gii", "images", "wildcards are not expanded: gii/*.func.gii"),
    (["gii/*.func.gii"], "images[0]", "file not found: gii/*.func.gii (wildcards are not "
                                      "expanded"),
], ids=["gifti", "gifti-list", "cifti", "cifti-list", "one-gifti", "4d-list", "glob",
        "glob-list"])
def test_several_observations_in_one_file_are_named_first(study, images, where, expected):
    spec = _spec(study, "one_file", images=images)
    for command in ("check", "fit"):
        line = _refused(study, command, spec, f"one_file.json: {where}: {expected}")
        assert "NIfTI image (" not in line and "Error" not in line  # no exception class


@pytest.mark.spawns_mpiexec
def test_fit_on_2_ranks_names_the_4d_image_in_a_list_before_the_row_count(study, run_mpi):
    spec = _spec(study, "four_d_list", images=["all4d.nii.gz"])
    line = _refused(study, "fit", spec, "four_d_list.json: images[0]: a 4-D NIfTI with 18 "
                    "volumes in a list of images", ranks=2, run_mpi=run_mpi)
    assert "rows" not in line
    # given alone it is one observation per volume, and the study fits
    code, stderr = _run(study, "check", _spec(study, "four_d", images="all4d.nii.gz"))
    assert code == 0, stderr
