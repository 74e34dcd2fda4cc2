"""The compiled evaluation of the blocked path (mpiblmm/lmm/blocked/_kernel.c).

- it is built (scripts/setup.sh installs the package, which compiles it);
- its log|V|, c'c, F of equation (1) and Gram matrices of U equal the numpy path's
  (:mod:`~mpiblmm.lmm.blocked.cholesky`, :mod:`~mpiblmm.lmm.blocked.gradient`, themselves
  checked against dense algebra in test_blocked.py) on nested and two-factor designs, with
  complete (shared) and missing (per-voxel) data;
- the deviance, its gradient and the Satterthwaite Jacobian of the whole evaluation agree
  with the numpy path, and the fits reach the same optima;
- a voxel gets the same bits whatever batch or tile it is evaluated in;
- the same equality on random nested chains (hypothesis).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings  # the `test` extra
from hypothesis import strategies as st

from mpiblmm.lmm.blocked import gradient, kernel
from mpiblmm.lmm.blocked.cholesky import factorise, prepare
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.structures.blocked import pattern_of


def _nested(rng):
    """subject in family in site (one effect each), two visits."""
    n_sub = 60
    sub = np.repeat(np.arange(n_sub), 2)
    fam_of = rng.integers(0, 40, n_sub)
    fam_of[:40] = np.arange(40)
    site_of = rng.integers(0, 5, 40)
    site_of[:5] = np.arange(5)
    return [sub, fam_of[sub], site_of[fam_of[sub]]]


def _two(rng):
    """subject in site, two visits: issue 9's design (a) in small."""
    n_sub = 50
    sub = np.repeat(np.arange(n_sub), 2)
    site = rng.integers(0, 6, n_sub)
    site[:6] = np.arange(6)
    return [sub, site[sub]]


def _forms(make, missing, v=45, seed=3):
    rng = np.random.default_rng(seed)
    codes = make(rng)
    n = codes[0].size
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    rd = random_design(codes, [np.ones((n, 1))] * len(codes))
    Y = X @ rng.normal(size=(3, v)) + rng.normal(size=(n, v))
    for k, c in enumerate(codes):
        Y += rng.normal(size=(c.max() + 1, v))[c] * (k + 1) / 2
    obs = rng.random(Y.shape) > 0.1 if missing else None
    pf = product_forms(X, rd, Y, observed=obs)
    pattern = pattern_of(rd)
    assert kernel.applies(pattern) and pf.shared == (not missing)
    theta = np.abs(rng.normal(size=(v, pattern.K))) * 1.5
    theta[0] = 0.0                      # every factor on the boundary
    theta[1, 0] = 0.0
    return pattern, prepare(pattern, pf), theta, prepare(pattern, pf, for_kernel=False)


def _numpy_F(pattern, prep, fac, v):
    """F of equation (1) by the numpy path, (v, K)."""
    sig = gradient.selected_inverse(pattern, fac, v)
    F = gradient.logdet_gradient(pattern, prep, fac.lam, sig, v)
    return np.stack([f[0, 0] for f in F], axis=1)


def test_the_kernel_is_built():
    assert kernel.available(), "mpiblmm/lmm/blocked/_kernel.c was not built: run scripts/setup.sh"


def test_a_library_of_another_version_is_refused(monkeypatch):
    # a build older than the Python code (git pull without scripts/setup.sh) would be called
    # with the wrong arguments: it is not used, and `mpiblmm env` says why
    monkeypatch.setattr(kernel, "ABI", kernel.ABI + 1)
    assert kernel._load() == (None, 0, "built from older sources")


