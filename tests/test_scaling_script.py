"""scripts/scaling.py: its arithmetic (speed-up, efficiency, weak-scaling grids) and one tiny
end-to-end run at 1 and 2 ranks that writes the CSVs and the PNG."""

from __future__ import annotations

import csv
import signal
import time
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _row(scaling, mode, ranks, wall, voxels=1000, fit=1.0):
    row = {"mode": mode, "ranks": ranks, "repeat": 1, "voxels": voxels, "images": 10,
           "wall_s": wall}
    row.update({f"{p}_s": 0.0 for p in scaling.PHASES})
    row["fit_s"] = fit
    return row


def test_speed_up_and_efficiency_are_over_the_fewest_ranks(scaling):
    rows = [_row(scaling, "strong", 2, 10.0), _row(scaling, "strong", 2, 12.0),
            _row(scaling, "strong", 8, 4.0), _row(scaling, "strong", 8, 3.0, fit=0.5),
            _row(scaling, "weak", 1, 5.0, voxels=100), _row(scaling, "weak", 4, 6.25, 400)]
    out = {(r["mode"], r["ranks"]): r for r in scaling.summarise(rows)}
    # strong, base = median(10, 12) = 11 s at 2 ranks; 8 ranks: median(4, 3) = 3.5 s
    assert out["strong", 8]["speedup"] == pytest.approx(11 / 3.5)
    assert out["strong", 8]["ideal_speedup"] == 4.0
    assert out["strong", 8]["efficiency"] == pytest.approx(11 / 3.5 / 4)
    assert out["strong", 8]["fit_s"] == pytest.approx(0.75)
    assert out["strong", 2]["efficiency"] == 1.0
    # weak: ideal time ratio 1; 5 / 6.25 = 0.8
    assert out["weak", 4]["efficiency"] == pytest.approx(0.8)
    assert out["weak", 4]["voxels_per_rank"] == 100


def test_weak_grids_grow_exactly_with_the_ranks(scaling):
    assert scaling.weak_shape([10, 10, 3], 250, 1) == (10, 10, 3)
    assert scaling.weak_shape([10, 10, 3], 250, 4) == (10, 10, 12)


