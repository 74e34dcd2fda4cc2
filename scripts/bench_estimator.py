#!/usr/bin/env python3
"""Benchmark the estimator (``mpiblmm.lmm.estimate.fit``) per core, against lme4 where R is there.

Designs (REML, simulated voxels, a quarter of them with no random effects so the boundary
is exercised):

- ``n400``:  100 subjects x 4 visits, random intercept + slope per subject (one factor);
- ``n1000``: 250 subjects x 4 visits, random intercept + slope per subject (one factor);
- ``crossed``: n = 1000, two crossed factors with 100 and 20 levels, random intercepts.

Prints voxels per second, milliseconds per voxel (CPU time of this process), peak working
memory per voxel (tracemalloc: numpy's allocations during ``fit``, product forms excluded),
mean iterations, and -- with ``Rscript`` and lme4 installed -- lme4's seconds per voxel on the
first ``--r-voxels`` voxels of the same data (``lmer`` + lmerTest's ``lmer`` when available,
timed inside R), the ratio, and the worst log-likelihood difference (ours - lme4) there.
BLAS threads are pinned to 1 before numpy is imported.  Asserts nothing.

Usage::

    python3 scripts/bench_estimator.py [--voxels 2000] [--r-voxels 20] [--designs n400 ...]
        [--profile]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpiblmm.allocator import keep_freed_memory  # noqa: E402
from mpiblmm.lmm.estimate import fit  # noqa: E402
from mpiblmm.lmm.products import product_forms, random_design  # noqa: E402

R_SCRIPT = r"""
suppressMessages(library(lme4))
has_lmertest <- suppressWarnings(suppressMessages(require(lmerTest, quietly = TRUE)))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(file.path(args[1], "design.csv"))
Y <- as.matrix(read.csv(file.path(args[1], "Y.csv"), header = FALSE))
form <- as.formula(readLines(file.path(args[1], "formula.txt")))
fitone <- function(y) {
  d$y <- y
  if (has_lmertest) lmerTest::lmer(form, data = d, REML = TRUE)
  else lme4::lmer(form, data = d, REML = TRUE)
}
invisible(fitone(Y[, 1]))  # warm up
llh <- numeric(ncol(Y))
t0 <- proc.time()[["elapsed"]]
for (j in seq_len(ncol(Y))) llh[j] <- as.numeric(logLik(suppressMessages(suppressWarnings(fitone(Y[, j])))))
el <- proc.time()[["elapsed"]] - t0
cat(el / ncol(Y), has_lmertest, "\n")
cat(sprintf("%.10f", llh), "\n")
"""


def longitudinal(n_sub: int, rng: np.random.Generator):
    """``n_sub`` subjects x 4 visits, ``y ~ age + t + (1 + t | subject)``: X, RandomDesign
    and the data frame (dict of columns)."""
    n = n_sub * 4
    sub = np.repeat(np.arange(n_sub), 4)
    t = np.tile(np.arange(4.0), n_sub)
    age = rng.normal(size=n)
    X = np.column_stack([np.ones(n), age, t])
    rd = random_design([sub], [np.column_stack([np.ones(n), t])], ["subject"])
    return X, rd, dict(age=age, t=t, subject=sub)


def design(name: str, rng: np.random.Generator):
    """X, RandomDesign, a data frame (dict of columns) and the lme4 formula of a design."""
    if name in ("n400", "n1000"):
        X, rd, frame = longitudinal(100 if name == "n400" else 250, rng)
        formula = "y ~ age + t + (1 + t | subject)"
    elif name == "crossed":
        n = 1000
        a = np.concatenate([np.arange(100), rng.integers(0, 100, n - 100)])
        b = np.concatenate([np.arange(20), rng.integers(0, 20, n - 20)])
        age = rng.normal(size=n)
        X = np.column_stack([np.ones(n), age])
        rd = random_design([a, b], [np.ones((n, 1)), np.ones((n, 1))], ["a", "b"])
        frame = dict(age=age, a=a, b=b)
        formula = "y ~ age + (1 | a) + (1 | b)"
    else:
        raise SystemExit(f"unknown design {name}")
    return X, rd, frame, formula


def simulate(X, rd, v, rng):
    Z = rd.sparse()
    sd = rng.uniform(0.0, 1.0, size=(v, rd.structure.q))
    sd[: v // 4] = 0.0
    B = rng.normal(size=(rd.structure.q, v)) * sd.T
    return 100.0 + X @ rng.normal(size=(X.shape[1], v)) + Z @ B + rng.normal(size=(X.shape[0], v))


def run_r(frame, formula, Y):
    if shutil.which("Rscript") is None:
        return None, "Rscript not found"
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        cols = list(frame)
        np.savetxt(tmpd / "design.csv", np.column_stack([frame[c] for c in cols]),
                   delimiter=",", header=",".join(cols), comments="", fmt="%.17g")
        np.savetxt(tmpd / "Y.csv", Y, delimiter=",", fmt="%.17g")
        (tmpd / "formula.txt").write_text(formula + "\n")
        (tmpd / "bench.R").write_text(R_SCRIPT)
        proc = subprocess.run(["Rscript", str(tmpd / "bench.R"), str(tmpd)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return None, "R failed: " + proc.stderr.strip().splitlines()[-1]
        lines = proc.stdout.strip().splitlines()
        sec, lmertest = lines[0].split()
        llh = np.array([float(x) for x in lines[1].split()])
        what = "lme4+lmerTest" if lmertest == "TRUE" else "lme4"
        return (float(sec), llh), what


def bench(name, v, r_voxels, profile, rng):
    X, rd, frame, formula = design(name, rng)
    Y = simulate(X, rd, v, rng)
    pf = product_forms(X, rd, Y)
    fit(pf.take(np.arange(min(v, 50))))                         # warm up
    if profile:
        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(pf)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profile:
        prof.disable()
        print(f"\n--- profile of fit() on {name} (top 15 by own time)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    tracemalloc.start()
    fit(pf.take(np.arange(min(v, 500))))
    peak = tracemalloc.get_traced_memory()[1] / min(v, 500)
    tracemalloc.stop()
    row = dict(design=name, n=X.shape[0], voxels=v, ms=1e3 * cpu / v, wall_ms=1e3 * wall / v,
               vps=v / cpu, kb=peak / 1024, it=res.iterations.mean(),
               singular=(res.status == 2).mean(), r_ms=None, note="")
    if r_voxels:
        out, what = run_r(frame, formula, Y[:, :r_voxels])
        if out is None:
            row["note"] = what
        else:
            sec, llh = out
            row["r_ms"] = 1e3 * sec
            row["note"] = f"{what}; worst llh ours-R {np.min(res.llh[:r_voxels] - llh):+.1e}"
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=2000)
    ap.add_argument("--crossed-voxels", type=int, default=500)
    ap.add_argument("--r-voxels", type=int, default=20, help="0 skips R")
    ap.add_argument("--designs", nargs="+", default=["n400", "n1000", "crossed"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's trim threshold as it is (`mpiblmm` raises it: mpiblmm/allocator.py)")
    args = ap.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()
    rng = np.random.default_rng(2024)
    rows = []
    for name in args.designs:
        v = args.crossed_voxels if name == "crossed" else args.voxels
        rows.append(bench(name, v, args.r_voxels, args.profile, rng))
    print("\nper core (BLAS threads pinned to 1); ms = CPU ms per voxel of fit()")
    head = (f"{'design':8s} {'n':>5s} {'voxels':>6s} {'ms/vox':>7s} {'wall':>7s} {'vox/s':>7s} "
            f"{'KB/vox':>7s} {'iter':>5s} {'sing':>5s} {'R ms/vox':>9s} {'R/ours':>7s}  note")
    print(head)
    for r in rows:
        r_ms = f"{r['r_ms']:9.1f}" if r["r_ms"] else f"{'-':>9s}"
        ratio = f"{r['r_ms'] / r['ms']:7.0f}" if r["r_ms"] else f"{'-':>7s}"
        print(f"{r['design']:8s} {r['n']:5d} {r['voxels']:6d} {r['ms']:7.3f} {r['wall_ms']:7.3f} "
              f"{r['vps']:7.0f} {r['kb']:7.1f} {r['it']:5.1f} {r['singular']:5.2f} {r_ms} "
              f"{ratio}  {r['note']}")
    print("targets: n400 < 0.85 ms/voxel (published vectorised FS 8.5 ms; lme4+lmerTest 74 ms); "
          "n1000 published 21 ms")


if __name__ == "__main__":
    main()
