"""How an MPI job ends: abort on an unexpected error, exit 2 on an agreed user error, and a
fast exit (:func:`mpiblmm.parallel.exit_now`) that loses nothing.

Each test launches its own ``mpiexec`` job (with a timeout), so it runs in the serial suite.
The jobs run :func:`mpiblmm.parallel.run_guarded` around a small script.
"""

import sys
import textwrap

import pytest

pytestmark = pytest.mark.spawns_mpiexec

PRELUDE = textwrap.dedent(
    """
    import sys, time
    from mpi4py import MPI
    from mpiblmm.errors import UserError
    from mpiblmm.parallel import agree_on_user_error, run_guarded
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    """
)

RAISE_ON_ONE_RANK = PRELUDE + textwrap.dedent(
    """
    def job():
        if rank == {bad_rank}:
            time.sleep(0.5)  # the others are already waiting in the collective
            raise RuntimeError("disk on fire")
        comm.barrier()       # would wait forever without the abort
        return 0
    sys.exit(run_guarded(job, comm))
    """
)

USER_ERROR_ON_ONE_RANK = PRELUDE + textwrap.dedent(
    """
    def job():
        problem = None
        try:
            if rank == {bad_rank}:
                raise UserError("no such file: data/sub-07.nii.gz", where="spec.json: images")
        except UserError as exc:
            problem = exc
        agree_on_user_error(comm, problem)
        comm.barrier()  # the collective I/O that must never start
        return 0
    sys.exit(run_guarded(job, comm))
    """
)


@pytest.mark.parametrize("n_ranks, bad_rank", [(2, 1), (3, 1), (3, 0)])
def test_an_exception_on_one_rank_aborts_the_whole_job_quickly(run_mpi, n_ranks, bad_rank):
    job = run_mpi(n_ranks, [sys.executable, "-c", RAISE_ON_ONE_RANK.format(bad_rank=bad_rank)],
                  timeout=60)
    assert not job.timed_out, "the job hung instead of aborting"
    assert job.returncode != 0
    assert job.seconds < 20, f"abort took {job.seconds:.1f} s"
    assert f"rank {bad_rank}: RuntimeError: disk on fire" in job.stderr


@pytest.mark.parametrize("n_ranks, bad_rank", [(1, 0), (2, 1), (3, 2), (3, 0)])
def test_a_user_error_on_one_rank_is_one_message_and_exit_2(run_mpi, n_ranks, bad_rank):
    job = run_mpi(n_ranks,
                  [sys.executable, "-c", USER_ERROR_ON_ONE_RANK.format(bad_rank=bad_rank)],
                  timeout=60)
    assert not job.timed_out
    assert job.returncode == 2, job.stderr
    errors = [line for line in job.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["mpiblmm: error: spec.json: images: no such file: data/sub-07.nii.gz"], \
        job.stderr
    assert "Traceback" not in job.stderr


FAST_EXIT = textwrap.dedent(
    """
    import atexit, sys
    from mpi4py import MPI
    from mpiblmm.parallel import exit_now
    class Teardown:                      # its __del__ runs only if the interpreter tears down
        def __del__(self):
            print(" torn down", end="", flush=True)
    marker = Teardown()
    comm = MPI.COMM_WORLD
    # one string: print writes its items one by one, and the launcher may put another
    # rank's output between them
    atexit.register(lambda: print(f"atexit ran on {{comm.Get_rank()}}"))
    total = comm.allreduce(comm.Get_rank() + 1)
    print(f"rank {{comm.Get_rank()}} total {{total}}", end="")   # no newline: needs a flush
    sys.stderr.write("stderr kept")
    {before_exit}
    exit_now(3)
    """
)


@pytest.mark.parametrize("n_ranks", [1, 3])
def test_exit_now_flushes_runs_atexit_and_keeps_the_code(run_mpi, n_ranks):
    job = run_mpi(n_ranks, [sys.executable, "-c", FAST_EXIT.format(before_exit="")], timeout=60)
    assert not job.timed_out
    assert job.returncode == 3, job.stderr
    total = n_ranks * (n_ranks + 1) // 2
    for rank in range(n_ranks):
        # separate checks: the launcher interleaves the ranks' unterminated lines
        assert f"rank {rank} total {total}" in job.stdout, job.stdout
        assert f"atexit ran on {rank}" in job.stdout, job.stdout
    assert job.stderr.count("stderr kept") == n_ranks
    assert "torn down" not in job.stdout                   # the teardown was skipped


def test_exit_now_with_an_open_hdf5_file_exits_normally_and_the_file_is_whole(run_mpi, tmp_path):
    target = tmp_path / "open.h5"
    keep_open = (f"import h5py; f = h5py.File({str(target)!r} + str(comm.Get_rank()), 'w'); "
                 "f['x'] = list(range(1000)); f.attrs['complete'] = True")
    job = run_mpi(2, [sys.executable, "-c", FAST_EXIT.format(before_exit=keep_open)], timeout=60)
    assert not job.timed_out and job.returncode == 3, job.stderr
    assert job.stdout.count("torn down") == 2, job.stdout  # the normal exit, on both ranks
    import h5py

    for rank in range(2):
        with h5py.File(f"{target}{rank}", "r") as f:
            assert list(f["x"][...]) == list(range(1000)) and f.attrs["complete"]
