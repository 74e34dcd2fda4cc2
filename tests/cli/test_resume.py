"""`mpiblmm fit` never loses work: kills, signals, resume, one writer, existing output.

One simulated study (480 voxels, 16 voxels a chunk, so ~15 chunks a rank) is fitted once
without interruption at 1 rank (the reference).  Each other run is stopped at a chunk end
picked at random (SIGTERM to every rank as Slurm does at the time limit, SIGINT to mpiexec,
SIGKILL of one rank, SIGKILL of the whole job), then continued with ``--resume`` at another
rank count: every dataset must equal the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import _run_job, mpiexec_command

from .studies import assert_same_datasets, read_results

CHUNK = "16"


def _launch(n: int, argv: list[str]) -> list[str]:
    return [*mpiexec_command(), os.environ.get("MPIEXEC_NUMPROC_FLAG", "-n"), str(n), *argv]


def _mpiblmm() -> list[str]:
    script = Path(sys.prefix, "bin", "mpiblmm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpiblmm"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study's spec and the results of an uninterrupted fit at 1 rank."""
    folder = tmp_path_factory.mktemp("resume")
    spec, reference = _simulate_and_fit(
        folder, ["12", "3", "10", "8", "6", "3"], 1, ["--chunk-voxels", CHUNK])
    return spec, reference, folder / "reference"


