"""Resume bookkeeping, the output lock and atomic export, on one process without MPI."""

from __future__ import annotations

import json
import time
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import h5py  # noqa: E402  runtime dependencies: a missing one must fail, not skip

from mpiblmm import interrupt  # noqa: E402
from mpiblmm.errors import UserError  # noqa: E402
from mpiblmm.io.export import ExportStopped, export_nifti  # noqa: E402
from mpiblmm.io.lock import LOCK_NAME, acquire_lock  # noqa: E402
from mpiblmm.io.results import (ContrastLayout, ResultsLayout, check_resumable,  # noqa: E402
                                create_results, what_changed)
from mpiblmm.parallel import Slab, describe_io_error, partition_by_cost  # noqa: E402
from mpiblmm.pipeline import pending_chunks  # noqa: E402
from tests.io.helpers import AFFINE, GRID  # noqa: E402


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_job_and_replaces_a_dead_one(tmp_path):
    lock = acquire_lock(tmp_path)
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"another mpiblmm job .*PID {os.getpid()}"):
        acquire_lock(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    lock.release()  # twice is fine

    for stale in ({"host": socket.gethostname(), "pid": _dead_pid(), "start": 0},):
        (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
        acquire_lock(tmp_path).release()
        assert not list(tmp_path.iterdir())  # replaced, and nothing left beside it
    for live in ({"host": "another-node", "pid": _dead_pid(), "start": 0}, "", "{half"):
        (tmp_path / LOCK_NAME).write_text(live if isinstance(live, str) else json.dumps(live))
        with pytest.raises(UserError, match="another mpiblmm job"):
            acquire_lock(tmp_path)
    other = acquire_lock.__globals__["OutputLock"](tmp_path / LOCK_NAME, "not ours")
    other.release()                          # never removes another job's lock
    assert (tmp_path / LOCK_NAME).exists()


def test_an_empty_lock_file_is_a_job_starting_now_then_its_age(tmp_path):
    """A fault audit: an empty lock (a node that crashed between creating and writing it) was
    "a job that is starting now" forever; once a minute old its age is said instead."""
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(UserError, match="a job that is starting now"):
        acquire_lock(tmp_path)
    old = time.time() - 3 * 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with pytest.raises(UserError, match="an empty or unreadable lock written 3 h ago: a job "
                                        "that stopped while starting, if none is running"):
        acquire_lock(tmp_path)
    for seconds, said in ((600, "10 min"), (3 * 86400, "3 days")):
        os.utime(tmp_path / LOCK_NAME, (time.time() - seconds,) * 2)
        with pytest.raises(UserError, match=f"written {said} ago"):
            acquire_lock(tmp_path)


def test_lock_of_an_earlier_run_of_this_requeued_slurm_job_is_stale(tmp_path, monkeypatch):
    """A requeued Slurm job keeps its job id and may start on another node: the lock its
    killed first run left (SIGKILL: no release) is replaced; it used to stop the requeued
    run with "another mpiblmm job is writing" (audit, tenth session)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    earlier = {"host": "another-node", "pid": 1, "start": 0, "slurm_job": "4242",
               "slurm_restart": "0"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(earlier))
    lock = acquire_lock(tmp_path)
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (held["slurm_job"], held["slurm_restart"]) == ("4242", "1")
    lock.release()
    for live in (dict(earlier, slurm_restart="1"),          # this run (another step)
                 dict(earlier, slurm_job="777")):           # another job
        (tmp_path / LOCK_NAME).write_text(json.dumps(live))
        with pytest.raises(UserError, match="another mpiblmm job"):
            acquire_lock(tmp_path)


def _results(path, V=6):
    lay = ResultsLayout(n_voxels=V, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=(ContrastLayout("b", "T", ((0.0, 1.0),)),), method="REML",
                        grid_shape=GRID, affine=tuple(map(tuple, AFFINE.tolist())))
    vox = np.column_stack(np.unravel_index(np.arange(V) * 7, GRID)).astype(np.int32)
    return create_results(path, lay, vox, input_hash="abc")


def test_check_resumable_reads_done_and_refuses_other_inputs(tmp_path):
    w = _results(tmp_path / "results.h5")
    w.write(1, 3, {"status": np.zeros(2, dtype=np.uint8)})
    w.close()
    np.testing.assert_array_equal(check_resumable(tmp_path / "results.h5", "abc"),
                                  [0, 1, 1, 0, 0, 0])
    with pytest.raises(UserError, match="another spec or other data.*--overwrite"):
        check_resumable(tmp_path / "results.h5", "xyz")
    (tmp_path / "bad.h5").write_text("no")
    with pytest.raises(UserError, match="not a readable HDF5 file.*--overwrite"):
        check_resumable(tmp_path / "bad.h5", "abc")


PARTS = {"version": "1.0", "observations": 240, "data": "d1", "fixed": "f1", "random": "r1",
         "contrasts": "c1", "settings": {"method": "REML", "tolerance": None, "min_n": 0}}


def test_a_refused_resume_names_what_changed_from_the_stored_parts(tmp_path):
    lay = ResultsLayout(n_voxels=2, fixed_names=("a",), factors=(), contrasts=(), method="REML",
                        grid_shape=GRID, affine=tuple(map(tuple, AFFINE.tolist())))
    vox = np.zeros((2, 3), dtype=np.int32)
    create_results(tmp_path / "r.h5", lay, vox, input_hash="abc", input_parts=PARTS).close()
    now = dict(PARTS, random="r2", settings=dict(PARTS["settings"], min_n=5))
    with pytest.raises(UserError, match=r"since it was written, missingness.min_n changed "
                                        r"\(default -> 5\); the random effects changed"):
        check_resumable(tmp_path / "r.h5", "xyz", now)
    # a file without parts (an earlier version's) gets the general line
    with pytest.raises(UserError, match=r"another spec or other data \(the model, settings"):
        check_resumable(_old_file(tmp_path), "xyz", now)


def _old_file(tmp_path):
    import h5py

    path = tmp_path / "old.h5"
    _results(path).close()
    with h5py.File(path, "r+") as f:
        del f.attrs["input_parts"]
    return path


def test_what_changed_in_words():
    assert what_changed(PARTS, PARTS) == ""
    assert what_changed({}, PARTS) == ""        # unknown: the caller says it in general
    assert what_changed(PARTS, dict(PARTS, version="1.1", observations=236, fixed="f2")) == (
        "mpiblmm changed (1.0 -> 1.1); the number of observations changed (240 -> 236)")
    assert what_changed(PARTS, dict(PARTS, data="d2", contrasts="c2")) == (
        "the input files changed (an image, mask or packed file was written, replaced, added "
        "or removed), or zero_is_missing; the contrasts changed")
    # a damaged attribute (settings not an object) gives what it can, not a traceback
    assert what_changed(dict(PARTS, settings="REML"), dict(PARTS, random="r2")) == (
        "the random effects changed (factors, their levels or covariates)")
    assert what_changed(["not", "an", "object"], PARTS) == ""
    assert what_changed(PARTS, dict(PARTS, settings=dict(PARTS["settings"], method="ML",
                                                         tolerance=1e-8))) == (
        "estimation.method changed (REML -> ML); estimation.tolerance changed (default -> 1e-08)")


def test_pending_chunks_skip_done_voxels_and_done_voxels_cost_nothing():
    done = np.array([1, 1, 0, 0, 0, 1, 0, 1, 0, 0], dtype=np.uint8)
    assert pending_chunks(Slab(0, 10), done, 2) == [(2, 4), (4, 5), (6, 7), (8, 10)]
    assert pending_chunks(Slab(3, 8), done, 5) == [(3, 5), (6, 7)]
    assert pending_chunks(Slab(0, 5), None, 2) == [(0, 2), (2, 4), (4, 5)]
    assert pending_chunks(Slab(4, 4), None, 2) == []
    costs = np.where(done != 0, 0.0, 1.0)
    slabs = [partition_by_cost(costs, 3, r) for r in range(3)]
    assert [costs[s.as_slice()].sum() for s in slabs] == [2.0, 2.0, 2.0]


def test_export_stopped_by_a_signal_leaves_no_temporary_file_and_can_be_rerun(tmp_path):
    w = _results(tmp_path / "results.h5")
    w.write(0, 6, {"status": np.zeros(6, dtype=np.uint8)})
    w.finish()
    out = tmp_path / "maps"
    out.mkdir()
    left = out / f".beta.tmp{_dead_pid()}.nii.gz"   # of an export killed outright
    left.write_bytes(b"half a file")
    interrupt.install()
    try:
        interrupt._on_signal(15, None)  # as if SIGTERM arrived
        with pytest.raises(ExportStopped):
            export_nifti(tmp_path / "results.h5", out)
    finally:
        interrupt.uninstall()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert not (out / "maps.json").exists()
    written = export_nifti(tmp_path / "results.h5", out)
    index = json.loads((out / "maps.json").read_text())
    assert sorted(p.name for p in written) == sorted(index)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def _hold_open(path) -> subprocess.Popen:
    """Another process that holds ``path`` open as a user peeking at it would: h5py with
    its default file locking (a shared lock on the file)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, h5py\n"
         "f = h5py.File(sys.argv[1], 'r')\nprint('holding', flush=True)\ntime.sleep(60)",
         str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_the_last_serial_writes_ignore_a_reader_holding_the_results_open(tmp_path, capsys):
    """The export's mark and the headline's summary are written by one process after the
    ranks closed the file, and a one-rank --resume reopens it serially: a reader with h5py's
    default locking must not make them fail (MPI-IO, at several ranks, ignores it too)."""
    from mpiblmm.io.export import maps_state, store_headline
    from mpiblmm.io.results import open_results
    from mpiblmm.timers import PhaseTimer

    path = tmp_path / "results.h5"
    w = _results(path)
    w.write(0, 3, {"status": np.zeros(3, dtype=np.uint8)})
    w.close()
    holder = _hold_open(path)
    try:
        w = open_results(path, None, input_hash="abc")  # a resume at one rank
        w.write(3, 6, {"status": np.zeros(3, dtype=np.uint8)})
        w.finish({"ranks": 1})
        timer = PhaseTimer()
        with timer.phase("export"):
            export_nifti(path)
        times = store_headline(path, None, timer)
    finally:
        holder.kill()
        holder.wait()
    assert capsys.readouterr().err == ""
    with h5py.File(path, "r") as f:
        summary = json.loads(f.attrs["summary"])
        assert summary["ranks"] == 1 and summary["total_seconds"] == times["total"][2]
        assert f.attrs["complete"] and f.attrs["maps_complete"]
    assert maps_state(path) == (True, True)


def test_a_failed_headline_write_is_one_note_not_a_failure(tmp_path, capsys, monkeypatch):
    from mpiblmm.io import export
    from mpiblmm.timers import PhaseTimer

    path = tmp_path / "results.h5"
    _results(path).finish()

    def refuse(_path):
        raise BlockingIOError(11, "Unable to open file (unable to lock file)")

    monkeypatch.setattr(export, "open_serial_rw", refuse)
    export.store_headline(path, None, PhaseTimer())
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the results and maps are complete" in err[0], err


def test_maps_complete_is_set_only_once_the_export_has_written_maps_json(tmp_path):
    """A fit's results file says maps_complete = false until its export into nifti/ has
    written every map and then maps.json; an export that stops (or is killed) leaves it
    false and no maps.json, also when an earlier export had written one."""
    from mpiblmm.io.export import maps_state

    path = tmp_path / "results.h5"
    w = _results(path)
    assert not w.file.attrs["maps_complete"] and not w.file.attrs["complete"]
    w.write(0, 6, {"status": np.zeros(6, dtype=np.uint8)})
    w.finish()
    assert maps_state(path) == (True, False)
    export_nifti(path)
    assert maps_state(path) == (True, True)
    interrupt.install()
    try:
        interrupt._on_signal(15, None)  # SIGTERM during a re-export
        with pytest.raises(ExportStopped):
            export_nifti(path)
    finally:
        interrupt.uninstall()
    assert not (tmp_path / "nifti" / "maps.json").exists()
    assert maps_state(path) == (True, False)
    export_nifti(path, tmp_path / "elsewhere")  # another folder says nothing of nifti/
    assert maps_state(path) == (True, False)
    export_nifti(path)
    assert maps_state(path) == (True, True)
    (tmp_path / "nifti" / "maps.json").unlink()  # e.g. results.h5 copied without its maps
    assert maps_state(path) == (True, False)


def test_export_of_a_damaged_results_file_is_a_user_error(tmp_path):
    w = _results(tmp_path / "results.h5")
    w.finish()
    with h5py.File(tmp_path / "results.h5", "r+") as f:
        del f["beta"]
        f["beta"] = np.zeros((3, 2))  # the wrong number of voxels
    with pytest.raises(UserError, match="dataset 'beta' not as the fit wrote it"):
        export_nifti(tmp_path / "results.h5", tmp_path / "maps")
    assert not (tmp_path / "maps").exists() or not [
        p for p in (tmp_path / "maps").iterdir() if ".tmp" in p.name]


def test_describe_io_error_finds_the_system_cause():
    assert describe_io_error(OSError(28, "x")) == os.strerror(28)
    hdf5 = ValueError("Unable to create dataset (MPI_File_write_at failed: MPI error string "
                      "is 'Other I/O error , error stack:\nADIOI_GEN_WRITECONTIG(80): Other "
                      "I/O error No space left on device')")
    assert describe_io_error(hdf5) == "No space left on device"
    assert describe_io_error(RuntimeError("file write failed: errno = 5, error message = "
                                          "'x'")) == os.strerror(5)
    assert describe_io_error(KeyError("plain")) == "'plain'"


def test_a_stop_while_reading_a_packed_input_says_it_is_unchanged(tmp_path, capsys):
    """``images: {"h5": ...}``: the one line of a fit stopped during the pass over the
    packed input says the file is only read (unchanged), not that packing starts again.
    The line goes to stderr and into the log file (``--log-file``) too."""
    from mpiblmm.pipeline import FitStopped, _stop_packing
    from mpiblmm.progress import JobLog, LogOptions

    class Rank0:
        def Get_rank(self):
            return 0

    for reading, words in ((True, f"while reading the packed images {tmp_path / 'in.h5'} "
                                  "(unchanged): no voxel is fitted yet; run the same command "
                                  "with --resume to continue"),
                           # stopped in the first pass: nothing written, no file named
                           (False, "while packing the images (nothing written yet; packing "
                                   "starts again): no voxel is fitted yet"),
                           (False, f"while packing the images into {tmp_path / 'in.h5'} (not "
                                   "complete; packing starts again)")):
        if "into" in words:
            (tmp_path / "in.h5").write_bytes(b"")
        log_file = tmp_path / "fit.log"
        log_file.unlink(missing_ok=True)
        log = JobLog(0, quiet=True, options=LogOptions(log_file=str(log_file),
                                                       progress_interval=0))
        with pytest.raises(FitStopped):
            _stop_packing(Rank0(), tmp_path / "in.h5", None, tmp_path / "results.h5", log,
                          reading=reading)
        log.close()
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert log_file.read_text() == err


def test_too_little_space_to_finish_leaves_a_resumable_file(tmp_path, monkeypatch):
    """A disk full while finish wrote its attributes at 2-3 ranks left a results file no HDF5
    library could open (a fault audit: the whole fit lost, and the advice to --resume
    wrong): finish now checks the space first, closes the file unfinished and says so."""
    from mpiblmm.io import results as results_module
    from mpiblmm.io.results import FINISH_RESERVE_BYTES, open_results

    path = tmp_path / "results.h5"
    w = _results(path)
    w.write(0, 6, {"status": np.zeros(6, dtype=np.uint8)})
    monkeypatch.setattr(results_module, "free_bytes", lambda folder: FINISH_RESERVE_BYTES - 1)
    with pytest.raises(UserError) as err:
        w.finish({"ranks": 1})
    assert err.value.exit_code == 4
    assert str(err.value) == (f"{path}: only 15 KiB free on its file system, too little to "
                              "finish it (every voxel is written, not yet marked complete): "
                              "free space, then run the same command with --resume")
    np.testing.assert_array_equal(check_resumable(path, "abc"), np.ones(6))
    with h5py.File(path, "r") as f:
        assert not f.attrs["complete"] and "summary" not in f.attrs
    monkeypatch.setattr(results_module, "free_bytes", lambda folder: None)  # unknown: go on
    assert open_results(path, input_hash="abc").finish({"ranks": 1}) == {0: 6}
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"]
