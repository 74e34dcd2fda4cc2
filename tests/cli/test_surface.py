"""Surface studies end to end through the CLI at 2 ranks: GIfTI and CIFTI dense scalar.

A simulated NIfTI study is rewritten onto a fake surface (voxel ``j`` in C order becomes
vertex / grayordinate ``j``), one ``.func.gii`` or ``.dscalar.nii`` per observation.  The fit
of each must equal the NIfTI fit of the same data bit for bit (same numbers in the same
voxel order), and its maps come back in the input's format, readable by nibabel, with every
volume named.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from .studies import read_results

SHAPE = (5, 4, 3)
N = int(np.prod(SHAPE))


def _surface_study(study, fmt: str):
    """Copy ``study``'s spec with its images rewritten as GIfTI or CIFTI files."""
    import nibabel as nib
    from nibabel import cifti2, gifti

    folder = study / fmt
    folder.mkdir()
    names = []
    models = cifti2.BrainModelAxis.from_mask(np.ones(N, bool), name="CortexLeft")
    for line in (study / "images.txt").read_text().split():
        data = np.asarray(nib.load(study / line).dataobj, dtype=np.float32).reshape(-1)
        stem = f"{fmt}/{line.split('/')[-1].split('.')[0]}"
        if fmt == "gifti":
            img = gifti.GiftiImage(meta=gifti.GiftiMetaData(
                {"AnatomicalStructurePrimary": "CortexLeft"}))
            img.add_gifti_data_array(gifti.GiftiDataArray(data, intent="NIFTI_INTENT_NONE",
                                                          datatype="NIFTI_TYPE_FLOAT32"))
            name = f"{stem}.func.gii"
        else:
            header = cifti2.Cifti2Header.from_axes((cifti2.ScalarAxis(["thickness"]), models))
            img = cifti2.Cifti2Image(data[None, :], header)
            img.nifti_header.set_intent("ConnDenseScalar")
            name = f"{stem}.dscalar.nii"
        nib.save(img, study / name)
        names.append(name)
    spec = json.loads((study / "spec.json").read_text())
    spec.update(images=names, output=f"out_{fmt}")
    path = study / f"spec_{fmt}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("surface") / "study"
    job = subprocess.run([sys.executable, "-m", "mpiblmm", "simulate", str(folder),
                          "--subjects", "8", "--visits", "3", "--shape", *map(str, SHAPE),
                          "--missing-fraction", "0.4", "--seed", "5"],
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    return folder


@pytest.fixture(scope="module")
def nifti_fit(study):
    import subprocess
    import sys

    job = subprocess.run([sys.executable, "-m", "mpiblmm", "fit", str(study / "spec.json"),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    return read_results(study / "results" / "results.h5")


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("fmt", ["gifti", "cifti"])
def test_surface_study_fits_at_2_ranks_like_the_volume(study, nifti_fit, fmt, run_mpi,
                                                       mpiblmm_command):
    import nibabel as nib

    spec = _surface_study(study, fmt)
    run = run_mpi(2, [*mpiblmm_command, "fit", str(spec)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = read_results(study / f"out_{fmt}" / "results.h5")
    # the fit's lines count what the study has (a journey audit: "voxels" of a surface)
    unit = {"gifti": "vertices", "cifti": "grayordinates"}[fmt]
    V = res["voxels"].shape[0]
    assert f"mpiblmm: {V} {unit} x " in run.stdout
    assert re.search(rf"mpiblmm: fitted \d+ of {V} {unit} in ", run.stdout), run.stdout
    assert re.search(rf"fit {V:,}/{V:,} {unit} \(100\.0%\)", run.stdout), run.stdout
    assert " voxels" not in run.stdout, run.stdout
    check = run_mpi(1, [*mpiblmm_command, "check", str(spec)], timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"candidate {unit}: at most {N} (all {N} {unit} of the surface" in check.stdout
    assert "voxel" not in check.stdout.split("candidate ", 1)[1], check.stdout
    assert json.loads(res["@"]["space"])["format"] == fmt
    assert tuple(res["@"]["grid_shape"]) == (N, 1, 1)
    np.testing.assert_array_equal(res["voxels"][:, 0], np.flatnonzero(
        np.isin(np.arange(N), np.ravel_multi_index(tuple(nifti_fit["voxels"].T), SHAPE))))
    for key in ("beta", "sigma2", "status", "n", "iterations", "contrasts/time/t",
                "contrasts/age_or_time/F"):
        np.testing.assert_array_equal(res[key], nifti_fit[key], err_msg=key)

    maps = study / f"out_{fmt}" / "nifti"
    suffix = {"gifti": ".func.gii", "cifti": ".dscalar.nii"}[fmt]
    index = json.loads((maps / "maps.json").read_text())
    assert set(index) == {p.name for p in maps.glob(f"*{suffix}")} and len(index) >= 20
    flat = res["voxels"][:, 0]

    def load(stem):
        img = nib.load(maps / f"{stem}{suffix}")
        if fmt == "gifti":
            names = [d.meta["Name"] for d in img.darrays]
            data = np.column_stack([d.data for d in img.darrays])
        else:
            names = list(img.header.get_axis(0).name)
            data = np.asarray(img.dataobj).T
            assert img.nifti_header.get_intent() == ("ConnDenseScalar", (), "ConnDenseScalar")
            assert isinstance(img.header.get_axis(1), nib.cifti2.BrainModelAxis)
        assert names == index[f"{stem}{suffix}"]["volumes"], stem
        assert data.shape[0] == N
        return data

    beta = load("beta")
    np.testing.assert_allclose(beta[flat], res["beta"], rtol=1e-6 if fmt == "gifti" else 0)
    status = load("status")
    assert status.dtype == np.uint8
    outside = np.setdiff1d(np.arange(N), flat)
    assert (status[outside] == 8).all()
    np.testing.assert_array_equal(status[flat, 0], res["status"])
    z = load("con_time_z")[flat, 0]
    assert np.all(np.sign(z[np.isfinite(z)]) == np.sign(res["contrasts/time/t"][np.isfinite(z)]))
    assert load("n").dtype == np.int32
    if fmt == "gifti":  # intents as the volume maps': z and p maps say so, the others NONE
        intents = {stem: {d.intent for d in nib.load(maps / f"{stem}{suffix}").darrays}
                   for stem in ("con_time_z", "con_time_p", "beta", "con_time_t")}
        assert intents == {"con_time_z": {nib.nifti1.intent_codes.code["z score"]},
                           "con_time_p": {nib.nifti1.intent_codes.code["p value"]},
                           "beta": {0}, "con_time_t": {0}}, intents

    if fmt == "gifti":  # the report draws surface maps by vertex, also launched on 2 ranks
        run = run_mpi(2, [*mpiblmm_command, "report", str(study / "out_gifti" / "results.h5")],
                      timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        page = (study / "out_gifti" / "report" / "report.html").read_text()
        assert page.count("data:image/png;base64,") >= 10 and "vertex" not in run.stderr
