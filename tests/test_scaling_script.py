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
    # weak: ideal time ratio 1; 5 / 6.25 = 0.8, an efficiency, not a speed-up
    assert out["weak", 4]["efficiency"] == pytest.approx(0.8)
    assert out["weak", 4]["speedup"] is None and out["weak", 4]["ideal_speedup"] is None
    assert out["weak", 4]["voxels_per_rank"] == 100


def test_weak_rows_of_the_summary_csv_have_an_efficiency_and_no_speed_up(scaling, tmp_path):
    """The weak rows' time ratio T(1)/T(R) used to be in the ``speedup`` column (with an
    ideal_speedup of 1): it is an efficiency, and only there now (audit 19)."""
    rows = [_row(scaling, "strong", 1, 10.0), _row(scaling, "strong", 2, 8.0),
            _row(scaling, "weak", 1, 5.0, voxels=100), _row(scaling, "weak", 2, 6.25, 200)]
    path = tmp_path / "summary.csv"
    scaling.write_csv(path, scaling.SUMMARY_COLUMNS, scaling.summarise(rows))
    out = {(r["mode"], r["ranks"]): r for r in _rows(path)}
    assert {"speedup", "ideal_speedup", "efficiency"} <= set(out["strong", "2"])
    assert (out["strong", "2"]["speedup"], out["strong", "2"]["ideal_speedup"],
            out["strong", "2"]["efficiency"]) == ("1.2500", "2.0000", "0.6250")
    assert (out["weak", "2"]["speedup"], out["weak", "2"]["ideal_speedup"],
            out["weak", "2"]["efficiency"]) == ("", "", "0.8000")


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
    assert all(r["speedup"] and r["efficiency"] for r in summary if r["mode"] == "strong")
    assert all(not r["speedup"] and r["efficiency"] for r in summary if r["mode"] == "weak")
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "work").exists()


# ------------------------------------------------------------------ the figure, read back
def _study(scaling, modes=("strong", "weak"), ranks=(1, 2), walls=None):
    """Summary rows of a study whose phases (1 s each, finish 0.3 s) are known."""
    walls = walls or {"strong": {1: 1.68, 2: 2.2185}, "weak": {1: 1.45, 2: 2.1436}}
    rows = []
    for mode in modes:
        for r in ranks:
            row = _row(scaling, mode, r, walls[mode][r], voxels=100 * r)
            row.update({f"{p}_s": 1.0 for p in scaling.PHASES}, finish_s=0.3)
            rows.append(row)
    return scaling.summarise(rows)


def _drawn(scaling, summary, cores=2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = scaling.figure(summary, "test", cores)
    FigureCanvasAgg(fig).draw()     # the layout is made at drawing: legends placed
    return fig


def _axes(fig):
    return {ax.get_title(): ax for ax in fig.axes}


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_every_phase_is_in_one_group_and_setup_is_not_called_start_up(scaling):
    """The "start-up" bar also held mpiblmm's setup phase, which its legend did not say
    (audit 19); finish, once the fit times it, is a segment of its own."""
    grouped = [p for phases in scaling.GROUPS.values() for p in phases]
    assert sorted(grouped) == sorted(scaling.PHASES)
    assert [g for g, phases in scaling.GROUPS.items() if "setup" in phases] == \
        ["setup (mpiblmm: spec, design)"]
    assert [phases for g, phases in scaling.GROUPS.items() if g.startswith("start-up")] == \
        [["startup"]]
    assert ["finish"] in scaling.GROUPS.values()


def test_the_breakdown_says_its_bars_are_per_phase_medians_and_has_every_group(scaling):
    fig = _drawn(scaling, _study(scaling))
    for mode in ("strong", "weak"):
        ax = _axes(fig)[f"{mode} scaling: where the time goes"]
        assert "median run" not in ax.get_ylabel()
        assert "each phase's median over the runs" in ax.get_ylabel()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
        bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
        assert list(bars) == list(scaling.GROUPS)
        assert bars["finish (reductions, summary)"] == pytest.approx([0.3, 0.3])
        assert bars["setup (mpiblmm: spec, design)"] == pytest.approx([1.0, 1.0])
        assert bars["results I/O (create, read, write)"] == pytest.approx([3.0, 3.0])
    # one legend for the breakdown panels (the same groups), top of the stack first
    legend = _legend_texts(_axes(fig)["weak scaling: where the time goes"])
    assert legend[:-1] == list(reversed(scaling.GROUPS)) and "median wall time" in legend
    assert _axes(fig)["strong scaling: where the time goes"].get_legend() is None


def test_the_speed_up_axis_has_readable_ticks_and_the_points_their_values(scaling):
    """The log axis had ticks at 1 and 2 only: 0.76 and 0.68 could not be read (audit 19)."""
    fig = _drawn(scaling, _study(scaling))
    ax = _axes(fig)["strong scaling: speed-up"]
    ticks = [float(t.get_text()) for t in ax.get_yticklabels()]
    assert len(ticks) >= 4 and min(ticks) <= 0.5 and max(ticks) >= 2
    assert ax.get_ylim()[0] <= min(ticks) and ax.get_ylim()[1] >= max(ticks)
    assert {"1.00", "0.76"} <= {t.get_text() for t in ax.texts}
    eff = _axes(fig)["efficiency"]
    assert {"0.38", "0.68"} <= {t.get_text() for t in eff.texts}
    assert _legend_texts(ax) == ["strong: measured, T(fewest) / T(R)", "strong: ideal"]
    assert _legend_texts(eff) == ["strong: speed-up / ideal", "weak: T(fewest) / T(R)",
                                  "ideal"]


def test_a_wide_speed_up_range_is_log2_with_fractions_labelled(scaling):
    walls = {"strong": {1: 10.0, 2: 6.0, 4: 4.0, 8: 3.0, 16: 40.0}}
    fig = _drawn(scaling, _study(scaling, ("strong",), (1, 2, 4, 8, 16), walls), cores=8)
    ax = _axes(fig)["strong scaling: speed-up"]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_yticklabels()] == \
        ["0.25", "0.5", "1", "2", "4", "8", "16"]
    assert "0.25" in {t.get_text() for t in ax.texts}      # 10 / 40
    assert scaling.speedup_ticks([1.0, 0.76, 2.0])[0] == "linear"


