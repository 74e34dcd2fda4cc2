"""Barely identified factors in the one-factor path: a local maximum at zero variance, and
REML's profiled information that is not positive definite (mpiblmm.lmm.probe, the escape's
step length in mpiblmm.lmm.polish, the scoring step in mpiblmm.lmm.fisher), and Fisher
Scoring that creeps where a factor is weakly replicated (mpiblmm.lmm.scoring.FS_ITERATIONS).

The reference dataset ``few_repeats`` (tests/reference, lme4 values beside it, made by
scripts/make_reference.R) keeps voxels of a 10-subject study seen on 11-16 of 40 rows where
Fisher Scoring from ``D = 0`` and the polish stopped 0.002-11 below lme4's logLik (a BLMM
audit found the first such voxel).  These tests show what brings each to lme4's optimum.
"""

import numpy as np
import pytest

from mpiblmm.lmm import probe, scoring
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.fisher import evaluate, positive_definite
from mpiblmm.lmm.polish import derivatives, escape_directions
from mpiblmm.lmm.products import product_forms, random_design
from tests.refdata import load_dataset

LLH_TOL = 1e-6


@pytest.fixture(scope="module")
def few_repeats():
    ds = load_dataset("few_repeats")
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors],
                       [f.name for f in ds.factors])
    return ds, product_forms(ds.X, rd, ds.Y)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_boundary_ends_reach_lme4_only_with_the_probes(method, few_repeats, monkeypatch):
    ds, pf = few_repeats
    ref = ds.reference[method]
    with monkeypatch.context() as m:
        m.setattr(scoring, "restart_boundary_ends", lambda pf, method, tol, cap, out: out)
        first = fit(pf, method)
    short = np.flatnonzero(first.llh - ref.llh < -1e-3)
    assert short.size >= 3, "the dataset no longer reproduces a local maximum at zero"
    assert (first.status[short] == 2).all()              # all ended on the boundary
    both = fit(pf, method)
    assert (both.llh - ref.llh).min() >= -LLH_TOL
    assert (both.status[short] == 0).all()
    # the variance lme4 finds there, and iterations that count both runs
    np.testing.assert_allclose(both.cov[0][short, 0, 0], ref.cov["subject"][short, 0, 0],
                               rtol=1e-3)
    assert (both.iterations[short] > first.iterations[short]).all()
    # every other voxel keeps its bits
    rest = np.setdiff1d(np.flatnonzero(first.status != 2), short)
    np.testing.assert_array_equal(both.llh[rest], first.llh[rest])


def test_probed_voxel_has_the_same_bits_alone(few_repeats):
    _, pf = few_repeats
    whole = fit(pf, "ML")
    for j in (4, 27, 10):
        alone = fit(pf.take(np.array([j])), "ML")
        assert alone.llh[0] == whole.llh[j] and alone.iterations[0] == whole.iterations[j]
        np.testing.assert_array_equal(alone.D[0][0], whole.D[0][j])


