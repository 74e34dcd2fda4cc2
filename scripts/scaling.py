#!/usr/bin/env python3
"""Strong and weak scaling of `mpiblmm fit` on this machine or cluster: CSV and a PNG.

Strong scaling fits one fixed study at 1, 2, 4, ... ranks; weak scaling grows the study with
the ranks so every rank keeps the same number of voxels.  Every point is repeated (the
repeats are interleaved over rank counts, so machine noise hits every rank count alike), from
a clean output folder each time, packing included: wall time from launch to exit.  Each
run's per-phase seconds (max over ranks: the slowest rank sets the wall time) are read from
``results.h5``'s ``summary`` attribute, export included (from rank 0's log if the summary
lacks it), and so is ``finish`` (the fit's reductions over ranks and its summary; 0 from a
fit that does not time it yet).  ``other`` is the part of the fit's total (the slowest
rank's) that no phase times: the collective open and close of packed.h5 for the fit, the
progress and stop communicators, the final waits.  It is slightly negative when different
ranks are the slowest in different phases.  ``startup`` is the rest of the wall time
(launch, imports, ``MPI_Init``, exit), so ``startup + setup + ... + finish + export + other
= wall``.

Out, in ``--out`` (default ``scaling-<date>``):

- ``scaling.csv``: one row per run (``mode, ranks, repeat, voxels, images, wall_s`` and
  ``<phase>_s`` for startup, setup, ingest, create, read, fit, write, finish, export,
  other), appended (and flushed) as soon as the run is measured.
- ``scaling_summary.csv``: one row per mode and rank count: median wall time, and each
  phase's median over the runs (so the phases of a row need not add up to its median wall
  time).  Strong scaling: ``speedup`` = T(fewest ranks) / T(R), ``ideal_speedup`` and
  ``efficiency`` = speedup / ideal.  Weak scaling has no speed-up (its ``speedup`` and
  ``ideal_speedup`` are empty): its ``efficiency`` is T(fewest ranks) / T(R), ideally 1.
- ``scaling.png``: speed-up against the ideal line, efficiency, and the per-phase breakdown
  (each phase's median over the runs), so one sees whether I/O (ingest, results I/O,
  export), start-up, mpiblmm's setup or the fit limits scaling.

The summary and the PNG are written from the rows there are also when a run fails or times
out, and on SIGTERM or Ctrl-C (the running point is stopped and not counted); the exit code
is then non-zero (1 for a failed run, 143 for SIGTERM, 130 for Ctrl-C).  ``--resume``
continues a study in an existing ``--out``: the (mode, ranks, repeat) points already in its
``scaling.csv`` are kept and not run again; without it an ``--out`` that already has a
``scaling.csv`` is refused.  The simulated studies (in ``--out``/work) are kept after an
interrupted study, for ``--resume``, and removed when a study ends normally.

The launcher is ``$MPIEXEC`` (e.g. ``srun`` inside an allocation; its process-count flag is
``$MPIEXEC_NUMPROC_FLAG``, default ``-n``), else the environment's ``mpiexec``.  More ranks
than cores is allowed with a warning (the figures then measure time sharing, not scaling);
Open MPI's ``mpiexec`` is given ``--oversubscribe`` then, MPICH's needs nothing.

    .venv/bin/python scripts/scaling.py --ranks 1 2 4 --repeats 3
    .venv/bin/python scripts/scaling.py --mode strong --spec my_study/spec.json --ranks 64 128 256
    .venv/bin/python scripts/scaling.py --mode weak --voxels-per-rank 20000 --ranks 1 2 4 8
    .venv/bin/python scripts/scaling.py --resume --out scaling-20250101-120000 ...  # continue
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

#: Phases stored in results.h5's summary (pipeline.PHASES), then what the script adds.
FIT_PHASES = ["setup", "ingest", "create", "read", "fit", "write", "finish"]
PHASES = ["startup", *FIT_PHASES, "export", "other"]
RUN_COLUMNS = ["mode", "ranks", "repeat", "voxels", "images", "wall_s",
               *[f"{p}_s" for p in PHASES]]
SUMMARY_COLUMNS = ["mode", "ranks", "voxels", "voxels_per_rank", "repeats", "wall_median_s",
                   "wall_best_s", "speedup", "ideal_speedup", "efficiency",
                   *[f"{p}_s" for p in PHASES]]
#: Groups of the breakdown plot: every phase in exactly one.
GROUPS = {"start-up (launch, imports, MPI_Init, exit)": ["startup"],
          "setup (mpiblmm: spec, design)": ["setup"], "ingest": ["ingest"],
          "results I/O (create, read, write)": ["create", "read", "write"],
          "fit": ["fit"], "finish (reductions, summary)": ["finish"], "export": ["export"],
          "other (untimed: opening packed.h5, progress, waits)": ["other"]}
#: The export line of the fit's "seconds per phase" table: min, median, max over ranks.
EXPORT_LINE = re.compile(r"^\s*export\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s*$")


class RunFailed(Exception):
    """A run failed or timed out (the message says which and how)."""


class Stopped(BaseException):
    """SIGTERM (or SIGINT) arrived: write what there is and stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, _frame):
    raise Stopped(signum)


