#!/usr/bin/env python3
"""End to end against BLMM, measured in the same run: NIfTI images in, NIfTI maps out.

Simulates the benchmark study of issue 12 with ``mpiblmm simulate`` (subjects x 4 visits,
fixed effects intercept, age, time, ``(1 + time | subject)``, 30% of voxels missing 1-15% of
their observations; 60 subjects on 20 x 20 x 15 = 6,000 voxels, 100 on 30 x 30 x 20 =
18,000, 250 on 40 x 40 x 25 = 40,000), then times, interleaved in one run:

1. BLMM's own pipeline (the ``blmm`` command of PyPI's ``pyblmm`` 0.1.1) on one core;
   with ``--blmm-mode stages`` (or ``both``) also BLMM's stages (setup, batch, concat,
   results, cleanup: its own functions, in the order its ``blmm`` command submits them)
   called one after the other in one process without dask, i.e. BLMM's computation
   without its scheduler: the stricter baseline;
2. ``mpiexec -n 1 mpiblmm fit``;
3. ``mpiexec -n 2 mpiblmm fit``;

each from a clean output folder, wall time from launch to exit, plus the CPU seconds of
the whole process tree (less sensitive to other jobs on a shared machine).  mpiblmm runs
``--repeats`` times, BLMM ``--blmm-repeats`` times (default once).  It prints a table
(best and median seconds, BLMM / mpiblmm ratio, ``-n 2`` speed-up over ``-n 1``), the load
average around each run, optionally a CSV of every run, and how far the two fits agree
(beta and sigma2 maps on the voxels both fitted), so BLMM is known to have run on the
same data.  Prints figures; asserts nothing.

How BLMM is installed.  Into its own virtual environment (default
``~/.cache/mpiblmm-bench/blmm-venv``, created on first use, never the project's .venv):
``pip install pyblmm==0.1.1 "numpy<2" "pandas<3"``.  pyblmm pins ``bokeh==2.4.3`` (a
wheel, installs fine on Python 3.11) but not numpy: with numpy 2.x its pipeline fails
(``np.in1d``, ``np.Inf`` are gone), so numpy and pandas are held at the last 1.x / 2.x.

How BLMM is configured (its YAML, written fresh for every run since BLMM rewrites it in
place): the study's X.csv and Z_subject.csv, the subject factor as integer codes, the image
list with absolute paths (BLMM changes directory), ``clusterType: local``, ``numNodes: 1``
(BLMM scales its dask ``LocalCluster`` to one worker process with one thread, so its work
runs on one core; the scheduler and client processes wait) and ``voxelBatching: 1`` (BLMM
0.1.1's non-batched mode fails: it reads ``XtY-2.npy``).  Only the T contrasts go to BLMM:
its F contrast path fails (``NameError: betahat``).  mpiblmm fits the spec as simulated,
F contrast included, so it does slightly more work than BLMM.  BLAS runs on one thread
(``OMP_NUM_THREADS=1`` ...) for both.

    .venv/bin/python scripts/bench_blmm.py [--subjects 100] [--repeats 3] [--blmm-repeats 1]
        [--blmm-mode command|stages|both] [--csv runs.csv] [--blmm-venv DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import BIN, phases, run  # noqa: E402  (shared with the pipeline bench)

#: The issue's studies: subjects -> image grid (subjects x 4 visits each).
SHAPES = {60: (20, 20, 15), 100: (30, 30, 20), 250: (40, 40, 25)}
DEFAULT_VENV = Path.home() / ".cache" / "mpiblmm-bench" / "blmm-venv"
#: What goes into BLMM's environment (see the module docstring for why numpy < 2).
BLMM_REQUIREMENTS = ("pyblmm==0.1.1", "numpy<2", "pandas<3")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="End to end against BLMM in the same run: BLMM's pipeline on one core, "
                    "mpiexec -n 1 and -n 2 mpiblmm fit, on the issue-12 simulated study.")
    ap.add_argument("--subjects", type=int, default=100,
                    help="subjects x 4 visits; 60, 100, 250 pick the issue's grids "
                         "(6,000, 18,000, 40,000 voxels) (default: %(default)s)")
    ap.add_argument("--visits", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="image grid (default: the issue's grid for --subjects)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                    help="mpiblmm rank counts (default: 1 2)")
    ap.add_argument("--repeats", type=int, default=3, help="mpiblmm runs per rank count")
    ap.add_argument("--blmm-repeats", type=int, default=1, help="BLMM runs (0: skip BLMM)")
    ap.add_argument("--blmm-mode", choices=("command", "stages", "both"), default="command",
                    help="run BLMM's `blmm` command (dask, one worker, one thread), its "
                         "stages in one process without dask, or both (default: "
                         "%(default)s)")
    ap.add_argument("--blmm-maxmem", default=None, metavar="EXPR",
                    help="BLMM's MAXMEM in bytes as it reads it, e.g. 2**30 (BLMM's default "
                         "2**32 makes its batch stage ask for 25 GiB on the 40,000-voxel "
                         "study; its peak memory scales with it)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--csv", type=Path, default=None, help="write every run to this CSV")
    ap.add_argument("--blmm-venv", type=Path, default=DEFAULT_VENV,
                    help="BLMM's own virtual environment, made if missing "
                         "(default: %(default)s)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the study and outputs (default: a temporary one, "
                         "removed at the end)")
    return ap


def grid_for(subjects: int, shape) -> tuple[int, int, int]:
    """The image grid: ``shape`` if given, else the issue's grid for ``subjects``."""
    if shape:
        return tuple(shape)
    if subjects not in SHAPES:
        raise SystemExit(f"--subjects {subjects}: give --shape (the issue's studies have "
                         f"{', '.join(map(str, SHAPES))} subjects)")
    return SHAPES[subjects]


