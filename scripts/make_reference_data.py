#!/usr/bin/env python3
"""Write the reference datasets under ``tests/reference/`` (seeded, deterministic).

Each dataset is a folder with the design (``X.csv``, ``factor_<f>.csv``, ``Z_<f>.csv``), the
data (``Y.csv``, NaN for missing) and ``dataset.json`` (names, contrasts, truth); the format is
described in ``tests/reference/README.md``.  The lme4/lmerTest values are written afterwards by
``Rscript scripts/make_reference.R``.

Usage (from the repository root)::

    python3 scripts/make_reference_data.py [--out tests/reference] [name ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpiblmm.simulate import (  # noqa: E402
    Design,
    Factor,
    FactorSpec,
    covariance,
    first_appearance_codes,
    missing_mask,
    simulate_design,
    simulate_voxels,
)

ROOT = Path(__file__).resolve().parents[1]


def _stack(per_voxel: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Turn a list (one dict per voxel) of covariances into arrays (v, q, q) per factor."""
    return {k: np.stack([c[k] for c in per_voxel]) for k in per_voxel[0]}


def _t(name, p, idx_weights):
    w = np.zeros(p)
    for i, x in idx_weights.items():
        w[i] = x
    return {"name": name, "weights": w.tolist()}


def _f(name, p, rows):
    out = []
    for r in rows:
        w = np.zeros(p)
        for i, x in r.items():
            w[i] = x
        out.append(w.tolist())
    return {"name": name, "weights": out}


def _age_time_contrasts(p, all_correlated=True):
    """T contrasts of the intercept, age, time and age + time, the F of age and time and
    (``all_correlated``) an F of three correlated rows, for X = (intercept, age, time, ...)."""
    out = [_t("intercept", p, {0: 1}), _t("age", p, {1: 1}), _t("time", p, {2: 1}),
           _t("age_plus_time", p, {1: 1, 2: 1}), _f("age_time", p, [{1: 1}, {2: 1}])]
    if all_correlated:
        out.append(_f("all_correlated", p, [{0: 1}, {1: 1}, {1: 1, 2: 1}]))
    return out


# ---------------------------------------------------------------------------------------------
# the datasets: each returns (design, Y, truth, kinds, description, contrasts)


