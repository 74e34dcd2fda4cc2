"""A random effect the fixed effects absorb on a voxel's observed rows (every level's column in
the span of X): REML's likelihood is flat along its variance, so the voxel is not fitted under
REML (status 9); ML fits it (the variance goes to 0, as lme4's).  A degenerate-voxel audit found
such voxels (9 rows of 3 subjects, subject-level columns in X) fitted with a subject variance of
7872 where lme4's equally arbitrary answer was 407."""

import numpy as np
import pytest

from mpiblmm.checks import fittable_problems
from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, absorbed_effects, analyse_chunk
from mpiblmm.lmm.fisher import evaluate
from mpiblmm.lmm.model import STATUS_UNIDENTIFIABLE
from mpiblmm.lmm.products import product_forms, random_design


def _study(seed=3, subjects=30, visits=3):
    """y ~ group + age + time + (1 + time | subject): group and age are subject-level."""
    rng = np.random.default_rng(seed)
    n = subjects * visits
    subject = np.repeat(np.arange(subjects), visits)
    group = rng.integers(0, 2, subjects)[subject].astype(float)
    age = rng.normal(40, 10, subjects)[subject]
    time = np.tile(np.arange(visits), subjects).astype(float)
    X = np.column_stack([np.ones(n), group, age, time])
    Z = np.column_stack([np.ones(n), time])
    rd = random_design([subject], [Z])
    model = Model(X, rd, (ContrastDef("group", np.array([[0.0, 1.0, 0.0, 0.0]])),))
    return model, subject, rng


def _dense_absorbed(X, rd, rows):
    """Per effect: rank([X Z_e]) == rank(X) on ``rows`` (Z_e: the effect's columns)."""
    Z = rd.sparse().toarray()[rows]
    out = []
    for e in range(2):
        Ze = Z[:, e::2]
        Ze = Ze[:, np.abs(Ze).sum(axis=0) > 0]
        rx = np.linalg.matrix_rank(X[rows])
        out.append(Ze.shape[1] > 0 and np.linalg.matrix_rank(np.hstack([X[rows], Ze])) == rx)
    return out


def test_absorbed_effects_agree_with_dense_rank():
    model, subject, rng = _study()
    n = subject.size
    observed = np.zeros((40, n), dtype=bool)
    for i in range(40):
        keep = rng.choice(30, size=rng.integers(2, 7), replace=False)   # 2-6 subjects
        rows = np.flatnonzero(np.isin(subject, keep))
        observed[i, rng.choice(rows, size=max(5, rows.size - rng.integers(0, 3)),
                               replace=False)] = True
    got = absorbed_effects(model.X, model.rd, observed)
    want = np.array([_dense_absorbed(model.X, model.rd, np.flatnonzero(o)) for o in observed])
    np.testing.assert_array_equal(got, want)
    assert want[:, 0].any() and not want[:, 0].all()          # both kinds are there
    assert not absorbed_effects(model.X, model.rd, np.ones((2, n), dtype=bool)).any()


def test_reml_does_not_fit_them_ml_does_and_reml_is_flat_there():
    model, subject, rng = _study()
    n = subject.size
    y = 10 + rng.normal(size=30)[subject] + rng.normal(size=n)
    Y = np.vstack([y, y, y])
    Y[0, ~np.isin(subject, [0, 1, 2])] = np.nan       # 3 subjects, 9 rows: intercepts absorbed
    Y[1, ~np.isin(subject, np.arange(12))] = np.nan   # 12 subjects: identified
    observed = np.isfinite(Y)
    assert absorbed_effects(model.X, model.rd, observed).any(axis=1).tolist() == \
        [True, False, False]
    # the claim, by the likelihood itself: REML's l is the same at any subject variance
    pf = product_forms(model.X, model.rd, Y[:1].T, observed[:1].T)
    llh = {}
    for method in ("REML", "ML"):
        llh[method] = [evaluate(pf, (np.diag([s, 0.3])[None],), method).llh[0]
                       for s in (0.0, 1.0, 30.0)]
    assert np.ptp(llh["REML"]) < 1e-9 * abs(llh["REML"][0])
    assert np.ptp(llh["ML"]) > 1e-3
    reml = analyse_chunk(model, Y, Settings(method="REML"))
    ml = analyse_chunk(model, Y, Settings(method="ML"))
    assert reml["status"][0] == STATUS_UNIDENTIFIABLE and np.isnan(reml["sigma2"][0])
    assert np.isnan(reml["contrasts/group/p"][0])
    assert (reml["status"][1:] <= 2).all() and np.isfinite(reml["contrasts/group/p"][1:]).all()
    assert (ml["status"] <= 2).all() and np.isfinite(ml["contrasts/group/p"]).all()


