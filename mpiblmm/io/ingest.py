"""NIfTI images -> one packed HDF5 matrix (observations x candidate voxels), and slab reads.

Surface maps (GIfTI, CIFTI dense scalar) are packed the same way as a grid of (N, 1, 1):
:mod:`mpiblmm.io.images` picks the reader by file name; the first image's header facts
(``Grid.space``) are kept in the root attribute ``space`` for the maps.

The packed file (``<output>/packed.h5``, format ``mpiblmm-packed-1``; ``docs/SPEC.md`` is the
user's description) holds:

- ``/Y`` (n, V) float32 (float64 when some image holds a value that float32 cannot represent
  exactly, so packing never loses precision): row ``i`` is image ``i``, column ``j``
  candidate voxel ``j``; NaN
  where the observation is missing (NaN/Inf in the image, 0.0 when ``zero_is_missing``, or
  outside the image's observation mask).  Attributes ``grid_shape`` (3,), ``affine`` (4, 4)
  and ``voxels`` = ``"/voxels"``.
- ``/voxels`` (V, 3) int32: i, j, k of each candidate voxel, in C order.  A candidate voxel is
  in the analysis mask and observed in at least one image.
- ``/n_observed`` (V,) int32: number of images in which each candidate voxel is observed
  (lets the fit balance its slabs by cost before reading any data).
- ``/images`` (n,) the source image paths; root attributes ``format``, ``complete`` (true once
  written), ``zero_is_missing``, ``n_observations``, ``grid_shape``, ``affine``, ``source``
  (a fingerprint of the inputs, so a second fit with the same inputs reuses the file).

Chunking of ``/Y``: chunks span every observation and ``c = 1 MiB / (4 n)`` voxels, so a
slab read (all observations of a run of voxels) touches whole chunks only, about one per
``c`` voxels.  Writes during packing are row blocks; parallel HDF5 aggregates them
(collective I/O).  The data is not compressed: parallel HDF5 1.10 cannot compress
independent writes.

Packing runs in parallel: ranks share the images (contiguous blocks), read them with
nibabel, reduce "observed anywhere" over ranks, create the file collectively and write
their rows collectively.  Images are read once if a rank's rows fit half its memory budget,
else twice.  Collective rules: see :mod:`mpiblmm.io`; every collective step runs inside
:func:`mpiblmm.parallel.no_hang` (an I/O error ends the job with one line, never a hang).

SIGTERM/SIGINT (:mod:`mpiblmm.interrupt`) stop packing at a block boundary, agreed by every
rank without any rank waiting: while the images are read, a rank stops after the image in
hand (or abandons it when the grace period ends) and tells the others, who stop after theirs;
while the rows are written, the ranks agree before each collective block.  Every rank then
raises :class:`PackingStopped`; the file is left with ``complete`` false (or not written at
all), so it is never reused and the next fit packs again from the start.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mpiblmm import interrupt
from mpiblmm.errors import SpecError, UserError
from mpiblmm.io import (agree, comm_rank, comm_size, make_dirs, on_root, open_h5, read_hyperslab,
                        write_hyperslab)
from mpiblmm.io import surface
from mpiblmm.io.images import (grid_kind, read_grid, read_mask, read_stored,  # NIfTI or surface,
                               read_volume, stored_space_problem, verify_size,  # by file name
                               with_geometry)
from mpiblmm.io.nifti import Grid
from mpiblmm.parallel import no_hang

PACKED_FORMAT = "mpiblmm-packed-1"
PACKED_NAME = "packed.h5"
CHUNK_BYTES = 1 << 20
#: Memory budget per rank when the spec sets none (MiB).
DEFAULT_MEMORY_MB = 2048.0
#: Largest block of rows one rank writes at once (bytes).
WRITE_BLOCK_BYTES = 64 << 20


class PackingStopped(Exception):
    """Packing stopped at SIGTERM/SIGINT (:mod:`mpiblmm.interrupt`), raised on every rank
    together at the same block boundary; ``path`` is not complete (its ``complete`` is
    false, or it was never written), so the next fit packs again from the start."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


class ReadingStopped(PackingStopped):
    """Reading an already-packed input (``images: {"h5": ...}``) to find its observed voxels
    stopped at SIGTERM/SIGINT, on every rank together before the same block; the file is
    only read, so it is unchanged, and the next fit reads it again."""


@dataclass(frozen=True, eq=False)
class PackedInput:
    """Where the observations are and which voxels are fitted.

    ``voxels`` (V, 3) int32 candidate voxels in C order; ``columns`` (V,) int64 the stored
    voxel index of each (a column of a 2-D dataset, or the C-order grid index of a 4-D one).
    """

    path: Path
    dataset: str
    n_observations: int
    grid_shape: tuple[int, int, int]
    affine: np.ndarray
    voxels: np.ndarray
    columns: np.ndarray
    grid_layout: bool = False
    zero_is_missing: bool = True
    n_observed: np.ndarray | None = None  # (V,) observations per voxel, where known
    space: str = ""  # the input's format and header codes (mpiblmm.io.nifti.Grid.space)

    @property
    def n_voxels(self) -> int:
        return int(self.voxels.shape[0])


