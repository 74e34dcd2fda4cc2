"""Which reader reads an input image: NIfTI volumes or surface files, by file name.

``read_grid`` and ``read_volume`` have the signatures of :mod:`mpiblmm.io.nifti`'s; GIfTI
(``.func.gii``, ``.shape.gii``, and ``.label.gii`` masks) and CIFTI dense scalar
(``.dscalar.nii``) files go to :mod:`mpiblmm.io.surface`, everything else to NIfTI.

A study is of one kind: an image or mask read on a grid (``read_volume(path, grid)``) must be
of the grid's kind -- NIfTI, GIfTI or CIFTI, from the grid's ``space`` -- and, for surfaces,
of its structure (:func:`mpiblmm.io.surface.structure_problem`).  A NIfTI volume of N x 1 x 1
voxels and a GIfTI of N vertices have the same shape, but not the same meaning.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from mpiblmm.errors import UserError
from mpiblmm.io import nifti, surface
from mpiblmm.io.nifti import Grid

#: File endings the spec accepts for images and masks.
IMAGE_SUFFIXES = (".nii", ".nii.gz") + surface.GIFTI_SUFFIXES

#: A file's kind, as messages name it, by the ``format`` of its ``space``.
KINDS = {"nifti": "NIfTI", "gifti": "GIfTI", "cifti": "CIFTI"}


def _reader(path: Path):
    return surface if surface.surface_format(path) else nifti


def _as_path(path) -> Path:
    """``path`` as a Path, kept as it is when it is one: a volume of a 4-D ``images`` file
    is a Path that carries its ``volume`` index (see :mod:`mpiblmm.spec`)."""
    return path if isinstance(path, Path) else Path(path)


def kind(path) -> str:
    """``"nifti"``, ``"gifti"`` or ``"cifti"``: the kind of an image file, from its name."""
    return surface.surface_format(path) or "nifti"


def grid_kind(grid: Grid) -> str | None:
    """The kind of the image a grid was read from (its ``space``), or ``None`` when it is not
    recorded (a packed file written before ``space`` was kept)."""
    return _space_kind(grid.space)


#: What one element of a study is called, singular and plural, by its kind.
UNITS = {"nifti": ("voxel", "voxels"), "gifti": ("vertex", "vertices"),
         "cifti": ("grayordinate", "grayordinates")}


def units(space: str) -> tuple[str, str]:
    """:data:`UNITS` of a grid's ``space`` (volumes when its kind is not recorded)."""
    return UNITS[_space_kind(space) or "nifti"]


@lru_cache(maxsize=8)
def _space_kind(space: str) -> str | None:
    try:
        fmt = json.loads(space).get("format") if space else None
    except (ValueError, AttributeError):
        return None
    return fmt if fmt in KINDS else None


def kind_problem(path, grid: Grid, reference: str | None = None) -> str | None:
    """Why the file ``path`` cannot be read on ``grid`` for its kind (a NIfTI among GIfTI
    files, a NIfTI mask for a surface study, GIfTI with CIFTI), or ``None``."""
    mine, theirs = kind(path), grid_kind(grid)
    if theirs is None or mine == theirs:
        return None
    return (f"a {KINDS[mine]} file, but {reference or 'the first image'} is {KINDS[theirs]}: "
            "the images and masks of a study must all be of one kind")


def grid_problem(grid: Grid, path, other: Grid, reference: str | None = None) -> str | None:
    """Why ``path`` (whose header gave ``other``, :func:`read_grid`) is not on the study's
    ``grid``: another kind of file, another grid or another surface structure; ``None`` when
    it is on it.  What ``read_volume(path, grid)`` would refuse, from headers only."""
    return (kind_problem(path, grid, reference) or _shape_problem(grid, other, reference)
            or surface.space_problem(grid.space, other.space, reference))


def _shape_problem(grid: Grid, other: Grid, reference: str | None) -> str | None:
    """The words ``read_volume`` uses for a file of another size: vertices on a surface,
    shape or affine on a voxel grid."""
    why = grid.differs(other.shape, other.affine)
    if why is None:
        return None
    reference = reference or "the first image"
    if grid_kind(grid) in ("gifti", "cifti"):
        return (f"not on the surface of {reference}: {other.shape[0]} "
                f"{surface.points(grid_kind(grid))}, expected {grid.shape[0]}")
    return f"not on the grid of {reference}: {why}"


