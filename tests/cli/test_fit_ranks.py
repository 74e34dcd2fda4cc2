"""`mpiblmm fit` gives the same results at every rank count, and fails cleanly on bad input.

A small simulated study (with missing data and boundary voxels) is fitted at 1, 2 and 3
ranks, and a two-voxel study at 3 ranks (more ranks than voxels); every dataset of
results.h5 and every NIfTI map must equal the 1-rank run bit for bit (the issue asks for
1e-10): a voxel's arithmetic does not depend on which voxels share its chunk
(tests/lmm/test_analysis.py), so neither does any result, iteration counts included.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from .studies import assert_same_datasets, read_results


def _compare(a: dict, b: dict) -> None:
    assert_same_datasets(a, b)
    for attr in ("complete", "method", "spec", "status_counts"):
        assert np.all(a["@"][attr] == b["@"][attr]), attr


def _maps(folder):
    import nibabel as nib

    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.spawns_mpiexec
def test_same_results_at_1_2_3_ranks(tmp_path, run_mpi, mpiblmm_command):
    study = tmp_path / "study"
    run = run_mpi(2, [*mpiblmm_command, "simulate", str(study), "--subjects", "12",
                      "--visits", "3", "--shape", "6", "5", "4", "--missing-fraction", "0.5",
                      "--seed", "3"], timeout=120)
    assert run.returncode == 0, run.stderr
    results, maps = {}, {}
    for ranks in (1, 2, 3):
        out = tmp_path / f"out{ranks}"
        run = run_mpi(ranks, [*mpiblmm_command, "fit", str(study / "spec.json"),
                              "--output", str(out)], timeout=300,
                      env=dict(os.environ, MPIBLMM_CHUNK_VOXELS="7"))     # many chunks
        assert run.returncode == 0, run.stderr[-3000:]
        results[ranks] = read_results(out / "results.h5")
        maps[ranks] = _maps(out / "nifti")
        assert bool(results[ranks]["@"]["complete"])
        summary = json.loads(results[ranks]["@"]["summary"])
        assert summary["ranks"] == ranks and summary["chunk_voxels"] < 120
    counts = json.loads(results[1]["@"]["status_counts"])
    assert sum(counts.values()) == 120 and counts.get("0", 0) + counts.get("2", 0) == 120
    for ranks in (2, 3):
        _compare(results[1], results[ranks])
        assert maps[1].keys() == maps[ranks].keys() and len(maps[1]) >= 10
        for name in maps[1]:
            a, b = maps[1][name], maps[ranks][name]
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.spawns_mpiexec
def test_more_ranks_than_voxels(tmp_path, run_mpi, mpiblmm_command):
    study = tmp_path / "study"
    run = run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "10",
                      "--visits", "3", "--shape", "2", "1", "1", "--seed", "5"], timeout=120)
    assert run.returncode == 0, run.stderr
    outs = {}
    for ranks in (1, 3):
        out = tmp_path / f"out{ranks}"
        run = run_mpi(ranks, [*mpiblmm_command, "fit", str(study / "spec.json"), "-o", str(out)],
                      timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        outs[ranks] = read_results(out / "results.h5")
    assert outs[3]["voxels"].shape == (2, 3)
    _compare(outs[1], outs[3])


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("ranks", [1, 3])
def test_bad_spec_is_one_line_and_exit_2_on_every_rank(tmp_path, run_mpi, mpiblmm_command, ranks):
    study = tmp_path / "study"
    assert run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "4",
                       "--shape", "2", "2", "2"], timeout=120).returncode == 0
    spec = json.loads((study / "spec.json").read_text())
    spec["contrasts"][0]["weights"] = [0, 1]                     # p is 3
    (study / "bad.json").write_text(json.dumps(spec))
    run = run_mpi(ranks, [*mpiblmm_command, "fit", str(study / "bad.json")], timeout=120)
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpiblmm: error:"), run.stderr
    assert "contrasts" in lines[0] and "Traceback" not in run.stderr
    assert not (study / "results" / "results.h5").exists()


@pytest.mark.spawns_mpiexec
def test_unusable_output_folder_is_one_line_and_exit_2(tmp_path, run_mpi, mpiblmm_command):
    study = tmp_path / "study"
    assert run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "4",
                       "--shape", "2", "2", "2"], timeout=120).returncode == 0
    spec = json.loads((study / "spec.json").read_text())
    cases = {"X.csv": "exists and is not a folder",             # a file, not a folder
             "X.csv/results": "cannot create the folder"}        # below a file
    for output, says in cases.items():
        spec["output"] = output
        (study / "bad.json").write_text(json.dumps(spec))
        run = run_mpi(2, [*mpiblmm_command, "fit", str(study / "bad.json")], timeout=120)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert lines[0].startswith("mpiblmm: error:") and "bad.json: output:" in lines[0]
        assert says in lines[0]
    run = run_mpi(2, [*mpiblmm_command, "fit", str(study / "spec.json"), "--output",
                      str(study / "X.csv" / "out")], timeout=120)
    assert run.returncode == 2 and "--output: cannot create the folder" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.spawns_mpiexec
def test_packed_input_gives_the_same_fit(tmp_path, run_mpi, mpiblmm_command):
    """A study packed once (the packed.h5 of a first fit) can be fitted again without images."""
    study = tmp_path / "study"
    assert run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "10",
                       "--shape", "3", "3", "2", "--seed", "9"], timeout=120).returncode == 0
    first = run_mpi(2, [*mpiblmm_command, "fit", str(study / "spec.json"), "-o",
                        str(tmp_path / "a")], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    spec = json.loads((study / "spec.json").read_text())
    spec["images"] = {"h5": str(tmp_path / "a" / "packed.h5"), "dataset": "/Y"}
    (study / "packed.json").write_text(json.dumps(spec))
    second = run_mpi(3, [*mpiblmm_command, "fit", str(study / "packed.json"), "-o",
                         str(tmp_path / "b")], timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = read_results(tmp_path / "a" / "results.h5"), read_results(tmp_path / "b" / "results.h5")
    a["@"]["spec"] = b["@"]["spec"]  # the specs differ in "images" only
    _compare(a, b)