def test_the_legends_cover_no_data(scaling):
    """The breakdown's legends covered its lower bars (audit 19): every legend is outside
    every panel, and inside the figure."""
    for summary in (_study(scaling), _study(scaling, ("weak",))):
        fig = _drawn(scaling, summary)
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        lines = [ax for ax in fig.axes if "where the time goes" not in ax.get_title()]
        assert len(legends) == len(lines) + 1      # the lines' panels, one for the bars
        page = fig.bbox
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert page.x0 <= box.x0 and box.x1 <= page.x1 + 1
            assert page.y0 <= box.y0 and box.y1 <= page.y1 + 1
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), \
                    (_legend_texts(legend.axes), ax.get_title())


def test_weak_scaling_alone_has_no_speed_up_panel(scaling):
    fig = _drawn(scaling, _study(scaling, ("weak",)))
    assert list(_axes(fig)) == ["efficiency", "weak scaling: where the time goes"]


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
finish = float(os.environ.get("FINISH", "0.01"))   # the fit's finish phase, max over ranks
time.sleep(0.6 + finish)   # the wall time exceeds the fit's total of 0.49 s + finish
out = Path(argv[argv.index("--output") + 1])
out.mkdir(parents=True)
seconds = {"setup": 0.05, "ingest": 0.1, "create": 0.02, "read": 0.02, "fit": 0.15,
           "write": 0.01, "finish": finish}
seconds = {k: [v / 2, v / 2, v] for k, v in seconds.items()}      # max over ranks last
if os.environ.get("NO_FINISH"):     # a fit that does not time its finish (0 then)
    del seconds["finish"]
late = finish - 0.01                # the total grows with the finish
if os.environ.get("OLD_SUMMARY"):   # the summary's total ends before the export
    seconds["total"] = [0.4, 0.43, 0.46 + late]
    log = Path(argv[argv.index("--log-file") + 1])
    log.write_text("  seconds per phase (min / median / max over ranks):\n"
                   "    export       0.02     0.03     0.04\n")
else:
    seconds["export"] = [0.02, 0.03, 0.04]
    seconds["total"] = [0.4, 0.45, 0.5 + late]
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
@pytest.mark.parametrize("finish", ["0.01", "0.25"])
def test_the_phases_start_up_and_other_add_up_to_the_wall_time(tmp_path, tiny_spec,
                                                                old_summary, finish, scaling):
    """startup used to be wall - total - export although the stored total includes the
    export (export counted twice), the untimed part of the fit was in no column, and export
    was the log's min over ranks (audit 10, section 6).  The fit's finish, reported as 0
    until the pipeline times it, is a phase of its own when it is not: not in ``other``
    (audit 19)."""
    out = tmp_path / "sc"
    run = _scaling(["--mode", "strong", "--spec", str(tiny_spec), "--ranks", "1",
                    "--repeats", "1", "--out", str(out)],
                   _fake_env(tmp_path, OLD_SUMMARY=old_summary, FINISH=finish))
    assert run.returncode == 0, run.stderr
    [row] = _rows(out / "scaling.csv")
    phases = {p: float(row[f"{p}_s"]) for p in scaling.PHASES}
    total = 0.49 + float(finish)
    assert phases["export"] == 0.04                      # max over ranks, as every phase
    assert phases["fit"] == 0.15 and phases["setup"] == 0.05
    assert phases["finish"] == float(finish)
    assert phases["other"] == pytest.approx(0.1)         # total - timed phases
    assert phases["startup"] == pytest.approx(float(row["wall_s"]) - total, abs=1e-3)
    assert sum(phases.values()) == pytest.approx(float(row["wall_s"]), abs=1e-3)
    [summary] = _rows(out / "scaling_summary.csv")
    assert float(summary["other_s"]) == pytest.approx(0.1)
    assert float(summary["finish_s"]) == float(finish)


