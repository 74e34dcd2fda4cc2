"""Run many `mpiblmm` command lines in one MPI job (the bad-input suite's launcher).

Usage: ``mpiexec -n 2 python bad_inputs_driver.py CASES.json OUT.json``.  ``CASES.json`` is a
list of ``{"name": ..., "argv": [...]}``; every rank runs :func:`mpiblmm.cli.main` on each
case in turn, in-process, with its file descriptors 1 and 2 captured into
``OUT.json.<case>.<rank>.{out,err}`` (kept, so a case that kills the job can be read), and
rank 0 writes ``OUT.json``: per case, each rank's exit code, stdout and stderr.  A case that hangs ends the
job (faulthandler prints where) so the test sees it rather than waiting forever; a case that
aborts the job (an unexpected exception) ends it too, and the last "case:" line on stdout
names it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

CASE_TIMEOUT = 60.0


def run_captured(argv: list[str], stem: str) -> tuple[int, str, str]:
    from mpiblmm.cli import main

    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: open(f"{stem}.{'out' if fd == 1 else 'err'}", "w+b") for fd in (1, 2)}
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        os.dup2(files[fd].fileno(), fd)
    try:
        try:
            code = main(argv)
        except SystemExit as exc:        # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
    text = {}
    for fd, fh in files.items():
        fh.seek(0)
        text[fd] = fh.read().decode("utf-8", errors="replace")
        fh.close()
    return int(code), text[1], text[2]


def main() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    cases = json.loads(open(sys.argv[1]).read())
    out = []
    for i, case in enumerate(cases):
        if comm.rank == 0:
            print(f"case: {case['name']}", flush=True)
        comm.Barrier()
        faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
        code, stdout, stderr = run_captured(case["argv"], f"{sys.argv[2]}.{i}.{comm.rank}")
        faulthandler.cancel_dump_traceback_later()
        got = comm.gather({"code": code, "stdout": stdout, "stderr": stderr}, root=0)
        if comm.rank == 0:
            out.append({"name": case["name"], "ranks": got})
    if comm.rank == 0:
        with open(sys.argv[2], "w") as fh:
            json.dump(out, fh)
    comm.Barrier()


if __name__ == "__main__":
    main()
