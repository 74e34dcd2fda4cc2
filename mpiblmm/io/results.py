"""The results file: its layout, slab writes by every rank, and resume bookkeeping.

``docs/RESULTS.md`` is the user's description.  The life of a results file:

1. :func:`create_results` (collective) creates every dataset at full size, filled with NaN
   (floats), 0 (counts) or :data:`STATUS_NOT_PROCESSED` (``status``), writes the voxel
   coordinates and the root attributes with ``complete = False``, and flushes, so a killed job
   leaves a readable file.
2. Each rank calls :meth:`ResultsWriter.write` for runs ``[start, stop)`` of its own voxels as
   it finishes them; by default these are independent writes (a rank writes at its own pace).
   After the values, the run's entries of ``progress/done`` are set to 1: a later run can
   resume by fitting only voxels whose flag is 0 (:meth:`ResultsWriter.pending`), with any
   number of ranks, since the flags are per voxel.  :func:`open_results` reopens a file to
   resume it; it must carry the same ``input_hash`` (the model, settings and data it was
   created for, see :func:`mpiblmm.pipeline.input_hash`).
3. :meth:`ResultsWriter.finish` (collective) flushes, counts voxels per status over the whole
   file, writes the summary attributes (rank 0's values, broadcast, so every rank writes the
   same) and only then ``complete = True``.
4. The export (:func:`mpiblmm.io.export.export_nifti`) writes the maps into ``nifti/``
   beside it, ``maps.json`` last, and then sets ``maps_complete = True`` (false from the
   creation of the file, or from a resume, until then).

Collective rules: see :mod:`mpiblmm.io`.  Every collective step runs inside
:func:`mpiblmm.parallel.no_hang`: an I/O error (disk full, quota, EIO) ends the whole job
with one line rather than unwinding into a collective ``close`` that would wait forever.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mpiblmm import __version__
from mpiblmm.errors import UserError
from mpiblmm.io import (SlabTarget, agree, comm_rank, comm_size, make_dirs, on_root, open_h5,
                        read_hyperslab, write_hyperslab)
from mpiblmm.lmm.model import (F_STATS, STATUS_CODES, STATUS_SINGULAR, T_STATS,
                                dropped_column_voxels, result_datasets)
from mpiblmm.parallel import IOFailure, no_hang

RESULTS_FORMAT = "mpiblmm-results-1"
RESULTS_NAME = "results.h5"
CREATING_SUFFIX = ".creating"  # beside a results file while it is being created


def creating_marker(path: Path) -> Path:
    """The marker that stands beside ``path`` from just before it is created until its first
    flush: a job killed (or out of space) in between leaves a file with no fitted voxel, which
    may not even be readable HDF5; the next fit replaces it (:func:`unfinished_creation`)."""
    return Path(path).with_name(Path(path).name + CREATING_SUFFIX)


def unfinished_creation(path: Path) -> bool:
    """One process: whether ``path`` is a results file whose creation never finished (its
    marker is there and no voxel of it is done), so it holds no work and may be replaced.

    A marker beside a file with done voxels (the marker could not be removed) is removed and
    the file kept.
    """
    marker = creating_marker(path)
    if not marker.exists():
        return False
    try:
        import h5py

        with h5py.File(path, "r", locking=False) as f:
            has_work = bool(np.any(np.asarray(f["progress/done"][...])))
    except Exception:  # noqa: BLE001 - unreadable, or not a results file yet: no work in it
        has_work = False
    if has_work:
        try:
            marker.unlink()
        except OSError:
            pass
    return not has_work


#: ``status`` of a voxel the fit has not reached (yet).
STATUS_NOT_PROCESSED = 255


def status_codes() -> dict[int, str]:
    """The codes written into ``status`` (the estimator's, plus "not processed")."""
    codes = dict(STATUS_CODES)
    codes[STATUS_NOT_PROCESSED] = "not processed (the fit did not reach this voxel)"
    return codes


@dataclass(frozen=True)
class ContrastLayout:
    """A contrast as the results file needs it: ``kind`` "T" or "F", ``L`` rows."""

    name: str
    kind: str
    L: tuple[tuple[float, ...], ...]
    alternative: str = "two-sided"
    sequential: bool = False  # F rows per voxel (mpiblmm.design.Contrast.sequential)

    @property
    def stats(self) -> tuple[str, ...]:
        return T_STATS if self.kind == "T" else F_STATS


@dataclass(frozen=True)
class ResultsLayout:
    """Everything that fixes the shape of a results file (identical on every rank)."""

    n_voxels: int
    fixed_names: tuple[str, ...]
    factors: tuple[tuple[str, tuple[str, ...]], ...]
    contrasts: tuple[ContrastLayout, ...]
    method: str
    grid_shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    spec_text: str = ""

    @classmethod
    def from_design(cls, design: Any, n_voxels: int, grid_shape: Sequence[int],
                    affine: np.ndarray, method: str, spec_text: str = "") -> "ResultsLayout":
        """From a :class:`mpiblmm.design.Design` (read through its attributes only)."""
        return cls(
            n_voxels=int(n_voxels),
            fixed_names=tuple(design.fixed_names),
            factors=tuple((f.name, tuple(f.effect_names)) for f in design.factors),
            contrasts=tuple(ContrastLayout(c.name, c.kind, tuple(map(tuple, np.asarray(c.L).tolist())),
                                           c.alternative, bool(c.sequential))
                            for c in design.contrasts),
            method=method,
            grid_shape=tuple(int(s) for s in grid_shape),  # type: ignore[arg-type]
            affine=tuple(map(tuple, np.asarray(affine, dtype=float).tolist())),
            spec_text=spec_text,
        )

    @property
    def p(self) -> int:
        return len(self.fixed_names)

    def datasets(self) -> dict[str, tuple[tuple[int, ...], str, Any]]:
        """Path -> (shape, dtype, fill value) of every per-voxel dataset, in creation order."""
        V = self.n_voxels
        fills = {"status": STATUS_NOT_PROCESSED, "n": 0, "iterations": 0}
        layout = result_datasets(self.p, [(name, len(e)) for name, e in self.factors],
                                 [(c.name, c.kind) for c in self.contrasts])
        return {path: ((V,) + shape, dtype, fills.get(path, np.nan))
                for path, (shape, dtype) in layout.items()}


def _early() -> Any:
    """Dataset creation properties: space allocated (and filled) when the dataset is made.

    Parallel HDF5 always does so; asking for it on one process too means a full disk or
    quota shows at creation, before any fitting, rather than later in a write that HDF5's
    metadata cache may only report when it is too late to say where.
    """
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _str_array(items: Sequence[str]) -> np.ndarray:
    import h5py

    return np.array(list(items), dtype=h5py.string_dtype())


def create_results(path: Path, layout: ResultsLayout, voxels: np.ndarray,
                   comm: Any = None, input_hash: str = "", space: str = "",
                   input_parts: dict | None = None) -> "ResultsWriter":
    """Collective: create ``path`` with every dataset at full size; return a writer.

    ``voxels`` (V, 3) must be the same on every rank (rank 0's copy is written);
    ``input_hash`` identifies the model and data (checked by :func:`open_results`), and
    ``input_parts`` its parts (stored as JSON; :func:`check_resumable` says which changed);
    ``space`` (the input's format and header codes) is stored with the other attributes, before
    the file's first flush, so a job killed while fitting leaves it in the file.
    """
    path = Path(path)
    voxels = np.asarray(voxels, dtype=np.int32)
    if voxels.shape != (layout.n_voxels, 3):
        raise ValueError(f"voxels has shape {voxels.shape}, layout says ({layout.n_voxels}, 3)")
    make_dirs(path.parent)
    marker = creating_marker(path)
    root = comm_rank(comm) == 0
    if root:
        with no_hang(comm, marker, "creating the results file"):
            marker.write_bytes(b"")  # before rank 0 creates the file (collectively, below)
    with no_hang(comm, path, "creating the results file"):
        f = open_h5(path, "w", comm)
        a = f.attrs
        a["input_hash"] = input_hash
        a["input_parts"] = json.dumps(input_parts or {}, sort_keys=True)
        a["complete"] = False
        a["maps_complete"] = False  # set by the export once nifti/ and maps.json are written
        a["format"] = RESULTS_FORMAT
        a["version"] = __version__
        a["method"] = layout.method
        a["spec"] = layout.spec_text
        a["grid_shape"] = np.asarray(layout.grid_shape, dtype=np.int64)
        a["affine"] = np.asarray(layout.affine, dtype=np.float64)
        if space:
            a["space"] = space
        vox = f.create_dataset("voxels", shape=voxels.shape, dtype="i4")
        f.create_group("random")
        f.create_group("contrasts")
        for name, (shape, dtype, fill) in layout.datasets().items():
            f.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=_early())
        f["status"].attrs["codes"] = json.dumps({str(k): v for k, v in status_codes().items()})
        f["beta"].attrs["names"] = _str_array(layout.fixed_names)
        f["cov_beta"].attrs["names"] = _str_array(layout.fixed_names)
        for name, effects in layout.factors:
            f[f"random/{name}/cov"].attrs["names"] = _str_array(effects)
        for i, c in enumerate(layout.contrasts):
            g = f[f"contrasts/{c.name}"]
            g.attrs["order"] = i        # the spec's (HDF5 lists the groups by name)
            g.attrs["kind"] = c.kind
            g.attrs["weights"] = np.asarray(c.L, dtype=np.float64)
            g.attrs["alternative"] = c.alternative
            if c.sequential:  # lmerTest's anova of a one-term fixed part
                g.attrs["rows"] = ("type I rows of each voxel's own X'X (its observed rows); "
                                   "weights: those of all observations")
        done = f.create_dataset("progress/done", shape=(layout.n_voxels,), dtype="u1", fillvalue=0,
                                dcpl=_early())
        done.attrs["meaning"] = "1 once every result of the voxel is written"
        write_hyperslab(vox, (0, 0), voxels if root else voxels[:0], collective=True)
        f.flush()
    if root:
        try:
            marker.unlink()
        except OSError:
            pass  # unfinished_creation() sees the done voxels and keeps the file
    return ResultsWriter(f, comm, path)