def missing(values: np.ndarray, zero_is_missing: bool) -> np.ndarray:
    """Boolean array: NaN/Inf always missing, exact 0.0 when ``zero_is_missing``."""
    miss = ~np.isfinite(values)
    if zero_is_missing:
        miss |= values == 0
    return miss


# --------------------------------------------------------------------------- entry point
def prepare_input(spec: Any, comm: Any = None, n_expected: int | None = None,
                  path: Path | None = None, fingerprint: str | None = None) -> PackedInput:
    """Collective: the packed input of a spec, packing NIfTI images if needed.

    Parameters
    ----------
    spec
        A :class:`mpiblmm.spec.Spec`.
    comm
        Communicator (``None`` for one process).
    n_expected
        Number of observations the design has (rows of X); a packed file must match it.
    path
        Where to pack NIfTI images (default ``<spec.output>/packed.h5``).
    fingerprint
        :func:`input_fingerprint` of ``spec`` when the caller has it already (rank 0's
        value is used): packing then does not ``stat`` every image a second time.
    """
    if spec.packed is not None:
        packed = open_packed(spec.packed.h5, spec.packed.dataset, comm=comm,
                             analysis_mask=spec.analysis_mask,
                             zero_is_missing=spec.zero_is_missing)
        if n_expected is not None:
            agree(comm, rows_problem(spec, packed.n_observations, n_expected))
        return packed
    return pack_images(
        spec.images, Path(spec.output) / PACKED_NAME if path is None else path, comm=comm,
        analysis_mask=spec.analysis_mask, observation_masks=spec.observation_masks,
        zero_is_missing=spec.zero_is_missing,
        max_memory_mb=spec.max_memory_mb or DEFAULT_MEMORY_MB, fingerprint=fingerprint)


def rows_problem(spec: Any, n_observations: int, n_expected: int) -> SpecError | None:
    """The error for a packed input (``spec.packed``) whose dataset has ``n_observations``
    rows where the design has ``n_expected``; ``None`` when they agree."""
    if n_observations == n_expected:
        return None
    return SpecError(f"{spec.packed.dataset} has {n_observations} observations but "
                     f"{spec.X or spec.covariates} has {n_expected} rows", str(spec.packed.h5))


def analysis_mask_voxels(path: Path, grid: Grid, reference: str | None = None) -> np.ndarray:
    """The analysis mask on ``grid`` as a boolean volume: its non-zero, finite voxels.

    Raises :class:`UserError` naming the mask when it lies on another grid than
    ``reference``'s, cannot be read, or holds no voxel at all (nothing could be fitted).
    Reads the mask only, so ``mpiblmm check`` refuses an empty mask as the fit does.
    """
    inside = read_mask(Path(path), grid, reference=reference)
    if not inside.any():
        raise UserError("no voxel is observed in any image inside the analysis mask: the mask "
                        "is empty (every value is 0, NaN or Inf; voxels where it is non-zero "
                        "and finite are analysed)", str(path))
    return inside


def input_fingerprint(spec: Any) -> str:
    """One process: a hash that changes when the data a spec names changes (stat only).

    Images: their paths and :func:`_stat_key` (size, modification time, inode),
    with the masks and ``zero_is_missing`` (the fingerprint stored in ``packed.h5``).  A
    packed input: its path, :func:`_stat_key` and dataset, with the analysis mask and
    ``zero_is_missing``.
    """
    try:
        if spec.packed is None:
            return _fingerprint([Path(p) for p in spec.images],
                                None if spec.observation_masks is None
                                else [Path(p) for p in spec.observation_masks],
                                spec.analysis_mask, spec.zero_is_missing)
        h = hashlib.sha256()
        h.update(json.dumps(["packed", str(spec.packed.dataset), bool(spec.zero_is_missing)]).encode())
        for f in [spec.packed.h5] + ([spec.analysis_mask] if spec.analysis_mask else []):
            h.update(_stat_key(f))
        return h.hexdigest()
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", str(exc.filename)) from None


def _check_writable(path: Path) -> None:
    """Rank 0, before a collective create: a file left there must be replaceable."""
    if path.is_dir():
        raise UserError("exists and is a folder; remove it", str(path))
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError("cannot be replaced: the file is read-only (left by an earlier run?); "
                        "remove it or make it writable", str(path))


