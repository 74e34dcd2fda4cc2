"""`mpiblmm convert-blmm`: BLMM configurations (the format of BLMM's README examples) -> spec.

The end-to-end case writes a reference dataset as a BLMM study (image list, X, factor and
design CSVs, contrasts as ``- c1: {name, vector}``), converts it through the command line
and fits it: the results equal bit for bit those of the hand-written matrix spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.blmm_convert import convert_file
from mpiblmm.errors import SpecError
from tests.cli.studies import assert_same_datasets, read_results, write_reference_study
from tests.refdata import load_dataset

MINIMAL = """\
Y_files: {d}/data/Y.txt
X: {d}/data/X.csv
Z:
  - f1:
      name: subject
      factor: {d}/data/Z1factorVector.csv
      design: {d}/data/Z1DesignMatrix.csv
outdir: {d}/out/
contrasts:
  - c1:
      name: Tcon1
      vector: [1, 0, 1, 0, 1]
"""

SEVERAL = """\
MAXMEM: 2**32
Y_files: data/Y.txt
data_mask_files: data/M_.txt
data_mask_thresh: 0.1
X: data/X.csv
Z:
  - f1:
      name: subject
      factor: data/Z1factorVector.csv
      design: data/Z1DesignMatrix.csv
  - f2:
      name: site name
      factor: data/Z2factorVector.csv
      design: data/Z2DesignMatrix.csv
outdir: out/
contrasts:
  - c1:
      name: Tcon1
      vector: [1, 0, 0]
  - c2:
      name: Fcon1
      vector: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
Missingness:
  MinPercent: 0.10
  MinN: 15
