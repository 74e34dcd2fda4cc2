"""results.h5 -> maps (``mpiblmm export``), from the HDF5 file alone.

One map file per dataset, in the input's format: compressed NIfTI on the input grid with the
input's qform and sform (matrices and codes) and voxel sizes (the results file's ``space``
attribute), intent NONE except for z, p and q maps (:data:`DERIVED_INTENTS`) and an AFNI
extension naming the volumes under an ID code of its own, or for surface studies
``.func.gii`` / ``.dscalar.nii`` (:mod:`mpiblmm.io.surface`).  ``docs/RESULTS.md`` lists them.
Integer maps (``n``, ``iterations``, ``mask``) keep their integer dtype and hold 0 outside the
candidate voxels; ``status`` holds :data:`~mpiblmm.io.derived.STATUS_NOT_ANALYSED` (8) there;
float maps keep float64 and hold NaN there.  ``beta`` and ``random_<factor>`` are 4-D (the
random-effect covariance as its lower triangle, column by column).  Derived maps, computed
from stored datasets only (:mod:`mpiblmm.io.derived`): ``mask`` (1 where a model was fitted,
status 0-2), ``con_<name>_z`` (z with the contrast's p; signed by the estimate for two-sided T
contrasts) and, with ``fdr=True``, ``con_<name>_q`` (Benjamini-Hochberg q over fitted voxels).
A ``maps.json`` beside them names every file and its volumes.

With a communicator of several ranks the maps are shared round-robin; each rank opens the
results file read-only on its own (no collective I/O) and writes its maps.

Atomic maps: each map is written under a temporary name and renamed
(:func:`mpiblmm.io.nifti.save_map`).  A failure (disk full, a corrupt results file) or a
SIGTERM/SIGINT between maps removes this process's temporary files, every rank agrees on the
outcome, and it ends as one line (exit 4 for a failed write, 2 for an unreadable file, 3 for
a signal); temporary files of a process that was killed outright are removed by the next
export into the same folder, so ``export`` can always be rerun.

Complete maps: an export first records the maps it is about to write (with those the earlier
``maps.json`` listed) in ``maps.pending.json``, then removes the folder's ``maps.json`` and
writes it again last, once every map is in place, so a ``maps.json`` vouches for the maps
beside it; the maps the earlier lists named that this export did not write (q maps, dropped
contrasts) are removed just before, and the pending list just after.  An export that is
stopped, fails or is killed leaves the pending list, so its maps are still known to the next
export and to ``fit --overwrite`` (:func:`forget_maps`), which remove them.  Exporting
into the ``nifti/`` folder beside the results file (what ``fit`` does) also records it in
the results file's root attribute ``maps_complete``: false while the maps are written,
true once ``maps.json`` is (:func:`maps_state` reads both).

One writer per folder: ``mpiblmm export`` holds the lock of the folder it writes into
(:func:`lock_folder`: for ``<output>/nifti`` the output folder's, the lock ``fit`` holds), and
refuses the ``nifti/`` folder beside another results file, whose ``maps_complete`` would go on
vouching for maps replaced by those of another fit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mpiblmm import interrupt
from mpiblmm.errors import UserError
from mpiblmm.io import agree, comm_rank, comm_size, make_dirs
from mpiblmm.io.derived import (NOT_ANALYSED_MEANING, STATUS_NOT_ANALYSED, bh_qvalues,
                                z_from_neglog10p)
from mpiblmm.io.images import stored_space_problem
from mpiblmm.io.nifti import save_map
from mpiblmm.io.results import RESULTS_NAME, foreign_file_problem, refuse_missing_datasets
from mpiblmm.parallel import (INTERRUPTED_EXIT_CODE, IOFailure, describe_io_error,
                              world_if_parallel)

#: Temporary names of maps being written (``.<stem>.tmp<pid><suffix>``, see
#: ``nifti._atomic_save``).
TMP_PATTERN = re.compile(r"^\.(?P<stem>.+)\.tmp(?P<pid>\d+)(\.nii(\.gz)?|\.func\.gii|\.dscalar\.nii)$")


class ExportStopped(Exception):
    """The export stopped at SIGTERM/SIGINT (raised on every rank together)."""


def remove_tmp_files(folder: Path, only_pid: int | None = None) -> None:
    """Remove the temporary maps in ``folder`` of process ``only_pid``, or (``None``) of
    every process of this host that no longer runs (left by an export that was killed)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = TMP_PATTERN.match(name)
        if not m:
            continue
        pid = int(m.group("pid"))
        if only_pid is not None and pid != only_pid:
            continue
        if only_pid is None and _alive(pid):
            continue
        try:
            os.unlink(Path(folder) / name)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

