"""`mpiblmm fit` at 3 ranks with many small chunks: the batch log's last progress line counts
the voxels of every rank, and --log-file / --rank-logs / --quiet do what they say."""

from __future__ import annotations

import re
import signal

import pytest

from .test_resume import _act_at, _launch, _mpiblmm, _signal_ranks


@pytest.mark.spawns_mpiexec
def test_progress_of_the_whole_job_in_the_log_file_and_per_rank_logs(tmp_path, run_mpi,
                                                                      mpiblmm_command):
    study = tmp_path / "study"
    run = run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "10",
                      "--visits", "3", "--shape", "6", "5", "4", "--seed", "2"], timeout=120)
    assert run.returncode == 0, run.stderr
    log = tmp_path / "logs" / "fit.log"
    run = run_mpi(3, [*mpiblmm_command, "fit", str(study / "spec.json"), "--output",
                      str(tmp_path / "out"), "--chunk-voxels", "7", "--quiet",
                      "--log-file", str(log), "--progress-interval", "0.01",
                      "--rank-logs", str(tmp_path / "ranks")], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == ""  # --quiet: nothing on stdout, everything in the log file
    lines = log.read_text().splitlines()
    fits = [line for line in lines if re.search(r"\] fit [\d,]+/120 voxels", line)]
    assert "fit 0/120 voxels on 3 rank(s)" in fits[0]
    assert "fit 120/120 voxels (100.0%)" in fits[-1] and "3/3 ranks finished" in fits[-1]
    assert not any("rank 0 chunk" in line for line in lines)  # the old rank-0-only lines
    phases = [m.group(1) for m in (re.search(r"\] phase (\w+)$", line) for line in lines) if m]
    assert phases[:3] == ["setup", "ingest", "create"] and phases[-2:] == ["finish", "export"]
    assert any(line.startswith("mpiblmm: fitted ") for line in lines)  # the summary too
    rank_logs = sorted(p.name for p in (tmp_path / "ranks").iterdir())
    assert rank_logs == ["rank-00000.log", "rank-00001.log", "rank-00002.log"]
    chunk_lines = (tmp_path / "ranks" / "rank-00002.log").read_text().count(" chunk ")
    assert chunk_lines >= 2  # 7 voxels a chunk: several chunks per rank


@pytest.mark.spawns_mpiexec
def test_an_unwritable_log_file_is_one_line_and_exit_2_on_every_rank(tmp_path, run_mpi,
                                                                     mpiblmm_command):
    (tmp_path / "spec.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "fit.log"  # its folder is a file
    run = run_mpi(2, [*mpiblmm_command, "fit", str(tmp_path / "spec.json"), "--log-file",
                      str(bad)], timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"mpiblmm: error: --log-file: cannot write {bad}: its folder is a file"]


@pytest.mark.spawns_mpiexec
def test_a_fit_stopped_by_a_signal_says_so_in_the_log_file_too(tmp_path, run_mpi,
                                                               mpiblmm_command):
    """A batch user reads the job in its --log-file: the "stopped by SIGTERM ... --resume"
    line went to stderr only, the log file ending at "fit stopped at N/120 voxels"."""
    study = tmp_path / "study"
    run = run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "10",
                      "--visits", "3", "--shape", "6", "5", "4", "--seed", "2"], timeout=120)
    assert run.returncode == 0, run.stderr
    log = tmp_path / "fit.log"
    cmd = _launch(1, [*_mpiblmm(), "fit", str(study / "spec.json"), "-o", str(tmp_path / "out"),
                      "--chunk-voxels", "1", "--progress-interval", "0.001", "--log-file",
                      str(log)])
    code, _, err, _ = _act_at(cmd, lambda line: re.search(r"fit [1-9][\d,]*/120 voxels \(", line),
                              _signal_ranks(signal.SIGTERM))
    # SIGTERM reaches the rank: 3 (MPICH's mpiexec may report 0 for a rank it signalled)
    assert code in (0, 3), err
    stop = [line for line in err.splitlines() if line.startswith("mpiblmm: stopped by")]
    assert len(stop) == 1 and "SIGTERM" in stop[0] and "--resume" in stop[0], err
    lines = log.read_text().splitlines()
    assert lines[-1] == stop[0], lines[-3:]  # the same line, last in the log file
    assert re.search(r"\] fit stopped at [\d,]+/120 voxels$", lines[-2]), lines[-3:]
