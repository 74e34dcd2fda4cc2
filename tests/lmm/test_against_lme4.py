"""Every voxel of every reference dataset against lme4 (REML and ML).

The reference values were made by lme4 + lmerTest (best of several optimiser runs), see
``tests/reference/README.md`` and ``scripts/make_reference.R``.  Tolerances (issue 3):

- log-likelihood at least lme4's minus 1e-6 at every voxel, boundary fits included;
- beta, sigma^2 and the random-effect covariances within 1e-4 relative where lme4's fit is
  not singular (and lme4 reached the optimum: where our log-likelihood is higher by more than
  1e-6, lme4 stopped short and its parameters are not the reference);
- our singular flag (status 2) agrees with lme4's ``isSingular`` where both optima agree.
"""

import numpy as np
import pytest

from mpiblmm.lmm.effect_scale import effect_scales, scaled_design, unscale
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.model import STATUS_SINGULAR
from mpiblmm.lmm.products import product_forms, random_design
from tests.refdata import list_datasets, load_dataset

LLH_TOL = 1e-6
REL_TOL = 1e-4


def _fit(name, method):
    """The estimator as a chunk's analysis runs it: random-effect covariates far from unit
    size (``days``) scaled for the fit and the results brought back (``effect_scale``)."""
    ds = load_dataset(name)
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors],
                       [f.name for f in ds.factors])
    scales = effect_scales(rd)
    if scales is None:
        return ds, fit(product_forms(ds.X, rd, ds.Y), method)
    res = fit(product_forms(ds.X, scaled_design(rd, scales), ds.Y), method)
    return ds, unscale(res, scales, rd.structure)


def _rel(a, b, scale):
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.abs(a - b) / scale
    return np.where(scale > 0, out, np.abs(a - b))


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("name", list_datasets())
def test_matches_lme4(name, method):
    ds, res = _fit(name, method)
    ref = ds.reference[method]
    fitted = ref.fitted
    assert (res.status[fitted] <= STATUS_SINGULAR).all()
    diff = res.llh[fitted] - ref.llh[fitted]
    assert diff.min() >= -LLH_TOL, f"worst llh difference {diff.min():.3g}"
    same = fitted & (res.llh - ref.llh <= LLH_TOL)
    regular = same & ~ref.singular
    # beta: relative to the largest coefficient of the voxel where a coefficient is ~0
    scale = np.maximum(np.abs(ref.beta), 1e-3 * np.abs(ref.beta).max(axis=1, keepdims=True))
    assert _rel(res.beta, ref.beta, scale)[regular].max() < REL_TOL
    assert _rel(res.s2, ref.sigma2, ref.sigma2)[regular].max() < REL_TOL
    for k, f in enumerate(ds.factors):
        cref = ref.cov[f.name]
        scale = np.abs(cref).max(axis=(1, 2))[:, None, None]
        assert _rel(res.cov[k], cref, scale)[regular].max() < REL_TOL, f.name
    np.testing.assert_array_equal(res.status[same] == STATUS_SINGULAR, ref.singular[same])


def test_days_needs_the_scaling():
    """Without scaling, the slope in days puts D's entries ~1e6 apart: the fit stops short of
    lme4's optimum at some voxel (it did: status 1, logLik 3.2 below), with it every voxel
    reaches it (test above); the scaling leaves designs near unit size alone."""
    ds = load_dataset("days")
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    assert list(effect_scales(rd)) == [1.0, 512.0]
    plain = fit(product_forms(ds.X, rd, ds.Y), "REML")
    assert (plain.llh - ds.reference["REML"].llh).min() < -1e-3
    slope = load_dataset("slope")
    assert effect_scales(random_design([f.codes for f in slope.factors],
                                       [f.Z for f in slope.factors])) is None
