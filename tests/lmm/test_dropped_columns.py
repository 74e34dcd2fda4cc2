"""Voxels whose observed rows leave X rank deficient are fitted as lme4 fits them.

Reference: lme4/lmerTest on the data of ``rank_deficient.csv``, made by
``make_rank_deficient.R`` beside this file: y ~ gB + gC + time + gB:time + gC:time +
(1 | subject) over 3 groups x 3 visits, six voxels (complete; no group C; group C at time 1
only; group B at time 0 only; group A alone; 6 observations of group A, no more than the 6
columns of X but more than the 2 they support), REML and ML, y ~ group + (1 | subject) for
lmerTest's type I anova, and y ~ group * time and y ~ group + time (group a factor) for its
type III anova.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.dropped_columns import estimable, kept_columns
from mpiblmm.lmm.model import STATUS_RANK_DEFICIENT
from mpiblmm.lmm.products import random_design

HERE = Path(__file__).parent
LLH_TOL = 1e-6
REL_TOL = 1e-5
COLUMNS = ["(Intercept)", "gB", "gC", "time", "gB:time", "gC:time"]
CONTRASTS = {"time": [[0, 0, 0, 1, 0, 0]], "gC": [[0, 0, 1, 0, 0, 0]],
             "C_at_1": [[0, 0, 1, 0, 0, 1]],
             "interaction": [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]}
# known truth: where each contrast is estimable (voxels y1..y6); "interaction" (the
# coefficients of group:time) is tested by those kept where they are estimable, as lmerTest's
# anova tests group:time (its reference: ANOVA)
ESTIMABLE = {"time": [1, 2, 3, 4, 5, 6], "gC": [1, 4], "C_at_1": [1, 3, 4],
             "interaction": [1, 2, 3, 4]}
ANOVA = {"interaction"}
T_FIELDS = ("estimate", "se", "df", "t", "p")
F_FIELDS = ("F", "df_num", "df_den", "p")


@pytest.fixture(scope="module")
def study():
    rows = list(csv.DictReader(open(HERE / "rank_deficient.csv")))
    time = np.array([float(r["time"]) for r in rows])
    group = np.array([r["group"] for r in rows])
    gB, gC = (group == "B").astype(float), (group == "C").astype(float)
    X = np.column_stack([np.ones(time.size), gB, gC, time, gB * time, gC * time])
    Y = np.array([[float(r[f"y{v}"]) if r[f"y{v}"] else np.nan for r in rows]
                  for v in range(1, 7)])
    codes = np.unique([r["subject"] for r in rows], return_inverse=True)[1]
    rd = random_design([codes], [np.ones((time.size, 1))], names=["subject"])
    ref = json.loads((HERE / "rank_deficient_lme4.json").read_text())
    return X, Y, rd, ref


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-8))


def _contrasts():
    return tuple(ContrastDef(name, np.array(L, float), "T" if len(L) == 1 else "F")
                 for name, L in CONTRASTS.items())


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_rank_deficient_voxels_match_lme4(study, method):
    """lme4's kept columns, estimates, covariances and logLik; each contrast only where it
    is estimable, then lmerTest's contest on the kept coefficients; the F of group:time's
    coefficients as lmerTest's anova tests the term: by those kept (1 numerator df where
    group C is unseen, seen at one time, or group B at one time)."""
    X, Y, rd, ref = study
    out = analyse_chunk(Model(X, rd, _contrasts()), Y, Settings(method=method))
    assert set(out["status"]) <= {0, 2}
    for v in range(6):
        r = ref[f"{method}_y{v + 1}"]
        kept = [COLUMNS.index(name) for name in r["kept"]]
        assert np.flatnonzero(np.isfinite(out["beta"][v])).tolist() == kept
        assert out["llh"][v] >= r["logLik"] - LLH_TOL
        assert abs(out["llh"][v] - r["logLik"]) < 1e-5
        assert _rel(out["beta"][v, kept], r["beta"]) < REL_TOL
        assert _rel(out["cov_beta"][v][np.ix_(kept, kept)], r["vcov"]) < REL_TOL
        assert np.isnan(np.delete(out["cov_beta"][v], kept, axis=0)).all()
        assert _rel(out["sigma2"][v], r["sigma2"]) < REL_TOL
        assert _rel(out["random/subject/cov"][v, 0, 0], np.ravel(r["theta"])[0] ** 2 * r["sigma2"]) \
            < 1e-4
        for name, where in ESTIMABLE.items():
            fields = T_FIELDS if len(CONTRASTS[name]) == 1 else F_FIELDS
            got = [out[f"contrasts/{name}/{f}"][v] for f in fields]
            if v + 1 not in where:
                assert np.isnan(got).all(), (name, v)
                continue
            want = [(ref[f"anova_{method}_y{v + 1}"] if name in ANOVA else r["contrasts"])
                    [name][f] for f in fields]
            assert _rel(got, want) < 1e-4, (name, v, got, want)


def test_type1_anova_tests_the_kept_columns_of_the_term(study):
    """lmerTest's anova of y ~ group: the term's kept columns (1 numerator df where group C
    is unseen); at a voxel that sees group A alone the term has no column left: no F."""
    X, Y, rd, ref = study
    rows = np.eye(3)[1:]
    model = Model(X[:, :3], rd, (ContrastDef("group", rows, "F", sequential=(1, 2)),))
    out = analyse_chunk(model, Y, Settings(method="REML"))
    for v in range(4):
        r = ref[f"group_y{v + 1}"]
        got = [out[f"contrasts/group/{f}"][v] for f in F_FIELDS]
        assert _rel(got, [r["type1"][f] for f in F_FIELDS]) < 1e-4, (v, got)
        assert _rel(out["beta"][v][np.isfinite(out["beta"][v])], r["beta"]) < REL_TOL
    assert out["status"][4] in (0, 2) and np.isfinite(out["beta"][4, 0])
    assert np.isnan([out[f"contrasts/group/{f}"][4] for f in F_FIELDS]).all()


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_a_terms_f_tests_its_kept_columns_as_lmertests_anova(study, method):
    """y ~ group + time: lmerTest's anova tests group by its kept columns, groupB alone where
    group C is unseen (1 numerator df), both elsewhere; no F where neither is kept."""
    X, Y, rd, ref = study
    model = Model(X[:, :4], rd, (ContrastDef("group", np.eye(4)[1:3], "F"),))
    out = analyse_chunk(model, Y, Settings(method=method))
    for v in range(4):
        want = ref[f"anova_{method}_y{v + 1}"]["additive"]
        got = [out[f"contrasts/group/{f}"][v] for f in F_FIELDS]
        assert _rel(got, [want[f] for f in F_FIELDS]) < 1e-4, (v, got, want)
    assert out["contrasts/group/df_num"][1] == 1
    assert np.isnan([out[f"contrasts/group/{f}"][4:] for f in F_FIELDS]).all()


def test_a_voxel_has_the_same_bits_alone_and_in_a_chunk(study):
    X, Y, rd, _ = study
    model = Model(X, rd, _contrasts())
    together = analyse_chunk(model, Y, Settings())
    for v in range(6):
        alone = analyse_chunk(model, Y[v:v + 1], Settings())
        for path, values in together.items():
            np.testing.assert_array_equal(alone[path][0], values[v], err_msg=path)


def test_kept_columns_follow_lme4s_pivoting_not_the_units():
    """A later column that repeats an earlier one (in other units) is dropped, whichever
    units; an exact zero column is dropped; independent columns are all kept."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=20), rng.normal(size=20)
    one = np.ones(20)
    X = np.column_stack([one, a * 1e4, b, 3e-3 * a + 2 * one, np.zeros(20)])
    keep = kept_columns(X, np.ones((1, 20)))[0]
    assert keep.tolist() == [True, True, True, False, False]
    XtX = (X.T @ X)[None]
    # a contrast of the dependent column is estimable only through what it repeats
    assert estimable(np.array([[0, 0, 0, 0, 1.0]]), XtX, keep).tolist() == [False]
    assert estimable(np.array([[1.0, 0, 0, 2, 0]]), XtX, keep).tolist() == [True]      # X row
    assert estimable(np.array([[0, 0, 1.0, 0, 0]]), XtX, keep).tolist() == [True]
    assert kept_columns(np.column_stack([one, a, b]), np.ones((1, 20))).all()
    # only the observed rows count: where a is seen only where it equals b, b is dropped
    observed = (np.arange(20) < 10).astype(float)[None]
    Xab = np.column_stack([one, a, np.where(np.arange(20) < 10, a, b)])
    assert kept_columns(Xab, observed)[0].tolist() == [True, True, False]


