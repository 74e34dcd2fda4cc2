"""The fixed part of a formula against R itself: column names and values of
``model.matrix(lme4::nobars(formula), read.csv(...))``, recorded by
``tests/formula/make_r_colnames.R`` (R 4.2.2, lme4 1.1-31) in ``r_colnames.json``; the
cases over ``r_colnames_dotted_data.csv`` (columns named as read.csv names them: ``age.z``,
``x.1``, ``.hidden``, ``class``, used inside calls too) also with their random terms'
groupings and effects (``lFormula(...)$reTrms$cnms``); so too the cases over
``r_colnames_spaced_data.csv``, whose columns are not syntactic R names (``age at scan``,
``grp-f``, ``if``, ``a b`` beside ``a.b``): named as read.csv names them (``age.at.scan``,
``a.b.1``) or, the cases with ``"check_names": false`` (R read the table with
``check.names = FALSE``), in backticks (`` `age at scan` ``, also in groupings).

The cases over ``r_colnames_coding_data.csv`` check R's names of levels of numbers
(``factor(vf)2`` for 2.0, ``1e+05``), one-column matrices (``poly(x)``) and contrasts given
to ``C()`` (``C(grp, contr.sum)1``; by function or short name, R's five); those with
``"strings_as_factors"`` were read by R with text columns as factors (R's ``C()`` needs a
factor; mpiblmm codes a text column as that factor).

Known differences are recorded too and checked as such: an interaction of text columns
without its margins (``a:b`` with an intercept, ``a:b:c + a``), which R codes
rank-deficiently and formulaic (hence mpiblmm) with full rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.formula import formula_model, parse_formula
from mpiblmm.formula_table import read_table

HERE = Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "r_colnames.json").read_text())
TABLE = read_table(HERE / "r_colnames_data.csv")
TABLES = {name: read_table(HERE / name)
          for name in {case["data"] for case in REFERENCE["cases"] if "data" in case}}


SAME = [c for c in REFERENCE["cases"] if "known_difference" not in c]
DIFFERENT = [c for c in REFERENCE["cases"] if "known_difference" in c]


@pytest.mark.parametrize("case", SAME, ids=[c["formula"] for c in SAME])
def test_names_and_values_equal_r(case):
    model = formula_model(case["formula"], TABLES.get(case.get("data"), TABLE))
    assert list(model.names) == case["names"]
    R = np.asarray(case["X"], dtype=float).T
    np.testing.assert_allclose(model.X, R, rtol=1e-13, atol=1e-14)
    if "random" in case:     # lme4's terms (in its order): the same groupings and effects
        groupings = [b.name for b in parse_formula(case["formula"]).bars]
        ours = sorted((g, list(f[3])) for g, f in zip(groupings, model.factors))
        assert ours == sorted((t["grouping"], t["effects"]) for t in case["random"])


def test_known_difference_interaction_without_margins():
    """R: (Intercept) sexF:sitea sexM:sitea ... sexM:sitec (7 columns, one more than the 6
    cells: always rank deficient); formulaic's coding has one column per cell."""
    model = formula_model("y ~ sex:site + (1 | subject)", TABLE)
    assert list(model.names) == ["(Intercept)", "siteb", "sitec", "sexM:sitea", "sexM:siteb",
                                 "sexM:sitec"]
    assert model.X.shape[1] == 6


@pytest.mark.parametrize("case", DIFFERENT, ids=[c["formula"] for c in DIFFERENT])
def test_known_difference_rank_deficient_coding(case):
    """R's coding is rank deficient (lme4 then drops columns); ours is formulaic's full-rank
    coding of the same terms: the same column space, and names as R writes them (R's labels
    of each variable, ``grpa:hq:ohi``, never formulaic's ``grp[a]:h[T.q]:o[hi]``), a column of
    R's name having R's values."""
    model = formula_model(case["formula"], TABLES.get(case.get("data"), TABLE))
    R = np.asarray(case["X"], dtype=float).T
    assert np.linalg.matrix_rank(model.X) == model.X.shape[1] == np.linalg.matrix_rank(R)
    assert np.linalg.matrix_rank(np.column_stack([model.X, R])) == model.X.shape[1]
    r_labels = {piece for name in case["names"] for piece in name.split(":")}
    for j, name in enumerate(model.names):
        assert set(name.split(":")) <= r_labels, name
        if name in case["names"]:
            np.testing.assert_array_equal(model.X[:, j], R[:, case["names"].index(name)])
