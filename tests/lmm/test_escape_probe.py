"""The escape from a zero column of ``Lambda`` (``blocked.newton._escape_saddles``) on one
voxel of a cohort audit, against lme4/lmerTest (``make_escape_probe.R``: ML, best of three
tight optimisers).

``y ~ age + sex + (1 + time | subject) + (1 | site) + (1 | rater)``: the rank probe moved the
fit onto a rank-one ``D_subject`` (``L22 = 0``, a stationary point the Newton steps cannot
leave), and the escape tried ``L22 = 0.01`` only, where the deviance is above the
boundary's; lme4's optimum is interior at ``L22 = 0.006``.  The voxel ended 3e-7 below lme4,
flagged singular where lme4 is not, with age's Satterthwaite df 370.9 against lmerTest's
108.5.
"""

import csv
import json
from pathlib import Path

import numpy as np

from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.model import STATUS_SINGULAR
from mpiblmm.lmm.products import random_design

HERE = Path(__file__).parent


def test_an_interior_optimum_next_to_the_boundary_is_found_as_lme4_finds_it():
    rows = list(csv.DictReader(open(HERE / "escape_probe.csv")))
    ref = json.loads((HERE / "escape_probe_lme4.json").read_text())
    num = {k: np.array([float(r[k]) for r in rows]) for k in ("age", "time", "y")}
    n = len(rows)
    X = np.column_stack([np.ones(n), num["age"], [r["sex"] == "M" for r in rows]])
    codes = [np.unique([r[k] for r in rows], return_inverse=True)[1]
             for k in ("subject", "site", "rater")]
    rd = random_design(codes, [np.column_stack([np.ones(n), num["time"]]), np.ones((n, 1)),
                               np.ones((n, 1))], ["subject", "site", "rater"])
    model = Model(X, rd, (ContrastDef("age", np.array([[0.0, 1.0, 0.0]])),))
    out = analyse_chunk(model, num["y"][None, :], Settings(method="ML"))
    assert int(out["n"][0]) == ref["n"] == n
    assert out["llh"][0] >= ref["logLik"] - 1e-9, out["llh"][0] - ref["logLik"]
    assert not ref["singular"] and out["status"][0] != STATUS_SINGULAR
    np.testing.assert_allclose(out["beta"][0], ref["beta"], rtol=1e-5)
    np.testing.assert_allclose(out["contrasts/age/t"][0], ref["t_age"], rtol=1e-5)
    # (a flat optimum: df move with theta along it; before, 370.9)
    np.testing.assert_allclose(out["contrasts/age/df"][0], ref["df_age"], rtol=5e-3)