class _Factor:
    def __init__(self, name, codes, Z, effect_names):
        self.name, self.codes, self.Z, self.effect_names = name, codes, Z, effect_names
        self.n_levels, self.n_effects = int(codes.max()) + 1, Z.shape[1]


class _Design:
    def __init__(self, X, factors):
        self.X, self.factors, self.fixed_names = X, factors, ()


class _Spec:
    def __init__(self, method):
        self.path = "spec.json"
        self.estimation = type("E", (), {"method": method})()
        self.missingness = None


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_a_design_absorbing_a_random_effect_on_all_rows_is_refused_under_reml(method):
    # y ~ group + (1 | site): two sites, each of one group
    rng = np.random.default_rng(0)
    n = 40
    site = np.repeat(np.arange(2), 20)
    X = np.column_stack([np.ones(n), site.astype(float), rng.normal(size=n)])
    design = _Design(X, [_Factor("site", site, np.ones((n, 1)), ("(Intercept)",))])
    problems = fittable_problems(design, _Spec(method))
    if method == "ML":
        assert problems == []
        return
    assert len(problems) == 1
    assert str(problems[0]) == (
        "spec.json: random[0] ('site'): random effect '(Intercept)' of factor 'site': on every "
        "level its column lies in the span of the fixed effects (X), which absorb it, so "
        "REML's likelihood does not depend on its variance (not identifiable); drop the fixed "
        "columns constant within its levels or the random term, or fit by ML")
    # four sites, two of each group: not absorbed
    site = np.repeat(np.arange(4), 10)
    X[:, 1] = (site % 2).astype(float)
    design = _Design(X, [_Factor("site", site, np.ones((n, 1)), ("(Intercept)",))])
    assert fittable_problems(design, _Spec(method)) == []


def test_the_answer_is_a_voxels_own_at_an_ill_conditioned_x():
    """A regression audit: from the normal equations the rounding was ~1e-8 at an
    ill-conditioned X (an uncentred site-level scan year, 2019/2020/2021) and changed with
    the voxels computed beside it, so a voxel's status changed with the rank count.  Now the
    same answer alone, in any batch, and the dense rank's answer."""
    rng = np.random.default_rng(5)
    subjects, visits = 12, 3
    n = subjects * visits
    subject = np.repeat(np.arange(subjects), visits)
    site = subject % 3
    year = (2019.0 + site) + 0.0
    time = np.tile(np.arange(visits), subjects).astype(float)
    X = np.column_stack([np.ones(n), time, year, rng.normal(size=n)])
    rd = random_design([subject, site], [np.column_stack([np.ones(n), time]), np.ones((n, 1))])
    observed = np.zeros((120, n), dtype=bool)
    for i in range(120):
        keep = rng.choice(subjects, size=rng.integers(2, 6), replace=False)
        rows = np.flatnonzero(np.isin(subject, keep))
        observed[i, rows[rng.random(rows.size) < 0.85]] = True
        observed[i, rows[:1]] = True
    observed = observed[observed.sum(axis=1) >= 6]
    together = absorbed_effects(X, rd, observed)
    alone = np.vstack([absorbed_effects(X, rd, observed[i:i + 1]) for i in range(len(observed))])
    sevens = np.vstack([absorbed_effects(X, rd, observed[i:i + 7])
                        for i in range(0, len(observed), 7)])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, sevens)
    Z = rd.sparse().toarray()
    for o, got in zip(observed, together):
        r = np.flatnonzero(o)
        rank_x = np.linalg.matrix_rank(X[r] / np.linalg.norm(X, axis=0), tol=1e-8)
        if rank_x < X.shape[1]:
            continue                                  # status 4 there: fitted on fewer columns
        for e, cols in enumerate((slice(0, 24, 2), slice(1, 24, 2), slice(24, 27))):
            Ze = Z[r][:, cols]
            Ze = Ze[:, np.abs(Ze).sum(axis=0) > 0]
            if Ze.shape[1] > X.shape[1]:
                assert not got[e]
                continue
            want = np.linalg.matrix_rank(np.hstack([X[r] / np.linalg.norm(X, axis=0), Ze]),
                                         tol=1e-6) == rank_x
            assert got[e] == want, (r, e)
    assert together[:, 2].any() and together[:, 0].any() and not together.all()
