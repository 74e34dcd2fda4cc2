"""Sanity of the reference datasets, their loader (tests/refdata.py) and the generator.

The lme4 log-likelihoods are re-computed here with dense n x n algebra at lme4's own estimates
(REML: ``-1/2 [(n-p) log(2 pi s2) + log|V| + e'V^-1 e/s2 + log|X'V^-1 X|]``; ML:
``-1/2 [n log(2 pi s2) + log|V| + e'V^-1 e/s2]``, ``V = I + Z (G/s2) Z'``), which checks the
files, the loader's Z (column order, level coding) and the meaning of every stored field.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpiblmm.simulate import (
    FactorSpec,
    covariance,
    first_appearance_codes,
    missing_mask,
    simulate_design,
    simulate_voxels,
)
from tests.refdata import build_z, level_codes, list_datasets, load_dataset

EXPECTED = {"intercept", "slope", "crossed", "three_factors", "missing", "nested", "unbalanced",
            "three_effects", "nested_slope", "crossed_slope", "nested_intercepts", "scaled",
            "days", "local_optima", "local_optima_slope"}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def ds(request):
    return load_dataset(request.param)


def test_all_datasets_present():
    assert EXPECTED <= set(list_datasets())


def test_shapes_and_contract(ds):
    n, p, v = ds.n, ds.p, ds.v
    assert ds.Y.shape == (n, v) and ds.X.shape == (n, p)
    assert len(ds.fixed_names) == p
    assert 100 <= n <= 400 and 20 <= v <= 40
    for f in ds.factors:
        assert f.Z.shape == (n, len(f.effect_names))
        assert f.codes.min() == 0 and f.codes.max() == f.n_levels - 1
        # order of first appearance
        _, first = np.unique(f.codes, return_index=True)
        assert np.all(np.diff(first) > 0)
        assert list(f.levels) == [f.labels[i] for i in first]
    kinds = [c.kind for c in ds.contrasts]
    assert kinds.count("T") >= 3 and any(c.kind == "F" and c.rank == 2 for c in ds.contrasts)
    for c in ds.contrasts:
        assert c.L.shape[1] == p and np.linalg.matrix_rank(c.L) == c.rank
    assert set(ds.reference) == {"REML", "ML"}
    miss = (~ds.observed).sum(axis=0)
    np.testing.assert_array_equal(miss, ds.truth["n_missing"])
    for ref in ds.reference.values():
        assert ref.fitted.all()
        np.testing.assert_array_equal(ref.n, n - miss)
        assert ref.beta.shape == (v, p) and ref.vcov_beta.shape == (v, p, p)
        for c in ds.contrasts:
            fields = ("estimate", "se", "t", "df", "p") if c.kind == "T" else ("F", "df_num", "df_den", "p")
            assert set(ref.contrasts[c.name]) == set(fields)
        # every dataset has boundary and interior voxels
        assert ref.singular.any() and (~ref.singular).any()
        # the kept fit is the best of the optimisers tried
        best = np.max(np.column_stack(list(ref.llh_by_optimizer.values())), axis=1)
        np.testing.assert_allclose(ref.llh, best, rtol=0, atol=1e-9)


def test_z_sparse_matches_layout(ds):
    Z = ds.z_sparse()
    assert Z.shape == (ds.n, ds.q)
    dense = np.zeros((ds.n, ds.q))
    for off, f in zip(ds.offsets, ds.factors):
        for i in range(ds.n):
            for e in range(f.n_effects):
                dense[i, off + f.codes[i] * f.n_effects + e] = f.Z[i, e]
    np.testing.assert_array_equal(Z.toarray(), dense)


def _psd_root(a):
    w, u = np.linalg.eigh(a)
    return u * np.sqrt(np.clip(w, 0.0, None))


def _llh(ds, ref, j, Z, dense):
    """Log-likelihood at lme4's estimates: n x n algebra if ``dense``, else through q x q."""
    obs = ds.observed[:, j]
    X, y, Zj = ds.X[obs], ds.Y[obs, j], Z[obs]
    n, p = X.shape
    s2 = ref.sigma2[j]
    roots = []
    for f in ds.factors:
        roots += [_psd_root(ref.cov[f.name][j] / s2)] * f.n_levels
    lam = np.zeros((ds.q, ds.q))  # D = lam lam'
    start = 0
    for b in roots:
        k = b.shape[0]
        lam[start:start + k, start:start + k] = b
        start += k
    e = y - X @ ref.beta[j]
    if dense:
        V = np.eye(n) + Zj @ lam @ lam.T @ Zj.T
        logdet = np.linalg.slogdet(V)[1]
        quad = e @ np.linalg.solve(V, e)
        xvx = X.T @ np.linalg.solve(V, X)
    else:  # V^-1 = I - Z lam (I + lam'Z'Z lam)^-1 lam'Z'
        zl = Zj @ lam
        inner = np.eye(ds.q) + zl.T @ zl
        logdet = np.linalg.slogdet(inner)[1]
        ze, zx = zl.T @ e, zl.T @ X
        quad = e @ e - ze @ np.linalg.solve(inner, ze)
        xvx = X.T @ X - zx.T @ np.linalg.solve(inner, zx)
    if ref.method == "ML":
        return -0.5 * (n * np.log(2 * np.pi * s2) + logdet + quad / s2)
    return -0.5 * ((n - p) * np.log(2 * np.pi * s2) + logdet + quad / s2 + np.linalg.slogdet(xvx)[1])


