"""Product-form likelihood against the dense N(X beta, s2 (I + Z D Z')) density."""

import numpy as np
import pytest

from mpiblmm.lmm.likelihood import cov_factor, gls, loglik, profiled_loglik, vinv_products
from mpiblmm.lmm.products import product_forms

from .dense import CASES, dense_D, dense_gls, dense_loglik, small_design


def _design(rng, n, factors):
    """X, RandomDesign and dense Z."""
    X, rd = small_design(rng, n, factors)
    return X, rd, rd.sparse().toarray()


def _random_psd(rng, q, singular=False):
    A = rng.normal(size=(q, q)) * 0.7
    D = A @ A.T
    if singular:
        w, U = np.linalg.eigh(D)
        w[0] = 0.0
        D = (U * w) @ U.T
    return D


@pytest.mark.parametrize("factors", CASES)
@pytest.mark.parametrize("method", ["ML", "REML"])
@pytest.mark.parametrize("missing", [False, True])
def test_loglik_matches_dense(factors, method, missing):
    rng = np.random.default_rng(len(factors) * 7 + sum(q for _, q in factors))
    n, v = 60, 4
    X, rd, Z = _design(rng, n, factors)
    Y = 1000.0 + rng.normal(size=(n, v)) * 3
    if missing:
        Y[rng.random((n, v)) < 0.15] = np.nan
        Y[:, 0] = 1000.0 + rng.normal(size=n)  # keep one complete voxel
    pf = product_forms(X, rd, Y, layout="dense")
    Ds = [np.stack([_random_psd(rng, f.n_effects, singular=(vox == 1)) for vox in range(v)])
          for f in rd.structure.factors]
    lambdas = tuple(cov_factor(D) for D in Ds)
    s2 = rng.uniform(0.5, 2.0, size=v)
    llh_prof, beta_c, s2_prof, vp = profiled_loglik(pf, lambdas, method)
    beta = beta_c + pf.y_offset
    _, ete = gls(vp)
    llh_given = loglik(vp, pf.n, s2, ete, method)
    for vox in range(v):
        obs = np.isfinite(Y[:, vox])
        Dfull = dense_D(rd.structure, [D[vox] for D in Ds])
        Xo, Zo, yo = X[obs], Z[obs], Y[obs, vox]
        b_ref = dense_gls(Xo, Zo, yo, Dfull)
        np.testing.assert_allclose(beta[vox], b_ref, rtol=1e-9, atol=1e-9)
        ref = dense_loglik(Xo, Zo, yo, b_ref, s2[vox], Dfull, method)
        np.testing.assert_allclose(llh_given[vox], ref, rtol=1e-10)
        ref_prof = dense_loglik(Xo, Zo, yo, b_ref, s2_prof[vox], Dfull, method)
        np.testing.assert_allclose(llh_prof[vox], ref_prof, rtol=1e-10)


@pytest.mark.parametrize("factors", CASES)
def test_vinv_z_products_match_dense(factors):
    rng = np.random.default_rng(3)
    n, v = 50, 3
    X, rd, Z = _design(rng, n, factors)
    Y = rng.normal(size=(n, v))
    Y[rng.random((n, v)) < 0.1] = np.nan
    pf = product_forms(X, rd, Y, centre=False, layout="dense")
    Ds = [np.stack([_random_psd(rng, f.n_effects) for _ in range(v)])
          for f in rd.structure.factors]
    vp = vinv_products(pf, tuple(cov_factor(D) for D in Ds), need_z=True)
    for vox in range(v):
        obs = np.isfinite(Y[:, vox])
        Zo, Xo, yo = Z[obs], X[obs], Y[obs, vox]
        Vi = np.linalg.inv(np.eye(obs.sum()) + Zo @ dense_D(rd.structure, [D[vox] for D in Ds]) @ Zo.T)
        np.testing.assert_allclose(vp.ZtViX[vox], Zo.T @ Vi @ Xo, atol=1e-10)
        np.testing.assert_allclose(vp.ZtViY[vox], Zo.T @ Vi @ yo, atol=1e-10)
        ZViZ = Zo.T @ Vi @ Zo
        if rd.structure.is_single_factor:
            f = rd.structure.factors[0]
            blocks = np.stack([ZViZ[j * f.n_effects:(j + 1) * f.n_effects,
                                    j * f.n_effects:(j + 1) * f.n_effects]
                               for j in range(f.n_levels)])
            np.testing.assert_allclose(vp.ZtViZ[vox], blocks, atol=1e-10)
        else:
            np.testing.assert_allclose(vp.ZtViZ[vox], ZViZ, atol=1e-10)
        np.testing.assert_allclose(vp.XtViX[vox], Xo.T @ Vi @ Xo, atol=1e-10)
