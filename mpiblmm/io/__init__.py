"""HDF5 and NIfTI input/output: packed images, the results file, NIfTI maps.  No statistics.

How parallel HDF5 is used everywhere in ``mpiblmm.io`` (the one place that says it):

- A file written by several ranks is opened with :func:`open_h5` on every rank of the
  communicator (``driver="mpio"``).  Everything that changes the file's *structure*
  (creating groups and datasets, writing attributes, resizing) is collective: every rank
  makes the same calls in the same order with the same arguments and values.  Our writers
  therefore compute structure and attribute values identically on all ranks (or broadcast
  them from rank 0 first).  Datasets are created full size with their fill values before any
  data is written, so data writes never change the structure.
- Raw data is read and written with :func:`read_hyperslab` / :func:`write_hyperslab`.
  ``collective=True`` makes the transfer collective: every rank must call it the same number
  of times, also a rank whose selection is empty (it then selects nothing, which HDF5
  accepts; h5py's high-level slicing skips empty selections and hangs the job, h5py issue
  965, which is why these helpers use the low-level API).  ``collective=False`` is an
  independent transfer that a rank may make on its own, at its own pace.
- Without MPI (``comm`` is ``None`` or h5py lacks MPI) the same code runs on one process with
  the default driver, so tests and small studies need no MPI at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mpiblmm.errors import UserError

#: HDF5 file format bounds: 1.8 and newer, so attributes may exceed 64 KiB (the spec text).
LIBVER = ("v108", "latest")


def comm_size(comm: Any) -> int:
    """Number of ranks of ``comm`` (1 for ``None``)."""
    return 1 if comm is None else int(comm.Get_size())


def comm_rank(comm: Any) -> int:
    """Rank in ``comm`` (0 for ``None``)."""
    return 0 if comm is None else int(comm.Get_rank())


def agree(comm: Any, error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank has a user error (the lowest rank's message).

    On one process (``comm`` ``None`` or of size 1) ``error`` itself is raised.
    """
    if comm_size(comm) == 1:
        if error is not None:
            raise error
        return
    from mpiblmm.parallel import agree_on_user_error

    agree_on_user_error(comm, error)


def on_root(comm: Any, fn: Callable[[], Any]) -> Any:
    """Collective: run ``fn`` on rank 0 only, agree on its user error, broadcast its value."""
    value, error = None, None
    if comm_rank(comm) == 0:
        try:
            value = fn()
        except UserError as exc:
            error = exc
    agree(comm, error)
    return value if comm_size(comm) == 1 else comm.bcast(value, root=0)


def parallel_h5() -> bool:
    """True when h5py was built with MPI (parallel HDF5)."""
    import h5py

    return bool(h5py.get_config().mpi)


def open_h5(path: str | os.PathLike, mode: str, comm: Any = None) -> Any:
    """Open an HDF5 file for all ranks of ``comm`` (``mpio``), or serially.

    With ``comm`` of size > 1 h5py must support MPI; otherwise a ``RuntimeError`` (an
    installation problem, not a user error).  Collective: every rank of ``comm`` calls it.
    A serial open does not use HDF5's file locking, as MPI-IO does not: the output folder's
    lock (:mod:`mpiblmm.io.lock`) keeps other writers out, and a reader holding the file
    open (h5py, h5dump, HDFView) must not make a one-rank fit fail where more ranks do not.
    """
    import h5py

    if comm_size(comm) > 1:
        if not parallel_h5():
            raise RuntimeError("h5py was built without MPI: run scripts/setup.sh to build it "
                               "against parallel HDF5")
        return h5py.File(path, mode, driver="mpio", comm=comm, libver=LIBVER)
    kwargs = {"libver": LIBVER} if mode != "r" else {}
    try:
        return h5py.File(path, mode, locking=False, **kwargs)
    except TypeError:  # older h5py without the locking argument
        return h5py.File(path, mode, **kwargs)


def _dxpl(dset: Any, collective: bool) -> Any:
    import h5py

    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    if collective and dset.file.driver == "mpio":  # a serial file has no collective mode
        dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    return dxpl


def _spaces(dset: Any, start: Sequence[int], count: Sequence[int]) -> tuple[Any, Any, bool]:
    import h5py

    start = tuple(int(s) for s in start)
    count = tuple(int(c) for c in count)
    if len(start) != dset.ndim or len(count) != dset.ndim:
        raise ValueError(f"hyperslab of rank {len(start)} on a dataset of rank {dset.ndim}")
    fspace = dset.id.get_space()
    empty = any(c == 0 for c in count)
    if empty:
        fspace.select_none()
        mspace = h5py.h5s.create_simple((1,))
        mspace.select_none()
    else:
        fspace.select_hyperslab(start, count)
        mspace = h5py.h5s.create_simple(count)
    return fspace, mspace, empty


def read_hyperslab(dset: Any, start: Sequence[int], count: Sequence[int],
                   collective: bool = False, dtype: Any = None) -> np.ndarray:
    """Read the block ``start .. start+count`` of ``dset`` (any count may be 0).

    Parameters
    ----------
    dset
        An h5py dataset.
    start, count
        Corner and extent, one entry per dimension.
    collective
        Collective transfer (every rank of the file's communicator calls, see module doc).
    dtype
        Memory dtype (default the dataset's); HDF5 converts.
    """
    fspace, mspace, empty = _spaces(dset, start, count)
    dtype = np.dtype(dset.dtype if dtype is None else dtype)
    out = np.empty(tuple(int(c) for c in count), dtype=dtype)
    buf = np.empty((1,), dtype=dtype) if empty else out
    dset.id.read(mspace, fspace, buf, dxpl=_dxpl(dset, collective))
    return out


