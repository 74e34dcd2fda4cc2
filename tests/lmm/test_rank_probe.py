"""The quasi-Newton's rank probe (``blocked.newton._probe_rank``) on four voxels of a cohort
audit whose subject intercept and slope end perfectly correlated, against lme4 (REML and ML;
best of three optimisers, ``make_rank_probe.R``).

Before the probe the Cholesky form crept along the curved valley towards the rank-one
``D_subject`` (``L22 -> 0`` while ``L21`` grows) by ~1e-8 of log-likelihood per iteration:
133-300 iterations, and the REML fit of the first voxel ended at the iteration cap
(status 1) at lme4's logLik."""

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
LLH_TOL = 1e-6


def _study():
    rows = list(csv.DictReader(open(HERE / "rank_probe.csv")))
    ys = sorted(k for k in rows[0] if k.startswith("y"))
    Y = np.array([[float(r[k]) if r[k] != "NA" else np.nan for k in ys] for r in rows])
    age = np.array([float(r["age"]) for r in rows])
    time = np.array([float(r["time"]) for r in rows])
    X = np.column_stack([np.ones(age.size), age, time])
    codes = [np.unique([r[k] for r in rows], return_inverse=True)[1]
             for k in ("subject", "scanner")]
    rd = random_design(codes, [np.column_stack([np.ones(age.size), time]),
                               np.ones((age.size, 1))], ["subject", "scanner"])
    return product_forms(X, rd, Y), ys, json.loads((HERE / "rank_probe_lme4.json").read_text())


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_rank_one_subject_covariance_is_reached_at_lme4s_optimum(method, monkeypatch):
    pf, ys, ref = _study()
    res = fit(pf, method)
    best = np.array([ref[f"{method}_{y}"]["logLik"] for y in ys])
    assert (res.status <= STATUS_SINGULAR).all() and (res.status != 1).all()
    assert (res.llh >= best - LLH_TOL).all(), res.llh - best
    n = np.array([ref[f"{method}_{y}"]["n"] for y in ys])
    np.testing.assert_array_equal(pf.n, n)
    # the rank-one D_subject: one eigenvalue of the subject covariance is ~0
    w = np.linalg.eigvalsh(res.cov[0])
    assert (w[:, 0] <= 1e-6 * w[:, -1]).all()
    assert res.iterations.max() <= 80
    # without the probe the same voxels creep (and the first REML one hits the cap)
    monkeypatch.setattr(newton, "RANK_PROBE_EVERY", 10**9)
    slow = fit(pf, method)
    assert slow.iterations.sum() > 2 * res.iterations.sum()
    assert (res.llh >= slow.llh - 1e-9).all()
