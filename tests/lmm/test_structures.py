"""The random-effects algebra is chosen once per design and nothing else branches on it."""

import re
from pathlib import Path

import numpy as np
import pytest

import mpiblmm
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.structures import Blocked, Dense, OneFactor, choose

# What "knowing the structure" looks like in code: the one-factor test, a test of the blocked
# pattern, counting factors, or asking the algebra's type.
_BRANCH = re.compile(r"is_single_factor|\bblocks is (not )?None|\.blocks\b|\.pattern is"
                     r"|len\([\w.]*factors\)\s*[=!<>]=?\s*1\b|isinstance\([^)]*(OneFactor|Dense|Blocked)")


def test_only_the_structure_modules_know_the_structure():
    """Issue 9: each structure is one module behind one interface (``pf.algebra``); Fisher
    Scoring, scores, polish, Satterthwaite, the estimator and the analysis call it and never
    branch on the structure.  Allowed: the structure modules (mpiblmm/lmm/structures/, and the
    blocked path's own engine mpiblmm/lmm/blocked/) and the property's definition."""
    root = Path(mpiblmm.__file__).parent
    allowed = (root / "lmm" / "structures", root / "lmm" / "blocked")
    offenders = []
    for path in root.rglob("*.py"):
        if any(a in path.parents for a in allowed):
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "def is_single_factor" in code or (path.name == "model.py"
                                                   and "len(self.factors) == 1" in code):
                continue                 # the property's definition
            if _BRANCH.search(code):
                offenders.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    assert not offenders, "structure branching outside mpiblmm/lmm/structures:\n" + "\n".join(
        offenders)


def _design(n_factors, rng):
    n = 60
    codes = [np.repeat(np.arange(20), 3), np.tile(np.arange(3), 20)][:n_factors]
    Zs = [np.ones(n), np.column_stack([np.ones(n), rng.normal(size=n)])][:n_factors]
    return random_design(codes, Zs), np.column_stack([np.ones(n), rng.normal(size=n)])


@pytest.mark.parametrize("n_factors, layout, kind", [
    (1, "auto", OneFactor), (1, "dense", OneFactor), (1, "blocked", OneFactor),
    (2, "auto", Blocked), (2, "blocked", Blocked), (2, "dense", Dense)])
def test_the_algebra_is_chosen_once_from_the_design(n_factors, layout, kind):
    rng = np.random.default_rng(0)
    rd, X = _design(n_factors, rng)
    Y = rng.normal(size=(rd.n, 4))
    Y[0, 1] = np.nan
    pf = product_forms(X, rd, Y, layout=layout)
    assert isinstance(pf.algebra, kind) and pf.algebra.structure == rd.structure
    assert pf.take(np.array([1, 2])).algebra is pf.algebra      # carried, not re-chosen
    assert (pf.blocks is not None) == (kind is Blocked)
    if kind is Blocked:                  # the pattern is built once per design
        assert choose(rd, layout) is pf.algebra
        assert product_forms(X, rd, Y, layout=layout).blocks is pf.blocks


def test_layout_must_be_known():
    rng = np.random.default_rng(0)
    rd, _ = _design(1, rng)
    with pytest.raises(ValueError, match="layout"):
        choose(rd, "sparse")