# --- BLMM's inputs ----------------------------------------------------------------------

def write_blmm_inputs(study: Path, folder: Path,
                      maxmem: str | None = None) -> tuple[Path, list[str]]:
    """Write BLMM's inputs for the matrix-form study ``study`` (made by ``mpiblmm
    simulate``) into ``folder``: the image list with absolute paths, the subject factor as
    integer codes 1..l in order of first appearance, and ``blmm_config.yml`` (outputs into
    ``folder/out``); ``maxmem``: BLMM's ``MAXMEM`` (bytes, e.g. ``"2**30"``; BLMM's
    default is 2**32).  Returns the config's path and the contrasts left out (F contrasts,
    which BLMM 0.1.1 cannot compute)."""
    study = study.resolve()
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads((study / "spec.json").read_text())
    if "X" not in spec or len(spec.get("random", [])) != 1:
        raise ValueError(f"{study / 'spec.json'}: expected the matrix form with one factor")
    images = [ln.strip() for ln in (study / spec["images"]).read_text().splitlines()
              if ln.strip()]
    (folder / "Y.txt").write_text("".join(f"{(study / p).resolve()}\n" for p in images))
    factor = spec["random"][0]
    labels = [ln.strip() for ln in (study / factor["factor"]).read_text().splitlines()
              if ln.strip()]
    codes: dict[str, int] = {}
    for label in labels:
        codes.setdefault(label, len(codes) + 1)
    (folder / "factor.csv").write_text("".join(f"{codes[x]}\n" for x in labels))
    lines = [f"Y_files: {folder / 'Y.txt'}",
             f"X: {study / spec['X']}",
             "Z:",
             "  - f1:",
             f"      name: {factor['name']}",
             f"      factor: {folder / 'factor.csv'}",
             f"      design: {study / factor['design']}",
             f"outdir: {folder / 'out'}",
             "contrasts:"]
    left_out = []
    t_contrasts = []
    for c in spec.get("contrasts", []):
        weights = c["weights"]
        if weights and isinstance(weights[0], list):
            left_out.append(c["name"])
        else:
            t_contrasts.append(c)
    if not t_contrasts:
        raise ValueError("BLMM needs at least one T contrast")
    for i, c in enumerate(t_contrasts, 1):
        lines += [f"  - c{i}:", f"      name: {c['name']}",
                  f"      vector: {json.dumps(c['weights'])}"]
    # One dask worker with one thread (BLMM scales its LocalCluster to numNodes), and the
    # voxel-batched results stage (the non-batched one fails in 0.1.1).
    lines += ["clusterType: local", "numNodes: 1", "voxelBatching: 1"]
    if maxmem:
        lines.append(f"MAXMEM: {maxmem!r}")               # BLMM evaluates the string
    config = folder / "blmm_config.yml"
    config.write_text("\n".join(lines) + "\n")
    return config, left_out


