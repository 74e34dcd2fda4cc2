"""The blocked Cholesky path for several random factors (issue 9).

- log|V| and the V^-1 product forms against dense algebra on small nested (a block-diagonal
  chain: subject in family in site) and crossed designs with missing data;
- the blocked estimator (forced on the small reference datasets) against lme4;
- its Satterthwaite df against lmerTest;
- the same bits for a voxel whatever chunk it is in.
"""

import numpy as np
import pytest

from mpiblmm.lmm import structure as structure_module
from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.blocked.cholesky import blocked_vinv
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.inference import f_contrast, t_contrast
from mpiblmm.lmm.likelihood import vinv_products
from mpiblmm.lmm.model import STATUS_SINGULAR
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.satterthwaite import satterthwaite_setup
from mpiblmm.lmm.theta import lambdas_from_theta, n_theta
from tests.refdata import load_dataset

LLH_TOL, REL_TOL = 1e-6, 1e-4
DF_MEDIAN, DF_WORST = 1e-2, 5e-2


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


def _reference_fit(name, method):
    ds = load_dataset(name)
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors],
                       [f.name for f in ds.factors])
    pf = product_forms(ds.X, rd, ds.Y, layout="blocked")
    return ds, pf, fit(pf, method)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("name", ["crossed", "nested"])
def test_blocked_estimator_matches_lme4(name, method):
    ds, pf, res = _reference_fit(name, method)
    assert pf.blocks is not None
    ref = ds.reference[method]
    fitted = ref.fitted
    assert (res.status[fitted] <= STATUS_SINGULAR).all()
    diff = res.llh[fitted] - ref.llh[fitted]
    assert diff.min() >= -LLH_TOL, f"worst llh difference {diff.min():.3g}"
    same = fitted & (res.llh - ref.llh <= LLH_TOL)
    regular = same & ~ref.singular
    scale = np.maximum(np.abs(ref.beta), 1e-3 * np.abs(ref.beta).max(axis=1, keepdims=True))
    assert (np.abs(res.beta - ref.beta) / scale)[regular].max() < REL_TOL
    assert (np.abs(res.s2 - ref.sigma2) / ref.sigma2)[regular].max() < REL_TOL
    for k, f in enumerate(ds.factors):
        cref = ref.cov[f.name]
        scale = np.abs(cref).max(axis=(1, 2))[:, None, None]
        err = np.abs(res.cov[k] - cref) / np.where(scale > 0, scale, 1.0)
        assert err[regular].max() < REL_TOL, f.name
    np.testing.assert_array_equal(res.status[same] == STATUS_SINGULAR, ref.singular[same])


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("name", ["crossed", "nested"])  # three_factors: auto-blocked elsewhere
def test_blocked_satterthwaite_matches_lmertest(name, method):
    ds = load_dataset(name)
    ref = ds.reference[method]
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    pf = product_forms(ds.X, rd, ds.Y, layout="blocked")
    D = tuple(ref.cov[f.name] / ref.sigma2[:, None, None] for f in ds.factors)
    pre = satterthwaite_setup(pf, ref.sigma2, D, method, fitted=ref.fitted, theta=ref.theta)
    ok = ref.fitted
    for c in ds.contrasts:
        rc = ref.contrasts[c.name]
        if c.kind == "T":
            r = t_contrast(pre, ref.beta, c.L[0])
            df, df_ref = r.df[ok], rc["df"][ok]
            np.testing.assert_allclose(r.t[ok], rc["t"][ok], rtol=1e-4)
        else:
            r = f_contrast(pre, ref.beta, c.L)
            df, df_ref = r.df_den[ok], rc["df_den"][ok]
            np.testing.assert_allclose(r.F[ok], rc["F"][ok], rtol=1e-4)
        rel = np.abs(df - df_ref) / df_ref
        assert np.median(rel) < DF_MEDIAN and rel.max() < DF_WORST, (c.name, rel.max())


def test_blocked_voxel_gets_the_same_bits_whatever_chunk_it_is_in(monkeypatch):
    monkeypatch.setattr(structure_module, "BLOCKED_MIN_Q", 1)
    rng = np.random.default_rng(7)
    codes, Zs, t = _nested(rng, n_sub=16)
    n = t.size
    X = np.column_stack([np.ones(n), t])
    b = rng.normal(size=(16, 30))
    Y = 10.0 + 0.5 * t[:, None] + b[codes[0]] + rng.normal(size=(n, 30))
    Y = Y.T.copy()
    Y[rng.random(Y.shape) < 0.05] = np.nan
    model = Model(X, random_design(codes, Zs),
                  (ContrastDef("t", np.array([[0.0, 1.0]])),))
    whole = analyse_chunk(model, Y, Settings())
    assert whole["status"].max() <= 2
    for cuts in ([0, 11, 30], [0, 1, 2, 17, 29, 30]):
        parts = [analyse_chunk(model, Y[a:b], Settings()) for a, b in zip(cuts[:-1], cuts[1:])]
        for key, value in whole.items():
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} with cuts {cuts}")
