"""results.h5 -> NIfTI maps (``mpiblmm export``), from the HDF5 file alone.

One compressed NIfTI per map on the input grid and affine (``docs/RESULTS.md`` lists them).
Integer maps (``n``, ``status``, ``iterations``) keep their integer dtype and hold 0 outside
the candidate voxels; float maps keep float64 and hold NaN there.  ``beta`` and
``random_<factor>`` are 4-D (the random-effect covariance as its lower triangle, column by
column).  A ``maps.json`` beside them names every file and its volumes.

With a communicator of several ranks the maps are shared round-robin; each rank opens the
results file read-only on its own (no collective I/O) and writes its maps.

Atomic maps: each map is written under a temporary name and renamed
(:func:`mpiblmm.io.nifti.save_map`).  A failure (disk full, a corrupt results file) or a
SIGTERM/SIGINT between maps removes this process's temporary files, every rank agrees on the
outcome, and it ends as one line (exit 4 for a failed write, 2 for an unreadable file, 3 for
a signal); temporary files of a process that was killed outright are removed by the next
export into the same folder, so ``export`` can always be rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpiblmm import interrupt
from mpiblmm.errors import UserError
from mpiblmm.io import agree, comm_rank, comm_size, make_dirs
from mpiblmm.io.nifti import save_map
from mpiblmm.parallel import INTERRUPTED_EXIT_CODE, IOFailure, describe_io_error

#: Temporary names of maps being written (``.<stem>.tmp<pid>.nii[.gz]``, see ``save_map``).
TMP_PATTERN = re.compile(r"^\.(?P<stem>.+)\.tmp(?P<pid>\d+)\.nii(\.gz)?$")


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


@dataclass(frozen=True)
class MapSpec:
    """One output map: file stem, source dataset, volume names, how to flatten each voxel."""

    stem: str
    dataset: str
    volumes: tuple[str, ...]
    lower_triangle: bool = False


def vech_indices(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the lower triangle of a q x q matrix, column by column."""
    cols, rows = np.triu_indices(q)  # (col, row) pairs with row >= col, ordered by col
    return rows, cols


def list_maps(f: Any) -> list[MapSpec]:
    """The maps a results file holds, in a fixed order."""
    out = []
    beta_names = [str(x) for x in f["beta"].attrs.get("names", [])] or \
        [f"x{j}" for j in range(f["beta"].shape[1])]
    out.append(MapSpec("beta", "beta", tuple(beta_names)))
    for name in ("sigma2", "llh", "n", "status", "iterations"):
        if name in f:
            out.append(MapSpec(name, name, (name,)))
    for factor in f.get("random", {}):
        ds = f[f"random/{factor}/cov"]
        effects = [str(x) for x in ds.attrs.get("names", [])] or [f"z{e}" for e in range(ds.shape[1])]
        rows, cols = vech_indices(ds.shape[1])
        vols = tuple(f"cov({effects[r]},{effects[c]})" for r, c in zip(rows, cols))
        out.append(MapSpec(f"random_{factor}", ds.name, vols, lower_triangle=True))
    for con in f.get("contrasts", {}):
        for stat in f[f"contrasts/{con}"]:
            out.append(MapSpec(f"con_{con}_{stat}", f"contrasts/{con}/{stat}", (stat,)))
    return out


def _open(results: Path) -> Any:
    import h5py

    try:
        try:
            return h5py.File(results, "r", locking=False)
        except TypeError:  # older h5py without the locking argument
            return h5py.File(results, "r")
    except (OSError, ValueError) as exc:
        raise UserError(f"not a readable results file ({exc})", str(results)) from None


def _check(f: Any, results: Path) -> None:
    if not bool(f.attrs.get("complete", False)):
        raise UserError("the results are incomplete (attribute 'complete' is not true): the "
                        "fit did not finish; re-run `mpiblmm fit` on the spec", str(results))
    for name in ("voxels", "beta", "status"):
        if name not in f:
            raise UserError(f"not a results file: dataset {name!r} is missing", str(results))