# --------------------------------------------------------------------------- packing
def _stat_key(f: Any) -> bytes:
    """What the fingerprint keeps of one input file: its size, modification time (ns) and
    inode -- what changes when its content does.  Not its path: a study named through a
    symbolic link or another mount of the same folder is the same data (a fault audit's
    ``--resume`` through ``biglink/spec.json`` of a fit begun as ``big/spec.json`` was refused
    as "the input files changed", advising ``--overwrite``); the files' order is kept.  Writing a file changes its
    modification time; a file replaced by another (``mv``, ``cp -p`` to a new name and
    back, an unpacked archive) has another inode even when its size and modification time
    were kept.  Not the change time: ``chmod``, ``chown``, ``touch -a``, a new hard link or
    a backup tool's reading of the file change it (and only it) without changing a byte,
    and a ``--resume`` after them must not be refused.  Not the device number either: on a
    network file system it may differ between the nodes (or boots) rank 0 runs on."""
    return _key_of(f, os.stat(f))


def _key_of(f: Any, st: os.stat_result) -> bytes:
    """:func:`_stat_key` from ``f``'s ``stat`` result."""
    return f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode()


def _fingerprint(images: Sequence[Path], masks: Sequence[Path] | None,
                 analysis_mask: Path | None, zero_is_missing: bool) -> str:
    """A hash of the inputs' :func:`_stat_key` in their order (stat only, no reads).  A
    ``packed.h5`` of an earlier version (whose fingerprint held other stat fields) does not
    match: it is packed again once."""
    files = list(images) + list(masks or []) + ([analysis_mask] if analysis_mask else [])
    return _hash_keys(len(images), bool(masks), analysis_mask is not None, zero_is_missing,
                      (_stat_key(f) for f in files))


def _hash_keys(n_images: int, masks: bool, analysis_mask: bool, zero_is_missing: bool,
               keys: Any) -> str:
    """The fingerprint of the inputs from their :func:`_stat_key` values, in the order
    images, observation masks, analysis mask (the same whoever ``stat``ed them)."""
    h = hashlib.sha256()
    h.update(json.dumps([PACKED_FORMAT, "stat-4", n_images, masks, analysis_mask,
                         zero_is_missing]).encode())
    for key in keys:
        h.update(key)
    return h.hexdigest()


def shared_input_fingerprint(spec: Any, comm: Any, on_problem: Any) -> str:
    """Collective: :func:`input_fingerprint` of ``spec`` (every rank gets rank 0's value), with
    the ``stat`` calls of the listed files (images, observation masks) shared over the ranks,
    each its contiguous block, then one gather of their keys on rank 0.  40,000 images are
    40,000 ``stat`` calls; on a shared file system's metadata server (~0.5 ms each) rank 0
    alone spent ~20 s on them, ~40 s with the spec's parse's own ``stat`` of each (is it a
    file?), while every other rank waited.

    The spec was parsed without checking the listed files (``load_spec(...,
    check_listed=False)``): a listed path that is not a regular file is found here, and then
    ``on_problem()`` runs on rank 0 -- the spec's full parse, which raises the one-line
    :class:`SpecError` (list file and row) the fit has always given -- and every rank raises
    it.  Should the full parse find nothing (the file appeared meanwhile), the lowest rank's
    own line is raised.
    """
    import stat as stat_mode

    if spec.packed is not None:
        return on_root(comm, lambda: input_fingerprint(spec))
    images = list(spec.images)
    masks = list(spec.observation_masks or [])
    files = images + masks
    start, stop = _partition(len(files), comm_size(comm), comm_rank(comm))
    keys: list[bytes] = []
    problem = None
    for f in files[start:stop]:
        try:
            st = os.stat(f)
            regular = stat_mode.S_ISREG(st.st_mode)
        except (OSError, ValueError):
            regular = False
        if not regular:
            from mpiblmm.spec import not_a_file

            problem = SpecError(not_a_file(Path(f)), str(spec.path))
            break
        keys.append(_key_of(f, st))
    if comm_size(comm) > 1:
        from mpi4py import MPI

        any_problem = comm.allreduce(problem is not None, op=MPI.LOR)
    else:
        any_problem = problem is not None
    if any_problem:
        on_root(comm, on_problem)  # raises the spec's own line on every rank
        agree(comm, problem)

    def fingerprint(every: list) -> str:
        try:
            tail = [_stat_key(spec.analysis_mask)] if spec.analysis_mask else []
        except OSError as exc:
            raise UserError(f"cannot read: {exc.strerror}", str(exc.filename)) from None
        return _hash_keys(len(images), bool(masks), spec.analysis_mask is not None,
                          spec.zero_is_missing, [k for part in every for k in part] + tail)

    if comm_size(comm) == 1:
        return fingerprint([keys])
    every = comm.gather(keys, root=0)
    return on_root(comm, lambda: fingerprint(every))


def _reusable(path: Path, fingerprint: str) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return (f.attrs.get("format") == PACKED_FORMAT and bool(f.attrs.get("complete"))
                    and f.attrs.get("source") == fingerprint
                    and _space_complete(str(f.attrs.get("space", ""))))
    except (OSError, KeyError):
        return False


