"""Which reader reads an input image: NIfTI volumes or surface files, by file name.

``read_grid`` and ``read_volume`` have the signatures of :mod:`mpiblmm.io.nifti`'s; GIfTI
(``.func.gii``, ``.shape.gii``) and CIFTI dense scalar (``.dscalar.nii``) files go to
:mod:`mpiblmm.io.surface`, everything else to NIfTI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpiblmm.io import nifti, surface
from mpiblmm.io.nifti import Grid

#: File endings the spec accepts for images and masks.
IMAGE_SUFFIXES = (".nii", ".nii.gz") + surface.GIFTI_SUFFIXES


def _reader(path: Path):
    return surface if surface.surface_format(path) else nifti


def _as_path(path) -> Path:
    """``path`` as a Path, kept as it is when it is one: a volume of a 4-D ``images`` file
    is a Path that carries its ``volume`` index (see :mod:`mpiblmm.spec`)."""
    return path if isinstance(path, Path) else Path(path)


def read_grid(path: Path) -> Grid:
    """The grid (and ``space``) of an image or surface file, from its header."""
    return _reader(path).read_grid(_as_path(path))


def read_volume(path: Path, grid: Grid | None = None, reference: str | None = None,
                dtype: type = np.float32) -> np.ndarray:
    """An image's data on ``grid`` (3-D; ``(N, 1, 1)`` for surfaces) as ``dtype``."""
    return _reader(path).read_volume(_as_path(path), grid, reference, dtype)


def with_geometry(grid: Grid, path) -> Grid:
    """``grid`` with what :func:`read_stored` needs of ``path``'s header (its first image)."""
    path = _as_path(path)
    return grid if surface.surface_format(path) else nifti.with_geometry(grid, path)


def read_stored(path, grid: Grid) -> np.ndarray | None:
    """An image's values as a flat C-order array in its stored float dtype, when the fast
    path of :func:`mpiblmm.io.nifti.read_stored` applies; ``None`` otherwise."""
    path = _as_path(path)
    return None if surface.surface_format(path) else nifti.read_stored(path, grid)


__all__ = ["IMAGE_SUFFIXES", "read_grid", "read_stored", "read_volume", "with_geometry"]
