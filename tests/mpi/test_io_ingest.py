"""Packing NIfTI images and slab reads, at any number of ranks (run with 1, 2 and 3).

    mpiexec -n 3 .venv/bin/python -m pytest tests/mpi/test_io_ingest.py
"""

from __future__ import annotations

import numpy as np
import pytest

import h5py  # noqa: E402  runtime dependencies: a missing one must fail, not skip

from mpiblmm.errors import UserError  # noqa: E402
from mpiblmm.errors import SpecError  # noqa: E402
from mpiblmm.io import ingest  # noqa: E402
from mpiblmm.io.ingest import SlabReader, open_packed, pack_images, read_slab  # noqa: E402
from mpiblmm.parallel import partition  # noqa: E402
from tests.io.helpers import AFFINE, GRID, all_ranks_pass, make_study, reference  # noqa: E402


def study_on_root(comm, folder, **kw):
    study = make_study(folder, **kw) if comm.Get_rank() == 0 else None
    return comm.bcast(study, root=0)


def gather_slabs(comm, packed, collective=True):
    """Each rank reads its slab; all slabs gathered on every rank, (V, n)."""
    s = partition(packed.n_voxels, comm.Get_size(), comm.Get_rank())
    with SlabReader(packed, comm) as reader:
        mine = reader.read(s.start, s.stop, collective=collective)
    return np.concatenate(comm.allgather(mine))


@pytest.mark.parametrize("with_masks, zero_is_missing", [(False, True), (True, True), (True, False)])
def test_pack_matches_serial_read(comm, tmp, with_masks, zero_is_missing):
    study = study_on_root(comm, tmp / "study", with_masks=with_masks)
    packed = pack_images(study["images"], tmp / "out" / "packed.h5", comm=comm,
                         analysis_mask=study["analysis_mask"],
                         observation_masks=study["observation_masks"],
                         zero_is_missing=zero_is_missing)
    voxels, Y = reference(study, zero_is_missing)
    Yslabs = gather_slabs(comm, packed)

    def check():
        np.testing.assert_array_equal(packed.voxels, voxels)
        assert packed.n_observations == len(study["images"]) and packed.grid_shape == GRID
        np.testing.assert_allclose(packed.affine, AFFINE)
        np.testing.assert_array_equal(Yslabs, Y.T.astype(np.float64))
        if zero_is_missing:
            assert not (voxels == [0, 0, 0]).all(axis=1).any()   # all-zero voxel dropped
        assert (voxels == [3, 4, 2]).all(axis=1).any()           # observed once is kept
        with h5py.File(packed.path, "r") as f:
            assert f.attrs["complete"] and f.attrs["format"] == "mpiblmm-packed-1"
            assert f["Y"].dtype == np.float32 and f["Y"].shape == Y.shape
            assert f["Y"].chunks[0] == Y.shape[0]
            np.testing.assert_array_equal(f["Y"][...], Y)
            np.testing.assert_array_equal(f["voxels"][...], voxels)
            np.testing.assert_array_equal(f["n_observed"][...], np.isfinite(Y).sum(axis=0))
            assert [x.decode() for x in f["images"][...]] == [str(p) for p in study["images"]]
    all_ranks_pass(comm, check)


def test_low_memory_budget_reads_twice(comm, tmp):
    study = study_on_root(comm, tmp / "study")
    packed = pack_images(study["images"], tmp / "packed.h5", comm=comm, max_memory_mb=1e-6)
    voxels, Y = reference(study)
    got = gather_slabs(comm, packed)
    all_ranks_pass(comm, lambda: np.testing.assert_array_equal(got, Y.T))


def test_first_image_off_grid_is_named_on_every_rank(comm, tmp):
    study = study_on_root(comm, tmp / "study", bad_affine=(4, 6))
    with pytest.raises(UserError) as info:
        pack_images(study["images"], tmp / "packed.h5", comm=comm)
    text = str(info.value)
    all_ranks_pass(comm, lambda: (str(study["images"][4]) in text and "affine differs" in text)
                   or pytest.fail(text))


