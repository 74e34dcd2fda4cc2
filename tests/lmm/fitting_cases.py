"""Small simulated LMM problems shared by the estimator tests, and a brute-force optimum."""

import numpy as np
import scipy.optimize as so

from mpiblmm.lmm.likelihood import profiled_loglik
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.theta import lambdas_from_theta, n_theta, tril_indices


def simulate(seed, n_sub=20, visits=4, q=2, v=12, crossed=False, missing=0.0):
    """Subjects x visits with a random intercept (+ slope, + a covariate for q=3) per subject,
    optionally a crossed site intercept; a quarter of the voxels have no random effects.
    Product forms in the dense layout for two factors: these cases exercise Fisher Scoring
    and the polish, the engines of that layout (the blocked one has tests/lmm/test_blocked.py
    and the lme4 reference tests)."""
    rng = np.random.default_rng(seed)
    n = n_sub * visits
    sub = np.repeat(np.arange(n_sub), visits)
    t = np.tile(np.arange(visits), n_sub).astype(float)
    X = np.column_stack([np.ones(n), rng.normal(size=n), t])
    cols = [np.ones(n), t, rng.normal(size=n)][:q]
    codes, designs = [sub], [np.column_stack(cols)]
    if crossed:
        site = rng.integers(0, 5, n)
        site[:5] = np.arange(5)
        codes.append(site)
        designs.append(np.ones((n, 1)))
    rd = random_design(codes, designs)
    Z = rd.sparse().toarray()
    sd = rng.uniform(0, 1.5, size=(v, rd.structure.q))
    sd[: v // 4] = 0.0
    Y = 100 + X @ rng.normal(size=(3, v)) + Z @ (rng.normal(size=(rd.structure.q, v)) * sd.T)
    Y = Y + rng.normal(size=(n, v))
    if missing:
        Y[rng.random((n, v)) < missing] = np.nan
    return X, rd, Y, product_forms(X, rd, Y, layout="dense")


def brute_optimum(pf, method, starts=()):
    """Best profiled log-likelihood per voxel by bounded L-BFGS-B + Nelder-Mead (slow)."""
    st = pf.structure
    lower = []
    for f in st.factors:
        rows, cols = tril_indices(f.n_effects)
        lower += [0.0 if a == b else None for a, b in zip(rows, cols)]
    bounds = [(lo, None) for lo in lower]
    out = np.empty(pf.n_voxels)
    for i in range(pf.n_voxels):
        one = pf.take(np.array([i]))

        def neg(th, one=one):
            th = np.array([max(x, lo) if lo is not None else x for x, lo in zip(th, lower)])
            return -profiled_loglik(one, lambdas_from_theta(th[None], st), method)[0][0]

        best = np.inf
        inits = [np.where([lo is not None for lo in lower], 0.5, 0.0)] + [s[i] for s in starts]
        for x0 in inits:
            r = so.minimize(neg, x0, method="L-BFGS-B", bounds=bounds,
                            options=dict(ftol=1e-15, gtol=1e-10, maxiter=500))
            r2 = so.minimize(neg, r.x, method="Nelder-Mead",
                             options=dict(xatol=1e-9, fatol=1e-12, maxiter=4000))
            best = min(best, r.fun, r2.fun)
        out[i] = -best
    assert n_theta(st) > 0
    return out
