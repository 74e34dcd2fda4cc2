"""`mpiblmm check` (every problem at once, the summary) and the spec's JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from mpiblmm.check import check_spec
from mpiblmm.schema import SCHEMA, schema_problems
from mpiblmm.study import write_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    write_study(folder, subjects=8, visits=3, shape=(4, 4, 3), seed=3)
    return folder


def test_schema_is_valid_and_accepts_both_forms(study):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    spec = json.loads((study / "spec.json").read_text())
    assert schema_problems(spec) == []
    formula = {"images": "images.txt", "covariates": "participants.csv",
               "formula": "y ~ age + time + (1 + time | subject)",
               "contrasts": [{"name": "t", "weights": {"time": 1}},
                             {"name": "f", "weights": [{"age": 1}, {"time": 1}]}]}
    assert schema_problems(formula) == []
    jsonschema.validate(formula, SCHEMA)


@pytest.mark.parametrize("change, expected", [
    ({"formual": "y ~ 1"}, ("formual", "did you mean 'formula'?")),
    ({"covariates": "c.csv"}, ("X", "not both")),
    ({"contrasts": [{"name": "a", "weights": {"age": "x"}}]},
     ('contrasts[0] ("a").weights.age', "expected a number")),
    ({"max_memory_mb": -1}, ("max_memory_mb", "greater than 0")),
])
def test_schema_messages(study, change, expected):
    spec = json.loads((study / "spec.json").read_text())
    spec.update(change)
    problems = schema_problems(spec)
    assert any(k == expected[0] and expected[1] in m for k, m in problems), problems


def test_check_summary(study):
    problems, summary = check_spec(study / "spec.json", ranks=4)
    assert problems == []
    text = "\n".join(summary)
    assert "observations: n = 24" in text
    assert "fixed effects: p = 3: intercept, age, time" in text
    assert "subject: 8 levels (3-3 observations each), 2 effect(s): intercept, time" in text
    assert "age_or_time: F: 1 age; 1 time" in text
    assert "candidate voxels: at most 48" in text
    assert "memory per rank: at most about" in text and "on 4 rank(s), a lower bound" in text
    assert summary[-1] == "check: OK"


def test_check_says_why_the_first_image_observes_no_voxel(study, tmp_path):
    """check reads the first image only: where it is all 0, the candidate line says why no
    voxel of it is observed (a fault audit: check said OK, the fit then refused all-zero
    images)."""
    import nibabel as nib

    spec = json.loads((study / "spec.json").read_text())
    images = [str(study / p) for p in (study / spec["images"]).read_text().split()]
    img = nib.load(images[0])                     # (the study's list file, images.txt)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine),
             str(tmp_path / "zero.nii"))
    spec["images"] = [str(tmp_path / "zero.nii")] + images[1:]
    # beside the study's spec: its other files are named relative to it
    (study / "zero_first.json").write_text(json.dumps(dict(spec, output=str(tmp_path / "o"))))
    problems, summary = check_spec(study / "zero_first.json")
    assert problems == [], problems
    (line,) = [x for x in summary if x.startswith("candidate voxels:")]
    assert "; 0 observed in the first image, every value 0 (missing while zero_is_missing is " \
        "true), NaN or Inf; voxels no image observes are dropped)" in line, line


def test_check_lists_every_problem(study, tmp_path):
    spec = json.loads((study / "spec.json").read_text())
    spec["images"] = str(study / "images.txt")
    spec["X"] = str(study / "X.csv")
    spec["random"][0].update(factor=str(study / "factor_subject.csv"),
                             design=str(study / "Z_subject.csv"))
    bad = dict(spec, colour=1, missingness={"min_n": 0}, estimation={"method": "OLS"})
    bad["contrasts"] = [dict(spec["contrasts"][0], weights=[0, "x", 1])]
    (tmp_path / "a.json").write_text(json.dumps(bad))
    problems, _ = check_spec(tmp_path / "a.json")
    assert len(problems) == 4 and all("\n" not in p for p in problems)
    assert [p.split(": ")[1] for p in problems] == [
        "colour", 'contrasts[0] ("time").weights[1]', "estimation.method", "missingness.min_n"]

    bad = dict(spec, X="nope.csv")
    bad["random"] = [dict(spec["random"][0], design="nah.csv")]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    problems, _ = check_spec(tmp_path / "b.json")
    assert [p.split(": ")[1] for p in problems] == ["X", "random[0].design"]

    bad = dict(spec, missingness={"min_n": 1000})
    bad["contrasts"] = [dict(spec["contrasts"][0], weights=[0, 0, 0]),
                        dict(spec["contrasts"][1], weights=[0, 1])]
    (tmp_path / "c.json").write_text(json.dumps(bad))
    problems, _ = check_spec(tmp_path / "c.json")
    assert 'contrasts[0] ("time").weights: all weights are zero' in problems[0]
    assert 'contrasts[1] ("age").weights: each row needs 3 weights' in problems[1]
    assert "missingness.min_n: 1000 is more than the 24 observations" in problems[2]


def test_check_lists_min_n_beside_a_formula_that_cannot_be_built(tmp_path):
    # a contract audit: only the formula's line was printed, then "1 problem(s)"
    write_study(tmp_path / "s", subjects=8, visits=3, shape=(4, 4, 3), seed=3, form="formula")
    spec = json.loads((tmp_path / "s" / "spec.json").read_text())
    spec["formula"] = spec["formula"].replace("age", "agee", 1)
    spec["missingness"] = {"min_n": 100}
    (tmp_path / "s" / "bad.json").write_text(json.dumps(spec))
    problems, _ = check_spec(tmp_path / "s" / "bad.json")
    assert len(problems) == 2, problems
    assert "formula: term 'agee'" in problems[0]
    assert problems[1].endswith("missingness.min_n: 100 is more than the 24 observations: no "
                                "voxel could be fitted")


def test_check_rank_deficient_design(study, tmp_path):
    X = np.loadtxt(study / "X.csv", delimiter=",")
    np.savetxt(tmp_path / "X.csv", np.column_stack([X, X[:, 1] * 2]), delimiter=",")
    spec = json.loads((study / "spec.json").read_text())
    spec.update(images=str(study / "images.txt"), X=str(tmp_path / "X.csv"), contrasts=[])
    spec.pop("fixed_names")
    spec["random"][0].update(factor=str(study / "factor_subject.csv"),
                             design=str(study / "Z_subject.csv"))
    (tmp_path / "s.json").write_text(json.dumps(spec))
    problems, _ = check_spec(tmp_path / "s.json")
    assert any("X.csv: column 4 ('x3') is a linear combination of the columns before it: X "
               "is rank deficient" in p for p in problems), problems


def test_check_factor_levels(tmp_path):
    rows = "".join(f"s{i},{i % 3},{i * 0.5}\n" for i in range(6))
    (tmp_path / "c.csv").write_text("subject,site,age\n" + rows)
    (tmp_path / "images.txt").write_text("".join(f"i{i}.nii\n" for i in range(6)))
    for i in range(6):
        (tmp_path / f"i{i}.nii").write_bytes(b"")
    spec = {"images": "images.txt", "covariates": "c.csv",
            "formula": "y ~ age + (1 | subject) + (1 + age | site)"}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    problems, _ = check_spec(tmp_path / "s.json")
    text = "\n".join(problems)
    assert "random[0] ('subject'): 6 observations for 6 random effects (6 levels x 1" in text
    assert "random[1] ('site'): 6 observations for 6 random effects (3 levels x 2" in text


@pytest.mark.spawns_mpiexec
def test_check_through_the_cli(tmp_path, run_mpi, mpiblmm_command):
    """The demo's form: `mpiblmm check` prints the summary and exits 0 on every rank; a
    spec with several problems lists them all, one line each, and exits 2."""
    write_study(tmp_path, subjects=6, visits=3, shape=(3, 3, 2), seed=1, form="formula")
    run = run_mpi(2, [*mpiblmm_command, "check", str(tmp_path / "spec.json")], timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fixed effects: p = 3: (Intercept), age, time" in run.stdout
    assert run.stdout.count("check: OK") == 1 and run.stderr == ""
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec.update(formual="x", max_memory_mb=0)
    spec["contrasts"][0]["weights"] = {"time": "a"}
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    run = run_mpi(2, [*mpiblmm_command, "check", str(tmp_path / "bad.json")], timeout=120)
    assert run.returncode == 2
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("mpiblmm: error:")]
    assert len(errors) == 3 and "Traceback" not in run.stderr, run.stderr


def test_check_notes_a_numeric_column_turned_text_by_one_cell(tmp_path):
    """One '2.O' in a numeric column makes it a factor (as in R): check says which cell."""
    write_study(tmp_path, subjects=6, visits=3, shape=(3, 3, 2), seed=4, form="formula")
    lines = (tmp_path / "participants.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[5].split(",")
    cells[header.index("visit")] = "2.O"
    lines[5] = ",".join(cells)
    (tmp_path / "edited.csv").write_text("\n".join(lines) + "\n")
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec.update(formula="y ~ visit + (1 | subject)", contrasts=[], covariates="edited.csv")
    (tmp_path / "s.json").write_text(json.dumps(spec))
    problems, summary = check_spec(tmp_path / "s.json")
    assert not problems
    notes = [line for line in summary if line.startswith("note: ")]
    assert len(notes) == 1 and "column 'visit'" in notes[0] and "row 6: '2.O'" in notes[0], notes
    _, clean = check_spec(tmp_path / "spec.json")
    assert not [line for line in clean if line.startswith("note: ")]


def _typo_study(folder, column, value, **spec_keys):
    """A formula study of 6 subjects x 3 visits whose covariate ``column`` holds
    ``value(row)`` (one of them a typo), as ``edited.csv``, and its spec ``s.json`` with
    ``spec_keys`` and no contrasts."""
    write_study(folder, subjects=6, visits=3, shape=(3, 3, 2), seed=4, form="formula")
    lines = (folder / "participants.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    for i, cells in enumerate(rows):
        cells[header.index(column)] = value(i)
    (folder / "edited.csv").write_text("\n".join([lines[0]] + [",".join(c) for c in rows])
                                       + "\n")
    spec = json.loads((folder / "spec.json").read_text())
    spec.update(contrasts=[], covariates="edited.csv", **spec_keys)
    (folder / "s.json").write_text(json.dumps(spec))


def test_check_gives_the_note_with_the_problem_a_text_column_causes(tmp_path):
    """A typo that makes a numeric column a factor of many levels can make p >= n; the note
    saying which cell did it used to come only with a successful check (audit, tenth
    session)."""
    # age: 18 distinct values, one of them a typo
    _typo_study(tmp_path, "age", lambda i: f"{60 + i * 0.5}" if i != 4 else "6O.5",
                formula="y ~ age + (1 | subject)")
    problems, notes = check_spec(tmp_path / "s.json")
    assert any("fixed effects (columns) but only 18 observations" in p for p in problems)
    assert len(notes) == 1 and notes[0].startswith("note: column 'age'") \
        and "'6O.5'" in notes[0], notes
    # the error itself says it too (the fit prints no notes before an error: a fault audit's
    # fit said only "24 fixed effects (columns) but only 24 observations")
    (p_ge_n,) = [p for p in problems if "but only 18 observations" in p]
    assert "(perhaps because column 'age' of" in p_ge_n and "'6O.5'" in p_ge_n, p_ge_n


def test_a_typo_is_named_in_every_error_of_the_design(tmp_path):
    """A re-check: a typo that made [X Z] fit every observation was told to drop a random
    term, without the cell.  Every error of the design (here p >= n) names the cell; the
    spec's own min_n does not."""
    from mpiblmm.checks import fittable_problems
    from mpiblmm.design import design_from_spec
    from mpiblmm.spec import load_spec

    # time: 18 distinct values, one of them a typo
    _typo_study(tmp_path, "time", lambda i: f"{i * 0.25}" if i != 9 else "2.0x",
                formula="y ~ time + (1 | subject)", missingness={"min_n": 100})
    spec = load_spec(tmp_path / "s.json")
    problems = [str(p) for p in fittable_problems(design_from_spec(spec), spec)]
    hinted = [p for p in problems if "(perhaps because column 'time' of" in p]
    assert hinted and all("row 11: '2.0x'" in p for p in hinted), problems
    # the spec's own min_n is not the typo's doing
    (min_n,) = [p for p in problems if "missingness.min_n" in p]
    assert "perhaps" not in min_n


