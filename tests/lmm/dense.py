"""Dense n-by-n reference algebra for small cases (the independent check of the product forms).

Everything here forms V = I + Z D Z' explicitly; only usable for small n.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import block_diag

from mpiblmm.lmm.products import random_design

#: Random structures of the small exact-algebra cases: (levels, effects) per factor.
CASES = [
    [(12, 1)],
    [(10, 2)],
    [(8, 3)],
    [(9, 1), (4, 1)],
    [(7, 2), (3, 1), (5, 3)],
]


def small_design(rng, n, factors):
    """X (n, 3) and a random design with the given (levels, effects) per factor.

    Every level is observed (the first rows visit each level once); random-effect covariates
    are an intercept and standard normal columns.
    """
    X = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    codes, designs = [], []
    for levels, q in factors:
        codes.append(np.concatenate([np.arange(levels), rng.integers(0, levels, n - levels)]))
        designs.append(np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(q - 1)]))
    rd = random_design(codes, designs)
    return X, rd


def dense_D(structure, Ds):
    """Full (q, q) relative covariance of b from per-factor D_k (q_k, q_k)."""
    return block_diag(*[np.kron(np.eye(f.n_levels), Dk) for f, Dk in zip(structure.factors, Ds)])


def dense_loglik(X, Z, y, beta, s2, D, method):
    """lme4's logLik from the dense normal density (REML: at the given beta)."""
    n, p = X.shape
    V = np.eye(n) + Z @ D @ Z.T
    Vi = np.linalg.inv(V)
    e = y - X @ beta
    _, logdetV = np.linalg.slogdet(V)
    quad = e @ Vi @ e
    if method == "ML":
        return -0.5 * (n * np.log(2 * np.pi * s2) + logdetV + quad / s2)
    _, logdetXVX = np.linalg.slogdet(X.T @ Vi @ X)
    return -0.5 * ((n - p) * np.log(2 * np.pi * s2) + logdetV + logdetXVX + quad / s2)


def dense_gls(X, Z, y, D):
    n = X.shape[0]
    Vi = np.linalg.inv(np.eye(n) + Z @ D @ Z.T)
    return np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
