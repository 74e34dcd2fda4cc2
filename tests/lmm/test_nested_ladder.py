"""The ladder of starts for boundary ends (``blocked.newton._ladder_boundary_ends``) on a
nested-design audit voxel whose profiled log-likelihood has two maxima along the subject theta
(site variance on zero): 1.07 near lme4's start and 14 far from it.  Before the ladder the fit
stopped at the near one, 17.4 (ML) and 20.7 (REML) below lme4, whose every optimiser reaches
the far one (``make_nested_ladder.R``)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.lmm.blocked import newton
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.model import STATUS_SINGULAR
from mpiblmm.lmm.products import product_forms, random_design

HERE = Path(__file__).parent


def _voxel():
    rows = list(csv.DictReader(open(HERE / "nested_ladder.csv")))
    y = np.array([float(r["y"]) for r in rows])
    X = np.column_stack([np.ones(y.size), [float(r["age"]) for r in rows],
                         [r["sex"] == "M" for r in rows]]).astype(float)
    site = np.unique([r["site"] for r in rows], return_inverse=True)[1]
    subject = np.unique([r["site"] + "/" + r["subject"] for r in rows], return_inverse=True)[1]
    ones = np.ones((y.size, 1))
    rd = random_design([subject, site], [ones, ones], ["subject:site", "site"])
    return product_forms(X, rd, y[:, None]), json.loads((HERE / "nested_ladder_lme4.json")
                                                        .read_text())


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_the_far_maximum_that_lme4_reaches_is_found(method, monkeypatch):
    pf, ref = _voxel()
    ref = ref[method]
    res = fit(pf, method)
    assert res.status[0] <= STATUS_SINGULAR
    assert res.llh[0] >= ref["logLik"] - 1e-6
    np.testing.assert_allclose(res.cov[0][0, 0, 0], ref["var_subject_site"], rtol=1e-4)
    np.testing.assert_allclose(res.s2[0], ref["sigma2"], rtol=1e-4)
    np.testing.assert_allclose(res.beta[0], ref["beta"], rtol=1e-5)
    monkeypatch.setattr(newton, "LADDER", ())          # without it: the near maximum
    assert fit(pf, method).llh[0] < ref["logLik"] - 17
