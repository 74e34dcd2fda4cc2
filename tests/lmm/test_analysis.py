"""A chunk's analysis: voxel selection, product-form groups, and results equal voxel by voxel."""

import numpy as np

from mpiblmm.lmm.analysis import (ContrastDef, Model, Settings, analyse_chunk,
                                  product_form_groups)
from mpiblmm.lmm.model import STATUS_EMPTY, STATUS_RANK_DEFICIENT, STATUS_TOO_FEW
from mpiblmm.lmm.products import random_design
from mpiblmm.simulate import FactorSpec, covariance, simulate_design, simulate_voxels


def _model_and_data(seed=0, v=40):
    rng = np.random.default_rng(seed)
    d = simulate_design(rng, 25, 4, factors=(FactorSpec("subject", ("intercept", "time")),))
    Y, _ = simulate_voxels(rng, d, v, [100.0, 1.0, 0.5], {"subject": covariance([2.0, 0.5], 0.2)},
                           1.0)
    f = d.factors[0]
    contrasts = (ContrastDef("time", np.array([[0.0, 0.0, 1.0]])),
                 ContrastDef("both", np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "F"))
    return Model(d.X, random_design([f.codes], [f.Z]), contrasts), Y.T.copy()


def test_groups_share_patterns_and_cover_every_voxel_once():
    rng = np.random.default_rng(1)
    observed = np.ones((50, 20), dtype=bool)
    observed[10:30, :5] = False          # 20 voxels share one pattern
    observed[30:, :] = rng.random((20, 20)) > 0.2
    fit = np.ones(50, dtype=bool)
    fit[-1] = False
    groups = list(product_form_groups(observed, fit, min_group=10))
    seen = np.concatenate([g for g, _ in groups])
    assert np.array_equal(np.sort(seen), np.arange(49))
    assert [len(g) for g, _ in groups][:2] == [10, 20]
    assert groups[0][1] is None and np.array_equal(groups[1][1], np.arange(5, 20))
    assert groups[-1][1] is None and len(groups[-1][0]) == 19


def test_pattern_groups_give_the_per_voxel_answer():
    model, Y = _model_and_data()
    Y[:30, :8] = np.nan                  # 30 voxels lack the same 8 observations (2 subjects)
    Y[30, ::3] = np.nan                  # one voxel of its own
    groups = list(product_form_groups(np.isfinite(Y), np.ones(40, bool), 10))
    assert [len(g) for g, _ in groups] == [9, 30, 1]
    grouped = analyse_chunk(model, Y, Settings(min_pattern_group=10))
    alone = analyse_chunk(model, Y, Settings(min_pattern_group=10**9))
    for key in grouped:
        np.testing.assert_allclose(grouped[key], alone[key], rtol=1e-7, atol=1e-9, err_msg=key)


def test_voxels_that_cannot_be_fitted_say_why():
    model, Y = _model_and_data(v=5)
    Y[0] = np.nan                        # no observations
    Y[1, 3:] = np.nan                    # 3 observations, p = 3
    Y[2, model.X[:, 2] != 0] = np.nan    # only time == 0 rows: X loses a column
    out = analyse_chunk(model, Y, Settings(min_n=10))
    assert list(out["status"][:3]) == [STATUS_EMPTY, STATUS_TOO_FEW, STATUS_RANK_DEFICIENT]
    assert out["status"][3] <= 2 and out["status"][4] <= 2
    for key, value in out.items():
        if value.dtype.kind == "f":
            assert np.isnan(value[:3]).all(), key
            assert np.isfinite(value[3:]).all(), key
    np.testing.assert_array_equal(out["n"][:2], [0, 3])
