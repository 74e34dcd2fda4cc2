"""The blocked Cholesky path for several random factors (issue 9).

- log|V| and the V^-1 product forms against dense algebra on small nested (a block-diagonal
  chain: subject in family in site) and crossed designs with missing data;
- the several-factor reference datasets take the blocked path, so the lme4/lmerTest tests
  (tests/lmm/test_against_lme4.py, test_inference_lmertest.py, tests/cli) check it;
- the analytic gradient of the profiled deviance (selected inversion, back substitution)
  against dense algebra and finite differences (nested chain with a slope, crossed with a
  dense tail updated densely and pair by pair, missing data);
- its Satterthwaite quantities against the dense analytic ones;
- the same bits for a voxel whatever chunk it is in.
"""

import numpy as np
import pytest

from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.blocked import inference as blocked_inference
from mpiblmm.lmm.blocked import newton as blocked_newton
from mpiblmm.lmm.blocked import pattern as blocked_pattern
from mpiblmm.lmm.blocked.cholesky import blocked_vinv, colsum, colsums, prepare
from mpiblmm.lmm.blocked.gradient import evaluate
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.inference import t_contrast
from mpiblmm.lmm.model import STATUS_SINGULAR
from mpiblmm.lmm.likelihood import vinv_products
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.satterthwaite import satterthwaite_setup
from mpiblmm.lmm.theta import lambdas_from_theta, n_theta
from tests.refdata import load_dataset

def _nested(rng, n_sub=30, visits=3):
    """subject in family in site, a random slope on subject; every voxel misses some rows."""
    fam_of_sub = np.sort(rng.integers(0, 12, n_sub))
    site_of_fam = np.sort(rng.integers(0, 4, 12))
    sub = np.repeat(np.arange(n_sub), visits)
    fam = fam_of_sub[sub]
    _, fam = np.unique(fam, return_inverse=True)
    site = np.unique(site_of_fam[fam_of_sub[sub]], return_inverse=True)[1]
    t = np.tile(np.arange(visits, dtype=float), n_sub)
    return [sub, fam, site], [np.column_stack([np.ones_like(t), t]), np.ones_like(t),
                              np.ones_like(t)], t


def _crossed(rng, n_sub=20, n_rater=6):
    sub = np.repeat(np.arange(n_sub), 4)
    rater = rng.integers(0, n_rater, sub.size)
    _, rater = np.unique(rater, return_inverse=True)
    t = rng.normal(size=sub.size)
    return [sub, rater], [np.ones_like(t), np.column_stack([np.ones_like(t), t])], t


@pytest.mark.parametrize("make", [_nested, _crossed], ids=["nested", "crossed"])
def test_blocked_products_equal_dense_algebra(make):
    rng = np.random.default_rng(5)
    codes, Zs, t = make(rng)
    n = t.size
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    Y = rng.normal(size=(n, 7))
    Y[rng.random(Y.shape) < 0.1] = np.nan
    rd = random_design(codes, Zs)
    dense = product_forms(X, rd, Y, layout="dense")
    blocked = product_forms(X, rd, Y, layout="blocked")
    pat = blocked.blocks
    if make is _nested:                  # subject, family and site all stay block diagonal
        assert pat.n_prefix == 3 and pat.m == 0
    else:                                # the rater block fills in: a dense tail
        assert pat.n_prefix == 1 and pat.m == rd.structure.factors[1].width
    theta = rng.normal(size=(7, n_theta(rd.structure)))
    theta[0] = 0.0                       # D = 0
    ref = vinv_products(dense, lambdas_from_theta(theta, rd.structure), need_z=False)
    got = blocked_vinv(pat, blocked, theta)
    for key in ("XtViX", "XtViY", "YtViY", "logdetV"):
        np.testing.assert_allclose(getattr(got, key), getattr(ref, key), rtol=1e-10,
                                   atol=1e-10, err_msg=key)


def _nested_crossed(rng, n_sub=18, visits=3):
    """subject (slope) in site, crossed with raters (slope): prefix subject, tail site+rater."""
    sub = np.repeat(np.arange(n_sub), visits)
    site = (np.arange(n_sub) % 3)[sub]
    rater = rng.integers(0, 4, sub.size)
    t = rng.normal(size=sub.size)
    one = np.ones_like(t)
    return [sub, site, rater], [np.column_stack([one, t]), one, np.column_stack([one, t])], t


