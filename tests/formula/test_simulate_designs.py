"""`mpiblmm simulate` with nested and crossed factors writes a spec matching its design."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mpiblmm.design import design_from_spec
from mpiblmm.spec import load_spec
from mpiblmm.study import Grouping, simulate_study, write_study


@pytest.mark.parametrize("form", ["matrix", "formula"])
def test_nested_and_crossed_study(tmp_path, form):
    g = Grouping(sites=3, families=9, raters=4, slopes=("subject", "rater"))
    spec_path = write_study(tmp_path, subjects=18, visits=3, shape=(3, 2, 2), seed=5,
                            grouping=g, form=form)
    design = design_from_spec(load_spec(spec_path))
    assert [f.name for f in design.factors] == ["subject", "family", "site", "rater"]
    assert [f.n_effects for f in design.factors] == [2, 1, 1, 2]
    sizes = {f.name: f.n_levels for f in design.factors}
    assert sizes["subject"] == 18 and sizes["site"] <= 3 and sizes["rater"] <= 4
    assert sizes["family"] <= 9
    # nesting: every subject in one family, every family in one site
    subj, fam, site = (design.factors[i].codes for i in range(3))
    for child, parent in ((subj, fam), (fam, site)):
        for c in np.unique(child):
            assert np.unique(parent[child == c]).size == 1
    # crossing: subjects see several raters
    rater = design.factors[3].codes
    assert max(np.unique(rater[subj == s]).size for s in np.unique(subj)) > 1
    with h5py.File(tmp_path / "truth.h5", "r") as t:
        assert t["random/rater/cov"].shape[1:] == (2, 2)
        assert t["random/site/cov"].shape[1:] == (1, 1)
        assert t["random/subject/cov"].shape[1:] == (2, 2)
        # the truth names its columns as the fit of this spec does in results.h5
        assert [str(s) for s in t["beta"].attrs["names"]] == list(design.fixed_names)
        for f in design.factors:
            assert ([str(s) for s in t[f"random/{f.name}/cov"].attrs["names"]]
                    == list(f.effect_names))
    if form == "formula":
        spec = json.loads(spec_path.read_text())
        assert spec["formula"] == ("y ~ age + time + (1 + time | subject) + (1 | family) + "
                                   "(1 | site) + (1 + time | rater)")
        assert design.fixed_names == ("(Intercept)", "age", "time")


def test_forms_give_the_same_design(tmp_path):
    g = Grouping(sites=2, raters=3)
    a = design_from_spec(load_spec(write_study(tmp_path / "a", subjects=6, visits=2,
                                               shape=(2, 2, 1), grouping=g)))
    b = design_from_spec(load_spec(write_study(tmp_path / "b", subjects=6, visits=2,
                                               shape=(2, 2, 1), grouping=g, form="formula")))
    np.testing.assert_allclose(a.X, b.X, rtol=1e-9)   # both written with 10 digits
    for fa, fb in zip(a.factors, b.factors):
        assert fa.name == fb.name and np.array_equal(fa.codes, fb.codes)
    assert [c.name for c in a.contrasts] == [c.name for c in b.contrasts]
    for ca, cb in zip(a.contrasts, b.contrasts):
        np.testing.assert_array_equal(ca.L, cb.L)


def test_default_draws_do_not_depend_on_the_new_options():
    d1, t1, y1, extra = simulate_study(7, 5, 2, (2, 2, 1), 0.3)
    d2, t2, y2, _ = simulate_study(7, 5, 2, (2, 2, 1), 0.3, Grouping())
    assert extra == {} and np.array_equal(y1, y2) and np.array_equal(d1.X, d2.X)
    _, _, y3, extra3 = simulate_study(7, 5, 2, (2, 2, 1), 0.3, Grouping(raters=2))
    assert set(extra3) == {"rater"} and not np.array_equal(y1, y3)


def test_simulate_options_parse():
    from mpiblmm.cli import get_parser

    args = get_parser().parse_args(["simulate", "out", "--sites", "21", "--families", "80",
                                    "--raters", "5", "--slopes", "subject", "rater",
                                    "--form", "formula"])
    assert (args.sites, args.families, args.raters, args.slopes, args.form) == (
        21, 80, 5, ["subject", "rater"], "formula")
    default = get_parser().parse_args(["simulate", "out"])
    assert (default.sites, default.families, default.raters, default.slopes, default.form) == (
        0, 0, 0, None, "matrix")


def test_truth_names_read_in_both_layouts():
    from mpiblmm.study import _names

    assert _names('["intercept", "age"]') == ["intercept", "age"]    # earlier truth files
    assert _names(np.array(["(Intercept)", "age"], dtype=h5py.string_dtype())) == [
        "(Intercept)", "age"]
    assert _names(np.array([b"(Intercept)", b"age"], dtype=object)) == ["(Intercept)", "age"]
