"""`mpiblmm convert-blmm`: BLMM configurations (the format of BLMM's README examples) -> spec.

The end-to-end case writes a reference dataset as a BLMM study (image list, X, factor and
design CSVs, contrasts as ``- c1: {name, vector}``), converts it through the command line
and fits it: the results equal bit for bit those of the hand-written matrix spec (with BLMM's
one-sided T tests).  What cannot be converted without changing the results is one error line
naming the key, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.blmm_convert import ALTERNATIVE_NOTE, conversion_notes, convert_file
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
        "contrasts": [{"name": "Tcon1", "weights": [1, 0, 1, 0, 1], "alternative": "greater"}],
        "output": f"{tmp_path}/out"}
    # its files do not exist: BLMM's voxel rules could not be read from them (a BLMM audit's
    # config converted from another folder said nothing of it)
    assert notes == ["Missingness: BLMM's own voxel rules (n > p + 1, and n > q in its "
                     "safeMode) are not in the spec: X, Z: f1.factor, Z: f1.design name no "
                     f"file (relative paths are read from the working directory, {Path.cwd()}); "
                     "convert again where BLMM runs, once the files are there"]
    assert conversion_notes(spec) == [ALTERNATIVE_NOTE]


def test_config_with_optional_fields(tmp_path):
    (tmp_path / "cfg.yml").write_text(SEVERAL)
    spec, notes = convert_file(tmp_path / "cfg.yml", output=tmp_path / "spec.json", cwd=tmp_path)
    assert spec["images"] == "data/Y.txt" and spec["observation_masks"] == "data/M_.txt"
    assert spec["random"][1] == {"name": "site_name", "factor": "data/Z2factorVector.csv",
                                 "design": "data/Z2DesignMatrix.csv"}
    assert spec["contrasts"] == [
        {"name": "Tcon1", "weights": [1, 0, 0], "alternative": "greater"},
        {"name": "Fcon1", "weights": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}]   # F: no direction
    assert spec["missingness"] == {"min_n": 15, "min_fraction": 0.1}
    assert spec["estimation"] == {"max_iterations": 500, "tolerance": 1e-6}
    assert spec["analysis_mask"] == "data/mask.nii.gz" and spec["output"] == "out"
    notes = [n for n in notes if not n.startswith("Missingness: BLMM's own voxel rules")]
    keys = [n.split(":")[0] for n in notes]        # (and its files are not there: that note)
    assert keys == ["Z", "data_mask_files", "tol", "MAXMEM", "OutputCovB"]
    assert "renamed 'site_name'" in notes[0] and "no equivalent" in notes[3]
    assert "BLMM multiplies each image by its mask" in notes[1]
    assert notes[2].startswith("tol: 1e-06 converted as given, looser than mpiblmm's "
                               "default 1e-12")
    assert "results.h5 only" in notes[4]


BASE = """\
Y_files: Y.txt
X: X.csv
Z:
  - f1: {name: s, factor: f.csv, design: z.csv}
outdir: out
"""


def _convert(tmp_path, text, x_columns=3):
    """Convert ``BASE + text`` with an X of ``x_columns`` columns (none: no X file)."""
    if x_columns:
        (tmp_path / "X.csv").write_text("\n".join([",".join(["1"] * x_columns)] * 4) + "\n")
    (tmp_path / "cfg.yml").write_text(BASE + text)
    return convert_file(tmp_path / "cfg.yml", output=tmp_path / "spec.json", cwd=tmp_path)


def _weights(vector_yaml):
    return "contrasts:\n  - c1:\n      name: c\n      vector: " + vector_yaml + "\n"


@pytest.mark.parametrize("vector, weights", [
    ("[0 0 1]", [0, 0, 1]),                                # BLMM's str2vec: spaces separate
    ("[-1 1 0]", [-1, 1, 0]),
    ("'[0, 0, 1]'", [0, 0, 1]),
    ("'[1/2, -1/2, 0]'", [0.5, -0.5, 0]),
    ("[0.5, -0.5, 1e-3]", [0.5, -0.5, 0.001]),
    ("'[[1 0 0] [0 1 0]]'", [[1, 0, 0], [0, 1, 0]]),
    ("'[[1 0 0],[0 1 0]]'", [[1, 0, 0], [0, 1, 0]]),
    ("'[ [1, 0, 0], [0, 1, 0] ]'", [[1, 0, 0], [0, 1, 0]]),
])
def test_vectors_read_as_blmm_reads_them(tmp_path, vector, weights):
    """What BLMM 0.1.1's ``str2vec`` makes of each (checked against it when this was written)."""
    spec, _ = _convert(tmp_path, _weights(vector))
    (c,) = spec["contrasts"]
    assert c["weights"] == weights
    assert c.get("alternative") == ("greater" if not isinstance(weights[0], list) else None)


