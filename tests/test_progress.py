"""The log of a fit without MPI (mpiblmm/progress.py): progress lines, the heartbeat, the
terminal bar, the log files and the CLI flags.  The counting over ranks is tested in
tests/mpi/test_progress.py, the whole command in tests/cli/test_progress_cli.py.
"""

from __future__ import annotations

import io
import time

import pytest

from mpiblmm.cli import get_parser
import numpy as np

from mpiblmm.progress import JobLog, LogOptions, format_seconds, progress_line, time_left
from mpiblmm.timers import PhaseTimer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42.2, "42 s"), (185, "3 min 05 s"),
                                           (7620, "2 h 07 min"), (float("inf"), "unknown")])
def test_durations_read_like_a_person_would_write_them(seconds, text):
    assert format_seconds(seconds) == text


def test_a_progress_line_has_counts_share_rate_and_time_left():
    # 1,000 of 4,000 voxels in 10 s: 100 voxels/s, 3,000 left -> 30 s.
    line = progress_line(1000, 4000, 10.0, 1000, 1, 4)
    assert line == ("fit 1,000/4,000 voxels (25.0%), 100 voxels/s, 10 s elapsed, "
                    "about 30 s left; 1/4 ranks finished")
    # Resumed voxels count as done but not towards the rate: 500 fresh in 10 s -> 50/s.
    assert "50 voxels/s, 10 s elapsed, about 1 min 00 s left" in progress_line(1000, 4000, 10.0,
                                                                                500, 0, 4)
    assert "left" not in progress_line(4000, 4000, 10.0, 4000, 4, 4)
    # a slow fit (5.6 s per voxel) is not "0 voxels/s"
    assert "fit 20/36 voxels (55.6%), 0.18 voxels/s," in progress_line(20, 36, 110.0, 20, 0, 1)
    assert ", 2.5 voxels/s," in progress_line(25, 36, 10.0, 25, 0, 1)


def test_the_time_left_is_the_slowest_ranks_own():
    # rows: done, resumed, final, slab.  After 10 s rank 0 has done 900 of 1,000 (90/s),
    # rank 1 100 of 1,000 (10/s): the job ends in 90 s, not the mean rate's 800/100 = 8 s.
    table = np.array([[900, 0, 0, 1000], [100, 0, 0, 1000]])
    assert time_left(table, 2000, 10.0) == pytest.approx(90.0)
    assert "about 1 min 30 s left" in progress_line(1000, 2000, 10.0, 1000, 0, 2,
                                                    time_left(table, 2000, 10.0))
    # a stalled rank's rate falls with the time, so its time left grows
    assert time_left(table, 2000, 20.0) == pytest.approx(180.0)
    # finished ranks count for nothing; one with nothing fitted yet goes at the mean rate
    table = np.array([[1000, 0, 1, 1000], [0, 0, 0, 1000], [500, 0, 0, 1000]])
    assert time_left(table, 3000, 10.0) == pytest.approx(1000 / 75.0)
    # resumed voxels are done but not fitted: 200 fresh in 10 s, 600 left -> 30 s
    table = np.array([[400, 200, 0, 1000]])
    assert time_left(table, 1000, 10.0) == pytest.approx(30.0)
    # a rank not heard from: its voxels are what the others' slabs (and the earlier run)
    # leave of the total, at the mean rate: (3,000 - 1,000 - 500) at 50/s
    table = np.array([[500, 0, 0, 1000], [0, 0, 0, 0]])
    assert time_left(table, 3000, 10.0, resumed_total=500) == pytest.approx(30.0)
    # nothing fitted yet: unknown; nothing left: 0
    assert time_left(np.array([[0, 0, 0, 10]]), 10, 5.0) == float("inf")
    assert time_left(np.array([[10, 0, 1, 10]]), 10, 5.0) == 0.0


def test_only_rank_0_writes_and_quiet_keeps_the_log_file(tmp_path):
    out0, out1 = io.StringIO(), io.StringIO()
    logfile = tmp_path / "sub" / "fit.log"
    log0 = JobLog(0, quiet=True, options=LogOptions(str(logfile), 0.0), stream=out0)
    log1 = JobLog(1, options=LogOptions(str(logfile), 0.0), stream=out1)
    for log in (log0, log1):
        log.say("mpiblmm: hello")
        log.close()
    assert out0.getvalue() == "" and out1.getvalue() == ""
    assert logfile.read_text() == "mpiblmm: hello\n"


def test_phases_are_announced_once_each_and_the_chunk_loop_counts_as_fit():
    out = io.StringIO()
    log = JobLog(0, options=LogOptions(progress_interval=0.0), stream=out)
    timer = PhaseTimer(on_enter=log.phase)
    for name in ["setup", "ingest", "ingest", "create", "read", "fit", "write", "read",
                 "finish", "export"]:
        with timer.phase(name):
            pass
    log.close()
    phases = [line.split("phase ")[1] for line in out.getvalue().splitlines()]
    assert phases == ["setup", "ingest", "create", "finish", "export"]  # fit: by Progress
    assert set(timer.seconds) == {"setup", "ingest", "create", "read", "fit", "write", "finish",
                                  "export"}


def test_the_heartbeat_speaks_when_a_phase_runs_long():
    out = io.StringIO()
    log = JobLog(0, options=LogOptions(progress_interval=0.1), stream=out)
    log.phase("ingest")
    time.sleep(0.45)
    log.close()
    beats = [line for line in out.getvalue().splitlines() if "phase ingest running" in line]
    assert 2 <= len(beats) <= 5, out.getvalue()


