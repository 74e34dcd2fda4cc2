"""Default F contrasts of the formula form against lmerTest's ``anova`` (type III).

``r_type3.json`` was recorded by ``tests/formula/make_r_type3.R`` (R 4.2.2, lme4 1.1-31,
lmerTest 3.1-3) from ``type3_data.csv`` (``make_type3_data.py``): per formula, the hypothesis
matrices ``anova()`` tests (``lmerTest:::get_contrasts_type3``) and the anova table of three
responses and of one with missing rows.  A term contained in another (``group`` in ``sex *
group``) is tested for its main effect, not for its own coefficients (a simple effect); a
term contained in none by its coefficients; with a factor not coded by treatment contrasts
(``C(group, sum)``) by the treatment-coded hypotheses written on its coefficients; a fixed
part of one term by type I rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.design import build_design
from mpiblmm.formula import default_contrasts, formula_model
from mpiblmm.formula_table import read_table
from mpiblmm.lmm.analysis import Settings, analyse_chunk
from mpiblmm.pipeline import model_from_design
from mpiblmm.lmm.type3 import Term, contains, marginal_variables, type3

HERE = Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "r_type3.json").read_text())
TABLE = read_table(HERE / "type3_data.csv")
IDS = [c["formula"] for c in REFERENCE["cases"]]


def _model(case):
    model = formula_model(case["formula"], TABLE)
    assert sorted(model.names) == sorted(case["coefficients"])
    order = [list(model.names).index(name) for name in case["coefficients"]]   # R's order
    return model, order


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=IDS)
def test_f_contrasts_are_lmertests_type3_hypotheses(case):
    model, order = _model(case)
    contrasts = {name: L for name, L, *_ in default_contrasts(model)}
    multi = [label for label, cols in model.terms if len(cols) > 1]
    assert multi
    for label in multi:
        ref = np.asarray(case["hypotheses"][label], dtype=float)
        ours = contrasts[label][:, order]
        # lmerTest rounds its matrices to 7 significant digits (zapsmall)
        np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=label)


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=IDS)
def test_f_tests_match_lmertest_anova(case):
    """The three responses and y1 with every 7th row missing: a voxel with missing data.
    lmerTest's type III rows do not depend on which rows are observed; its type I rows (one
    term: ``group``, ``C(site, sum)``) do, and are each voxel's own."""
    model, _ = _model(case)
    design = build_design(model.X, model.factors, default_contrasts(model), model.names)
    Y = np.array([[float(TABLE.cells[y][i]) for i in range(TABLE.n)] for y in ("y1", "y2", "y3",
                                                                             "y1")])
    Y[3, 6::7] = np.nan         # "y1 holes": every 7th row missing, as lmer drops them (na.omit)
    out = analyse_chunk(model_from_design(design), Y, Settings())
    for v, table in enumerate(case["anova"]):
        assert out["llh"][v] >= table["logLik"] - 1e-6
        for i, term in enumerate(table["term"]):
            if table["NumDF"][i] < 2:
                continue                      # one column: its T contrast (summary's) only
            key = f"contrasts/{term}"
            assert out[f"{key}/df_num"][v] == table["NumDF"][i], term
            np.testing.assert_allclose(out[f"{key}/F"][v], table["F"][i], rtol=1e-5, err_msg=term)
            np.testing.assert_allclose(out[f"{key}/df_den"][v], table["DenDF"][i], rtol=1e-4,
                                       err_msg=term)
            np.testing.assert_allclose(out[f"{key}/p"][v], table["p"][i], rtol=1e-4, err_msg=term)