def ensure_blmm(venv: Path) -> Path:
    """The ``blmm`` command of BLMM's own virtual environment, made on first use."""
    exe = venv / "bin" / "blmm"
    if exe.exists():
        return exe
    print(f"installing BLMM into {venv} ({' '.join(BLMM_REQUIREMENTS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    *BLMM_REQUIREMENTS], check=True)
    return exe


# --- timing -----------------------------------------------------------------------------

def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall seconds, CPU seconds of its process tree, 1-minute load
    average when it started).  Exits with the command's stderr if it fails."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                 f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, load


#: BLMM's stages in one process, in the order its `blmm` command submits them to dask
#: (argv: config, output folder); run with BLMM's own Python.
STAGES = """
import os, sys
from blmm.lib.blmm_setup import setup
from blmm.lib.blmm_batch import batch
from blmm.lib.blmm_concat import concat
from blmm.lib.blmm_results import results
from blmm.lib.blmm_cleanup import cleanup
config, out = sys.argv[1], sys.argv[2]
for i in range(1, setup(config) + 1):
    batch(i, config)
concat(config)
with open(os.path.join(out, "nvb.txt")) as f:
    nvb = int(f.readline())
for i in range(1, nvb + 1):
    results(config, i)
cleanup(config)
"""
#: Labels of the BLMM modes in the table.
MODES = {"command": "BLMM", "stages": "BLMM stages"}


def blmm_command(mode: str, venv: Path, config: Path) -> list[str]:
    """How to run BLMM on ``config``: its ``blmm`` command, or its stages in one process."""
    if mode == "command":
        return [str(venv / "bin" / "blmm"), str(config)]
    return [str(venv / "bin" / "python"), "-c", STAGES, str(config), str(config.parent / "out")]