def _dense_derivatives(X, rd, codes, Zs, y, theta, method):
    """Deviance pieces and their theta derivatives by dense n x n algebra (one voxel)."""
    st = rd.structure
    blocks, lams = [], lambdas_from_theta(theta[None], st)
    for code, Z, f, lam in zip(codes, Zs, st.factors, lams):
        Z = Z.reshape(len(code), -1)
        Zk = np.zeros((len(code), f.n_levels * f.n_effects))
        for e in range(f.n_effects):
            Zk[np.arange(len(code)), code * f.n_effects + e] = Z[:, e]
        blocks.append((Zk, f, lam[0]))
    ok = np.isfinite(y)
    X, y = X[ok], y[ok]
    n, p = X.shape

    def V_of(dfac=None, entry=None):
        V = np.zeros((n, n)) if dfac is not None else np.eye(n)
        start = 0
        for k, (Zk, f, lam) in enumerate(blocks):
            Zk = Zk[ok]
            if dfac is None:
                D = lam @ lam.T
            elif k == dfac:
                E = np.zeros_like(lam)
                E[entry] = 1.0
                D = E @ lam.T + lam @ E.T
            else:
                D = np.zeros_like(lam)
            V += Zk @ np.kron(np.eye(f.n_levels), D) @ Zk.T
            start += f.n_vech
        return V

    V = V_of()
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    A = np.linalg.inv(XVX)
    beta = A @ X.T @ Vi @ y
    e = y - X @ beta
    Q = e @ Vi @ e
    dld, dQ, dX = [], [], []
    for k, f in enumerate(st.factors):
        rows, cols = np.tril_indices(f.n_effects)
        for entry in sorted(zip(rows, cols), key=lambda rc: (rc[1], rc[0])):
            dV = V_of(k, entry)
            dXVX = -X.T @ Vi @ dV @ Vi @ X
            d = np.trace(Vi @ dV) + (np.trace(A @ dXVX) if method == "REML" else 0.0)
            dld.append(d)
            dQ.append(-e @ Vi @ dV @ Vi @ e)
            dX.append(dXVX)
    dof = n - p if method == "REML" else n
    g = np.array(dld) + dof * np.array(dQ) / Q
    return np.array(dld), np.array(dQ), np.array(dX), g