def volume(values: np.ndarray, voxels: np.ndarray, grid_shape: tuple[int, ...]) -> np.ndarray:
    """Scatter per-voxel ``values`` (V,) or (V, k) into a 3-D or 4-D grid.

    Outside the voxels: 0 for integer dtypes, NaN for floats.
    """
    values = np.asarray(values)
    fill = np.nan if values.dtype.kind == "f" else 0
    out = np.full(tuple(grid_shape) + values.shape[1:], fill, dtype=values.dtype)
    out[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = values
    return out


def export_nifti(results_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 comm: Any = None) -> list[Path]:
    """Write every map of a complete results file as ``<out_dir>/<map>.nii.gz``.

    Parameters
    ----------
    results_path
        The results file.
    out_dir
        Output folder (default ``nifti/`` beside the results file); created if missing.
    comm
        Communicator to share the maps over (``None``: this process writes them all).
        Collective when given: every rank calls.

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
    error, f = None, None
    try:
        if not results.is_file():
            raise UserError("file not found", str(results))
        f = _open(results)
        _check(f, results)
        make_dirs(out)
    except UserError as exc:
        error = exc
    if error is not None and f is not None:
        f.close()
    agree(comm, error)

    if rank == 0:
        remove_tmp_files(out)  # left by an export that was killed outright
    if size > 1:
        comm.Barrier()  # before any rank starts writing its own temporary files

    written: list[Path] = []
    maps: list[MapSpec] = []
    error: UserError | None = None
    target = out
    with f:
        try:
            voxels = np.asarray(f["voxels"][...], dtype=np.int64)
            grid_shape = tuple(int(s) for s in f.attrs["grid_shape"])
            affine = np.asarray(f.attrs["affine"], dtype=np.float64)
            if not np.all(np.isfinite(affine)):
                raise UserError("attribute 'affine' holds NaN or Inf: cannot place the maps",
                                str(results))
            maps = list_maps(f)
            for m in maps[rank::size]:
                if interrupt.requested():
                    break
                target = results
                data = np.asarray(f[m.dataset][...])
                if m.lower_triangle:
                    rows, cols = vech_indices(data.shape[1])
                    data = data[:, rows, cols]
                image = volume(data, voxels, grid_shape)
                target = out / f"{m.stem}.nii.gz"
                save_map(target, image, affine, description=f"mpiblmm {m.stem}")
                written.append(target)
        except UserError as exc:
            error = exc
        except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
            if target == results or target == out:  # reading the results file
                error = UserError(f"not a readable results file ({describe_io_error(exc)})",
                                  str(results))
            else:
                error = IOFailure(f"rank {rank}: {target}: {describe_io_error(exc)} "
                                  f"(while writing maps)")
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
        index = {f"{m.stem}.nii.gz": {"dataset": m.dataset, "volumes": list(m.volumes)}
                 for m in maps}
        try:
            _write_atomic(out / "maps.json", json.dumps(index, indent=2) + "\n")
        except OSError as exc:
            error = IOFailure(f"rank 0: {out / 'maps.json'}: {describe_io_error(exc)} "
                              f"(while writing maps)")
    agree(comm, error)
    return written


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run_export(args: argparse.Namespace) -> int:
    """``mpiblmm export RESULTS_H5 [DIR]``: (re)write the NIfTI maps; returns the exit code."""
    comm = _world()
    out_dir = getattr(args, "out_dir", None) or getattr(args, "directory", None)
    interrupt.install()
    try:
        written = export_nifti(args.results, out_dir, comm=comm)
    except ExportStopped:
        if comm_rank(comm) == 0:
            print(f"mpiblmm: stopped by {interrupt.signal_name() or 'a signal'}; no temporary "
                  f"files are left: run the same command again to write the maps",
                  file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        interrupt.uninstall()
    total = len(written) if comm is None else comm.allreduce(len(written))
    if comm_rank(comm) == 0:
        target = out_dir or Path(args.results).parent / "nifti"
        print(f"mpiblmm: wrote {total} maps to {target}", flush=True)
    return 0


def _world() -> Any:
    """COMM_WORLD when running under MPI with several ranks, else ``None``."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


__all__: list[str] = ["export_nifti", "run_export", "list_maps", "volume", "vech_indices"]