def _simulate_and_fit(folder, study: list[str], ranks: int, fit_args: list[str]):
    """Simulate a study (subjects, visits, shape x y z, seed; half its voxels missing some
    observations) into ``folder/study`` and fit it without interruption into
    ``folder/reference``: the spec and the reference results."""
    subjects, visits, x, y, z, seed = study
    run = _run_job(_launch(1, [*_mpiblmm(), "simulate", str(folder / "study"), "--subjects",
                               subjects, "--visits", visits, "--shape", x, y, z,
                               "--missing-fraction", "0.5", "--seed", seed]), 120, None, None)
    assert run.returncode == 0, run.stderr
    spec = folder / "study" / "spec.json"
    ref = folder / "reference"
    run = _run_job(_launch(ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(ref), "-q",
                                   *fit_args]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    return spec, read_results(ref / "results.h5")


def _same(reference: dict, results: dict) -> None:
    assert_same_datasets(reference, results)
    # every attribute but the run's own facts (timings, ranks, memory: `summary`); `space`
    # (the maps' header codes) once went missing after a SIGKILL, and the resumed maps with it
    assert set(reference["@"]) == set(results["@"]), set(reference["@"]) ^ set(results["@"])
    for attr in set(reference["@"]) - {"summary"}:
        assert np.array_equal(reference["@"][attr], results["@"][attr]), attr


def _errors(stderr: str) -> list[str]:
    """stderr lines of mpiblmm (not MPICH's own: its report of an MPI_Abort, and hydra's
    notes when it forwards a Ctrl-C)."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith(("Abort(", "[mpiexec@"))]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


def _rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the ranks: children of hydra's proxies, themselves children of mpiexec (the
    ranks run in process groups of their own, so killing mpiexec's group misses them)."""
    return [r for proxy in _children(launcher_pid) for r in _children(proxy)]


def _act_at(cmd: list[str], when, act, timeout: float = 60) -> tuple[int, str, str, float]:
    """Run a job, and at the first stdout line for which ``when(line)`` holds call
    ``act(proc)`` once; return the exit code, the rest of stdout, stderr and the seconds
    from the act to the end of the job.  The job's process group is killed if anything
    fails (the test never leaves a job behind)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    acted_at = None
    try:
        for line in proc.stdout:
            if when(line):
                acted_at = time.monotonic()
                act(proc)
                break
        assert acted_at is not None, "the job ended before the moment to act on it"
        rest, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, rest, err, time.monotonic() - acted_at


def _signal_ranks(sig):
    """An ``act`` for :func:`_act_at`: ``sig`` to every rank, as srun and Slurm's time limit
    send it."""
    def act(proc):
        for pid in _rank_pids(proc.pid):
            os.kill(pid, sig)
    return act


def _start_and_stop(spec: Path, out: Path, ranks: int, how: str, after: int,
                    extra: tuple[str, ...] = ()) -> tuple[int, str, float, str]:
    """Start a fit, and at its ``after``-th chunk line stop it ``how``; return the exit
    code, stderr and the seconds from the stop to the end of the job."""
    cmd = _launch(ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--chunk-voxels",
                          CHUNK, "--progress-interval", "0.001", *extra])
    seen = [0]

    def when(line):
        done = re.search(r"fit ([\d,]+)/[\d,]+ voxels \(", line)  # progress.py's lines
        if done and int(done.group(1).replace(",", "")) > 0:
            seen[0] += 1
        return seen[0] == after

    def stop(proc):
        if how == "SIGKILL one rank":
            os.kill(_rank_pids(proc.pid)[-1], signal.SIGKILL)
        elif how == "SIGKILL all":  # every process of the job, as a batch system does
            for pid in [proc.pid, *_descendants(proc.pid)]:
                os.kill(pid, signal.SIGKILL)
        elif how == "SIGTERM":
            _signal_ranks(signal.SIGTERM)(proc)
        else:  # to mpiexec, which forwards it to the ranks (Ctrl-C)
            os.kill(proc.pid, getattr(signal, how))

    code, rest, err, seconds = _act_at(cmd, when, stop)
    return code, err, seconds, rest


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("how, ranks, resume_ranks", [
    ("SIGTERM", 2, 3), ("SIGINT", 2, 1), ("SIGKILL one rank", 2, 3), ("SIGKILL all", 3, 2)])
def test_stopped_fit_resumes_to_the_same_bits(study, tmp_path, how, ranks, resume_ranks):
    spec, reference, _ = study
    after = random.SystemRandom().randint(1, 5)
    print(f"{how} after chunk line {after}")
    out = tmp_path / "out"
    code, err, seconds, out_rest = _start_and_stop(spec, out, ranks, how, after)
    assert seconds < 30, f"the job took {seconds:.1f} s to end after {how}"
    if how.startswith("SIGKILL"):
        assert code != 0
    else:
        # SIGTERM reaches every rank: 3.  MPICH's mpiexec ignores the exit codes of
        # processes it signalled itself and may report 0 (docs/RESULTS.md); never 2.
        assert code == 3 if how == "SIGTERM" else code in (0, 3), err
        lines = _errors(err)
        assert len(lines) == 1 and "--resume" in lines[0] and how in lines[0], err
        assert not (out / "mpiblmm.lock").exists()  # released at the signal
        # the last progress line and the stop line count the same voxels
        stopped = re.search(r"fit stopped at ([\d,]+)/", out_rest)
        kept = re.search(r"stopped by \w+: (\d+) of", lines[0])
        assert stopped and kept and stopped.group(1).replace(",", "") == kept.group(1), out_rest
    part = read_results(out / "results.h5")
    done = int(part["progress/done"].sum())
    assert not part["@"]["complete"] and 0 < done < reference["voxels"].shape[0]
    assert part["@"]["input_hash"] == reference["@"]["input_hash"]

    run = _run_job(_launch(resume_ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(out),
                                          "--resume", "--chunk-voxels", "40"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming: {done} of 480 voxels already done" in run.stdout
    # the first progress line counts them (it said "fit 0/480"), and so does the summary
    assert f"fit {done:,}/480 voxels on {resume_ranks} rank(s) (resumed)" in run.stdout
    assert "voxels in " in run.stdout and f"({done} of the 480 by an earlier run, resumed; " \
        "the times are this run's)" in run.stdout, run.stdout
    assert not (out / "mpiblmm.lock").exists()
    resumed = read_results(out / "results.h5")
    _same(reference, resumed)
    # the finish phase has its own time (it was gathered inside itself: always 0)
    seconds = json.loads(resumed["@"]["summary"])["seconds"]
    assert seconds["finish"][2] > 0, seconds
    assert sum(v[2] for k, v in seconds.items() if k != "total") >= 0.5 * seconds["total"][2]


@pytest.mark.spawns_mpiexec
def test_grace_period_abandons_the_chunk_in_hand(tmp_path):
    """One chunk of seconds of work (its own study: 11,520 voxels of 150 subjects in one
    chunk) and a grace of 0.2 s: SIGTERM ends the job in about the grace period, the chunk
    abandoned (nothing written), and the job can be resumed to the bits of an uninterrupted
    fit."""
    spec, reference = _simulate_and_fit(tmp_path, ["150", "4", "24", "20", "24", "4"], 2, [])
    chunk = json.loads(reference["@"]["summary"])["seconds"]["fit"][2]
    out = tmp_path / "out"
    cmd = _launch(1, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--grace-seconds", "0.2"])

    def later_sigterm(proc):  # the chunk loop starts at "voxels x": well inside the chunk
        time.sleep(0.3)
        _signal_ranks(signal.SIGTERM)(proc)

    code, _, err, seconds = _act_at(cmd, lambda line: "voxels x" in line, later_sigterm)
    seconds -= 0.3
    assert code == 3 and "--resume" in err, err
    part = read_results(out / "results.h5")
    assert part["progress/done"].sum() == 0 and not part["@"]["complete"]
    # without the grace: the whole chunk (its fit phase at 2 ranks took `chunk` s a rank)
    assert seconds < 2.5, (seconds, chunk)
    run = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--resume"]),
                   300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    _same(reference, read_results(out / "results.h5"))


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("left", ["not HDF5", "empty skeleton"])
def test_a_results_file_left_while_being_created_is_replaced(study, tmp_path, left):
    """A job killed (or out of space) while creating results.h5 leaves a file with no fitted
    voxel, often not even readable HDF5 (its superblock not yet flushed), and the marker
    `results.h5.creating` beside it: --resume, and a plain fit, start a new fit there instead
    of refusing the file (which once asked for --overwrite after a full disk was freed)."""
    spec, reference, ref_out = study
    out = tmp_path / "out"
    out.mkdir()
    if left == "not HDF5":
        (out / "results.h5").write_bytes(b"\0" * 4096)
    else:
        import h5py

        (out / "results.h5").write_bytes((ref_out / "results.h5").read_bytes())
        with h5py.File(out / "results.h5", "r+") as f:
            f["progress/done"][...] = 0
            f.attrs["complete"] = False
    (out / "results.h5.creating").write_bytes(b"")
    args = ["fit", str(spec), "-o", str(out), "--chunk-voxels", "40"]
    run = _run_job(_launch(2, [*_mpiblmm(), *args, "--resume"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "left unfinished by a job stopped while creating it" in run.stdout, run.stdout
    assert not (out / "results.h5.creating").exists()
    _same(reference, read_results(out / "results.h5"))

    # the marker is gone once the file is created: a file with done voxels is never replaced
    # by it, even if a marker could not be removed
    (out / "results.h5.creating").write_bytes(b"")
    run = _run_job(_launch(1, [*_mpiblmm(), *args]), 300, None, None)
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and "already exists" in lines[0], run.stderr
    assert not (out / "results.h5.creating").exists()
    _same(reference, read_results(out / "results.h5"))


@pytest.mark.spawns_mpiexec
def test_existing_output_is_refused_without_a_flag(study, tmp_path):
    spec, reference, ref_out = study
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.h5").write_bytes((ref_out / "results.h5").read_bytes())

    def fit(*args: str, spec_path: Path = spec, ranks: int = 2):
        return _run_job(_launch(ranks, [*_mpiblmm(), "fit", str(spec_path), *args]), 300,
                        None, None)

    run = fit("-o", str(out))
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "already exists" in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert "Traceback" not in run.stderr and not (out / "mpiblmm.lock").exists()
    # a complete fit without its maps (copied here without nifti/, or an export killed):
    # the advice is to export them, not to fit again
    assert "fit is complete, but its maps" in lines[0], lines[0]
    assert lines[0].index(f"mpiblmm export {out / 'results.h5'}") < lines[0].index("--overwrite")

    changed = json.loads(spec.read_text())
    changed["estimation"] = {"method": "ML", "tolerance": 1e-6}
    changed["contrasts"] = changed["contrasts"][:1]
    (spec.parent / "ml.json").write_text(json.dumps(changed))
    run = fit("-o", str(out), "--resume", spec_path=spec.parent / "ml.json")
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    # what changed is named, with the spec's keys and their old and new values
    assert lines[0].endswith(
        "since it was written, estimation.method changed (REML -> ML); estimation.tolerance "
        "changed (default -> 1e-06); the contrasts changed; use --overwrite to start again"), \
        lines[0]

    (out / "junk.h5").write_text("not HDF5")
    (out / "results.h5").rename(out / "kept.h5")
    (out / "junk.h5").rename(out / "results.h5")
    run = fit("-o", str(out), "--resume")
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0], run.stderr
    (out / "kept.h5").rename(out / "results.h5")

    # the defaults written out are the same fit: resumed (complete already: nothing to fit)
    explicit = json.loads(spec.read_text())
    explicit["estimation"] = {"method": "REML", "tolerance": 1e-12, "max_iterations": 300}
    explicit["missingness"] = {"min_n": 4, "min_fraction": 0}
    (spec.parent / "explicit.json").write_text(json.dumps(explicit))
    # p + 1 = 4 is not the default (a contract audit: resumed with it, the voxels with 3
    # or fewer observations the default fits on fewer columns were kept): refused
    run = fit("-o", str(out), "--resume", ranks=1, spec_path=spec.parent / "explicit.json")
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and "missingness.min_n changed" in lines[0], \
        run.stderr
    explicit["missingness"] = {"min_n": 1, "min_fraction": 0}    # the default rule
    (spec.parent / "explicit.json").write_text(json.dumps(explicit))
    run = fit("-o", str(out), "--resume", ranks=1, spec_path=spec.parent / "explicit.json")
    assert run.returncode == 0 and "480 of 480 voxels already done" in run.stdout, run.stderr
    _same(reference, read_results(out / "results.h5"))
    export = _run_job(_launch(1, [*_mpiblmm(), "export", str(out / "results.h5"), "--fdr"]),
                      300, None, None)
    q_maps = sorted((out / "nifti").glob("con_*_q.nii.gz"))
    assert export.returncode == 0 and q_maps, export.stderr
    run = fit("-o", str(out), "--overwrite", "-q", "--chunk-voxels", "100")
    assert run.returncode == 0, run.stderr
    _same(reference, read_results(out / "results.h5"))
    # the replaced fit's maps went with it: no q map of the old model beside the new one
    assert not any(q.exists() for q in q_maps)
    assert {p.name for p in (out / "nifti").iterdir()} == \
        set(json.loads((out / "nifti" / "maps.json").read_text())) | {"maps.json"}
    run = fit("-o", str(out), ranks=1)       # maps complete too: the plain refusal
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "already exists: use --resume" in lines[0] and "mpiblmm export" not in lines[0]

    latin1 = spec.parent / "latin1.json"
    latin1.write_bytes(b'{"images": "\xe9t\xe9.txt"}')
    for spec_path, bad in ((spec, ["-o", ""]), (spec, ["-o", str(out), "--resume", "--overwrite"]),
                           (latin1, ["-o", str(out), "--resume"])):
        run = fit(*bad, spec_path=spec_path)
        lines = _errors(run.stderr)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert len(lines) == 1 or lines[0].startswith("usage:"), run.stderr


@pytest.mark.spawns_mpiexec
def test_second_writer_is_refused_and_stale_locks_replaced(study, tmp_path):
    spec, _, _ = study
    out = tmp_path / "out"
    # a progress line per chunk, unread after the first: the pipe fills and holds the fit
    first = subprocess.Popen(_launch(1, [*_mpiblmm(), "fit", str(spec), "-o", str(out),
                                         "--chunk-voxels", "4", "--progress-interval", "0.001"]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        for line in first.stdout:
            if " voxels (" in line:  # a progress line of the whole job (progress.py)
                break
        holder = json.loads((out / "mpiblmm.lock").read_text())
        second = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec), "-o", str(out),
                                      "--overwrite"]), 120, None, None)
        assert first.poll() is None, "the first fit must still be running"
        lines = _errors(second.stderr)
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert "another mpiblmm job" in lines[0] and f"PID {holder['pid']}" in lines[0]
        for pid in _rank_pids(first.pid):
            os.kill(pid, signal.SIGTERM)
        first.communicate(timeout=60)
        assert first.returncode == 3
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    assert not (out / "mpiblmm.lock").exists()

    # A lock left by a process of this host that is gone is replaced.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "mpiblmm.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                                  "start": 0}) + "\n")
    run = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--resume",
                               "-q"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (out / "mpiblmm.lock").exists()


@pytest.mark.spawns_mpiexec
def test_a_half_packed_input_is_packed_again_on_resume(study, tmp_path):
    """A job killed while packing leaves packed.h5 with complete = false (and no results):
    --resume starts a new fit, packs again rather than reading the half-written file, and
    gives the reference bits; a complete packed.h5 of the same images is reused as it is."""
    import h5py

    spec, reference, ref_out = study
    out = tmp_path / "out"
    out.mkdir()
    (out / "packed.h5").write_bytes((ref_out / "packed.h5").read_bytes())
    with h5py.File(out / "packed.h5", "r+") as f:
        f.attrs["complete"] = False
        f["Y"][:, : f["Y"].shape[1] // 2] = 0.0      # the rows never written
    run = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--resume",
                               "--chunk-voxels", "60"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "nothing to resume" in run.stdout
    _same(reference, read_results(out / "results.h5"))
    with h5py.File(out / "packed.h5", "r") as f:
        assert f.attrs["complete"]
    before = (out / "packed.h5").stat().st_mtime_ns
    run = _run_job(_launch(3, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--overwrite",
                               "-q"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "packed.h5").stat().st_mtime_ns == before  # reused, not rewritten
    _same(reference, read_results(out / "results.h5"))


@pytest.fixture(scope="module")
def packing_study(tmp_path_factory):
    """A study whose packing takes about a second (160 images of 64 x 64 x 48 voxels) and
    whose fit is quick (an analysis mask of 384 voxels), with an uninterrupted fit at 1 rank."""
    import nibabel as nib
    import numpy as np

    folder = tmp_path_factory.mktemp("packing")
    run = _run_job(_launch(1, [*_mpiblmm(), "simulate", str(folder / "study"), "--subjects",
                               "40", "--visits", "4", "--shape", "64", "64", "48",
                               "--missing-fraction", "0.5", "--seed", "2"]), 300, None, None)
    assert run.returncode == 0, run.stderr
    first = nib.load(str(folder / "study" / "images" / "obs_00000.nii.gz"))
    mask = np.zeros(first.shape, dtype=np.uint8)
    mask[20:28, 20:28, 20:26] = 1
    nib.save(nib.Nifti1Image(mask, first.affine), str(folder / "study" / "mask.nii.gz"))
    spec = folder / "study" / "spec.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "analysis_mask": "mask.nii.gz"}))
    ref = folder / "reference"
    run = _run_job(_launch(1, [*_mpiblmm(), "fit", str(spec), "-o", str(ref), "-q"]), 300,
                   None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    return spec, read_results(ref / "results.h5")


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("how, ranks, resume_ranks", [
    ("SIGTERM", 3, 1), ("SIGTERM", 1, 2), ("SIGINT", 2, 3)])
def test_stopped_while_packing_resumes_to_the_same_bits(packing_study, tmp_path, how, ranks,
                                                        resume_ranks):
    """A signal while the images are packed (the job's first phase) is honoured at once, as
    in the fit: every rank stops at a block boundary of the packing, one line names
    --resume, exit code 3, the lock is released, nothing looks complete (no results file;
    packed.h5 absent or marked not complete), and --resume at another rank count packs again
    and gives the bits of an uninterrupted fit.  Before, the signal waited for the end of
    the packing."""
    import h5py

    spec, reference = packing_study
    out = tmp_path / "out"
    cmd = _launch(ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(out)])
    stop = _signal_ranks(signal.SIGTERM) if how == "SIGTERM" else \
        (lambda proc: os.kill(proc.pid, signal.SIGINT))
    # progress.py's phase line: packing starts now
    code, rest, err, seconds = _act_at(cmd, lambda line: "phase ingest" in line, stop)
    assert code == 3 if how == "SIGTERM" else code in (0, 3), err
    lines = _errors(err)
    assert len(lines) == 1 and how in lines[0] and "while packing the images" in lines[0], err
    assert "--resume" in lines[0] and "no voxel is fitted yet" in lines[0], err
    assert "voxels x" not in rest, rest  # the fit never started
    assert seconds < 30, f"the job took {seconds:.1f} s to end after {how}"
    assert not (out / "results.h5").exists() and not (out / "mpiblmm.lock").exists()
    if (out / "packed.h5").exists():
        with h5py.File(out / "packed.h5", "r") as f:
            assert not f.attrs["complete"]

    run = _run_job(_launch(resume_ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(out),
                                          "--resume"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "nothing to resume" in run.stdout
    _same(reference, read_results(out / "results.h5"))


@pytest.mark.spawns_mpiexec
def test_a_resume_after_chmod_is_not_refused_but_after_a_content_change_is(study, tmp_path):
    """The inputs' fingerprint (part of input_hash) follows content, not metadata: after an
    interrupted fit, chmod of an image, touch -a of another and chmod of the design give a
    resume to the same bits (it was refused: the fingerprint held the change time); a byte
    of an image changed in place, its size kept, is still refused."""
    import shutil

    spec0, reference, _ = study
    shutil.copytree(spec0.parent, tmp_path / "study")    # the module's study stays untouched
    spec = tmp_path / "study" / "spec.json"
    images = [tmp_path / "study" / line for line in
              (tmp_path / "study" / "images.txt").read_text().split()]
    out = tmp_path / "out"
    code, err, _, _ = _start_and_stop(spec, out, 2, "SIGTERM", 2)
    assert code == 3, err
    done = int(read_results(out / "results.h5")["progress/done"].sum())
    os.chmod(images[3], 0o600)
    st = images[5].stat()
    os.utime(images[5], ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))   # touch -a
    os.chmod(tmp_path / "study" / "X.csv", 0o640)
    run = _run_job(_launch(1, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--resume",
                               "--chunk-voxels", "40"]), 300, None, None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming: {done} of 480 voxels already done" in run.stdout
    results = read_results(out / "results.h5")
    assert_same_datasets(reference, results)    # (input_hash differs: the copy's paths)
    for attr in ("complete", "method", "status_counts"):
        assert reference["@"][attr] == results["@"][attr], attr

    out2 = tmp_path / "out2"
    code, err, _, _ = _start_and_stop(spec, out2, 2, "SIGTERM", 2)
    assert code == 3, err
    raw = bytearray(images[7].read_bytes())
    raw[-1] ^= 0x01     # gzip's CRC now fails: the point is only that the bytes differ
    st = images[7].stat()
    images[7].write_bytes(bytes(raw))
    os.utime(images[7], ns=(st.st_atime_ns, st.st_mtime_ns + 10**6))  # (a clock tick)
    run = _run_job(_launch(2, [*_mpiblmm(), "fit", str(spec), "-o", str(out2), "--resume"]),
                   300, None, None)
    lines = _errors(run.stderr)
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "since it was written, the input files changed" in lines[0], lines[0]
    assert "--overwrite" in lines[0], lines[0]


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("ranks", [1, 3])
def test_output_folder_removed_while_fitting_is_one_line_exit_4(study, tmp_path, ranks):
    """The output folder removed (or moved) under a running fit: the ranks write on into the
    unlinked file, and the export used to end the job with `file not found` and exit code 2,
    a user error; now one line says what happened, exit code 4."""
    import shutil

    spec, _, _ = study
    out = tmp_path / "out"
    cmd = _launch(ranks, [*_mpiblmm(), "fit", str(spec), "-o", str(out), "--chunk-voxels",
                          "4", "--progress-interval", "0.001"])
    code, _, err, _ = _act_at(
        cmd, lambda line: re.search(r"fit ([1-9][\d,]*)/[\d,]+ voxels \(", line),
        lambda proc: shutil.rmtree(out), timeout=120)
    lines = _errors(err)
    assert code == 4 and len(lines) == 1, err
    assert "no longer there when the fit ended" in lines[0] and "Traceback" not in err, err
