#!/usr/bin/env python3
"""End-to-end benchmark of `mpiblmm fit`: NIfTI images in, results.h5 and NIfTI maps out.

Simulates the study of the fit-pipeline issue (60 subjects x 4 visits, 20 x 20 x 15 grid =
6,000 voxels, 30% of voxels missing 1-15% of observations, random intercept and slope per
subject, two T contrasts and an F contrast), then times `mpiexec -n R mpiblmm fit` from a
clean output folder (packing included) for each rank count, several repeats each, and
prints a table: best and median wall time, speed-up over 1 rank measured in the same run,
parallel efficiency, and the per-phase timers the fit stored in results.h5.

Two baselines are measured in the same run, interleaved with the fits, to say how far any
rank count could go on this machine:

- start-up floor: ``mpiexec -n R python -c "import <our dependency stack>"`` (numpy, scipy,
  h5py, nibabel, mpi4py with MPI_Init), i.e. what every rank pays before the first line of
  mpiblmm runs; no rank count divides it.  The Amdahl bound printed for R ranks is
  ``(floor_R + (T_1 - floor_1) / R) / T_1``: the ratio if everything after start-up scaled
  perfectly.  The same bound is printed for the bare floor (numpy, h5py, mpi4py only): what
  dropping scipy and nibabel altogether could reach at best.
- core ceiling: R processes each running the same fixed numpy kernel side by side, against
  one alone; a ratio above 1 means the machine's cores slow each other down (shared host,
  memory bandwidth), which bounds every parallel program here.  "On these cores" is the
  Amdahl bound with the parallel work slowed by that factor.

BLMM's pipeline times on the studies of issue 12, measured on one core of this machine, are
quoted (not re-measured here; ``scripts/bench_blmm.py`` measures them): 29.2 s for 60 x 4
subjects on 20 x 20 x 15, 144.9 s for 100 x 4 on 30 x 30 x 20 (18,000 voxels), 922 s for
250 x 4 on 40 x 40 x 25 (40,000 voxels).  ``--chunk-voxels`` passes the same option to the
fit (small chunks: their fixed cost).  Prints figures; asserts nothing.

    .venv/bin/python scripts/bench_pipeline.py [--ranks 1 2] [--repeats 3] [--subjects 60]
    .venv/bin/python scripts/bench_pipeline.py --ranks 1 2 --subjects 100 --shape 30 30 20
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
#: BLMM's end-to-end seconds on one core of this machine (issue 12), by (subjects, visits, shape).
BLMM_SECONDS = {(60, 4, (20, 20, 15)): 29.2, (100, 4, (30, 30, 20)): 144.9,
                (250, 4, (40, 40, 25)): 922.0}


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds


#: What every rank imports before mpiblmm's own code runs (mpi4py.MPI calls MPI_Init).
STACK = "import numpy, scipy.sparse, scipy.special, h5py, nibabel; from mpi4py import MPI"
#: The least any MPI + HDF5 Python program imports: what is left without scipy and nibabel.
BARE = "import numpy, h5py; from mpi4py import MPI"
#: A fixed amount of vectorised numpy work (elementwise products and sums over (v, l)
#: arrays, like the estimator's), timed inside each process.
KERNEL = """
import time, numpy as np
a = np.random.default_rng(0).random((3000, 60)); b = a.copy()
t = time.perf_counter()
for _ in range(400):
    c = a * b; c += a; s = np.einsum("vl,vl->v", c, b)
print(f"kernel {time.perf_counter() - t:.6f} s;", flush=True)  # the launcher may join lines
"""


def python_job(ranks: int, code: str) -> list[str]:
    """``mpiexec -n ranks python -c code`` with the environment's launcher and Python."""
    return [str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "python"), "-c", code]


def kernel_seconds(ranks: int, env: dict) -> float:
    """Slowest process's time for the fixed kernel with ``ranks`` copies running at once."""
    out = subprocess.run(python_job(ranks, KERNEL), env=env, capture_output=True, text=True,
                         check=True).stdout
    return max(float(x) for x in re.findall(r"kernel ([0-9.]+) s;", out))