def test_a_text_column_the_model_fits_is_a_note_of_the_fit_too(tmp_path):
    """A typo that makes a covariate a factor of few levels fits without an error: the fit's
    notes (checks.design_notes, printed by check and fit alike) name the cell."""
    from mpiblmm.checks import design_notes
    from mpiblmm.design import design_from_spec
    from mpiblmm.spec import load_spec

    write_study(tmp_path, subjects=6, visits=3, shape=(3, 3, 2), seed=4, form="formula")
    lines = (tmp_path / "participants.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    for i, cells in enumerate(rows):          # dose: 0 or 1, one of them typed 'l'
        cells.append("l" if i == 4 else str(i % 2))
    (tmp_path / "edited.csv").write_text("\n".join([",".join(header + ["dose"])]
                                                   + [",".join(c) for c in rows]) + "\n")
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec.update(formula="y ~ dose + (1 | subject)", contrasts=[], covariates="edited.csv")
    (tmp_path / "s.json").write_text(json.dumps(spec))
    spec = load_spec(tmp_path / "s.json")
    notes = design_notes(spec, design_from_spec(spec))
    assert [n for n in notes if n.startswith("column 'dose'") and "row 6: 'l'" in n], notes


def test_check_sizes_chunks_as_the_fit_does_for_several_factors(tmp_path):
    """Sites, families and subjects (the blocked layout): check's chunk is the fit's
    (pipeline.chunk_voxels), not one sized for a dense q x q Z'Z (it said 1 voxel and ~20 GB
    per rank for an ABCD-like study the fit ran in 480 MiB)."""
    from mpiblmm.check import _memory
    from mpiblmm.design import design_from_spec
    from mpiblmm.pipeline import chunk_voxels, model_from_design
    from mpiblmm.spec import load_spec
    from mpiblmm.study import Grouping

    write_study(tmp_path, subjects=300, visits=2, shape=(3, 3, 2), seed=5,
                grouping=Grouping(sites=4, families=120, slopes=()))
    spec = load_spec(tmp_path / "spec.json")
    design = design_from_spec(spec)
    model = model_from_design(design)
    budget, base = 164.0, 100.0
    mem, chunk = _memory(design, 10_000, 1, budget, base)
    # the fit sizes chunks from the budget less what a rank holds at its start (check had
    # the whole budget: 7,649 voxels where the fit took 7,300)
    assert chunk == chunk_voxels(budget - base, design.n, model) > 1
    assert mem < 4 * budget


def test_a_contrast_on_a_column_left_out_says_why(tmp_path):
    # a fuzz audit: age constant (collinear with the intercept) is left out as lme4 drops it,
    # and a contrast on it said only "no coefficient 'age'" (check and fit alike)
    from mpiblmm.design import design_from_spec
    from mpiblmm.errors import UserError
    from mpiblmm.spec import load_spec

    write_study(tmp_path / "s", subjects=8, visits=3, shape=(4, 4, 3), seed=3, form="formula")
    folder = tmp_path / "s"
    spec = json.loads((folder / "spec.json").read_text())
    table = (folder / spec["covariates"]).read_text().splitlines()
    col = table[0].split(",").index("age")
    rows = [r.split(",") for r in table[1:]]
    for r in rows:
        r[col] = "50"
    (folder / spec["covariates"]).write_text(
        "\n".join([table[0]] + [",".join(r) for r in rows]) + "\n")
    spec["contrasts"] = [{"name": "age", "weights": {"age": 1}}]
    (folder / "bad.json").write_text(json.dumps(spec))
    problems, _ = check_spec(folder / "bad.json")
    why = ("contrasts[0] (\"age\").weights: no coefficient 'age' (coefficients: (Intercept), "
           "time): column 2 ('age') is a linear combination of the columns before it, so it "
           "was left out as lme4 drops it")
    assert len(problems) == 1 and problems[0].endswith(why), problems
    with pytest.raises(UserError) as err:
        design_from_spec(load_spec(folder / "bad.json"))
    assert str(err.value) == problems[0]