#: Highest status code of a voxel that holds a fit (converged, iteration cap, singular).
FITTED_MAX_STATUS = 2
#: File ending of the maps per input format (the ``format`` of the results' ``space``).
MAP_SUFFIX = {"nifti": ".nii.gz", "gifti": ".func.gii", "cifti": ".dscalar.nii"}
#: NIfTI intents of the contrast maps whose intent holds at every voxel, by statistic: z
#: maps (``z score``), q and p maps (``p value``).  Every other map has intent NONE, the
#: input's intent is never copied (a "t test (12)" input would label beta, p and status
#: maps t maps), and t and F maps get no t/F intent: their Satterthwaite df vary by voxel,
#: which one intent parameter cannot say (a viewer would compute p from the wrong df).
DERIVED_INTENTS = {"z": "z score", "q": "p value", "p": "p value"}


@dataclass(frozen=True)
class MapSpec:
    """One output map: file stem, source dataset, volume names, how to flatten each voxel."""

    stem: str
    dataset: str
    volumes: tuple[str, ...]
    lower_triangle: bool = False
    derive: str = ""  # "", "mask", "z" or "q": computed from ``dataset`` at export
    meaning: str = ""  # what a derived map holds, for maps.json (z: by the contrast's test)


def vech_indices(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the lower triangle of a q x q matrix, column by column."""
    cols, rows = np.triu_indices(q)  # (col, row) pairs with row >= col, ordered by col
    return rows, cols


def list_maps(f: Any, fdr: bool = False) -> list[MapSpec]:
    """The maps of a results file, in a fixed order (with q-value maps if ``fdr``)."""
    out = []
    beta_names = [str(x) for x in f["beta"].attrs.get("names", [])] or \
        [f"x{j}" for j in range(f["beta"].shape[1])]
    out.append(MapSpec("beta", "beta", tuple(beta_names)))
    for name in ("sigma2", "llh", "n", "status", "iterations"):
        if name in f:
            out.append(MapSpec(name, name, (name,)))
    out.append(MapSpec("mask", "status", ("mask",), derive="mask"))
    for factor in f.get("random", {}):
        ds = f[f"random/{factor}/cov"]
        effects = [str(x) for x in ds.attrs.get("names", [])] or [f"z{e}" for e in range(ds.shape[1])]
        rows, cols = vech_indices(ds.shape[1])
        vols = tuple(f"cov({effects[r]},{effects[c]})" for r, c in zip(rows, cols))
        out.append(MapSpec(f"random_{factor}", f"random/{factor}/cov", vols,
                           lower_triangle=True))
    for con in f.get("contrasts", {}):
        for stat in f[f"contrasts/{con}"]:
            out.append(MapSpec(f"con_{con}_{stat}", f"contrasts/{con}/{stat}", (stat,)))
        if "neglog10p" in f[f"contrasts/{con}"]:
            group = f[f"contrasts/{con}"]
            kind = str(group.attrs.get("kind", "F" if "F" in group else "T"))
            out.append(MapSpec(f"con_{con}_z", f"contrasts/{con}/neglog10p", ("z",), derive="z",
                               meaning=z_meaning(kind, str(group.attrs.get("alternative",
                                                                           "two-sided")))))
            if fdr:
                out.append(MapSpec(f"con_{con}_q", f"contrasts/{con}/p", ("q",), derive="q"))
    return out


def z_meaning(kind: str, alternative: str) -> str:
    """What a contrast's z map holds (:func:`~mpiblmm.io.derived.z_from_neglog10p`), for
    ``maps.json``: its sign and tail follow the test."""
    if kind == "F":
        return ("standard normal z with the F test's p, upper tail (FSL's zfstat): z > 0 "
                "where p < 0.5; not signed by any effect")
    if alternative == "greater":
        return "standard normal z with the one-sided p (greater), z = isf(p)"
    if alternative == "less":
        return ("standard normal z with the one-sided p (less), z = -isf(p): negative where "
                "the estimate is significantly below 0")
    return ("standard normal z with the two-sided p, signed by the estimate: "
            "z = sign(estimate) isf(p / 2)")


def contrast_z(group: Any, neglog10p: np.ndarray | None = None) -> np.ndarray:
    """A contrast group's z per voxel (:func:`~mpiblmm.io.derived.z_from_neglog10p`, from its
    kind, alternative, estimate, t and df), for the maps and the report alike;
    ``neglog10p``: the group's, when already read."""
    kind = str(group.attrs.get("kind", "F" if "F" in group else "T"))
    sign = np.asarray(group["estimate"][...]) if "estimate" in group else None
    t, df = ((np.asarray(group[k][...]) for k in ("t", "df")) if "t" in group and "df" in group
             else (None, None))
    if neglog10p is None:
        neglog10p = np.asarray(group["neglog10p"][...])
    return z_from_neglog10p(neglog10p, kind, str(group.attrs.get("alternative", "two-sided")),
                            sign, t, df)


