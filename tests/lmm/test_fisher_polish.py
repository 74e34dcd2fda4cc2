"""Fisher Scoring and the theta polish reach the optimum (brute force), boundary included."""

import numpy as np
import pytest

from mpiblmm.lmm.fisher import (evaluate, fisher_scoring, near_boundary, psd_project,
                                solve_small_spd)
from mpiblmm.lmm.polish import canonical_theta, polish
from mpiblmm.lmm.products import product_forms
from mpiblmm.lmm.scoring import NEAR_BOUNDARY
from mpiblmm.lmm.structures.one_factor import FS_HALVINGS_BEFORE_POLISH, HANDOVER
from mpiblmm.lmm.theta import D_from_theta, theta_from_D

from .fitting_cases import brute_optimum, simulate


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_fisher_scoring_single_intercept_is_optimal(method):
    # q = 1: the clip at 0 is an exact projection, so FS alone reaches the optimum
    X, rd, Y, pf = simulate(1, q=1, v=10)
    fs = fisher_scoring(pf, method)
    assert fs.converged.all()
    np.testing.assert_array_less(brute_optimum(pf, method) - 1e-7, fs.ev.llh)


def test_fisher_scoring_never_falls_below_start():
    X, rd, Y, pf = simulate(2, q=2, v=12, missing=0.1)
    start = evaluate(pf, tuple(np.zeros((pf.n_voxels, 2, 2)) for _ in range(1)), "REML")
    fs = fisher_scoring(pf, "REML")
    assert (fs.ev.llh >= start.llh).all()


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("kw", [dict(q=2), dict(q=2, missing=0.1), dict(q=1, crossed=True),
                                dict(q=3, v=6)])
def test_polish_reaches_brute_force_optimum(method, kw):
    X, rd, Y, pf = simulate(3, **kw)
    fs = fisher_scoring(pf, method)
    pol = polish(pf, theta_from_D(fs.D, pf.structure), method)
    assert pol.converged.all()
    assert (pol.ev.llh >= fs.ev.llh - 1e-12).all()
    ref = brute_optimum(pf, method, starts=[pol.theta])
    np.testing.assert_array_less(ref - 1e-7, pol.ev.llh)


def test_polish_escapes_zero_covariance():
    # start every voxel at D = 0: theta's gradient vanishes there, the escape must leave it
    X, rd, Y, pf = simulate(4, q=2, v=8)
    theta0 = np.zeros((pf.n_voxels, 3))
    pol = polish(pf, theta0, "REML")
    ref = brute_optimum(pf, "REML")
    np.testing.assert_array_less(ref - 1e-7, pol.ev.llh)


def test_canonical_theta_keeps_D():
    rng = np.random.default_rng(0)
    X, rd, Y, pf = simulate(5, q=2, v=4)
    th = rng.normal(size=(4, 3))
    can = canonical_theta(th, pf.structure)
    assert (can[:, [0, 2]] >= 0).all()
    np.testing.assert_allclose(D_from_theta(can, pf.structure)[0],
                               D_from_theta(th, pf.structure)[0], atol=1e-14)


def test_small_algebra_is_isolated():
    A = np.stack([np.eye(2) * 2, np.full((2, 2), np.nan), np.zeros((2, 2))])
    b = np.ones((3, 2))
    x = solve_small_spd(A, b)
    np.testing.assert_allclose(x[0], 0.5)
    assert np.isnan(x[1]).all() and (x[2] == 0).all()
    D = np.stack([np.diag([1.0, -1.0]), np.full((2, 2), np.nan)])
    Dp, lam = psd_project(D)
    np.testing.assert_allclose(Dp[0], np.diag([1.0, 0.0]), atol=1e-14)
    assert np.isnan(Dp[1]).all()


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("layout", ["one factor", "dense"])
@pytest.mark.parametrize("max_iterations", [300, 5])
def test_side_by_side_fit_is_fisher_scoring_then_polish(method, layout, max_iterations):
    # A chunk runs the polish of the voxels Fisher Scoring has finished alongside Fisher
    # Scoring of the rest, sharing evaluation calls (scoring._drive): every voxel must get
    # exactly what Fisher Scoring followed by the polish gives it, to the bit.
    # one factor: subjects' intercept + slope; dense: crossed with sites (layout="dense")
    X, rd, Y, pf = simulate(7, q=2, v=24, missing=0.05, crossed=layout == "dense")
    if layout == "one factor":
        pf = product_forms(X, rd, Y)
    assert pf.algebra.name == layout
    halvings = {} if layout == "dense" else dict(max_halvings=FS_HALVINGS_BEFORE_POLISH,
                                                 handover=HANDOVER)
    fs = fisher_scoring(pf, method, max_iterations=max_iterations, **halvings)
    sel = near_boundary(fs.D, NEAR_BOUNDARY) | fs.stalled | ~fs.converged
    sel = np.flatnonzero(sel & np.isfinite(fs.ev.llh) & (fs.iterations < max_iterations))
    assert sel.size >= 4                                      # the polish has work to do
    pol = polish(pf.take(sel), theta_from_D(fs.D, pf.structure)[sel], method,
                 max_iterations=max_iterations - fs.iterations[sel], ev0=fs.ev.take(sel))
    llh, theta = fs.ev.llh.copy(), theta_from_D(fs.D, pf.structure)
    llh[sel], theta[sel] = pol.ev.llh, pol.theta
    pol_it = np.zeros(pf.n_voxels, dtype=np.int64)
    pol_it[sel] = pol.iterations
    out = pf.algebra.fit_chunk(pf, method, 1e-12, max_iterations, "auto")
    np.testing.assert_array_equal(out["llh"], llh)
    np.testing.assert_array_equal(out["theta"], theta)
    np.testing.assert_array_equal(out["fs_iterations"], fs.iterations)
    np.testing.assert_array_equal(out["polish_iterations"], pol_it)
