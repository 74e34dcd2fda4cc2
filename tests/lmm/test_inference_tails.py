"""-log10 p of T and F contrasts where p is tiny: near 1e-300 (where scipy's ``fdtrc`` loses
digits), subnormal (2.2e-308 .. 5e-324: scipy returns a number with a few digits) and below
(scipy returns 0).  Every value against mpmath (50 digits) to 1e-9 relative, and the z of
``-log10 p`` against mpmath too: -log10 p 323.31 for 323.52 was the bug."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from scipy import special

from mpiblmm.io.derived import z_from_neglog10p
from mpiblmm.lmm.inference import f_logsf, t_logsf

mpmath.mp.dps = 50
LN10 = np.log(10.0)


def t_neglog10(t: float, df: float):
    """-log10 P(T > t), t > 0, from mpmath's regularised incomplete beta."""
    t, df = mpmath.mpf(t), mpmath.mpf(df)
    p = mpmath.betainc(df / 2, mpmath.mpf(1) / 2, 0, df / (df + t * t), regularized=True) / 2
    return -mpmath.log10(p)


def f_neglog10(F: float, d1: float, d2: float):
    """-log10 P(F(d1, d2) > F) (d2 = inf: chi2(d1) / d1) from mpmath."""
    F, d1 = mpmath.mpf(F), mpmath.mpf(d1)
    if np.isinf(d2):
        return -mpmath.log10(mpmath.gammainc(d1 / 2, d1 * F / 2, mpmath.inf, regularized=True))
    d2 = mpmath.mpf(d2)
    return -mpmath.log10(mpmath.betainc(d2 / 2, d1 / 2, 0, d2 / (d2 + d1 * F), regularized=True))


def _statistic_at(neglog10p: float, tail, lo: float = 0.0, hi: float = 300.0) -> float:
    """The statistic whose -log10 p is ``neglog10p`` (bisection in log10 of it, mpmath)."""
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if tail(10.0 ** mid) < neglog10p:
            lo = mid
        else:
            hi = mid
    return 10.0 ** lo


#: -log10 p targets: normal range near the switch, scipy's bad stretch, subnormal, zero.
TARGETS = (150.0, 199.0, 201.0, 290.0, 299.0, 305.0, 307.9, 309.0, 315.0, 323.5, 400.0, 800.0)


@pytest.mark.parametrize("df", [3.0, 12.0, 30.0, 237.0])
def test_t_tail_against_mpmath(df):
    t = np.array([_statistic_at(nl, lambda x: float(t_neglog10(x, df))) for nl in TARGETS])
    got = -t_logsf(t, np.full(t.size, df)) / LN10
    ref = np.array([float(t_neglog10(x, df)) for x in t])
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert np.all(np.abs(ref - TARGETS) < 1e-6 * np.array(TARGETS))  # the range is covered


@pytest.mark.parametrize("d1,d2", [(1, 30.0), (2, 40.0), (2, 237.0), (5, 12.0), (20, 40.0),
                                   (50, 70.0), (3, np.inf)])
def test_f_tail_against_mpmath(d1, d2):
    F = np.array([_statistic_at(nl, lambda x: float(f_neglog10(x, d1, d2))) for nl in TARGETS])
    got = -f_logsf(F, float(d1), np.full(F.size, d2)) / LN10
    ref = np.array([float(f_neglog10(x, d1, d2)) for x in F])
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_subnormal_p_from_scipy_is_not_used():
    """The audit's voxel: F = 3.79e12 on (2, 58.2) df, whose p (3.0e-324) scipy gives as
    the smallest subnormal, 5e-324: -log10 p must be 323.52348 (not 323.306), and its z
    exact too."""
    F, d1, d2 = 3792650203995.164, 2.0, 58.21414375325446
    assert 0 < special.fdtrc(d1, d2, F) < 2.2250738585072014e-308  # subnormal
    ref = f_neglog10(F, d1, d2)
    assert float(ref) == pytest.approx(323.5234818082, abs=1e-9)
    nl = -f_logsf(np.array([F]), d1, np.array([d2]))[0] / LN10
    assert nl == pytest.approx(float(ref), rel=1e-12)
    z = z_from_neglog10p(np.array([nl]), "F")[0]
    p = mpmath.mpf(10) ** -ref
    z_ref = mpmath.findroot(lambda x: mpmath.log(mpmath.erfc(x / mpmath.sqrt(2)) / 2)
                            - mpmath.log(p), 38.3)
    assert z == pytest.approx(float(z_ref), rel=1e-10)
    for df in (3.0, 30.0):  # and T likewise (scipy's stdtr is subnormal near 1e-308)
        t = _statistic_at(307.9, lambda x: float(t_neglog10(x, df)))
        assert 0 < special.stdtr(df, -t) < 2.2250738585072014e-308
        got = -t_logsf(np.array([t]), np.array([df]))[0] / LN10
        assert got == pytest.approx(float(t_neglog10(t, df)), rel=1e-12)


def test_tail_is_continuous_at_the_switch_and_large_df_is_accurate():
    """Either side of p = 1e-200 (scipy above, log space below) the values agree; with
    large df (x near 1) the log-space values keep their digits."""
    for d1, d2 in ((2, 40.0), (7, 300.0)):
        F = np.logspace(0, 300, 30001)
        with np.errstate(divide="ignore"):
            p = special.fdtrc(d1, d2, F)
            k = int(np.argmin(np.abs(np.log10(p) + 200)))
        near = slice(k - 3, k + 4)
        np.testing.assert_allclose(f_logsf(F[near], float(d1), np.full(7, d2)),
                                   np.log(p[near]), rtol=1e-12)
    for df in (1e4, 1e5):
        t = _statistic_at(320.0, lambda x: float(t_neglog10(x, df)), 0.0, 3.0)
        got = -t_logsf(np.array([t]), np.array([df]))[0] / LN10
        assert got == pytest.approx(float(t_neglog10(t, df)), rel=1e-11)