@pytest.mark.spawns_mpiexec
def test_a_tiny_scaling_study_writes_csvs_and_a_png(tmp_path):
    out = tmp_path / "scaling"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run([sys.executable, str(SCRIPT), "--ranks", "1", "2", "--repeats", "1",
                          "--subjects", "6", "--visits", "3", "--shape", "4", "4", "3",
                          "--voxels-per-rank", "32", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mode", "ranks", "repeat", "voxels", "images", "wall_s",
                             "startup_s", "setup_s", "ingest_s", "create_s", "read_s",
                             "fit_s", "write_s", "finish_s", "export_s", "other_s"]
    assert [(r["mode"], r["ranks"]) for r in rows] == [("strong", "1"), ("strong", "2"),
                                                       ("weak", "1"), ("weak", "2")]
    assert {r["voxels"] for r in rows if r["mode"] == "strong"} == {"48"}
    assert [r["voxels"] for r in rows if r["mode"] == "weak"] == ["32", "64"]
    assert all(float(r["wall_s"]) > float(r["fit_s"]) > 0 for r in rows)
    with open(out / "scaling_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {"speedup", "ideal_speedup", "efficiency", "wall_median_s"} <= set(summary[0])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "work").exists()


def test_open_mpi_gets_oversubscribe_only_beyond_the_cores_and_mpich_never(scaling):
    def runner(open_mpi):
        return scaling.Runner(["srun"] if not open_mpi else ["mpiexec"], "-n", 2, open_mpi,
                              {}, 10.0)
    assert runner(True).argv(4, ["fit"])[:4] == ["mpiexec", "--oversubscribe", "-n", "4"]
    assert runner(True).argv(2, ["fit"])[:3] == ["mpiexec", "-n", "2"]
    assert runner(False).argv(4, ["fit"])[:3] == ["srun", "-n", "4"]
    assert runner(False).argv(4, ["fit", "x"])[-2:] == ["fit", "x"]


# ------------------------------------------------------------------ a stand-in launcher
# $MPIEXEC for the tests below: `fake -n R mpiblmm ... fit SPEC --output OUT ...` writes a
# results.h5 with known per-phase seconds (no MPI); the FAIL_AT-th fit fails, the HANG_AT-th
# waits for SIGTERM (and exits 3, as mpiblmm does).  `simulate` is refused: the tests pass a
# study with --spec.
FAKE_LAUNCHER = r'''
import json, os, signal, sys, time
from pathlib import Path
argv = sys.argv[1:]
if "--version" in argv:
    sys.exit(0)
if "fit" not in argv:
    sys.exit("fake launcher: only fit")
calls = Path(os.environ["FAKE_CALLS"])
n = len(calls.read_text().splitlines()) + 1 if calls.exists() else 1
with open(calls, "a") as f:
    f.write(" ".join(argv[:2]) + "\n")
if str(n) == os.environ.get("FAIL_AT"):
    sys.exit("fake launcher: this fit fails")
if str(n) == os.environ.get("HANG_AT"):
    def stop(*_):
        Path(os.environ["FAKE_CALLS"] + ".term").write_text("got TERM")
        sys.exit(3)
    signal.signal(signal.SIGTERM, stop)
    Path(os.environ["FAKE_CALLS"] + ".hang").write_text("")
    while True:
        time.sleep(0.05)
import h5py
time.sleep(0.6)   # the wall time exceeds the fit's total of 0.5 s
out = Path(argv[argv.index("--output") + 1])
out.mkdir(parents=True)
seconds = {"setup": 0.05, "ingest": 0.1, "create": 0.02, "read": 0.02, "fit": 0.15,
           "write": 0.01, "finish": 0.01}
seconds = {k: [v / 2, v / 2, v] for k, v in seconds.items()}      # max over ranks last
if os.environ.get("OLD_SUMMARY"):   # the summary's total ends before the export
    seconds["total"] = [0.4, 0.43, 0.46]
    log = Path(argv[argv.index("--log-file") + 1])
    log.write_text("  seconds per phase (min / median / max over ranks):\n"
                   "    export       0.02     0.03     0.04\n")
else:
    seconds["export"] = [0.02, 0.03, 0.04]
    seconds["total"] = [0.4, 0.45, 0.5]
with h5py.File(out / "results.h5", "w") as f:
    f.attrs["summary"] = json.dumps({"seconds": seconds})
    f.create_dataset("voxels", data=list(range(48)))
'''


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    """A tiny simulated study (serial `mpiblmm simulate`, no launcher)."""
    folder = tmp_path_factory.mktemp("study") / "s"
    run = subprocess.run([sys.executable, "-m", "mpiblmm", "simulate", str(folder),
                          "--subjects", "6", "--visits", "3", "--shape", "4", "4", "3"],
                         capture_output=True, text=True, timeout=120, env=_pythonpath_env())
    assert run.returncode == 0, run.stderr
    return folder / "spec.json"


def _pythonpath_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.update(extra)
    return env


def _fake_env(tmp_path, **extra):
    fake = tmp_path / "fake_launcher.py"
    fake.write_text(FAKE_LAUNCHER)
    return _pythonpath_env(MPIEXEC=f"{sys.executable} {fake}", FAKE_CALLS=str(tmp_path / "calls"),
                           **extra)


def _scaling(args, env, **kwargs):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, env=env, **kwargs)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("old_summary", ["", "1"])
def test_the_phases_start_up_and_other_add_up_to_the_wall_time(tmp_path, tiny_spec,
                                                                old_summary, scaling):
    """startup used to be wall - total - export although the stored total includes the
    export (export counted twice), the untimed part of the fit was in no column, and export
    was the log's min over ranks (audit 10, section 6)."""
    out = tmp_path / "sc"
    run = _scaling(["--mode", "strong", "--spec", str(tiny_spec), "--ranks", "1",
                    "--repeats", "1", "--out", str(out)],
                   _fake_env(tmp_path, OLD_SUMMARY=old_summary))
    assert run.returncode == 0, run.stderr
    [row] = _rows(out / "scaling.csv")
    phases = {p: float(row[f"{p}_s"]) for p in scaling.PHASES}
    assert phases["export"] == 0.04                      # max over ranks, as every phase
    assert phases["fit"] == 0.15 and phases["setup"] == 0.05
    assert phases["other"] == pytest.approx(0.5 - 0.36 - 0.04)   # total - timed phases
    assert phases["startup"] == pytest.approx(float(row["wall_s"]) - 0.5, abs=1e-3)
    assert sum(phases.values()) == pytest.approx(float(row["wall_s"]), abs=1e-3)
    [summary] = _rows(out / "scaling_summary.csv")
    assert float(summary["other_s"]) == pytest.approx(0.1)


def test_each_run_is_kept_as_measured_and_a_failed_run_still_writes_the_summary(
        tmp_path, tiny_spec):
    """scaling.py used to write nothing until the end: one failed run lost every point."""
    out = tmp_path / "sc"
    args = ["--mode", "strong", "--spec", str(tiny_spec), "--ranks", "1", "2",
            "--repeats", "2", "--out", str(out)]
    run = _scaling(args, _fake_env(tmp_path, FAIL_AT="3"))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "this fit fails" in run.stderr
    assert [(r["ranks"], r["repeat"]) for r in _rows(out / "scaling.csv")] == \
        [("1", "1"), ("2", "1")]
    assert [r["ranks"] for r in _rows(out / "scaling_summary.csv")] == ["1", "2"]
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--resume" in run.stderr

    # the same command again is refused (it would mix two studies) ...
    again = _scaling(args, _fake_env(tmp_path))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "--resume" in again.stderr
    # ... and --resume runs only the missing points
    (tmp_path / "calls").unlink()
    resumed = _scaling([*args, "--resume"], _fake_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert len((tmp_path / "calls").read_text().splitlines()) == 2
    assert [(r["ranks"], r["repeat"]) for r in _rows(out / "scaling.csv")] == \
        [("1", "1"), ("2", "1"), ("1", "2"), ("2", "2")]
    assert [r["repeats"] for r in _rows(out / "scaling_summary.csv")] == ["2", "2"]
    assert not (out / "work").exists()


def test_sigterm_stops_the_running_point_and_writes_what_there_is(tmp_path, tiny_spec):
    """A batch job's time-limit signal used to lose the whole study."""
    out = tmp_path / "sc"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--mode", "strong", "--spec",
                             str(tiny_spec), "--ranks", "1", "2", "--repeats", "1",
                             "--out", str(out)], env=_fake_env(tmp_path, HANG_AT="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hang = tmp_path / "calls.hang"
    deadline = time.monotonic() + 60
    while not hang.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert hang.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert (tmp_path / "calls.term").exists()            # the running fit got the signal
    assert [r["ranks"] for r in _rows(out / "scaling.csv")] == ["1"]
    assert [r["ranks"] for r in _rows(out / "scaling_summary.csv")] == ["1"]
    assert (out / "scaling.png").exists()
    assert "SIGTERM" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--spec", "/nonexistent/spec.json"], "no such file"),
    (["--shape", "0", "20", "15"], "at least 1"),
    (["--voxels-per-rank", "0"], "at least 1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    run = _scaling([*args, "--out", str(tmp_path / "sc")], _pythonpath_env())
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert not (tmp_path / "sc").exists()