def test_two_by_three_main_effect_is_the_average_over_the_other_factor():
    """Known truth for treatment coding: in sex (F, M) x group (a, b, c), the main effect of
    group is (mu_Fb + mu_Mb)/2 - (mu_Fa + mu_Ma)/2 = beta_b + beta_Mb / 2 (and c alike)."""
    rng = np.random.default_rng(0)
    sex = rng.integers(0, 2, 60)
    grp = rng.integers(0, 3, 60)
    one = np.ones(60)
    X = np.column_stack([one, sex, grp == 1, grp == 2, sex * (grp == 1), sex * (grp == 2)])
    R = np.column_stack([one, sex == 0, sex == 1, grp == 0, grp == 1, grp == 2]
                        + [(sex == s) & (grp == g) for g in range(3) for s in range(2)])
    sg = frozenset({"sex", "group"})
    terms = [Term("sex", (1,), (1, 2), frozenset({"sex"}), frozenset({"sex"}), frozenset()),
             Term("group", (2, 3), (3, 4, 5), frozenset({"group"}), frozenset({"group"}),
                  frozenset()),
             Term("sex:group", (4, 5), tuple(range(6, 12)), sg, sg, frozenset())]
    out = type3(X.astype(float), R.astype(float), terms)
    assert set(out) == {"sex", "group"}
    truth = np.array([[0, 0, 1, 0, 0.5, 0], [0, 0, 0, 1, 0, 0.5]])
    L = out["group"]
    # the same hypothesis: the rows span the same space
    assert np.linalg.matrix_rank(np.vstack([L, truth]), tol=1e-9) == 2 == np.linalg.matrix_rank(L)


def _term(variables, model, numeric=()):
    v = frozenset(variables)
    marginal = marginal_variables(v, {frozenset(m) for m in model})
    return Term(":".join(variables), (), (), v, marginal, marginal & frozenset(numeric))


def test_containment_is_lmertests():
    model = [("sex",), ("group",), ("time",), ("sex", "group"), ("sex", "time"), ("group", "time"),
             ("sex", "group", "time")]
    a, t, ab, at, abt = (_term(v, model, ["time"]) for v in
                         [("group",), ("time",), ("sex", "group"), ("group", "time"),
                          ("sex", "group", "time")])
    assert contains(a, ab) and not contains(ab, a)
    assert not contains(a, at)               # numeric variables differ
    assert contains(t, at) and contains(at, abt) and not contains(a, abt)
    assert not contains(a, a)


def test_marginal_variables_are_rs_factor_codes():
    """attr(terms(y ~ 0 + group + group:sex), "factors"): group:sex codes group 2 (its
    margin sex is absent) and sex 1; y ~ a*b*c - a:b codes c 2 in a:b:c."""
    assert marginal_variables(frozenset({"group", "sex"}),
                              {frozenset({"group"}), frozenset({"group", "sex"})}) == {"sex"}
    abc = [{"a"}, {"b"}, {"c"}, {"a", "c"}, {"b", "c"}, {"a", "b", "c"}]
    assert marginal_variables(frozenset("abc"), {frozenset(m) for m in abc}) == {"a", "b"}
    assert marginal_variables(frozenset({"a"}), set()) == {"a"}


def test_one_term_f_tests_take_each_voxels_own_type1_rows():
    """``y ~ cond + (1 + cond | subject)`` on three responses each missing 15 of 240 rows
    (``type1_data.csv`` and ``r_type1.json``, made by ``make_r_type3.R``): lmerTest's anova
    tests the type I rows of each fit's own X'X, so DenDF follows the voxel's missing rows
    (the rows' last entry is -0.513, -0.510, -0.493 where the complete data give -0.5).  The
    rows of the complete data give DenDF 1.2e-4 to 1.3e-4 off here (up to 1.2% at voxels of a
    study with unbalanced missing data)."""
    reference = json.loads((HERE / "r_type1.json").read_text())
    table = read_table(HERE / "type1_data.csv")
    model = formula_model(reference["formula"], table)
    design = build_design(model.X, model.factors, default_contrasts(model), model.names)
    Y = np.array([[float(table.cells[y][i]) if table.cells[y][i] != "NA" else np.nan
                   for i in range(table.n)] for y in ("y1", "y2", "y3")])
    assert (np.isnan(Y).sum(axis=1) == 15).all()
    out = analyse_chunk(model_from_design(design), Y, Settings())
    for v, ref in enumerate(reference["anova"]):
        assert not ref["singular"] and out["status"][v] == 0
        assert out["llh"][v] >= ref["logLik"] - 1e-6
        np.testing.assert_allclose(out["contrasts/cond/F"][v], ref["F"][0], rtol=1e-6)
        np.testing.assert_allclose(out["contrasts/cond/df_den"][v], ref["DenDF"][0], rtol=1e-5)
        np.testing.assert_allclose(out["contrasts/cond/p"][v], ref["p"][0], rtol=1e-5)
