"""`mpiblmm fit` end to end (NIfTI in, results.h5 and NIfTI out) against lme4/lmerTest.

Every reference dataset is written as an imaging study and fitted through the command line
at 2 ranks; the results file must hold lme4's fit (log-likelihood at least lme4's; beta,
sigma^2 and VarCorr within 1e-4 where lme4's fit is not singular and reached the optimum,
i.e. ours is not higher by more than 1e-6, as in tests/lmm/test_against_lme4.py) and
lmerTest's contrasts there.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.refdata import list_datasets, load_dataset

from .studies import read_results, voxel_order, write_reference_study


CASES = [(name, method) for name in list_datasets() for method in ("REML", "ML")
         if method in load_dataset(name).reference]


def _rel(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-3)


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("name,method", CASES)
def test_fit_matches_lme4(name, method, tmp_path, run_mpi, mpiblmm_command):
    ds = load_dataset(name)
    ref = ds.reference[method]
    spec = write_reference_study(ds, tmp_path, method)
    run = run_mpi(2, [*mpiblmm_command, "fit", str(spec)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = read_results(tmp_path / "results" / "results.h5")
    assert bool(res["@"]["complete"])
    order = voxel_order(res)
    assert np.array_equal(np.sort(order), np.arange(ds.v))
    back = np.empty_like(order)
    back[order] = np.arange(order.size)           # results row of each dataset voxel

    ok = np.isfinite(ref.llh)
    status = res["status"][back]
    assert np.all(status[ok] <= 2), status
    # The log-likelihood we reach is at least lme4's (its best of several optimisers).
    llh = res["llh"][back]
    assert np.all(llh[ok] >= ref.llh[ok] - 1e-6), (llh - ref.llh)[ok].min()
    inner = ok & ~ref.singular & (llh - ref.llh <= 1e-6)
    np.testing.assert_array_equal(res["n"][back][ok], ref.n[ok])
    beta_scale = np.maximum(np.abs(ref.beta), 1e-3 * np.abs(ref.beta).max(axis=1, keepdims=True))
    beta_rel = np.abs(res["beta"][back] - ref.beta) / beta_scale
    assert np.all(beta_rel[inner] < 1e-4)
    assert np.all(_rel(res["sigma2"][back][inner], ref.sigma2[inner]) < 1e-4)
    for f in ds.factors:
        cov = res[f"random/{f.name}/cov"][back]
        scale = np.abs(ref.cov[f.name][inner]).max(axis=(1, 2), keepdims=True)
        assert np.all(np.abs(cov[inner] - ref.cov[f.name][inner]) <= 1e-4 * scale)
    for c in ds.contrasts:
        got = {k: res[f"contrasts/{c.name}/{k}"][back] for k in
               (("estimate", "se", "t", "df", "p") if c.kind == "T" else ("F", "df_den", "p"))}
        want = ref.contrasts[c.name]
        if c.kind == "T":
            for k in ("estimate", "se", "t", "p"):
                assert np.all(_rel(got[k][inner], want[k][inner]) < 1e-4), (c.name, k)
            df_rel = _rel(got["df"][inner], want["df"][inner])
        else:
            for k in ("F", "p"):
                assert np.all(_rel(got[k][inner], want[k][inner]) < 1e-4), (c.name, k)
            df_rel = _rel(got["df_den"][inner], want["df_den"][inner])
        assert np.median(df_rel) < 0.01 and df_rel.max() < 0.05, (c.name, df_rel.max())
