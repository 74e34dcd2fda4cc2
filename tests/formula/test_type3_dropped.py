"""A formula's default F tests are lmerTest's anova where a voxel's observed rows drop columns.

Reference: lme4/lmerTest on ``type3_dropped.csv``, made by ``make_type3_dropped.R`` beside
this file: y ~ group * sex + time + (1 | subject) over 3 groups x 2 sexes x 3 visits, six
voxels (complete; no cell C:F; no group C; no cell B:M and 9 more images missing; no cells
C:F and A:M; no group A, the reference level), REML and ML, each fitted on its observed rows
with group and sex factors.
There lme4 drops the columns those rows leave dependent, and lmerTest's anova (type III)
builds its hypotheses on what is left: ``group`` (contained in ``group:sex``) by the type III
construction made again on the voxel's rows and kept columns, ``group:sex`` by its kept
columns; ``group:sex`` has none left at y5 (NA in R, NaN here).  Without group A, R's
factor takes B as reference (``groupC``) where mpiblmm keeps the columns of its X
(``groupB``, against C): the same fit and F tests.  With sum-to-zero coding (``C(x,
contr.sum)``) lmerTest builds the hypotheses in treatment coding on the voxel's rows and maps
them to the model's coefficients, and so does mpiblmm.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.design import build_design
from mpiblmm.formula import default_contrasts, formula_model
from mpiblmm.formula_table import read_table
from mpiblmm.lmm.analysis import Settings, analyse_chunk
from mpiblmm.pipeline import model_from_design

HERE = Path(__file__).parent
FORMULA = "y ~ group * sex + time + (1 | subject)"
SUM = "y ~ C(group, contr.sum) * C(sex, contr.sum) + time + (1 | subject)"
FIELDS = ("F", "df_num", "df_den", "p")
# the default F contrasts (named by their terms) and lmerTest's anova rows, per coding
CODINGS = {"treatment": (FORMULA, "", {"group": "group", "group:sex": "group:sex"}),
           "sum": (SUM, "sum_", {"C(group, contr.sum)": "group",
                                 "C(group, contr.sum):C(sex, contr.sum)": "group:sex"})}


def _study(formula):
    table = read_table(HERE / "type3_dropped.csv")
    fm = formula_model(formula, table)
    design = build_design(fm.X, fm.factors, default_contrasts(fm), fm.names,
                          type3_basis=fm.type3_basis)
    Y = np.array([[float(c) if c else np.nan for c in table.cells[f"y{v}"]]
                  for v in range(1, 7)])
    ref = json.loads((HERE / "type3_dropped_lme4.json").read_text())
    return fm, model_from_design(design), Y, ref


@pytest.fixture(scope="module")
def study():
    return _study(FORMULA)


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-8))


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_default_f_tests_are_anovas_where_columns_drop(method, coding):
    formula, prefix, terms = CODINGS[coding]
    fm, model, Y, ref = _study(formula)
    assert fm.type3_basis is not None and model.type3 is fm.type3_basis
    out = analyse_chunk(model, Y, Settings(method=method))
    assert set(out["status"]) <= {0, 2}
    for v in range(6):
        r = ref[f"{prefix}{method}_y{v + 1}"]
        if coding == "treatment":
            names = [n.replace("groupC", "groupB") if v == 5 else n for n in r["kept"]]
            kept = [fm.names.index(name) for name in names]
            assert np.flatnonzero(np.isfinite(out["beta"][v])).tolist() == kept
        else:   # R names these group1, group2, sex1, ...
            assert np.isfinite(out["beta"][v]).sum() == len(r["kept"])
        shift = 0.0
        if coding == "sum" and method == "REML" and v in (2, 5):
            # a whole group unseen: R's factor codes the two levels left by contr.sum (+1, -1
            # where mpiblmm's X has 1, 0): the same fit, another parameterisation, whose REML
            # log-likelihood differs by log|det| of the recoding (2 columns halved: log 4)
            shift = np.log(4.0)
        assert r["logLik"] - 1e-6 <= out["llh"][v] - shift < r["logLik"] + 1e-5
        for term, row in terms.items():
            got = [out[f"contrasts/{term}/{f}"][v] for f in FIELDS]
            want = r["anova"][row]
            if want["F"] == "NA":
                assert np.isnan(got).all(), (term, v, got)
            else:
                assert _rel(got, [want[f] for f in FIELDS]) < 1e-4, (term, v, got, want)


def test_a_voxel_has_the_same_bits_alone_and_in_a_chunk(study):
    _, model, Y, _ = study
    together = analyse_chunk(model, Y, Settings())
    for v in range(6):
        alone = analyse_chunk(model, Y[v:v + 1], Settings())
        for path, values in together.items():
            np.testing.assert_array_equal(alone[path][0], values[v], err_msg=path)


def test_what_is_kept_to_make_the_hypotheses_again(study):
    """The basis: R where some term is contained in another (treatment coding), also the
    treatment coding's design for other codings; none for a one-term fixed part (type I rows
    per voxel) or where no term is contained in another (a term's own kept columns)."""
    fm, *_ = study
    table = read_table(HERE / "type3_dropped.csv")
    assert {t.label for t in fm.type3_basis.terms if fm.type3_basis.contained(t.label)} == \
        {"group", "sex"}
    assert fm.type3_basis.treatment_X is None
    for formula in ("y ~ group + (1 | subject)", "y ~ group + sex + time + (1 | subject)"):
        assert formula_model(formula, table).type3_basis is None, formula
    summed = formula_model(SUM, table).type3_basis
    assert summed.treatment_X.shape == fm.X.shape
    np.testing.assert_array_equal(summed.treatment_X, fm.X)
    np.testing.assert_array_equal(summed.R, fm.type3_basis.R)
    terms = {c[0]: c[4] for c in default_contrasts(fm) if len(c) > 4}
    assert terms == {"group": "group", "group:sex": "group:sex"}
