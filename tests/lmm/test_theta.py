"""theta <-> D round trips, including singular covariances (lme4's boundary convention)."""

import numpy as np

from mpiblmm.lmm.model import RandomFactor, RandomStructure
from mpiblmm.lmm.theta import D_from_theta, n_theta, theta_from_D


def test_round_trip_regular_and_singular():
    st = RandomStructure((RandomFactor("a", 5, 3), RandomFactor("b", 2, 1)))
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 3, 3))
    D1 = A @ np.swapaxes(A, 1, 2)
    D1[1] = np.outer([1.0, 2.0, -1.0], [1.0, 2.0, -1.0])   # rank one
    D1[2] = 0.0
    D2 = rng.uniform(0, 2, size=(6, 1, 1))
    D2[3] = 0.0
    theta = theta_from_D((D1, D2), st)
    assert theta.shape == (6, n_theta(st)) == (6, 7)
    back = D_from_theta(theta, st)
    np.testing.assert_allclose(back[0], D1, atol=1e-12)
    np.testing.assert_allclose(back[1], D2, atol=1e-12)
    # lme4's layout: lower triangle column by column, diagonal entries non-negative.
    L = np.linalg.cholesky(D1[0])
    np.testing.assert_allclose(theta[0, :6], L[[0, 1, 2, 1, 2, 2], [0, 0, 0, 1, 1, 2]])
    np.testing.assert_allclose(theta[1, :3], [1.0, 2.0, -1.0])
    np.testing.assert_allclose(theta[1, 3:6], 0.0, atol=1e-7)