def test_a_terminal_gets_a_bar_redrawn_in_place_and_the_log_file_plain_lines(tmp_path):
    term = Terminal()
    log = JobLog(0, options=LogOptions(str(tmp_path / "f.log"), 0.0), stream=term)
    log.report("fit 5/10 voxels", 0.5)
    log.report("fit 10/10 voxels", None)
    log.close()
    text = term.getvalue()
    assert text.startswith("\r[" + "#" * 15 + "-" * 15 + "] fit 5/10")
    assert text.endswith("\nmpiblmm: [0 s] fit 10/10 voxels\n")
    assert (tmp_path / "f.log").read_text().splitlines() == [
        "mpiblmm: [0 s] fit 5/10 voxels", "mpiblmm: [0 s] fit 10/10 voxels"]


def test_rank_logs_are_one_file_per_rank(tmp_path):
    for rank in (0, 3):
        log = JobLog(rank, quiet=True, options=LogOptions(rank_logs=str(tmp_path / "logs")))
        log.note("chunk 1 done")
        log.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["rank-00000.log", "rank-00003.log"]
    assert (tmp_path / "logs" / "rank-00003.log").read_text().split()[1:] == ["chunk", "1",
                                                                              "done"]


def test_cli_flags_reach_the_log_options():
    args = get_parser().parse_args(["fit", "s.json", "--log-file", "f.log",
                                    "--progress-interval", "2.5", "--rank-logs", "logs"])
    assert LogOptions.from_args(args) == LogOptions("f.log", 2.5, "logs")
    assert LogOptions.from_args(get_parser().parse_args(["fit", "s.json"])) == LogOptions()
    with pytest.raises(SystemExit):
        get_parser().parse_args(["fit", "s.json", "--progress-interval", "-1"])


def test_a_log_file_that_cannot_be_written_is_a_user_error_naming_the_flag(tmp_path):
    from mpiblmm.errors import UserError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"^--rank-logs: cannot write .*rank-00002.log"):
        JobLog(2, options=LogOptions(rank_logs=str(tmp_path / "a_file")))


class _FullDisk(io.StringIO):
    """A stream whose disk filled after ``room`` characters (ENOSPC, as a full tmpfs)."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room
        self.name = "full.log"

    def write(self, text):
        if self.tell() + len(text) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(text)


def test_a_log_on_a_full_disk_is_dropped_with_one_warning_and_the_job_goes_on(capsys):
    """An audit filled the disk under --log-file and --rank-logs: the job ended with a
    traceback after its voxels were fitted, results.h5 left incomplete."""
    out = io.StringIO()
    log = JobLog(0, options=LogOptions(progress_interval=0), stream=out)
    log._file, log._rank_file = _FullDisk(40), _FullDisk(10**6)
    for i in range(5):
        log.say(f"line {i} of the fit's log")
    log.close()
    assert out.getvalue().count("\n") == 5                  # stdout got every line
    err = capsys.readouterr().err.splitlines()
    assert err == ["mpiblmm: warning: cannot write rank 0's log full.log (No space left on "
                   "device); the job goes on without it"]


def test_standard_output_on_a_full_disk_is_dropped_with_one_warning(capsys):
    from mpiblmm.cli import QuietWhenClosed

    stream = QuietWhenClosed(_FullDisk(12))
    for _ in range(3):
        print("mpiblmm: a summary line", file=stream)
        stream.flush()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot write standard output (No space left" in err[0]


def test_a_log_file_that_is_not_a_log_is_refused_untouched(tmp_path):
    """A fault audit named the spec's X.csv as --log-file: a line went into it before the
    spec was read, and the fit then blamed the CSV.  An existing file that is not a log is
    refused as it is; an empty file and an earlier log (a resumed job's) are appended to."""
    from mpiblmm.errors import UserError

    data = tmp_path / "X.csv"
    data.write_text("1,2\n3,4\n")
    with pytest.raises(UserError, match=r"^--log-file: .*X.csv exists and is not an mpiblmm "
                                        r"log"):
        JobLog(0, quiet=True, options=LogOptions(str(data), 0.0))
    assert data.read_text() == "1,2\n3,4\n"
    for name, before in (("empty.log", ""), ("earlier.log", "mpiblmm: [0 s] phase setup\n")):
        path = tmp_path / name
        path.write_text(before)
        log = JobLog(0, quiet=True, options=LogOptions(str(path), 0.0))
        log.say("mpiblmm: resumed")
        log.close()
        assert path.read_text() == before + "mpiblmm: resumed\n"


def test_an_80_column_bar_keeps_the_time_left_and_the_ranks(monkeypatch):
    """A batch-log audit: at 80 columns the bar's text stopped before 'about N s left'."""
    import os
    import shutil

    from mpiblmm.progress import progress_line

    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((80, 24)))
    term = Terminal()
    log = JobLog(0, options=LogOptions(None, 0.0), stream=term)
    log.report(progress_line(200, 3072, 2.0, 200, 0, 2), 0.065)
    line = term.getvalue().split("\r")[-1].replace("\033[K", "")
    assert len(line) <= 80 and line.endswith("] fit 200/3,072 (6.5%), 100/s, ~29 s left; "
                                             "0/2 ranks finished"), line
    log.close()