def _space_complete(space: str) -> bool:
    """False for a NIfTI study packed before the header facts held the qform and sform
    themselves (only their codes), or a CIFTI study packed before its template's brain
    models were recorded (the export could not tell a replaced template): packed again, so
    its maps get the input's transforms, or the brain models the fit read."""
    from mpiblmm.io.surface import TEMPLATE_DIGEST

    try:
        info = json.loads(space) if space else {}
    except ValueError:
        return False
    if "template" in info and TEMPLATE_DIGEST not in info:
        return False
    return "qform_code" not in info or "quatern" in info or "qform" in info


def grid_indices(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(V, 3) int32 grid indices of C-order flat indices ``flat``, an axis at a time, where
    ``column_stack(unravel_index(...)).astype(int32)`` held three int64 arrays, their int64
    stack and its cast (~68 bytes per voxel; a memory audit's unmasked 2 mm grid went over
    its budget while packing); this holds the result and two int64 temporaries."""
    out = np.empty((flat.size, len(shape)), dtype=np.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        out[:, axis] = (flat // stride) % shape[axis]
        stride *= shape[axis]
    return out


def pack_images(images: Sequence[Path], path: Path, comm: Any = None,
                analysis_mask: Path | None = None,
                observation_masks: Sequence[Path] | None = None,
                zero_is_missing: bool = True,
                max_memory_mb: float = DEFAULT_MEMORY_MB,
                fingerprint: str | None = None) -> PackedInput:
    """Collective: pack NIfTI images into ``path`` (see the module doc for the layout).

    Reuses an existing complete ``path`` made from the same inputs (same paths, sizes,
    modification times and inodes; ``fingerprint``, when given, is their :func:`_fingerprint` already
    computed: 40,000 images are 40,000 ``stat`` calls on rank 0).  Raises :class:`UserError` (agreed on every rank) for an image that
    cannot be read or lies on another grid (the first such image), or when no voxel is
    observed.
    """
    images = [p if isinstance(p, Path) else Path(p) for p in images]  # keeps volume paths
    masks = None if observation_masks is None else [Path(p) for p in observation_masks]
    n = len(images)
    path = Path(path)

    def look() -> tuple[Grid, np.ndarray | None, str, bool]:
        grid = with_geometry(read_grid(images[0]), images[0])  # read_stored compares it
        mask = None
        if analysis_mask is not None:
            mask = analysis_mask_voxels(Path(analysis_mask), grid, reference=str(images[0]))
        try:
            fp = fingerprint or _fingerprint(images, masks, analysis_mask, zero_is_missing)
        except OSError as exc:
            raise UserError(f"cannot read: {exc.strerror}", str(exc.filename)) from None
        reuse = path.exists() and _reusable(path, fp)
        if not reuse:
            # a header's huge grid over a short file: refused before any array of the
            # grid's size is made (every other image must be on this grid)
            verify_size(images[0])
            _check_writable(path)
        return grid, mask, fp, reuse

    grid, mask, fingerprint, reuse = on_root(comm, look)  # rank 0's, on every rank
    if reuse:
        return open_packed(path, "/Y", comm=comm, zero_is_missing=zero_is_missing)

    # the grid's voxels in the analysis mask (all of them without one: no array needed)
    flat_mask = None if mask is None else np.flatnonzero(mask.reshape(-1))
    grid_voxels = int(np.prod(grid.shape)) if mask is None else flat_mask.size
    size, rank = comm_size(comm), comm_rank(comm)
    start, stop = _partition(n, size, rank)
    budget = 0.5 * max_memory_mb * 2**20
    cache_ok = (stop - start) * grid_voxels * 8 <= budget
    reference = str(images[0])
    # a GIfTI study whose first image names no structure: those that name one must agree
    named: dict | None = ({} if grid_kind(grid) == "gifti"
                          and surface.named_structure(grid.space) is None else None)

    def load_row(i: int) -> np.ndarray:
        """Image ``i``'s values at the mask's voxels (missing ones NaN), in its stored dtype
        when that is float32 (then float32 holds them exactly), else float64."""
        vals = read_stored(images[i], grid)  # our own array; None: not the fast path
        if vals is None:
            vals = read_volume(images[i], grid, reference, dtype=np.float64,
                               seen=named).reshape(-1)
        if mask is not None:
            vals = vals[flat_mask]
        miss = missing(vals, zero_is_missing)
        if masks is not None:
            seen = read_mask(masks[i], grid, reference, seen=named).reshape(-1)
            miss |= ~(seen if flat_mask is None else seen[flat_mask])
        vals[miss] = np.nan
        return vals

    # Pass 1: which voxels are observed anywhere (and keep the rows if they fit).
    observed = np.zeros(grid_voxels, dtype=np.int32)  # images observing each voxel
    cache: list[np.ndarray] = []
    error = None
    exact32 = True  # every value of this rank's images is a float32 number
    stopper = interrupt.StopAgreement(comm)  # SIGTERM/SIGINT: stop after the image in hand
    try:
        for i in range(start, stop):
            if stopper.should_stop():  # never waits: other ranks hear it at their next image
                break
            try:
                with interrupt.abandonable():  # the grace period ends inside a slow read
                    row = load_row(i)
            except interrupt.ChunkAbandoned:
                break
            observed += np.isfinite(row)
            if exact32 and row.dtype != np.float32:
                with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, and
                    exact32 = np.array_equal(row.astype(np.float32), row, equal_nan=True)
                # not equal, so the file is float64 (such voxels end with status 5)
            if cache_ok:
                cache.append(row)
    except UserError as exc:
        error = exc
    if stopper.settle():  # collective: every rank learns whether any rank was signalled
        raise PackingStopped(path)  # nothing written yet
    agree(comm, error)
    if named is not None:
        grid = _one_structure(comm, grid, named)
    if size > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, observed, op=MPI.SUM)
        exact32 = bool(comm.allreduce(exact32, op=MPI.LAND))
    dtype = np.dtype(np.float32 if exact32 else np.float64)
    keep = np.flatnonzero(observed)
    if keep.size == 0:
        agree(comm, nothing_observed(analysis_mask, masks is not None, reference,
                                     zero_is_missing))
    voxels = grid_indices(keep if flat_mask is None else flat_mask[keep], grid.shape)
    V = int(keep.size)
    counts = observed[keep]
    del observed                # per grid voxel: not needed while the rows are written

    # Pass 2: create the file collectively and write the rows.
    make_dirs(path.parent)
    names = np.array([os.fsencode(str(p)) for p in images])  # bytes as on disk: any name
    with no_hang(comm, path, "packing the images"):
        f = open_h5(path, "w", comm)
        _packed_attrs(f, n, grid, zero_is_missing, fingerprint)
        chunk_cols = max(1, min(V, CHUNK_BYTES // (dtype.itemsize * n)))
        Y = f.create_dataset("Y", shape=(n, V), dtype=dtype, chunks=(n, chunk_cols),
                             fillvalue=np.nan)
        Y.attrs["grid_shape"] = np.asarray(grid.shape, dtype=np.int64)
        Y.attrs["affine"] = grid.affine
        Y.attrs["voxels"] = "/voxels"
        vox = f.create_dataset("voxels", shape=(V, 3), dtype="i4")
        img = f.create_dataset("images", shape=(n,), dtype=names.dtype)
        n_obs = f.create_dataset("n_observed", shape=(V,), dtype="i4")
        root = rank == 0
        write_hyperslab(vox, (0, 0), voxels if root else voxels[:0], collective=True)
        write_hyperslab(n_obs, (0,), counts if root else counts[:0], collective=True)
        write_hyperslab(img, (0,), names if root else names[:0], collective=True)

        # Rows written at once: within the write block size and, counting the float64 rows
        # read plus their stacked and cast copies, within the memory budget.
        block = max(1, min(WRITE_BLOCK_BYTES // (dtype.itemsize * V),
                           int(budget // (3 * 8 * grid_voxels))))
        most = -(-n // size)  # rows of the busiest rank
        stopped = False
        for b in range(-(-most // block)):
            lo = min(stop, start + b * block)
            hi = min(stop, lo + block)
            abandoned = False
            if cache_ok:
                rows = cache[lo - start:hi - start]
            else:
                try:
                    with interrupt.abandonable():
                        rows = [load_row(i) for i in range(lo, hi)]  # read once: no new errors
                except interrupt.ChunkAbandoned:
                    abandoned, rows = True, []
            # every rank is here at the same block (the writes are collective): agree
            if _stop_agreed(comm, abandoned):
                stopped = True  # this block and the rest unwritten; complete stays false
                break
            data = np.empty((hi - lo, V), dtype=dtype)  # filled row by row: no float64 stack
            for j, r in enumerate(rows):
                data[j] = r if keep.size == r.size else r[keep]
            write_hyperslab(Y, (lo, 0), data, collective=True)
            cache[lo - start:hi - start] = [None] * (hi - lo) if cache_ok else []  # free memory
        f.flush()
        if not stopped:
            f.attrs["complete"] = True
        f.close()
    if stopped:
        raise PackingStopped(path)
    return PackedInput(path, "/Y", n, grid.shape, grid.affine, voxels,
                       np.arange(V, dtype=np.int64), False, zero_is_missing, counts, grid.space)


def _one_structure(comm: Any, grid: Grid, named: dict) -> Grid:
    """Collective: the GIfTI structures the ranks' files named (``named``: structure -> first
    file, in each rank's order) must be one, which the grid's space (the maps') then names;
    two are refused on every rank (:func:`mpiblmm.io.surface.one_structure`)."""
    parts = comm.allgather(list(named.items())) if comm_size(comm) > 1 else [list(named.items())]
    space, why = surface.one_structure(grid.space, [item for part in parts for item in part])
    agree(comm, None if why is None else UserError(why))
    return replace(grid, space=space)


def _stop_agreed(comm: Any, local: bool) -> bool:
    """Collective: True on every rank when any rank was signalled (or ``local``: its read
    was abandoned at the end of the grace period)."""
    stop = interrupt.requested() or local
    if comm_size(comm) == 1:
        return stop
    from mpi4py import MPI

    return bool(comm.allreduce(int(stop), op=MPI.MAX))


def _packed_attrs(f: Any, n: int, grid: Grid, zero_is_missing: bool, fingerprint: str) -> None:
    f.attrs["format"] = PACKED_FORMAT
    f.attrs["complete"] = False
    f.attrs["n_observations"] = n
    f.attrs["zero_is_missing"] = zero_is_missing
    f.attrs["grid_shape"] = np.asarray(grid.shape, dtype=np.int64)
    f.attrs["affine"] = grid.affine
    f.attrs["source"] = fingerprint
    f.attrs["space"] = grid.space


def _partition(n: int, parts: int, part: int) -> tuple[int, int]:
    from mpiblmm.parallel import partition

    s = partition(n, parts, part)
    return int(s.start), int(s.stop)


# --------------------------------------------------------------------------- packed input
def describe_packed(path: Path, dataset: str, analysis_mask: Path | None) -> tuple:
    """Rank 0: validate a packed file (its attributes, voxel list and the analysis mask; no
    observation is read, so ``mpiblmm check`` runs it too).

    Raises :class:`SpecError` / :class:`UserError` naming the file (or the mask) for what
    the fit would refuse before reading the data, including no stored voxel inside the mask.

    Returns (n, grid shape, affine, stored (S,) grid index of each stored voxel, keep (indices
    into stored inside the mask), 4-D layout?, packed by us?, packed with zero_is_missing?,
    observations per stored voxel (our own files) or None).
    """
    import h5py

    where = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SpecError(f"not a readable HDF5 file ({exc})", where) from None
    try:
        with f:
            described = _describe_open(f, dataset, where)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # h5py's, odd attrs
        raise SpecError(f"{dataset}: cannot read it ({type(exc).__name__}: {exc})",
                        where) from None
    n, shape, affine, stored, grid_layout, ours, stored_zim, counts, space = described
    if analysis_mask is not None:
        in_mask = analysis_mask_voxels(Path(analysis_mask), Grid(shape, affine, space),
                                       reference=where).reshape(-1)
        keep = np.flatnonzero(in_mask[stored])
        if keep.size == 0:
            raise _nothing_observed(path, analysis_mask)
    else:
        keep = np.arange(stored.size, dtype=np.int64)
    return n, shape, affine, stored, keep, grid_layout, ours, stored_zim, counts, space


def _describe_open(f: Any, dataset: str, where: str) -> tuple:
    """:func:`describe_packed` of the open file ``f``, without the analysis mask."""
    import h5py

    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
        raise SpecError(f"has no dataset {dataset!r}", where)
    ds = f[dataset]
    ours = f.attrs.get("format") == PACKED_FORMAT
    if ours and not bool(f.attrs.get("complete")):
        raise SpecError("packing did not finish (attribute complete is false); pack again", where)
    if ds.dtype.kind not in "fiu" or ds.ndim not in (2, 4):
        raise SpecError(f"{dataset}: expected a numeric (observations x voxels) or "
                        f"(observations x grid) dataset, got {ds.dtype} {ds.shape}", where)
    if "affine" not in ds.attrs:
        raise SpecError(f"{dataset}: attribute 'affine' (4x4) is missing", where)
    affine = np.asarray(ds.attrs["affine"])
    if affine.dtype.kind not in "fiu":
        raise SpecError(f"{dataset}: attribute 'affine' must be 4x4 numbers, got "
                        f"{affine.dtype}", where)
    affine = affine.astype(np.float64)
    if affine.shape != (4, 4):
        raise SpecError(f"{dataset}: attribute 'affine' must be 4x4, got {affine.shape}", where)
    if not np.isfinite(affine).all():
        raise SpecError(f"{dataset}: attribute 'affine' holds NaN or Inf", where)
    if abs(np.linalg.det(affine[:3, :3])) == 0:
        raise SpecError(f"{dataset}: attribute 'affine' is not invertible", where)
    if "grid_shape" in ds.attrs:
        given = np.asarray(ds.attrs["grid_shape"]).ravel()
        if given.dtype.kind not in "iuf" or not np.all(np.isfinite(given) & (given % 1 == 0)):
            raise SpecError(f"{dataset}: grid_shape must be 3 positive whole numbers, got "
                            f"{given.tolist()!r}", where)
        shape = tuple(int(s) for s in given)
    elif ds.ndim == 4:
        shape = tuple(int(s) for s in ds.shape[1:])
    else:
        raise SpecError(f"{dataset}: attribute 'grid_shape' is missing", where)
    if len(shape) != 3 or min(shape) < 1:
        raise SpecError(f"{dataset}: grid_shape must be 3 positive sizes, got {shape}", where)
    n_grid = int(np.prod(shape))
    if ds.ndim == 4:
        if tuple(ds.shape[1:]) != shape:
            raise SpecError(f"{dataset}: shape {ds.shape} does not match grid_shape {shape}", where)
        stored = np.arange(n_grid, dtype=np.int64)
    elif "voxels" in ds.attrs:
        name = ds.attrs["voxels"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name not in f:
            raise SpecError(f"{dataset}: its voxels dataset {name!r} is missing", where)
        if not isinstance(f[name], h5py.Dataset):
            raise SpecError(f"{dataset}: its voxels {name!r} is not a dataset", where)
        vox = np.asarray(f[name][...])
        if vox.dtype.kind not in "iu":
            raise SpecError(f"{name}: expected integer voxel coordinates, got {vox.dtype}", where)
        if vox.shape != (ds.shape[1], 3):
            raise SpecError(f"{name}: expected shape ({ds.shape[1]}, 3), got {vox.shape}", where)
        if np.any(vox < 0) or np.any(vox >= np.asarray(shape)):
            raise SpecError(f"{name}: a voxel lies outside grid_shape {shape}", where)
        stored = np.ravel_multi_index(tuple(vox.T.astype(np.int64)), shape)
        if np.any(np.diff(stored) <= 0):
            raise SpecError(f"{name}: voxels must be distinct and in C order", where)
    elif ds.shape[1] == n_grid:
        stored = np.arange(n_grid, dtype=np.int64)
    else:
        raise SpecError(f"{dataset}: {ds.shape[1]} columns but the grid has {n_grid} voxels "
                        "and there is no 'voxels' attribute naming their coordinates", where)
    n = int(ds.shape[0])
    stored_zim = bool(f.attrs.get("zero_is_missing", False))
    counts = (np.asarray(f["n_observed"][...], dtype=np.int32)
              if ours and "n_observed" in f else None)
    grid_layout = ds.ndim == 4
    space = f.attrs.get("space", "")
    space = space.decode("utf-8", "replace") if isinstance(space, bytes) else str(space)
    why = stored_space_problem(space, shape)
    if why is not None:   # found now, not by the export after the whole fit
        raise SpecError(f"attribute 'space' (the input's format, for the maps): {why}", where)
    return n, shape, affine, stored, grid_layout, ours, stored_zim, counts, space


def nothing_observed(analysis_mask: Path | None, masked: bool, reference: str,
                     zero_is_missing: bool) -> UserError:
    """Packing's error when no voxel is observed in any image (inside ``analysis_mask``;
    ``masked``: where the observation masks are non-zero), named by the analysis mask when
    there is one (it names the voxels looked at), else by the first image (``reference``,
    said to be the first of all).  ``mpiblmm check`` gives the same line for observation
    masks that are all 0."""
    values = ("0 (missing while zero_is_missing is true), NaN or Inf" if zero_is_missing
              else "NaN or Inf")
    return UserError("no voxel is observed in any image"
                     + (" inside the analysis mask" if analysis_mask is not None else
                        " (this, the first, and every other)")
                     + (" where its observation mask is non-zero (every mask is 0, NaN or Inf "
                        "wherever its image is observed)" if masked else
                        f": every value is {values}"),
                     str(analysis_mask) if analysis_mask is not None else reference)


def _nothing_observed(path: Path, analysis_mask: Path | None) -> UserError:
    return UserError("no voxel is observed in any observation"
                     + (" inside the analysis mask" if analysis_mask else ""), str(path))


def open_packed(path: Path, dataset: str = "/Y", comm: Any = None,
                analysis_mask: Path | None = None, zero_is_missing: bool = True) -> PackedInput:
    """Collective: describe a packed file and find its candidate voxels.

    Candidate voxels are the stored voxels inside ``analysis_mask`` that are observed at least
    once.  For a file we packed ourselves (every stored voxel observed) with a
    ``zero_is_missing`` at least as strict as now, no data is read; otherwise the ranks share
    one pass over the data.
    """
    path = Path(path)
    n, shape, affine, stored, keep, grid_layout, ours, stored_zim, counts, space = on_root(
        comm, lambda: describe_packed(path, dataset, analysis_mask))
    columns = stored[keep] if grid_layout else keep.astype(np.int64)
    if not (ours and (stored_zim or not zero_is_missing)):
        seen = _observed_columns(path, dataset, n, shape, columns, grid_layout,
                                 zero_is_missing, comm)
        keep, columns = keep[seen], columns[seen]
        counts = None  # stored counts do not apply to a stricter missingness rule
    if keep.size == 0:
        agree(comm, _nothing_observed(path, analysis_mask))
    voxels = np.column_stack(np.unravel_index(stored[keep], shape)).astype(np.int32)
    return PackedInput(path, dataset, n, shape, affine, voxels, columns.astype(np.int64),
                       grid_layout, zero_is_missing, None if counts is None else counts[keep],
                       space)


def _observed_columns(path: Path, dataset: str, n: int, shape: tuple[int, int, int],
                      cols: np.ndarray, grid_layout: bool, zero_is_missing: bool,
                      comm: Any) -> np.ndarray:
    """Collective: boolean (len(cols),) whether each stored column is observed at least once."""
    stub = PackedInput(path, dataset, n, shape, np.eye(4), np.zeros((cols.size, 3), np.int32),
                       cols, grid_layout, zero_is_missing)
    start, stop = _partition(cols.size, comm_size(comm), comm_rank(comm))
    block = max(1, WRITE_BLOCK_BYTES // (8 * max(n, 1)))
    most = -(-cols.size // comm_size(comm))
    out = np.zeros(stop - start, dtype=bool)
    with SlabReader(stub, comm) as reader:
        for b in range(-(-most // block)):
            # one pass over up to 40,000 x 230,000 values: SIGTERM/SIGINT is heard before
            # each collective block (64 MiB per rank), agreed by every rank
            if _stop_agreed(comm, False):
                raise ReadingStopped(path)
            lo = min(stop, start + b * block)
            hi = min(stop, lo + block)
            out[lo - start:hi - start] = np.isfinite(reader.read(lo, hi)).any(axis=1)
    if comm_size(comm) == 1:
        return out
    return np.concatenate(comm.allgather(out))


# --------------------------------------------------------------------------- slab reads
class SlabReader:
    """Reads all observations of runs of candidate voxels; open once, read many times.

    Collective to open and close (every rank of ``comm``).  :meth:`read` with
    ``collective=True`` must be called by every rank the same number of times, also with an
    empty range; with ``collective=False`` each rank reads on its own.
    """

    def __init__(self, packed: PackedInput, comm: Any = None) -> None:
        self.packed = packed
        self.comm = comm
        with no_hang(comm, packed.path, "opening the packed images"):
            self.file = open_h5(packed.path, "r", comm)
            self.dset = self.file[packed.dataset]

    def read(self, start: int, stop: int, collective: bool = True) -> np.ndarray:
        """(stop - start, n) float64 observations of candidate voxels ``[start, stop)``.

        Missing observations are NaN (NaN/Inf, and 0.0 when ``zero_is_missing``).
        """
        with no_hang(self.comm, self.packed.path, "reading the packed images"):
            return self._read(start, stop, collective)

    def _read(self, start: int, stop: int, collective: bool) -> np.ndarray:
        p = self.packed
        n = p.n_observations
        cols = p.columns[start:stop]
        ds = self.dset
        if cols.size == 0:
            read_hyperslab(ds, (0,) * ds.ndim, (0,) * ds.ndim, collective=collective)
            return np.empty((0, n))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        if p.grid_layout:
            plane = p.grid_shape[1] * p.grid_shape[2]
            i0, i1 = c0 // plane, (c1 - 1) // plane + 1
        # float32 is read as stored and widened in the transposing copy below (one pass
        # instead of HDF5's conversion and then a copy); other types HDF5 converts
        dtype = None if ds.dtype in (np.float32, np.float64) else np.float64
        if p.grid_layout:
            plane = p.grid_shape[1] * p.grid_shape[2]
            i0, i1 = c0 // plane, (c1 - 1) // plane + 1
            block = read_hyperslab(ds, (0, i0, 0, 0), (n, i1 - i0) + p.grid_shape[1:],
                                   collective=collective, dtype=dtype)
            block = block.reshape(n, -1)
            base = i0 * plane
        else:
            block = read_hyperslab(ds, (0, c0), (n, c1 - c0), collective=collective,
                                   dtype=dtype)
            base = c0
        idx = cols - base
        out = block[:, idx] if idx.size != block.shape[1] else block
        out = out.T.astype(np.float64, order="C")  # our own (voxels, n) copy
        out[missing(out, p.zero_is_missing)] = np.nan
        return out

    def close(self) -> None:
        with no_hang(self.comm, self.packed.path, "closing the packed images"):
            self.file.close()

    def __enter__(self) -> "SlabReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_slab(packed: PackedInput, start: int, stop: int, comm: Any = None,
              collective: bool = True) -> np.ndarray:
    """Collective: open, read candidate voxels ``[start, stop)`` (voxels x observations), close."""
    with SlabReader(packed, comm) as reader:
        return reader.read(start, stop, collective=collective)
