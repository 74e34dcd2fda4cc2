"""The random factors' names against lme4 itself: ``names(VarCorr(fit))`` with the grouping,
effects (``cnms``) and number of levels (``nl``) of each term, recorded by
``tests/formula/make_r_factor_names.R`` (R 4.2.2, lme4 1.1-31) in ``r_factor_names.json``
over ``r_factor_names_data.csv``.

lme4 puts the terms by decreasing number of levels (reversing ties when it reorders) and
names them by their groupings in that order, through ``make.names(unique = TRUE)`` when a
grouping repeats; mpiblmm keeps the formula's order (docs/SPEC.md) with lme4's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.formula import formula_model, parse_formula
from mpiblmm.formula_table import read_table
from mpiblmm.formula_names import r_make_name, r_make_names_unique, r_make_unique

HERE = Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "r_factor_names.json").read_text())
TABLE = read_table(HERE / "r_factor_names_data.csv")


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[c["formula"] for c in REFERENCE["cases"]])
def test_factor_names_are_lme4s(case):
    model = formula_model(case["formula"], TABLE)
    ours = {name: (effects, len(set(labels))) for name, labels, _, effects in model.factors}
    assert len(ours) == len(model.factors), "factor names repeat"
    lme4 = {f["name"]: (tuple(f["effects"]), f["levels"]) for f in case["factors"]}
    assert ours == lme4          # each name holds the effects and levels lme4's does
    # the order stays the formula's: lme4's findbars order of the bars, as written
    bars = parse_formula(case["formula"]).bars
    groupings = {f["name"]: f["grouping"] for f in case["factors"]}
    assert [groupings[name] for name, *_ in model.factors] == [b.name for b in bars]


def test_same_name_same_z_columns():
    """The name lme4 gives the ``time`` slope holds ``time`` itself, by level."""
    model = formula_model("y ~ time + (1 | site) + (time || subject)", TABLE)
    factors = {name: (labels, Z) for name, labels, Z, _ in model.factors}
    labels, Z = factors["subject"]            # lme4: subject = time, subject.1 = (Intercept)
    np.testing.assert_array_equal(Z[:, 0], [float(t) for t in TABLE.cells["time"]])
    np.testing.assert_array_equal(factors["subject.1"][1][:, 0], 1.0)


def test_make_names_is_rs():
    ref = REFERENCE["make_names"]
    assert [r_make_name(n) for n in ref["names"]] == ref["make_names"]
    assert r_make_names_unique(ref["names"]) == ref["make_names_unique"]
    assert r_make_unique(ref["repeats"]) == ref["make_unique"]
