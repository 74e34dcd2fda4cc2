"""Satterthwaite machinery: derivatives against finite differences, df invariance, F df rule."""

import numpy as np
import pytest
from scipy.optimize import minimize

from mpiblmm.lmm.likelihood import gls, loglik, vinv_products
from mpiblmm.lmm.products import product_forms
from mpiblmm.lmm.satterthwaite import (
    combine_f_df,
    contrast_variance_df,
    covbeta_jacobian,
    deviance_gradient,
    deviance_hessian,
    deviance_hessian_fd,
    satterthwaite_setup,
)
from mpiblmm.lmm.theta import lambdas_from_theta, n_theta, theta_from_D

from .dense import dense_D, small_design

CASES = [[(12, 1)], [(10, 2)], [(8, 3)], [(9, 1), (4, 1)], [(7, 2), (3, 1)]]


def _problem(factors, seed=0, v=3, missing=False, singular=False):
    """Small random design and data; D with voxel 1 singular when asked."""
    rng = np.random.default_rng(seed)
    n = 70
    X, rd = small_design(rng, n, factors)
    Z = rd.sparse().toarray()
    Ds = []
    for f in rd.structure.factors:
        A = rng.normal(size=(v, f.n_effects, f.n_effects)) * 0.6
        D = A @ np.swapaxes(A, 1, 2) + 0.05 * np.eye(f.n_effects)
        if singular:
            w, U = np.linalg.eigh(D[1])
            w[0] = 0.0
            D[1] = (U * w) @ U.T
        Ds.append(D)
    b = rng.normal(size=(rd.structure.q, v)) * 0.8
    Y = 50.0 + X @ rng.normal(size=(3, v)) + Z @ b + rng.normal(size=(n, v))
    if missing:
        Y[rng.random((n, v)) < 0.1] = np.nan
    pf = product_forms(X, rd, Y, layout="dense")
    s2 = rng.uniform(0.6, 1.5, size=v)
    return pf, X, Z, Y, tuple(Ds), s2


def _deviance(pf, varpar, method):
    """-2 l at (theta, sigma) with beta at its GLS value (lmerTest's deviance), via likelihood.py."""
    lambdas = lambdas_from_theta(varpar[:, :-1], pf.structure)
    vp = vinv_products(pf, lambdas, need_z=False)
    _, ete = gls(vp)
    return -2.0 * loglik(vp, pf.n, varpar[:, -1] ** 2, ete, method)


def _varpar(pf, Ds, s2):
    return np.concatenate([theta_from_D(Ds, pf.structure), np.sqrt(s2)[:, None]], axis=1)


@pytest.mark.parametrize("factors", CASES)
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_gradient_matches_finite_differences(factors, method):
    pf, *_, Ds, s2 = _problem(factors, seed=len(factors), missing=True)
    x = _varpar(pf, Ds, s2)
    g = deviance_gradient(pf, x, method)
    for i in range(x.shape[1]):
        h = 1e-5 * np.maximum(np.abs(x[:, i]), 0.1)
        xp, xm = x.copy(), x.copy()
        xp[:, i] += h
        xm[:, i] -= h
        fd = (_deviance(pf, xp, method) - _deviance(pf, xm, method)) / (2 * h)
        np.testing.assert_allclose(g[:, i], fd, rtol=1e-6, atol=1e-6 * np.abs(g).max())


@pytest.mark.parametrize("factors", CASES)
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_hessian_matches_second_differences_of_deviance(factors, method):
    pf, *_, Ds, s2 = _problem(factors, seed=10 + len(factors))
    x = _varpar(pf, Ds, s2)
    H = deviance_hessian(pf, x, method)
    m = x.shape[1]
    h = 1e-3 * np.maximum(np.abs(x), 0.1)
    for i in range(m):
        for j in range(m):
            def f(si, sj):
                y = x.copy()
                y[:, i] += si * h[:, i]
                y[:, j] += sj * h[:, j]
                return _deviance(pf, y, method)
            fd = (f(1, 1) - f(1, -1) - f(-1, 1) + f(-1, -1)) / (4 * h[:, i] * h[:, j])
            np.testing.assert_allclose(H[:, i, j], fd, rtol=1e-4,
                                       atol=1e-5 * np.abs(H).max())


@pytest.mark.parametrize("factors", CASES + [[(7, 2), (3, 1), (5, 3)]])
@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("singular", [False, True])
def test_analytic_hessian_matches_differences_of_the_gradient(factors, method, singular):
    pf, *_, Ds, s2 = _problem(factors, seed=40 + len(factors), missing=True, singular=singular)
    x = _varpar(pf, Ds, s2)
    H = deviance_hessian(pf, x, method)
    np.testing.assert_allclose(H, deviance_hessian_fd(pf, x, method),
                               rtol=1e-8, atol=1e-9 * np.abs(H).max())


