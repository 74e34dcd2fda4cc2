"""A formula whose fixed columns are exactly dependent on all rows (an empty cell of an
interaction, levels nested in another factor) is fitted as lme4 fits it: without them.

lme4 says "fixed-effect model matrix is rank deficient so dropping 1 column" and fits the
rest; mpiblmm refused such a formula with "drop or recode that column", which the formula
form cannot do (an audit's ``grp * sex`` with no ``ad`` subject ``M``; the same empty cell at
a single voxel was already fitted as lme4 fits it).  Here: the columns lme4 drops are left out of
the design (with a note; still refused in the matrix form, which can leave them out, and
for a column only *nearly* dependent), its default T and F tests are lme4/lmerTest's on the
reduced model (the F of ``grp:sex`` has one row), and the fit equals that of the formula
written without the column, voxel by voxel.  The audit's comparison of such a fit with
lme4/lmerTest (T and type III F tests, per-voxel missing data) agreed within 5e-7.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpiblmm.checks import fittable_problems, lme4_dropped_columns
from mpiblmm.design import design_from_spec
from mpiblmm.errors import UserError
from mpiblmm.formula import formula_model
from mpiblmm.formula_table import read_table
from mpiblmm.lmm.analysis import Settings, analyse_chunk
from mpiblmm.pipeline import model_from_design
from mpiblmm.spec import load_spec
from mpiblmm.study import write_study

FORMULA = "y ~ grp * sex + age + (1 | subject)"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A simulated study (24 subjects x 3 visits) whose table gets grp a/b/c by sex F/M with
    no subject of group a male (an empty cell)."""
    folder = tmp_path_factory.mktemp("empty_cell")
    write_study(folder, subjects=24, visits=3, shape=(3, 2, 2), seed=3, form="formula")
    lines = (folder / "participants.csv").read_text().splitlines()
    subjects = sorted({ln.split(",")[0] for ln in lines[1:]})
    out = [lines[0] + ",grp,sex"]
    for ln in lines[1:]:
        s = subjects.index(ln.split(",")[0])
        grp = "abc"[s % 3]
        out.append(f"{ln},{grp},{'F' if grp == 'a' else 'FM'[(s // 3) % 2]}")
    (folder / "participants.csv").write_text("\n".join(out) + "\n")
    return folder


def _spec(folder, formula, name="spec_t.json", **more):
    spec = json.loads((folder / "spec.json").read_text())
    spec.pop("contrasts", None)
    spec.update(formula=formula, **more)
    (folder / name).write_text(json.dumps(spec))
    return load_spec(folder / name)


def test_lme4s_dropped_column_is_left_out_with_a_note(study):
    full = formula_model(FORMULA, read_table(study / "participants.csv"))
    assert list(full.names) == ["(Intercept)", "grpb", "grpc", "sexM", "age", "grpb:sexM",
                                "grpc:sexM"]
    assert lme4_dropped_columns(full.X) == ([6], None)   # R drops the last: grpc:sexM
    spec = _spec(study, FORMULA)
    design = design_from_spec(spec)
    assert design.fixed_names == ("(Intercept)", "grpb", "grpc", "sexM", "age", "grpb:sexM")
    np.testing.assert_array_equal(design.X, full.X[:, :6])
    assert fittable_problems(design, spec) == []
    assert len(design.notes) == 1 and design.notes[0].startswith(
        "column 7 ('grpc:sexM') is a linear combination of the columns before it")
    assert "as lme4 drops it" in design.notes[0]
    # lmerTest's summary (a T per kept coefficient) and anova (grp:sex: one row left)
    kinds = {c.name: (c.kind, c.L.shape) for c in design.contrasts}
    assert kinds["sexM"] == ("T", (1, 6)) and "grpc:sexM" not in kinds
    assert kinds["grp:sex"] == ("F", (1, 6)) and kinds["grp"][0] == "F"
    # a contrast of the dropped coefficient is refused by name, as lme4 has none
    with pytest.raises(UserError, match="no coefficient 'grpc:sexM'"):
        design_from_spec(_spec(study, FORMULA, "spec_c.json", contrasts=[
            {"name": "gs", "weights": {"grpc:sexM": 1}}]))