@pytest.mark.parametrize("dense_tail", [True, False], ids=["dense-update", "pairwise"])
@pytest.mark.parametrize("make", [_nested, _crossed, _nested_crossed],
                         ids=["nested", "crossed", "nested-crossed"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_analytic_gradient_equals_dense_algebra_and_differences(make, method, dense_tail,
                                                                monkeypatch):
    monkeypatch.setattr(blocked_pattern, "DENSE_TAIL_FACTOR", 1e12 if dense_tail else 0.0)
    rng = np.random.default_rng(11)
    codes, Zs, t = make(rng)
    n = t.size
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    Y = rng.normal(size=(n, 4))
    Y[rng.random(Y.shape) < 0.1] = np.nan
    rd = random_design(codes, Zs)
    pf = product_forms(X, rd, Y, layout="blocked")
    pat = pf.blocks
    if make is not _nested:
        assert pat.m > 0 and (pat.dense_tail[0] is not None) == dense_tail
    prep = prepare(pat, pf)
    theta = rng.normal(size=(4, n_theta(rd.structure)))
    theta[1, 0] = 0.0                    # a zero column of Lambda: the gradient still exact
    got = evaluate(pat, prep, theta, method, jacobian=True)
    for j in range(4):
        dld, dQ, dX, g = _dense_derivatives(X, rd, codes, Zs, Y[:, j], theta[j], method)
        scale = np.abs(g).max()
        np.testing.assert_allclose(got["g"][j], g, atol=1e-9 * scale)
        np.testing.assert_allclose(got["dld"][j], dld, atol=1e-9 * np.abs(dld).max())
        np.testing.assert_allclose(got["dQ"][j], dQ, atol=1e-9 * np.abs(dQ).max())
        np.testing.assert_allclose(got["dXtViX"][j], dX, atol=1e-9 * np.abs(dX).max())
    # and against central differences of the blocked deviance itself
    h = 1e-6
    for i in range(theta.shape[1]):
        tp, tm = theta.copy(), theta.copy()
        tp[:, i] += h
        tm[:, i] -= h
        fd = (evaluate(pat, prep, tp, method)["f"] - evaluate(pat, prep, tm, method)["f"]) / (2 * h)
        np.testing.assert_allclose(got["g"][:, i], fd, atol=1e-6 * np.abs(got["g"]).max())


@pytest.mark.parametrize("name", ["crossed", "nested", "three_factors"])
def test_reference_designs_take_the_blocked_path(name):
    # so tests/lmm/test_against_lme4.py, test_inference_lmertest.py and the CLI tests check
    # the blocked estimator and its Satterthwaite df against lme4/lmerTest
    ds = load_dataset(name)
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    assert product_forms(ds.X, rd, ds.Y[:, :2]).blocks is not None


@pytest.mark.parametrize("analytic", [True, False], ids=["quasi-newton", "fd-newton"])
@pytest.mark.parametrize("name", ["crossed", "nested"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_both_optimisers_reach_lme4(name, method, analytic, monkeypatch):
    # the reference tests run every design through the quasi-Newton; here also through the
    # finite-difference Newton it replaced
    monkeypatch.setattr(blocked_newton, "ANALYTIC_FROM", 0 if analytic else 99)
    ds = load_dataset(name)
    ref = ds.reference[method]
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    res = fit(product_forms(ds.X, rd, ds.Y), method)
    ok = ref.fitted
    assert (res.status[ok] <= STATUS_SINGULAR).all()
    assert (res.llh[ok] - ref.llh[ok]).min() >= -1e-6


@pytest.mark.parametrize("analytic", [True, False], ids=["gradient", "richardson"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_blocked_satterthwaite_equals_the_dense_analytic_one(method, analytic, monkeypatch):
    monkeypatch.setattr(blocked_inference, "ANALYTIC_FROM", 0 if analytic else 99)
    ds = load_dataset("nested")
    ref = ds.reference[method]
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    D = tuple(ref.cov[f.name] / ref.sigma2[:, None, None] for f in ds.factors)
    pres = [satterthwaite_setup(product_forms(ds.X, rd, ds.Y, layout=layout), ref.sigma2, D,
                                method, fitted=ref.fitted, theta=ref.theta)
            for layout in ("dense", "blocked")]
    ok = ref.fitted
    np.testing.assert_allclose(pres[1].cov_beta[ok], pres[0].cov_beta[ok], rtol=1e-10)
    scale = np.abs(pres[0].jacobian[ok]).max()
    np.testing.assert_allclose(pres[1].jacobian[ok], pres[0].jacobian[ok], atol=1e-6 * scale)
    L = np.zeros(ds.X.shape[1])
    L[-1] = 1.0
    df = [t_contrast(pre, ref.beta, L).df[ok] for pre in pres]
    np.testing.assert_allclose(df[1], df[0], rtol=1e-5)


@pytest.mark.parametrize("make", [_nested, _crossed], ids=["nested", "crossed"])
def test_blocked_voxel_gets_the_same_bits_whatever_chunk_it_is_in(make):
    # both through the quasi-Newton with the analytic gradient and its Satterthwaite scheme
    # (m >= 2); another crossed case with m = 2 is tests/lmm/test_analysis.py
    rng = np.random.default_rng(7)
    codes, Zs, t = make(rng, n_sub=16)
    assert n_theta(random_design(codes, Zs).structure) >= blocked_inference.ANALYTIC_FROM
    n = t.size
    X = np.column_stack([np.ones(n), t])
    b = rng.normal(size=(16, 30))
    Y = 10.0 + 0.5 * t[:, None] + b[codes[0]] + rng.normal(size=(n, 30))
    Y = Y.T.copy()
    Y[rng.random(Y.shape) < 0.05] = np.nan
    model = Model(X, random_design(codes, Zs),
                  (ContrastDef("t", np.array([[0.0, 1.0]])),))
    assert product_forms(X, model.rd, Y[:1].T).blocks is not None
    whole = analyse_chunk(model, Y, Settings())
    assert whole["status"].max() <= 2
    for cuts in ([0, 11, 30], [0, 1, 2, 17, 29, 30]):
        parts = [analyse_chunk(model, Y[a:b], Settings()) for a, b in zip(cuts[:-1], cuts[1:])]
        for key, value in whole.items():
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} with cuts {cuts}")


@pytest.mark.parametrize("shape", [(37, 1), (37, 5), (1, 3, 2), (200, 4, 3, 7), (0, 3, 2),
                                   (53, 2, 1)])
def test_colsums_has_the_bits_of_one_colsum_per_entry(shape):
    # the level sums of the gradient and of c'c are taken several columns per call: each
    # entry must be the sum colsum gives it alone (in order over the levels), whatever the
    # number of columns, so a voxel's bits stay independent of its chunk
    rng = np.random.default_rng(3)
    A = rng.normal(size=shape) * 10.0 ** rng.integers(-8, 9, size=shape)
    A = np.moveaxis(np.moveaxis(A, 0, -1).copy(), -1, 0)      # a non-contiguous view too
    got = colsums(A)
    assert got.shape == shape[1:]
    for k in np.ndindex(*shape[1:-1]):
        for j in range(shape[-1]):
            want = colsum(np.ascontiguousarray(A[(slice(None),) + k + (slice(j, j + 1),)]))
            assert got[k + (j,)].tobytes() == want[0].tobytes()


def test_too_large_dense_remainder_is_a_user_error():
    from mpiblmm.errors import SpecError
    from mpiblmm.lmm.blocked.pattern import MAX_TAIL

    rng = np.random.default_rng(0)
    n = 3 * MAX_TAIL
    codes = [np.arange(n) % (MAX_TAIL + 50), rng.permutation(n) % (MAX_TAIL + 10)]
    rd = random_design(codes, [np.ones(n), np.ones(n)], ["item", "rater"])
    with pytest.raises(SpecError, match="crossed"):
        product_forms(np.ones((n, 1)), rd, rng.normal(size=(n, 1)))


@pytest.mark.parametrize("make", [_nested, _crossed], ids=["nested", "crossed"])
def test_each_factor_alone_from_the_blocked_products(make):
    """The optimiser's start (blocked/start.py): a factor's product forms sliced from the
    blocked ones equal those of the model with that factor alone, and the start holds that
    model's fitted theta (diagonal floored, lme4's identity where the fit failed)."""
    from mpiblmm.lmm.blocked.start import (FLOOR, START_MAX_ITERATIONS, START_TOLERANCE,
                                           factor_product_forms, nested_in,
                                           single_factor_start)
    from mpiblmm.lmm.theta import theta_slices, tril_indices

    rng = np.random.default_rng(8)
    codes, Zs, t = make(rng)
    n = t.size
    X = np.column_stack([np.ones(n), t])
    Y = rng.normal(size=(n, 6))
    Y[:, 1:] += 2.0 * rng.normal(size=(codes[0].max() + 1, 5))[codes[0]]   # a subject effect
    Y[rng.random(Y.shape) < 0.1] = np.nan
    rd = random_design(codes, Zs)
    pf = product_forms(X, rd, Y, layout="blocked")
    pat = pf.blocks
    default = blocked_newton.theta0(pf)
    start = single_factor_start(pat, pf, "REML", default)
    alone_theta = {}
    for a, k in enumerate(pat.order):
        alone = product_forms(X, random_design([codes[k]], [Zs[k]]), Y)
        got = factor_product_forms(pat, pf, a)
        for key in ("XtX", "XtY", "YtY", "ZtX", "ZtY", "ZtZ", "n"):
            np.testing.assert_allclose(getattr(got, key), getattr(alone, key), rtol=1e-12,
                                       atol=1e-10, err_msg=key)
        alone_theta[a] = fit(alone, "REML", polish="none", tolerance=START_TOLERANCE,
                             max_iterations=START_MAX_ITERATIONS).extras["theta"]
    parents = {a: nested_in(pat, a) for a in range(pat.K)}
    names = [rd.structure.factors[k].name for k in pat.order]
    if make is _nested:          # family in site (one effect each); subject has a slope
        assert {names[a]: parents[a] for a in range(3)} == {      # subject, family, site
            "factor0": None, "factor1": names.index("factor2"), "factor2": None}
    else:
        assert set(parents.values()) == {None}
    for a, k in enumerate(pat.order):
        th = alone_theta[a]
        if parents[a] is not None:
            th = np.sqrt(np.maximum(th ** 2 - alone_theta[parents[a]] ** 2, 0.0))
        rows, cols = tril_indices(rd.structure.factors[k].n_effects)
        diag = rows == cols
        expect = th.copy()
        expect[:, diag] = np.maximum(np.abs(th[:, diag]), FLOOR)
        expect = np.where(np.isfinite(expect).all(axis=1)[:, None], expect,
                          default[:, theta_slices(rd.structure)[k]])
        np.testing.assert_allclose(start[:, theta_slices(rd.structure)[k]], expect,
                                   rtol=1e-6, atol=1e-8)
    assert np.isfinite(start).all()


def test_a_saddle_on_a_zero_column_is_escaped(monkeypatch):
    """From a start with a tiny slope entry, one voxel of the unbalanced reference stops on
    ``L22 ~ 0`` (the gradient of a zero column vanishes by symmetry), 0.138 below lme4's ML
    fit; the probe at ``L22 = PROBE`` finds the deviance falling there and the voxel is
    optimised again, to lme4's fit."""
    from mpiblmm.lmm.blocked import start as blocked_start

    ds = load_dataset("unbalanced")
    ref = ds.reference["ML"]
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    pf = product_forms(ds.X, rd, ds.Y).take(np.array([19]))
    pat = pf.blocks
    monkeypatch.setattr(blocked_start, "FLOOR", 0.005)
    start = blocked_start.single_factor_start(pat, pf, "ML", blocked_newton.theta0(pf))
    run = blocked_newton._quasi_newton
    stuck = run(pat, pf, "ML", start, 1e-12, 200, 30)
    assert abs(stuck["theta"][0, 2]) < blocked_newton.PROBE_BELOW
    assert stuck["llh"][0] < ref.llh[19] - 0.1
    out = blocked_newton._escape_saddles(pat, pf, "ML", stuck, run, 1e-12, 200, 30)
    assert out["llh"][0] >= ref.llh[19] - 1e-6
    assert out["evaluations"][0] > stuck["evaluations"][0]
