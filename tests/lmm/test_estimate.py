"""The driver: statuses, isolation of failing voxels, batched = per-voxel, chunking."""

import dataclasses

import numpy as np
import pytest

from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.likelihood import profiled_loglik
from mpiblmm.lmm.model import (
    STATUS_EMPTY, STATUS_NUMERICAL, STATUS_RANK_DEFICIENT, STATUS_TOO_FEW,
)
from mpiblmm.lmm.products import product_forms
from mpiblmm.lmm.theta import lambdas_from_theta

from .fitting_cases import simulate


def _same(a, b, rtol=1e-7, atol=1e-9):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("kw", [dict(q=2, missing=0.1), dict(q=1, crossed=True, missing=0.1)])
def test_batched_equals_per_voxel_and_chunking(kw):
    X, rd, Y, pf = simulate(7, v=10, **kw)
    whole = fit(pf)
    chunked = fit(pf, memory_budget=1)              # one voxel per chunk
    for vox in range(pf.n_voxels):
        alone = fit(product_forms(X, rd, Y[:, [vox]]))
        _same(whole.llh[vox], alone.llh[0], rtol=1e-12, atol=1e-9)
        _same(whole.beta[vox], alone.beta[0], rtol=1e-6, atol=1e-7)
        _same(whole.s2[vox], alone.s2[0], rtol=1e-6)
    _same(whole.llh, chunked.llh, rtol=1e-12, atol=1e-9)
    _same(whole.beta, chunked.beta)
    np.testing.assert_array_equal(whole.status, chunked.status)


def test_outputs_are_consistent():
    X, rd, Y, pf = simulate(8, q=2, v=8)
    for method in ("REML", "ML"):
        res = fit(pf, method)
        assert res.method == method and (res.status <= 2).all()
        llh, beta_c, s2, vp = profiled_loglik(pf, lambdas_from_theta(res.extras["theta"],
                                                                     pf.structure), method)
        _same(res.llh, llh, rtol=1e-12)
        _same(res.beta, beta_c + pf.y_offset)
        _same(res.s2, s2)
        _same(res.extras["XtViX"], vp.XtViX)
        _same(res.cov[0], res.s2[:, None, None] * res.D[0])
        assert res.extras["XtViX"].shape == (8, 3, 3)
        assert (res.iterations == res.extras["fs_iterations"] + res.extras["polish_iterations"]).all()


def test_statuses_and_isolation():
    X, rd, Y, pf = simulate(9, q=2, v=8)
    Y = Y.copy()
    Y[:, 1] = np.nan                                  # no observations
    Y[3:, 2] = np.nan                                 # n = 3 <= p = 3
    t = X[:, 2]
    Y[t != 0, 3] = np.nan                             # only visit 0: time column constant 0
    pf = product_forms(X, rd, Y)
    YtY = pf.YtY.copy()
    YtY[4] = np.inf                                   # a corrupted product form
    pf = dataclasses.replace(pf, YtY=YtY)
    res = fit(pf)
    assert res.status[1] == STATUS_EMPTY
    assert res.status[2] == STATUS_TOO_FEW
    assert res.status[3] == STATUS_RANK_DEFICIENT
    assert res.status[4] == STATUS_NUMERICAL
    for vox in (1, 2, 3, 4):
        assert np.isnan(res.llh[vox]) and np.isnan(res.beta[vox]).all()
        assert np.isnan(res.D[0][vox]).all() and not res.fitted[vox]
    # the other voxels are exactly as when fitted alone
    good = [0, 5, 6, 7]
    ref = fit(pf.take(np.array(good)))
    _same(res.llh[good], ref.llh, rtol=1e-12)
    assert res.fitted[good].all()


def test_bad_method_is_a_value_error():
    X, rd, Y, pf = simulate(10, q=1, v=2)
    with pytest.raises(ValueError):
        fit(pf, method="reml")
    with pytest.raises(ValueError):
        fit(pf, polish="sometimes")


def test_iteration_cap_flags_voxels():
    X, rd, Y, pf = simulate(11, q=2, v=6)
    res = fit(pf, max_iterations=1, polish="none")
    assert (res.status[res.fitted] <= 2).all()
    assert (res.status == 1).any()


@pytest.mark.parametrize("cap", [1, 2, 4, 8])
def test_max_iterations_bounds_the_whole_fit_polish_included(cap):
    """Issue 11: the polish had its own cap, so `max_iterations: 1` never gave status 1.
    Now a voxel's Fisher Scoring and polish iterations together stay within the cap; a voxel
    whose uncapped fit took at most ``cap`` iterations is fitted exactly as without the cap,
    every other one stops with status 1."""
    X, rd, Y, pf = simulate(11, q=2, v=16)
    free = fit(pf)
    capped = fit(pf, max_iterations=cap)
    assert (capped.iterations <= cap).all()
    within = free.iterations <= cap
    np.testing.assert_array_equal(capped.status[within], free.status[within])
    np.testing.assert_array_equal(capped.llh[within], free.llh[within])
    assert (capped.status[~within] == 1).all()
    assert capped.fitted.all()
    if cap == 1:
        assert (~within).sum() >= 12, free.iterations
