"""T and F contrasts: statistics, alternatives, far-tail p-values, NaN voxels, validation."""

import numpy as np
import pytest
from scipy import stats

from mpiblmm.errors import ContrastError
from mpiblmm.lmm.contrasts import f_weights, t_weights
from mpiblmm.lmm.inference import f_contrast, f_logsf, t_contrast, t_logsf
from mpiblmm.lmm.satterthwaite import Precomputed, satterthwaite_setup

from .test_satterthwaite import _problem


def _pre_beta(v=4, fitted=None):
    pf, X, Z, Y, Ds, s2 = _problem([(9, 1), (4, 1)], seed=7, v=v)
    pre = satterthwaite_setup(pf, s2, Ds, "REML", fitted=fitted)
    beta = np.random.default_rng(1).normal(size=(v, 3))
    return pre, beta


def test_t_statistic_and_alternatives():
    pre, beta = _pre_beta()
    l = np.array([0.0, 1.0, -1.0])
    two = t_contrast(pre, beta, l)
    gt = t_contrast(pre, beta, l, alternative="greater")
    lt = t_contrast(pre, beta, l, alternative="less")
    np.testing.assert_allclose(two.estimate, beta @ l)
    np.testing.assert_allclose(two.se, np.sqrt(np.einsum("p,vpq,q->v", l, pre.cov_beta, l)))
    np.testing.assert_allclose(two.t, two.estimate / two.se)
    np.testing.assert_allclose(two.p, 2 * stats.t.sf(np.abs(two.t), two.df), rtol=1e-12)
    np.testing.assert_allclose(gt.p + lt.p, 1.0, rtol=1e-12)
    np.testing.assert_allclose(two.p, 2 * np.minimum(gt.p, lt.p), rtol=1e-12)
    np.testing.assert_allclose(two.neglog10p, -np.log10(two.p), rtol=1e-12)
    with pytest.raises(ValueError, match="alternative"):
        t_contrast(pre, beta, l, alternative="both")