def stored_space_problem(space: str, shape: tuple[int, ...]) -> str | None:
    """Why the ``space`` attribute of a packed or results file cannot give maps of a grid of
    ``shape`` back in its format (NIfTI, GIfTI, CIFTI); ``None`` when it can (always, for a
    space mpiblmm wrote: this catches hand-made packed files before the fit, not at the
    export after it)."""
    if not space:
        return None
    try:
        info = json.loads(space)
    except ValueError as exc:
        return f"not the JSON mpiblmm writes ({exc})"
    if not isinstance(info, dict):
        return "not a JSON object"
    fmt = info.get("format", "nifti")
    if fmt == "nifti":
        return nifti.stored_space_problem(info)
    if fmt not in ("gifti", "cifti"):
        return f"format {fmt!r}: expected nifti, gifti or cifti"
    if tuple(shape)[1:] != (1, 1):
        return f"a {KINDS[fmt]} surface needs grid_shape (N, 1, 1), got {tuple(shape)}"
    return surface.stored_space_problem(info, int(shape[0]))


def read_grid(path: Path) -> Grid:
    """The grid (and ``space``) of an image or surface file, from its header."""
    return _reader(path).read_grid(_as_path(path))


def read_volume(path: Path, grid: Grid | None = None, reference: str | None = None,
                dtype: type = np.float32, seen: dict | None = None) -> np.ndarray:
    """An image's data on ``grid`` (3-D; ``(N, 1, 1)`` for surfaces) as ``dtype``; refused
    (:class:`UserError`) when it is of another kind than the grid's image.  ``seen``: the
    GIfTI structures named, for :func:`mpiblmm.io.surface.one_structure`."""
    if grid is not None:
        why = kind_problem(path, grid, reference)
        if why is not None:
            raise UserError(why, str(path))
    if seen is not None and surface.surface_format(path):
        return surface.read_volume(_as_path(path), grid, reference, dtype, seen)
    return _reader(path).read_volume(_as_path(path), grid, reference, dtype)


def read_mask(path: Path, grid: Grid | None = None, reference: str | None = None,
              seen: dict | None = None) -> np.ndarray:
    """A mask on ``grid`` as a boolean volume: True where its value is non-zero and finite.

    Read as float64, not float32: a float64 mask's 1e-50 (non-zero) would become 0 in
    float32, and its 1e40 (finite) would overflow to Inf, both then counted as outside."""
    m = read_volume(path, grid, reference, dtype=np.float64, seen=seen)
    return np.isfinite(m) & (m != 0)


def verify_data(path, grid: Grid | None = None, reference: str | None = None) -> None:
    """Raise the :class:`UserError` that reading the data of ``path`` raises when the data is
    incomplete or corrupt (``mpiblmm check`` runs it on every image): for NIfTI
    :func:`mpiblmm.io.nifti.verify_data` (an uncompressed file's size, a compressed file
    read through once); a surface file is read as the fit reads it."""
    path = _as_path(path)
    if surface.surface_format(path):
        read_volume(path, grid, reference, dtype=np.float64)  # (float32 could overflow)
    else:
        nifti.verify_data(path)


def verify_size(path) -> None:
    """Raise the :class:`UserError` of a NIfTI image whose file holds less data than its
    header's grid (:func:`mpiblmm.io.nifti.verify_data`), before anything proportional to
    that grid is allocated: a header claiming 2000^3 voxels over 24 stored ones must be
    refused in one line, not end in a MemoryError.  Surface files: nothing to do (their
    size is that of the data read)."""
    path = _as_path(path)
    if not surface.surface_format(path):
        nifti.verify_data(path)


def with_geometry(grid: Grid, path) -> Grid:
    """``grid`` with what :func:`read_stored` needs of ``path``'s header (its first image)."""
    path = _as_path(path)
    return grid if surface.surface_format(path) else nifti.with_geometry(grid, path)


def read_stored(path, grid: Grid) -> np.ndarray | None:
    """An image's values as a flat C-order array in its stored float dtype, when the fast
    path of :func:`mpiblmm.io.nifti.read_stored` applies; ``None`` otherwise (a surface file,
    or a file of another kind than the grid's: :func:`read_volume` then says why)."""
    path = _as_path(path)
    if surface.surface_format(path) or kind_problem(path, grid) is not None:
        return None
    return nifti.read_stored(path, grid)


__all__ = ["IMAGE_SUFFIXES", "grid_kind", "grid_problem", "kind", "kind_problem", "read_grid",
           "read_mask", "read_stored", "read_volume", "verify_data", "verify_size",
           "with_geometry"]
