"""NIfTI reading (3-D volumes on one grid) and writing (maps that keep their dtype).

A :class:`Grid` carries, besides shape and affine, its ``space``: a small JSON text with
what a viewer needs to place a map where the inputs were (format, qform/sform codes, intent,
units).  It travels through ``packed.h5`` and ``results.h5`` (attribute ``space``) so maps
written from the results file alone keep the input's codes: MNI input (code 4) gives MNI maps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpiblmm.errors import UserError

#: File endings of maps, longest first (kept on temporary names so nibabel knows the format).
MAP_SUFFIXES = (".dscalar.nii", ".func.gii", ".shape.gii", ".nii.gz", ".gii", ".nii")
#: Affines closer than this (absolute, in mm) count as the same grid.
AFFINE_ATOL = 1e-4


@dataclass(frozen=True, eq=False)
class Grid:
    """The voxel grid of a study: shape (3,) and the 4x4 voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    space: str = ""  # JSON: see nifti_space / mpiblmm.io.surface
    geometry: bytes = b""  # the first image's raw header fields that fix shape and affine

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


def nifti_space(header) -> str:
    """The ``space`` JSON of a NIfTI header: qform/sform codes, intent and spatial units."""
    try:
        intent = header.get_intent()
        units = header.get_xyzt_units()[0]
        info = {"format": "nifti",
                "qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"]),
                "intent": [str(intent[0]), [float(x) for x in intent[1]], str(intent[2])],
                "xyz_units": str(units)}
    except Exception:  # not a NIfTI header (Analyze, MGH...): nibabel's defaults apply
        info = {"format": "nifti"}
    return json.dumps(info, sort_keys=True)


def read_grid(path: Path) -> Grid:
    """The grid of an image, from its header only."""
    img = _volume(_load(path), path)
    return Grid(_shape3(img, path), np.asarray(img.affine, dtype=np.float64),
                nifti_space(img.header))


# ---------------------------------------------------------------- the fast path of packing
# Packing reads every image once; nibabel spends more time building and checking each
# header than zlib spends decompressing the data (0.9 of 1.3 ms per small image).  The
# images of a study nearly always share the first image's geometry byte for byte, so a
# single-file NIfTI-1 whose geometry fields equal the grid's, stored as float32 or float64
# without scaling, is read here directly: the same numbers nibabel gives, in the stored
# dtype.  Anything else (other types, scaling, other geometry, 4-D volumes, a short or odd
# file) goes through nibabel as before, which also words the errors.

#: Header fields that decide nibabel's shape and affine (NIfTI-1 byte offsets): dim,
#: pixdim, and qform_code .. srow_z (codes, quaternion, offsets, sform rows).
_GEOMETRY_FIELDS = ((40, 56), (76, 108), (252, 328))
#: Stored dtypes read directly: NIfTI datatype code -> numpy kind (float32, float64).
_DIRECT_TYPES = {16: "f4", 64: "f8"}


def with_geometry(grid: Grid, path: Path) -> Grid:
    """``grid`` (read from ``path`` by :func:`read_grid`) with the raw geometry fields of
    ``path``'s header, which :func:`read_stored` compares; unchanged if ``path`` is not a
    3-D single-file NIfTI-1."""
    from dataclasses import replace

    if getattr(path, "volume", None) is not None or not _is_nifti1(path):
        return grid
    head = _raw_header(path)
    return grid if head is None else replace(grid, geometry=_geometry(head))


def _geometry(head: bytes) -> bytes:
    return b"".join(head[a:b] for a, b in _GEOMETRY_FIELDS)


def _raw_header(path: Path) -> bytes | None:
    """The first 348 bytes of a single-file NIfTI-1, or ``None`` if unreadable."""
    import gzip

    name = str(path)
    try:
        with (gzip.open(name, "rb") if name.endswith(".gz") else open(name, "rb")) as fh:
            head = fh.read(348)
    except (OSError, EOFError):
        return None
    return head if len(head) == 348 else None