def test_nothing_observed_is_a_user_error(comm, tmp):
    study = study_on_root(comm, tmp / "study", n=3)
    if comm.Get_rank() == 0:
        from tests.io.helpers import save
        save(tmp / "empty_mask.nii.gz", np.zeros(GRID, dtype=np.uint8))
    comm.Barrier()
    with pytest.raises(UserError, match="no voxel is observed in any image inside the analysis mask"):
        pack_images(study["images"], tmp / "packed.h5", comm=comm,
                    analysis_mask=tmp / "empty_mask.nii.gz")


def test_reuse_and_reopen_packed(comm, tmp):
    study = study_on_root(comm, tmp / "study", with_masks=True)
    kw = dict(comm=comm, analysis_mask=study["analysis_mask"],
              observation_masks=study["observation_masks"])
    first = pack_images(study["images"], tmp / "packed.h5", **kw)
    stamp = (tmp / "packed.h5").stat().st_mtime_ns
    again = pack_images(study["images"], tmp / "packed.h5", **kw)
    opened = open_packed(tmp / "packed.h5", "/Y", comm=comm)
    voxels, Y = reference(study)
    got = gather_slabs(comm, opened)

    def check():
        assert (tmp / "packed.h5").stat().st_mtime_ns == stamp   # not rewritten
        for p in (again, opened):
            np.testing.assert_array_equal(p.voxels, first.voxels)
            np.testing.assert_array_equal(p.n_observed, np.isfinite(Y).sum(axis=0))
        np.testing.assert_array_equal(got, Y.T)
    all_ranks_pass(comm, check)


@pytest.mark.parametrize("layout", ["grid", "flat"])
def test_external_packed_file(comm, tmp, layout):
    """A user-packed (n, X, Y, Z) or (n, X*Y*Z) dataset with zeros: candidates found by a pass."""
    study = study_on_root(comm, tmp / "study", with_masks=True)
    voxels_ref, Y_ref = reference({**study, "observation_masks": None})
    if comm.Get_rank() == 0:
        import nibabel as nib
        data = np.stack([np.asarray(nib.load(str(p)).get_fdata()) for p in study["images"]])
        with h5py.File(tmp / "ext.h5", "w") as f:
            d = f.create_dataset("data/Y", data=data if layout == "grid" else data.reshape(len(data), -1))
            d.attrs["affine"] = AFFINE
            d.attrs["grid_shape"] = GRID
    comm.Barrier()
    packed = open_packed(tmp / "ext.h5", "/data/Y", comm=comm, analysis_mask=study["analysis_mask"])
    got = gather_slabs(comm, packed, collective=False)
    got_one = read_slab(packed, 0, packed.n_voxels, comm=comm)
    mask = np.asarray(__import__("nibabel").load(str(study["analysis_mask"])).get_fdata()) != 0
    inside = mask[tuple(voxels_ref.T)]

    def check():
        np.testing.assert_array_equal(packed.voxels, voxels_ref[inside])
        np.testing.assert_array_equal(got, Y_ref[:, inside].T)
        np.testing.assert_array_equal(got_one, got)
    all_ranks_pass(comm, check)


def test_more_ranks_than_voxels(comm, tmp):
    """Two candidate voxels: at 3 ranks one rank reads an empty slab collectively."""
    study = study_on_root(comm, tmp / "study", n=4)
    if comm.Get_rank() == 0:
        from tests.io.helpers import save
        m = np.zeros(GRID, dtype=np.uint8)
        m[2, 3, 1] = m[3, 0, 2] = 1
        save(tmp / "two.nii.gz", m)
    comm.Barrier()
    packed = pack_images(study["images"], tmp / "packed.h5", comm=comm, analysis_mask=tmp / "two.nii.gz")
    got = gather_slabs(comm, packed)
    voxels, Y = reference(study)
    keep = ((voxels == [2, 3, 1]).all(axis=1)) | ((voxels == [3, 0, 2]).all(axis=1))

    def check():
        assert packed.n_voxels == 2
        np.testing.assert_array_equal(got, Y[:, keep].T)
    all_ranks_pass(comm, check)


@pytest.mark.parametrize("phase, who, grace", [
    ("read", 0, 30.0), ("read", -1, 30.0), ("read", -1, 0.0),
    ("write", 0, 30.0), ("write", -1, 30.0), ("write", 0, 0.0)])
