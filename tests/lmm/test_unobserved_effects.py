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


def _families(seed: int = 8, visits: int = 3):
    """24 subjects x 3 visits in 16 families (8 of two siblings, 8 of one), time 0, 1, 2 ...;
    Y (3, n): at voxel 0 every second sibling is missing, so each family holds one subject
    there and family and subject group its rows alike."""
    rng = np.random.default_rng(seed)
    family_of = np.repeat(np.arange(14), 2)[:24]            # 12 families of 2, 2 ... of 2
    family_of[20:] = np.arange(12, 16)                      # ... and 4 families of one
    subject = np.repeat(np.arange(24), visits)
    family = family_of[subject]
    time = np.tile(np.arange(visits, dtype=float), 24)
    n = subject.size
    X = np.column_stack([np.ones(n), time])
    Y = (5 + 0.3 * time + rng.normal(size=24)[subject] + rng.normal(size=16)[family]
         + 0.4 * time * rng.normal(size=24)[subject] + rng.normal(size=(3, n)) * 0.5)
    second = np.isin(subject, [s for s in range(20) if s % 2 == 1])   # a family's 2nd sibling
    Y[0, second] = np.nan
    return X, subject, family, time, Y


def test_factors_that_group_a_voxels_rows_alike_get_nan_for_the_shared_variance():
    """Only the sum of the family and subject intercept variances is identified at voxel 0
    (a cohort audit: mpiblmm's split was its start's, lme4's another; the logLik, fixed
    effects and tests agree).  Both variances are NaN there; the subject's slope variance
    and every other voxel are estimated; the voxel is fitted without the family, to the bit
    the model without it (the same likelihood and tests, in a regular fit's iterations:
    with both, the split's flat valley took the audit's voxel 250-300)."""
    X, subject, family, time, Y = _families()
    n = subject.size
    contrasts = (ContrastDef("time", np.array([[0.0, 1.0]])),)
    both = Model(X, random_design([subject, family], [np.column_stack([np.ones(n), time]),
                                                      np.ones(n)],
                                  names=["subject", "family"]), contrasts)
    out = analyse_chunk(both, Y, Settings())
    assert (out["status"] <= 2).all()
    assert np.isnan(out["random/family/cov"][0, 0, 0])
    assert np.isnan(out["random/subject/cov"][0, 0, 0])
    assert np.isfinite(out["random/subject/cov"][0, 1, 1])                 # the slope's
    assert np.isfinite(out["random/subject/cov"][1:]).all()
    assert np.isfinite(out["random/family/cov"][1:]).all()
    alone = Model(X, random_design([subject], [np.column_stack([np.ones(n), time])],
                                   names=["subject"]), contrasts)
    reduced = analyse_chunk(alone, Y[:1], Settings())
    for key in ("llh", "beta", "sigma2", "iterations", "status", "cov_beta",
                "contrasts/time/t", "contrasts/time/df", "contrasts/time/p"):
        np.testing.assert_array_equal(out[key][0], reduced[key][0], err_msg=key)
    np.testing.assert_array_equal(out["random/subject/cov"][0, 1], reduced["random/subject/cov"][0, 1])
    # the other voxels are those of a chunk without voxel 0, to the bit
    rest = analyse_chunk(both, Y[1:], Settings())
    for key, values in rest.items():
        np.testing.assert_array_equal(out[key][1:], values, err_msg=key)


def test_a_factor_whose_every_effect_another_has_leaves_that_block_nan():
    """``(1 + time | subject) + (1 + time | family)`` where each family holds one subject:
    the two covariances are one (only their sum is identified); both blocks are NaN at that
    voxel, its logLik and tests are the one-factor model's; and the chunk's other voxels
    keep both factors."""
    X, subject, family, time, Y = _families(3)
    n = subject.size
    Z = np.column_stack([np.ones(n), time])
    contrasts = (ContrastDef("time", np.array([[0.0, 1.0]])),)
    both = Model(X, random_design([subject, family], [Z, Z], names=["subject", "family"]),
                 contrasts)
    out = analyse_chunk(both, Y, Settings(method="ML"))
    assert np.isnan(out["random/subject/cov"][0]).all()
    assert np.isnan(out["random/family/cov"][0]).all()
    alone = Model(X, random_design([subject], [Z], names=["subject"]), contrasts)
    reduced = analyse_chunk(alone, Y[:1], Settings(method="ML"))
    for key in ("llh", "beta", "sigma2", "contrasts/time/t", "contrasts/time/df"):
        np.testing.assert_array_equal(out[key][0], reduced[key][0], err_msg=key)
    assert np.isfinite(out["llh"][1:]).all()
    assert np.isfinite(np.diagonal(out["random/family/cov"][1:], axis1=1, axis2=2)).all()


def test_a_factor_sharing_only_some_effects_is_kept():
    """``(1 + time | subject) + (1 | family) + (0 + x | family)``-like: the family's second
    effect (a covariate the subject has not) keeps it in the model; only the shared
    intercept's variances are NaN."""
    X, subject, family, time, Y = _families(4, visits=6)
    n = subject.size
    x = np.random.default_rng(1).normal(size=n)
    contrasts = (ContrastDef("time", np.array([[0.0, 1.0]])),)
    model = Model(X, random_design([subject, family],
                                   [np.column_stack([np.ones(n), time]),
                                    np.column_stack([np.ones(n), x])],
                                   names=["subject", "family"]), contrasts)
    out = analyse_chunk(model, Y, Settings())
    assert (out["status"] <= 2).all()
    fam, sub = out["random/family/cov"][0], out["random/subject/cov"][0]
    assert np.isnan(fam[0, 0]) and np.isnan(sub[0, 0])
    assert np.isfinite([fam[1, 1], fam[0, 1], sub[1, 1], sub[0, 1]]).all()
