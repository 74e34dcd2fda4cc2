"""``scale()``, ``center()`` and ``poly()`` are computed once on every row of the table, one
covariate for every voxel; lme4 given a voxel's observed rows computes them on those rows (a
formula audit: at voxels missing images ``scale(age)``'s beta 2.2595 against 2.2545, a type
III F beside ``scale(age) * group`` 1.01 against 0.86).  Both are kept as they are, with a
note: the test checks the note, and the note's claim by exact fits of the two
parameterisations -- with an intercept the same fit (ML log-likelihood, sigma2 and t of the
other coefficients equal), the REML log-likelihood shifted by log|det T| of the column map."""

from __future__ import annotations

import json

import numpy as np

from mpiblmm.design import design_from_spec
from mpiblmm.formula import table_wide_transforms
from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.products import random_design
from mpiblmm.spec import load_spec
from mpiblmm.study import write_study


def test_the_calls_are_found_as_written():
    formula = ("y ~ scale(age) * grp + poly(age, 2) + poly(x, 2, raw = TRUE) + center(log(icv))"
               " + myscale(z) + (1 + scale(age) | subject)")
    assert table_wide_transforms(formula) == ["scale(age)", "poly(age, 2)", "center(log(icv))"]
    assert table_wide_transforms("y ~ age + I(age^2) + (1 | subject)") == []


def test_the_fit_notes_them(tmp_path):
    write_study(tmp_path, subjects=12, visits=3, shape=(2, 2, 1), seed=1, form="formula")
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec.pop("contrasts", None)
    spec["formula"] = "y ~ scale(age) + (1 | subject)"
    (tmp_path / "s.json").write_text(json.dumps(spec))
    design = design_from_spec(load_spec(tmp_path / "s.json"))
    (note,) = [n for n in design.notes if n.startswith("scale(age)")]
    assert note.startswith("scale(age): computed once from all 36 rows of ")
    assert "to compare with lme4 there, put the computed column in the table" in note
    spec["formula"] = "y ~ age + (1 | subject)"
    (tmp_path / "a.json").write_text(json.dumps(spec))
    assert design_from_spec(load_spec(tmp_path / "a.json")).notes == ()


def test_the_two_parameterisations_are_one_fit():
    """X with scale(age) of all rows against X with scale(age) of the voxel's observed rows
    (lme4's): ML logLik, sigma2 and the t of the other column equal; REML logLik shifted by
    log|det T| = log(s_all / s_voxel); the scaled column's beta scaled by s_voxel / s_all."""
    rng = np.random.default_rng(3)
    subject = np.repeat(np.arange(20), 4)
    n = subject.size
    age = rng.uniform(50, 80, size=20)[subject] + np.tile(np.arange(4.0), 20)
    x = rng.normal(size=n)
    y = 3 + 0.05 * age + 0.4 * x + rng.normal(size=20)[subject] + rng.normal(size=n)
    observed = rng.random(n) > 0.25
    Y = np.where(observed, y, np.nan)[None, :]

    def scaled(rows):
        return (age - age[rows].mean()) / age[rows].std(ddof=1)

    def fitted(column, method):
        X = np.column_stack([np.ones(n), column, x])
        contrasts = (ContrastDef("s", np.array([[0.0, 1.0, 0.0]])),
                     ContrastDef("x", np.array([[0.0, 0.0, 1.0]])))
        rd = random_design([subject], [np.ones((n, 1))])
        return analyse_chunk(Model(X, rd, contrasts), Y, Settings(method=method))

    ratio = age.std(ddof=1) / age[observed].std(ddof=1)          # det T of the column map
    for method in ("ML", "REML"):
        table, voxel = fitted(scaled(np.ones(n, bool)), method), fitted(scaled(observed), method)
        assert table["status"][0] <= 2 and voxel["status"][0] <= 2
        shift = 0.0 if method == "ML" else -np.log(ratio)
        np.testing.assert_allclose(voxel["llh"][0], table["llh"][0] + shift, rtol=0, atol=1e-8)
        np.testing.assert_allclose(voxel["sigma2"][0], table["sigma2"][0], rtol=1e-7)
        np.testing.assert_allclose(voxel["contrasts/x/t"][0], table["contrasts/x/t"][0],
                                   rtol=1e-6)
        np.testing.assert_allclose(voxel["contrasts/s/t"][0], table["contrasts/s/t"][0],
                                   rtol=1e-6)
        np.testing.assert_allclose(voxel["beta"][0, 1], table["beta"][0, 1] / ratio, rtol=1e-6)
