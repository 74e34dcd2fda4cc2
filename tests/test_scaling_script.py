"""scripts/scaling.py: its arithmetic (speed-up, efficiency, weak-scaling grids) and one tiny
end-to-end run at 1 and 2 ranks that writes the CSVs and the PNG."""

from __future__ import annotations

import csv
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
                             "fit_s", "write_s", "finish_s", "export_s"]
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
