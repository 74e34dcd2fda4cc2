"""The batch jobs in scripts/slurm and scripts/pbs: valid bash with the lines a cluster job
needs, and their time-limit logic run with stand-ins for srun / scontrol / mpiexec / qsub
(which record how they were called); fit.sbatch also runs a real 2-rank fit through a
stand-in srun that calls mpiexec."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mpiblmm.cli import get_parser
from tests.conftest import REPO_ROOT, mpiexec_command

SCRIPTS = {name: REPO_ROOT / "scripts" / name for name in
           ("slurm/fit.sbatch", "slurm/scaling.sbatch", "pbs/fit.pbs")}
BASH = "/bin/bash"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_job_is_valid_bash(name):
    run = subprocess.run([BASH, "-n", str(SCRIPTS[name])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("name, needed", [
    ("slurm/fit.sbatch", [r"^#SBATCH --requeue$", r"^#SBATCH --signal=TERM@\d+$",
                          r"^#SBATCH --ntasks-per-node=\d+$", r"^#SBATCH --cpus-per-task=1$",
                          r"^#SBATCH --open-mode=append$", r"^# module load ",
                          r"export OMP_NUM_THREADS=1", r"^srun ", r"--max-memory-mb",
                          r"--progress-interval 30 --resume", r"scontrol requeue",
                          r"status == 3"]),
    ("slurm/scaling.sbatch", [r"^#SBATCH --exclusive$", r"^# module load ",
                              r"export OMP_NUM_THREADS=1", r'export MPIEXEC="srun ',
                              r"scripts/scaling.py", r"--max-memory-mb"]),
    ("pbs/fit.pbs", [r"^#PBS -r y$", r"^#PBS -l walltime=", r"^#PBS -l select=.*mpiprocs=",
                     r"^# module load ", r"export OMP_NUM_THREADS=1",
                     r"timeout --signal=TERM", r"mpiexec -n", r"--max-memory-mb",
                     r"--progress-interval 30 --resume", r"^\s+qsub "]),
])
def test_each_job_has_the_lines_a_cluster_run_needs(name, needed):
    text = SCRIPTS[name].read_text()
    for pattern in needed:
        assert re.search(pattern, text, re.MULTILINE), f"{name}: no line matching {pattern!r}"
    assert "choosing" in text.lower() or "ranks:" in text.lower()  # the advice is there


def test_the_jobs_use_only_flags_mpiblmm_fit_has():
    commands = next(a for a in get_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    known = {opt for action in commands.choices["fit"]._actions
             for opt in action.option_strings}
    known |= {"--resume"}  # mpiblmm fit --resume: issue 11 (checkpoint and resume)
    for name in ("slurm/fit.sbatch", "pbs/fit.pbs"):
        command = SCRIPTS[name].read_text().rsplit("mpiblmm fit", 1)[1].split("\n\n")[0]
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", command)) - {"--kill-after"}
        assert used and used <= known, f"{name}: {sorted(used - known)}"


def _srun_lines(name: str) -> list[str]:
    """The srun command lines of a job script (continuation lines joined)."""
    text = SCRIPTS[name].read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines()
            if re.match(r"\s*srun\s", ln) or re.search(r'MPIEXEC="srun\s', ln)]


@pytest.mark.parametrize("name", ["slurm/fit.sbatch", "slurm/scaling.sbatch"])
def test_every_srun_ends_the_step_when_a_rank_dies(name):
    """srun without --kill-on-bad-exit=1 leaves the other ranks of a rank that died (the
    OOM killer, a node failure) waiting in their next collective until the time limit."""
    lines = _srun_lines(name)
    assert lines, f"{name}: no srun line"
    for line in lines:
        assert "--kill-on-bad-exit=1" in line, f"{name}: {line}"


def test_the_pbs_job_says_how_its_launcher_ends_a_job_whose_rank_died():
    text = SCRIPTS["pbs/fit.pbs"].read_text()
    assert "--kill-on-bad-exit" in text and "orte_abort_on_non_zero_status 0" in text


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _env(tmp_path: Path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               CALLS=str(tmp_path / "calls.txt"))
    env.update(extra)
    return env


@pytest.mark.parametrize("restarts, code, requeued", [("0", 0, True), ("5", 3, False)])
def test_fit_sbatch_requeues_when_the_ranks_stopped_on_the_time_limit_signal(
        tmp_path, restarts, code, requeued):
    """--signal=TERM@120 (no "B:") sends SIGTERM to the step's tasks, the ranks: mpiblmm
    stops after the chunk in hand and exits 3 (srun passes the code on).  The script used to
    take the signal itself (B:) and pass it to srun, which ends its tasks with SIGKILL: the
    chunk in hand was lost and the lock left behind (audit, tenth session)."""
    env = _env(tmp_path, SPEC=str(tmp_path / "spec.json"), OUTPUT=str(tmp_path / "out"),
               SLURM_JOB_ID="4242", SLURM_MEM_PER_CPU="1000", SLURM_RESTART_COUNT=restarts)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.h5").write_text("")  # an earlier run's: continue it
    bin_dir = tmp_path / "bin"
    # srun: record the command; its tasks got Slurm's SIGTERM and stopped with code 3
    _stub(bin_dir, "srun", 'echo "srun $*" >> "$CALLS"\nexit 3\n')
    _stub(bin_dir, "scontrol", 'echo "scontrol $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["slurm/fit.sbatch"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == code, run.stderr
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    srun = shlex.split(lines[0])
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=cores"] and "--resume" in srun
    assert srun[srun.index("--max-memory-mb") + 1] == "800"  # 80% of 1000 MiB per CPU
    assert lines[1:] == (["scontrol requeue 4242"] if requeued else [])
    assert ("requeueing" in run.stdout) == requeued
    assert requeued or "resubmit by hand" in run.stderr


def test_fit_sbatch_passes_a_failed_fit_on(tmp_path):
    env = _env(tmp_path, SPEC=str(tmp_path / "spec.json"), OUTPUT=str(tmp_path / "out"),
               SLURM_JOB_ID="4242", SLURM_MEM_PER_CPU="1000")
    _stub(tmp_path / "bin", "srun", 'echo "srun $*" >> "$CALLS"\nexit 2\n')
    run = subprocess.run([BASH, str(SCRIPTS["slurm/fit.sbatch"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    # always --resume: with no results file yet mpiblmm starts a new fit
    assert "--resume" in (tmp_path / "calls.txt").read_text()


@pytest.mark.parametrize("slurm, memory_mb, warned", [
    ({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_PER_TASK": "2"}, "1600", False),
    ({"SLURM_MEM_PER_NODE": "256000", "SLURM_NTASKS_PER_NODE": "128"}, "1600", False),
    ({}, "1638", True),                        # nothing known: 2048 MiB, said on stderr
    ({"MEMORY_MB": "900"}, "900", False)])
def test_fit_sbatch_takes_the_memory_per_rank_from_either_slurm_option(
        tmp_path, slurm, memory_mb, warned):
    """--mem (SLURM_MEM_PER_NODE) used to be ignored: 2048 MiB per rank was assumed silently
    (HPC audit, twenty-third session).  Without OUTPUT the spec's own output is used."""
    env = _env(tmp_path, SPEC=str(tmp_path / "spec.json"), SLURM_JOB_ID="4242", **slurm)
    for key in ("SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_NTASKS_PER_NODE",
                "SLURM_CPUS_PER_TASK", "MEMORY_MB", "OUTPUT"):
        if key not in slurm:
            env.pop(key, None)
    _stub(tmp_path / "bin", "srun", 'echo "srun $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["slurm/fit.sbatch"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    srun = shlex.split((tmp_path / "calls.txt").read_text())
    assert srun[srun.index("--max-memory-mb") + 1] == memory_mb
    assert "--output" not in srun and "output as in the spec" in run.stdout
    assert ("assuming 2048 MiB per rank" in run.stderr) == warned


def _pbs_env(tmp_path, **extra):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("node1\nnode1\n")
    return _env(tmp_path, SPEC=str(tmp_path / "spec.json"), OUTPUT=str(tmp_path / "out"),
                PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(tmp_path), **extra)


@pytest.mark.parametrize("killed", [False, True])
def test_pbs_job_stops_before_the_walltime_and_resubmits_itself(tmp_path, killed):
    """killed: the ranks outlived the SIGTERM and --kill-after's SIGKILL ended them (timeout
    returns 137); the chunks written are kept, so that job is resubmitted too (it used to
    end the chain)."""
    job_script = tmp_path / "jobs" / "fit.pbs"   # not under PBS_O_WORKDIR/scripts/pbs
    job_script.parent.mkdir()
    job_script.write_text("#!/bin/bash\n")
    env = _pbs_env(tmp_path, WALLTIME_SECONDS="121", JOB_SCRIPT=str(job_script))  # TERM at 1 s
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "mpiexec", 'echo "mpiexec $*" >> "$CALLS"\n'
          + ('exit 137\n' if killed else
             'trap \'echo "mpiexec got TERM" >> "$CALLS"; exit 143\' TERM\n'
             'while true; do sleep 0.05; done\n'))
    _stub(bin_dir, "qsub", 'echo "qsub $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["pbs/fit.pbs"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    assert lines[0].startswith("mpiexec -n 2 mpiblmm fit ") and "--resume" in lines[0]
    if not killed:
        assert lines.pop(1) == "mpiexec got TERM"
    assert lines[1].startswith("qsub -v SPEC=") and "RESUBMIT=1," in lines[1]
    assert f"JOB_SCRIPT={job_script}," in lines[1]
    assert lines[1].endswith(f" {job_script}")


@pytest.mark.parametrize("holder, removed", [("101.pbs", True), ("102.pbs", True),
                                             ("99.pbs", False), (None, False)])
def test_pbs_job_removes_the_lock_of_the_job_it_continues(tmp_path, holder, removed):
    """A job killed at its walltime (timeout's SIGKILL) leaves its lock; the resubmitted job
    has a new id and often another node, so mpiblmm refused it and the chain ended (audit,
    twenty-third session).  The lock records PBS_JOBID; the job removes one naming the job
    it continues (PREVIOUS_JOB, 101) or itself (a rerun under #PBS -r y, 102), no other."""
    from mpiblmm.io.lock import acquire_lock

    job_script = tmp_path / "fit.pbs"
    job_script.write_text("#!/bin/bash\n")
    out = tmp_path / "out"
    out.mkdir()
    if holder is not None:   # the lock as that job's rank 0 wrote it (on another host)
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("SLURM_JOB_ID", raising=False)
            mp.setenv("PBS_JOBID", holder)
            acquire_lock(out)
        lock = out / "mpiblmm.lock"
        assert f'"pbs_job": "{holder}"' in lock.read_text()
        lock.write_text(lock.read_text().replace('"host": "', '"host": "cn042-'))
    else:
        (out / "mpiblmm.lock").write_text('{"host": "cn042", "pid": 1, "start": 0}\n')
    env = _pbs_env(tmp_path, JOB_SCRIPT=str(job_script), PBS_JOBID="102.pbs",
                   PREVIOUS_JOB="101.pbs", RESUBMIT="1")
    _stub(tmp_path / "bin", "mpiexec",
          'echo "mpiexec lock=$([[ -f "$OUTPUT/mpiblmm.lock" ]] && echo kept || echo gone)"'
          ' >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["pbs/fit.pbs"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls.txt").read_text()
    assert calls.strip() == f"mpiexec lock={'gone' if removed else 'kept'}"
    assert ("removing the lock left by job" in run.stdout) == removed


def test_pbs_resubmission_names_the_job_it_continues(tmp_path):
    job_script = tmp_path / "fit.pbs"
    job_script.write_text("#!/bin/bash\n")
    env = _pbs_env(tmp_path, WALLTIME_SECONDS="121", JOB_SCRIPT=str(job_script),
                   PBS_JOBID="77.server")
    _stub(tmp_path / "bin", "mpiexec", 'exit 137\n')
    _stub(tmp_path / "bin", "qsub", 'echo "qsub $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["pbs/fit.pbs"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert ",PREVIOUS_JOB=77.server " in (tmp_path / "calls.txt").read_text()


@pytest.mark.parametrize("job_script", ["", "relative/fit.pbs", "/nonexistent/fit.pbs"])
def test_pbs_job_without_its_own_path_stops_before_the_fit(tmp_path, job_script):
    """JOB_SCRIPT used to default to $PBS_O_WORKDIR/scripts/pbs/fit.pbs, which exists only
    if qsub was run from the repository root: the resubmission failed after the first
    walltime (audit 10, section 4)."""
    (tmp_path / "relative").mkdir()
    (tmp_path / "relative" / "fit.pbs").write_text("")
    env = _pbs_env(tmp_path, WALLTIME_SECONDS="121")
    if job_script:
        env["JOB_SCRIPT"] = job_script
    else:
        env.pop("JOB_SCRIPT", None)
    _stub(tmp_path / "bin", "mpiexec", 'echo "mpiexec $*" >> "$CALLS"\n')
    _stub(tmp_path / "bin", "qsub", 'echo "qsub $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["pbs/fit.pbs"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert "JOB_SCRIPT" in run.stderr and "absolute path" in run.stderr
    assert not (tmp_path / "calls.txt").exists()   # no fit, no qsub


@pytest.mark.spawns_mpiexec
def test_fit_sbatch_runs_a_real_fit_through_srun(tmp_path, mpiblmm_command):
    launcher = mpiexec_command()
    study = tmp_path / "study"
    sim = subprocess.run([*launcher, "-n", "1", *mpiblmm_command, "simulate", str(study),
                          "--subjects", "8", "--visits", "3", "--shape", "4", "4", "3"],
                         capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun inside a 2-task allocation, played by mpiexec; `mpiblmm` is this environment's.
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'   # srun's own flags
          f'exec {shlex.join(launcher)} -n 2 "$@"\n')
    _stub(bin_dir, "mpiblmm", f'exec {shlex.join(mpiblmm_command)} "$@"\n')
    env = _env(tmp_path, SPEC=str(study / "spec.json"), OUTPUT=str(tmp_path / "out"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    run = subprocess.run([BASH, str(SCRIPTS["slurm/fit.sbatch"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fit 48/48 voxels (100.0%)" in run.stdout and "2/2 ranks finished" in run.stdout
    assert (tmp_path / "out" / "results.h5").exists()


def test_scaling_sbatch_passes_the_time_limit_signal_on_and_waits_for_the_summary(tmp_path):
    """B:TERM reaches only the batch shell. It used to exit at once (`wait` returns 143, and
    `set -e`), so scaling.py, killed with the job, wrote nothing (audit 10, section 2). Now
    scaling.py gets the TERM, and the shell waits while it writes what it has."""
    import signal
    import time

    env = _env(tmp_path, SLURM_NTASKS="2", SLURM_JOB_ID="5151", SLURM_MEM_PER_CPU="2048",
               MPIBLMM_ROOT=str(REPO_ROOT), OUT=str(tmp_path / "out"))
    # python: scaling.py that records its arguments, and on TERM takes a while to write
    _stub(tmp_path / "bin", "python",
          'echo "python $*" >> "$CALLS"\n'
          'trap \'sleep 0.5; echo "wrote the summary" >> "$CALLS"; exit 143\' TERM\n'
          'for i in $(seq 200); do sleep 0.05; done\n'
          'echo "not signalled" >> "$CALLS"\n')
    proc = subprocess.Popen([BASH, str(SCRIPTS["slurm/scaling.sbatch"])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    calls = tmp_path / "calls.txt"
    deadline = time.monotonic() + 30
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the trap is set right after scaling.py starts
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    assert lines[1:] == ["wrote the summary"], lines   # waited for it; it got the signal
    assert proc.returncode == 143                     # scaling.py's code, passed on
    args = shlex.split(lines[0])
    assert "--resume" in args and args[args.index("--out") + 1] == str(tmp_path / "out")
    assert "points measured so far" in err


def test_scaling_sbatch_default_studies_fit_the_memory_of_one_task():
    """`mpiblmm simulate` (one task, --mem-per-cpu) holds the whole study: about 31 bytes per
    voxel and image. The defaults used to need about 58 GB (audit 10, section 3)."""
    text = SCRIPTS["slurm/scaling.sbatch"].read_text()
    mem_gb = int(re.search(r"^#SBATCH --mem-per-cpu=(\d+)G$", text, re.MULTILINE).group(1))
    max_ranks = 4 * 128
    assert re.search(r"^#SBATCH --nodes=4$", text, re.MULTILINE)
    assert re.search(r"^#SBATCH --ntasks-per-node=128$", text, re.MULTILINE)
    line = re.search(r"ARGS\+=\(--mode both (.*)\)", text).group(1).split()
    value = {k: line[i + 1] for i, k in enumerate(line) if k.startswith("--")}
    shape = [int(v) for v in line[line.index("--shape") + 1:][:3]]
    images = int(value["--subjects"]) * int(value["--visits"])
    slice_ = shape[0] * shape[1]
    per_rank = -(-int(value["--voxels-per-rank"]) // slice_) * slice_
    largest = max(shape[0] * shape[1] * shape[2], per_rank * max_ranks)
    assert largest * images * 31 + 150e6 < 0.75 * mem_gb * 2**30


def test_pbs_job_without_output_uses_the_specs_and_finds_its_lock_there(tmp_path):
    """OUTPUT used to default to <spec folder>/results whatever the spec's "output" said."""
    job_script = tmp_path / "fit.pbs"
    job_script.write_text("#!/bin/bash\n")
    (tmp_path / "spec.json").write_text('{"output": "res"}')
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "mpiblmm.lock").write_text(
        '{"host": "cn042", "pid": 1, "start": 0, "pbs_job": "5.server"}\n')
    env = _pbs_env(tmp_path, WALLTIME_SECONDS="121", JOB_SCRIPT=str(job_script),
                   PBS_JOBID="6.server", PREVIOUS_JOB="5.server")
    env.pop("OUTPUT")
    _stub(tmp_path / "bin", "mpiexec", 'echo "mpiexec $*" >> "$CALLS"\nexit 137\n')
    _stub(tmp_path / "bin", "qsub", 'echo "qsub $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["pbs/fit.pbs"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "res" / "mpiblmm.lock").exists()
    mpiexec, qsub = (tmp_path / "calls.txt").read_text().splitlines()
    assert "--output" not in mpiexec and "--resume" in mpiexec
    assert ",OUTPUT=," in qsub and ",PREVIOUS_JOB=6.server " in qsub


def test_under_pbs_a_foreign_lock_is_refused_and_a_dead_one_replaced(tmp_path, monkeypatch):
    """With PBS_JOBID set, reading any lock raised KeyError 'slurm_job' (a traceback and an
    MPI abort where the lock of another job should be refused; HPC recheck): the lock code
    itself, not a stub."""
    import json as _json
    import socket

    from mpiblmm.errors import UserError
    from mpiblmm.io.lock import acquire_lock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("PBS_JOBID", "9.server")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "mpiblmm.lock"
    lock.write_text(_json.dumps({"host": "node18", "pid": 4242, "start": 0.0,
                                 "pbs_job": "55.other"}) + "\n")
    with pytest.raises(UserError, match="another mpiblmm job is writing into this folder"):
        acquire_lock(out)
    proc = subprocess.Popen(["true"])               # a PID of this host that has ended
    proc.wait()
    lock.write_text(_json.dumps({"host": socket.gethostname(), "pid": proc.pid, "start": 0.0,
                                 "pbs_job": "8.server"}) + "\n")
    held = acquire_lock(out)                        # stale: replaced
    assert '"pbs_job": "9.server"' in lock.read_text()
    held.release()