def test_a_fit_that_does_not_time_its_finish_puts_it_at_0(tmp_path, tiny_spec, scaling):
    out = tmp_path / "sc"
    run = _scaling(["--mode", "strong", "--spec", str(tiny_spec), "--ranks", "1",
                    "--repeats", "1", "--out", str(out)], _fake_env(tmp_path, NO_FINISH="1"))
    assert run.returncode == 0, run.stderr
    [row] = _rows(out / "scaling.csv")
    assert float(row["finish_s"]) == 0.0
    assert float(row["other_s"]) == pytest.approx(0.11)  # the untimed finish is untimed
    assert sum(float(row[f"{p}_s"]) for p in scaling.PHASES) == \
        pytest.approx(float(row["wall_s"]), abs=1e-3)


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
    # a batch-log audit: these were accepted, ignored, or failed after the simulation
    (["--mode", "weak", "--spec", str(SCRIPT)], "weak scaling simulates a study per rank"),
    (["--timeout", "-5"], "--timeout -5: expected seconds greater than 0"),
    (["--fit-args=--bogus"], "--fit-args '--bogus': unrecognized arguments: --bogus"),
    (["--fit-args=--chunk-voxels 0"], "fit: argument --chunk-voxels: expected a number of at "
                                      "least 1, got 0"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    run = _scaling([*args, "--out", str(tmp_path / "sc")], _pythonpath_env())
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert not (tmp_path / "sc").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    run = _scaling(["--ranks", "1", "--repeats", "1", "--out", str(tmp_path / "file" / "sc")],
                   _pythonpath_env())
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr == (f"scaling.py: --out {tmp_path / 'file' / 'sc'}: cannot create it "
                          "(Not a directory)\n")


def test_a_study_is_reused_only_when_simulated_with_the_same_options(scaling, tmp_path):
    """A --resume reused any complete study in work/, whatever its options: one run with a
    wrong --subjects left its study there, and the run with the right options was then
    refused for the image count it was itself giving (HPC audit, twenty-third session)."""
    calls = []

    class FakeRunner:
        def run(self, ranks, args):
            calls.append(args)
            folder = tmp_path / "study"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "spec.json").write_text("{}")
            return 0.1

    runner, folder = FakeRunner(), tmp_path / "study"
    scaling.simulate(runner, folder, 31, 3, (10, 10, 6), 0)
    scaling.simulate(runner, folder, 31, 3, (10, 10, 6), 0)          # reused
    assert len(calls) == 1
    scaling.simulate(runner, folder, 30, 3, (10, 10, 6), 0)          # other options
    assert len(calls) == 2 and calls[1][calls[1].index("--subjects") + 1] == "30"
    scaling.simulate(runner, folder, 30, 3, (10, 10, 7), 0)
    assert len(calls) == 3
    (folder / "study-options.json").unlink()                        # an earlier version's
    scaling.simulate(runner, folder, 30, 3, (10, 10, 7), 0)
    assert len(calls) == 4


def test_a_resume_with_other_study_options_is_refused(tmp_path, tiny_spec):
    """A --resume with other study options mixed two studies in one summary (HPC recheck:
    45- and 60-image rows, 144- and 288-voxel rows, and a speed-up between them)."""
    out = tmp_path / "sc"
    args = ["--mode", "strong", "--spec", str(tiny_spec), "--ranks", "1", "2",
            "--repeats", "1", "--out", str(out)]
    run = _scaling(args, _fake_env(tmp_path, FAIL_AT="2"))
    assert run.returncode == 1 and len(_rows(out / "scaling.csv")) == 1
    other = _scaling([*args, "--resume", "--fit-args=--chunk-voxels 5"], _fake_env(tmp_path))
    assert other.returncode == 2, other.stderr
    assert "was measured with other study options (--fit-args '' -> '--chunk-voxels 5')" \
        in other.stderr
    same = _scaling([*args, "--resume"], _fake_env(tmp_path))
    assert same.returncode == 0, same.stderr
    assert [r["ranks"] for r in _rows(out / "scaling.csv")] == ["1", "2"]