def write_hyperslab(dset: Any, start: Sequence[int], data: np.ndarray,
                    collective: bool = False) -> None:
    """Write ``data`` into ``dset`` at ``start`` (``data`` may be empty); see :func:`read_hyperslab`."""
    data = np.ascontiguousarray(data, dtype=dset.dtype)
    if data.ndim != dset.ndim:
        raise ValueError(f"writing a {data.ndim}-d block into a {dset.ndim}-d dataset {dset.name}")
    fspace, mspace, empty = _spaces(dset, start, data.shape)
    buf = np.zeros((1,), dtype=dset.dtype) if empty else data
    dset.id.write(mspace, fspace, buf, dxpl=_dxpl(dset, collective))


class SlabTarget:
    """One dataset written many times along its first axis (e.g. a results dataset once
    per chunk): what :func:`write_hyperslab` looks up on every call (the dataset's
    identifier, shape and dtype, the transfer properties) is looked up once.  h5py's
    high-level lookups cost ~0.2 ms per dataset and write, i.e. ~6 ms per chunk for the
    ~30 datasets of a results file; the low-level calls left cost a few microseconds."""

    def __init__(self, dset: Any, collective: bool = False) -> None:
        self.id = dset.id
        self.name = dset.name
        self.shape = tuple(int(s) for s in dset.shape)
        self.dtype = np.dtype(dset.dtype)
        self.dxpl = _dxpl(dset, collective)

    def write(self, start: int, data: np.ndarray) -> None:
        """Write ``data`` (first axis: rows ``start ..``; may be empty) into the dataset."""
        import h5py

        data = np.ascontiguousarray(data, dtype=self.dtype)
        if data.shape[1:] != self.shape[1:]:
            raise ValueError(f"writing a block of shape {data.shape} into {self.name} "
                             f"of shape {self.shape}")
        fspace = self.id.get_space()
        if data.shape[0] == 0 or 0 in self.shape[1:]:
            fspace.select_none()
            mspace = h5py.h5s.create_simple((1,))
            mspace.select_none()
            data = np.zeros((1,), dtype=self.dtype)
        else:
            fspace.select_hyperslab((int(start),) + (0,) * (len(self.shape) - 1), data.shape)
            mspace = h5py.h5s.create_simple(data.shape)
        self.id.write(mspace, fspace, data, dxpl=self.dxpl)


def make_dirs(path: str | os.PathLike, where: str | None = None) -> None:
    """Create a folder (and parents) if missing; safe when several ranks do it at once.

    Raises :class:`UserError` (naming ``where``, e.g. the spec key) when the folder cannot be
    created, is not a folder, or cannot be written to.  :func:`folder_problem` predicts the
    same error without creating anything (``mpiblmm check``).
    """
    path = Path(path)
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise _not_a_folder(path, where) from None
    except OSError as exc:
        raise _cannot_create(path, exc.strerror, where) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _cannot_write(path, where)


def folder_problem(path: str | os.PathLike, where: str | None = None) -> UserError | None:
    """The :class:`UserError` :func:`make_dirs` would raise for ``path``, found without creating
    anything (``None`` when it would succeed, as far as the file system tells beforehand):
    ``path`` is a file, lies under a file, or its folder (or the nearest existing folder
    above it) cannot be written to or is on a read-only file system."""
    import errno

    path = Path(path)
    if path.is_dir():
        return None if os.access(path, os.W_OK | os.X_OK) else _cannot_write(path, where)
    if path.exists() or path.is_symlink():
        return _not_a_folder(path, where)
    above = path.parent
    while not (above.exists() or above.is_symlink()) and above != above.parent:
        above = above.parent
    if above.is_symlink() and not above.exists():      # a dangling link: makedirs gives ENOENT
        return _cannot_create(path, os.strerror(errno.ENOENT), where)
    if not above.is_dir():
        return _cannot_create(path, os.strerror(errno.ENOTDIR), where)
    try:
        read_only = bool(os.statvfs(above).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return _cannot_create(path, os.strerror(errno.EROFS), where)
    if not os.access(above, os.W_OK | os.X_OK):
        return _cannot_create(path, os.strerror(errno.EACCES), where)
    return None


def maps_folder_problem(output: str | os.PathLike, where: str | None = None) -> UserError | None:
    """The error for an output folder whose ``nifti`` (where the maps go) is there but not a
    folder, found before the fit rather than after it (a fault audit: results complete, maps
    refused at the end); ``None`` otherwise (missing: the export makes it)."""
    maps = Path(output) / "nifti"
    if (maps.exists() or maps.is_symlink()) and not maps.is_dir():
        return UserError(f"{maps} exists and is not a folder: the maps are written there; "
                         "move it away", where)
    return None


def _not_a_folder(path: Path, where: str | None) -> UserError:
    return UserError(f"{path} exists and is not a folder", where)


def _cannot_create(path: Path, why: str | None, where: str | None) -> UserError:
    return UserError(f"cannot create the folder {path} ({why})", where)


def _cannot_write(path: Path, where: str | None) -> UserError:
    try:  # os.access says "no" alike for a read-only mount and for missing permission
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "read-only file system" if read_only else "permission denied"
    return UserError(f"cannot write into the folder {path} ({why})", where)