def test_lme4_llh_reproduced(ds):
    Z = ds.z_dense()
    for ref in ds.reference.values():
        for j in range(ds.v):
            llh = _llh(ds, ref, j, Z, dense=j < 2)
            assert abs(llh - ref.llh[j]) < 1e-7 * max(1.0, abs(ref.llh[j])), (ds.name, ref.method, j)


def test_theta_matches_cov(ds):
    for ref in ds.reference.values():
        i = 0
        for f in ds.factors:
            q = f.n_effects
            pos = [(r, c) for c in range(q) for r in range(c, q)]  # column-major lower triangle
            lam = np.zeros((ds.v, q, q))
            for k, (r, c) in enumerate(pos):
                lam[:, r, c] = ref.theta[:, i + k]
            i += len(pos)
            rebuilt = lam @ np.swapaxes(lam, 1, 2) * ref.sigma2[:, None, None]
            np.testing.assert_allclose(rebuilt, ref.cov[f.name], rtol=1e-7, atol=1e-10)
        assert i == ref.theta.shape[1]


def test_t_contrasts_consistent_with_beta(ds):
    for ref in ds.reference.values():
        for c in ds.contrasts:
            r = ref.contrasts[c.name]
            if c.kind == "T":
                np.testing.assert_allclose(r["estimate"], ref.beta @ c.L[0], rtol=1e-8, atol=1e-8)
                se = np.sqrt(np.einsum("i,vij,j->v", c.L[0], ref.vcov_beta, c.L[0]))
                np.testing.assert_allclose(r["se"], se, rtol=1e-6)
                np.testing.assert_allclose(r["t"], r["estimate"] / r["se"], rtol=1e-8)
            else:
                assert np.all(r["df_num"] == c.rank)
                lb = ref.beta @ c.L.T
                cov = np.einsum("ri,vij,sj->vrs", c.L, ref.vcov_beta, c.L)
                F = np.einsum("vr,vr->v", lb, np.linalg.solve(cov, lb[..., None])[..., 0]) / c.rank
                np.testing.assert_allclose(r["F"], F, rtol=1e-6)


def test_build_z_and_level_codes():
    codes, levels = level_codes(np.array(["b", "a", "b", "c", "a"]))
    np.testing.assert_array_equal(codes, [0, 1, 0, 2, 1])
    assert levels == ("b", "a", "c")
    assert first_appearance_codes(["b", "a", "b", "c", "a"])[1] == levels
    Z = build_z([codes, np.array([0, 0, 1, 1, 1])], [np.column_stack([np.ones(5), np.arange(5.0)]), np.ones(5)])
    assert Z.shape == (5, 3 * 2 + 2)
    assert Z[3, 2 * 2 + 1] == 3.0 and Z[3, 4] == 1.0 and Z[3, 6 + 1] == 1.0


# --- the generator ---------------------------------------------------------------------------


def _design(rng):
    return simulate_design(
        rng, 25, 4, fixed=("intercept", "age", "time"),
        factors=(FactorSpec("subject", effects=("intercept", "time")),
                 FactorSpec("site", n_levels=3, assign="subject"),
                 FactorSpec("scanner", n_levels=2, assign="observation", nested_in="site")))


