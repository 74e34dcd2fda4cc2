"""A voxel whose observed rows the fixed and random effects fit exactly (rank [X Z] = n_obs,
while every factor passes lme4's levels x effects rule): its residual variance is not
identifiable, so it is not fitted (status 9, NaN), as lme4's degenerate fits show."""

import numpy as np
import pytest

from mpiblmm.lmm.analysis import (ContrastDef, Model, Settings, analyse_chunk, identifiable,
                                  saturated)
from mpiblmm.lmm.model import STATUS_UNIDENTIFIABLE
from mpiblmm.lmm.products import random_design


def _crossed():
    """24 rows: 3 crossed random intercepts (a: 4, b: 4, c: 3 levels), intercept + x fixed."""
    rng = np.random.default_rng(7)
    n = 24
    a, b, c = np.arange(n) % 4, (np.arange(n) // 4) % 4, (np.arange(n) // 2) % 3
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    rd = random_design([a, b, c], [np.ones(n)] * 3)
    model = Model(X, rd, (ContrastDef("x", np.array([[0.0, 1.0]])),))
    Zd = rd.sparse().toarray()
    return model, np.hstack([X, Zd]), rng


def _rank(XZ, rows):
    return np.linalg.matrix_rank(XZ[rows])


def _saturating_rows(XZ, model):
    """Observed rows, chosen greedily, that keep [X Z] of full row rank (and pass lme4's
    rule per factor), as many as the rank allows: a saturated voxel."""
    rows = []
    for i in range(XZ.shape[0]):
        if _rank(XZ, rows + [i]) == len(rows) + 1:
            rows.append(i)
    return np.array(rows)


def test_saturated_voxel_is_not_fitted_and_one_more_row_is():
    model, XZ, rng = _crossed()
    n = XZ.shape[0]
    rows = _saturating_rows(XZ, model)
    m = rows.size
    # the claim, by dense algebra: [X Z] on these rows has full row rank (fits them exactly)
    assert _rank(XZ, rows) == m
    extra = np.setdiff1d(np.arange(n), rows)[0]
    more = np.append(rows, extra)
    assert _rank(XZ, more) == m                 # one row more: rank stays, residual df 1
    y = rng.normal(size=(3, n)) * 3 + 10
    y += XZ @ rng.normal(size=XZ.shape[1])
    Y = np.full((3, n), np.nan)
    Y[0, rows] = y[0, rows]                     # saturated
    Y[1, more] = y[1, more]                     # one more observation
    Y[2] = y[2]                                 # complete
    obs = np.isfinite(Y)
    assert identifiable(model.rd, obs).all()    # lme4's per-factor rule does not see it
    sat, late = saturated(model.X, model.rd, obs)
    assert sat.tolist() == [True, False, False] and not late.any()
    out = analyse_chunk(model, Y, Settings())
    assert out["status"][0] == STATUS_UNIDENTIFIABLE and out["n"][0] == m
    for key, a in out.items():
        if a.dtype.kind == "f":
            assert np.isnan(a[0]).all(), key
    assert out["status"][1] <= 2 and out["status"][2] <= 2
    assert np.isfinite(out["sigma2"][1:]).all() and np.isfinite(out["contrasts/x/t"][1:]).all()


def test_saturation_is_decided_per_voxel_against_dense_rank():
    """Random missingness patterns: the screen plus the row-Gram test agree with numpy's
    rank of [X Z] on the observed rows, voxel by voxel."""
    model, XZ, rng = _crossed()
    n = XZ.shape[0]
    obs = np.zeros((300, n), dtype=bool)
    for i in range(300):
        obs[i, rng.choice(n, size=rng.integers(3, 14), replace=False)] = True
    sat, late = saturated(model.X, model.rd, obs)
    want = np.array([_rank(XZ, np.flatnonzero(o)) == o.sum() for o in obs])
    assert want.any() and (~want).any() and not late.any()
    np.testing.assert_array_equal(sat, want)


def test_units_do_not_decide():
    """A fixed covariate in huge units saturates the same rows."""
    model, XZ, rng = _crossed()
    rows = _saturating_rows(XZ, model)
    obs = np.zeros((2, XZ.shape[0]), dtype=bool)
    obs[0, rows] = True
    obs[1, np.append(rows, np.setdiff1d(np.arange(XZ.shape[0]), rows)[0])] = True
    big = Model(model.X * np.array([1.0, 1e6]), model.rd, model.contrasts)
    assert saturated(big.X, big.rd, obs)[0].tolist() == [True, False]


def test_a_design_saturated_on_all_rows_is_refused():
    """checks: rank [X Z] = n on every row is a design error (one line naming the formula)."""
    from types import SimpleNamespace
    from mpiblmm.checks import fittable_problems
    from mpiblmm.errors import SpecError
    n = 10
    for seed in range(200):
        rng = np.random.default_rng(seed)
        codes = [rng.permutation(np.arange(n) % l) for l in (5, 5, 4)]
        X = np.ones((n, 1))
        XZ = np.hstack([X] + [np.eye(c.max() + 1)[c] for c in codes])
        if np.linalg.matrix_rank(XZ) == n:
            break
    else:
        pytest.fail("no saturated design found")

    def design(rows):
        fs = [SimpleNamespace(name=f"f{k}", codes=c[rows], Z=np.ones((rows.size, 1)),
                              n_levels=int(c[rows].max()) + 1, n_effects=1,
                              effect_names=("(Intercept)",)) for k, c in enumerate(codes)]
        return SimpleNamespace(X=X[rows], factors=fs, fixed_names=("(Intercept)",))

    spec = SimpleNamespace(path="spec.json", formula="y ~ 1 + (1|f0) + (1|f1) + (1|f2)")
    problems = fittable_problems(design(np.arange(n)), spec)
    assert len(problems) == 1 and isinstance(problems[0], SpecError)
    assert "residual variance is not identifiable" in str(problems[0])
    assert "(1|f2)" in str(problems[0])
    # the same factors on twice the rows: not saturated, no refusal
    assert fittable_problems(design(np.tile(np.arange(n), 2)), spec) == []


def test_post_fit_test_beyond_the_exact_reach(monkeypatch):
    """Candidates too large for the exact test are fitted, then unfitted only when sigma2
    vanishes against the data's variance (a vanishing residual is forced here)."""
    import mpiblmm.lmm.analysis as analysis
    model, XZ, rng = _crossed()
    rows = _saturating_rows(XZ, model)
    n = XZ.shape[0]
    y = XZ @ rng.normal(size=XZ.shape[1])
    Y = np.full((2, n), np.nan)
    Y[0, rows] = y[rows]
    Y[1] = y + rng.normal(size=n)
    monkeypatch.setattr(analysis, "SATURATED_EXACT_UP_TO", 0)
    sat, late = saturated(model.X, model.rd, np.isfinite(Y))
    assert not sat.any() and late[0]
    out = {"sigma2": np.array([1e-14, 1.0]), "beta": np.ones((2, 2)),
           "status": np.zeros(2, np.uint8), "iterations": np.full(2, 5)}
    analysis._unfit_vanishing_residual(Y, np.array([0, 1]), out)
    assert out["status"].tolist() == [STATUS_UNIDENTIFIABLE, 0]
    assert np.isnan(out["beta"][0]).all() and out["iterations"][0] == 0
    assert np.isfinite(out["beta"][1]).all()
    res = analyse_chunk(model, Y, Settings())          # runs end to end on that path
    assert res["status"][1] <= 2


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_data_fitted_exactly_by_a_regular_design_are_not_fitted(method):
    """A degenerate-voxel audit: the design is regular (50 subjects x 4 visits), but the data
    are constant within each subject (y = X b + Z u exactly), so sigma2 runs to rounding and
    every standard error with it: status 0 with F p = 3.5e-62 where lmerTest gives 0.008.
    Now status 9 and no numbers; the same voxel with noise is fitted as before."""
    rng = np.random.default_rng(11)
    subjects, visits = 50, 4
    n = subjects * visits
    subject = np.repeat(np.arange(subjects), visits)
    group = rng.integers(0, 2, subjects)[subject].astype(float)
    time = np.tile(np.arange(visits), subjects).astype(float)
    X = np.column_stack([np.ones(n), group, time])
    model = Model(X, random_design([subject], [np.ones(n)]),
                  (ContrastDef("group", np.array([[0.0, 1.0, 0.0]])),))
    level = 100.0 + 3.0 * rng.normal(size=subjects)
    exact = level[subject]                                     # constant within subject
    trend = 50.0 + 2.0 * group + rng.normal(size=subjects)[subject] + 0.5 * time
    Y = np.vstack([exact, trend, exact + rng.normal(size=n), trend + rng.normal(size=n)])
    Y[1, :7] = np.nan                                          # per-voxel forms too
    out = analyse_chunk(model, Y, Settings(method=method))
    assert out["status"][:2].tolist() == [STATUS_UNIDENTIFIABLE] * 2
    assert out["iterations"][:2].tolist() == [0, 0]
    for key, a in out.items():
        if a.dtype.kind == "f":
            assert np.isnan(a[:2]).all(), key
    assert (out["status"][2:] <= 2).all() and np.isfinite(out["contrasts/group/p"][2:]).all()
    assert (out["sigma2"][2:] > 0.1).all()