def ds_intercept(rng):
    d = simulate_design(rng, 30, 4, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject"),))
    v = 30
    sd = np.concatenate([np.zeros(8), np.full(4, 0.15), np.linspace(0.5, 2.5, 18)])
    kinds = ["zero"] * 8 + ["small"] * 4 + ["interior"] * 18
    covs = _stack([{"subject": covariance([s])} for s in sd])
    beta = np.column_stack([rng.normal(10, 2, v), rng.normal(0, 0.5, v), rng.normal(0, 0.3, v)])
    beta[::5, 1:] = 0.0  # some voxels with no effect
    Y, truth = simulate_voxels(rng, d, v, beta, covs, rng.uniform(0.5, 2.0, v))
    p = d.p
    contrasts = _age_time_contrasts(p)
    return d, Y, truth, kinds, "random intercept per subject, 30 subjects x 4 visits", contrasts


def ds_slope(rng):
    d = simulate_design(rng, 40, 5, fixed=("intercept", "age", "time", "sex"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),))
    v = 30
    per, kinds = [], []
    for i in range(v):
        if i < 5:
            c, k = covariance([rng.uniform(0.8, 1.5), 0.0]), "zero_slope"
        elif i < 9:
            c, k = covariance([rng.uniform(0.5, 1.5), rng.uniform(0.2, 0.5)], 1.0), "corr_one"
        elif i < 11:
            c, k = covariance([0.0, 0.0]), "zero"
        elif i < 13:
            c, k = covariance([0.0, rng.uniform(0.3, 0.6)]), "zero_intercept"
        else:
            c = covariance([rng.uniform(0.6, 2.0), rng.uniform(0.2, 0.7)], rng.uniform(-0.6, 0.6))
            k = "interior"
        per.append({"subject": c})
        kinds.append(k)
    beta = np.column_stack([rng.normal(5, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v),
                            rng.normal(0, 0.5, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v))
    p = d.p
    contrasts = [
        _t("age", p, {1: 1}), _t("time", p, {2: 1}), _t("sex", p, {3: 1}),
        _t("time_minus_age", p, {2: 1, 1: -1}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
        _f("three_correlated", p, [{1: 1}, {2: 1}, {1: 0.5, 2: 0.5, 3: 1}]),
    ]
    return d, Y, truth, kinds, "correlated random intercept and slope per subject, 40 x 5", contrasts


def ds_crossed(rng):
    visits = rng.integers(2, 6, 50)
    d = simulate_design(rng, 50, visits, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject"),
                                 FactorSpec("site", n_levels=6, assign="observation",
                                            concentration=2.0)))
    v = 30
    per, kinds = [], []
    for i in range(v):
        s_sub = 0.0 if i in (0, 1, 2, 6, 7) else rng.uniform(0.4, 1.5)
        s_site = 0.0 if i in (3, 4, 5, 6, 7) else rng.uniform(0.4, 1.5)
        per.append({"subject": covariance([s_sub]), "site": covariance([s_site])})
        kinds.append({(True, True): "zero", (True, False): "zero_subject",
                      (False, True): "zero_site", (False, False): "interior"}[(s_sub == 0, s_site == 0)])
    beta = np.column_stack([rng.normal(3, 1, v), rng.normal(0, 0.5, v), rng.normal(0, 0.3, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v))
    p = d.p
    contrasts = [
        _t("intercept", p, {0: 1}), _t("age", p, {1: 1}), _t("time", p, {2: 1}),
        _t("age_minus_time", p, {1: 1, 2: -1}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
    ]
    desc = "crossed random intercepts: subject (50, 2-5 visits) x site (6, per observation, unbalanced)"
    return d, Y, truth, kinds, desc, contrasts


def ds_three_factors(rng):
    visits = rng.integers(4, 7, 45)
    d = simulate_design(rng, 45, visits, fixed=("intercept", "time", "time2", "sex"),
                        factors=(FactorSpec("subject", effects=("intercept", "time", "time2")),
                                 FactorSpec("site", n_levels=5, assign="subject", concentration=3.0),
                                 FactorSpec("rater", n_levels=8, assign="observation",
                                            effects=("intercept", "time"), concentration=3.0)))
    v = 24
    per, kinds = [], []
    for i in range(v):
        if i < 4:  # subject quadratic variance zero; everything else interior
            sub = covariance([1.0, 0.4, 0.0], np.array([[1, 0.3, 0], [0.3, 1, 0], [0, 0, 1]]))
            site, rater, k = covariance([0.8]), covariance([0.6, 0.2], 0.2), "zero_subject_time2"
        elif i < 7:
            sub = covariance([1.0, 0.3, 0.08], np.array([[1, 0.2, -0.2], [0.2, 1, 0.1], [-0.2, 0.1, 1]]))
            site, rater, k = covariance([0.0]), covariance([0.0, 0.0]), "zero_site_rater"
        elif i < 10:
            sub = covariance([1.2, 0.3, 0.06], np.array([[1, 0.3, -0.3], [0.3, 1, 0.2], [-0.3, 0.2, 1]]))
            site, rater, k = covariance([0.7]), covariance([0.5, 0.25], 1.0), "rater_corr_one"
        else:
            sd = [rng.uniform(0.7, 1.5), rng.uniform(0.2, 0.5), rng.uniform(0.05, 0.12)]
            sub = covariance(sd, np.array([[1, 0.3, -0.3], [0.3, 1, 0.1], [-0.3, 0.1, 1]]))
            site = covariance([rng.uniform(0.5, 1.2)])
            rater = covariance([rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.4)], rng.uniform(-0.5, 0.5))
            k = "interior"
        per.append({"subject": sub, "site": site, "rater": rater})
        kinds.append(k)
    beta = np.column_stack([rng.normal(8, 1, v), rng.normal(0.3, 0.3, v), rng.normal(0, 0.05, v),
                            rng.normal(0, 0.5, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.3, 0.8, v))
    p = d.p
    contrasts = [
        _t("time", p, {1: 1}), _t("time2", p, {2: 1}), _t("sex", p, {3: 1}),
        _t("slope_at_2", p, {1: 1, 2: 4}),
        _f("time_time2", p, [{1: 1}, {2: 1}]),
        _f("three_correlated", p, [{1: 1}, {1: 1, 2: 2}, {2: 1, 3: 1}]),
    ]
    desc = ("three factors: subject (intercept+time+time2), site (intercept, subjects nested), "
            "rater (intercept+time, per observation); 45 subjects x 4-6 visits")
    return d, Y, truth, kinds, desc, contrasts


def ds_missing(rng):
    d = simulate_design(rng, 50, 4, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),))
    v = 36
    frac = np.zeros(v)
    whole = np.zeros(v, dtype=int)
    frac[6:24] = np.linspace(0.05, 0.30, 18)
    whole[24:30] = [1, 1, 2, 2, 3, 3]
    frac[24:30] = [0.0, 0.1, 0.0, 0.15, 0.06, 0.2]
    frac[30:] = [0.1, 0.2, 0.3, 0.05, 0.25, 0.12]
    mask = missing_mask(rng, d, v, fraction=frac, whole_levels=whole)
    per, kinds = [], []
    for i in range(v):
        if i % 6 == 1:
            c, k = covariance([rng.uniform(0.8, 1.5), 0.0]), "zero_slope"
        elif i % 6 == 4:
            c, k = covariance([0.0, 0.0]), "zero"
        else:
            c = covariance([rng.uniform(0.6, 2.0), rng.uniform(0.2, 0.6)], rng.uniform(-0.5, 0.5))
            k = "interior"
        per.append({"subject": c})
        kinds.append(k)
    big = (np.arange(v) % 3) == 2
    beta = np.column_stack([np.where(big, 1000.0, 0.0) + rng.normal(5, 1, v),
                            rng.normal(0, 0.5, v), rng.normal(0.1, 0.3, v)])
    s2 = rng.uniform(0.5, 1.5, v)
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), s2, missing=mask)
    kinds = [k + ("_large_mean" if b else "") for k, b in zip(kinds, big)]
    p = d.p
    contrasts = [
        _t("intercept", p, {0: 1}), _t("age", p, {1: 1}), _t("time", p, {2: 1}),
        _t("age_plus_2time", p, {1: 1, 2: 2}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
        _f("all_correlated", p, [{0: 1, 1: 1}, {1: 1}, {1: 1, 2: 1}]),
    ]
    desc = ("intercept+slope per subject, 50 x 4; voxels 0-5 complete, 6-23 missing 5-30% of rows, "
            "24-29 missing 1-3 whole subjects (+ rows), 30-35 missing 5-30%; every third voxel has "
            "mean ~1000")
    return d, Y, truth, kinds, desc, contrasts


def ds_nested(rng):
    visits = rng.integers(3, 6, 40)
    d = simulate_design(rng, 40, visits, fixed=("intercept", "age", "group"),
                        factors=(FactorSpec("subject"),
                                 FactorSpec("site", n_levels=6, assign="subject"),
                                 FactorSpec("scanner", n_levels=2, assign="observation",
                                            nested_in="site", prefix="scan")))
    v = 30
    per, kinds = [], []
    for i in range(v):
        s_sub = 0.0 if i in (0, 1) else rng.uniform(0.5, 1.5)
        s_site = 0.0 if i in (2, 3, 4, 8) else rng.uniform(0.5, 1.5)
        s_scan = 0.0 if i in (5, 6, 7, 8) else rng.uniform(0.3, 1.0)
        per.append({"subject": covariance([s_sub]), "site": covariance([s_site]),
                    "scanner": covariance([s_scan])})
        z = [n for n, s in (("subject", s_sub), ("site", s_site), ("scanner", s_scan)) if s == 0]
        kinds.append("zero_" + "_".join(z) if z else "interior")
    beta = np.column_stack([rng.normal(4, 1, v), rng.normal(0, 0.5, v), rng.normal(0, 0.8, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v))
    p = d.p
    contrasts = [
        _t("intercept", p, {0: 1}), _t("age", p, {1: 1}), _t("group", p, {2: 1}),
        _t("age_plus_group", p, {1: 1, 2: 1}),
        _f("age_group", p, [{1: 1}, {2: 1}]),
    ]
    desc = ("subject, site (6, subjects nested) and scanner nested in site (2 per site, labels "
            "'<site>_scanN' unique, drawn per observation); 40 subjects x 3-5 visits")
    return d, Y, truth, kinds, desc, contrasts


def ds_unbalanced(rng):
    # visits per subject: many singletons, some long series
    visits = np.concatenate([np.ones(15, int), rng.integers(2, 4, 15), rng.integers(6, 11, 10)])
    visits = visits[rng.permutation(visits.size)]
    d = simulate_design(rng, visits.size, visits, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),
                                 FactorSpec("centre", n_levels=7, assign="observation",
                                            probs=[0.45, 0.3, 0.15, 0.06, 0.03, 0.007, 0.003])))
    v = 30
    per, kinds = [], []
    for i in range(v):
        if i < 4:
            sub, k = covariance([1.0, 0.0]), "zero_slope"
        elif i < 7:
            sub, k = covariance([1.0, 0.3], 1.0), "corr_one"
        else:
            sub = covariance([rng.uniform(0.6, 1.6), rng.uniform(0.2, 0.5)], rng.uniform(-0.5, 0.5))
            k = "interior"
        cen = covariance([0.0 if i in (0, 7, 8, 9) else rng.uniform(0.4, 1.2)])
        if i in (7, 8, 9):
            k = "zero_centre"
        per.append({"subject": sub, "centre": cen})
        kinds.append(k)
    beta = np.column_stack([rng.normal(6, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v))
    p = d.p
    contrasts = _age_time_contrasts(p, all_correlated=False)
    desc = ("unbalanced: 40 subjects with 1 (15 of them) to 10 visits, intercept+slope per subject; "
            "centre (7 levels, per observation, very unequal sizes incl. singletons)")
    return d, Y, truth, kinds, desc, contrasts


def ds_three_effects(rng):
    """One factor with three random effects (q = 3): the single-factor path's general case."""
    d = simulate_design(rng, 45, 5, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject", effects=("intercept", "time", "time2")),))
    v = 24
    frac = np.where(np.arange(v) >= 16, 0.1, 0.0)          # voxels 16-23 miss 10% of rows
    mask = missing_mask(rng, d, v, fraction=frac)
    per, kinds = [], []
    for i in range(v):
        if i % 4 == 1:
            c, k = covariance([rng.uniform(0.8, 1.5), rng.uniform(0.2, 0.4), 0.0]), "zero_time2"
        elif i % 4 == 3:
            c, k = covariance([rng.uniform(0.8, 1.5), 0.0, 0.0]), "intercept_only"
        else:
            corr = np.array([[1.0, 0.3, -0.2], [0.3, 1.0, 0.1], [-0.2, 0.1, 1.0]])
            c = covariance([rng.uniform(0.6, 2.0), rng.uniform(0.2, 0.5), rng.uniform(0.05, 0.15)],
                           corr)
            k = "interior"
        per.append({"subject": c})
        kinds.append(k)
    beta = np.column_stack([rng.normal(5, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v),
                               missing=mask)
    p = d.p
    contrasts = [
        _t("age", p, {1: 1}), _t("time", p, {2: 1}), _t("time_minus_age", p, {2: 1, 1: -1}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
    ]
    desc = ("random intercept, time and time^2 per subject (q = 3), 45 x 5; voxels 16-23 miss "
            "10% of rows")
    return d, Y, truth, kinds, desc, contrasts


def _factor(name, labels, Z, effects):
    """A grouping factor from per-row labels (codes in order of first appearance)."""
    labels = np.asarray(labels)
    codes, levels = first_appearance_codes(labels)
    return Factor(name, labels, codes, tuple(levels), tuple(effects), np.asarray(Z, float))


def _with_factors(d, factors):
    """``d`` with its grouping factors replaced (designs simulate_design cannot draw)."""
    return Design(X=d.X, fixed_names=d.fixed_names, factors=tuple(factors),
                  covariates=d.covariates)


def _families_in_sites(rng, d, n_sub: int, size_p: list, n_sites: int):
    """``d`` with site and family factors (one effect each) before its subject factor:
    subjects, in random order, grouped into families of 1, 2 or 3 (probabilities
    ``size_p``), families in ``n_sites`` unequal sites (Dirichlet(4) probabilities, at least 2
    families each); labels ``siteNN`` and ``siteNN_famK``.  Returns ``(d, n_families)``."""
    order = rng.permutation(n_sub)
    sizes = []
    while sum(sizes) < n_sub:
        sizes.append(int(rng.choice([1, 2, 3], p=size_p)))
    sizes[-1] -= sum(sizes) - n_sub
    fam_of = np.empty(n_sub, int)
    start = 0
    for k, s in enumerate(sizes):
        fam_of[order[start:start + s]] = k
        start += s
    n_fam = len(sizes)
    while True:
        site_of_fam = rng.choice(n_sites, size=n_fam, p=rng.dirichlet(np.full(n_sites, 4.0)))
        if np.bincount(site_of_fam, minlength=n_sites).min() >= 2:
            break
    per_site = np.zeros(n_sites, int)
    fam_label = []
    for k in range(n_fam):
        per_site[site_of_fam[k]] += 1
        fam_label.append(f"site{site_of_fam[k] + 1:02d}_fam{per_site[site_of_fam[k]]}")
    subj = d.covariates["subject"]
    site_labels = np.array([f"site{site_of_fam[fam_of[s]] + 1:02d}" for s in subj])
    fam_labels = np.array([fam_label[fam_of[s]] for s in subj])
    sub = d.factor("subject")
    ones = np.ones((d.n, 1))
    d = _with_factors(d, [_factor("site", site_labels, ones, ("intercept",)),
                          _factor("family", fam_labels, ones, ("intercept",)),
                          sub])
    return d, n_fam


def _family_voxels(rng, d, per: list, missing: list, whole: list):
    """Voxels of a site / family / subject study with fixed effects intercept, age, time, sex:
    the voxels ``missing`` lose 10% of their rows, those in ``whole`` first a whole family;
    ``per`` the covariances per voxel.  Returns ``(Y, truth, contrasts)``."""
    v = len(per)
    frac = np.zeros(v)
    frac[missing] = 0.1
    lose = np.zeros(v, int)
    lose[whole] = 1
    mask = missing_mask(rng, d, v, fraction=frac, whole_levels=lose, factor="family")
    beta = np.column_stack([rng.normal(6, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v),
                            rng.normal(0, 0.5, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.2, 0.5, v),
                               missing=mask)
    p = d.p
    contrasts = [
        _t("age", p, {1: 1}), _t("time", p, {2: 1}), _t("sex", p, {3: 1}),
        _t("time_minus_age", p, {2: 1, 1: -1}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
        _f("three_correlated", p, [{1: 1}, {2: 1}, {1: 0.5, 2: 0.5, 3: 1}]),
    ]
    return Y, truth, contrasts


def ds_nested_slope(rng):
    """Three nested factors: subjects (intercept + time) in families (1-3 subjects) in sites."""
    n_sub = 54
    visits = rng.choice([3, 4], size=n_sub, p=[0.35, 0.65])
    d = simulate_design(rng, n_sub, visits, fixed=("intercept", "age", "time", "sex"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),))
    # families of 1-3 subjects (subjects in random order), families in 6 unequal sites
    d, n_fam = _families_in_sites(rng, d, n_sub, [0.25, 0.4, 0.35], 6)
    v = 24
    per, kinds = [], []
    for i in range(v):
        s_site, s_fam = rng.uniform(0.9, 1.6), rng.uniform(0.8, 1.4)
        sub_c = covariance([rng.uniform(0.6, 1.2), rng.uniform(0.3, 0.6)], rng.uniform(-0.5, 0.5))
        k = "interior"
        if i < 4:
            s_site, k = 0.0, "zero_site"
        elif i < 7:
            s_fam, k = 0.0, "zero_family"
        elif i < 10:
            sub_c, k = covariance([rng.uniform(0.8, 1.5), 0.0]), "zero_slope"
        elif i < 12:
            sub_c, k = covariance([rng.uniform(0.6, 1.2), rng.uniform(0.3, 0.5)], 1.0), "corr_one"
        elif i == 12:
            s_site, s_fam, k = 0.0, 0.0, "zero_site_family"
        per.append({"site": covariance([s_site]), "family": covariance([s_fam]),
                    "subject": sub_c})
        kinds.append(k)
    # missing: voxels 3, 6, 9 (boundary) and 18-23 lose 10% of rows; 21 and 22 first a whole
    # family (its levels then drop out of the fit)
    Y, truth, contrasts = _family_voxels(rng, d, per, [3, 6, 9, 18, 19, 20, 21, 22, 23], [21, 22])
    desc = (f"(1 | site) + (1 | family) + (1 + time | subject): {n_sub} subjects x 3-4 visits in "
            f"{n_fam} families of 1-3 subjects in 6 sites (nested, labels unique); voxels 3, 6, "
            "9, 18-23 miss 10% of rows, 21-22 first a whole family")
    return d, Y, truth, kinds, desc, contrasts


def ds_nested_intercepts(rng):
    """Three nested one-effect factors, ABCD-like in small: subjects (2-3 visits) in families
    (1-3 subjects) in sites; the compiled kernel of the blocked path fits it."""
    n_sub = 60
    visits = rng.choice([2, 3], size=n_sub, p=[0.6, 0.4])
    d = simulate_design(rng, n_sub, visits, fixed=("intercept", "age", "time", "sex"),
                        factors=(FactorSpec("subject", effects=("intercept",)),))
    d, n_fam = _families_in_sites(rng, d, n_sub, [0.4, 0.4, 0.2], 7)
    v = 24
    per, kinds = [], []
    for i in range(v):
        s_site, s_fam, s_sub = rng.uniform(0.8, 1.5), rng.uniform(0.6, 1.3), rng.uniform(0.6, 1.2)
        k = "interior"
        if i < 4:
            s_site, k = 0.0, "zero_site"
        elif i < 7:
            s_fam, k = 0.0, "zero_family"
        elif i < 10:
            s_sub, k = 0.0, "zero_subject"
        elif i == 10:
            s_site, s_fam, k = 0.0, 0.0, "zero_site_family"
        elif i == 11:
            s_site, s_fam, s_sub, k = 0.0, 0.0, 0.0, "no_random_effects"
        per.append({"site": covariance([s_site]), "family": covariance([s_fam]),
                    "subject": covariance([s_sub])})
        kinds.append(k)
    # missing: voxels 2, 5, 8 (boundary) and 16-23 lose 10% of rows; 20 and 21 first a whole
    # family (its levels then drop out of the fit)
    Y, truth, contrasts = _family_voxels(rng, d, per, [2, 5, 8, 16, 17, 18, 19, 20, 21, 22, 23],
                                         [20, 21])
    desc = (f"(1 | site) + (1 | family) + (1 | subject): {n_sub} subjects x 2-3 visits in "
            f"{n_fam} families of 1-3 subjects in 7 sites (nested, labels unique; the compiled "
            "kernel's design); voxels 2, 5, 8, 16-23 miss 10% of rows, 20-21 first a whole family")
    return d, Y, truth, kinds, desc, contrasts


def ds_crossed_slope(rng):
    """Subjects (intercept + time) partially crossed with items: each sees 6 of 12 items."""
    n_sub, n_items, per_sub = 40, 12, 6
    d = simulate_design(rng, n_sub, per_sub, fixed=("intercept", "age", "time", "group"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),))
    probs = rng.dirichlet(np.full(n_items, 4.0))  # some items seen more often than others
    items = np.concatenate([rng.choice(n_items, size=per_sub, replace=False, p=probs)
                            for _ in range(n_sub)])
    item_labels = np.array([f"item{j + 1:02d}" for j in items])
    d = _with_factors(d, [d.factor("subject"),
                          _factor("item", item_labels, np.ones((d.n, 1)), ("intercept",))])
    v = 24
    per, kinds = [], []
    for i in range(v):
        s_item = rng.uniform(0.4, 1.2)
        sub_c = covariance([rng.uniform(0.6, 1.5), rng.uniform(0.15, 0.4)], rng.uniform(-0.5, 0.5))
        k = "interior"
        if i < 4:
            s_item, k = 0.0, "zero_item"
        elif i < 7:
            sub_c, k = covariance([rng.uniform(0.8, 1.5), 0.0]), "zero_slope"
        elif i < 9:
            sub_c, k = covariance([rng.uniform(0.6, 1.2), rng.uniform(0.15, 0.3)], -1.0), "corr_one"
        elif i == 9:
            sub_c, k = covariance([0.0, 0.0]), "zero_subject"
        per.append({"subject": sub_c, "item": covariance([s_item])})
        kinds.append(k)
    # missing: voxels 2, 5, 9 (boundary) and 17-23 lose 10% of rows; 21 and 22 first a whole item
    frac = np.zeros(v)
    frac[[2, 5, 9, 17, 18, 19, 20, 21, 22, 23]] = 0.1
    whole = np.zeros(v, int)
    whole[[21, 22]] = 1
    mask = missing_mask(rng, d, v, fraction=frac, whole_levels=whole, factor="item")
    beta = np.column_stack([rng.normal(4, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v),
                            rng.normal(0, 0.6, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.3, 0.8, v),
                               missing=mask)
    p = d.p
    contrasts = [
        _t("age", p, {1: 1}), _t("time", p, {2: 1}), _t("group", p, {3: 1}),
        _t("time_plus_group", p, {2: 1, 3: 1}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
        _f("three_correlated", p, [{1: 1}, {1: 1, 2: 1}, {2: 1, 3: 1}]),
    ]
    desc = (f"(1 + time | subject) + (1 | item): {n_sub} subjects x {per_sub} visits, each visit "
            f"one item, each subject a random subset of {per_sub} of {n_items} items (unequal "
            "item frequencies); voxels 2, 5, 9, 17-23 miss 10% of rows, 21-22 first a whole item")
    return d, Y, truth, kinds, desc, contrasts


def _slope_voxels(rng, v: int, per_unit=(1.0, 1.0)):
    """Subject covariances of an intercept and a slope for ``v`` voxels: 4 with a zero slope
    variance, 2 all zero, the rest interior; the slope's units ``per_unit`` (per year -> per
    day: 365.25)."""
    per_unit = np.asarray(per_unit, dtype=float)
    per, kinds = [], []
    for i in range(v):
        if i < 4:
            c, k = covariance([rng.uniform(0.6, 1.2), 0.0]), "zero_slope"
        elif i < 6:
            c, k = covariance([0.0, 0.0]), "zero"
        else:
            c = covariance([rng.uniform(0.5, 1.5), rng.uniform(0.2, 0.5)], rng.uniform(-0.5, 0.5))
            k = "interior"
        per.append({"subject": c / np.outer(per_unit, per_unit)})
        kinds.append(k)
    return per, kinds


def ds_scaled(rng):
    """Covariates in the units users keep them in: head size in mm^3 (~1.5e6) next to the
    intercept, time in days and age cubed (years^3 ~1e5).  X'X spans ~20 orders of magnitude
    though X is well conditioned once its columns are scaled: every voxel must be fitted
    (lme4 only warns that predictors are on very different scales)."""
    base = simulate_design(rng, 30, 4, fixed=("intercept", "age", "time"),
                           factors=(FactorSpec("subject", effects=("intercept", "time")),))
    subj = base.covariates["subject"]
    icv = rng.normal(1.5e6, 1.2e5, int(subj.max()) + 1)[subj]       # mm^3, one per subject
    age_years = 50.0 + 10.0 * base.X[:, 1]
    days = 365.25 * base.X[:, 2]
    X = np.column_stack([np.ones(base.n), age_years ** 3, icv, days])
    d = Design(X, ("intercept", "age3", "icv", "days"), base.factors, base.covariates)
    v = 24
    per, kinds = _slope_voxels(rng, v)
    beta = np.column_stack([rng.normal(5, 1, v), rng.normal(0, 2e-6, v), rng.normal(0, 1e-6, v),
                            rng.normal(0, 5e-4, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v))
    p = d.p
    contrasts = [
        _t("age3", p, {1: 1}), _t("icv", p, {2: 1}), _t("days", p, {3: 1}),
        _f("icv_days", p, [{2: 1}, {3: 1}]),
    ]
    return (d, Y, truth, kinds, "badly scaled covariates (mm^3, days, years^3), random "
            "intercept and slope per subject, 30 x 4", contrasts)


def ds_days(rng):
    """The random slope in the units users keep it in: ``(1 + days | subject)``, time in days
    (~700) next to the intercept, so D's entries are ~1e6 apart; slope variances small per
    day but far from zero (the fit scales such covariates, ``lmm/effect_scale.py``)."""
    d = simulate_design(rng, 30, 4, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),))
    per_day = np.array([1.0, 365.25])
    f = d.factors[0]
    days = dataclasses.replace(f, Z=f.Z * per_day, effect_names=("intercept", "days"))
    X = d.X * np.array([1.0, 1.0, 365.25])
    d = Design(X, ("intercept", "age", "days"), (days,), d.covariates)
    v = 24
    per, kinds = _slope_voxels(rng, v, per_day)         # per year -> per day
    beta = np.column_stack([rng.normal(5, 1, v), rng.normal(0, 0.5, v),
                            rng.normal(0.2, 0.3, v) / 365.25])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.5, 1.5, v))
    p = d.p
    contrasts = [_t("age", p, {1: 1}), _t("days", p, {2: 1}), _t("age_plus_days", p, {1: 1, 2: 1}),
                 _f("age_days", p, [{1: 1}, {2: 1}])]
    return (d, Y, truth, kinds, "random intercept and slope per subject with time in days "
            "(~700), 30 x 4", contrasts)


def _kept_voxels(Y, truth, kinds, keep):
    """The voxels ``keep`` of drawn data, truth and kinds (a search's finds among the draws)."""
    truth = dataclasses.replace(
        truth, beta=truth.beta[keep], sigma2=truth.sigma2[keep], missing=truth.missing[:, keep],
        covariances={k: c[keep] for k, c in truth.covariances.items()},
        random_effects={k: e[keep] for k, e in truth.random_effects.items()})
    return Y[:, keep], truth, [kinds[j] for j in keep]


#: ``local_optima``: of the 900 voxels drawn, the first 30 and those where the several-factor
#: estimator, started from the factors' own fits, stopped at a boundary local optimum below
#: lme4's log-likelihood (found by a search over seeds and designs; restarted from lme4's
#: start, identity ``Lambda_k``, each reached lme4's fit), by method.
LOCAL_OPTIMA = {"REML": [355, 464, 768], "ML": [209, 268, 667, 768]}
LOCAL_OPTIMA_KEEP = sorted(set(range(30)) | set(LOCAL_OPTIMA["REML"]) | set(LOCAL_OPTIMA["ML"]))


def ds_local_optima(rng):
    """``(1 | subject) + (1 | scanner) + (1 | rater)``, three crossed factors (scanner and
    rater drawn per visit), 20-60% of the rows of each voxel missing: kept are voxels where
    the blocked estimator stopped at a local optimum on the boundary (status 2), 0.01-0.4
    below lme4's log-likelihood, next to ordinary ones."""
    n_sub, n_scan = int(rng.integers(20, 28)), int(rng.integers(3, 5))
    n_rater = int(rng.integers(3, 6))
    visits = rng.integers(3, 7, n_sub)
    d = simulate_design(rng, n_sub, visits, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject"),
                                 FactorSpec("scanner", n_levels=n_scan, assign="observation",
                                            concentration=3.0),
                                 FactorSpec("rater", n_levels=n_rater, assign="observation",
                                            concentration=3.0)))
    names = ("subject", "scanner", "rater")
    v = 900                                 # drawn; LOCAL_OPTIMA_KEEP of them are kept
    per, kinds = [], []
    for _ in range(v):
        size = rng.integers(0, 3, 3)        # per factor: zero, small or moderate variance
        sd = [[0.0, rng.uniform(0.05, 0.3), rng.uniform(0.3, 1.2)][size[k]] for k in range(3)]
        per.append({n: covariance([s]) for n, s in zip(names, sd)})
        z = [n for n, s in zip(names, sd) if s == 0]
        kinds.append("zero_" + "_".join(z) if z else "interior")
    mask = missing_mask(rng, d, v, fraction=rng.uniform(0.2, 0.6, v))
    beta = np.column_stack([rng.normal(5, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.3, 1.0, v),
                               missing=mask)
    keep = np.array(LOCAL_OPTIMA_KEEP)
    Y, truth, kinds = _kept_voxels(Y, truth, kinds, keep)
    p = d.p
    contrasts = _age_time_contrasts(p)
    at = {m: ", ".join(str(LOCAL_OPTIMA_KEEP.index(j)) for j in js)
          for m, js in LOCAL_OPTIMA.items()}
    desc = (f"(1 | subject) + (1 | scanner) + (1 | rater), crossed: {n_sub} subjects x 3-6 "
            f"visits, scanner ({n_scan}) and rater ({n_rater}) drawn per visit; each voxel "
            "misses 20-60% of rows; zero, small or moderate variances; "
            f"{keep.size} of {v} voxels drawn: the first 30, and those where the blocked "
            "estimator, started from the factors' own fits, stops at a boundary local optimum "
            "(status 2) 0.01-0.4 below lme4's log-likelihood: voxels "
            f"{at['REML']} (REML) and {at['ML']} (ML); from lme4's identity start they reach "
            "lme4's optimum")
    return d, Y, truth, kinds, desc, contrasts


#: ``local_optima_slope``: of the 300 voxels drawn, the first 30 (but 12 and 13, whose
#: observations do not exceed twice their observed subjects: not identifiable, status 9) and
#: the others where the several-factor estimator stopped at a boundary local optimum below
#: lme4's log-likelihood (found and confirmed as for ``local_optima``), by method (ML 2, 4
#: and 33 are among the first 30).
LOCAL_OPTIMA_SLOPE = {"REML": [27, 147, 155], "ML": [2, 4, 33]}
LOCAL_OPTIMA_SLOPE_KEEP = sorted((set(range(30)) - {12, 13}) | set(LOCAL_OPTIMA_SLOPE["REML"])
                                 | set(LOCAL_OPTIMA_SLOPE["ML"]))


def ds_local_optima_slope(rng):
    """``(1 + time | subject) + (1 | site)``, subjects nested in sites, 3-5 visits, 30-60% of
    the rows of each voxel missing: kept are voxels where the blocked estimator stopped at a
    local optimum on the boundary (status 2), 0.01-0.2 below lme4's log-likelihood, next to
    ordinary ones."""
    n_sub, n_site = int(rng.integers(20, 41)), int(rng.integers(3, 7))
    visits = rng.integers(3, 6, n_sub)
    d = simulate_design(rng, n_sub, visits, fixed=("intercept", "age", "time", "sex"),
                        factors=(FactorSpec("subject", effects=("intercept", "time")),
                                 FactorSpec("site", n_levels=n_site, assign="subject",
                                            concentration=3.0)))
    v = 300                                 # drawn; LOCAL_OPTIMA_SLOPE_KEEP of them are kept
    per, kinds = [], []
    for _ in range(v):
        size = rng.integers(0, 3, 3)        # per variance: zero, small or moderate
        s_int = [0.0, rng.uniform(0.1, 0.5), rng.uniform(0.5, 1.5)][size[0]]
        s_slope = [0.0, rng.uniform(0.02, 0.2), rng.uniform(0.2, 0.5)][size[1]]
        s_site = [0.0, rng.uniform(0.05, 0.3), rng.uniform(0.3, 1.0)][size[2]]
        per.append({"subject": covariance([s_int, s_slope], rng.uniform(-0.8, 0.8)),
                    "site": covariance([s_site])})
        z = [n for n, s in (("intercept", s_int), ("slope", s_slope), ("site", s_site)) if s == 0]
        kinds.append("zero_" + "_".join(z) if z else "interior")
    mask = missing_mask(rng, d, v, fraction=rng.uniform(0.3, 0.6, v))
    beta = np.column_stack([rng.normal(5, 1, v), rng.normal(0, 0.5, v), rng.normal(0.2, 0.3, v),
                            rng.normal(0, 0.5, v)])
    Y, truth = simulate_voxels(rng, d, v, beta, _stack(per), rng.uniform(0.3, 1.0, v),
                               missing=mask)
    keep = np.array(LOCAL_OPTIMA_SLOPE_KEEP)
    Y, truth, kinds = _kept_voxels(Y, truth, kinds, keep)
    p = d.p
    contrasts = [
        _t("age", p, {1: 1}), _t("time", p, {2: 1}), _t("sex", p, {3: 1}),
        _t("time_minus_age", p, {2: 1, 1: -1}),
        _f("age_time", p, [{1: 1}, {2: 1}]),
        _f("three_correlated", p, [{1: 1}, {2: 1}, {1: 0.5, 2: 0.5, 3: 1}]),
    ]
    at = {m: ", ".join(str(LOCAL_OPTIMA_SLOPE_KEEP.index(j)) for j in js)
          for m, js in LOCAL_OPTIMA_SLOPE.items()}
    desc = (f"(1 + time | subject) + (1 | site): {n_sub} subjects x 3-5 visits nested in "
            f"{n_site} sites, each voxel missing 30-60% of rows; zero, small or moderate "
            f"intercept, slope and site variances; {keep.size} of {v} voxels drawn: the first "
            "30 but two not identifiable, and those where the blocked estimator, started from "
            "the factors' own fits, stops at a boundary local optimum (status 2) 0.005-0.2 "
            "below lme4's log-likelihood: voxels "
            f"{at['REML']} (REML) and {at['ML']} (ML); from lme4's identity start they reach "
            "lme4's optimum")
    return d, Y, truth, kinds, desc, contrasts


#: ``few_repeats``: of the 600 voxels drawn, the first identifiable ones and those where
#: Fisher Scoring from ``D = 0`` stopped below lme4's log-likelihood -- at ``D = 0`` (a local
#: maximum there, or REML's profiled information not positive definite) or, when stopped
#: early, inside -- before the probes of ``mpiblmm/lmm/probe.py`` (found by comparing every
#: drawn voxel with lme4, best of two optimisers).
FEW_REPEATS = {"REML": [33, 40, 51, 268, 319, 390, 409, 594],
               "ML": [4, 40, 268, 388, 409, 430, 571]}
FEW_REPEATS_KEEP = sorted(set(range(24)) | set(FEW_REPEATS["REML"]) | set(FEW_REPEATS["ML"]))


def ds_few_repeats(rng):
    """``(1 | subject)``, 10 subjects x 4 visits, each voxel observed on 11-16 of its 40
    rows: a factor barely identified (most subjects seen once or twice), where the REML
    profile can have a local maximum at zero variance and its global one far inside."""
    d = simulate_design(rng, 10, 4, fixed=("intercept", "age", "time"),
                        factors=(FactorSpec("subject"),))
    v = 600                               # drawn; FEW_REPEATS_KEEP of them are kept
    kept_rows = rng.integers(11, 17, v)
    mask = missing_mask(rng, d, v, fraction=1.0 - kept_rows / d.n)
    sd = rng.choice([0.0, 1.0, 3.0, 10.0], v)
    kinds = ["zero" if s == 0 else "interior" for s in sd]
    beta = np.column_stack([rng.normal(1000, 5, v), rng.normal(0, 0.5, v),
                            rng.normal(0.2, 0.3, v)])
    s2 = rng.choice([0.01, 1.0, 25.0], v)
    Y, truth = simulate_voxels(rng, d, v, beta, _stack([{"subject": covariance([x])} for x in sd]),
                               s2, missing=mask)
    keep = np.array(FEW_REPEATS_KEEP)
    Y, truth, kinds = _kept_voxels(Y, truth, kinds, keep)
    p = d.p
    contrasts = _age_time_contrasts(p, all_correlated=False)
    at = {m: ", ".join(str(FEW_REPEATS_KEEP.index(j)) for j in js)
          for m, js in FEW_REPEATS.items()}
    desc = ("(1 | subject), 10 subjects x 4 visits, each voxel observed on 11-16 rows; "
            f"{keep.size} of {v} voxels drawn: the first 24 (all identifiable) and those "
            "where Fisher Scoring from D = 0 and the polish stopped 0.002-11 below lme4's "
            "log-likelihood (a local maximum at zero variance, or REML's profiled information "
            f"not positive definite): voxels {at['REML']} (REML) and {at['ML']} (ML)")
    return d, Y, truth, kinds, desc, contrasts


def _check_unbalanced(d):
    counts = [np.bincount(f.codes) for f in d.factors]
    return all(np.any(c == 1) for c in counts) and all(c.max() >= 8 for c in counts)


DATASETS = {
    "intercept": (ds_intercept, 101),
    "slope": (ds_slope, 102),
    "crossed": (ds_crossed, 103),
    "three_factors": (ds_three_factors, 104),
    "missing": (ds_missing, 105),
    "nested": (ds_nested, 106),
    "unbalanced": (ds_unbalanced, 107),
    "three_effects": (ds_three_effects, 108),
    "nested_slope": (ds_nested_slope, 109),
    "crossed_slope": (ds_crossed_slope, 110),
    "nested_intercepts": (ds_nested_intercepts, 111),
    "scaled": (ds_scaled, 112),
    "days": (ds_days, 113),
    "local_optima": (ds_local_optima, 139),
    "local_optima_slope": (ds_local_optima_slope, 225),
    "few_repeats": (ds_few_repeats, 226),
}


# ---------------------------------------------------------------------------------------------


def _write_matrix(path: Path, a: np.ndarray) -> None:
    """CSV without header; 12 significant digits (the file *is* the data for both R and Python)."""
    a = np.atleast_2d(a.T).T if a.ndim == 1 else a
    with open(path, "w") as fh:
        for row in a:
            fh.write(",".join("NaN" if not np.isfinite(x) else f"{x:.12g}" for x in row) + "\n")


def build(name: str):
    """Build dataset ``name`` deterministically; returns everything written."""
    fn, seed = DATASETS[name]
    attempt = 0
    while True:
        rng = np.random.default_rng([seed, attempt])
        d, Y, truth, kinds, desc, contrasts = fn(rng)
        if name != "unbalanced" or _check_unbalanced(d):
            return d, Y, truth, kinds, desc, contrasts
        attempt += 1


def write(name: str, out: Path) -> None:
    d, Y, truth, kinds, desc, contrasts = build(name)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    # round-trip through the text form so that truth/summary are of the written data
    _write_matrix(folder / "X.csv", d.X)
    _write_matrix(folder / "Y.csv", Y)
    for f in d.factors:
        (folder / f"factor_{f.name}.csv").write_text("".join(f"{lab}\n" for lab in f.labels))
        _write_matrix(folder / f"Z_{f.name}.csv", f.Z)
    meta = {
        "name": name,
        "description": desc,
        "seed": DATASETS[name][1],
        "n": d.n,
        "n_voxels": Y.shape[1],
        "fixed_names": list(d.fixed_names),
        "factors": [{"name": f.name, "effect_names": list(f.effect_names),
                     "n_levels": f.n_levels} for f in d.factors],
        "contrasts": contrasts,
        "truth": {
            "beta": truth.beta.tolist(),
            "sigma2": truth.sigma2.tolist(),
            "cov": {k: c.tolist() for k, c in truth.covariances.items()},
            "voxel_kind": kinds,
            "n_missing": truth.missing.sum(axis=0).tolist(),
        },
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: n={d.n} p={d.p} v={Y.shape[1]} "
          + " ".join(f"{f.name}(l={f.n_levels},q={f.n_effects})" for f in d.factors))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(DATASETS), help="datasets (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "reference")
    args = ap.parse_args(argv)
    for name in args.names:
        write(name, args.out)


if __name__ == "__main__":
    main()