# --------------------------------------------------------------------------- launching
def launcher() -> tuple[list[str], str]:
    """The launcher command and its process-count flag ($MPIEXEC, else our mpiexec)."""
    if os.environ.get("MPIEXEC"):
        command = shlex.split(os.environ["MPIEXEC"])
    else:
        beside = Path(sys.executable).parent / "mpiexec"
        found = str(beside) if beside.exists() else shutil.which("mpiexec")
        if found is None:
            sys.exit("scaling.py: no mpiexec found; set MPIEXEC (e.g. MPIEXEC=srun)")
        command = [found]
    return command, os.environ.get("MPIEXEC_NUMPROC_FLAG", "-n")


def fit_args_problem(fit_args: list[str]) -> str | None:
    """What ``mpiblmm fit`` says of ``fit_args`` (its own one line), or None when it takes
    them: asked once, before any study is simulated or timed (a bad option failed every run
    after the simulation, with advice to --resume that could only fail again)."""
    if not fit_args:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "probe.json"      # does not exist: only the options are judged
        probe = subprocess.run([*mpiblmm_command(), "fit", str(spec), "--output",
                                str(Path(tmp) / "out"), *fit_args],
                               capture_output=True, text=True, timeout=300)
    errors = [line for line in probe.stderr.splitlines() if "error:" in line]
    if errors and str(spec) not in errors[0]:
        return errors[0].split("error: ", 1)[1]
    return None


def mpiblmm_command() -> list[str]:
    """How to start the ``mpiblmm`` of this environment."""
    script = Path(sys.executable).parent / "mpiblmm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpiblmm"]


