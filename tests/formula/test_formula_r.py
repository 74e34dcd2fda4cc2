"""The fixed part of a formula against R itself: column names and values of
``model.matrix(lme4::nobars(formula), read.csv(...))``, recorded by
``tests/formula/make_r_colnames.R`` (R 4.2.2, lme4 1.1-31) in ``r_colnames.json``; the
cases over ``r_colnames_dotted_data.csv`` (columns named as read.csv names them: ``age.z``,
``x.1``, ``.hidden``, ``class``, used inside calls too) also with their random terms'
groupings and effects (``lFormula(...)$reTrms$cnms``).

One known difference is recorded too and checked as such: an interaction of two text
columns without its main effects (``a:b`` with an intercept), which R codes
rank-deficiently and formulaic (hence mpiblmm) with full rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.formula import formula_model, parse_formula, read_table

HERE = Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "r_colnames.json").read_text())
TABLE = read_table(HERE / "r_colnames_data.csv")
TABLES = {name: read_table(HERE / name)
          for name in {case["data"] for case in REFERENCE["cases"] if "data" in case}}


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[c["formula"] for c in REFERENCE["cases"]])
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