analysis_mask: data/mask.nii.gz
maxnit: 500
tol: 1e-6
OutputCovB: False
"""


def test_minimal_readme_style_config(tmp_path):
    (tmp_path / "cfg.yml").write_text(MINIMAL.format(d=tmp_path))
    spec, notes = convert_file(tmp_path / "cfg.yml")
    assert spec == {
        "images": f"{tmp_path}/data/Y.txt", "X": f"{tmp_path}/data/X.csv",
        "random": [{"name": "subject", "factor": f"{tmp_path}/data/Z1factorVector.csv",
                    "design": f"{tmp_path}/data/Z1DesignMatrix.csv"}],
        "contrasts": [{"name": "Tcon1", "weights": [1, 0, 1, 0, 1]}],
        "output": f"{tmp_path}/out"}
    assert notes == []


def test_config_with_optional_fields(tmp_path):
    (tmp_path / "cfg.yml").write_text(SEVERAL)
    spec, notes = convert_file(tmp_path / "cfg.yml", output=tmp_path / "spec.json", cwd=tmp_path)
    assert spec["images"] == "data/Y.txt" and spec["observation_masks"] == "data/M_.txt"
    assert spec["random"][1] == {"name": "site_name", "factor": "data/Z2factorVector.csv",
                                 "design": "data/Z2DesignMatrix.csv"}
    assert spec["contrasts"][1]["weights"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert spec["missingness"] == {"min_n": 15, "min_fraction": 0.1}
    assert spec["estimation"] == {"max_iterations": 500, "tolerance": 1e-6}
    assert spec["analysis_mask"] == "data/mask.nii.gz" and spec["output"] == "out"
    keys = [n.split(":")[0] for n in notes]
    assert keys == ["Z", "MAXMEM", "data_mask_thresh", "OutputCovB"]
    assert "no equivalent" in notes[1] and "renamed 'site_name'" in notes[0]


@pytest.mark.parametrize("text, message", [
    ("X: a.csv\n", "Y_files: required BLMM option is missing"),
    ("Y_files: y.txt\nX: x.csv\nZ: 3\noutdir: o\n", "expected a list of f1"),
    ("Y_files: y.txt\nX: x.csv\nZ:\n  - f1:\n      name: s\noutdir: o\n", "f1.factor: required"),
    ("Y_files: [\n", "not valid YAML"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\ntol: abc\n", "tol: expected a number"),
])
def test_config_errors(tmp_path, text, message):
    (tmp_path / "cfg.yml").write_text(text)
    with pytest.raises(SpecError) as info:
        convert_file(tmp_path / "cfg.yml", cwd=tmp_path)
    assert message in str(info.value)


def _blmm_study(ds, folder: Path) -> Path:
    """The reference study (written in matrix form) described as a BLMM config."""
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "Y.txt").write_text("\n".join(spec["images"]) + "\n")
    lines = ["Y_files: Y.txt", "X: X.csv", "Z:"]
    for i, f in enumerate(spec["random"]):
        lines += [f"  - f{i + 1}:", f"      name: {f['name']}", f"      factor: {f['factor']}",
                  f"      design: {f['design']}"]
    lines += ["outdir: blmm_out", "contrasts:"]
    for i, c in enumerate(spec["contrasts"]):
        lines += [f"  - c{i + 1}:", f"      name: {c['name']}", f"      vector: {c['weights']}"]
    lines += ["Missingness:", "  MinN: 4", "maxnit: 200", "tol: 1e-7", "resms: 1"]
    (folder / "blmm_config.yml").write_text("\n".join(lines) + "\n")
    return folder / "blmm_config.yml"


@pytest.mark.spawns_mpiexec
def test_converted_fit_matches_the_matrix_spec(tmp_path, run_mpi, mpiblmm_command):
    ds = load_dataset("crossed")
    matrix = write_reference_study(ds, tmp_path, "REML", extra={
        "missingness": {"min_n": 4}, "estimation": {"max_iterations": 200, "tolerance": 1e-7},
        "zero_is_missing": True})
    config = _blmm_study(ds, tmp_path)
    run = run_mpi(2, [*mpiblmm_command, "convert-blmm", str(config), "--output",
                      str(tmp_path / "converted.json")], timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "resms: no equivalent in mpiblmm" in run.stderr
    for spec in (matrix, tmp_path / "converted.json"):
        run = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(spec)], timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    a = read_results(tmp_path / "results" / "results.h5")
    b = read_results(tmp_path / "blmm_out" / "results.h5")
    assert_same_datasets(a, b)


def test_config_for_a_simulated_study(tmp_path, monkeypatch):
    """A BLMM config written for the study `mpiblmm simulate` makes (the benchmarks' study)
    converts to the spec simulate writes: the same design and contrasts."""
    from mpiblmm.design import design_from_spec
    from mpiblmm.spec import load_spec
    from mpiblmm.study import write_study

    spec_path = write_study(tmp_path, subjects=8, visits=3, shape=(2, 2, 2), seed=4)
    spec = json.loads(spec_path.read_text())
    lines = ["Y_files: images.txt", "X: X.csv", "Z:", "  - f1:", "      name: subject",
             "      factor: factor_subject.csv", "      design: Z_subject.csv",
             "outdir: results", "contrasts:"]
    for i, c in enumerate(spec["contrasts"]):
        lines += [f"  - c{i + 1}:", f"      name: {c['name']}", f"      vector: {c['weights']}"]
    (tmp_path / "blmm_config.yml").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    converted, notes = convert_file("blmm_config.yml", output=tmp_path / "c.json")
    assert notes == []
    (tmp_path / "c.json").write_text(json.dumps(converted))
    a, b = design_from_spec(load_spec(spec_path)), design_from_spec(load_spec(tmp_path / "c.json"))
    assert np.array_equal(a.X, b.X) and np.array_equal(a.factors[0].Z, b.factors[0].Z)
    assert np.array_equal(a.factors[0].codes, b.factors[0].codes)
    assert [(c.name, c.L.tolist()) for c in a.contrasts] == [(c.name, c.L.tolist()) for c in b.contrasts]