def map_values(f: Any, m: MapSpec) -> np.ndarray:
    """Per-voxel values (V,) or (V, k) of map ``m``, read or derived from the results file."""
    if m.derive == "mask":
        return (np.asarray(f["status"][...]) <= FITTED_MAX_STATUS).astype(np.uint8)
    data = np.asarray(f[m.dataset][...])
    if m.lower_triangle:
        rows, cols = vech_indices(data.shape[1])
        return data[:, rows, cols]
    if m.derive == "z":  # FSL's zstat/zfstat: the normal z with the same p
        return contrast_z(f[m.dataset].parent, data)
    if m.derive == "q":
        fitted = np.asarray(f["status"][...]) <= FITTED_MAX_STATUS
        return bh_qvalues(data, fitted)
    return data


def map_source(f: Any, m: MapSpec) -> Any:
    """What :class:`ScatteredMap` reads map ``m`` from: the results file's dataset itself
    where the map is the dataset as stored (read a group of volumes at a time), else its
    :func:`map_values`."""
    if not m.derive and not m.lower_triangle:
        return f[m.dataset]
    return map_values(f, m)


def map_intent(m: MapSpec) -> str:
    """The NIfTI intent of map ``m``: :data:`DERIVED_INTENTS` for contrast z, q and p maps,
    else ``"none"``."""
    if m.dataset.startswith("contrasts/") and len(m.volumes) == 1:
        return DERIVED_INTENTS.get(m.volumes[0], "none")
    return "none"


def map_idcode(results: Path, input_hash: str, file_name: str) -> str:
    """The AFNI ID code of map ``file_name`` exported from ``results``: a hash of the results
    file's absolute path, its ``input_hash`` and the map's name, so every map of a study
    has its own and a re-export gives the same (no clock, no randomness)."""
    from mpiblmm.io.nifti import afni_idcode

    return afni_idcode(f"{Path(os.path.abspath(results))}\0{input_hash}\0{file_name}")


def map_info(m: MapSpec, codes: dict[str, str]) -> dict[str, Any]:
    """The ``maps.json`` entry of a map: source dataset, volume names, derivation, codes."""
    entry: dict[str, Any] = {"dataset": m.dataset, "volumes": list(m.volumes)}
    if m.derive:
        entry["derived"] = {"mask": "1 where a model was fitted (status 0, 1 or 2), else 0",
                            "z": "standard normal z with the contrast's p",
                            "q": "Benjamini-Hochberg FDR q-value over the fitted voxels"}[m.derive]
        if m.meaning:
            entry["derived"] = m.meaning
    if m.stem == "status":
        entry["codes"] = codes
    return entry


def _open(results: Path) -> Any:
    import h5py

    try:
        try:
            return h5py.File(results, "r", locking=False)
        except TypeError:  # older h5py without the locking argument
            return h5py.File(results, "r")
    except (OSError, ValueError) as exc:
        raise UserError(f"not a readable results file ({exc})", str(results)) from None


def _maps_failed(results: Path) -> str:
    """The end of a failed map write's message: the results are complete and how to get the
    maps (a fault audit: on a full disk it said only "(while writing maps)", and a user might
    fit again with --overwrite)."""
    return (f"(while writing maps; {results} is complete: free space or fix the folder, then "
            f"run `mpiblmm export {results}`)")


def _foreign_file(results: Path) -> UserError | None:
    """:func:`~mpiblmm.io.results.foreign_file_problem` of ``results``, if it opens (else the
    export's own open says why)."""
    if not results.is_file():
        return None
    try:
        f = _open(results)
    except UserError:
        return None
    with f:
        return foreign_file_problem(f, results)


