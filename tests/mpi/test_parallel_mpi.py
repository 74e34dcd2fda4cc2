"""The MPI helpers of mpiblmm.parallel at whatever size the job has (1, 2 and 3 in CI)."""

import numpy as np
import pytest

from mpiblmm.errors import USER_ERROR_EXIT_CODE, UserError
from mpiblmm.parallel import (
    AgreedUserError,
    agree_on_user_error,
    allreduce_counts,
    run_guarded,
    slab,
    summarise_over_ranks,
)


@pytest.mark.parametrize("extra", [-2, -1, 0, 1, 1000])
def test_slabs_cover_every_voxel_once_even_when_fewer_voxels_than_ranks(mpi, extra):
    n_voxels = max(mpi.size + extra, 0)
    mine = slab(mpi.comm, n_voxels)
    everyone = mpi.comm.allgather(tuple(mine))
    owned = np.zeros(n_voxels, dtype=int)
    for start, stop in everyone:
        owned[start:stop] += 1
    mpi.check(np.all(owned == 1), f"voxels not owned exactly once: {everyone}")
    # Ranks with no voxels still take part in the collective.
    total = allreduce_counts(mpi.comm, np.array([mine.size]))
    mpi.check(total[0] == n_voxels, f"sizes add to {total[0]}, expected {n_voxels}")


def test_agree_on_user_error_without_errors_returns_on_every_rank(mpi):
    agree_on_user_error(mpi.comm, None)
    mpi.check(True)


def test_a_user_error_on_the_last_rank_is_raised_on_every_rank(mpi):
    error = UserError("spec.json: no such key 'contrast'") if mpi.rank == mpi.size - 1 else None
    with pytest.raises(AgreedUserError) as caught:
        agree_on_user_error(mpi.comm, error)
    mpi.check(caught.value.origin_rank == mpi.size - 1)
    mpi.check(str(caught.value) == "spec.json: no such key 'contrast'", str(caught.value))


def test_the_lowest_failing_rank_supplies_the_message(mpi):
    with pytest.raises(AgreedUserError) as caught:
        agree_on_user_error(mpi.comm, UserError(f"problem on rank {mpi.rank}"))
    mpi.check(str(caught.value) == "problem on rank 0")


def test_run_guarded_turns_an_agreed_user_error_into_exit_2_and_one_message(mpi, capfd):
    def job():
        problem = UserError("missing file data.nii.gz") if mpi.rank == 0 else None
        agree_on_user_error(mpi.comm, problem)
        return 0

    code = run_guarded(job, mpi.comm)
    err = capfd.readouterr().err
    mpi.check(code == USER_ERROR_EXIT_CODE, f"exit code {code}")
    expected = "mpiblmm: error: missing file data.nii.gz\n" if mpi.rank == 0 else ""
    mpi.check(err == expected, repr(err))


def test_run_guarded_returns_the_job_exit_code(mpi):
    mpi.check(run_guarded(lambda: None, mpi.comm) == 0)
    mpi.check(run_guarded(lambda: 3, mpi.comm) == 3)


def test_summarise_over_ranks_gives_min_median_max_everywhere(mpi):
    low, median, high = summarise_over_ranks(mpi.comm, float(mpi.rank))
    mpi.check((low, median, high) == (0.0, (mpi.size - 1) / 2, float(mpi.size - 1)),
              f"{(low, median, high)}")


def test_allreduce_counts_sums_element_wise(mpi):
    counts = np.array([1, mpi.rank, 0], dtype=np.int32)
    total = allreduce_counts(mpi.comm, counts)
    mpi.check(total.dtype == np.int64)
    mpi.check(total.tolist() == [mpi.size, mpi.size * (mpi.size - 1) // 2, 0], str(total))


def test_collective_hdf5_write_with_empty_slabs(mpi):
    """Parallel h5py works, including ranks whose selection is empty.

    h5py's slicing (``dset[a:a] = ...``) skips an empty selection and so never joins the
    collective write: the job hangs (h5py issue 965). The low-level call with a "none"
    selection takes part; mpiblmm.io wraps it.
    """
    import h5py  # a runtime dependency: missing must fail, not skip
    mpi.check(h5py.get_config().mpi, "h5py has no MPI support")
    path = mpi.shared_tmp_path / "slabs.h5"
    n_voxels = max(mpi.size - 1, 1)  # at 2+ ranks the last rank owns nothing
    mine = slab(mpi.comm, n_voxels)
    values = np.arange(mine.start, mine.stop, dtype=float)
    with h5py.File(path, "w", driver="mpio", comm=mpi.comm) as f:
        data = f.create_dataset("beta", shape=(n_voxels,), dtype="f8")  # collective
        file_space = data.id.get_space()
        memory_space = h5py.h5s.create_simple((max(mine.size, 1),))
        if mine.size:
            file_space.select_hyperslab((mine.start,), (mine.size,))
        else:
            file_space.select_none()
            memory_space.select_none()
            values = np.zeros(1)
        transfer = h5py.h5p.create(h5py.h5p.DATASET_XFER)
        transfer.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
        data.id.write(memory_space, file_space, values, dxpl=transfer)  # every rank joins
    mpi.comm.Barrier()
    with h5py.File(path, "r") as f:
        stored = f["beta"][...]
    mpi.check(stored.tolist() == list(range(n_voxels)), str(stored))