@pytest.mark.parametrize("factors", CASES)
def test_covbeta_and_jacobian(factors):
    pf, X, Z, Y, Ds, s2 = _problem(factors, seed=20 + len(factors))
    x = _varpar(pf, Ds, s2)
    cov, J = covbeta_jacobian(pf, x)
    # Cov(beta) = s2 (X'V^-1 X)^-1 from the dense V (complete data: one X for every voxel).
    for vox in range(x.shape[0]):
        V = np.eye(X.shape[0]) + Z @ dense_D(pf.structure, [D[vox] for D in Ds]) @ Z.T
        ref = s2[vox] * np.linalg.inv(X.T @ np.linalg.solve(V, X))
        np.testing.assert_allclose(cov[vox], ref, rtol=1e-10)
    for i in range(x.shape[1]):
        h = 1e-5 * np.maximum(np.abs(x[:, i]), 0.1)
        xp, xm = x.copy(), x.copy()
        xp[:, i] += h
        xm[:, i] -= h
        fd = (covbeta_jacobian(pf, xp)[0] - covbeta_jacobian(pf, xm)[0]) / (2 * h[:, None, None])
        np.testing.assert_allclose(J[:, i], fd, rtol=1e-6, atol=1e-8 * np.abs(J).max())


def test_zero_cholesky_column_drops_out_of_the_jacobian():
    # Singular D (rank 1, q=2): the last theta (second column of Lambda) is zero, and
    # Cov(beta) depends on it only through its square: its Jacobian is zero (lmerTest's case).
    pf, *_, Ds, s2 = _problem([(10, 2)], seed=5, singular=True)
    x = _varpar(pf, Ds, s2)
    assert abs(x[1, 2]) < 1e-7
    _, J = covbeta_jacobian(pf, x)
    np.testing.assert_allclose(J[1, 2], 0.0, atol=1e-12)
    assert np.abs(J[0, 2]).max() > 1e-6


def _df_in_D_parameterisation(pf, Ds, s2, method, l):
    """Satterthwaite df with varpar = (vech D_k, s2), all derivatives by finite differences.

    An independent route: same formula, other parameters, no analytic derivative.
    """
    st = pf.structure
    v = s2.shape[0]
    tri = [np.tril_indices(f.n_effects) for f in st.factors]

    def unpack(y):
        out, k = [], 0
        for f, (r, c) in zip(st.factors, tri):
            D = np.zeros((v, f.n_effects, f.n_effects))
            D[:, r, c] = y[:, k:k + len(r)]
            D[:, c, r] = y[:, k:k + len(r)]
            out.append(D)
            k += len(r)
        return tuple(out), y[:, -1]

    def dev(y):
        D, s = unpack(y)
        return _deviance(pf, _varpar(pf, D, s), method)

    def s2l(y):
        D, s = unpack(y)
        cov, _ = covbeta_jacobian(pf, _varpar(pf, D, s))
        return np.einsum("p,vpq,q->v", l, cov, l)

    y0 = np.concatenate([D[:, r, c] for D, (r, c) in zip(Ds, tri)] + [s2[:, None]], axis=1)
    m = y0.shape[1]
    h = 1e-4 * np.maximum(np.abs(y0), 0.1)
    g = np.empty((v, m))
    H = np.empty((v, m, m))
    for i in range(m):
        e = np.zeros(m)
        e[i] = 1
        g[:, i] = (s2l(y0 + h[:, i:i + 1] * e) - s2l(y0 - h[:, i:i + 1] * e)) / (2 * h[:, i])
        for j in range(m):
            f = np.zeros(m)
            f[j] = 1
            hi, hj = h[:, i:i + 1] * e, h[:, j:j + 1] * f
            H[:, i, j] = (dev(y0 + hi + hj) - dev(y0 + hi - hj) - dev(y0 - hi + hj)
                          + dev(y0 - hi - hj)) / (4 * h[:, i] * h[:, j])
    A = 2 * np.linalg.inv(0.5 * (H + np.swapaxes(H, 1, 2)))
    return 2 * s2l(y0) ** 2 / np.einsum("vi,vij,vj->v", g, A, g)


