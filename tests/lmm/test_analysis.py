"""A chunk's analysis: voxel selection, product-form groups, and the same bits in any chunk."""

import numpy as np
import pytest

from mpiblmm.lmm.analysis import (JOINT_LEVEL_VALUES_UP_TO, ContrastDef, Model, Settings,
                                  analyse_chunk, fit_groups, joint_forms, product_form_groups)
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.satterthwaite import satterthwaite_setup
from mpiblmm.lmm.model import (STATUS_CONSTANT, STATUS_EMPTY, STATUS_NUMERICAL,
                               STATUS_TOO_FEW, STATUS_UNIDENTIFIABLE)
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.simulate import FactorSpec, covariance, simulate_design, simulate_voxels


def _model_and_data(seed=0, v=40, crossed=False):
    rng = np.random.default_rng(seed)
    factors = (FactorSpec("subject", ("intercept", "time")),)
    covs = {"subject": covariance([2.0, 0.5], 0.2)}
    if crossed:                          # a second factor crossed with subject: the dense path
        factors += (FactorSpec("site", ("intercept",), n_levels=5),)
        covs["site"] = covariance([1.0])
    d = simulate_design(rng, 25, 4, factors=factors)
    Y, _ = simulate_voxels(rng, d, v, [100.0, 1.0, 0.5], covs, 1.0)
    contrasts = (ContrastDef("time", np.array([[0.0, 0.0, 1.0]])),
                 ContrastDef("both", np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "F"))
    rd = random_design([f.codes for f in d.factors], [f.Z for f in d.factors])
    return Model(d.X, rd, contrasts), Y.T.copy()


def test_groups_are_the_complete_voxels_and_the_rest():
    rng = np.random.default_rng(1)
    observed = np.ones((50, 20), dtype=bool)
    observed[10:30, :5] = False          # 20 voxels share one pattern: still on their own
    observed[30:, :] = rng.random((20, 20)) > 0.2
    fit = np.ones(50, dtype=bool)
    fit[-1] = False
    groups = list(product_form_groups(observed, fit))
    complete = np.flatnonzero(observed.all(axis=1) & fit)
    assert len(groups) == 2 and np.array_equal(groups[0], complete)
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(49))


@pytest.mark.parametrize("crossed", [False, True], ids=["one factor", "crossed factors"])
def test_a_voxel_gets_the_same_bits_whatever_chunk_it_is_in(crossed):
    """What makes results identical at any rank count: every split of a chunk, down to
    single voxels, gives bit-for-bit the results of the whole chunk (iterations included)."""
    model, Y = _model_and_data(seed=2, v=60, crossed=crossed)
    rng = np.random.default_rng(3)
    Y[rng.random(Y.shape) < 0.04] = np.nan             # most voxels miss a few observations
    Y[:12, :8] = np.nan                                 # 12 share a pattern
    whole = analyse_chunk(model, Y, Settings())
    assert whole["status"].max() <= 2 and (~np.isfinite(Y)).any(axis=1).sum() > 30
    for cuts in ([0, 30, 60], [0, 1, 2, 3, 17, 40, 59, 60], [0, 7, 12, 13, 60]):
        parts = [analyse_chunk(model, Y[a:b], Settings()) for a, b in zip(cuts[:-1], cuts[1:])]
        for key, value in whole.items():
            joined = np.concatenate([part[key] for part in parts])
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} with cuts {cuts}")