def test_escape_where_the_profiled_information_is_not_positive_definite(few_repeats):
    """At ``D = 0`` REML's profiled information ``I_DD - t^2 / (2 (n - p))`` (traces of
    V^-1) is <= 0 at some voxels; the escape then takes its step length from ``I_DD``."""
    _, pf = few_repeats
    lam = (np.zeros((pf.n_voxels, 1, 1)),)
    ev = evaluate(pf, lam, "REML")
    der = derivatives(ev, pf, lam, "REML")
    profiled, plain = der.info_kk[0][:, 0, 0], der.plain_kk[0][:, 0, 0]
    degenerate = (profiled <= 0) & (der.G[0][:, 0, 0] > 0)
    assert degenerate.any()
    assert (plain[degenerate] > 0).all()
    moves, has = escape_directions(lam, der)
    assert has[degenerate].all()
    np.testing.assert_allclose(moves[0][degenerate, 0, 0],
                               der.G[0][degenerate, 0, 0] / plain[degenerate], rtol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_positive_definite_agrees_with_the_eigenvalues(m):
    rng = np.random.default_rng(m)
    A = rng.normal(size=(400, m, m))
    A = A @ np.swapaxes(A, 1, 2) - rng.uniform(0, 2, size=(400, 1, 1)) * np.eye(m)
    A[:5] = 0.0                                          # singular: not positive definite
    A[5, 0, 0] = np.nan
    w = np.linalg.eigvalsh(np.nan_to_num(A))[:, 0]
    expect = (w > 1e-9) & np.isfinite(A).all(axis=(1, 2))
    sure = np.abs(w) > 1e-9                              # away from rounding
    np.testing.assert_array_equal(positive_definite(A)[sure], expect[sure])
    assert expect.any() and (~expect).any()


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_replication_is_the_profiled_share_of_the_information_at_zero(method, few_repeats):
    """:func:`replication` from the level sums equals ``I_p / I_DD`` at ``D = 0`` from the
    score information (one random intercept: ``1 - n^2 / (dof sum_j n_j^2)``), and the
    voxels a probe helped are all below :data:`WEAK_BELOW`."""
    ds, pf = few_repeats
    lam = (np.zeros((pf.n_voxels, 1, 1)),)
    der = derivatives(evaluate(pf, lam, method), pf, lam, method)
    expect = der.info_kk[0][:, 0, 0] / der.plain_kk[0][:, 0, 0]
    np.testing.assert_allclose(probe.replication(pf, method), expect, rtol=1e-12)
    counts = np.stack([np.bincount(ds.factors[0].codes[np.isfinite(ds.Y[:, j])],
                                   minlength=10) for j in range(pf.n_voxels)])
    n = counts.sum(axis=1)
    dof = n - 3 if method == "REML" else n
    np.testing.assert_allclose(probe.replication(pf, method),
                               1 - n**2 / (dof * (counts**2).sum(axis=1)), rtol=1e-12)


def test_well_replicated_boundary_ends_are_not_probed(monkeypatch):
    """Four complete visits per subject (replication 1 - l/dof = 0.75): a boundary end is
    left as it is, without an evaluation."""
    rng = np.random.default_rng(5)
    l, visits = 30, 4
    codes = np.repeat(np.arange(l), visits)
    X = np.column_stack([np.ones(l * visits), np.tile(np.arange(visits), l)])
    Y = rng.normal(size=(l * visits, 40))                    # no subject variance at all
    pf = product_forms(X, random_design([codes], [np.ones((l * visits, 1))]), Y)
    np.testing.assert_allclose(probe.replication(pf, "REML"), 1 - l / (l * visits - 2))
    calls = []
    monkeypatch.setattr(probe, "evaluate", lambda *a, **k: calls.append(1))
    res = fit(pf, "REML")
    assert (res.status == 2).sum() >= 10 and not calls


def _slow_voxel():
    import csv
    import json
    from pathlib import Path

    here = Path(__file__).parent
    rows = list(csv.DictReader(open(here / "slow_scoring.csv")))
    y = np.array([float(r["y"]) for r in rows])
    X = np.column_stack([np.ones(y.size), [float(r["age"]) for r in rows],
                         [float(r["time"]) for r in rows]])
    labels = [r["subject"] for r in rows]
    codes = np.unique(labels, return_inverse=True)[1]
    pf = product_forms(X, random_design([codes], [np.ones((y.size, 1))]), y[:, None])
    return pf, json.loads((here / "slow_scoring_lme4.json").read_text())


def test_weakly_replicated_interior_voxel_is_finished_by_the_polish(monkeypatch):
    """An lme4 audit's voxel (91 observations of ~80 subjects, y ~ age + time + (1 |
    subject), REML; lme4 values from make_slow_scoring.R): Fisher Scoring crept at lme4's
    logLik to 2e-10 for all 300 iterations and the voxel ended "not converged" (status 1).
    After scoring.FS_ITERATIONS the polish takes over and converges."""
    pf, ref = _slow_voxel()
    res = fit(pf, "REML")
    assert res.status[0] == 0
    assert res.extras["fs_iterations"][0] == scoring.FS_ITERATIONS
    assert 0 < res.extras["polish_iterations"][0] < 10
    assert res.llh[0] >= ref["logLik"] - LLH_TOL
    np.testing.assert_allclose(res.extras["theta"][0, 0], ref["theta"], rtol=1e-4)
    np.testing.assert_allclose(res.s2[0], ref["sigma2"], rtol=1e-5)
    np.testing.assert_allclose(res.beta[0], ref["beta"], rtol=1e-7)
    monkeypatch.setattr(scoring, "FS_ITERATIONS", 10**6)           # Fisher Scoring alone
    assert fit(pf, "REML").status[0] == 1
