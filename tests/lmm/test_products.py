"""Product forms against dense products over each voxel's observed rows."""

import numpy as np
import pytest

from mpiblmm.lmm.products import full_rank, product_forms, random_design


def _setup(rng, n, factors):
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    codes = [rng.integers(0, l, n) for l, _ in factors]
    for c, (l, _) in zip(codes, factors):
        c[:l] = np.arange(l)
    designs = [np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(q - 1)])
               for _, q in factors]
    rd = random_design(codes, designs, names=[f"f{k}" for k in range(len(factors))])
    return X, rd, rd.sparse().toarray()


@pytest.mark.parametrize("factors", [[(6, 2)], [(5, 1), (3, 2)]])
def test_products_equal_dense_sums(factors):
    rng = np.random.default_rng(11)
    n, v = 40, 5
    X, rd, Z = _setup(rng, n, factors)
    Y = rng.normal(size=(n, v)).astype(np.float32)
    Y[rng.random((n, v)) < 0.2] = np.nan
    pf = product_forms(X, rd, Y, centre=False, layout="dense")
    for vox in range(v):
        o = np.isfinite(Y[:, vox])
        Xo, Zo, yo = X[o], Z[o], Y[o, vox].astype(np.float64)
        np.testing.assert_allclose(pf.XtX[vox], Xo.T @ Xo, atol=1e-12)
        np.testing.assert_allclose(pf.XtY[vox], Xo.T @ yo, atol=1e-10)
        np.testing.assert_allclose(pf.YtY[vox], yo @ yo, rtol=1e-12)
        np.testing.assert_allclose(pf.ZtX[vox], Zo.T @ Xo, atol=1e-12)
        np.testing.assert_allclose(pf.ZtY[vox], Zo.T @ yo, atol=1e-10)
        ZZ = Zo.T @ Zo
        if rd.structure.is_single_factor:
            q1 = rd.structure.factors[0].n_effects
            for j in range(rd.structure.factors[0].n_levels):
                np.testing.assert_allclose(pf.ZtZ[vox, j], ZZ[j * q1:(j + 1) * q1, j * q1:(j + 1) * q1])
        else:
            np.testing.assert_allclose(pf.ZtZ[vox], ZZ, atol=1e-12)
        assert pf.n[vox] == o.sum()


def test_complete_voxels_share_and_centring_keeps_digits():
    rng = np.random.default_rng(5)
    n = 50
    X, rd, Z = _setup(rng, n, [(5, 2)])
    noise = rng.normal(size=(n, 3))
    Y = 1e6 + noise
    pf = product_forms(X, rd, Y, layout="dense")
    assert pf.XtX.shape[0] == 1 and pf.ZtZ.shape[0] == 1 and pf.ZtX.shape[0] == 1
    # After centring, Y'Y is the OLS residual sum of squares of the noise (mean is in X).
    for vox in range(3):
        resid = noise[:, vox] - X @ np.linalg.lstsq(X, noise[:, vox], rcond=None)[0]
        np.testing.assert_allclose(pf.YtY[vox], resid @ resid, rtol=1e-8)
        np.testing.assert_allclose(pf.XtY[vox], 0.0, atol=1e-6)
        np.testing.assert_allclose(pf.y_offset[vox],
                                   np.linalg.lstsq(X, Y[:, vox], rcond=None)[0], rtol=1e-7)


def test_full_rank_flags_voxels_whose_observed_rows_lose_a_column():
    rng = np.random.default_rng(2)
    n = 30
    X = np.column_stack([np.ones(n), (np.arange(n) < 5).astype(float)])
    rd = random_design([np.arange(n) % 3], [np.ones((n, 1))])
    Y = rng.normal(size=(n, 2))
    Y[:5, 1] = np.nan  # voxel 1 never sees the indicator column
    pf = product_forms(X, rd, Y, layout="dense")
    np.testing.assert_array_equal(full_rank(pf.XtX), [True, False])


def test_full_rank_does_not_depend_on_the_units_of_the_columns():
    """Head size in mm^3 next to the intercept (X'X eigenvalues ~1e-14 apart) is full rank;
    the same column collinear with the intercept is not, in any units."""
    rng = np.random.default_rng(3)
    n = 40
    icv = rng.normal(1.5e6, 1.2e5, n)
    X = np.column_stack([np.ones(n), icv, (50 + 10 * rng.normal(size=n)) ** 3])
    assert np.linalg.eigvalsh(X.T @ X)[0] < 1e-10 * np.linalg.eigvalsh(X.T @ X)[-1]
    for scale in (1.0, 1e-6, 1e6):
        Xs = X * np.array([1.0, scale, scale])
        assert full_rank(Xs.T @ Xs)
    dep = np.column_stack([np.ones(n), np.full(n, 1.5e6), icv])        # column 1 = 1.5e6 x column 0
    assert not full_rank(dep.T @ dep)
    zero = np.column_stack([np.ones(n), np.zeros(n)])
    assert not full_rank(zero.T @ zero)


@pytest.mark.parametrize("factors", [[(60, 2)], [(300, 1), (20, 1)]], ids=["one", "blocked"])
def test_a_voxel_alone_gets_the_bits_it_gets_among_others(factors):
    """The product forms of a voxel with missing data formed alone (a chunk's missing-data
    group of one voxel) equal, to the bit, those formed with other voxels: the same bits at
    any rank count (numpy's einsum reduces a single column by another loop; n large enough
    for its partial sums to matter)."""
    rng = np.random.default_rng(12)
    n, v = 3000, 9
    X, rd, _ = _setup(rng, n, factors)
    Y = rng.normal(size=(n, v)) * 100 + 1000
    Y[rng.random((n, v)) < 0.1] = np.nan
    together = product_forms(X, rd, Y)
    assert not together.shared
    for vox in (0, 4, 8):
        alone = product_forms(X, rd, Y[:, [vox]])
        ref = together.take(np.array([vox]))
        for key in ("XtX", "XtY", "YtY", "ZtX", "ZtY", "ZtZ", "n", "y_offset"):
            np.testing.assert_array_equal(getattr(alone, key), getattr(ref, key), err_msg=key)
