"""`mpiblmm fit` of a formula study where some voxels miss whole groups: lme4's fit there.

The five voxels of ``tests/lmm/rank_deficient.csv`` (lme4 reference from
``tests/lmm/make_rank_deficient.R``) as NIfTI images with ``y ~ group * time + (1 | subject)``
over a participants table, fitted at 2 ranks: lme4's kept coefficients and estimates,
NaN in the dropped ones, the default T contrasts only where estimable, the default F contrasts
as lmerTest's anova tests the terms (by their kept columns), and maps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .studies import read_results

LMM = Path(__file__).parents[1] / "lmm"
NAMES = ["(Intercept)", "groupB", "groupC", "time", "groupB:time", "groupC:time"]
R_NAMES = ["(Intercept)", "gB", "gC", "time", "gB:time", "gC:time"]


def _write_study(folder: Path) -> Path:
    rows = list(csv.DictReader(open(LMM / "rank_deficient.csv")))
    lines = []
    for i, r in enumerate(rows):
        values = [float(r[f"y{v}"]) if r[f"y{v}"] else np.nan for v in range(1, 6)]
        path = folder / f"img{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.array(values).reshape(5, 1, 1), np.eye(4)), path)
        lines.append(path.name)
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    (folder / "participants.csv").write_text("subject,group,time\n" + "".join(
        f"{r['subject']},{r['group']},{r['time']}\n" for r in rows))
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"images": "images.txt", "covariates": "participants.csv",
                                "formula": "y ~ group * time + (1 | subject)"}))
    return spec


@pytest.mark.spawns_mpiexec
def test_fit_drops_columns_as_lme4(tmp_path, run_mpi, mpiblmm_command):
    spec = _write_study(tmp_path)
    run = run_mpi(2, [*mpiblmm_command, "fit", str(spec)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("4 fitted voxels leave X rank deficient on their observed rows: fitted without "
            "the dependent columns, as lme4 drops them (NaN there in beta)") in run.stdout
    res = read_results(tmp_path / "results" / "results.h5")
    assert bool(res["@"]["complete"])
    back = np.argsort(res["voxels"][:, 0])                  # results row of voxel x
    ref = json.loads((LMM / "rank_deficient_lme4.json").read_text())
    assert set(res["status"]) <= {0, 2}
    for v in range(5):
        r, row = ref[f"REML_y{v + 1}"], back[v]
        kept = [R_NAMES.index(name) for name in r["kept"]]
        beta = res["beta"][row]
        assert np.flatnonzero(np.isfinite(beta)).tolist() == kept
        np.testing.assert_allclose(beta[kept], r["beta"], rtol=1e-5)
        assert res["llh"][row] >= r["logLik"] - 1e-6
        # the default T contrast of a coefficient: only where it is estimable
        t_gC = res["contrasts/groupC/t"][row]
        if v + 1 in (1, 4):
            np.testing.assert_allclose(t_gC, r["contrasts"]["gC"]["t"], rtol=1e-4)
        else:
            assert np.isnan(t_gC)
        np.testing.assert_allclose(res["contrasts/time/df"][row],
                                   r["contrasts"]["time"]["df"], rtol=1e-4)
        # the default F of group:time and of group (the groups at time 0: time is numeric),
        # terms in no other: lmerTest's anova of lme4's fit, i.e. their kept columns (1
        # numerator df where one is gone, even where its meaning changed: group C seen at
        # time 1 only); none kept at y5
        for term, key in (("group:time", "interaction"), ("group", "group")):
            F = [res[f"contrasts/{term}/{f}"][row] for f in ("F", "df_num", "df_den", "p")]
            if v < 4:
                a = ref[f"anova_REML_y{v + 1}"][key]
                np.testing.assert_allclose(F, [a["F"], a["df_num"], a["df_den"], a["p"]],
                                           rtol=1e-4, err_msg=f"{term} y{v + 1}")
            else:
                assert np.isnan(F).all()
    beta_map = nib.load(tmp_path / "results" / "nifti" / "beta.nii.gz").get_fdata()
    assert beta_map.shape[:3] == (5, 1, 1)
    assert np.isnan(beta_map[1, 0, 0, NAMES.index("groupC")])       # y2: no group C
    assert np.isfinite(beta_map[1, 0, 0, NAMES.index("groupB")])
