#!/usr/bin/env python3
"""Peak memory per rank of `mpiblmm fit` against its memory budget (`--max-memory-mb`).

Simulates a study larger than the budgets tried (default 60 subjects x 4 visits on a
40 x 40 x 40 grid: 64,000 voxels, 61 MB of float32 data, 30% of voxels with missing
observations), fits it with each budget, and reads the peak resident memory of every rank
from the results file (``summary.peak_memory_mb``).  The fixed overhead (interpreter, numpy,
scipy, h5py, MPI) is measured in the same run as the peak of a fit of a tiny study.  The
claim to check: peak <= budget (the budget includes the interpreter, ``mpiblmm/memory.py``;
a budget below the minimum is refused).  Prints figures; asserts nothing.

    .venv/bin/python scripts/bench_memory.py [--budgets 100 150 192 256] [--ranks 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def fit_peak(study: Path, out: Path, ranks: int, budget: int | None, env: dict) -> list[float]:
    import h5py

    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "mpiblmm"), "fit", "--quiet",
           str(study / "spec.json"), "--output", str(out)]
    if budget is not None:
        cmd += ["--max-memory-mb", str(budget)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode == 2:                     # a budget below the minimum is refused
        print(f"{budget:>10} refused: {proc.stderr.strip()}")
        return None
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    with h5py.File(out / "results.h5", "r") as f:
        summary = json.loads(f.attrs["summary"])
    return summary["peak_memory_mb"] + [summary["chunk_voxels"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 150, 192, 256])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 40, 40])
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="mpiblmm-mem-"))
    try:
        tiny, big = work / "tiny", work / "big"
        run([str(BIN / "mpiexec"), "-n", "1", str(BIN / "mpiblmm"), "simulate", str(tiny),
             "--subjects", "60", "--shape", "2", "2", "2"], env)
        run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "mpiblmm"), "simulate", str(big),
             "--subjects", "60", "--shape", *map(str, args.shape)], env)
        base = fit_peak(tiny, work / "tiny_out", args.ranks, None, env)[2]
        n_vox = args.shape[0] * args.shape[1] * args.shape[2]
        print(f"study: 60 subjects x 4 visits, {n_vox} voxels; {args.ranks} rank(s)")
        print(f"fixed overhead (peak of a 8-voxel fit): {base:.0f} MiB")
        print(f"{'budget MiB':>10} {'chunk voxels':>12} {'peak MiB (max rank)':>20} "
              f"{'peak - overhead':>16} {'within budget':>14}")
        for budget in args.budgets:
            got = fit_peak(big, work / f"out{budget}", args.ranks, budget, env)
            if got is None:
                continue
            lo, med, hi, chunk = got
            extra = hi - base
            print(f"{budget:>10} {int(chunk):>12} {hi:>20.0f} {extra:>16.0f} "
                  f"{'yes' if hi <= budget else 'NO':>14}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
