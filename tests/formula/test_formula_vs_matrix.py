"""Formula and matrix forms of one model give the same bits, through the command line.

Three lme4 reference datasets (one factor; crossed factors; a text covariate with an
interaction and a random slope), REML and ML: each is written as a matrix-form spec and as
a formula-form spec over the same images; both are fitted at 2 ranks and every dataset of
the two results files must be equal bit for bit.  The coefficient names of the formula
form are R's ``colnames(model.matrix(...))``, written by hand in ``studies.CASES``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpiblmm.design import design_from_spec
from mpiblmm.spec import load_spec
from tests.cli.studies import assert_same_datasets, read_results
from tests.refdata import load_dataset

from .studies import CASES, write_both


@pytest.mark.parametrize("name", sorted(CASES))
def test_designs_are_identical(name, tmp_path):
    ds = load_dataset(name)
    matrix, formula = write_both(ds, CASES[name], tmp_path, "REML")
    a, b = design_from_spec(load_spec(matrix)), design_from_spec(load_spec(formula))
    assert b.fixed_names == CASES[name].names
    assert np.array_equal(a.X, b.X)
    assert [f.name for f in a.factors] == [f.name for f in b.factors]
    for fa, fb in zip(a.factors, b.factors):
        assert np.array_equal(fa.codes, fb.codes) and fa.labels == fb.labels
        assert np.array_equal(fa.Z, fb.Z)
    assert [(c.name, c.kind, c.alternative) for c in a.contrasts] == \
        [(c.name, c.kind, c.alternative) for c in b.contrasts]
    for ca, cb in zip(a.contrasts, b.contrasts):
        assert np.array_equal(ca.L, cb.L)


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("name,method", [(n, m) for n in sorted(CASES) for m in ("REML", "ML")])
def test_fits_are_bit_identical(name, method, tmp_path, run_mpi, mpiblmm_command):
    ds = load_dataset(name)
    matrix, formula = write_both(ds, CASES[name], tmp_path, method)
    for spec in (matrix, formula):
        run = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(spec)], timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    a = read_results(tmp_path / "results" / "results.h5")
    b = read_results(tmp_path / "results_formula" / "results.h5")
    assert_same_datasets(a, b)
    assert bool(b["@"]["complete"])
    import h5py

    with h5py.File(tmp_path / "results_formula" / "results.h5", "r") as f:
        assert [str(x) for x in f["beta"].attrs["names"]] == list(CASES[name].names)
    maps = json.loads((tmp_path / "results_formula" / "nifti" / "maps.json").read_text())
    assert list(CASES[name].names) == _beta_volumes(maps)


def _beta_volumes(maps) -> list[str]:
    """The volume names of the beta map in maps.json (whatever its exact layout)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if any("beta" in str(v) for v in x.values() if isinstance(v, str)):
                for v in x.values():
                    if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
                        found.append(v)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(maps)
    return found[0] if found else []
