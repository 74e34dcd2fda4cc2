"""NIfTI reading (3-D volumes on one grid) and writing (maps that keep their dtype)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpiblmm.errors import UserError

#: Affines closer than this (absolute, in mm) count as the same grid.
AFFINE_ATOL = 1e-4


@dataclass(frozen=True, eq=False)
class Grid:
    """The voxel grid of a study: shape (3,) and the 4x4 voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def differs(self, shape: tuple[int, ...], affine: np.ndarray) -> str | None:
        """Why ``(shape, affine)`` is not this grid, or ``None`` if it is."""
        if tuple(shape) != self.shape:
            return f"shape {tuple(shape)} differs from {self.shape}"
        if not np.allclose(affine, self.affine, rtol=0, atol=AFFINE_ATOL):
            return "affine differs"
        return None


def _is_nifti1(path: Path) -> bool:
    """True when ``path`` is a single-file NIfTI-1 image (its header size field is 348)."""
    import gzip

    name = str(path)
    if not name.endswith((".nii", ".nii.gz")):
        return False
    try:
        with (gzip.open(name, "rb") if name.endswith(".gz") else open(name, "rb")) as fh:
            head = fh.read(4)
    except (OSError, EOFError):
        return False  # nib.load reports what is wrong
    return len(head) == 4 and 348 in (int.from_bytes(head, "little"), int.from_bytes(head, "big"))


def _load(path: Path):
    import nibabel as nib

    try:
        if _is_nifti1(path):  # skips nib.load's sniffing of every format: ~40% of a small load
            return nib.Nifti1Image.from_filename(str(path))
        return nib.load(str(path))
    except FileNotFoundError:
        raise UserError("file not found", str(path)) from None
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise UserError(f"not a readable NIfTI image ({type(exc).__name__}: {exc})", str(path)) from None


def _volume(img, path: Path):
    """Volume ``path.volume`` of a 4-D image when ``path`` names one (a 4-D ``images``)."""
    index = getattr(path, "volume", None)
    return img if index is None else img.slicer[..., index]


def _shape3(img, path: Path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise UserError(f"expected a 3-D image, got shape {tuple(img.shape)}", str(path))
    return shape  # type: ignore[return-value]


def read_grid(path: Path) -> Grid:
    """The grid of an image, from its header only."""
    img = _volume(_load(path), path)
    return Grid(_shape3(img, path), np.asarray(img.affine, dtype=np.float64))


def read_volume(path: Path, grid: Grid | None = None, reference: str | None = None,
                dtype: type = np.float32) -> np.ndarray:
    """A 3-D image's data (scaling applied) as ``dtype``, checked to lie on ``grid``.

    Raises
    ------
    UserError
        ``<path>: not on the grid of <reference>: <why>`` or an unreadable/4-D image.
    """
    img = _volume(_load(path), path)
    shape = _shape3(img, path)
    if grid is not None:
        why = grid.differs(shape, np.asarray(img.affine))
        if why is not None:
            raise UserError(f"not on the grid of {reference or 'the first image'}: {why}", str(path))
    try:
        data = np.asarray(img.get_fdata(dtype=np.float64 if dtype == np.float64 else np.float32))
    except Exception as exc:
        raise UserError(f"cannot read the image data ({type(exc).__name__}: {exc})", str(path)) from None
    return data.reshape(shape).astype(dtype, copy=False)


def save_map(path: Path, data: np.ndarray, affine: np.ndarray, description: str = "") -> None:
    """Write ``data`` (3-D or 4-D) as NIfTI with its own dtype (no scaling), atomically.

    The file is written beside ``path`` under a temporary name and renamed, so a reader never
    sees half a file and a re-export replaces maps in place.
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.asarray(data).dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path = Path(path)
    name = path.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