def test_generator_reproducible_and_shapes():
    a, b = _design(np.random.default_rng(5)), _design(np.random.default_rng(5))
    np.testing.assert_array_equal(a.X, b.X)
    assert a.n == 100 and a.p == 3
    assert [f.n_effects for f in a.factors] == [2, 1, 1]
    assert a.q == 25 * 2 + a.factors[1].n_levels + a.factors[2].n_levels
    # nested labels are unique and carry their parent's label
    for lab, par in zip(a.factors[2].labels, a.factors[1].labels):
        assert lab.startswith(par + "_")
    # subjects are nested in site: one site per subject
    sub, site = a.factors[0].codes, a.factors[1].codes
    assert all(len(set(site[sub == s])) == 1 for s in range(25))
    cov = {"subject": covariance([1.0, 0.3], 0.5), "site": covariance([0.5])}
    y1, t1 = simulate_voxels(np.random.default_rng(1), a, 4, [10, 0, 1], cov, 1.0)
    y2, _ = simulate_voxels(np.random.default_rng(1), a, 4, [10, 0, 1], cov, 1.0)
    np.testing.assert_array_equal(y1, y2)
    assert y1.shape == (100, 4) and not np.isnan(y1).any()
    assert t1.random_effects["subject"].shape == (4, 25, 2)
    np.testing.assert_array_equal(t1.random_effects["scanner"], 0.0)
    # Y is exactly X beta + Z b + e: the dense Z with the stacked b recovers the structure
    b = np.concatenate([t1.random_effects[f.name].reshape(4, -1) for f in a.factors], axis=1)
    resid = y1 - a.X @ t1.beta.T - a.z_dense() @ b.T
    assert 0.6 < resid.var() < 1.5
    np.testing.assert_array_equal(a.z_dense(), build_z([f.codes for f in a.factors],
                                                        [f.Z for f in a.factors]).toarray())


def test_generator_recovers_truth_roughly():
    rng = np.random.default_rng(11)
    d = simulate_design(rng, 400, 5, fixed=("intercept", "time"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),))
    g = covariance([1.5, 0.5], 1.0)  # perfectly correlated (singular) covariance
    y, t = simulate_voxels(rng, d, 3, [1000.0, 2.0], {"subject": g}, [0.5, 1.0, 2.0])
    re = t.random_effects["subject"].reshape(-1, 2)
    np.testing.assert_allclose(np.cov(re.T), g, rtol=0.1, atol=0.03)
    # per-subject OLS: residual variance estimates sigma2, slopes' mean estimates beta
    time, sub = d.covariates["time"], d.factors[0].codes
    for j, s2 in enumerate([0.5, 1.0, 2.0]):
        rss, slopes = 0.0, []
        for s in range(400):
            m = sub == s
            A = np.column_stack([np.ones(m.sum()), time[m]])
            coef, res, *_ = np.linalg.lstsq(A, y[m, j], rcond=None)
            rss += res[0]
            slopes.append(coef)
        assert abs(rss / (d.n - 800) - s2) < 0.12 * s2
        np.testing.assert_allclose(np.mean(slopes, axis=0), [1000.0, 2.0], atol=0.25)


def test_missing_mask_as_requested():
    rng = np.random.default_rng(3)
    d = simulate_design(rng, 30, 4, factors=(FactorSpec("subject"),))
    m = missing_mask(rng, d, 4, fraction=[0.0, 0.1, 0.0, 0.25], whole_levels=[0, 0, 2, 1])
    assert m.shape == (120, 4)
    assert m[:, 0].sum() == 0 and m[:, 1].sum() == 12 and m[:, 3].sum() == 30
    codes = d.factors[0].codes
    gone = [s for s in range(30) if m[codes == s, 2].all()]
    assert len(gone) == 2 and m[:, 2].sum() == 8
    assert any(m[codes == s, 3].all() for s in range(30))
    assert not np.array_equal(m[:, 1], m[:, 3])
    y, truth = simulate_voxels(rng, d, 4, [0, 0, 0], {"subject": [[1.0]]}, 1.0, missing=m)
    np.testing.assert_array_equal(np.isnan(y), m)
    np.testing.assert_array_equal(truth.missing, m)
