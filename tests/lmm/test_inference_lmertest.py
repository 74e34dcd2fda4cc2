"""T and F contrasts against lmerTest (contest1D / contestMD, ddf = "Satterthwaite").

lme4's estimates (beta, sigma^2, D = VarCorr / sigma^2, theta) are taken from the reference
files and fed to our inference; the statistics must reproduce lmerTest's.  The R code that
made the references is ``scripts/make_reference.R``; per contrast it runs, on the kept lmer fit
``m`` (REML or ML) converted with ``mt <- as_lmerModLmerTest(m)``:

    contest1D(mt, L, ddf = "Satterthwaite")   # T: Estimate, Std. Error, df, t value, Pr(>|t|)
    contestMD(mt, L, ddf = "Satterthwaite")   # F: F value, NumDF, DenDF, Pr(>F)
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.lmm.inference import f_contrast, t_contrast
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.satterthwaite import satterthwaite_setup
from mpiblmm.lmm.theta import theta_from_D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refdata import list_datasets, load_dataset  # noqa: E402

CASES = [(name, method) for name in list_datasets() for method in ("REML", "ML")]

# Issue 4: t, F, p within 1e-4 relative; df within 1% at the median voxel, 5% at the worst.
STAT_RTOL = 1e-4
DF_MEDIAN, DF_WORST = 1e-2, 5e-2


def _setup(name, method, use_theta):
    ds = load_dataset(name)
    assert method in ds.reference, f"tests/reference/{name}/lme4_{method}.json is missing"
    ref = ds.reference[method]
    rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors])
    pf = product_forms(ds.X, rd, ds.Y)
    D = tuple(ref.cov[f.name] / ref.sigma2[:, None, None] for f in ds.factors)
    pre = satterthwaite_setup(pf, ref.sigma2, D, method, fitted=ref.fitted,
                              theta=ref.theta if use_theta else None)
    return ds, ref, pf, D, pre


def _rel(a, b):
    return np.abs(a - b) / np.abs(b)


def _check_p(p, neglog10p, p_ref, where):
    # p relative to 1e-4 where the df barely matter; far in the tail (p < 1e-6) a 1e-6
    # relative difference in df moves p by more, so compare -log10 p there.
    big = p_ref >= 1e-6
    assert _rel(p[big], p_ref[big]).max(initial=0) < STAT_RTOL, where
    assert _rel(neglog10p, -np.log10(p_ref)).max(initial=0) < STAT_RTOL, where


@pytest.mark.parametrize("name,method", CASES)
def test_contrasts_match_lmertest(name, method):
    ds, ref, pf, D, pre = _setup(name, method, use_theta=True)
    ok = ref.fitted
    for c in ds.contrasts:
        rc = {k: v[ok] for k, v in ref.contrasts[c.name].items()}
        where = f"{name} {method} {c.name}"
        if c.kind == "T":
            res = t_contrast(pre, ref.beta, c.L[0], name=c.name)
            for field in ("estimate", "se", "t"):
                assert _rel(getattr(res, field)[ok], rc[field]).max() < STAT_RTOL, where
            df, df_ref = res.df[ok], rc["df"]
            _check_p(res.p[ok], res.neglog10p[ok], rc["p"], where)
        else:
            res = f_contrast(pre, ref.beta, c.L, name=c.name)
            assert _rel(res.F[ok], rc["F"]).max() < STAT_RTOL, where
            assert np.all(res.df_num == rc["df_num"]), where
            df, df_ref = res.df_den[ok], rc["df_den"]
            _check_p(res.p[ok], res.neglog10p[ok], rc["p"], where)
        rel = _rel(df, df_ref)
        assert np.median(rel) < DF_MEDIAN and rel.max() < DF_WORST, (where, rel.max())


@pytest.mark.parametrize("name,method", CASES)
def test_default_theta_from_D_matches_where_the_cholesky_is_unique(name, method):
    # Without lme4's theta we use the Cholesky factor of D (zeros at the boundary).  It is
    # lme4's theta unless a leading pivot of D_k vanishes (then lme4's theta is one of many).
    ds, ref, pf, D, pre = _setup(name, method, use_theta=False)
    ok = ref.fitted
    same = ok & (np.abs(theta_from_D(D, pf.structure) - ref.theta).max(axis=1, initial=0) < 1e-5)
    assert same.sum() >= 0.8 * ok.sum()
    for c in ds.contrasts:
        if c.kind == "T":
            df = t_contrast(pre, ref.beta, c.L[0]).df
            df_ref = ref.contrasts[c.name]["df"]
        else:
            df = f_contrast(pre, ref.beta, c.L).df_den
            df_ref = ref.contrasts[c.name]["df_den"]
        rel = _rel(df[same], df_ref[same])
        assert np.median(rel) < DF_MEDIAN and rel.max() < DF_WORST, (c.name, rel.max())
