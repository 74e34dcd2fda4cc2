"""scripts/bench_blmm.py's pure parts: the BLMM inputs it writes for a simulated study say
the same model as the study's spec (read back through `mpiblmm convert-blmm`'s reader), its
agreement check reads BLMM's maps at mpiblmm's voxels, and its command line parses.
BLMM itself is not run here."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    path = REPO_ROOT / "scripts" / "bench_blmm.py"
    spec = importlib.util.spec_from_file_location("bench_blmm_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_blmm_inputs_describe_the_studys_model(bench, tmp_path):
    from mpiblmm.blmm_convert import convert_file
    from mpiblmm.design import design_from_spec
    from mpiblmm.spec import load_spec
    from mpiblmm.study import write_study

    spec_path = write_study(tmp_path / "study", subjects=5, visits=3, shape=(2, 2, 1), seed=2)
    config, left_out = bench.write_blmm_inputs(tmp_path / "study", tmp_path / "blmm")
    assert left_out == ["age_or_time"]            # BLMM 0.1.1's F path fails: T only
    text = config.read_text()
    for line in ("clusterType: local", "numNodes: 1", "voxelBatching: 1"):
        assert line in text.splitlines()
    # every image path is absolute (BLMM changes directory) and exists
    images = (tmp_path / "blmm" / "Y.txt").read_text().split()
    assert len(images) == 15 and all(p.startswith("/") for p in images)
    assert all((tmp_path / "study" / "images" / p.rsplit("/", 1)[1]).exists() for p in images)
    # subjects as integer codes 1..5 in order of appearance, 3 visits each
    codes = (tmp_path / "blmm" / "factor.csv").read_text().split()
    assert codes == [str(s) for s in np.repeat(np.arange(1, 6), 3)]

    assert "MAXMEM" not in text                   # BLMM's default unless asked
    assert "MAXMEM: '2**30'" in bench.write_blmm_inputs(
        tmp_path / "study", tmp_path / "blmm2", maxmem="2**30")[0].read_text().splitlines()

    converted, notes = convert_file(config, output=tmp_path / "c.json")
    assert sorted(n.split(":")[0] for n in notes) == ["clusterType", "missingness.min_n",
                                                      "numNodes", "voxelBatching"]
    (tmp_path / "c.json").write_text(json.dumps(converted))
    a = design_from_spec(load_spec(spec_path))
    b = design_from_spec(load_spec(tmp_path / "c.json"))
    assert np.array_equal(a.X, b.X) and np.array_equal(a.factors[0].Z, b.factors[0].Z)
    assert np.array_equal(a.factors[0].codes, b.factors[0].codes)
    assert [(c.name, c.L.tolist()) for c in b.contrasts] == \
        [(c.name, c.L.tolist()) for c in a.contrasts if c.name != "age_or_time"]


def test_agreement_reads_blmm_maps_at_mpiblmm_voxels(bench, tmp_path):
    import h5py
    import nibabel as nib

    shape, p = (2, 3, 1), 2
    voxels = np.array([[i, j, 0] for i in range(2) for j in range(3)], dtype=np.int32)
    beta = np.arange(1.0, 13.0).reshape(6, p)
    sigma2 = np.full(6, 4.0)
    cov = np.zeros((6, p, p))
    cov[:, 0, 0], cov[:, 1, 1] = 0.25, 1.0                  # se 0.5 and 1
    status = np.array([0, 0, 0, 2, 2, 3], dtype=np.uint8)
    with h5py.File(tmp_path / "results.h5", "w") as f:
        f["voxels"], f["beta"], f["sigma2"], f["cov_beta"] = voxels, beta, sigma2, cov
        f["beta"].attrs["names"] = ["intercept", "time"]
        f["status"] = status
    b_beta = np.zeros(shape + (p,), dtype=np.float32)
    b_sigma2 = np.zeros(shape + (1,), dtype=np.float32)
    for v, (i, j, k) in enumerate(voxels):
        b_beta[i, j, k] = beta[v]
        b_sigma2[i, j, k] = sigma2[v]
    b_beta[0, 1, 0, 0] += 0.01                             # voxel 1: intercept 3 -> 3.01
    b_sigma2[1, 0, 0] = 5.0                                # voxel 3 (singular): 4 -> 5
    b_beta[1, 2, 0] = np.nan                               # voxel 5: not fitted by either
    mask = np.ones(shape + (1,), dtype=np.int32).view(np.float32)   # BLMM's mangled mask
    for name, a in (("beta", b_beta), ("sigma2", b_sigma2), ("mask", mask)):
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / f"blmm_vox_{name}.nii")
    agree = bench.agreement(tmp_path / "results.h5", tmp_path)
    conv, sing = agree["converged"], agree["singular"]
    assert conv["voxels"] == 3 and sing["voxels"] == 2
    assert conv["beta intercept"] == pytest.approx(0.01 / 3, rel=1e-4)
    assert conv["beta intercept in se"] == pytest.approx(0.02, rel=1e-4)
    assert conv["sigma2"] == 0 and conv["beta time"] == 0
    assert sing["sigma2"] == pytest.approx(0.25)


def test_command_line(bench, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.parser().parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for option in ("--subjects", "--repeats", "--blmm-repeats", "--csv", "--blmm-venv"):
        assert option in out
    args = bench.parser().parse_args(["--subjects", "100"])
    assert args.ranks == [1, 2] and args.blmm_repeats == 1 and args.blmm_mode == "command"
    assert bench.grid_for(100, None) == (30, 30, 20)       # 18,000 voxels
    assert bench.grid_for(250, None) == (40, 40, 25)       # 40,000 voxels
    assert bench.grid_for(7, [3, 3, 3]) == (3, 3, 3)
    with pytest.raises(SystemExit):
        bench.grid_for(7, None)


def test_blmm_commands(bench, tmp_path):
    venv, config = tmp_path / "venv", tmp_path / "blmm" / "blmm_config.yml"
    assert bench.blmm_command("command", venv, config) == [str(venv / "bin" / "blmm"),
                                                           str(config)]
    python, flag, code, *rest = bench.blmm_command("stages", venv, config)
    assert (python, flag, rest) == (str(venv / "bin" / "python"), "-c",
                                    [str(config), str(tmp_path / "blmm" / "out")])
    compile(code, "stages", "exec")                        # valid Python, run by BLMM's venv
    env = bench.blmm_env(venv)
    assert env["PATH"].startswith(str(venv / "bin")) and "PYTHONPATH" not in env
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