def test_a_nearly_dependent_column_is_still_refused(study):
    spec = _spec(study, "y ~ sex + I(age + 1e9) + (1 | subject)")
    design = design_from_spec(spec)
    assert lme4_dropped_columns(design.X) == ([], 2) and design.notes == ()
    problems = fittable_problems(design, spec)
    assert len(problems) == 1 and "is nearly a linear combination" in str(problems[0])
    # several exact dependencies: each dropped, in R's order
    X = np.column_stack([design.X[:, :2], 2 * design.X[:, 1], np.zeros(len(design.X)),
                         design.X[:, 0] - design.X[:, 1]])
    assert lme4_dropped_columns(X) == ([2, 3, 4], None)


def test_the_fit_equals_the_formula_without_the_column(study):
    """lme4's reduced model written out (the cells of grp:sex that exist) fits the same."""
    a = design_from_spec(_spec(study, FORMULA))
    b = design_from_spec(_spec(study, "y ~ grp + sex + age + I((grp == 'b') * (sex == 'M')) "
                                      "+ (1 | subject)"))
    np.testing.assert_array_equal(a.X, b.X)
    rng = np.random.default_rng(9)
    n, v = a.n, 30
    Y = (a.X @ rng.normal(size=(a.p, v)) + rng.normal(size=(24, v))[a.factors[0].codes]
         + rng.normal(size=(n, v))).T
    Y[:8, rng.choice(n, 5, replace=False)] = np.nan        # some voxels miss observations
    out = analyse_chunk(model_from_design(a), Y, Settings())
    ref = analyse_chunk(model_from_design(b), Y, Settings())
    assert (out["status"] == 0).all()
    for key in ("llh", "beta", "sigma2", "contrasts/sexM/t", "contrasts/sexM/df",
                "contrasts/grpb:sexM/t"):
        np.testing.assert_array_equal(out[key], ref[key.replace("grpb:sexM", "I((grp == \"b\") * (sex == \"M\"))")] if key.startswith("contrasts/grpb") else ref[key], err_msg=key)
    assert np.isfinite(out["contrasts/grp:sex/F"]).all()


@pytest.mark.parametrize("formula, left", [
    ("y ~ time + I(0 * age) + I(2 * time) + (1 | subject)", ["I(0 * age)", "I(2 * time)"]),
    ("y ~ factor(visit) + factor(visit):time + (1 | subject)", None)])
def test_a_zero_column_before_a_dependent_one_is_left_out_not_a_traceback(study, formula, left):
    """Describing a dependent column after an all-zero one divided by its zero length: NaN,
    and numpy's 'SVD did not converge' traceback from check and fit (formula audit: 25 of
    1,200 random formulas, e.g. factor(time) + factor(time):time, which lme4 fits)."""
    design = design_from_spec(_spec(study, formula))
    dropped = [name for name, _ in design.left_out]
    assert left is None or dropped == left
    assert dropped and all("left out, as lme4 drops it" in n for n in design.notes)
    assert any("is zero" in n for n in design.notes)


def test_an_exact_column_before_a_nearly_dependent_one_names_the_near_one(study):
    """The refusal named the first dependent column, which lme4 would drop, and said to drop
    or recode it; doing so only showed the nearly dependent column after it (formula
    audit)."""
    with pytest.raises(UserError) as err:
        design_from_spec(_spec(study, "y ~ sex + I(2 * (sex == 'M')) + I(age + 1e9) "
                                      "+ (1 | subject)"))
    message = str(err.value)
    assert "column 4 ('I(age + 1e+09)') is nearly a linear combination" in message
    assert "(the column before it exactly dependent, 'I(2 * (sex == \"M\"))', would be " \
        "left out as lme4 drops them)" in message