def test_a_signal_stops_packing_on_every_rank_at_a_block_boundary(comm, tmp, monkeypatch,
                                                                  phase, who, grace):
    """SIGTERM reaches one rank only, while it reads an image in the first pass (``read``) or
    in the second (``write``: a budget too small to keep the rows, so they are read again and
    written a row at a time).  Every rank stops (none waits forever: the hang guard), raises
    PackingStopped, and the file is either not written or marked not complete.  With a grace
    of 0 the read in hand is abandoned at once.  Packing again then gives every row."""
    from mpiblmm import interrupt
    from mpiblmm.io import ingest

    study = study_on_root(comm, tmp / "study", n=7)
    rank, size = comm.Get_rank(), comm.Get_size()
    s = partition(len(study["images"]), size, rank)
    trigger = 1 if phase == "read" else s.stop - s.start + 1   # the call that gets the signal
    signalled = rank == who % size
    calls = []
    real = ingest.read_stored

    def read_stored(path, grid):
        calls.append(path)
        if signalled and len(calls) == trigger:
            interrupt._on_signal(15, None)        # as if SIGTERM arrived during this read
        return real(path, grid)

    monkeypatch.setattr(ingest, "read_stored", read_stored)
    path = tmp / "packed.h5"
    interrupt.install(grace_seconds=grace)
    try:
        stopped = False
        try:
            pack_images(study["images"], path, comm=comm, max_memory_mb=1e-6)
        except ingest.PackingStopped as exc:
            stopped = exc.path == path
    finally:
        interrupt.uninstall()
    mine = s.stop - s.start
    all_ranks_pass(comm, lambda: stopped or pytest.fail("packing was not stopped here"))
    # the signalled rank read no image after the one in hand (pass 1), and none after the
    # signal in pass 2 (a row a block)
    all_ranks_pass(comm, lambda: not signalled or len(calls) == trigger
                   or pytest.fail(f"{len(calls)} reads after the signal at read {trigger}"))
    all_ranks_pass(comm, lambda: phase == "write" or len(calls) <= mine
                   or pytest.fail(f"{len(calls)} reads"))

    def left():
        if phase == "read":
            assert not path.exists()
        else:
            with h5py.File(path, "r") as f:
                assert not f.attrs["complete"]
    all_ranks_pass(comm, left)
    monkeypatch.undo()
    comm.Barrier()
    packed = pack_images(study["images"], path, comm=comm)     # packs again: no stop
    voxels, Y = reference(study)
    got = gather_slabs(comm, packed)

    def check():
        np.testing.assert_array_equal(packed.voxels, voxels)
        np.testing.assert_array_equal(got, Y.T)
        with h5py.File(path, "r") as f:
            assert f.attrs["complete"]
    all_ranks_pass(comm, check)


# ------------------------------------------------------------------ the inputs' stat calls
class _Spec:
    """What :func:`ingest.shared_input_fingerprint` reads of a spec."""

    def __init__(self, study, path):
        self.images = tuple(study["images"])
        self.observation_masks = study["observation_masks"]
        self.analysis_mask = study["analysis_mask"]
        self.zero_is_missing = True
        self.packed = None
        self.path = path