def _check(f: Any, results: Path) -> None:
    if (problem := foreign_file_problem(f, results)) is not None:
        raise problem
    if not bool(f.attrs.get("complete", False)):
        raise UserError("the results are incomplete (attribute 'complete' is not true): the "
                        "fit did not finish; re-run `mpiblmm fit` on the spec with --resume to "
                        "finish it (the voxels done are kept)", str(results))
    for name in ("voxels", "beta", "status"):
        if name not in f:
            raise UserError(f"not a results file: dataset {name!r} is missing", str(results))
    refuse_missing_datasets(f, results, "its maps cannot be written")


def volume(values: np.ndarray, voxels: np.ndarray, grid_shape: tuple[int, ...],
           fill: Any = None) -> np.ndarray:
    """Scatter per-voxel ``values`` (V,) or (V, k) into a 3-D or 4-D grid at ``voxels``, (V, 3)
    grid indices or (V,) flat C-order ones (:func:`flat_voxels`: the export's, made once).

    Outside the voxels: ``fill``, by default 0 for integer dtypes and NaN for floats.
    """
    values = np.asarray(values)
    if fill is None:
        fill = np.nan if values.dtype.kind == "f" else 0
    flat = voxels if voxels.ndim == 1 else flat_voxels(voxels, grid_shape)
    out = np.full((int(np.prod(grid_shape)),) + values.shape[1:], fill, dtype=values.dtype)
    out[flat] = values
    return out.reshape(tuple(grid_shape) + values.shape[1:])


def flat_voxels(voxels: np.ndarray, grid_shape: tuple[int, ...]) -> np.ndarray:
    """(V,) flat C-order indices of the (V, 3) grid indices ``voxels``: one int64 array, where
    indexing by the three columns made int64 copies of each for every map (a memory audit:
    with the indices read as int64, 41 MiB of an unmasked 2 mm grid's export)."""
    return np.ravel_multi_index(tuple(np.asarray(voxels).T), tuple(grid_shape))


#: Bytes of a map's per-voxel values read from the results file at once: a wide map (beta of
#: many columns over an unmasked grid) is read in groups of volumes, not whole.
VALUES_READ_BYTES = 32 * 2**20


