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
                          r"MODE=\(--resume\)", r"scontrol requeue", r"status == 3"]),
    ("slurm/scaling.sbatch", [r"^#SBATCH --exclusive$", r"^# module load ",
                              r"export OMP_NUM_THREADS=1", r'export MPIEXEC="srun ',
                              r"scripts/scaling.py", r"--max-memory-mb"]),
    ("pbs/fit.pbs", [r"^#PBS -r y$", r"^#PBS -l walltime=", r"^#PBS -l select=.*mpiprocs=",
                     r"^# module load ", r"export OMP_NUM_THREADS=1",
                     r"timeout --signal=TERM", r"mpiexec -n", r"--max-memory-mb",
                     r"MODE=\(--resume\)", r"^\s+qsub "]),
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
    assert srun[:2] == ["srun", "--cpu-bind=cores"] and "--resume" in srun
    assert srun[srun.index("--max-memory-mb") + 1] == "800"  # 80% of 1000 MiB per CPU
    assert lines[1:] == (["scontrol requeue 4242"] if requeued else [])
    assert ("requeueing" in run.stdout) == requeued
    assert requeued or "resubmit by hand" in run.stderr


def test_fit_sbatch_passes_a_failed_fit_on(tmp_path):
    env = _env(tmp_path, SPEC=str(tmp_path / "spec.json"), OUTPUT=str(tmp_path / "out"),
               SLURM_JOB_ID="4242")
    _stub(tmp_path / "bin", "srun", 'echo "srun $*" >> "$CALLS"\nexit 2\n')
    run = subprocess.run([BASH, str(SCRIPTS["slurm/fit.sbatch"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert "--resume" not in (tmp_path / "calls.txt").read_text()  # a fresh folder


def test_pbs_job_stops_before_the_walltime_and_resubmits_itself(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("node1\nnode1\n")
    env = _env(tmp_path, SPEC=str(tmp_path / "spec.json"), OUTPUT=str(tmp_path / "out"),
               PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(tmp_path),
               WALLTIME_SECONDS="121", JOB_SCRIPT="/x/fit.pbs")  # TERM after 1 s
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "mpiexec", 'echo "mpiexec $*" >> "$CALLS"\n'
          'trap \'echo "mpiexec got TERM" >> "$CALLS"; exit 143\' TERM\n'
          'while true; do sleep 0.05; done\n')
    _stub(bin_dir, "qsub", 'echo "qsub $*" >> "$CALLS"\n')
    run = subprocess.run([BASH, str(SCRIPTS["pbs/fit.pbs"])], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    assert lines[0].startswith("mpiexec -n 2 mpiblmm fit ") and "--resume" not in lines[0]
    assert lines[1] == "mpiexec got TERM"
    assert lines[2].startswith("qsub -v SPEC=") and "RESUBMIT=1," in lines[2]
    assert lines[2].endswith(" /x/fit.pbs")


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
    _stub(bin_dir, "srun", f'shift 1; exec {shlex.join(launcher)} -n 2 "$@"\n')
    _stub(bin_dir, "mpiblmm", f'exec {shlex.join(mpiblmm_command)} "$@"\n')
    env = _env(tmp_path, SPEC=str(study / "spec.json"), OUTPUT=str(tmp_path / "out"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    run = subprocess.run([BASH, str(SCRIPTS["slurm/fit.sbatch"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fit 48/48 voxels (100.0%)" in run.stdout and "2/2 ranks finished" in run.stdout
    assert (tmp_path / "out" / "results.h5").exists()
