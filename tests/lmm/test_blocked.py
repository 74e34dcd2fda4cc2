"""The blocked Cholesky path for several random factors (issue 9).

- log|V| and the V^-1 product forms against dense algebra on small nested (a block-diagonal
  chain: subject in family in site) and crossed designs with missing data;
- the several-factor reference datasets take the blocked path, so the lme4/lmerTest tests
  (tests/lmm/test_against_lme4.py, test_inference_lmertest.py, tests/cli) check it;
- its finite-difference Satterthwaite quantities against the dense analytic ones;
- the same bits for a voxel whatever chunk it is in.
"""

import numpy as np
import pytest

from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.blocked.cholesky import blocked_vinv
from mpiblmm.lmm.inference import t_contrast
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


@pytest.mark.parametrize("name", ["crossed", "nested", "three_factors"])
def test_reference_designs_take_the_blocked_path(name):
    # so tests/lmm/test_against_lme4.py, test_inference_lmertest.py and the CLI tests check
    # the blocked estimator and its Satterthwaite df against lme4/lmerTest
    ds = load_dataset(name)
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    assert product_forms(ds.X, rd, ds.Y[:, :2]).blocks is not None


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_blocked_satterthwaite_equals_the_dense_analytic_one(method):
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


def test_blocked_voxel_gets_the_same_bits_whatever_chunk_it_is_in():
    # (the crossed case, with a dense tail, is tests/lmm/test_analysis.py)
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
    assert product_forms(X, model.rd, Y[:1].T).blocks is not None
    whole = analyse_chunk(model, Y, Settings())
    assert whole["status"].max() <= 2
    for cuts in ([0, 11, 30], [0, 1, 2, 17, 29, 30]):
        parts = [analyse_chunk(model, Y[a:b], Settings()) for a, b in zip(cuts[:-1], cuts[1:])]
        for key, value in whole.items():
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} with cuts {cuts}")


def test_too_large_dense_remainder_is_a_user_error():
    from mpiblmm.errors import SpecError
    from mpiblmm.lmm.blocked.pattern import MAX_TAIL

    rng = np.random.default_rng(0)
    n = 3 * MAX_TAIL
    codes = [np.arange(n) % (MAX_TAIL + 50), rng.permutation(n) % (MAX_TAIL + 10)]
    rd = random_design(codes, [np.ones(n), np.ones(n)], ["item", "rater"])
    with pytest.raises(SpecError, match="crossed"):
        product_forms(np.ones((n, 1)), rd, rng.normal(size=(n, 1)))