class ScatteredMap:
    """A map as its per-voxel values (V,) or (V, k) -- an array, or the results file's
    dataset, read a group of volumes at a time (at most :data:`VALUES_READ_BYTES`) -- and the
    3-D or 4-D grid they go into: ``shape``, ``dtype`` and :meth:`volume` for the NIfTI
    writer, which writes a volume at a time; the whole grid only where asked
    (``np.asarray``: the surface formats)."""

    def __init__(self, values: Any, voxels: np.ndarray, grid_shape: tuple[int, ...],
                 fill: Any = None, results: Path | None = None) -> None:
        self.values, self.voxels, self.grid_shape, self.fill = values, voxels, grid_shape, fill
        self.results = results          # named when reading the values fails
        self.dtype = np.dtype(values.dtype)
        self.shape = tuple(grid_shape) + tuple(values.shape[1:])
        self._group: tuple[int, int, np.ndarray] | None = None

    def volume(self, k: int) -> np.ndarray:
        """The k-th volume (3-D), outside the voxels ``fill`` as :func:`volume`."""
        if len(self.values.shape) == 1:
            return volume(self._read(...), self.voxels, self.grid_shape, self.fill)
        if self._group is None or not self._group[0] <= k < self._group[1]:
            per = max(1, VALUES_READ_BYTES // max(1, self.values.shape[0] * self.dtype.itemsize))
            stop = min(self.values.shape[1], k + per)
            self._group = (k, stop, self._read((slice(None), slice(k, stop))))
        return volume(self._group[2][:, k - self._group[0]], self.voxels, self.grid_shape,
                      self.fill)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = volume(self._read(...), self.voxels, self.grid_shape, self.fill)
        return out if dtype is None else out.astype(dtype)

    def _read(self, index: Any) -> np.ndarray:
        try:
            return np.asarray(self.values[index])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise UserError(f"not a readable results file ({describe_io_error(exc)})",
                            str(self.results)) from None


def write_map(target: Path, data: Any, affine: np.ndarray, space: str,
              names: tuple[str, ...], description: str, intent: str | None = None,
              idcode: str | None = None) -> None:
    """The one place a map file is written (atomically, by the format writers): NIfTI
    volumes (intent ``intent``, NONE by default; AFNI ID code ``idcode``), or per-vertex
    GIfTI/CIFTI maps for surface studies (grid ``(N, 1, 1)``)."""
    fmt = json.loads(space).get("format", "nifti") if space else "nifti"
    if fmt == "nifti":
        save_map(target, data, affine, description=description, space=space, intent=intent,
                 labels=names, idcode=idcode)
    else:
        from mpiblmm.io.surface import save_surface_map

        data = np.asarray(data)
        save_surface_map(target, data.reshape(data.shape[0], -1), space, names, description,
                         intent)


def export_nifti(results_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 comm: Any = None, fdr: bool = False) -> list[Path]:
    """Write every map of a complete results file as ``<out_dir>/<map>.nii.gz`` (or, for a
    surface study, ``.func.gii`` / ``.dscalar.nii``).

    Parameters
    ----------
    results_path
        The results file.
    out_dir
        Output folder (default ``nifti/`` beside the results file); created if missing.
    comm
        Communicator to share the maps over (``None``: this process writes them all).
        Collective when given: every rank calls.
    fdr
        Also write Benjamini-Hochberg q-value maps ``con_<name>_q`` for every contrast.

    Returns
    -------
    list of Path
        The maps this rank wrote.

    Raises
    ------
    UserError
        On every rank, for a missing, unreadable or incomplete results file.
    """
    results = Path(results_path)
    out = results.parent / "nifti" if out_dir is None else Path(out_dir)
    size, rank = comm_size(comm), comm_rank(comm)
    beside = is_default_maps_folder(results, out)  # the folder ``maps_complete`` speaks of
    # Another fit's maps folder: its results file would go on vouching for maps replaced here.
    agree(comm, _foreign_folder_error(results, out) if rank == 0 else None)
    if rank == 0 and beside and results.is_file():  # being (re)written: not complete yet
        _mark_maps(results, False)
    if size > 1:
        comm.Barrier()  # before any rank opens the file to read it
    error, f = None, None
    maps: list[MapSpec] = []
    suffix = MAP_SUFFIX["nifti"]
    try:
        if not results.is_file():
            raise UserError("file not found", str(results))
        f = _open(results)
        _check(f, results)
        maps, suffix = _plan(f, results, fdr)
        make_dirs(out)
    except UserError as exc:
        error = exc
    _agree_or_close(comm, error, f)

    earlier: set[str] = set()
    error = None
    if rank == 0:
        remove_tmp_files(out)  # left by an export that was killed outright
        earlier = listed_maps(out)  # removed at the end where this export does not rewrite them
        error = _announce(out, earlier | {f"{m.stem}{suffix}" for m in maps}, results)
    _agree_or_close(comm, error, f)  # also before any rank starts writing its own temporary files

    written: list[Path] = []
    codes: dict[str, str] = {}
    error: UserError | None = None
    target = out
    with f:
        try:
            grid_shape = tuple(int(s) for s in f.attrs["grid_shape"])
            voxels = flat_voxels(f["voxels"][...], grid_shape)   # (V,) flat indices
            affine = np.asarray(f.attrs["affine"], dtype=np.float64)
            if not np.all(np.isfinite(affine)):
                raise UserError("attribute 'affine' holds NaN or Inf: cannot place the maps",
                                str(results))
            space = str(f.attrs.get("space", ""))
            codes = {str(k): v for k, v in json.loads(f["status"].attrs.get("codes", "{}")).items()}
            codes[str(STATUS_NOT_ANALYSED)] = NOT_ANALYSED_MEANING
            input_hash = f.attrs.get("input_hash", "")
            input_hash = input_hash.decode() if isinstance(input_hash, bytes) else str(input_hash)
            for m in maps[rank::size]:
                if interrupt.requested():
                    break
                target = results
                fill = STATUS_NOT_ANALYSED if m.stem == "status" else None
                image = ScatteredMap(map_source(f, m), voxels, grid_shape, fill, results)
                target = out / f"{m.stem}{suffix}"
                write_map(target, image, affine, space, m.volumes, f"mpiblmm {m.stem}",
                          map_intent(m), map_idcode(results, input_hash, target.name))
                written.append(target)
        except UserError as exc:
            error = exc
        except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            if target == results or target == out:  # reading the results file
                error = UserError(f"not a readable results file ({describe_io_error(exc)})",
                                  str(results))
            else:
                error = IOFailure(f"rank {rank}: {target}: {describe_io_error(exc)} "
                                  f"{_maps_failed(results)}")
        finally:
            remove_tmp_files(out, os.getpid())
    agree(comm, error)
    stopped = interrupt.requested()
    if size > 1:
        from mpi4py import MPI

        stopped = bool(comm.allreduce(int(stopped), op=MPI.MAX))
    if stopped:
        raise ExportStopped()
    if rank == 0:  # the index last, once every map is in place
        index = {f"{m.stem}{suffix}": map_info(m, codes) for m in maps}
        remove_maps(out, earlier - set(index))   # an earlier export's q map, a dropped contrast
        try:
            _write_atomic(out / MAPS_INDEX, json.dumps(index, indent=2) + "\n")
            _remove(out / MAPS_PENDING)  # maps.json lists all there is now
        except OSError as exc:
            error = IOFailure(f"rank 0: {out / MAPS_INDEX}: {describe_io_error(exc)} "
                              f"{_maps_failed(results)}")
    agree(comm, error)
    if rank == 0 and beside:  # and only then: the maps beside the results are complete
        _mark_maps(results, True)
    if size > 1:
        comm.Barrier()
    return written


#: The index of the maps, written last by an export (:func:`export_nifti`).
MAPS_INDEX = "maps.json"
#: The maps an export is about to write (and those the index before it listed), written
#: before the first map and removed once ``maps.json`` is: an export that is stopped, fails
#: or is killed leaves it, so its maps can still be found and removed (``fit --overwrite``,
#: the next export) although there is no ``maps.json``.
MAPS_PENDING = "maps.pending.json"
#: Root attribute of ``results.h5``: true once every map of the ``nifti/`` folder beside it
#: and its ``maps.json`` are written (false from the creation of the file until then).
MAPS_COMPLETE = "maps_complete"


def is_default_maps_folder(results: Path, out: Path) -> bool:
    """True when ``out`` is the ``nifti/`` folder beside ``results`` (the fit's maps)."""
    return os.path.abspath(out) == os.path.abspath(Path(results).parent / "nifti")


def open_serial_rw(path: str | os.PathLike) -> Any:
    """Open a results file for writing from one process once the ranks have closed it,
    without HDF5's file locking (as :func:`~mpiblmm.io.results.check_resumable` reads it):
    the output's lock is ours already, and a reader that holds the file open (h5py, h5dump,
    HDFView) must not turn a finished fit into a failure."""
    import h5py

    try:
        return h5py.File(path, "r+", locking=False)
    except TypeError:  # older h5py without the locking argument
        return h5py.File(path, "r+")


def _agree_or_close(comm: Any, error: BaseException | None, f: Any) -> None:
    """:func:`agree`, closing the results file ``f`` on every rank when some rank failed."""
    try:
        agree(comm, error)
    except BaseException:
        if f is not None:
            f.close()
        raise


def _foreign_folder_error(results: Path, out: Path) -> UserError | None:
    """The refusal of ``out`` when it is the ``nifti/`` folder beside a results file other than
    ``results``: its maps would be replaced while that file's ``maps_complete`` still vouched
    for them.  Folders are compared as the file system resolves them (symbolic links)."""
    real = Path(os.path.realpath(out))
    other = real.parent / RESULTS_NAME
    if real.name != "nifti" or not other.is_file() or not results.is_file():
        return None  # no results file to export: the export says so
    try:
        if os.path.samefile(other, results):
            return None
    except OSError:
        pass
    return UserError(f"this is the maps folder of another fit ({other}), whose maps would be "
                     f"replaced by those of {results}: export into another folder", str(out))


def _plan(f: Any, results: Path, fdr: bool) -> tuple[list[MapSpec], str]:
    """The maps of an open results file and their file ending (:data:`MAP_SUFFIX`); a file
    that does not say them is a user error."""
    try:
        space = str(f.attrs.get("space", ""))
        why = stored_space_problem(space, tuple(int(s) for s in f.attrs["grid_shape"]))
        if why is not None:   # (its packed input's: refused by fits of this version)
            raise UserError(f"attribute 'space' (the input's format, for the maps): {why}: "
                            "the maps cannot be written", str(results))
        fmt = json.loads(space).get("format", "nifti") if space else "nifti"
        return list_maps(f, fdr), MAP_SUFFIX[fmt]
    except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise UserError(f"not a readable results file ({describe_io_error(exc)})",
                        str(results)) from None


def _announce(out: Path, names: set[str], results: Path) -> IOFailure | None:
    """Rank 0, before any map is written: record ``names`` in :data:`MAPS_PENDING`, then remove
    ``maps.json`` (which must not vouch for a partial export).  In this order, the folder
    always holds a list of every map an export may have written there."""
    try:
        _write_atomic(out / MAPS_PENDING, json.dumps(sorted(names), indent=1) + "\n")
    except OSError as exc:
        return IOFailure(f"rank 0: {out / MAPS_PENDING}: {describe_io_error(exc)} "
                         f"{_maps_failed(results)}")
    _remove(out / MAPS_INDEX)
    return None


def _mark_maps(results: Path, complete: bool) -> None:
    """Rank 0: record in ``results`` whether the maps beside it are complete.  Best effort:
    a results file that cannot be written (read-only) keeps its attribute, and a file of
    an earlier version without the attribute gets it.  Only a complete results file is
    touched (an incomplete one is refused by the export, or is being written by a fit)."""
    try:
        with _open(results) as f:  # read first: a file being written is not opened to write
            if not bool(f.attrs.get("complete", False)):
                return
            marked = f.attrs.get(MAPS_COMPLETE, None)
            if marked is not None and bool(marked) == complete:
                return
    except UserError:
        return  # unreadable: the export says so
    try:
        with open_serial_rw(results) as f:
            f.attrs[MAPS_COMPLETE] = bool(complete)
    except (OSError, ValueError) as exc:
        if complete:
            print(f"mpiblmm: note: the maps are complete, but {results} cannot be written to "
                  f"record it (attribute {MAPS_COMPLETE}: {describe_io_error(exc)})",
                  file=sys.stderr, flush=True)


def maps_state(results: str | os.PathLike) -> tuple[bool, bool] | None:
    """(fit complete, maps beside it complete) of a results file, or ``None`` when it cannot
    be read.  The maps are complete when ``maps_complete`` is true (a file of an earlier
    version: when it lacks the attribute) and ``nifti/maps.json`` beside it exists."""
    import h5py

    results = Path(results)
    try:
        with h5py.File(results, "r", locking=False) as f:
            complete = bool(f.attrs.get("complete", False))
            marked = f.attrs.get(MAPS_COMPLETE, None)
    except (OSError, TypeError, ValueError):
        return None
    maps = (marked is None or bool(marked)) and (results.parent / "nifti" / MAPS_INDEX).is_file()
    return complete, complete and maps


def listed_maps(folder: Path) -> set[str]:
    """The map files that ``maps.json`` of ``folder`` and :data:`MAPS_PENDING` list (none when
    they are missing or not ours): what earlier exports wrote there, also one that was
    stopped or killed before its ``maps.json``.  Only plain file names of maps count, so
    removing them touches nothing outside the folder and no other kind of file."""
    folder = Path(folder)
    return _listed(folder / MAPS_INDEX) | _listed(folder / MAPS_PENDING)


def _listed(path: Path) -> set[str]:
    """The map file names of one list (``maps.json``: its keys; the pending list: its items)."""
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(names, (dict, list)):
        return set()
    return {name for name in names if isinstance(name, str) and name == Path(name).name
            and name.endswith(tuple(MAP_SUFFIX.values()))}


def forget_maps(folder: Path) -> None:
    """Remove every map :func:`listed_maps` names in ``folder`` and then the lists (the
    pending one last: it names the most).  Raises ``OSError`` when a list cannot be
    removed (the caller says what for); a map that cannot be is passed over."""
    folder = Path(folder)
    remove_maps(folder, listed_maps(folder))
    for name in (MAPS_INDEX, MAPS_PENDING):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass


def remove_maps(folder: Path, names) -> None:
    """Remove the map files ``names`` (plain names, :func:`listed_maps`) from ``folder``; one
    already gone or that cannot be removed is passed over (an unwritable folder is found
    when maps are written there)."""
    for name in names:
        _remove(Path(folder) / name)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:  # none there; an unwritable folder is found when the maps are written
        pass


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def store_headline(results_path: str | os.PathLike, comm: Any, timer: Any,
                   phases: Sequence[str] = ("export",),
                   also: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Collective, after the export: seconds of ``phases`` (the export; a fit also gives its
    ``finish``, whose own time is known only once it closed: the summary it writes was
    gathered inside it) and of the whole run (from the timer's start), min / median / max
    over ranks, added to the results' ``summary`` by rank 0 (``seconds.<phase>``,
    ``seconds.total`` and ``total_seconds``, the slowest rank's total, which is what ``fit``
    prints as its headline), with the entries ``also`` (a fit's peak memory, the maps'
    included)."""
    from mpiblmm.timers import summarise_phases

    times = summarise_phases(comm, timer, list(phases))
    if comm_rank(comm) == 0:
        try:
            with open_serial_rw(results_path) as f:
                summary = json.loads(f.attrs.get("summary", "{}") or "{}")
                summary.setdefault("seconds", {}).update(times)
                summary["total_seconds"] = times["total"][2]
                summary.update(also or {})
                f.attrs["summary"] = json.dumps(summary, sort_keys=True, default=str)
        except (OSError, ValueError) as exc:  # the results and maps are written: not a failure
            print(f"mpiblmm: note: the results and maps are complete, but the export's times "
                  f"could not be added to the summary of {results_path} "
                  f"({describe_io_error(exc)})", file=sys.stderr, flush=True)
    if comm_size(comm) > 1:
        comm.Barrier()
    return times


def lock_folder(out: Path) -> Path:
    """The folder whose lock (:mod:`mpiblmm.io.lock`) an export into ``out`` takes: the output
    folder of a fit when ``out`` is its ``nifti/`` (a results file or a fit's lock is there:
    the lock ``fit`` takes), else ``out`` itself (two exports into one folder)."""
    from mpiblmm.io.lock import LOCK_NAME

    real = Path(os.path.realpath(out))
    if real.name == "nifti" and ((real.parent / RESULTS_NAME).exists()
                                 or (real.parent / LOCK_NAME).exists()):
        return real.parent
    return real


def _take_lock(results: Path, out: Path) -> Any:
    """Rank 0 of ``mpiblmm export``: the lock of :func:`lock_folder` (created if missing), or
    ``None`` when there is no results file (:func:`export_nifti` says so).  A fit or another
    export writing there is refused with one line naming it."""
    from mpiblmm.io.lock import acquire_lock

    if not results.is_file():
        return None
    # before a folder is made for it; a file that is no results file is said so first ("the
    # maps folder of another fit" was the answer to `mpiblmm export results/packed.h5`)
    error = _foreign_file(results) or _foreign_folder_error(results, out)
    if error is not None:
        raise error
    folder = lock_folder(out)
    make_dirs(folder, str(out))
    return acquire_lock(folder, str(out))


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, deepest first (the folders an export
    into ``out`` makes)."""
    missing, here = [], Path(os.path.abspath(out))
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while each is empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def run_export(args: argparse.Namespace) -> int:
    """``mpiblmm export RESULTS_H5 [DIR] [--fdr]``: (re)write the maps; returns the exit code.
    The folder's lock is held throughout, so no fit or other export writes there meanwhile."""
    from mpiblmm.io import on_root
    from mpiblmm.parallel import at_abort, forget_abort_hook

    comm = world_if_parallel()
    out_dir = getattr(args, "out_dir", None) or getattr(args, "directory", None)
    out = Path(args.results).parent / "nifti" if out_dir is None else Path(out_dir)
    lock, hook, written = None, None, None
    made = _missing_folders(out) if comm_rank(comm) == 0 else []
    interrupt.install()  # first: a signal while the lock is taken must not leave it behind
    try:
        lock = on_root(comm, lambda: _take_lock(Path(args.results), out))
        hook = at_abort(lock.release) if lock is not None else None  # whichever rank aborts
        written = export_nifti(args.results, out_dir, comm=comm,
                               fdr=bool(getattr(args, "fdr", False)))
    except ExportStopped:
        if comm_rank(comm) == 0:
            print(f"mpiblmm: stopped by {interrupt.signal_name() or 'a signal'}; no temporary "
                  f"files are left: run the same command again to write the maps",
                  file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        interrupt.uninstall()
        if lock is not None and comm_rank(comm) == 0:
            lock.release()
            if written is None:   # refused (an incomplete results file, say): no empty
                _remove_if_empty(made)   # folder made for it is left behind
        if hook is not None:
            forget_abort_hook(hook)
    total = len(written) if comm is None else comm.allreduce(len(written))
    if comm_rank(comm) == 0:
        target = out_dir or Path(args.results).parent / "nifti"
        print(f"mpiblmm: wrote {total} maps to {target}", flush=True)
    return 0



__all__: list[str] = ["export_nifti", "run_export", "list_maps", "map_values", "volume",
                      "vech_indices", "write_map", "map_intent", "map_idcode", "forget_maps",
                      "listed_maps", "lock_folder"]