def foreign_file_problem(f: Any, path: Path) -> UserError | None:
    """The error for an open HDF5 file ``f`` that is no mpiblmm results file (its ``format``
    attribute), for ``export`` and ``report``: they called a foreign file or mpiblmm's own
    ``packed.h5`` "incomplete: re-run fit with --resume" (a fault audit); ``None`` for a
    results file."""
    from mpiblmm.io.ingest import PACKED_FORMAT

    fmt = f.attrs.get("format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt == RESULTS_FORMAT:
        return None
    if fmt == PACKED_FORMAT:
        return UserError("not a results file: it is a fit's packed input (the results are in "
                         f"{RESULTS_NAME} of the fit's output folder)", str(path))
    return UserError(f"not an mpiblmm results file (no attribute format = {RESULTS_FORMAT!r})",
                     str(path))


def check_resumable(path: Path, input_hash: str | None = None, input_parts: dict | None = None,
                    where: str = "--resume") -> np.ndarray:
    """One process: check that ``path`` can be resumed; return its ``progress/done`` (V,).

    Raises :class:`UserError` (one line) when the file is unreadable, not a results file, or
    was created for another model or other data (its ``input_hash`` differs; what changed is
    named from its ``input_parts`` and this run's, see :func:`what_changed`).
    """
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:  # the output's lock is ours already
            if f.attrs.get("format") != RESULTS_FORMAT or "progress/done" not in f:
                raise UserError(f"cannot resume {path}: not an mpiblmm results file; use "
                                f"--overwrite to replace it", where)
            stored = f.attrs.get("input_hash", "")
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            if input_hash is not None and stored != input_hash:
                changed = what_changed(stored_parts(f), input_parts or {})
                raise UserError(
                    f"cannot resume {path}: " + (f"since it was written, {changed}" if changed
                                                 else "it was written for another spec or "
                                                 "other data (the model, settings or input "
                                                 "images changed)")
                    + "; use --overwrite to start again", where)
            return np.asarray(f["progress/done"][...], dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"cannot resume {path}: not a readable HDF5 file "
                        f"({describe_error(exc)}); use --overwrite to replace it", where) from None


def _own_layout(f: Any, p: int = 0) -> dict:
    """:func:`~mpiblmm.lmm.model.result_datasets` of the open results file ``f``'s own
    factors (q from their ``cov``, 0 where it is gone) and contrasts (their ``kind``), for
    ``p`` fixed effects: path -> (trailing shape, dtype)."""
    def q(name: str) -> int:
        cov = f.get(f"random/{name}/cov")
        return int(cov.shape[-1]) if getattr(cov, "ndim", 0) else 0

    factors = [(name, q(name)) for name in f.get("random", {})]
    contrasts = [(name, str(f[f"contrasts/{name}"].attrs.get("kind", "T")))
                 for name in f.get("contrasts", {})]
    return result_datasets(p, factors, contrasts)


def missing_datasets(f: Any) -> list[str]:
    """The per-voxel datasets a complete results file holds for its own factors and
    contrasts that the open file ``f`` lacks."""
    return [path for path in _own_layout(f) if path not in f]


def malformed_datasets(f: Any) -> list[str]:
    """The per-voxel datasets of ``f`` whose shape or type is not what the fit writes: one
    row per candidate voxel (``voxels``), the layout's trailing shape for its own p and
    factors, real numbers.  (Replaced by hand, they gave maps of the wrong shape or type.)"""
    if "voxels" not in f or "beta" not in f or f["beta"].ndim != 2:
        return ["voxels" if "voxels" not in f else "beta"]
    V, p = f["voxels"].shape[0], f["beta"].shape[1]
    bad = [] if f["voxels"].shape == (V, 3) and f["voxels"].dtype.kind in "iu" else ["voxels"]
    grid = np.asarray(f.attrs.get("grid_shape", []))
    if not bad and grid.shape == (3,) and V:        # every voxel on the grid
        vox = np.asarray(f["voxels"][...])
        if (vox < 0).any() or (vox >= grid.astype(np.int64)).any():
            bad.append("voxels")
    for path, (shape, _) in _own_layout(f, p).items():
        ds = f.get(path)
        if ds is None:
            continue
        if not hasattr(ds, "shape") or ds.shape != (V,) + shape or ds.dtype.kind not in "fiub":
            bad.append(path)
    return bad


def refuse_missing_datasets(f: Any, path: Path, consequence: str) -> None:
    """One line (:class:`UserError`) when :func:`missing_datasets` or
    :func:`malformed_datasets` finds any: a dataset deleted or replaced by hand after the
    fit.  The export wrote the maps of those left and marked the set complete without a
    word, and the report stopped with a ``KeyError``."""
    for found, what in ((missing_datasets, "missing (removed or renamed after the fit?)"),
                        (malformed_datasets, "not as the fit wrote it (another shape or "
                                             "type: changed after the fit?)")):
        names = found(f)
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise UserError(f"dataset {names[0]!r}{more} {what}: {consequence}; fit again "
                            f"with --overwrite", str(path))


def stored_parts(f: Any) -> dict:
    """The ``input_parts`` of an open results file ({} when absent or unreadable)."""
    raw = f.attrs.get("input_parts", "")
    try:
        parts = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return {}
    return parts if isinstance(parts, dict) else {}


#: How each part of the input (``mpiblmm.pipeline.input_digests``) is named when it changed.
_PART_NAMES = (("data", "the input files changed (an image, mask or packed file was "
                        "written, replaced, added or removed), or zero_is_missing"),
               ("fixed", "the fixed effects changed (X, or the formula's fixed part)"),
               ("random", "the random effects changed (factors, their levels or covariates)"),
               ("contrasts", "the contrasts changed"))


#: The spec's key of each setting in ``input_parts``.
_SETTING_KEYS = {"method": "estimation.method", "tolerance": "estimation.tolerance",
                 "max_iterations": "estimation.max_iterations", "min_n": "missingness.min_n",
                 "min_fraction": "missingness.min_fraction"}


def what_changed(stored: dict, now: dict) -> str:
    """What differs between a results file's ``input_parts`` and this run's, in words
    ("" when either is unknown: a file of an older version, or no parts given).  Another
    number of observations says it all (the data and the design change with it)."""
    if not isinstance(stored, dict) or not stored or not now:
        return ""
    said = []
    if stored.get("version") != now.get("version"):
        said.append(f"mpiblmm changed ({stored.get('version')} -> {now.get('version')})")
    elif stored.get("code") != now.get("code"):  # a development install's code, same version
        said.append(f"mpiblmm's code changed (version {now.get('version')}, sources "
                    f"{stored.get('code') or 'unrecorded'} -> {now.get('code')})")
    if stored.get("observations") != now.get("observations"):
        return "; ".join(said + [f"the number of observations changed "
                                 f"({stored.get('observations')} -> {now.get('observations')})"])
    old, new = stored.get("settings"), now.get("settings")
    if not (isinstance(old, dict) and isinstance(new, dict)):  # a damaged attribute: unknown
        old = new = {}
    for key in sorted(set(old) | set(new)):
        if _setting(old.get(key)) != _setting(new.get(key)):
            said.append(f"{_SETTING_KEYS.get(key, key)} changed ({_setting(old.get(key))} "
                        f"-> {_setting(new.get(key))})")
    said += [words for key, words in _PART_NAMES if stored.get(key) != now.get(key)]
    return "; ".join(said)


def _setting(value: Any) -> str:
    return "default" if value in (None, 0) else str(value)[:40]


#: Bytes the file system of ``results.h5`` must have free before :meth:`ResultsWriter.finish`
#: writes its attributes (they took one 4 KiB page at 2 ranks in an audit's sweep of disk sizes).
FINISH_RESERVE_BYTES = 16 << 10


def free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write in ``folder``'s file system (``None``: unknown,
    :func:`mpiblmm.watchdog.free_blocks`)."""
    import os

    from mpiblmm.watchdog import free_blocks

    try:
        count = free_blocks(folder)
        return None if count is None else count * os.statvfs(folder).f_frsize
    except OSError:
        return None


def describe_error(exc: BaseException) -> str:
    """A short cause for an error of h5py (see :func:`mpiblmm.parallel.describe_io_error`)."""
    from mpiblmm.parallel import describe_io_error

    return describe_io_error(exc)


def open_results(path: Path, comm: Any = None, input_hash: str | None = None,
                 space: str = "") -> "ResultsWriter":
    """Collective: reopen an existing results file to resume writing into it.

    Marks it incomplete until :meth:`ResultsWriter.finish`.  With ``input_hash``, the file
    must have been created for the same model and data (else a :class:`UserError`, on every
    rank together).  ``space`` is written again (a file left by an older version or killed
    before its attributes reached the disk may lack it; the maps' header codes come from it).
    """
    path = Path(path)
    with no_hang(comm, path, "opening the results file"):
        f = open_h5(path, "r+", comm)
        stored = f.attrs.get("input_hash", "")
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        ok = f.attrs.get("format") == RESULTS_FORMAT and (input_hash is None
                                                         or stored == input_hash)
    if not ok:
        with no_hang(comm, path, "closing the results file"):
            f.close()
        agree(comm, UserError("cannot resume: it was written for another spec or other data "
                              "(or is not a results file); use --overwrite to start again",
                              str(path)))
    with no_hang(comm, path, "reopening the results file"):
        f.attrs["complete"] = False
        f.attrs["maps_complete"] = False  # the export that follows the fit rewrites them
        if space:
            f.attrs["space"] = space
        f.flush()
    return ResultsWriter(f, comm, path)


class ResultsWriter:
    """An open results file.  Close it with :meth:`finish` (collective) or :meth:`close`."""

    def __init__(self, file: Any, comm: Any = None, path: Path | None = None) -> None:
        self.file = file
        self.comm = comm
        self.path = Path(file.filename) if path is None else Path(path)
        self.n_voxels = int(file["voxels"].shape[0])
        self._targets: dict[tuple[str, bool], SlabTarget] = {}  # opened once, written per chunk

    def _target(self, name: str, collective: bool) -> SlabTarget:
        key = (name, collective)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = SlabTarget(self.file[name], collective)
        return target

    def write(self, start: int, stop: int, values: Mapping[str, np.ndarray],
              collective: bool = False, done: bool = True) -> None:
        """Write per-voxel results of voxels ``[start, stop)``.

        Parameters
        ----------
        values
            Dataset path -> array whose first axis has ``stop - start`` entries (e.g.
            ``"beta"``, ``"random/subject/cov"``, ``"contrasts/age/t"``).  Missing paths keep
            their fill values.
        collective
            Collective transfers: then every rank calls ``write`` the same number of times
            with the same keys (an empty range on a rank with nothing to write).
        done
            Mark the voxels done in ``progress/done`` after writing the values.
        """
        if not 0 <= start <= stop <= self.n_voxels:
            raise ValueError(f"write({start}, {stop}) outside 0..{self.n_voxels}")
        with no_hang(self.comm, self.path, "writing results"):
            self._write(start, stop, values, collective, done)

    def _write(self, start: int, stop: int, values: Mapping[str, np.ndarray],
               collective: bool, done: bool) -> None:
        for name in sorted(values):
            target = self._target(name, collective)
            data = np.asarray(values[name])
            if data.shape != (stop - start,) + target.shape[1:]:
                raise ValueError(f"{name}: shape {data.shape} for voxels [{start}, {stop}), "
                                 f"expected {(stop - start,) + target.shape[1:]}")
            target.write(start, data)
        if done:
            self._target("progress/done", collective).write(
                start, np.ones(stop - start, dtype=np.uint8))

    def pending(self, start: int, stop: int, collective: bool = False) -> np.ndarray:
        """Boolean (stop - start,): which voxels of ``[start, stop)`` are not written yet."""
        with no_hang(self.comm, self.path, "reading progress/done"):
            done = read_hyperslab(self.file["progress/done"], (start,), (stop - start,),
                                  collective=collective)
        return done == 0

    def status_counts(self) -> dict[int, int]:
        """Collective: number of voxels per status code over the whole file."""
        return self.tally()[0]

    def tally(self) -> tuple[dict[int, int], float, float, int]:
        """Collective: voxels per status code; the sum and maximum of ``iterations`` over
        fitted voxels (status <= singular); and how many fitted voxels have a NaN ``beta``
        (columns dropped where their observed rows left X rank deficient), over the whole
        file (so also after a resume)."""
        from mpiblmm.parallel import partition

        with no_hang(self.comm, self.path, "flushing results"):
            self.file.flush()  # makes every rank's independent writes visible (MPI-IO sync)
        if self.comm is not None:
            self.comm.Barrier()
        size, rank = comm_size(self.comm), comm_rank(self.comm)
        s = partition(self.n_voxels, size, rank)
        with no_hang(self.comm, self.path, "reading results"):
            status = read_hyperslab(self.file["status"], (s.start,), (s.stop - s.start,),
                                    collective=True)
            its = read_hyperslab(self.file["iterations"], (s.start,), (s.stop - s.start,),
                                 collective=True)
            beta = read_hyperslab(self.file["beta"], (s.start, 0),
                                  (s.stop - s.start, self.file["beta"].shape[1]),
                                  collective=True)
        counts = np.bincount(status, minlength=256).astype(np.int64)
        is_fitted = status <= STATUS_SINGULAR
        fitted = its[is_fitted].astype(np.float64)
        it_sum, it_max = float(fitted.sum()), float(fitted.max()) if fitted.size else 0.0
        dropped = dropped_column_voxels(beta, status)
        if size > 1:
            from mpi4py import MPI

            from mpiblmm.parallel import allreduce_counts

            counts = allreduce_counts(self.comm, counts)
            it_sum = self.comm.allreduce(it_sum, op=MPI.SUM)
            it_max = self.comm.allreduce(it_max, op=MPI.MAX)
            dropped = self.comm.allreduce(dropped, op=MPI.SUM)
        return {int(k): int(counts[k]) for k in np.flatnonzero(counts)}, it_sum, it_max, dropped

    def finish(self, summary: Mapping[str, Any] | None = None,
               counts: dict[int, int] | None = None) -> dict[int, int]:
        """Collective: write summaries, then ``complete = True``, and close the file.

        Parameters
        ----------
        summary
            JSON-serialisable facts (timers, settings); rank 0's value is broadcast, so
            ranks may pass different values (or ``None``).
        counts
            The status counts of a :meth:`tally` made after the last write (``None``: count
            them now), so the file is not read twice.

        Returns
        -------
        dict
            Voxels per status code (also stored as the root attribute ``status_counts``).
        """
        counts = self.status_counts() if counts is None else counts
        if self.comm is not None and comm_size(self.comm) > 1:
            summary = self.comm.bcast(summary, root=0)
        free = on_root(self.comm, lambda: free_bytes(self.path.parent))
        if free is not None and free < FINISH_RESERVE_BYTES:
            # parallel HDF5 stopped by a full disk in these metadata writes left a file no
            # HDF5 library could open (a fault audit, 2-3 ranks): the fit's work lost
            self.close()
            agree(self.comm, IOFailure(
                f"only {free // 1024} KiB free on its file system, too little to finish it "
                "(every voxel is written, not yet marked complete): free space, then run "
                "the same command with --resume", str(self.path)))
        with no_hang(self.comm, self.path, "finishing the results file"):
            a = self.file.attrs
            a["status_counts"] = json.dumps({str(k): v for k, v in counts.items()})
            a["summary"] = json.dumps(dict(summary or {}), sort_keys=True, default=str)
            self.file.flush()  # everything, on every rank, before complete is set
            a["complete"] = True
            self.file.flush()
            self._targets.clear()
            self.file.close()
        return counts

    def close(self) -> None:
        """Collective: flush and close without marking complete (e.g. after a stop)."""
        with no_hang(self.comm, self.path, "closing the results file"):
            self.file.flush()
            self._targets.clear()
            self.file.close()