def read_stored(path: Path, grid: Grid) -> np.ndarray | None:
    """A 3-D single-file NIfTI-1 image's values as a flat C-order array in its stored dtype
    (float32 or float64), when its geometry fields are the grid's byte for byte and it has
    no scaling; ``None`` otherwise (then read it with :func:`read_volume`).

    The values are those of ``read_volume(path, grid, dtype=<stored dtype>)``, exactly.
    """
    import zlib

    name = str(path)
    if (not grid.geometry or getattr(path, "volume", None) is not None
            or not name.endswith((".nii", ".nii.gz"))):
        return None
    try:
        with open(name, "rb") as fh:
            raw = fh.read()
        if name.endswith(".gz"):  # the header first: another geometry costs no decompression
            unzip = zlib.decompressobj(31)
            data = unzip.decompress(raw, 352)
            if len(data) < 352 or _geometry(data) != grid.geometry:
                return None
            data += unzip.decompress(unzip.unconsumed_tail) + unzip.flush()
            if unzip.unused_data:  # a second gzip member: leave it to nibabel
                return None
        else:
            data = raw
    except (OSError, zlib.error):
        return None  # nibabel says what is wrong
    if len(data) < 352 or data[344:348] != b"n+1\0" or _geometry(data) != grid.geometry:
        return None
    if int.from_bytes(data[:4], "little") == 348:
        order = "<"
    elif int.from_bytes(data[:4], "big") == 348:
        order = ">"
    else:
        return None
    code, = np.frombuffer(data, dtype=order + "i2", count=1, offset=70)
    kind = _DIRECT_TYPES.get(int(code))
    offset, slope, inter = (float(x) for x in np.frombuffer(data, dtype=order + "f4", count=3,
                                                             offset=108))
    no_scaling = slope == 0.0 or np.isnan(slope) or (slope == 1.0 and inter == 0.0)
    if kind is None or not no_scaling or offset != int(offset) or offset < 352:
        return None
    dtype = np.dtype(order + kind)
    shape = grid.shape
    count = shape[0] * shape[1] * shape[2]
    if len(data) < int(offset) + count * dtype.itemsize:
        return None
    values = np.frombuffer(data, dtype=dtype, count=count, offset=int(offset))
    # stored in Fortran order; ours is C order (a copy, in native byte order)
    out = np.empty(shape, dtype=dtype.newbyteorder("="))
    out[...] = values.reshape(shape, order="F")
    return out.reshape(-1)


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


#: Characters that would break AFNI's label list or its XML, and their stand-ins.
_AFNI_UNSAFE = str.maketrans({"~": "-", '"': "'", "<": "(", ">": ")", "&": "+"})


def afni_labels(header, labels) -> bytes:
    """An AFNI NIfTI extension (code 4) naming the volumes (``BRICK_LABS``), so AFNI shows
    them (``3dinfo -label``).  ``NIfTI_nums`` records dimensions and datatype as AFNI does;
    AFNI ignores the extension if a later program changes them."""
    dim = [int(x) for x in header["dim"]]
    nt = dim[4] if dim[0] >= 4 else 1
    nu = dim[5] if dim[0] >= 5 else 1
    nums = f"{dim[1]},{dim[2]},{dim[3]},{nt},{nu},{int(header['datatype'])}"
    text = "~".join(str(x).translate(_AFNI_UNSAFE) for x in labels)
    return ("<?xml version='1.0' ?>\n<AFNI_attributes\n  self_idcode=\"XYZ_mpiblmm\"\n"
            f"  NIfTI_nums=\"{nums}\"\n  ni_form=\"ni_group\" >\n<AFNI_atr\n"
            "  ni_type=\"String\"\n  ni_dimen=\"1\"\n  atr_name=\"BRICK_LABS\" >\n"
            f" \"{text}\"\n</AFNI_atr>\n</AFNI_attributes>\n").encode("ascii", "replace")


def save_map(path: Path, data: np.ndarray, affine: np.ndarray, description: str = "",
             space: str = "", intent: str | None = None,
             labels: tuple[str, ...] | None = None) -> None:
    """Write ``data`` (3-D or 4-D) as NIfTI with its own dtype (no scaling), atomically.

    ``space`` (the input's, see :func:`nifti_space`) sets the qform/sform codes, the intent
    and the units; without it both codes are 1 (scanner) and the units mm.  ``intent`` (a
    nibabel intent name such as ``"z score"``) overrides the input's intent for statistic
    maps.  ``labels`` name the volumes for AFNI (:func:`afni_labels`).  The file is written
    beside ``path`` under a temporary name and renamed, so a reader never sees half a file
    and a re-export replaces maps in place.
    """
    import nibabel as nib

    info = json.loads(space) if space else {}
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.asarray(data).dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units(info.get("xyz_units", "mm"))
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    img.set_qform(img.affine, code=int(info.get("qform_code", 1)))
    img.set_sform(img.affine, code=int(info.get("sform_code", 1)))
    if intent is not None:
        img.header.set_intent(intent, (), name="mpiblmm")
    elif "intent" in info:
        code, params, name = info["intent"]
        img.header.set_intent(code, tuple(params), name=name)
    if labels:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(4, afni_labels(img.header, labels)))
    _atomic_save(img, Path(path))


def _atomic_save(img, path: Path) -> None:
    """``nib.save`` under a temporary name beside ``path``, then rename (readers never see
    half a file).  Suffixes with two parts (``.nii.gz``, ``.func.gii``, ``.dscalar.nii``)
    are kept so nibabel picks the format from the temporary name."""
    import nibabel as nib

    name = path.name
    suffix = next((s for s in MAP_SUFFIXES if name.endswith(s)), path.suffix)
    tmp = path.with_name(f".{name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
