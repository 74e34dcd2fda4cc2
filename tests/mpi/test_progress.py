"""Job-wide progress (mpiblmm/progress.py) inside an MPI job: rank 0's last line counts every
rank's voxels, whatever the number of chunks per rank (none included), and a rank that posts
its counts never waits for rank 0, even while rank 0 is busy.
"""

from __future__ import annotations

import io
import re
import time

import pytest

from mpiblmm.progress import JobLog, LogOptions, Progress


def _run(mpi, chunks_of_rank, voxels=7, interval=0.05, busy=0.0, pause=0.01):
    """Each rank reports ``chunks_of_rank(rank)`` chunks of ``voxels``; rank 0's lines."""
    stream = io.StringIO()
    log = JobLog(mpi.rank, options=LogOptions(progress_interval=interval), stream=stream)
    chunks = [chunks_of_rank(r) for r in range(mpi.size)]
    total = voxels * sum(chunks)
    progress = Progress(mpi.comm, total, log, voxels * chunks[mpi.rank], chunks[mpi.rank])
    if mpi.rank == 0 and busy:
        time.sleep(busy)  # a long first chunk: rank 0 polls nothing meanwhile
    waited = 0.0
    for _ in range(chunks[mpi.rank]):
        time.sleep(pause * (mpi.rank + 1))
        t0 = time.perf_counter()
        progress.chunk_done(voxels)
        waited = max(waited, time.perf_counter() - t0)
    progress.close()
    log.close()
    return stream.getvalue().splitlines(), total, waited


@pytest.mark.parametrize("pattern", ["rank 0 has none", "last rank has none", "uneven"])
def test_final_line_reports_every_rank_and_nothing_hangs(mpi, pattern):
    chunks_of_rank = {
        "rank 0 has none": lambda r: 0 if r == 0 else 3 + 2 * r,
        "last rank has none": lambda r: 0 if r == mpi.size - 1 and mpi.size > 1 else 4 + r,
        "uneven": lambda r: [9, 1, 5][r % 3],
    }[pattern]
    lines, total, _ = _run(mpi, chunks_of_rank)
    if mpi.rank == 0:
        final = lines[-1]
        ok = (f"fit {total:,}/{total:,} voxels (100.0%)" in final
              and f"{mpi.size}/{mpi.size} ranks finished" in final and "left" not in final)
        starts = [line for line in lines if f"fit 0/{total:,} voxels on {mpi.size}" in line]
        ok = ok and len(starts) == 1
    else:
        ok = lines == []  # only rank 0 speaks
    mpi.check(ok, f"lines: {lines}")


def test_intermediate_lines_count_up_and_carry_rate_and_time_left(mpi):
    lines, total, _ = _run(mpi, lambda r: 12, interval=0.03, pause=0.02)
    if mpi.rank == 0:
        done = [int(m.group(1).replace(",", "")) for m in
                (re.search(r"fit ([\d,]+)/", line) for line in lines) if m]
        middle = [line for line in lines if "left" in line]
        ok = (done == sorted(done) and done[-1] == total and len(middle) >= 1
              and all("voxels/s" in line for line in middle))
    else:
        ok = True
    mpi.check(ok, f"lines: {lines}")


def test_a_rank_that_finished_is_counted_while_rank_0_still_works(mpi):
    """A rank's final count used to be sent only in close(), after the collective that
    waits for every rank: rank 0's lines missed its last chunks and read "0/N ranks
    finished" until the end (audit, tenth session)."""
    stream = io.StringIO()
    log = JobLog(mpi.rank, options=LogOptions(progress_interval=0.02), stream=stream)
    chunks = [25] + [3] * (mpi.size - 1)
    progress = Progress(mpi.comm, 5 * sum(chunks), log, 5 * chunks[mpi.rank], chunks[mpi.rank])
    for _ in range(chunks[mpi.rank]):
        time.sleep(0.03 if mpi.rank == 0 else 0.0)
        progress.chunk_done(5)
    progress.chunks_done()
    mpi.comm.barrier()  # the fit's settle(): waits for rank 0
    progress.close()
    log.close()
    lines = stream.getvalue().splitlines()
    others = 5 * 3 * (mpi.size - 1)
    if mpi.rank == 0 and mpi.size > 1:
        early = [line for line in lines[:-1] if "left" in line
                 and f"{mpi.size - 1}/{mpi.size} ranks finished" in line]
        counts = [int(re.search(r"fit ([\d,]+)/", line).group(1).replace(",", ""))
                  for line in early]
        ok = bool(early) and all(c > others for c in counts)
    else:
        ok = True
    mpi.check(ok, f"lines: {lines}")


def test_posting_counts_never_waits_for_a_busy_rank_0(mpi):
    # Rank 0 sleeps 1.5 s before its first chunk end: the others post many counts meanwhile.
    _, _, waited = _run(mpi, lambda r: 10, interval=1e-6, busy=1.5, pause=0.005)
    mpi.check(mpi.rank == 0 or waited < 0.5, f"a chunk_done call took {waited:.2f} s")


def test_abandoning_after_unequal_work_waits_for_nobody(mpi):
    stream = io.StringIO()
    log = JobLog(mpi.rank, options=LogOptions(progress_interval=0.0), stream=stream)
    progress = Progress(mpi.comm, 100 * mpi.size, log)
    for _ in range(mpi.rank * 3):  # rank 0 none, the others some: then all stop at once
        progress.chunk_done(5)
    t0 = time.perf_counter()
    progress.abandon()
    waited = time.perf_counter() - t0
    log.close()
    mpi.comm.Barrier()  # the communicator is still usable: nothing left half done
    lines = stream.getvalue().splitlines()
    ok = waited < 0.5 and (mpi.rank != 0 or re.search(
        rf"fit stopped at [\d,]+/{100 * mpi.size:,} voxels$", lines[-1]) is not None)
    mpi.check(ok, f"waited {waited:.2f} s; lines {lines}")
