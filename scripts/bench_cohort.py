#!/usr/bin/env python3
"""Benchmark several random factors at cohort scale (issue 9): blocked vs dense vs lme4.

Designs (REML, simulated voxels, a quarter of them without random effects so the boundary is
exercised; complete data):

- ``a``: 1,000 subjects x 2 visits in 20 sites, ``(1 | site) + (1 | subject)`` (q = 1,020);
- ``b``: ABCD-like, 10,000 subjects x 2 visits in 8,000 families in 21 sites,
  ``(1 | site) + (1 | family) + (1 | subject)`` (q = 18,021);
- ``c``: n = 1,000, 100 subjects crossed with 20 raters, ``(1 | subject) + (1 | rater)``
  (the ``crossed`` design of ``bench_estimator.py``).

For each: ms/voxel (CPU time of this process) of the fit plus the Satterthwaite setup and one
T contrast (what lme4 + lmerTest do), peak working memory per voxel (tracemalloc, product forms
excluded), mean iterations, evaluations per voxel (blocked factorisations, and how many of
them also gave the analytic gradient); the dense path on ``--dense-voxels`` voxels where its
q x q system fits in memory (q <= 2,000), measured in the same run; and with ``Rscript`` (lme4, lmerTest)
lmerTest's ``lmer`` on the first ``--r-voxels`` voxels, its ratio to ours and the worst
log-likelihood difference (ours - lme4).  BLAS threads pinned to 1.  Prints figures only.

Usage::

    python3 scripts/bench_cohort.py [--voxels 200] [--dense-voxels 4] [--r-voxels 5]
        [--designs a b c]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_estimator import run_r, simulate  # noqa: E402

from mpiblmm.allocator import keep_freed_memory  # noqa: E402
from mpiblmm.lmm.estimate import fit  # noqa: E402
from mpiblmm.lmm.inference import t_contrast  # noqa: E402
from mpiblmm.lmm.products import product_forms, random_design  # noqa: E402
from mpiblmm.lmm.satterthwaite import satterthwaite_setup  # noqa: E402
from mpiblmm.lmm.blocked import cholesky as _chol, gradient as _grad, kernel as _kernel  # noqa: E402,E501

#: voxel-evaluations of the blocked path (factorisations, and those with the gradient)
COUNTS = {"eval": 0, "grad": 0}


def _counting(module, name, key):
    inner = getattr(module, name)

    def wrapped(pattern, *args, **kwargs):
        COUNTS[key] += args[-1] if key == "grad" else args[-1].shape[0]
        return inner(pattern, *args, **kwargs)
    setattr(module, name, wrapped)


_counting(_chol, "factorise", "eval")            # (pattern, prep, theta)
_counting(_grad, "selected_inverse", "grad")     # (pattern, fac, v)
_kernel_evaluate = _kernel.evaluate


def _counting_kernel(pattern, prep, theta, gradient):
    COUNTS["eval"] += theta.shape[0]
    COUNTS["grad"] += theta.shape[0] if gradient else 0
    return _kernel_evaluate(pattern, prep, theta, gradient)


_kernel.evaluate = _counting_kernel              # the compiled path (one-effect factors)

DENSE_MAX_Q = 2000


def design(name: str, rng: np.random.Generator):
    """X, RandomDesign, a data frame (dict of columns) and the lme4 formula."""
    if name in ("a", "b"):
        n_sub, n_site = (1000, 20) if name == "a" else (10000, 21)
        sub = np.repeat(np.arange(n_sub), 2)
        visit = np.tile([0.0, 1.0], n_sub)
        age = rng.normal(size=sub.size)
        X = np.column_stack([np.ones(sub.size), visit, age])
        if name == "a":
            site_of = rng.integers(0, n_site, n_sub)
            codes, names = [sub, site_of[sub]], ["subject", "site"]
            formula = "y ~ visit + age + (1 | site) + (1 | subject)"
        else:
            n_fam = 8000                 # every family has a subject, 2,000 have two
            fam_of = rng.permutation(np.concatenate([np.arange(n_fam),
                                                     rng.integers(0, n_fam, n_sub - n_fam)]))
            site_of_fam = rng.integers(0, n_site, n_fam)
            codes = [sub, fam_of[sub], site_of_fam[fam_of[sub]]]
            names = ["subject", "family", "site"]
            formula = "y ~ visit + age + (1 | site) + (1 | family) + (1 | subject)"
        frame = dict(visit=visit, age=age, **dict(zip(names, codes)))
    elif name == "c":
        n = 1000
        a = np.concatenate([np.arange(100), rng.integers(0, 100, n - 100)])
        b = np.concatenate([np.arange(20), rng.integers(0, 20, n - 20)])
        age = rng.normal(size=n)
        X = np.column_stack([np.ones(n), age])
        codes, names = [a, b], ["subject", "rater"]
        frame = dict(age=age, subject=a, rater=b)
        formula = "y ~ age + (1 | subject) + (1 | rater)"
    else:
        raise SystemExit(f"unknown design {name}")
    n = X.shape[0]
    rd = random_design(codes, [np.ones((n, 1))] * len(codes), names)
    return X, rd, frame, formula


def analyse(pf, L):
    """What lme4 + lmerTest deliver: the fit, the Satterthwaite setup and a T contrast."""
    res = fit(pf)
    pre = satterthwaite_setup(pf, res.s2, res.D, res.method, fitted=res.fitted,
                              theta=res.extras["theta"])
    t_contrast(pre, res.beta, L)
    return res


def measure(pf, L):
    COUNTS.update(eval=0, grad=0)
    t0 = time.process_time()
    res = analyse(pf, L)
    cpu = time.process_time() - t0
    v = pf.n_voxels
    counts = (COUNTS["eval"] / v, COUNTS["grad"] / v)
    tracemalloc.start()
    analyse(pf.take(np.arange(min(v, 20))), L)
    peak = tracemalloc.get_traced_memory()[1] / min(v, 20)
    tracemalloc.stop()
    return res, 1e3 * cpu / v, peak / 1024, counts


def bench(name, v, dense_voxels, r_voxels, rng):
    X, rd, frame, formula = design(name, rng)
    Y = simulate(X, rd, v, rng)
    L = np.zeros(X.shape[1])
    L[1] = 1.0
    pf = product_forms(X, rd, Y)
    analyse(pf.take(np.arange(2)), L)                              # warm up (plans)
    res, ms, kb, counts = measure(pf, L)
    path = "blocked" if pf.blocks is not None else "dense"
    row = dict(design=name, n=X.shape[0], q=rd.structure.q, voxels=v, path=path, ms=ms, kb=kb,
               it=res.iterations.mean(), singular=(res.status == 2).mean(), dense_ms=None,
               evals=counts,
               dense_kb=None, r_ms=None, note="")
    if dense_voxels and rd.structure.q <= DENSE_MAX_Q and path == "blocked":
        pfd = product_forms(X, rd, Y[:, :dense_voxels], layout="dense")
        dres, row["dense_ms"], row["dense_kb"], _ = measure(pfd, L)
        worst = np.max(np.abs(dres.llh - res.llh[:dense_voxels]))
        row["note"] += f"dense-blocked llh {worst:.1e}; "
    if r_voxels:
        out, what = run_r(frame, formula, Y[:, :r_voxels])
        if out is None:
            row["note"] += f"lme4 baseline skipped ({what})"
        else:
            sec, llh = out
            row["r_ms"] = 1e3 * sec
            row["note"] += f"{what}; worst llh ours-R {np.min(res.llh[:r_voxels] - llh):+.1e}"
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=200)
    ap.add_argument("--dense-voxels", type=int, default=4, help="0 skips the dense path")
    ap.add_argument("--r-voxels", type=int, default=5, help="0 skips R")
    ap.add_argument("--designs", nargs="+", default=["a", "b", "c"])
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's trim threshold as it is (`mpiblmm` raises it: mpiblmm/allocator.py)")
    args = ap.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()
    rng = np.random.default_rng(2026)
    rows = [bench(name, args.voxels, args.dense_voxels, args.r_voxels, rng)
            for name in args.designs]
    print("\nper core (BLAS threads pinned to 1); ms = CPU ms per voxel of fit + Satterthwaite "
          "+ one T contrast; KB = peak working memory per voxel")
    print(f"{'design':6s} {'n':>6s} {'q':>6s} {'path':>7s} {'ms/vox':>8s} {'KB/vox':>8s} "
          f"{'iter':>5s} {'sing':>5s} {'dense ms':>9s} {'dense KB':>9s} {'R ms/vox':>9s} "
          f"{'R/ours':>7s} {'ev/vox':>6s} {'grad':>5s}  note")
    for r in rows:
        dms = f"{r['dense_ms']:9.1f}" if r["dense_ms"] else f"{'-':>9s}"
        dkb = f"{r['dense_kb']:9.0f}" if r["dense_kb"] else f"{'-':>9s}"
        rms = f"{r['r_ms']:9.1f}" if r["r_ms"] else f"{'-':>9s}"
        ratio = f"{r['r_ms'] / r['ms']:7.1f}" if r["r_ms"] else f"{'-':>7s}"
        print(f"{r['design']:6s} {r['n']:6d} {r['q']:6d} {r['path']:>7s} {r['ms']:8.2f} "
              f"{r['kb']:8.0f} {r['it']:5.1f} {r['singular']:5.2f} {dms} {dkb} {rms} {ratio} "
              f"{r['evals'][0]:6.1f} {r['evals'][1]:5.1f}  {r['note']}")
    print("targets (issue 9): a, b >= 100x lme4+lmerTest; c >= 10x faster than the dense "
          "path (10-12.5 ms/voxel)")


if __name__ == "__main__":
    main()