def blmm_env(venv: Path) -> dict:
    """BLMM's environment: its venv first on the path, nothing of the project's."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(ONE_THREAD)
    return env


# --- agreement --------------------------------------------------------------------------

def agreement(results_h5: Path, blmm_out: Path) -> dict[str, dict[str, float]]:
    """How far BLMM's beta and sigma2 maps are from mpiblmm's results, on the voxels
    mpiblmm fitted (status 0: converged, not singular; status 2: singular, where BLMM is
    known to stop short of the optimum) and BLMM kept (in its mask, finite).  Returns
    ``{"converged"|"singular": {"voxels": n, "sigma2": max relative difference,
    "beta <name>": max relative difference, "beta <name> in se": max |difference| / the
    standard error of that beta}}``; beta near 0 makes a relative difference large, so the
    difference in standard errors says more there."""
    import h5py
    import nibabel as nib
    import numpy as np

    with h5py.File(results_h5, "r") as f:
        idx = tuple(f["voxels"][...].T.astype(np.intp))
        status, beta, sigma2 = f["status"][...], f["beta"][...], f["sigma2"][...]
        se = np.sqrt(np.einsum("vjj->vj", f["cov_beta"][...]))
        names = [str(x) for x in f["beta"].attrs.get("names", range(beta.shape[1]))]

    def at_voxels(name: str) -> np.ndarray:
        a = np.asarray(nib.load(str(blmm_out / name)).get_fdata(), dtype=float)
        return (a if a.ndim == 4 else a[..., None])[idx]     # (V, volumes)

    b_beta, b_sigma2 = at_voxels("blmm_vox_beta.nii"), at_voxels("blmm_vox_sigma2.nii")[:, 0]
    # BLMM writes its int32 mask into a float32 image (the bits of 1 read 1.4e-45): != 0.
    kept = (at_voxels("blmm_vox_mask.nii")[:, 0] != 0) & np.isfinite(b_sigma2) \
        & np.all(np.isfinite(b_beta), axis=1)
    out = {}
    for label, code in (("converged", 0), ("singular", 2)):
        m = kept & (status == code)
        row = {"voxels": float(m.sum())}
        if m.any():
            row["sigma2"] = float(np.max(np.abs(b_sigma2[m] - sigma2[m]) / sigma2[m]))
            d = np.abs(b_beta[m] - beta[m])
            for j, name in enumerate(names):
                row[f"beta {name}"] = float(np.max(d[:, j] / np.abs(beta[m, j])))
                row[f"beta {name} in se"] = float(np.max(d[:, j] / se[m, j]))
        out[label] = row
    return out


# --- the run ----------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parser().parse_args(argv)
    shape = grid_for(args.subjects, args.shape)
    env = dict(os.environ, **ONE_THREAD)
    if args.blmm_repeats:
        ensure_blmm(args.blmm_venv)
    modes = ["command", "stages"] if args.blmm_mode == "both" else [args.blmm_mode]
    work = args.work or Path(tempfile.mkdtemp(prefix="mpiblmm-bench-blmm-"))
    work.mkdir(parents=True, exist_ok=True)
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: list[dict] = []
    try:
        study = work / "study"
        shutil.rmtree(study, ignore_errors=True)
        run([str(BIN / "mpiexec"), "-n", "1", str(BIN / "mpiblmm"), "simulate", str(study),
             "--subjects", str(args.subjects), "--visits", str(args.visits),
             "--shape", *map(str, shape), "--missing-fraction", "0.3",
             "--seed", str(args.seed)], env)
        n_vox = shape[0] * shape[1] * shape[2]
        left_out: list[str] = []
        last_phases = {}
        for round_ in range(max(args.repeats, args.blmm_repeats)):
            if round_ < args.repeats:
                for ranks in args.ranks:
                    shutil.rmtree(study / "results", ignore_errors=True)
                    wall, cpu, load = timed(
                        [str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "mpiblmm"), "fit",
                         "--quiet", str(study / "spec.json")], env)
                    rows.append(dict(tool="mpiblmm", ranks=ranks, repeat=round_ + 1,
                                     wall_s=wall, cpu_s=cpu, load1=load))
                    last_phases[ranks] = phases(study / "results" / "results.h5")
                    print(f"  mpiblmm -n {ranks}: {wall:7.2f} s wall, {cpu:7.2f} s CPU "
                          f"(load {load:.2f})", flush=True)
            if round_ < args.blmm_repeats:
                for mode in modes:
                    folder = work / f"blmm-{mode}"
                    shutil.rmtree(folder, ignore_errors=True)
                    config, left_out = write_blmm_inputs(study, folder, args.blmm_maxmem)
                    wall, cpu, load = timed(blmm_command(mode, args.blmm_venv, config),
                                            blmm_env(args.blmm_venv), cwd=folder)
                    rows.append(dict(tool=MODES[mode], ranks=1, repeat=round_ + 1,
                                     wall_s=wall, cpu_s=cpu, load1=load))
                    print(f"  {MODES[mode]}: {wall:7.2f} s wall, {cpu:7.2f} s CPU "
                          f"(load {load:.2f})", flush=True)
        uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        report(args, shape, n_vox, rows, last_phases, left_out, uptime_start, uptime_end,
               [MODES[m] for m in modes] if args.blmm_repeats else [])
        if args.blmm_repeats and args.repeats:
            # the last mpiblmm fit's results are in study/results (any rank count: same bits)
            for mode in modes:
                print_agreement(MODES[mode], agreement(study / "results" / "results.h5",
                                                       work / f"blmm-{mode}" / "out"))
        if args.csv:
            with open(args.csv, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["subjects", "voxels", "tool", "ranks",
                                                   "repeat", "wall_s", "cpu_s", "load1"])
                w.writeheader()
                for r in rows:
                    w.writerow(dict(subjects=args.subjects, voxels=n_vox, **r))
            print(f"runs written to {args.csv}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def summary(rows: list[dict], tool: str, ranks: int) -> tuple[float, float, float, float] | None:
    """(best wall, median wall, best CPU, median CPU) of one tool and rank count."""
    sel = [r for r in rows if r["tool"] == tool and r["ranks"] == ranks]
    if not sel:
        return None
    walls, cpus = [r["wall_s"] for r in sel], [r["cpu_s"] for r in sel]
    return min(walls), statistics.median(walls), min(cpus), statistics.median(cpus)


def report(args, shape, n_vox, rows, last_phases, left_out, uptime_start, uptime_end,
           baselines: list[str]) -> None:
    print(f"\nstudy: {args.subjects} subjects x {args.visits} visits, grid {list(shape)} "
          f"({n_vox:,} voxels), 30% of voxels missing 1-15% of observations; "
          f"mpiblmm {args.repeats} runs per rank count, BLMM {args.blmm_repeats}")
    print(f"load before: {uptime_start}\nload after:  {uptime_end}")
    if left_out:
        print(f"BLMM fits the T contrasts only (its F path fails); left out: "
              f"{', '.join(left_out)}; mpiblmm computes them too")
    base = {b: summary(rows, b, 1) for b in baselines}
    one = summary(rows, "mpiblmm", args.ranks[0])
    ratios = "".join(f" {b + '/this':>17} {'CPU':>6}" for b in baselines)
    print(f"\n{'':16} {'best s':>8} {'median s':>9} {'best CPU s':>10}{ratios} "
          f"{'speed-up':>8}")
    for b, s in base.items():
        print(f"{b:16} {s[0]:8.2f} {s[1]:9.2f} {s[2]:10.2f}")
    for ranks in args.ranks:
        s = summary(rows, "mpiblmm", ranks)
        cells = "".join(f" {v[0] / s[0]:16.1f}x {v[2] / s[2]:5.1f}x" for v in base.values())
        print(f"{'mpiblmm -n ' + str(ranks):16} {s[0]:8.2f} {s[1]:9.2f} {s[2]:10.2f}{cells} "
              f"{one[0] / s[0]:8.2f}")
    print("  X/this: X's best wall time / this one's; CPU: the same for the CPU seconds of "
          "the process tree; speed-up: best wall time of -n "
          f"{args.ranks[0]} / this one's")
    if last_phases:
        print("\nmpiblmm per-phase seconds of the last run (median over ranks):")
        names = list(next(iter(last_phases.values())))
        print(f"{'ranks':>5} " + " ".join(f"{n:>7}" for n in names))
        for ranks in args.ranks:
            print(f"{ranks:>5} " + " ".join(f"{last_phases[ranks][n][1]:7.2f}" for n in names))


def print_agreement(label: str, agree: dict) -> None:
    labels = {"converged": "mpiblmm converged", "singular": "mpiblmm singular"}
    cols = [f"{labels[k]} ({int(v['voxels']):,})" for k, v in agree.items()]
    print(f"\n{label} against mpiblmm on the same data, max over the voxels both fitted "
          "(BLMM stops short at singular fits):")
    print(f"{'':28} " + " ".join(f"{c:>27}" for c in cols))
    keys = [k for k in next(iter(agree.values())) if k != "voxels"]
    for key in keys:
        what = (f"{key[:-6]} diff / se" if key.endswith(" in se") else f"{key} rel. diff")
        print(f"{what:28} " + " ".join(
            f"{row[key]:27.2g}" if key in row else f"{'-':>27}" for row in agree.values()))


if __name__ == "__main__":
    main()