def is_open_mpi(command: list[str]) -> bool:
    """Whether the launcher is Open MPI's (which refuses more ranks than slots)."""
    try:
        text = subprocess.run([*command, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in text or "OpenRTE" in text or "open-mpi" in text.lower()


def available_cores() -> int:
    """Cores this job may use: the batch allocation if there is one, else this machine's."""
    for name in ("SLURM_NTASKS", "PBS_NP", "NSLOTS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Runner:
    """Starts ``mpiblmm`` jobs of a given size with the chosen launcher."""

    command: list[str]
    flag: str
    cores: int
    open_mpi: bool
    env: dict
    timeout: float

    def argv(self, ranks: int, args: list[str]) -> list[str]:
        extra = ["--oversubscribe"] if self.open_mpi and ranks > self.cores else []
        return [*self.command, *extra, self.flag, str(ranks), *mpiblmm_command(), *args]

    def run(self, ranks: int, args: list[str]) -> float:
        """Run one job; its wall time from launch to exit.  Raises RunFailed if it fails or
        times out; on Stopped (a signal to this script) the job is sent SIGTERM (mpiblmm
        stops after the chunk in hand), given 30 s, then killed."""
        argv = self.argv(ranks, args)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=err)
            try:
                code = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _end(proc)
                raise RunFailed(f"timed out after {self.timeout:.0f} s: "
                                f"{shlex.join(argv)}") from None
            except BaseException:  # Stopped, KeyboardInterrupt
                _end(proc)
                raise
            seconds = time.perf_counter() - t0
            if code != 0:
                err.seek(0)
                tail = err.read()[-3000:].decode(errors="replace")
                raise RunFailed(f"failed ({code}): {shlex.join(argv)}\n{tail}")
        return seconds


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM to a job, SIGKILL 30 s later if it is still there."""
    try:
        proc.terminate()
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


# --------------------------------------------------------------------------- one run
def read_phases(results: Path, log: Path) -> tuple[int, dict[str, float]]:
    """Voxels fitted (candidates), and max-over-ranks seconds per phase, export included,
    plus ``total``: the slowest rank's seconds from its timer's start to the export's end."""
    import h5py

    with h5py.File(results, "r") as f:
        summary = json.loads(f.attrs["summary"])
        voxels = int(f["voxels"].shape[0])
    stored = summary["seconds"]
    seconds = {p: float(stored.get(p, [0, 0, 0])[2]) for p in FIT_PHASES}
    seconds["total"] = float(stored["total"][2])
    if "export" in stored:  # added after the export, with the total that includes it
        seconds["export"] = float(stored["export"][2])
    else:  # the summary's total ends before the export: the log's max over ranks
        seconds["export"] = 0.0
        if log.exists():
            for line in log.read_text().splitlines():
                match = EXPORT_LINE.match(line)
                if match:
                    seconds["export"] = float(match.group(3))
        seconds["total"] += seconds["export"]
    return voxels, seconds


def fit_once(runner: Runner, ranks: int, spec: Path, out: Path, fit_args: list[str]) -> dict:
    """One clean fit (packing included); wall time and seconds per phase (which, with
    ``startup`` and ``other``, add up to the wall time)."""
    shutil.rmtree(out, ignore_errors=True)
    log = out.parent / f"{out.name}.log"
    log.unlink(missing_ok=True)
    wall = runner.run(ranks, ["fit", str(spec), "--output", str(out), "--quiet",
                              "--log-file", str(log), "--progress-interval", "0", *fit_args])
    voxels, phases = read_phases(out / "results.h5", log)
    total = phases.pop("total")
    phases["other"] = total - sum(phases[p] for p in [*FIT_PHASES, "export"])
    phases["startup"] = max(0.0, wall - total)
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    return {"voxels": voxels, "wall_s": wall, **{f"{p}_s": phases[p] for p in PHASES}}


def simulate(runner: Runner, folder: Path, subjects: int, visits: int,
             shape: tuple[int, int, int], seed: int) -> Path:
    """A simulated study (``mpiblmm simulate``, one rank); its spec's path.  A study of an
    earlier, interrupted run is reused if it is complete (its spec.json is written last) and
    was simulated with these options (``study-options.json``, written after it; a study of
    other options was reused before, so a --resume with the options corrected measured, or
    refused, the wrong study)."""
    options = {"subjects": subjects, "visits": visits, "shape": list(shape), "seed": seed}
    stamp = folder / "study-options.json"
    try:
        same = (folder / "spec.json").exists() and json.loads(stamp.read_text()) == options
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(folder, ignore_errors=True)
        runner.run(1, ["simulate", str(folder), "--subjects", str(subjects), "--visits",
                       str(visits), "--shape", *map(str, shape), "--missing-fraction", "0.3",
                       "--seed", str(seed)])
        stamp.write_text(json.dumps(options) + "\n")
    return folder / "spec.json"


def images_of(spec: Path) -> int:
    """Observations (images) of a study."""
    from mpiblmm.spec import load_spec

    loaded = load_spec(str(spec))
    if loaded.images is not None:
        return len(loaded.images)
    import h5py

    with h5py.File(loaded.packed.path, "r") as f:  # an already packed study
        return int(f.attrs["n_observations"])


def weak_shape(shape: list[int], voxels_per_rank: int, ranks: int) -> tuple[int, int, int]:
    """The grid for ``ranks``: the first two sides of ``shape``, the third ``ranks`` times the
    slices one rank gets, so the grid's voxels grow exactly with the ranks."""
    x, y = shape[0], shape[1]
    return x, y, max(1, math.ceil(voxels_per_rank / (x * y))) * ranks


# --------------------------------------------------------------------------- summary
def summarise(rows: list[dict]) -> list[dict]:
    """Per mode and rank count: medians, and the ratio to the smallest count.  Strong scaling:
    ``speedup`` = T(base) / T(R), ``ideal_speedup`` = R / base, ``efficiency`` = their ratio.
    Weak scaling has no speed-up (``speedup`` and ``ideal_speedup`` are None, empty in the
    CSV): T(base) / T(R), ideally 1, is its ``efficiency``."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        counts = sorted({r["ranks"] for r in mine})
        base_ranks = counts[0]
        base = statistics.median(r["wall_s"] for r in mine if r["ranks"] == base_ranks)
        for ranks in counts:
            runs = [r for r in mine if r["ranks"] == ranks]
            wall = statistics.median(r["wall_s"] for r in runs)
            row = {"mode": mode, "ranks": ranks, "voxels": runs[0]["voxels"],
                   "voxels_per_rank": runs[0]["voxels"] / ranks, "repeats": len(runs),
                   "wall_median_s": wall, "wall_best_s": min(r["wall_s"] for r in runs)}
            if mode == "strong":
                ideal = ranks / base_ranks
                row.update(speedup=base / wall, ideal_speedup=ideal,
                           efficiency=base / wall / ideal)
            else:  # the same work per rank: the time ratio is the efficiency
                row.update(speedup=None, ideal_speedup=None, efficiency=base / wall)
            for p in PHASES:
                row[f"{p}_s"] = statistics.median(r[f"{p}_s"] for r in runs)
            out.append(row)
    return out


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v)
                             for k, v in row.items() if k in columns})


def speedup_ticks(values: list[float]) -> tuple[str, list[float], list[str]]:
    """The speed-up axis for these values (measured and ideal): ``("linear", ticks, labels)``
    from 0 when they span at most a factor 4, else ``("log", ...)`` with a tick at every power
    of 2 around them, fractions included (0.25, 0.5, 1, 2, ...)."""
    import matplotlib.ticker

    lo, hi = min(values), max(values)
    if hi <= 4 * lo:
        ticks = [t for t in matplotlib.ticker.MaxNLocator(
            nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(0, hi * 1.1) if 0 <= t <= hi * 1.1]
        return "linear", ticks, [f"{t:g}" for t in ticks]
    ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    return "log", ticks, [f"{t:g}" for t in ticks]


def figure(summary: list[dict], title: str, cores: int):
    """The figure (a matplotlib Figure, not saved): speed-up with the ideal line (strong
    scaling), efficiency, and per-phase seconds per mode, with the legends outside the
    data."""
    from matplotlib.figure import Figure

    modes = list(dict.fromkeys(r["mode"] for r in summary))
    # weak scaling has no speed-up: no speed-up panel without strong-scaling runs
    panels = (2 if "strong" in modes else 1) + len(modes)
    fig = Figure(figsize=(5 * panels + 2.5, 5.4), layout="constrained")
    axes = list(fig.subplots(1, panels))
    ax_speed = axes.pop(0) if "strong" in modes else None
    ax_eff = axes.pop(0)
    colours = {"strong": "tab:blue", "weak": "tab:orange"}
    markers = {"strong": "o-", "weak": "s-"}
    speed_values = []
    for mode in modes:
        rows = [r for r in summary if r["mode"] == mode]
        ranks = [r["ranks"] for r in rows]
        if mode == "strong":
            measured = [r["speedup"] for r in rows]
            ax_speed.plot(ranks, measured, markers[mode], color=colours[mode],
                          label="strong: measured, T(fewest) / T(R)")
            ax_speed.plot(ranks, [r["ideal_speedup"] for r in rows], "k--",
                          label="strong: ideal")
            speed_values += measured + [r["ideal_speedup"] for r in rows]
            _annotate(ax_speed, ranks, measured, colours[mode], above=True)
        effs = [r["efficiency"] for r in rows]
        ax_eff.plot(ranks, effs, markers[mode], color=colours[mode],
                    label="strong: speed-up / ideal" if mode == "strong"
                    else "weak: T(fewest) / T(R)")
        _annotate(ax_eff, ranks, effs, colours[mode], above=mode == "strong")
    every = sorted({r["ranks"] for r in summary})
    lines = [ax for ax in (ax_speed, ax_eff) if ax is not None]
    for ax in lines:
        ax.set_xscale("log", base=2)
        ax.set_xticks(every, [str(r) for r in every])
        ax.minorticks_off()
        ax.set_xlim(min(every) / 1.4, max(every) * 1.4)
        ax.set_xlabel("ranks")
        ax.grid(alpha=0.3)
    if ax_speed is not None:
        scale, ticks, labels = speedup_ticks(speed_values)
        if scale == "log":
            ax_speed.set_yscale("log", base=2)
            ax_speed.set_ylim(ticks[0] / 1.25, ticks[-1] * 1.25)
        else:
            ax_speed.set_ylim(0, max(speed_values) * 1.15)
        ax_speed.set_yticks(ticks, labels)
        ax_speed.minorticks_off()
        ax_speed.set_ylabel("speed-up over the fewest ranks")
        ax_speed.set_title("strong scaling: speed-up")
        _legend_below(ax_speed)
    ax_eff.axhline(1.0, color="k", ls="--", lw=1, label="ideal")
    ax_eff.set_ylim(0, max(1.1, max(r["efficiency"] for r in summary) * 1.15))
    ax_eff.set_ylabel("parallel efficiency")
    ax_eff.set_title("efficiency")
    _legend_below(ax_eff)
    if max(every) > cores:
        for ax in lines:
            ax.axvspan(cores * 1.2, max(every) * 1.4, color="grey", alpha=0.15, lw=0)
            ax.text(cores * 1.2, ax.get_ylim()[1], " more ranks than cores", fontsize=7,
                    va="top", color="dimgrey")
    breakdown = list(zip(axes, modes))
    for ax, mode in breakdown:
        rows = [r for r in summary if r["mode"] == mode]
        x = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for group, phases in GROUPS.items():
            heights = [sum(r[f"{p}_s"] for p in phases) for r in rows]
            ax.bar(x, heights, bottom=bottom, label=group)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.hlines([r["wall_median_s"] for r in rows], [i - 0.45 for i in x],
                  [i + 0.45 for i in x], colors="k", lw=2, label="median wall time")
        ax.set_xticks(x, [str(r["ranks"]) for r in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xlabel("ranks")
        ax.set_ylabel("seconds: each phase's median over the runs\n(slowest rank per phase)")
        ax.set_title(f"{mode} scaling: where the time goes")
    if breakdown:  # the same groups in every panel: one legend, right of the last
        breakdown[-1][0].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
                                title="phases, as stacked", title_fontsize=8,
                                reverse=True)
    fig.suptitle(title, fontsize=10)
    return fig


def _annotate(ax, ranks: list[int], values: list[float], colour: str, above: bool) -> None:
    """Each measured point's value beside it (above, or below for the second series)."""
    for r, v in zip(ranks, values):
        ax.annotate(f"{v:.2f}", (r, v), textcoords="offset points",
                    xytext=(0, 7 if above else -7), ha="center",
                    va="bottom" if above else "top", fontsize=8, color=colour)


def _legend_below(ax) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=2,
              frameon=False)


def plot(summary: list[dict], path: Path, title: str, cores: int) -> None:
    """:func:`figure`, saved as a PNG."""
    figure(summary, title, cores).savefig(path, dpi=110)


# --------------------------------------------------------------------------- rows on disk
INT_COLUMNS = {"ranks", "repeat", "voxels", "images"}


def load_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's scaling.csv (ValueError if its columns are not ours)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != RUN_COLUMNS:
            raise ValueError(f"{path} has other columns than this script writes "
                             f"({', '.join(reader.fieldnames or [])})")
        return [{k: (v if k == "mode" else int(v) if k in INT_COLUMNS else float(v))
                 for k, v in row.items()} for row in reader]


def append_row(path: Path, row: dict) -> None:
    """One measured run onto scaling.csv at once (with the header if the file is new)."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v)
                         for k, v in row.items() if k in RUN_COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def write_outputs(out: Path, rows: list[dict], cores: int) -> None:
    """scaling_summary.csv and scaling.png from the rows measured so far, and the table."""
    summary = summarise(rows) if rows else []
    write_csv(out / "scaling_summary.csv", SUMMARY_COLUMNS, summary)
    if not rows:
        print(f"scaling: no point measured; wrote an empty {out / 'scaling_summary.csv'}",
              flush=True)
        return
    repeats = max(r["repeat"] for r in rows)
    title = (f"mpiblmm scaling, {max(r['images'] for r in rows)} images; {cores} cores; "
             f"medians over up to {repeats} run(s) per point; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    plot(summary, out / "scaling.png", title, cores)
    print(f"\n{'mode':<6} {'ranks':>5} {'voxels':>8} {'median s':>9} {'speed-up':>9} "
          f"{'ideal':>6} {'efficiency':>10}  " + " ".join(f"{p:>7}" for p in PHASES))
    for r in summary:  # weak scaling: no speed-up, its time ratio is the efficiency
        speedup, ideal = ((f"{r['speedup']:9.2f}", f"{r['ideal_speedup']:6.1f}")
                          if r["speedup"] is not None else (f"{'-':>9}", f"{'-':>6}"))
        print(f"{r['mode']:<6} {r['ranks']:>5} {r['voxels']:>8} {r['wall_median_s']:9.2f} "
              f"{speedup} {ideal} {r['efficiency']:10.2f}  "
              + " ".join(f"{r[f'{p}_s']:7.2f}" for p in PHASES))
    print(f"\nwrote {out / 'scaling.csv'}, {out / 'scaling_summary.csv'}, "
          f"{out / 'scaling.png'}", flush=True)


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (exit 2), not the usage."""

    def error(self, message):
        self.exit(2, f"scaling.py: {message}\n")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["strong", "weak", "both"], default="both")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec", type=Path, help="strong scaling on this study instead of a "
                    "simulated one (weak scaling always simulates its studies)")
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--visits", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=[20, 20, 15],
                    help="grid of the simulated strong-scaling study")
    ap.add_argument("--voxels-per-rank", type=int, default=3000,
                    help="weak scaling: grid voxels per rank (the grid grows along its 3rd "
                    "side, by whole slices of the first two sides of --shape)")
    ap.add_argument("--fit-args", default="", help="extra `mpiblmm fit` arguments, written "
                    "with '=' as they start with '-': --fit-args=\"--max-memory-mb 512\"")
    ap.add_argument("--out", type=Path,
                    default=Path(f"scaling-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"))
    ap.add_argument("--resume", action="store_true",
                    help="continue the study in --out: keep the points of its scaling.csv "
                    "and run only the missing ones")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = ap.parse_args(argv)
    if min(args.ranks) < 1 or args.repeats < 1:
        ap.error("--ranks and --repeats must be at least 1")
    if min(args.shape) < 1 or args.voxels_per_rank < 1 or args.subjects < 1 or args.visits < 1:
        ap.error("--shape, --voxels-per-rank, --subjects and --visits must be at least 1")
    if args.spec is not None and not args.spec.is_file():
        ap.error(f"--spec {args.spec}: no such file")
    if args.spec is not None and args.mode == "weak":
        ap.error(f"--spec {args.spec}: weak scaling simulates a study per rank count; the "
                 "spec's study is for --mode strong (or both)")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        ap.error(f"--timeout {args.timeout:g}: expected seconds greater than 0")
    try:
        problem = fit_args_problem(shlex.split(args.fit_args))
    except ValueError as exc:     # shlex: an unclosed quote
        problem = f"{exc}"
    if problem is not None:
        ap.error(f"--fit-args {args.fit_args!r}: {problem}")
    ranks_list = sorted(set(args.ranks))
    csv_path = args.out / "scaling.csv"
    rows: list[dict] = []
    if csv_path.exists() and csv_path.stat().st_size > 0:
        if not args.resume:
            ap.error(f"{csv_path} exists: pass --resume to continue that study, or choose "
                     f"another --out")
        try:
            rows = load_rows(csv_path)
        except (ValueError, KeyError) as exc:
            ap.error(f"--resume: {exc}")
    # the study's options, kept beside the CSV: a --resume with others would mix two studies
    # in one summary (HPC recheck: 45- and 60-image rows, 144- and 288-voxel rows, compared)
    study = {"spec": str(args.spec.resolve()) if args.spec else None,
             "subjects": args.subjects, "visits": args.visits, "shape": list(args.shape),
             "voxels_per_rank": args.voxels_per_rank, "fit_args": args.fit_args}
    options_path = args.out / "scaling-options.json"
    if rows and options_path.is_file():
        try:
            before = json.loads(options_path.read_text())
        except ValueError:
            before = {}
        changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {v!r}"
                   for k, v in study.items() if k in before and before[k] != v]
        if changed:
            ap.error(f"--resume: {csv_path} was measured with other study options "
                     f"({'; '.join(changed)}): give the same options, or another --out")

    command, flag = launcher()
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runner = Runner(command, flag, available_cores(), is_open_mpi(command), env, args.timeout)
    if max(ranks_list) > runner.cores:
        print(f"scaling.py: warning: {max(ranks_list)} ranks on {runner.cores} cores: the "
              f"larger rank counts share cores, so their figures measure time sharing, not "
              f"scaling" + (" (Open MPI: adding --oversubscribe)" if runner.open_mpi else ""),
              file=sys.stderr, flush=True)
    fit_args = shlex.split(args.fit_args)
    work = args.out / "work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        options_path.write_text(json.dumps(study) + "\n")
    except OSError as exc:
        ap.error(f"--out {args.out}: cannot create it ({exc.strerror})")

    plans: list[tuple[str, int, object]] = []  # (mode, ranks, how to make its study)
    if args.mode in ("strong", "both"):
        strong = (lambda: args.spec.resolve()) if args.spec else (
            lambda: simulate(runner, work / "strong", args.subjects, args.visits,
                             tuple(args.shape), 1))
        plans += [("strong", r, strong) for r in ranks_list]
    if args.mode in ("weak", "both"):
        for r in ranks_list:
            shape = weak_shape(args.shape, args.voxels_per_rank, r)
            plans.append(("weak", r, lambda shape=shape, r=r: simulate(
                runner, work / f"weak-{r}", args.subjects, args.visits, shape, 1)))
    done = {(r["mode"], r["ranks"], r["repeat"]) for r in rows}
    todo = sum((mode, ranks, repeat) not in done for repeat in range(1, args.repeats + 1)
               for mode, ranks, _ in plans)

    print(f"scaling: {len(plans)} points x {args.repeats} repeats"
          + (f" ({len(plans) * args.repeats - todo} already in {csv_path})" if rows else "")
          + f", launcher {shlex.join(command)} {flag} R, {runner.cores} cores", flush=True)
    handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    specs: dict[tuple[str, int], Path] = {}
    code = 0
    try:
        for repeat in range(1, args.repeats + 1):
            for mode, ranks, make in plans:  # interleaved: noise hits every point alike
                if (mode, ranks, repeat) in done:
                    continue
                if (mode, ranks) not in specs:  # simulated when first needed
                    specs[mode, ranks] = make()
                spec = specs[mode, ranks]
                images = images_of(spec)
                earlier = {r["images"] for r in rows if (r["mode"], r["ranks"]) == (mode, ranks)}
                if earlier and earlier != {images}:
                    raise RunFailed(f"--resume: {csv_path} has {mode} {ranks}-rank runs of "
                                    f"{sorted(earlier)} images, this study has {images}: "
                                    f"give the same study options as before")
                result = fit_once(runner, ranks, spec, work / f"out-{mode}-{ranks}", fit_args)
                row = {"mode": mode, "ranks": ranks, "repeat": repeat, "images": images,
                       **result}
                signals = {signal.SIGTERM, signal.SIGINT}
                signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # no half-written row
                try:
                    append_row(csv_path, row)
                    rows.append(row)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
                print(f"  {mode:<6} {ranks:>4} ranks, repeat {repeat}: "
                      f"{result['wall_s']:7.2f} s (fit {result['fit_s']:.2f} s, ingest "
                      f"{result['ingest_s']:.2f} s)", flush=True)
    except RunFailed as exc:
        print(f"scaling.py: {exc}", file=sys.stderr, flush=True)
        code = 1
    except (Stopped, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"scaling.py: stopped by {signal.Signals(signum).name}", file=sys.stderr,
              flush=True)
        code = 128 + signum
    finally:
        # a second signal while the summary is written should not cut it short
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)
    write_outputs(args.out, rows, runner.cores)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if code:
        for left in work.glob("out-*"):  # the stopped point's output and log
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
        print(f"scaling.py: {len(rows)} run(s) are in {csv_path}; run the same command with "
              f"--resume to add the missing ones", file=sys.stderr, flush=True)
        return code
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
