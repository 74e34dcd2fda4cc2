"""Designs that cannot be fitted at any voxel are user errors naming the cause (issue 11)."""

from pathlib import Path

import numpy as np
import pytest

from mpiblmm.checks import check_fittable, dependent_column, overlapping_random_terms
from mpiblmm.design import build_design
from mpiblmm.errors import SpecError


def _design(n_sub=10, visits=3, X=None, Z=None, labels=None, extra_factor=None):
    n = n_sub * visits
    t = np.tile(np.arange(visits), n_sub).astype(float)
    if X is None:
        X = np.column_stack([np.ones(n), t])
    if labels is None:
        labels = [f"s{i}" for i in np.repeat(np.arange(n_sub), visits)]
    factors = [("subject", labels, Z, None)]
    if extra_factor is not None:
        factors.append(extra_factor)
    return build_design(X, factors, fixed_names=[f"c{j}" for j in range(X.shape[1])])


def test_a_fittable_design_passes():
    check_fittable(_design(Z=None))
    t = np.tile(np.arange(3), 10).astype(float)
    check_fittable(_design(Z=np.column_stack([np.ones(30), t])))


def test_more_fixed_effects_than_observations():
    X = np.random.default_rng(0).normal(size=(4, 4))
    d = build_design(X, [("g", ["a", "a", "b", "b"], None, None)])
    with pytest.raises(SpecError, match="4 fixed effects .* only 4 observations"):
        check_fittable(d)


@pytest.mark.parametrize("make, column", [
    (lambda X: np.column_stack([X, 2 * X[:, 1] - X[:, 0]]), 3),
    (lambda X: np.column_stack([X, np.zeros(len(X))]), 3),
    (lambda X: np.column_stack([X[:, :1], X]), 2),
])
def test_rank_deficient_X_names_the_column(make, column):
    t = np.tile(np.arange(3), 10).astype(float)
    X = make(np.column_stack([np.ones(30), t]))
    with pytest.raises(SpecError, match=f"column {column} .*rank deficient"):
        check_fittable(_design(X=X))


def test_a_covariate_far_from_zero_is_nearly_dependent_and_told_to_centre():
    """age + 1e6 beside an intercept: in their span to 1.6e-5 (refused, as before), but it
    was called "a linear combination of the columns before it", which it is not."""
    age = 40.0 + 17.0 * np.random.default_rng(1).standard_normal(30)
    X = np.column_stack([np.ones(30), age + 1e6])
    with pytest.raises(SpecError, match=r"column 2 \('c1'\) is nearly a linear combination of "
                                        r"the columns before it \(only 1\.\de-05 .*centre it: scale\(age\)"):
        check_fittable(_design(X=X))
    exact = np.column_stack([np.ones(30), age, 2 * age + 3])
    with pytest.raises(SpecError, match=r"column 3 \('c2'\) is a linear combination"):
        check_fittable(_design(X=exact))


def test_min_n_above_n():
    class Spec:
        class missingness:
            min_n = 31
    with pytest.raises(SpecError, match="missingness.min_n: 31 is more than the 30"):
        check_fittable(_design(), Spec())


def test_one_observation_per_level_with_two_effects_is_refused_as_by_lme4():
    t = np.arange(30, dtype=float)
    d = _design(n_sub=30, visits=1, Z=np.column_stack([np.ones(30), t]),
                X=np.column_stack([np.ones(30), t]))
    with pytest.raises(SpecError, match="30 observations for 60 random effects"):
        check_fittable(d)


def test_as_many_levels_as_observations_is_refused():
    t = np.arange(30, dtype=float)
    d = _design(n_sub=30, visits=1, X=np.column_stack([np.ones(30), t]))
    with pytest.raises(SpecError, match="30 observations for 30 random effects"):
        check_fittable(d)


def test_a_factor_with_one_level_is_refused():
    d = _design(labels=["all"] * 30)
    with pytest.raises(SpecError, match="has 1 level"):
        check_fittable(d)


def test_duplicated_intercept_in_Z_is_refused():
    d = _design(Z=np.ones((30, 2)))
    with pytest.raises(SpecError, match="factor .subject.: column 2 .* not identifiable"):
        check_fittable(d)


def test_dependent_column_finds_the_first_culprit():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(20, 4))
    assert dependent_column(A) is None
    A[:, 2] = A[:, 0] * 1e6 + A[:, 1]                   # scaling does not hide it
    assert dependent_column(A) == 2
    assert dependent_column(np.column_stack([np.ones(5) * 1e-9, np.arange(5)])) is None


