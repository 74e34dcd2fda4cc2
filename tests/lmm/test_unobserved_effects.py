"""A random effect whose covariate is zero on every observed row of a voxel has no data:
its variance is NaN in ``random/<factor>/cov`` (an lme4 audit found status 0 with an
arbitrary 2.5e-4 there, lme4 0.32 with a singular-Hessian warning), while the fit is that of
the model without it (exact: the same likelihood, fixed effects and other variances)."""

import numpy as np

from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.products import random_design


def _study():
    """12 subjects x 2 sessions x 2 runs; time is the session (0, 1)."""
    rng = np.random.default_rng(5)
    subject = np.repeat(np.arange(12), 4)
    time = np.tile([0.0, 0.0, 1.0, 1.0], 12)
    X = np.column_stack([np.ones(48), rng.normal(size=48)])
    Y = (10 + X[:, 1] * 0.5 + rng.normal(size=12)[subject] + time * rng.normal(size=12)[subject]
         + rng.normal(size=(3, 48)) * 0.7)
    return X, subject, time, Y


def test_an_effect_without_observed_data_gets_nan_and_the_rest_is_the_reduced_fit():
    X, subject, time, Y = _study()
    contrasts = (ContrastDef("x", np.array([[0.0, 1.0]])),)
    both = Model(X, random_design([subject, subject], [np.ones(48), time],
                                  names=["subject", "slope"]), contrasts)
    alone = Model(X, random_design([subject], [np.ones(48)], names=["subject"]), contrasts)
    Y = Y.copy()
    Y[0, time == 1] = np.nan                    # voxel 0: only session 0 observed
    full = analyse_chunk(both, Y, Settings())
    assert np.isnan(full["random/slope/cov"][0]).all()
    assert np.isfinite(full["random/slope/cov"][1:]).all()     # observed: estimated
    assert full["status"][0] <= 2
    reduced = analyse_chunk(alone, Y[:1], Settings())
    for key in ("llh", "beta", "sigma2", "random/subject/cov", "contrasts/x/t",
                "contrasts/x/df"):
        np.testing.assert_allclose(full[key][0], reduced[key][0], rtol=1e-6, err_msg=key)