def test_f_statistic_is_the_wald_form_and_one_row_is_t_squared():
    pre, beta = _pre_beta()
    L = np.array([[0.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
    res = f_contrast(pre, beta, L)
    Lb = beta @ L.T
    S2 = np.einsum("ip,vpq,jq->vij", L, pre.cov_beta, L)
    wald = np.einsum("vi,vij,vj->v", Lb, np.linalg.inv(S2), Lb) / 2
    np.testing.assert_allclose(res.F, wald, rtol=1e-10)
    assert res.df_num == 2
    np.testing.assert_allclose(res.p, stats.f.sf(res.F, 2, res.df_den), rtol=1e-12)
    np.testing.assert_allclose(res.r2, 2 * res.F / (2 * res.F + res.df_den))
    one = f_contrast(pre, beta, L[:1])
    t = t_contrast(pre, beta, L[0])
    np.testing.assert_allclose(one.F, t.t ** 2, rtol=1e-12)
    np.testing.assert_allclose(one.df_den, t.df, rtol=1e-12)
    np.testing.assert_allclose(one.p, t.p, rtol=1e-10)


def test_far_tail_p_values_are_finite_and_accurate():
    import mpmath  # a test dependency (pyproject: test extra)
    mpmath.mp.dps = 50

    def t_sf(t, df):      # P(T > t) = I_{df/(df+t^2)}(df/2, 1/2) / 2
        return mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2

    def f_sf(F, d1, d2):  # P(F > f) = I_{d2/(d2+d1 f)}(d2/2, d1/2)
        return mpmath.betainc(d2 / 2, d1 / 2, 0, d2 / (d2 + d1 * F), regularized=True)

    for t, df in [(40.0, 10.0), (40.0, 200.0), (40.0, 1000.0), (400.0, 1000.0), (1e4, 30.0)]:
        ref = float(mpmath.log(t_sf(mpmath.mpf(t), mpmath.mpf(df))))
        np.testing.assert_allclose(t_logsf(t, df), ref, rtol=1e-9)
    for F, d1, d2 in [(500.0, 2, 10.0), (500.0, 3, 1000.0), (5000.0, 3, 2000.0)]:
        ref = float(mpmath.log(f_sf(mpmath.mpf(F), d1, mpmath.mpf(d2))))
        np.testing.assert_allclose(f_logsf(F, d1, d2), ref, rtol=1e-9)
    # Infinite df: the normal and chi-square limits.
    np.testing.assert_allclose(t_logsf(40.0, np.inf), stats.norm.logsf(40.0))


def test_contrast_results_for_huge_statistics():
    # t = 40 and F = 500: p below 1e-16 but finite, accurate -log10 p (no 1 - cdf).
    pre, beta = _pre_beta(v=2)
    l = np.array([0.0, 1.0, 0.0])
    se = np.sqrt(np.einsum("p,vpq,q->v", l, pre.cov_beta, l))
    beta = beta.copy()
    beta[:, 1] = 40.0 * se
    t = t_contrast(pre, beta, l)
    np.testing.assert_allclose(t.t, 40.0)
    assert np.all(t.p < 1e-16) and np.all(t.p > 0)
    np.testing.assert_allclose(t.neglog10p, -(np.log(2) + stats.t.logsf(40.0, t.df)) / np.log(10))
    L = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    F0 = f_contrast(pre, beta, L).F
    beta[:, 1:] *= np.sqrt(500.0 / F0)[:, None]
    F = f_contrast(pre, beta, L)
    np.testing.assert_allclose(F.F, 500.0)
    assert np.all(F.p < 1e-16) and np.all(F.p > 0)
    np.testing.assert_allclose(F.neglog10p, -stats.f.logsf(500.0, 2, F.df_den) / np.log(10))
    # Beyond double precision: p underflows to 0 but -log10 p stays finite.
    beta[:, 1] = 1e12 * se
    far = t_contrast(pre, beta, l)
    assert np.all(np.isfinite(far.neglog10p)) and np.all(far.neglog10p > 300)


def test_voxels_without_a_fit_are_nan_everywhere():
    pre, beta = _pre_beta(v=4, fitted=np.array([True, False, True, False]))
    beta = beta.copy()
    beta[3] = np.nan
    t = t_contrast(pre, beta, [0.0, 1.0, 0.0])
    F = f_contrast(pre, beta, [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for a in (t.estimate, t.se, t.t, t.df, t.p, t.neglog10p,
              F.F, F.df_den, F.p, F.neglog10p, F.r2):
        assert np.isnan(a[[1, 3]]).all() and np.isfinite(a[[0, 2]]).all()


def test_contrast_validation_names_the_contrast():
    with pytest.raises(ContrastError, match="'age'.*3 weights.*4 fixed effects"):
        t_weights([0, 1, 0], 4, "age")
    with pytest.raises(ContrastError, match="'zero'.*all weights are zero"):
        t_weights([0, 0, 0], 3, "zero")
    with pytest.raises(ContrastError, match="'two'.*one row"):
        t_weights([[0, 1, 0], [0, 0, 1]], 3, "two")
    with pytest.raises(ContrastError, match="'nan'.*NaN"):
        t_weights([0, np.nan, 1], 3, "nan")
    with pytest.raises(ContrastError, match="'dup'.*rank 1.*rank deficient"):
        f_weights([[0, 1, 0], [0, 2, 0]], 3, "dup")
    with pytest.raises(ContrastError, match="'word'.*not numbers"):
        f_weights([["a", "b", "c"]], 3, "word")
    L = f_weights([[0, 1, 0], [0, 0, 1]], 3, "ok")
    assert L.shape == (2, 3) and L.dtype == np.float64
    pre, beta = _pre_beta(v=2)
    with pytest.raises(ContrastError, match="'bad'.*rank deficient"):
        f_contrast(pre, beta, [[1, 1, 0], [2, 2, 0]], name="bad")
    # ContrastError is a user error: one line, no traceback in the CLI.
    assert "\n" not in str(ContrastError("x", where="contrast 'c'"))
    assert isinstance(pre, Precomputed)


def test_f_with_each_voxels_own_rows_is_the_f_of_each_voxel_alone():
    """Rows per voxel (v, r, p), as a one-term formula's default F takes them
    (``contrasts.sequential_rows``): every voxel gets what its own rows give as a 2-D
    contrast, and rows spanning the same hypothesis give the same F but another df."""
    from mpiblmm.lmm.contrasts import doolittle_lower, sequential_rows

    pre, beta = _pre_beta(v=4)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(4, 30, 3))
    XtX = np.einsum("vni,vnj->vij", X, X)
    L = sequential_rows(XtX, [1, 2])
    for v in range(4):        # Doolittle: XtX = L U, L unit lower, U upper; the rows: t(L)
        Lf = doolittle_lower(XtX[v:v + 1])[0]
        U = np.linalg.solve(Lf, XtX[v])
        np.testing.assert_allclose(np.tril(U, -1), 0.0, atol=1e-12)
        np.testing.assert_array_equal(np.diag(Lf), 1.0)
        np.testing.assert_array_equal(L[v], Lf.T[[1, 2]])
    both = f_contrast(pre, beta, L)
    plain = f_contrast(pre, beta, np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    for v in range(4):
        alone = f_contrast(pre, beta, L[v])
        for stat in ("F", "df_den", "p"):
            np.testing.assert_allclose(getattr(both, stat)[v], getattr(alone, stat)[v],
                                       rtol=1e-13, err_msg=stat)
    np.testing.assert_allclose(both.F, plain.F, rtol=1e-12)
    assert np.abs(both.df_den / plain.df_den - 1).max() > 1e-6