@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
@pytest.mark.parametrize("make", [_nested, _two], ids=["nested", "two"])
def test_kernel_equals_the_numpy_path(make, missing):
    pattern, prep, theta, prep_np = _forms(make, missing)
    v, r = theta.shape[0], prep.pf.p + 1
    res = kernel.evaluate(pattern, prep, theta, gradient=True)
    prep = prep_np
    fac = factorise(pattern, prep, theta)
    np.testing.assert_allclose(res.logdet, fac.logdet, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(res.G, fac.G, rtol=1e-12, atol=1e-12 * np.abs(fac.G).max())
    F = _numpy_F(pattern, prep, fac, v)
    np.testing.assert_allclose(res.F, F, rtol=1e-12, atol=1e-12 * np.abs(F).max())
    U = gradient.back_substitute(pattern, fac, r, v)
    for a, g in enumerate(gradient.level_grams(pattern, U, r)):
        g = np.moveaxis(g[0, :, 0], -1, 0)                                    # (v, r, r)
        np.testing.assert_allclose(res.gram[:, a], g, rtol=1e-12,
                                   atol=1e-12 * np.abs(g).max())


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_evaluation_and_fit_equal_the_numpy_path(method, monkeypatch):
    pattern, prep, theta, prep_np = _forms(_nested, True, v=20)
    fast = gradient.evaluate(pattern, prep, theta, method, jacobian=True)
    res_fast = fit(prep_np.pf, method=method)
    monkeypatch.setattr(kernel, "_EVAL", None)
    assert not kernel.applies(pattern)
    slow = gradient.evaluate(pattern, prep_np, theta, method, jacobian=True)
    res_slow = fit(prep_np.pf, method=method)
    for key in ("f", "ld", "Q"):
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-12)
    scale = np.abs(slow["g"]).max(axis=1, keepdims=True) + 1.0
    np.testing.assert_allclose(fast["g"] / scale, slow["g"] / scale, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fast["dXtViX"], slow["dXtViX"], rtol=1e-10,
                               atol=1e-12 * np.abs(slow["dXtViX"]).max())
    np.testing.assert_allclose(res_fast.llh, res_slow.llh, rtol=0, atol=1e-7)


@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
def test_a_voxel_gets_the_same_bits_in_any_batch_or_tile(missing):
    pattern, prep, theta, _ = _forms(_nested, missing, v=61)      # tiles of 32, 16, 8 and 5
    whole = kernel.evaluate(pattern, prep, theta, gradient=True)
    for idx in (np.arange(61)[::-1], np.array([60]), np.arange(3, 40), np.arange(7)):
        part = kernel.evaluate(pattern, prep.take(idx), theta[idx], gradient=True)
        for name in ("logdet", "G", "F", "gram"):
            assert np.array_equal(getattr(part, name), getattr(whole, name)[idx]), name


FUZZ = settings(max_examples=40, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nested_chains(draw):
    """A random nested chain of 2-3 one-effect factors (1-4 observations per finest level,
    1-5 children per parent), random data, some voxels with missing rows, theta anywhere
    from 0 to 3."""
    n_fine = draw(st.integers(3, 40))
    sizes = [n_fine]
    for _ in range(draw(st.integers(1, 2))):
        sizes.append(max(1, sizes[-1] // draw(st.integers(1, 5))))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    parents = [rng.integers(0, sizes[k + 1], sizes[k]) for k in range(len(sizes) - 1)]
    for k, par in enumerate(parents):           # every parent level has a child
        par[:sizes[k + 1]] = rng.permutation(sizes[k + 1])[:min(sizes[k], sizes[k + 1])]
    fine = np.repeat(np.arange(n_fine), rng.integers(1, 5, n_fine))
    codes = [fine]
    for par in parents:
        codes.append(par[codes[-1]])
    codes = [np.unique(c, return_inverse=True)[1] for c in codes]
    missing = draw(st.booleans())
    v = draw(st.integers(1, 40))
    return codes, missing, v, seed


@FUZZ
@given(nested_chains())
def test_kernel_equals_the_numpy_path_on_random_nested_chains(case):
    codes, missing, v, seed = case
    rng = np.random.default_rng(seed + 1)
    n = codes[0].size
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    rd = random_design(codes, [np.ones((n, 1))] * len(codes))
    Y = rng.normal(size=(n, v)) + sum(rng.normal(size=(c.max() + 1, v))[c] for c in codes)
    obs = rng.random(Y.shape) > 0.15 if missing else None
    if obs is not None:
        obs[:3] = True                          # enough rows for the fixed effects
    pf = product_forms(X, rd, Y, observed=obs, layout="blocked")
    pattern = pf.blocks
    assume(kernel.applies(pattern))
    theta = rng.uniform(0, 3, size=(v, pattern.K)) * (rng.random((v, pattern.K)) > 0.2)
    res = kernel.evaluate(pattern, prepare(pattern, pf), theta, gradient=True)
    prep = prepare(pattern, pf, for_kernel=False)
    fac = factorise(pattern, prep, theta)
    np.testing.assert_allclose(res.logdet, fac.logdet, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(res.G, fac.G, rtol=1e-10, atol=1e-11 * np.abs(fac.G).max())
    F = _numpy_F(pattern, prep, fac, v)
    np.testing.assert_allclose(res.F, F, rtol=1e-10, atol=1e-11 * (np.abs(F).max() + 1))