def _optimum(pf, Ds, s2, method):
    """The (RE)ML estimate per voxel by a generic optimiser on the deviance in (theta, sigma)."""
    x0 = _varpar(pf, Ds, s2)
    out = np.empty_like(x0)
    for vox in range(x0.shape[0]):
        sub = pf.take(np.array([vox]))
        res = minimize(lambda y: _deviance(sub, y[None], method)[0], x0[vox],
                       jac=lambda y: deviance_gradient(sub, y[None], method)[0],
                       method="BFGS", options={"gtol": 1e-9})
        out[vox] = res.x
    theta, sigma = out[:, :-1], out[:, -1]
    return tuple(lam @ np.swapaxes(lam, 1, 2) for lam in lambdas_from_theta(theta, pf.structure)), sigma ** 2


@pytest.mark.parametrize("factors", [[(12, 1)], [(10, 2)], [(9, 1), (4, 1)]])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_df_invariant_under_reparameterisation(factors, method):
    # At an interior optimum (where the Hessian transforms as a tensor) the df do not depend
    # on the parameterisation: (theta, sigma) with analytic derivatives equals (vech D, s2)
    # with finite differences only.
    pf, *_, Ds, s2 = _problem(factors, seed=30 + len(factors), v=4)
    Ds, s2 = _optimum(pf, Ds, s2, method)
    inside = np.all([np.linalg.eigvalsh(D)[:, 0] > 1e-3 for D in Ds], axis=0)
    assert inside.sum() >= 2
    pre = satterthwaite_setup(pf, s2, Ds, method)
    for l in (np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.5, -2.0])):
        _, df = contrast_variance_df(pre, l)
        ref = _df_in_D_parameterisation(pf, Ds, s2, method, l)
        np.testing.assert_allclose(df[inside], ref[inside], rtol=1e-4)


def test_setup_nan_for_voxels_without_a_fit():
    pf, *_, Ds, s2 = _problem([(9, 1), (4, 1)], seed=3, v=4)
    fitted = np.array([True, False, True, True])
    s2 = s2.copy()
    s2[3] = np.nan                       # a non-finite estimate also counts as not fitted
    pre = satterthwaite_setup(pf, s2, Ds, "REML", fitted=fitted)
    assert pre.fitted.tolist() == [True, False, True, False]
    for a in (pre.cov_beta, pre.jacobian, pre.vcov_varpar):
        assert np.isnan(a[[1, 3]]).all() and np.isfinite(a[[0, 2]]).all()
    var, df = contrast_variance_df(pre, np.array([0.0, 1.0, 0.0]))
    assert np.isnan(var[[1, 3]]).all() and np.isnan(df[[1, 3]]).all()
    # The fitted voxels are unaffected by the others.
    alone = satterthwaite_setup(pf.take(np.array([0, 2])), s2[[0, 2]],
                                tuple(D[[0, 2]] for D in Ds), "REML")
    np.testing.assert_allclose(pre.vcov_varpar[[0, 2]], alone.vcov_varpar, rtol=1e-12)
    assert pre.jacobian.shape[1] == n_theta(pf.structure) + 1


def test_combine_f_df_follows_lmertest():
    nu = np.array([
        [10.0, 10.0, 10.0],          # all equal: their mean
        [10.0, 20.0, 40.0],          # E = sum nu/(nu-2), 2E/(E-r)
        [1.5, 20.0, 40.0],           # any nu <= 2: 2
        [np.inf, 20.0, 40.0],        # infinite nu contributes 1 to E
        [np.nan, 20.0, 40.0],
    ])
    out = combine_f_df(nu)
    E = 10 / 8 + 20 / 18 + 40 / 38
    E_inf = 1 + 20 / 18 + 40 / 38
    np.testing.assert_allclose(out[:4], [10.0, 2 * E / (E - 3), 2.0, 2 * E_inf / (E_inf - 3)])
    assert np.isnan(out[4])
    np.testing.assert_array_equal(combine_f_df(np.array([[7.5], [np.nan]])), [7.5, np.nan])


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("missing", [False, True])
def test_one_factor_level_sums_match_the_general_formulas(q, method, missing):
    """The one-factor setup from level sums equals covbeta_jacobian and deviance_hessian."""
    from mpiblmm.lmm.structures.level_satterthwaite import level_setup
    pf, *_, Ds, s2 = _problem([(9, q)], seed=30 + q, v=4, missing=missing, singular=q > 1)
    x = _varpar(pf, Ds, s2)
    cov, J = covbeta_jacobian(pf, x)
    H = deviance_hessian(pf, x, method)
    cov2, J2, H2 = level_setup(pf, x, method)
    np.testing.assert_allclose(cov2, cov, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(J2, J, rtol=1e-10, atol=1e-12 * np.abs(J).max())
    np.testing.assert_allclose(H2, H, rtol=1e-10, atol=1e-11 * np.abs(H).max())
