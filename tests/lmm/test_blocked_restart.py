"""Boundary local optima of the several-factor estimator, and fits that stop just inside the
boundary (mpiblmm.lmm.blocked.newton: _restart_boundary_ends, _snap_to_boundary).

The reference dataset ``local_optima`` (tests/reference, lme4 values beside it) holds voxels
where the optimiser, started from the factors' own fits, ended at a boundary local optimum
below lme4's log-likelihood (found by a search, scripts/make_reference_data.py).  These tests
show that the second fit from lme4's start is what brings them to lme4's optimum:
- without it, some voxels are short of lme4 by > 1e-3, all of them ending singular;
- with it, none is short (tests/lmm/test_against_lme4.py checks every voxel too), and a
  second fit stopped early in the first fit's basin (``SAME_END``) loses nothing: the
  same log-likelihoods as second fits run to the end;
- a voxel's bits do not depend on the chunk it is fitted in.
"""

import numpy as np
import pytest

from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.blocked import newton
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.products import product_forms, random_design
from tests.refdata import load_dataset

LLH_TOL = 1e-6


def _forms(ds):
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors],
                       [f.name for f in ds.factors])
    return rd, product_forms(ds.X, rd, ds.Y)


def _no_restart(monkeypatch):
    monkeypatch.setattr(newton, "_restart_boundary_ends",
                        lambda pattern, pf, method, out, *args, **kwargs: out)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_boundary_local_optima_reach_lme4_only_with_the_second_fit(method, monkeypatch):
    ds = load_dataset("local_optima")
    ref = ds.reference[method]
    rd, pf = _forms(ds)
    assert pf.blocks is not None                       # the blocked path
    with monkeypatch.context() as m:
        _no_restart(m)
        first = fit(pf, method)
    short = np.flatnonzero(first.llh - ref.llh < -1e-3)
    assert short.size >= 2, "the dataset no longer reproduces a local optimum"
    assert (first.status[short] == 2).all()             # all ended on the boundary
    both = fit(pf, method)
    assert (both.llh - ref.llh).min() >= -LLH_TOL
    assert (both.iterations >= first.iterations).all()  # both fits are counted
    assert (both.iterations[short] > first.iterations[short]).all()
    with monkeypatch.context() as m:                    # second fits run to their end
        m.setattr(newton, "SAME_END", -1.0)
        full = fit(pf, method)
    np.testing.assert_allclose(both.llh, full.llh, rtol=0, atol=1e-9)
    assert both.iterations.sum() <= full.iterations.sum()


def test_a_fit_stopped_just_inside_the_boundary_is_put_on_it():
    """A voxel lme4 fits on the boundary, with its zero entry moved to 3e-4 (inside the
    flat region near a zero column where the optimiser can stop): the snap puts the entry on
    zero, where the deviance is not higher, and evaluates the fit there."""
    ds = load_dataset("local_optima")
    rd, pf = _forms(ds)
    res = fit(pf, "REML")
    theta = res.extras["theta"]
    diag = newton._diagonal_entries(rd.structure)
    on = np.flatnonzero((theta[:, diag] == 0).any(axis=1) & (res.status == 2))
    assert on.size
    v = on[:1]
    j = diag[np.flatnonzero(theta[v[0], diag] == 0)[0]]
    sub = pf.take(v)
    moved = theta[v].copy()
    moved[0, j] = 3e-4
    inside = newton._result(pf.blocks, newton.prepare(pf.blocks, sub), rd.structure, moved,
                            "REML", np.zeros(1, np.int64), np.zeros(1, np.int64),
                            np.ones(1, bool))
    out = newton._snap_to_boundary(pf.blocks, sub, "REML", inside)
    assert out["theta"][0, j] == 0.0
    assert out["llh"][0] >= inside["llh"][0]
    assert abs(out["llh"][0] - res.llh[v[0]]) < 1e-9
    assert out["evaluations"][0] >= 1


def test_a_voxel_gets_the_same_bits_whatever_chunk_it_is_in():
    """The second fits run beside the first ones in the same batched calls: a voxel's result
    must not depend on which other voxels (and second fits) share its chunk."""
    ds = load_dataset("local_optima")
    rd, _ = _forms(ds)
    model = Model(ds.X, rd, (ContrastDef("time", np.eye(ds.X.shape[1])[2:3]),))
    Y = ds.Y.T.copy()
    whole = analyse_chunk(model, Y, Settings(method="ML"))
    v = Y.shape[0]
    for cuts in ([0, 27, v], [0, 1, 2, 28, 30, 33, v]):
        parts = [analyse_chunk(model, Y[a:b], Settings(method="ML"))
                 for a, b in zip(cuts[:-1], cuts[1:])]
        for key, value in whole.items():
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} with cuts {cuts}")


@pytest.mark.parametrize("cap", [6, 10, 14])
def test_max_iterations_bounds_every_run_of_a_voxel_together(cap):
    """``estimation.max_iterations`` is the whole fit's budget: the escapes and the restarts
    from lme4's start take what the first run left (they each took the whole budget again:
    a random-design audit saw 20 iterations at a cap of 10).  A voxel that stops at the cap
    without converging has status 1; the one-factor path (probe.restart_boundary_ends)
    already passed the rest on."""
    ds = load_dataset("local_optima")
    rd, pf = _forms(ds)
    free = fit(pf, "REML")
    assert free.iterations.max() > cap                  # the cap binds somewhere
    capped = fit(pf, "REML", max_iterations=cap)
    assert capped.iterations.max() <= cap
    assert ((capped.status == 1) == ~capped.extras["converged"]).all()
    assert (capped.status == 1).any()
    # voxels that need no more than the cap end as without it (the same bits)
    same = free.iterations <= cap
    assert same.any()
    np.testing.assert_array_equal(capped.llh[same], free.llh[same])