@pytest.mark.parametrize("vector, x_columns, message", [
    ("5", 3, "c1.vector: expected a vector such as [1, 0, 0] (T) or a matrix"),
    ("{a: 1}", 3, "c1.vector: not a vector such as [1, 0, 0]"),
    ("'[0, 0, 1'", 3, "c1.vector: not a vector"),
    ("[]", 3, "c1.vector: expected a vector"),
    ("[[1, 0, 0], 1]", 3, "c1.vector: expected a vector"),
    ("[[[1, 0, 0]]]", 3, "c1.vector: expected a vector"),
    ("'[1,0,0]'", 3, "c1.vector: BLMM joins the numbers around a comma without a space"),
    ("'[1e400, 0, 0]'", 3, "c1.vector: every weight must be a finite number"),
    ("[0, 1]", 3, "c1.vector: has 2 weights per row, but X has 3 columns"),
    ("[[0, 1, 0, 0], [0, 0, 1, 0]]", 3, "c1.vector: has 4 weights per row, but X has 3 columns"),
    ("[[0, 1, 0], [0, 1]]", 3, "c1.vector: the rows have different lengths"),
    ("[0, 0, 0]", 3, "c1.vector: all weights are zero"),
    ("[[0, 1, 0], [0, 2, 0]]", 3, "c1.vector: the 2 rows are linearly dependent (rank 1)"),
])
def test_invalid_vectors_are_refused(tmp_path, vector, x_columns, message):
    with pytest.raises(SpecError) as info:
        _convert(tmp_path, _weights(vector), x_columns)
    assert str(info.value).startswith(f"{tmp_path / 'cfg.yml'}: contrasts: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_contrast_lengths_agree_when_x_cannot_be_read(tmp_path):
    text = ("contrasts:\n  - c1: {name: a, vector: [0, 1, 0]}\n"
            "  - c2: {name: b, vector: [0, 1]}\n")
    with pytest.raises(SpecError, match=r"contrasts: c2.vector: has 2 weights per row, but c1 "
                                        r"has 3"):
        _convert(tmp_path, text, x_columns=None)


@pytest.mark.parametrize("text, expected", [
    ("Missingness: {MinPercent: 0.1}", {"min_fraction": 0.1}),
    ("Missingness: {MinPercent: '10%'}", {"min_fraction": 0.1}),
    ("Missingness: {MinPercent: 1}", {"min_fraction": 1}),
    ("Missingness: {minpercent: 0, minn: 15}", {"min_n": 15, "min_fraction": 0}),
    ("Missingness: {MinN: 15.5}", {"min_n": 16}),          # BLMM drops n < 15.5
    ("Missingness: {MinN: 0}", None),                      # no threshold, as without it
])
def test_missingness(tmp_path, text, expected):
    spec, _ = _convert(tmp_path, text + "\n")
    assert spec.get("missingness") == expected


@pytest.mark.parametrize("value, expected", [("1", 1), ("10000", 10000), ("2**10", 1024),
                                             ("1.0e+3", 1000), ("1000000", 1000000)])
def test_maxnit(tmp_path, value, expected):
    spec, notes = _convert(tmp_path, f"maxnit: {value}\n")
    assert spec["estimation"] == {"max_iterations": expected}
    # a BLMM audit: maxnit 10 left 60 voxels at status 1, two below BLMM's logLik, unsaid
    capped = [n for n in notes if n.startswith("maxnit:")]
    assert capped == ([] if expected >= 300 else [
        f"maxnit: {expected} converted as given, below mpiblmm's default 300: it caps every "
        "iteration of a voxel's fit (Fisher scoring and the polish after it), so voxels "
        "stopped by it end short of the optimum with status 1; delete it to use the default"])


def test_an_empty_stat_type_is_no_stat_type(tmp_path):
    """BLMM's template leaves `statType:` empty; it was read as the text NONE."""
    spec, notes = _convert(tmp_path, "contrasts:\n  - c1: {name: a, vector: [0, 1, 0], "
                                     "statType: }\n")
    assert spec["contrasts"] == [{"name": "a", "weights": [0, 1, 0], "alternative": "greater"}]
    assert not [n for n in notes if "statType" in n]


def test_a_config_converted_from_another_folder(tmp_path, monkeypatch):
    """A BLMM audit converted a config with paths relative to its own folder from another
    working directory: exit 0, a spec naming files that are not there, no voxel rules."""
    (tmp_path / "study").mkdir()
    _convert(tmp_path / "study", "")
    (tmp_path / "study" / "Y.txt").write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SpecError) as info:
        convert_file(tmp_path / "study" / "cfg.yml")
    assert str(info.value) == (
        f"{tmp_path}/study/cfg.yml: Y_files: Y.txt is not in the working directory "
        f"{tmp_path}/elsewhere, where BLMM reads relative paths, but beside the config: run "
        f"convert-blmm in {tmp_path}/study, where BLMM would run")


