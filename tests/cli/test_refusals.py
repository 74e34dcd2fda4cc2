"""End to end at 2 ranks: constant voxels get status 7 and no statistics, and are counted;
`estimation.max_iterations: 1` gives status 1 where one iteration was not enough (issue 11:
34 of 128 constant voxels had p < 0.05; `max_iterations: 1` never gave status 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .studies import read_results


def _study(folder, max_iterations=None, constant=128):
    import nibabel as nib

    rng = np.random.default_rng(11)
    n_sub, visits, grid = 12, 4, (16, 8, 2)          # 256 voxels, the first 128 constant
    n = n_sub * visits
    t = np.tile(np.arange(visits), n_sub).astype(float)
    X = np.column_stack([np.ones(n), t])
    sub = np.repeat(np.arange(n_sub), visits)
    V = int(np.prod(grid))
    Y = 50 + (X @ [0.0, 0.3])[:, None] + rng.normal(size=(n_sub, V))[sub] + rng.normal(size=(n, V))
    Y[:, :constant] = rng.uniform(200.0, 900.0, constant)    # constant but not zero
    Y = Y.astype(np.float32)
    folder.mkdir()
    names = []
    for i in range(n):
        nib.save(nib.Nifti1Image(Y[i].reshape(grid), np.eye(4)), folder / f"o{i}.nii")
        names.append(f"o{i}.nii")
    np.savetxt(folder / "X.csv", X, delimiter=",")
    (folder / "f.csv").write_text("".join(f"s{s}\n" for s in sub))
    spec = {"images": names, "X": "X.csv", "random": [{"name": "subject", "factor": "f.csv"}],
            "contrasts": [{"name": "time", "weights": [0, 1]}], "output": "out"}
    if max_iterations is not None:
        spec["estimation"] = {"max_iterations": max_iterations}
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


@pytest.mark.spawns_mpiexec
def test_constant_voxels_and_the_iteration_cap_end_to_end(tmp_path, run_mpi, mpiblmm_command):
    results = {}
    for cap in (None, 1):
        spec = _study(tmp_path / f"cap{cap}", cap)
        job = run_mpi(2, [*mpiblmm_command, "fit", str(spec)], timeout=180)
        assert job.returncode == 0, job.stderr[-3000:]
        res = read_results(spec.parent / "out" / "results.h5")
        results[cap] = res
        status = res["status"]
        assert (status[:128] == 7).all() and (status[128:] != 7).all()
        assert np.isnan(res["contrasts/time/p"][:128]).all()
        assert np.isnan(res["beta"][:128]).all()
        assert json.loads(res["@"]["status_counts"])["7"] == 128
        if cap is None:
            assert "status   7:      128  not fitted: observed data are constant" in job.stdout
    free, capped = results[None], results[1]
    assert (capped["iterations"] <= 1).all()
    slow = free["iterations"][128:] > 1
    assert slow.sum() > 64
    assert (capped["status"][128:][slow] == 1).all()
    assert (capped["status"][128:][~slow] == free["status"][128:][~slow]).all()


@pytest.mark.spawns_mpiexec
def test_a_job_without_a_single_fitted_voxel_warns(tmp_path, run_mpi, mpiblmm_command):
    """A fault audit's job fitted none of its voxels (every one below the missingness
    thresholds) and ended with exit 0 and only the status counts: a batch log gets one
    warning line saying so and why, even with --quiet; a job that fits voxels gets none."""
    spec = _study(tmp_path / "none", constant=256)
    job = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(spec)], timeout=180)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stderr.strip().splitlines()[-1] == (
        "mpiblmm: warning: no voxel was fitted: 256 with status 7, observed data are "
        "constant (no residual variance)")
    spec = _study(tmp_path / "some")
    job = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(spec)], timeout=180)
    assert job.returncode == 0 and "warning" not in job.stderr



@pytest.mark.spawns_mpiexec
def test_an_input_refused_at_ingest_leaves_no_empty_output_folder(tmp_path, run_mpi,
                                                                  mpiblmm_command):
    """A fault audit found the output folder a refused fit had created left behind, empty: a
    refusal found while packing (an image off the grid) removes the folder the run made, and
    keeps one that was there before."""
    import nibabel as nib

    spec = _study(tmp_path / "study")
    nib.save(nib.Nifti1Image(np.zeros((16, 8, 3), np.float32), np.eye(4)),
             spec.parent / "o5.nii")
    for existed in (False, True):
        if existed:
            (spec.parent / "out").mkdir()
        job = run_mpi(2, [*mpiblmm_command, "fit", str(spec)], timeout=180)
        assert job.returncode == 2, job.stderr[-3000:]
        assert "o5.nii: not on the grid of" in job.stderr
        assert (spec.parent / "out").exists() == existed
        if existed:
            assert list((spec.parent / "out").iterdir()) == []


@pytest.mark.spawns_mpiexec
def test_a_maps_folder_that_is_a_file_is_refused_before_the_fit(tmp_path, run_mpi,
                                                                mpiblmm_command):
    """A fault audit's `<output>/nifti` was a file: the fit ran to the end, then the maps were
    refused.  `check` and `fit` now refuse it first, with the same line."""
    spec = _study(tmp_path / "study")
    (spec.parent / "out").mkdir()
    (spec.parent / "out" / "nifti").write_text("not a folder")
    lines = {}
    for command in ("check", "fit"):
        job = run_mpi(2, [*mpiblmm_command, command, str(spec)], timeout=180)
        assert job.returncode == 2, job.stderr[-3000:]
        lines[command] = [ln for ln in job.stderr.splitlines() if ln.startswith("mpiblmm: error")]
    expected = (f"mpiblmm: error: {spec}: output: {spec.parent / 'out' / 'nifti'} exists and is "
                "not a folder: the maps are written there; move it away")
    assert lines["check"] == lines["fit"] == [expected]
    assert not (spec.parent / "out" / "results.h5").exists()
    # a results.h5 that is a folder: --resume said to use --overwrite, which then failed
    (spec.parent / "out" / "nifti").unlink()
    (spec.parent / "out" / "results.h5").mkdir()
    for flags in ([], ["--resume"], ["--overwrite"]):
        job = run_mpi(2, [*mpiblmm_command, "fit", str(spec), *flags], timeout=180)
        assert job.returncode == 2, job.stderr[-3000:]
        assert job.stderr.strip().splitlines()[-1] == (
            f"mpiblmm: error: {spec.parent / 'out' / 'results.h5'}: is a folder, not a results "
            "file: move it away")