@pytest.mark.parametrize("with_masks", [False, True])
def test_shared_fingerprint_is_the_serial_one_and_each_rank_stats_its_block(
        comm, tmp, monkeypatch, with_masks):
    """The fingerprint (packed.h5's ``source``, part of results.h5's ``input_hash``) has
    the bits of the one-process fingerprint at any rank count, so a packed file or a fit is
    reused or resumed at another; each listed file is ``stat``ed by one rank only, its
    block, not all of them by rank 0."""
    study = study_on_root(comm, tmp / "study", n=11, with_masks=with_masks)
    spec = _Spec(study, tmp / "spec.json")
    serial = ingest._fingerprint(study["images"], study["observation_masks"],
                                 study["analysis_mask"], True)
    listed = {str(p) for p in list(study["images"]) + list(study["observation_masks"] or [])}
    seen = []
    real_stat = ingest.os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path) in listed:
            seen.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(ingest.os, "stat", counting_stat)
    got = ingest.shared_input_fingerprint(spec, comm, on_problem=lambda: None)
    monkeypatch.undo()
    files = [str(p) for p in list(study["images"]) + list(study["observation_masks"] or [])]
    block = partition(len(files), comm.Get_size(), comm.Get_rank())
    everyone = comm.allgather(seen)

    def check():
        assert got == serial
        assert seen == files[block.start:block.stop]
        assert sorted(f for part in everyone for f in part) == sorted(files)
    all_ranks_pass(comm, check)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_listed_path_that_is_no_file_is_the_specs_line_on_every_rank(comm, tmp, fixed):
    """A missing image (here the last, in the last rank's block) is refused on every rank
    with the line of the spec's own full parse (``on_problem`` on rank 0: its list file and
    row); if that parse finds nothing (the file came back meanwhile), with the lowest
    failing rank's line naming the path."""
    study = study_on_root(comm, tmp / "study", n=5)
    gone = tmp / "study" / "gone.nii.gz"
    (tmp / "study" / "dir.nii").mkdir(exist_ok=True) if comm.Get_rank() == 0 else None
    comm.Barrier()
    study["images"] = list(study["images"]) + [tmp / "study" / "dir.nii", gone]
    spec = _Spec(study, tmp / "spec.json")
    calls = []

    def on_problem():
        calls.append(comm.Get_rank())
        if not fixed:
            raise SpecError("file not found: gone.nii.gz", "images.txt: row 7")

    with pytest.raises(UserError) as info:
        ingest.shared_input_fingerprint(spec, comm, on_problem=on_problem)
    text = str(info.value)

    def check():
        assert calls == ([0] if comm.Get_rank() == 0 else [])
        if fixed:   # the first bad path in list order: the directory
            assert text == f"{tmp / 'spec.json'}: is a directory, not a file: " \
                           f"{tmp / 'study' / 'dir.nii'}", text
        else:
            assert text == "images.txt: row 7: file not found: gone.nii.gz", text
    all_ranks_pass(comm, check)


@pytest.mark.parametrize("who", [0, 1])
def test_a_signal_stops_reading_a_packed_input_on_every_rank(comm, tmp, monkeypatch, who):
    """The pass over an already-packed input (its observed voxels; 37 GB at UK Biobank size)
    hears SIGTERM before each collective block: one rank is signalled during its first
    block, every rank stops before the second (none waits: the hang guard), raises
    ReadingStopped, and the file reads the same afterwards."""
    from mpiblmm import interrupt

    study = study_on_root(comm, tmp / "study", n=5)
    if comm.Get_rank() == 0:
        import nibabel as nib
        data = np.stack([np.asarray(nib.load(str(p)).get_fdata()) for p in study["images"]])
        with h5py.File(tmp / "ext.h5", "w") as f:
            d = f.create_dataset("Y", data=data.reshape(len(data), -1))
            d.attrs["affine"] = AFFINE
            d.attrs["grid_shape"] = GRID
    comm.Barrier()
    before = open_packed(tmp / "ext.h5", "/Y", comm=comm)
    monkeypatch.setattr(ingest, "WRITE_BLOCK_BYTES", 8 * 5 * 4)   # blocks of 4 columns
    signalled = comm.Get_rank() == who % comm.Get_size()
    reads = []
    real = ingest.SlabReader.read

    def read(self, lo, hi, collective=True):
        reads.append((lo, hi))
        if signalled and len(reads) == 1:
            interrupt._on_signal(15, None)        # as if SIGTERM arrived during this read
        return real(self, lo, hi, collective)

    monkeypatch.setattr(ingest.SlabReader, "read", read)
    interrupt.install(grace_seconds=30)
    try:
        with pytest.raises(ingest.ReadingStopped) as info:
            open_packed(tmp / "ext.h5", "/Y", comm=comm)
    finally:
        interrupt.uninstall()
    monkeypatch.undo()
    after = open_packed(tmp / "ext.h5", "/Y", comm=comm)

    def check():
        assert info.value.path == tmp / "ext.h5"
        assert len(reads) == 1, reads            # the block in hand, then no other
        np.testing.assert_array_equal(after.voxels, before.voxels)
        assert before.n_voxels >= 2 * 4 * comm.Get_size()   # two blocks or more per rank
    all_ranks_pass(comm, check)