def test_an_exactly_dependent_column_after_correlated_ones_is_dropped():
    """An lme4 audit's voxel: group A alone observed, where dose = a + b time, and the
    intercept comes last.  The intercept is a combination of dose and time up to rounding;
    R's qr(X, tol = 1e-7) drops it, and so must we.  (A residual from X'X, 1 - c'C^-1 c,
    kept it at 43 of these 1,797 (a, b): the voxel was then refused, status 4.)"""
    time = np.tile(np.arange(3.0), 10)
    sex = (np.arange(30) % 4 < 2).astype(float)
    pairs = [(a, b) for a in np.round(np.arange(-3, 3, 0.01), 2) for b in (0.97, 0.7, 0.3)
             if a != 0]                      # (at a = 0 time repeats dose: time is dropped)
    for a, b in pairs:
        X = np.column_stack([sex, a + b * time, time, np.ones(30)])
        assert kept_columns(X, np.ones((1, 30)))[0].tolist() == [True, True, True, False], (a, b)


def test_kept_columns_by_batches_equal_one_voxel_at_a_time(monkeypatch):
    import mpiblmm.lmm.dropped_columns as dc
    rng = np.random.default_rng(8)
    X = np.column_stack([np.ones(40), rng.normal(size=40), (np.arange(40) % 2).astype(float),
                         (np.arange(40) % 3 == 0).astype(float)])
    observed = (rng.random((9, 40)) > 0.3).astype(float)
    observed[2, np.arange(40) % 2 == 1] = 0          # column 2 zero there
    observed[5, np.arange(40) % 3 != 0] = 0          # column 3 equals the intercept there
    whole = kept_columns(X, observed)
    monkeypatch.setattr(dc, "_BATCH_ENTRIES", 1)     # one voxel per batch
    assert np.array_equal(kept_columns(X, observed), whole)
    assert whole[2].tolist() == [True, True, False, True]
    assert whole[5].tolist() == [True, True, True, False]


def test_a_nearly_dependent_column_lme4_keeps_is_not_fitted(study):
    """A column 1e-6 (scaled) away from the span of the others: lme4's tolerance (1e-7)
    keeps it, the estimator's rank test (smallest scaled eigenvalue of X'X 1e-10 of the
    largest) refuses it: status 4 and no numbers, rather than a fit of an almost
    unidentifiable model."""
    X, Y, rd, _ = study
    rng = np.random.default_rng(0)
    near = X[:, 3] + 1e-6 * X[:, 3].std() * rng.normal(size=X.shape[0])
    Xn = np.column_stack([X[:, [0, 3]], near])
    out = analyse_chunk(Model(Xn, rd, ()), Y[:1], Settings())
    assert out["status"][0] == STATUS_RANK_DEFICIENT
    assert np.isnan(out["beta"][0]).all()
