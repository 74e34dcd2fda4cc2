#!/usr/bin/env python3
"""End-to-end benchmark of `mpiblmm fit`: NIfTI images in, results.h5 and NIfTI maps out.

Simulates the study of the fit-pipeline issue (60 subjects x 4 visits, 20 x 20 x 15 grid =
6,000 voxels, 30% of voxels missing 1-15% of observations, random intercept and slope per
subject, two T contrasts and an F contrast), then times `mpiexec -n R mpiblmm fit` from a
clean output folder (packing included) for each rank count, several repeats each, and
prints a table: best and median wall time, speed-up over 1 rank measured in the same run,
parallel efficiency, and the per-phase timers the fit stored in results.h5.

BLMM's pipeline took 35 s on this study on one core of this machine (../shared/ANCHORS.md);
that figure is quoted, not re-measured here.  Prints figures; asserts nothing.

    .venv/bin/python scripts/bench_pipeline.py [--ranks 1 2] [--repeats 3] [--subjects 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
BLMM_SECONDS = 35.0


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds


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
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="mpiblmm-bench-"))
    try:
        study = work / "study"
        run([str(BIN / "mpiexec"), "-n", "1", str(BIN / "mpiblmm"), "simulate", str(study),
             "--subjects", str(args.subjects), "--visits", str(args.visits),
             "--shape", *map(str, args.shape), "--missing-fraction", "0.3", "--seed", "1"], env)
        times: dict[int, list[float]] = {}
        last_phases: dict[int, dict] = {}
        for repeat in range(args.repeats):
            for ranks in args.ranks:  # interleaved, so machine noise hits every rank count
                shutil.rmtree(study / "results", ignore_errors=True)
                seconds = run([str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "mpiblmm"),
                               "fit", "--quiet", str(study / "spec.json")], env)
                times.setdefault(ranks, []).append(seconds)
                last_phases[ranks] = phases(study / "results" / "results.h5")
        n_vox = args.shape[0] * args.shape[1] * args.shape[2]
        print(f"study: {args.subjects} subjects x {args.visits} visits, grid {args.shape} "
              f"({n_vox} voxels), {args.repeats} repeats, wall time from launch to exit")
        print(f"{'ranks':>5} {'best s':>8} {'median s':>9} {'vs 1 rank':>10} {'efficiency':>10} "
              f"{'vs BLMM 35 s':>12}")
        base = min(times[args.ranks[0]])
        for ranks in args.ranks:
            best, med = min(times[ranks]), statistics.median(times[ranks])
            print(f"{ranks:>5} {best:8.2f} {med:9.2f} {best / base:10.2f} "
                  f"{base / best / ranks * args.ranks[0]:10.2f} {BLMM_SECONDS / best:11.1f}x")
        print("\nper-phase seconds of the last run (median over ranks):")
        names = list(next(iter(last_phases.values())))
        print(f"{'ranks':>5} " + " ".join(f"{n:>7}" for n in names))
        for ranks in args.ranks:
            print(f"{ranks:>5} " + " ".join(f"{last_phases[ranks][n][1]:7.2f}" for n in names))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