def test_one_factor_gives_the_same_bits_with_shared_or_per_voxel_product_forms():
    """What lets a small chunk fit its complete and missing-data voxels as one group
    (``analysis.joint_forms``): a voxel's fit and Satterthwaite setup do not depend on
    whether its Z'X, Z'Z and X'X are shared or its own."""
    model, Y = _model_and_data(seed=4, v=30)
    Y[:10] *= 1e-3                                     # some voxels fit at the boundary
    pf = product_forms(model.X, model.rd, Y.T, np.isfinite(Y.T))
    own = joint_forms([pf])
    assert pf.shared and not own.shared and own.ZtX.shape[0] == 30
    a, b = fit(pf), fit(own)
    assert (a.status == 2).any() and (a.status == 0).any()
    for key in ("beta", "s2", "llh", "iterations", "status"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    np.testing.assert_array_equal(a.extras["theta"], b.extras["theta"])
    pa = satterthwaite_setup(pf, a.s2, a.D, "REML", fitted=a.fitted)
    pb = satterthwaite_setup(own, b.s2, b.D, "REML", fitted=b.fitted)
    for key in ("cov_beta", "jacobian", "vcov_varpar"):
        np.testing.assert_array_equal(getattr(pa, key), getattr(pb, key), err_msg=key)


@pytest.mark.parametrize("subjects, joined", [(25, True), (600, False)])
def test_a_small_chunk_joins_its_groups_only_while_the_shared_forms_are_small(subjects, joined):
    """Joined, every complete voxel reads its own copy of Z'Z and Z'X in every evaluation:
    worth it at 25 levels (one fit's fixed cost saved), not at 600 (2 x 2 Z'Z and 2 x 3 Z'X
    per level: 6,000 values, past :data:`JOINT_LEVEL_VALUES_UP_TO`), where the complete
    voxels keep their shared forms."""
    rng = np.random.default_rng(3)
    d = simulate_design(rng, subjects, 4, factors=(FactorSpec("subject", ("intercept", "time")),))
    Y, _ = simulate_voxels(rng, d, 20, [100.0, 1.0, 0.5], {"subject": covariance([2.0, 0.5], 0.2)},
                           1.0)
    Y = Y.T.copy()
    Y[10:, 0] = np.nan                                   # 10 complete voxels, 10 with a hole
    rd = random_design([f.codes for f in d.factors], [f.Z for f in d.factors])
    obs = np.isfinite(Y)
    parts = [(product_forms(d.X, rd, Y[g].T, obs[g].T), g)
             for g in product_form_groups(obs, np.ones(20, dtype=bool))]
    assert len(parts) == 2 and parts[0][0].shared
    groups = fit_groups(parts)
    values = 10 * subjects                              # 4 + 6 values per level
    assert (values <= JOINT_LEVEL_VALUES_UP_TO) == joined
    assert len(groups) == (1 if joined else 2)
    if joined:
        assert not groups[0][0].shared and list(groups[0][1]) == list(range(20))


def test_voxels_that_cannot_be_fitted_say_why():
    model, Y = _model_and_data(v=5)
    Y[0] = np.nan                        # no observations
    Y[1, 3:] = np.nan                    # 3 observations, p = 3
    Y[2, model.X[:, 2] != 0] = np.nan    # only time == 0 rows: X loses a column (lme4 drops
    out = analyse_chunk(model, Y, Settings(min_n=10))   # it), but the slope on time is lost
    assert list(out["status"][:3]) == [STATUS_EMPTY, STATUS_TOO_FEW, STATUS_UNIDENTIFIABLE]
    assert out["status"][3] <= 2 and out["status"][4] <= 2
    for key, value in out.items():
        if value.dtype.kind == "f":
            assert np.isnan(value[:3]).all(), key
            assert np.isfinite(value[3:]).all(), key
    np.testing.assert_array_equal(out["n"][:2], [0, 3])


def test_min_fraction_keeps_the_voxels_at_exactly_that_fraction():
    """0.55 of n = 100 is 55 observations ("at least the fraction F of all n"); in floating
    point 0.55 * 100 is 55.00000000000001 and the voxels with exactly 55 got status 3 (a
    degenerate-voxel audit, at 0.55 and 0.545 of 200)."""
    model, Y = _model_and_data(v=3)
    n = Y.shape[1]
    assert n == 100 and 0.55 * n > 55
    Y[0, 55:] = np.nan                     # exactly 55%
    Y[1, 54:] = np.nan                     # one fewer
    out = analyse_chunk(model, Y, Settings(min_fraction=0.55))
    assert out["status"][0] <= 2 and out["status"][1] == STATUS_TOO_FEW
    assert out["status"][2] <= 2


def test_no_voxel_batched_einsum_takes_the_optimised_path():
    """``np.einsum(..., optimize=True)`` hands pairwise contractions to BLAS, whose rounding
    depends on the kernel OpenBLAS picks and on the number of voxels (it broke the test above
    on AVX-512 machines only, with OpenBLAS's SkylakeX kernel).  The bitwise test cannot see
    it on other machines, so the numerical core is scanned for it."""
    from pathlib import Path

    import mpiblmm.lmm as lmm
    offenders = [f"{path.name}:{no}" for path in Path(lmm.__file__).parent.rglob("*.py")
                 for no, line in enumerate(path.read_text().splitlines(), 1)
                 if "optimize=True" in line and "einsum" in line and not line.lstrip().startswith("#")]
    assert not offenders, f"einsum(optimize=True) in the voxel-batched core: {offenders}"


def test_constant_voxels_are_not_fitted_and_say_so():
    """Issue 11: 128 voxels whose float32 data are constant (but not zero) were 'converged'
    with p-values from rounding noise (34 of 128 had p < 0.05).  They must get status 7 and
    NaN statistics, whether complete or with missing observations; data that vary only by a
    few units in the last float32 digit are as constant as float32 can tell."""
    model, Y = _model_and_data(seed=4, v=140)
    rng = np.random.default_rng(5)
    level = rng.uniform(-3000.0, 3000.0, 128).astype(np.float32)
    Y[:128] = level[:, None]
    Y[64:96, :5] = np.nan                               # constant with missing observations
    Y[96:128] = (Y[96:128] + model.X[:, 1] * 0.25).astype(np.float32)  # constant after X
    Y = Y.astype(np.float32)
    out = analyse_chunk(model, Y, Settings())
    assert (out["status"][:128] == STATUS_CONSTANT).all(), np.bincount(out["status"][:128])
    for key, value in out.items():
        if value.dtype.kind == "f":
            assert np.isnan(value[:128]).all(), key
    assert (out["status"][128:] <= 2).all()
    np.testing.assert_array_equal(out["n"][64:96], Y.shape[1] - 5)


def test_almost_constant_data_are_still_fitted():
    """The threshold is rounding, not small variance: noise 1e-5 of the data's size is fitted."""
    model, Y = _model_and_data(seed=6, v=6)
    Y = 1000.0 + 1e-2 * (Y - Y.mean(axis=1, keepdims=True))
    out = analyse_chunk(model, Y, Settings())
    assert (out["status"] <= 2).all()


def test_constant_voxels_are_found_whatever_the_covariates_units():
    """A scale audit: with head size in mm^3 (~1.5e6) in X, the OLS offset that centres the
    data dropped the intercept's direction (eigenvalues of the unscaled X'X below 1e-12 of
    the largest), so constant voxels and voxels fitted exactly by X were fitted (status 2,
    sigma2 1e-14), while the same covariate in litres gave status 7."""
    model, Y = _model_and_data(seed=8, v=5)
    rng = np.random.default_rng(9)
    subject = model.rd.cols[:, 0] // 2                    # each row's subject (q = 2)
    icv = np.round(1.5e6 + 1.5e5 * rng.standard_normal(subject.max() + 1), 1)[subject]
    Y[0] = 100.0                                          # constant
    Y[1] = 3.0 + 0.5 * model.X[:, 1]                      # fitted exactly by X
    Y[2] = 1e4 + 0.5 * model.X[:, 1] + 1e-4 * icv         # exactly, through icv too
    for unit in (1.0, 1e-6, 1e-9):                        # mm^3, litres, m^3
        X = np.column_stack([model.X, icv * unit])
        L = np.zeros((1, 4))
        L[0, 2] = 1.0
        out = analyse_chunk(Model(X, model.rd, (ContrastDef("time", L),)), Y, Settings())
        np.testing.assert_array_equal(out["status"][:3], STATUS_CONSTANT, err_msg=str(unit))
        assert (out["status"][3:] <= 2).all()


def test_float64_data_far_from_zero_are_not_constant():
    """float32 rounds a value by up to 6e-8 of its size, so residuals below 1e-7 of float32
    data are rounding; float64 data keep 15 digits: Y + 1e7 with unit variation (1e-7 of its
    size) was refused as constant at a tenth of the voxels, Y + 1e8 at all of them.  Now
    the voxel's own values decide (products.constant_rtol), and the fit is the same as at
    Y's own level, its intercept shifted."""
    model, Y = _model_and_data(seed=10, v=6)
    base = analyse_chunk(model, Y, Settings())
    for shift in (1e7, 1e8):
        out = analyse_chunk(model, Y + shift, Settings())
        np.testing.assert_array_equal(out["status"], base["status"])
        np.testing.assert_allclose(out["beta"][:, 0] - shift, base["beta"][:, 0], rtol=1e-6)
        np.testing.assert_allclose(out["sigma2"], base["sigma2"], rtol=1e-5)
    # float32 numbers with residuals of float32 rounding's size are still constant
    level = np.float32(1e7) + np.zeros_like(Y[:1])
    flat32 = (level + np.float32(0.5) * (Y[:1] > 100)).astype(np.float32).astype(np.float64)
    assert analyse_chunk(model, flat32, Settings())["status"][0] == STATUS_CONSTANT
    # whole numbers are not rounded by float32: int32 data near 2^24 varying by 1 or 2 vary
    ints = np.round(16_000_000.0 + 0.6 * (Y[:2] - 100.0))
    assert ints.std(axis=1).min() > 0.3
    assert (analyse_chunk(model, ints, Settings())["status"] <= 2).all()


def test_voxels_whose_observed_rows_cannot_identify_the_random_effects():
    """lme4's rule on a voxel's own data: observations must exceed levels x effects.  With
    two of four visits per subject and an intercept + slope, n = 2 l: not identifiable
    (status 9, no numbers); one more observation and the voxel is fitted."""
    model, Y = _model_and_data(seed=7, v=3)
    codes = model.rd.cols[:, 0] // 2                     # subject of each row (q = 2)
    visit = np.arange(Y.shape[1]) - np.searchsorted(codes, codes)
    Y[0, visit >= 2] = np.nan                            # 2 visits of each of 25 subjects
    Y[1, (visit >= 2) & ~((codes == 0) & (visit == 2))] = np.nan   # one more observation
    out = analyse_chunk(model, Y, Settings())
    assert out["status"][0] == STATUS_UNIDENTIFIABLE and out["n"][0] == 50
    assert np.isnan(out["beta"][0]).all() and np.isnan(out["contrasts/time/p"][0])
    assert out["status"][1] <= 2 and out["status"][2] <= 2


def test_voxels_that_observe_one_level_of_a_factor_are_not_fitted():
    """lme4 refuses a grouping factor with one sampled level (``check.nlev.gtr.1``, default
    "stop": "grouping factors must have > 1 sampled level"), whatever n is: a voxel whose
    observed rows are all in one site gets status 9 and no numbers; one row of a second site
    and it is fitted.  (24 rows of 6 subjects in site 0: n > levels x effects holds.)"""
    model, Y = _model_and_data(seed=8, v=3, crossed=True)
    offsets = model.rd.structure.offsets
    site = model.rd.cols[:, 2] - offsets[1]
    assert np.count_nonzero(site == 0) == 24
    Y[0, site != 0] = np.nan                             # site 0 only
    Y[1, site != 0] = np.nan
    Y[1, np.flatnonzero(site == 1)[0]] = 0.5 * (Y[2, 0] + Y[2, 1])   # and one row of site 1
    out = analyse_chunk(model, Y, Settings())
    assert out["status"][0] == STATUS_UNIDENTIFIABLE and out["n"][0] == 24
    assert np.isnan(out["beta"][0]).all() and np.isnan(out["contrasts/time/p"][0])
    assert out["status"][1] <= 2 and out["status"][2] <= 2


def test_data_out_of_range_are_not_fitted():
    """A degenerate-voxel audit, float64 images: at 1e150 status 0 with every p NaN, at 1e-160
    status 2 with a subnormal sigma2; now status 5 without numbers, as X's columns are held
    to 1e-100 .. 1e100.  1e-30 and 1e30 are fitted, to the same t as at unit size."""
    model, Y = _model_and_data(v=1)
    scales = np.array([1.0, 1e150, 1e-160, 1e-30, 1e30, 1e99, 1e-103])   # (y ~ 100)
    out = analyse_chunk(model, Y * scales[:, None], Settings())
    assert out["status"][[1, 2, 5, 6]].tolist() == [STATUS_NUMERICAL] * 4
    assert np.isnan(out["sigma2"][[1, 2, 5, 6]]).all()
    assert (out["status"][[0, 3, 4]] <= 2).all()
    np.testing.assert_allclose(out["contrasts/time/t"][[3, 4]], out["contrasts/time/t"][0],
                               rtol=1e-8)