def test_overlapping_terms_of_one_grouping_get_a_note_not_an_error():
    """``(1 | subject) + (1 | subject)`` and ``(cond || subject)`` with a two-level factor
    (indicators summing to the intercept): lme4 and mpiblmm fit them, but the variance split
    between the terms is arbitrary.  Other groupings, and (1 + time || subject), are fine."""
    n_sub, visits = 10, 4
    labels = [f"s{i}" for i in np.repeat(np.arange(n_sub), visits)]
    n = n_sub * visits
    t = np.tile(np.arange(visits), n_sub).astype(float)
    cond = np.tile([1.0, 0.0], n // 2)
    cases = {
        "twice": (np.ones((n, 1)), np.ones((n, 1)), labels, 1),
        "cond ||": (np.ones((n, 1)), np.column_stack([cond, 1 - cond]), labels, 1),
        "time ||": (np.ones((n, 1)), t[:, None], labels, 0),
        "other grouping": (np.ones((n, 1)), np.ones((n, 1)),
                           [f"site{i % 3}" for i in range(n)], 0),
    }
    for name, (Za, Zb, labels_b, expected) in cases.items():
        d = _design(n_sub, visits, Z=Za, extra_factor=("subject.1", labels_b, Zb, None))
        check_fittable(d)                                   # never an error
        notes = overlapping_random_terms(d)
        assert len(notes) == expected, name
        if expected:
            assert notes[0].startswith("random terms 'subject' and 'subject.1' group by the "
                                       "same levels and their effects overlap")


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e-170])
def test_a_column_out_of_float_scale_is_refused_by_name(scale):
    """A fault audit's age column in 1e160-1e200 passed as 'a linear combination' (the
    column norms overflowed, with numpy warnings) and crashed the fit; in 1e-170 it was
    dropped as zero at every voxel without a word."""
    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(30), rng.normal(size=30) * scale, rng.normal(size=30)])
    with pytest.raises(SpecError, match=r"column 2 \('c1'\) has values up to .* in magnitude.*"
                                        r"rescale it"):
        check_fittable(_design(X=X))
    assert dependent_column(X) is None          # the rank test itself is scale-free now
    X[:, 1] *= 1e90 / scale                      # 1e90: in range
    check_fittable(_design(X=X))


def test_an_image_listed_twice_gets_a_note():
    """The same image twice in ``images`` enters the fit as two observations (a fault
    audit's fit took it without a word): check and fit say so, once."""
    from types import SimpleNamespace

    from mpiblmm.checks import repeated_images
    from mpiblmm.spec import volume_path

    spec = SimpleNamespace(images=[Path("/d/a.nii"), Path("/d/b.nii"), Path("/d/./a.nii")])
    assert repeated_images(spec) == ["/d/a.nii is observation 1 and 3: listed twice, it enters "
                                     "the fit twice"]
    volumes = [volume_path("/d/all.nii", v) for v in (0, 1, 2)]
    assert repeated_images(SimpleNamespace(images=volumes)) == []
    assert repeated_images(SimpleNamespace(images=None)) == []


def test_a_slope_constant_within_every_level_gets_a_note():
    """A fault audit: (1 + grp | subject) with grp fixed per subject fitted 141 of 144 voxels
    singular without a word; lme4 fits it too, so a note, not an error."""
    from mpiblmm.checks import slopes_constant_within_levels

    n_sub, visits = 10, 3
    grp = np.repeat(np.arange(n_sub) % 2, visits).astype(float)        # one value per subject
    t = np.tile(np.arange(visits), n_sub).astype(float)
    d = _design(Z=np.column_stack([np.ones(n_sub * visits), grp]))
    assert slopes_constant_within_levels(d) == [
        "random factor 'subject': 'z1' is constant within every level of 'subject', so its "
        "random slope is not told apart from the random intercept: expect singular fits "
        "(status 2) at most voxels; a covariate of the level belongs in the fixed part only"]
    # a slope that varies within levels, or no intercept beside it: nothing to say
    assert slopes_constant_within_levels(_design(Z=np.column_stack([np.ones(30), t]))) == []
    assert slopes_constant_within_levels(_design(Z=np.column_stack([grp, t]))) == []
    assert slopes_constant_within_levels(_design()) == []


def test_a_dependence_is_named_by_a_column_in_it_not_by_the_one_that_tipped_the_ratio():
    """dependent_column stops where the leading block's eigenvalue ratio falls below the
    tolerance, which a column outside the dependence can cause by raising the largest
    eigenvalue (formula audit, cases2/227): the column named is the last one with weight in
    the smallest eigenvector."""
    from mpiblmm.checks import dependent_culprit

    rng = np.random.default_rng(0)
    n = 60
    a, b = rng.normal(size=n), rng.normal(size=n)
    near = a + b + 1e-5 * rng.normal(size=n)          # nearly in the span of a and b
    other = rng.normal(size=n)                         # far from it
    A = np.column_stack([np.ones(n), a, b, near, other])
    assert dependent_culprit(A, 4) == 3
    assert dependent_culprit(A, 3) == 3
    assert dependent_culprit(np.column_stack([a, np.zeros(n), b]), 2) == 1   # a zero column
