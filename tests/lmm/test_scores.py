"""Scores against finite differences of the likelihood; information against the dense trace formula."""

import numpy as np
import pytest

from mpiblmm.lmm.likelihood import cov_factor, gls, loglik, vinv_products
from mpiblmm.lmm.products import product_forms
from mpiblmm.lmm.scores import (
    beta_score, d_scores, duplication, information_s2d, information_s2s2,
    level_blocks, s2_score, unvech, vech, vech_score,
)

from .dense import CASES, dense_D, small_design

def _problem(factors, seed, missing=True, v=3, n=50):
    rng = np.random.default_rng(seed)
    X, rd = small_design(rng, n, factors)
    Y = 50.0 + rng.normal(size=(n, v)) * 2
    if missing:
        Y[rng.random((n, v)) < 0.12] = np.nan
    pf = product_forms(X, rd, Y, layout="dense")
    Ds = []
    for f in rd.structure.factors:
        A = rng.normal(size=(v, f.n_effects, f.n_effects)) * 0.6
        Ds.append(A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(f.n_effects))
    return rng, X, rd, Y, pf, Ds


def _llh_fixed_s2(pf, Ds, s2, method):
    vp = vinv_products(pf, tuple(cov_factor(D) for D in Ds), need_z=False)
    _, ete = gls(vp)
    return loglik(vp, pf.n, s2, ete, method)


def test_duplication_and_vech_round_trip():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 3, 3))
    A = A + np.swapaxes(A, 1, 2)
    np.testing.assert_allclose(unvech(vech(A), 3), A)
    dup = duplication(3)
    np.testing.assert_allclose(dup @ vech(A)[0], A[0].ravel())


@pytest.mark.parametrize("factors", CASES)
@pytest.mark.parametrize("method", ["ML", "REML"])
def test_d_score_matches_finite_differences(factors, method):
    rng, X, rd, Y, pf, Ds = _problem(factors, seed=len(factors) * 11 + factors[0][1])
    s2 = rng.uniform(0.5, 2.0, size=pf.n_voxels)
    vp = vinv_products(pf, tuple(cov_factor(D) for D in Ds), need_z=True)
    beta, _ = gls(vp)
    blocks = level_blocks(vp, beta, pf.algebra)
    G = d_scores(vp, blocks, s2, method)
    h = 1e-6
    for k, f in enumerate(rd.structure.factors):
        g = vech_score(G[k])
        m = f.n_vech
        for i in range(m):
            e = np.zeros(m)
            e[i] = h
            plus = [D.copy() for D in Ds]
            minus = [D.copy() for D in Ds]
            plus[k] = Ds[k] + unvech(e, f.n_effects)
            minus[k] = Ds[k] - unvech(e, f.n_effects)
            fd = (_llh_fixed_s2(pf, plus, s2, method) - _llh_fixed_s2(pf, minus, s2, method)) / (2 * h)
            np.testing.assert_allclose(g[:, i], fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_s2_and_beta_scores(method):
    rng, X, rd, Y, pf, Ds = _problem([(10, 2)], seed=5)
    s2 = rng.uniform(0.5, 2.0, size=pf.n_voxels)
    vp = vinv_products(pf, tuple(cov_factor(D) for D in Ds), need_z=False)
    beta, ete = gls(vp)
    h = 1e-6
    fd = (loglik(vp, pf.n, s2 + h, ete, method) - loglik(vp, pf.n, s2 - h, ete, method)) / (2 * h)
    np.testing.assert_allclose(s2_score(ete, pf.n, s2, pf.p, method), fd, rtol=1e-6)
    np.testing.assert_allclose(beta_score(vp, beta, s2), 0.0, atol=1e-8)


def _dense_dV(rd, Zo):
    """dV/d vech(D_k)_m for every factor and vech entry, as a list of (n, n) matrices."""
    out = []
    for f, sl in zip(rd.structure.factors, rd.structure.slices()):
        rows = np.arange(f.n_vech)
        for m in rows:
            e = np.zeros(f.n_vech)
            e[m] = 1.0
            E = unvech(e, f.n_effects)
            Zk = Zo[:, sl]
            out.append(Zk @ np.kron(np.eye(f.n_levels), E) @ Zk.T)
    return out


@pytest.mark.parametrize("factors", CASES)
def test_information_matches_dense_trace(factors):
    rng, X, rd, Y, pf, Ds = _problem(factors, seed=17 + len(factors))
    Z = rd.sparse().toarray()
    s2 = rng.uniform(0.5, 2.0, size=pf.n_voxels)
    vp = vinv_products(pf, tuple(cov_factor(D) for D in Ds), need_z=True)
    beta, _ = gls(vp)
    blocks = level_blocks(vp, beta, pf.algebra)
    full = pf.algebra.information_dd(vp, blocks, cross=True)
    diag = pf.algebra.information_dd(vp, blocks, cross=False)
    Is2d = information_s2d(blocks, s2)
    for vox in range(pf.n_voxels):
        obs = np.isfinite(Y[:, vox])
        Zo = Z[obs]
        V = np.eye(obs.sum()) + Zo @ dense_D(rd.structure, [D[vox] for D in Ds]) @ Zo.T
        Vi = np.linalg.inv(V)
        dV = _dense_dV(rd, Zo)
        ref = np.array([[0.5 * np.trace(Vi @ a @ Vi @ b) for b in dV] for a in dV])
        np.testing.assert_allclose(full[vox], ref, rtol=1e-8, atol=1e-8)
        start = 0
        for k, f in enumerate(rd.structure.factors):
            sl = slice(start, start + f.n_vech)
            np.testing.assert_allclose(diag[k][vox], ref[sl, sl], rtol=1e-8, atol=1e-8)
            start += f.n_vech
        ref_s2d = np.array([np.trace(Vi @ a) for a in dV]) / (2 * s2[vox])
        np.testing.assert_allclose(Is2d[vox], ref_s2d, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(information_s2s2(pf.n, s2), pf.n / (2 * s2**2))


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("missing", [False, True])
def test_one_factor_fast_path_matches_z_products(q, missing):
    """The entry-wise one-factor path (no Z parts) equals the V^-1 products and level blocks."""
    from mpiblmm.lmm.structures.levels import level_sums
    rng, X, rd, Y, pf, Ds = _problem([(10, q)], seed=40 + q, missing=missing, v=5)
    lams = tuple(cov_factor(D) for D in Ds)
    full = vinv_products(pf, lams, need_z=True)
    fast = vinv_products(pf, lams, need_z=False)
    for name in ("XtViX", "XtViY", "YtViY", "logdetV"):
        np.testing.assert_allclose(getattr(fast, name), getattr(full, name), rtol=1e-12,
                                   atol=1e-12)
    beta, _ = gls(full)
    A = np.linalg.inv(full.XtViX)
    b = level_blocks(full, beta, pf.algebra)[0]
    s2 = np.linspace(0.5, 2.0, pf.n_voxels)
    sums = level_sums(pf, lams[0], beta, s2, A)
    np.testing.assert_allclose(sums.R, b.R.sum(axis=1), rtol=1e-12, atol=1e-12)
    G = d_scores(full, (b,), s2, "REML")[0]
    np.testing.assert_allclose(sums.G, G, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(sums.RR, np.einsum("vjac,vjbd->vabcd", b.R, b.R), rtol=1e-12,
                               atol=1e-12)
    ml = level_sums(pf, lams[0], beta, s2)
    np.testing.assert_allclose(ml.G, d_scores(full, (b,), s2, "ML")[0], rtol=1e-11, atol=1e-11)