def phases(results: Path) -> dict:
    import h5py

    with h5py.File(results, "r") as f:
        return json.loads(f.attrs["summary"])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--visits", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=[20, 20, 15])
    ap.add_argument("--chunk-voxels", type=int, help="passed to `mpiblmm fit`")
    args = ap.parse_args()
    fit_options = [] if args.chunk_voxels is None else ["--chunk-voxels", str(args.chunk_voxels)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="mpiblmm-bench-"))
    try:
        study = work / "study"
        run([str(BIN / "mpiexec"), "-n", "1", str(BIN / "mpiblmm"), "simulate", str(study),
             "--subjects", str(args.subjects), "--visits", str(args.visits),
             "--shape", *map(str, args.shape), "--missing-fraction", "0.3", "--seed", "1"], env)
        times: dict[int, list[float]] = {}
        floor: dict[int, list[float]] = {}
        bare: dict[int, list[float]] = {}
        kernel: dict[int, list[float]] = {}
        last_phases: dict[int, dict] = {}
        for repeat in range(args.repeats):
            for ranks in args.ranks:  # interleaved, so machine noise hits every rank count
                floor.setdefault(ranks, []).append(run(python_job(ranks, STACK), env))
                bare.setdefault(ranks, []).append(run(python_job(ranks, BARE), env))
                kernel.setdefault(ranks, []).append(kernel_seconds(ranks, env))
                shutil.rmtree(study / "results", ignore_errors=True)
                seconds = run([str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "mpiblmm"),
                               "fit", "--quiet", str(study / "spec.json"), *fit_options], env)
                times.setdefault(ranks, []).append(seconds)
                last_phases[ranks] = phases(study / "results" / "results.h5")
        n_vox = args.shape[0] * args.shape[1] * args.shape[2]
        print(f"study: {args.subjects} subjects x {args.visits} visits, grid {args.shape} "
              f"({n_vox} voxels), {args.repeats} repeats, wall time from launch to exit")
        # BLMM's times are for the studies only; other sizes get no comparison.
        blmm = BLMM_SECONDS.get((args.subjects, args.visits, tuple(args.shape)))
        print(f"{'ranks':>5} {'best s':>8} {'median s':>9} {'vs 1 rank':>10} {'efficiency':>10} "
              + (f"{f'vs BLMM {blmm:g} s':>14}" if blmm else ""))
        base = min(times[args.ranks[0]])
        for ranks in args.ranks:
            best, med = min(times[ranks]), statistics.median(times[ranks])
            print(f"{ranks:>5} {best:8.2f} {med:9.2f} {best / base:10.2f} "
                  f"{base / best / ranks * args.ranks[0]:10.2f}"
                  + (f" {blmm / best:13.1f}x" if blmm else ""))
        k1 = min(kernel[args.ranks[0]])

        def bound(floors: dict[int, list[float]], ranks: int, slowdown: float = 1.0) -> float:
            f1, f_r = min(floors[args.ranks[0]]), min(floors[ranks])
            return (f_r + (base - f1) * args.ranks[0] / ranks * slowdown) / base

        print(f"\nwhat bounds the ratio (best of {args.repeats}, same run):")
        print(f"{'ranks':>5} {'measured':>9} {'core ceiling':>12} {'floor s':>8} {'bound':>6} "
              f"{'on these cores':>14} {'bare floor s':>12} {'bare bound':>10}")
        for ranks in args.ranks:
            ceiling = min(kernel[ranks]) / k1
            print(f"{ranks:>5} {min(times[ranks]) / base:9.2f} {ceiling:12.2f} "
                  f"{min(floor[ranks]):8.2f} {bound(floor, ranks):6.2f} "
                  f"{bound(floor, ranks, ceiling):14.2f} {min(bare[ranks]):12.2f} "
                  f"{bound(bare, ranks):10.2f}")
        print("  core ceiling: time of R concurrent copies of a fixed numpy kernel / one alone")
        print("  floor: launch + imports of numpy, scipy, h5py, nibabel, mpi4py + MPI_Init, "
              "nothing of mpiblmm; bare floor: numpy, h5py, mpi4py only")
        print("  bound: best ratio to 1 rank if all work after that start-up scaled perfectly;")
        print("  on these cores: the same with that work slowed by the core ceiling")
        print("\nper-phase seconds of the last run (median over ranks):")
        names = list(next(iter(last_phases.values())))
        print(f"{'ranks':>5} " + " ".join(f"{n:>7}" for n in names))
        for ranks in args.ranks:
            print(f"{ranks:>5} " + " ".join(f"{last_phases[ranks][n][1]:7.2f}" for n in names))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