def test_cluster_settings_and_unconverted_outputs_are_notes(tmp_path):
    _, notes = _convert(tmp_path, "clusterType: slurm\nnumNodes: 10\nvoxelBatching: 1\n"
                                  "maxnvb: 60\nresms: 1\nOutputCovB: True\ncolour: red\n"
                                  "diskMem: 1\n")
    by_key = {n.split(":")[0]: n for n in notes}
    for key in ("clusterType", "numNodes", "voxelBatching", "maxnvb"):
        assert by_key[key] == (f"{key}: no equivalent in mpiblmm: cluster setting: mpiblmm "
                               "shares voxels over MPI ranks (mpirun -n N)")
    assert "does not compute BLMM's resms" in by_key["resms"] and "sigma2.nii.gz" in by_key["resms"]
    assert "cov_beta, into results.h5 only" in by_key["OutputCovB"]
    assert by_key["colour"] == "colour: unknown BLMM option, not converted"
    # BLMM's undocumented switch (blmm_setup.py's developer note), not an unknown option
    assert by_key["diskMem"].startswith("diskMem: no equivalent in mpiblmm: mpiblmm never "
                                        "writes BLMM's ZtY files")


@pytest.mark.parametrize("text, message", [
    ("X: a.csv\n", "Y_files: required BLMM option is missing"),
    ("Y_files: y.txt\nX: x.csv\nZ: 3\noutdir: o\n", "expected a list of f1"),
    ("Y_files: y.txt\nX: x.csv\nZ:\n  - f1:\n      name: s\noutdir: o\n", "f1.factor: required"),
    ("Y_files: [\n", "not valid YAML"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\ntol: abc\n", "tol: expected a number"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\ntol: 1e-400\n",
     "tol: expected a number greater than 0, got '1e-400'"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\ndata_mask_thresh: 0.1\n",
     "data_mask_thresh: cannot be converted: BLMM treats every image value below it"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\nMissingness: {MinPercent: 50}\n",
     "Missingness.MinPercent: expected a fraction from 0 to 1"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\nMissingness: {MinPercent: '150%'}\n",
     "Missingness.MinPercent: expected a fraction from 0 to 1"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\nMissingness: {MinPercent: 1e400}\n",
     "Missingness.MinPercent: expected a fraction from 0 to 1"),
    ("Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\nMissingness: {MinN: .inf}\n",
     "Missingness.MinN: expected a number of observations"),
    *[(f"Y_files: y.txt\nX: x.csv\nZ: []\noutdir: o\nmaxnit: {v}\n",
       "maxnit: expected a whole number of iterations from 1 to 1000000")
      for v in ("1e400", ".inf", ".nan", "2**100", "10**10**10", "1000001", "0", "10.5")],
])
def test_config_errors(tmp_path, text, message):
    (tmp_path / "cfg.yml").write_text(text)
    with pytest.raises(SpecError) as info:
        convert_file(tmp_path / "cfg.yml", cwd=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


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
    hand = json.loads(matrix.read_text())      # BLMM's T p-values are upper-tail
    for c in hand["contrasts"]:
        if not isinstance(c["weights"][0], list):
            c["alternative"] = "greater"
    matrix.write_text(json.dumps(hand))
    run = run_mpi(2, [*mpiblmm_command, "convert-blmm", str(config), "--output",
                      str(tmp_path / "converted.json")], timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "resms: no equivalent in mpiblmm" in run.stderr
    assert run.stderr.count(ALTERNATIVE_NOTE) == 1
    for spec in (matrix, tmp_path / "converted.json"):
        run = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(spec)], timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    a = read_results(tmp_path / "results" / "results.h5")
    b = read_results(tmp_path / "blmm_out" / "results.h5")
    assert_same_datasets(a, b)


def _one_sided_neglog10p_as_blmm(t, df):
    """BLMM 0.1.1's ``T2P3D`` (blmm_vox_conTlp), without its ``minlog`` floor."""
    from scipy import stats

    out = np.zeros_like(t)
    out[t < 0] = -np.log10(1 - stats.t.cdf(t[t < 0], df[t < 0]))
    out[t >= 0] = -np.log10(stats.t.cdf(-t[t >= 0], df[t >= 0]))
    return out


def test_greater_is_blmms_p_value():
    """BLMM's T p-value map is the upper tail, which mpiblmm gives with "greater"."""
    from mpiblmm.lmm.inference import t_logsf

    t = np.array([-3.0, -0.5, 0.0, 0.7, 2.5, 6.0])
    df = np.array([4.0, 10.0, 7.5, 30.0, 12.0, 55.0])
    ours = -np.asarray(t_logsf(t, df)) / np.log(10)
    assert np.allclose(ours, _one_sided_neglog10p_as_blmm(t, df), rtol=1e-10, atol=1e-12)


@pytest.mark.spawns_mpiexec
def test_refusals_through_the_command_line(tmp_path, run_mpi, mpiblmm_command):
    """Each refusal is one line naming the file and key, exit 2 on every rank, no spec; a
    spec whose max_iterations is beyond the bound is one line from check and fit."""
    from mpiblmm.study import write_study

    (tmp_path / "X.csv").write_text("1,0,0\n1,1,0\n1,0,1\n")
    cases = {"data_mask_thresh": "data_mask_thresh: 0.1\n",
             "Missingness.MinPercent": "Missingness: {MinPercent: 50}\n",
             "maxnit": "maxnit: 2**100\n",
             "contrasts: c1.vector": _weights("5")}
    for key, text in cases.items():
        (tmp_path / "cfg.yml").write_text(BASE + text)
        run = run_mpi(2, [*mpiblmm_command, "convert-blmm", "cfg.yml", "--output", "spec.json"],
                      timeout=120, cwd=tmp_path)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert lines[0].startswith(f"mpiblmm: error: cfg.yml: {key}: "), lines
        assert "Traceback" not in run.stderr and not (tmp_path / "spec.json").exists()

    spec_path = write_study(tmp_path / "study", subjects=4, visits=3, shape=(2, 2, 1), seed=1)
    spec = json.loads(spec_path.read_text())
    spec["estimation"] = {"max_iterations": 2**63}
    spec_path.write_text(json.dumps(spec))
    for command in ("check", "fit"):
        run = run_mpi(2, [*mpiblmm_command, command, str(spec_path)], timeout=120)
        errors = [ln for ln in run.stderr.splitlines() if ln.startswith("mpiblmm: error:")]
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert errors == [f"mpiblmm: error: {spec_path}: estimation.max_iterations: expected a "
                          f"whole number from 1 to 1000000, got {2**63}"], run.stderr


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
    # 8 subjects x (1 + time): BLMM's safe mode drops the voxels with n <= q = 16
    assert notes == ["missingness.min_n: set to 17, as BLMM fits a voxel only with more than "
                     "p + 1 = 4 observations and, in its safeMode (on by default; safeMode: 0 "
                     "turns it off), more than q = 16 (levels x random effects, summed over "
                     "the factors); lower it in the spec to fit more voxels than BLMM"]
    assert converted.pop("missingness") == {"min_n": 17}
    (tmp_path / "c.json").write_text(json.dumps(converted))
    a, b = design_from_spec(load_spec(spec_path)), design_from_spec(load_spec(tmp_path / "c.json"))
    assert np.array_equal(a.X, b.X) and np.array_equal(a.factors[0].Z, b.factors[0].Z)
    assert np.array_equal(a.factors[0].codes, b.factors[0].codes)
    assert [(c.name, c.L.tolist()) for c in a.contrasts] == [(c.name, c.L.tolist()) for c in b.contrasts]


def test_the_tolerance_note_names_the_estimators_own_default():
    import inspect

    from mpiblmm.blmm_convert import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE
    from mpiblmm.lmm.estimate import fit

    assert inspect.signature(fit).parameters["tolerance"].default == DEFAULT_TOLERANCE
    assert inspect.signature(fit).parameters["max_iterations"].default == DEFAULT_MAX_ITERATIONS


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of a repeated key without a word (a fault audit's Y_files); the
    JSON spec refuses a repeated key, and so does the conversion, naming the line."""
    (tmp_path / "cfg.yml").write_text(BASE + "contrasts:\n  - c1: {name: a, vector: [0, 1, 0]}\n"
                                      "Y_files: other.txt\n")
    with pytest.raises(SpecError) as info:
        convert_file(tmp_path / "cfg.yml", cwd=tmp_path)
    assert str(info.value) == f"{tmp_path}/cfg.yml: line 8: Y_files is given twice: keep one"
    nested = BASE.replace("{name: s, factor: f.csv", "{name: s, name: t, factor: f.csv")
    (tmp_path / "cfg.yml").write_text(nested)
    with pytest.raises(SpecError, match="line 4: name is given twice"):
        convert_file(tmp_path / "cfg.yml", cwd=tmp_path)


def test_factor_codes_one_number_in_two_spellings_are_refused(tmp_path):
    # BLMM reads a factor's codes as numbers (2 == 2.0, 01 == 1), the spec as labels: the
    # conversion passed the file on and mpiblmm fitted twice the levels, another model
    # without a word (a BLMM audit: llh off by up to 21, sigma^2 by 125%)
    (tmp_path / "z.csv").write_text("1\n1\n1\n1\n")
    for codes, first, other in (("1\n2\n2.0\n3\n", "2", "2.0"), ("01\n1\n2\n2\n", "01", "1")):
        (tmp_path / "f.csv").write_text(codes)
        with pytest.raises(SpecError) as info:
            _convert(tmp_path, _weights("[0, 1, 0]"))
        assert str(info.value) == (
            f"{tmp_path}/cfg.yml: Z: f1.factor: codes {first!r} and {other!r} are one level to "
            "BLMM (it reads the codes as numbers) but two to mpiblmm (it reads them as "
            "labels): write every code of a level alike")
    (tmp_path / "f.csv").write_text("1\n2\n2\n3\n")        # alike: converted
    assert _convert(tmp_path, _weights("[0, 1, 0]"))[0]["random"][0]["factor"] == "f.csv"
    (tmp_path / "f.csv").write_text("a\nb\nb\nc\n")        # labels: the loader's business
    assert _convert(tmp_path, _weights("[0, 1, 0]"))[0]["random"][0]["factor"] == "f.csv"


def test_a_factor_file_with_a_header_row_is_refused(tmp_path):
    """BLMM reads a one-column file's header as a level (and then fails); the spec's factor
    files have none: named at conversion, not as a row count at the fit."""
    (tmp_path / "z.csv").write_text("1\n1\n1\n1\n")
    (tmp_path / "f.csv").write_text("subject\n1\n1\n2\n2\n")
    with pytest.raises(SpecError) as info:
        _convert(tmp_path, _weights("[0, 1, 0]"))
    assert str(info.value) == (
        f"{tmp_path}/cfg.yml: Z: f1.factor: {tmp_path}/f.csv starts with a header row "
        "('subject'), which BLMM reads as a level and mpiblmm's factor files must not have: "
        "delete that line (the conversion keeps the path)")


def test_contrasts_misspelt_missing_and_unknown_factor_fields(tmp_path):
    # a misspelt contrasts key gave a spec without contrasts (BLMM itself fails: KeyError)
    with pytest.raises(SpecError) as info:
        _convert(tmp_path, "contrast:\n  - c1: {name: a, vector: [0, 1, 0]}\n")
    assert str(info.value) == (f"{tmp_path}/cfg.yml: contrasts: required BLMM option is "
                               "missing (is 'contrast' a misspelling of it?)")
    spec, notes = _convert(tmp_path, "")                   # none at all: said so
    assert "contrasts" not in spec
    notes = [n for n in notes if not n.startswith("Missingness: BLMM's own voxel rules")]
    assert notes == ["contrasts: none given (BLMM needs at least one): the fit estimates the "
                     "model and writes no contrast maps; add contrasts to the spec"]
    text = BASE.replace("{name: s, factor: f.csv", "{nme: s, factor: f.csv")
    (tmp_path / "cfg.yml").write_text(text + _weights("[0, 1, 0]"))
    spec, notes = convert_file(tmp_path / "cfg.yml", output=tmp_path / "spec.json",
                               cwd=tmp_path)
    assert spec["random"][0]["name"] == "f1"
    assert "Z: f1.nme: unknown BLMM field, not converted (a factor has name, factor and " \
           "design)" in notes
