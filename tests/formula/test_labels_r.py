"""Grouping levels and the coding of columns R's ``read.csv`` reads as numbers or logicals,
against R itself: ``lme4::lFormula`` over ``r_labels_data.csv``, recorded by
``tests/formula/make_r_labels.R`` (R 4.2.2, lme4 1.1-31) in ``r_labels.json``.

R reads ``01``, ``1`` and ``1.0`` as the number 1, so as a grouping factor they are one
level, ``1`` (and ``2.50`` is ``2.5``); a column of ``T``/``F`` (or ``TRUE``/``FALSE``) is
logical, coded ``lgTRUE`` and grouped by levels ``FALSE``/``TRUE``; ``true``/``false`` are
text to R 4.2.2 (``lg2true``).  The cases with ``"data": "r_labels_csv2_data.csv"``
read a European CSV (``;`` between cells, decimal commas) as R's ``read.csv2`` does.  Each random term's grouping, effects, level of every row
and Z (the columns of ``t(Ztlist)``: level by level, the effects within) must be R's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.formula import formula_model, parse_formula
from mpiblmm.formula_table import read_table

HERE = Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "r_labels.json").read_text())
TABLES = {name: read_table(HERE / name)
          for name in ["r_labels_data.csv", "r_labels_csv2_data.csv"]}
CASES = REFERENCE["cases"]


def _our_terms(formula: str, data: str = "r_labels_data.csv"):
    """Per random term: (grouping as lme4 writes it, effects, row levels, Z in lme4's
    column order with R's level order: the levels sorted as R sorts them)."""
    model = formula_model(formula, TABLES[data])
    out = []
    for bar, (name, labels, Z, effects) in zip(parse_formula(formula).bars, model.factors):
        out.append((bar.name, list(effects), list(labels), Z))
    return model, out


@pytest.mark.parametrize("case", CASES, ids=[c["formula"] for c in CASES])
def test_x_and_random_terms_equal_r(case):
    model, terms = _our_terms(case["formula"], case.get("data", "r_labels_data.csv"))
    assert list(model.names) == case["names"]
    np.testing.assert_allclose(model.X, np.asarray(case["X"], dtype=float).T,
                               rtol=1e-13, atol=1e-14)
    theirs = sorted(case["random"], key=lambda t: (t["grouping"], t["effects"]))
    ours = sorted(terms, key=lambda t: (t[0], t[1]))
    assert [(t[0], t[1]) for t in ours] == [(t["grouping"], t["effects"]) for t in theirs]
    for (grouping, effects, rows, Z), r in zip(ours, theirs):
        assert rows == r["rows"], grouping
        q = len(effects)
        R = np.asarray(r["Z"], dtype=float).T
        levels = r["columns"][::q]
        assert sorted(levels) == sorted(set(rows))
        ours_Z = np.column_stack([np.where(np.asarray(rows) == level, Z[:, e], 0.0)
                                  for level in levels for e in range(q)])
        np.testing.assert_allclose(ours_Z, R, rtol=1e-13, atol=1e-14)
