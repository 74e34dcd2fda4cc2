"""NIfTI reading (3-D volumes on one grid) and writing (maps that keep their dtype).

A :class:`Grid` carries, besides shape and affine, its ``space``: a small JSON text with
what a viewer needs to place a map where the inputs were (format; qform and sform, each with
its code and matrix, and the voxel sizes; units; the input's intent, for reference).  It
travels through ``packed.h5`` and ``results.h5`` (attribute ``space``) so maps written from
the results file alone keep the input's transforms: MNI input (code 4) gives MNI maps, and a
scanner qform beside it stays that qform.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            gap = float(np.max(np.abs(np.asarray(affine, dtype=float) - self.affine)))
            return (f"affine differs (by up to {gap:.3g} mm; at most {AFFINE_ATOL:g} is the "
                    "same grid)")
        return None


@contextmanager
def quiet_nibabel():
    """Silence nibabel's logger and Python warnings (nibabel's, numpy's) while an input is
    read: nibabel logs the header fixes it makes ("vox offset (=360) not divisible by 16")
    and warns on odd files, once per image -- hundreds of lines on stderr for a study, around
    the one line that matters.  What makes an input unusable is raised, never logged: our
    own errors are :class:`UserError` lines, and nibabel's raised errors still raise."""
    loggers = [logging.getLogger(name) for name in ("nibabel", "nibabel.global")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def quiet(func):
    """``func`` run inside :func:`quiet_nibabel` (the readers of inputs' headers and data)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with quiet_nibabel():
            return func(*args, **kwargs)
    return wrapper


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


def _load(path: Path, verify: bool = False):
    """The nibabel image of ``path``.  ``verify``: its data will be read, so a gzip-compressed
    file's stream is verified to its end first (CRC-32 and length of every member: nibabel
    reads only the bytes it needs and never checks them, so a corrupt file would give
    garbage values).  A 3-D file is decompressed once, verified, and handed to nibabel in
    memory; a 4-D file (one volume per observation) is verified once per process, streaming,
    and nibabel then reads the volume from the file."""
    import nibabel as nib

    name = str(path)
    try:  # one wording for an unreadable file, whether its header or its data is read
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)  # (opening a FIFO does not block)
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise UserError("file not found", name) from None
    except OSError as exc:
        raise UserError(f"cannot read the file ({exc.strerror or exc})", name) from None
    if stat.S_ISDIR(mode):
        raise UserError("is a directory, not a file", name)
    if not stat.S_ISREG(mode):  # a FIFO or a device: reading it could wait forever
        raise UserError("not a regular file", name)
    _gzip_start(name)
    try:
        if verify and name.endswith(".gz"):
            if getattr(path, "volume", None) is None:
                with open(name, "rb") as fh:
                    raw = fh.read()
                body = _gunzip(path, raw)
                klass = _single_file_class(body)
                if klass is not None:
                    return klass.from_bytes(body)
            else:
                _verify_gzip_file(path)
        if _is_nifti1(path):  # skips nib.load's sniffing of every format: ~40% of a small load
            return nib.Nifti1Image.from_filename(name)
        return nib.load(name)
    except FileNotFoundError:
        raise UserError("file not found", name) from None
    except UserError:
        raise
    except (EOFError, zlib.error) as exc:   # a header read through a broken gzip stream
        raise UserError(_gzip_problem(exc), name) from None
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise UserError(f"not a readable NIfTI image ({type(exc).__name__}: {exc})", name) from None


def _gzip_start(name: str) -> None:
    """An empty file, or a ``.gz`` file that is not gzip data, in the words of the fit's
    reading (:func:`_gunzip`), not nibabel's (a fuzz audit: check said "not a readable NIfTI
    image (ImageFileError: Empty file: ...)" where the fit said "empty file")."""
    try:
        with open(name, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return                                 # nibabel's reading says what is wrong
    if not head:
        raise UserError("empty file", name)
    if name.endswith(".gz") and head != _GZIP_MAGIC:
        raise UserError(_NOT_GZIP, name)


# ------------------------------------------------------------ verifying gzip-compressed inputs
_GZIP_MAGIC = b"\x1f\x8b"
#: What is wrong with a gzip file, by the words of zlib's or Python's gzip module's error.
_GZIP_PROBLEMS = (
    ("incorrect data check", "corrupt gzip data (CRC check failed)"),
    ("crc check failed", "corrupt gzip data (CRC check failed)"),
    ("incorrect length check", "corrupt gzip data (length check failed)"),
    ("incorrect length of data", "corrupt gzip data (length check failed)"),
)
_GZIP_TRUNCATED = "truncated gzip data (the file ends before the end of the compressed stream)"
_GZIP_TRAILING = "corrupt gzip data (bytes after the end of the compressed stream are not gzip data)"
_NOT_GZIP = "not gzip data (a .gz file must be gzip-compressed)"
#: Compressed 4-D files already verified by this process: (name, size, mtime, inode).
_VERIFIED: set[tuple] = set()
#: Their decompressed sizes (bytes), by the same key.
_LENGTHS: dict[tuple, int] = {}


def _gzip_problem(exc: BaseException) -> str:
    """One line for a zlib/gzip error met reading a gzip stream."""
    text = str(exc)
    reason = text.split(": ", 1)[1] if text.startswith("Error ") and ": " in text else text
    low = reason.lower()
    for words, problem in _GZIP_PROBLEMS:
        if words in low:
            return problem
    if isinstance(exc, EOFError):
        return _GZIP_TRUNCATED
    return f"corrupt gzip data ({reason or type(exc).__name__})"


def _gunzip(path: Path, raw: bytes, unzip=None, head: bytes = b"") -> bytes:
    """All of the gzip file ``raw`` decompressed, every member's CRC-32 and length checked
    by zlib (as Python's gzip module reads it: several members, NUL padding after one).
    ``unzip``: a decompressor that already gave ``head`` (the start) and kept the rest of
    ``raw`` in its ``unconsumed_tail``.

    Raises
    ------
    UserError
        ``<path>: corrupt gzip data (CRC check failed)``, a truncated stream, or the like.
    """
    import zlib

    name = str(path)
    if not raw:
        raise UserError("empty file", name)
    parts = [head]
    block = raw if unzip is None else unzip.unconsumed_tail
    first = unzip is None
    try:
        while True:
            if unzip is None:
                if not block.startswith(_GZIP_MAGIC):
                    raise UserError(_NOT_GZIP if first else _GZIP_TRAILING, name)
                unzip = zlib.decompressobj(31)
            parts.append(unzip.decompress(block))
            parts.append(unzip.flush())
            if not unzip.eof:
                raise UserError(_GZIP_TRUNCATED, name)
            block = unzip.unused_data.lstrip(b"\0")
            if not block:
                break
            unzip, first = None, False
    except zlib.error as exc:
        raise UserError(_gzip_problem(exc), name) from None
    return b"".join(parts)


def _verify_gzip_file(path: Path) -> None:
    """Read the gzip file ``path`` to its end (streaming, in bounded memory) so that Python's
    gzip module checks every member's CRC-32 and length; once per file per process.  Does
    nothing for a file it cannot open (nibabel says what is wrong)."""
    name = str(path)
    try:
        fh = open(name, "rb")
    except OSError:
        return
    with fh:
        st = os.fstat(fh.fileno())
        key = (name, st.st_size, st.st_mtime_ns, st.st_ino)
        if key in _VERIFIED:
            return
        if st.st_size == 0:
            raise UserError("empty file", name)
        if fh.read(2) != _GZIP_MAGIC:
            raise UserError(_NOT_GZIP, name)
        fh.seek(0)
        _LENGTHS[key] = _read_to_end(fh, name)
    _VERIFIED.add(key)


def _stat_key(name: str) -> tuple | None:
    try:
        st = os.stat(name)
    except OSError:
        return None
    return (name, st.st_size, st.st_mtime_ns, st.st_ino)


def _read_to_end(fh, name: str) -> int:
    """Decompress the gzip file ``fh`` to its end, 16 MiB at a time, and drop the data;
    return the number of bytes decompressed."""
    import gzip
    import zlib

    total = 0
    try:
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            while True:
                block = gz.read(1 << 24)
                if not block:
                    break
                total += len(block)
    except gzip.BadGzipFile as exc:
        raise UserError(_GZIP_TRAILING if str(exc).startswith("Not a gzipped file")
                        else _gzip_problem(exc), name) from None
    except (EOFError, zlib.error) as exc:
        raise UserError(_gzip_problem(exc), name) from None
    return total


def _short_data(img, path: Path) -> str | None:
    """Why the file of ``img`` (:func:`_load`'s image of the whole file, not a volume of
    it) ends before the data its header describes, or ``None``: the header's data offset
    plus every voxel of every volume, against the file's size (an uncompressed file: its
    ``stat``, no data read) or its decompressed size (a compressed one, as :func:`_load`
    verified it).  nibabel would fail later with a message spread over two lines."""
    proxy = getattr(img, "dataobj", None)
    try:
        offset = int(proxy.offset)
        need = offset + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    except Exception:  # not an array proxy of a single file: nibabel reads it its own way
        return None
    name = str(path)
    first = _first_data_byte(img)
    if name.endswith((".nii", ".nii.gz")) and first is not None and offset < first:
        return (f"corrupt header: vox_offset is {offset}, but the data of a single-file NIfTI "
                f"start at byte {first} or later (after the header; FSL would read from "
                f"{first}, nibabel from {offset})")
    if name.endswith(".gz"):
        fileobj = getattr(img.file_map.get("image"), "fileobj", None)
        if hasattr(fileobj, "getbuffer"):  # decompressed into memory by _load
            have = fileobj.getbuffer().nbytes
        else:
            have = _LENGTHS.get(_stat_key(name))  # a 4-D file, verified by streaming
        what = "decompresses to"
    else:
        try:
            have = os.stat(name).st_size
        except OSError:
            have = None
        what = "has"
    if have is None or have >= need:
        return None
    return (f"truncated: the header describes {need - offset} bytes of data from byte "
            f"{offset}, {need} bytes in all, but the file {what} {have} bytes")


def _first_data_byte(img) -> int | None:
    """Where a single-file NIfTI's data may start at the earliest: after its header and the
    4 extension-flag bytes (352 for NIfTI-1, 544 for NIfTI-2); ``None`` for other formats."""
    size = getattr(getattr(img, "header", None), "sizeof_hdr", None)
    return None if size is None else int(size) + 4


@quiet
def verify_data(path: Path) -> None:
    """Raise the :class:`UserError` :func:`read_volume` raises for an image whose data is
    incomplete or corrupt (a truncated file, a gzip stream that ends early or fails its
    CRC-32 or length check), reading no more than that takes: an uncompressed file's header
    (its size against the header's), every byte of a compressed one (decompressed once and
    dropped; a 4-D file once per process).  ``mpiblmm check`` runs it on every image."""
    full = _load(path, verify=True)
    why = _short_data(full, path)
    if why is not None:
        raise UserError(why, str(path))


def _single_file_class(data: bytes):
    """nibabel's class for the decompressed single-file NIfTI ``data`` (NIfTI-1 or -2, by
    the header size field), or ``None`` (then ``nib.load`` reads the file by name)."""
    import nibabel as nib

    for size, klass in ((348, nib.Nifti1Image), (540, nib.Nifti2Image)):
        if size in (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")):
            return klass
    return None


def _volume(img, path: Path):
    """Volume ``path.volume`` of a 4-D image when ``path`` names one (a 4-D ``images``)."""
    index = getattr(path, "volume", None)
    return img if index is None else img.slicer[:, :, :, index]  # (x, y, z, n, 1) too


def _shape3(img, path: Path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise UserError(f"expected a 3-D image, got shape {tuple(img.shape)}", str(path))
    return shape  # type: ignore[return-value]


#: NIfTI datatype codes that do not hold one real number per voxel -> (what, datatype).
_NOT_SCALAR = {128: ("an RGB image", "RGB24"), 2304: ("an RGBA image", "RGBA32"),
               32: ("a complex-valued image", "complex64"),
               1792: ("a complex-valued image", "complex128"),
               2048: ("a complex-valued image", "complex256")}


def scalar_problem(img) -> str | None:
    """Why the image ``img`` (nibabel) does not hold one real number per voxel, read from its
    header's datatype, or ``None``.  RGB and complex images are refused rather than read:
    nibabel would give a record per voxel, or drop the imaginary part with a warning."""
    try:
        code = int(img.header["datatype"])
    except Exception:  # a header without the field: its dtype says
        code = None
    if code in _NOT_SCALAR:
        what, name = _NOT_SCALAR[code]
    else:
        try:
            dtype = np.dtype(img.get_data_dtype())
        except Exception:
            return None
        if dtype.kind == "c":
            what, name = "a complex-valued image", str(dtype)
        elif dtype.kind == "V" and dtype.names:
            what, name = f"an {''.join(dtype.names)} image", str(dtype)
        elif dtype.kind in "VOSU":
            return (f"has datatype {code if code is not None else dtype}, which cannot be "
                    f"read as one number per voxel")
        else:
            return None
    real = "real " if "complex" in what else ""
    return f"is {what} (datatype {name}): expected one {real}number per voxel"


def _scalar(img, path: Path) -> None:
    problem = scalar_problem(img)
    if problem is not None:
        raise UserError(problem, str(path))


def nifti_space(header) -> str:
    """The ``space`` JSON of a NIfTI header: qform/sform codes and matrices, the raw fields
    they are stored in, intent and spatial units.

    ``qform`` and ``sform`` are the 4x4 matrices as a reader computes them; ``quatern``
    (quatern_b, c, d, qoffset_x, y, z), ``pixdim`` (qfac and the three voxel sizes) and
    ``srow`` (srow_x, y, z) are the header's own numbers, so :func:`save_map` writes both
    transforms and the voxel sizes back exactly as the input had them (a sheared sform and a
    qform that differs from it included).  ``intent`` is recorded for reference only: maps
    are not given the input's intent (see :func:`save_map`).
    """
    try:
        intent = header.get_intent()
        units = header.get_xyzt_units()[0]
        info = {"format": "nifti",
                "qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"]),
                "intent": [str(intent[0]), [float(x) for x in intent[1]], str(intent[2])],
                "xyz_units": str(units)}
        geometry = {
            "qform": np.asarray(header.get_qform(), dtype=np.float64).tolist(),
            "sform": np.asarray(header.get_sform(), dtype=np.float64).tolist(),
            "quatern": [float(header[k]) for k in _QUATERN_FIELDS],
            "pixdim": [float(x) for x in np.asarray(header["pixdim"])[:4]],
            "srow": [[float(x) for x in header[k]] for k in _SROW_FIELDS]}
        if all(np.all(np.isfinite(np.asarray(v, dtype=np.float64))) for v in geometry.values()):
            info.update(geometry)  # (a NaN would make the JSON unreadable to strict parsers)
    except Exception:  # not a NIfTI header (Analyze, MGH...): nibabel's defaults apply
        info = {"format": "nifti"}
    return json.dumps(info, sort_keys=True)


def stored_space_problem(info: dict) -> str | None:
    """Why a NIfTI ``space`` (parsed: ``info``) cannot be written into a map's header
    (:func:`save_map`: the codes and units; the recorded matrices fall back to the affine by
    themselves); ``None`` when it can."""
    import nibabel as nib
    from nibabel.nifti1 import xform_codes

    codes = sorted(int(c) for c in xform_codes.value_set())   # NIfTI's 0-4, and 5 since 2019
    try:
        for key in ("qform_code", "sform_code"):
            code = info.get(key, 1)
            if isinstance(code, bool) or int(code) != code or int(code) not in codes:
                return f"{key} must be {codes[0]}-{codes[-1]}, got {code!r}"
        nib.Nifti1Header().set_xyzt_units(info.get("xyz_units", "mm"))
    except (TypeError, ValueError, KeyError) as exc:
        return f"not a NIfTI space mpiblmm can write ({type(exc).__name__}: {exc})"
    return None


#: The NIfTI header fields of the qform (besides pixdim) and of the sform.
_QUATERN_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
_SROW_FIELDS = ("srow_x", "srow_y", "srow_z")


def _affine(img, path: Path) -> np.ndarray:
    """The voxel-to-world affine of ``img``, refused when it holds NaN or Inf (a corrupt
    qform or sform field): no grid can be compared with it, and no map placed by it."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise UserError("affine holds NaN or Inf (a corrupt qform or sform field of the "
                        "header): the image cannot be placed in space", str(path))
    return affine


def _grid_size(shape: tuple[int, int, int], path: Path) -> None:
    """Refuse a grid of no voxel (a dimension of size 0): nothing could be fitted."""
    if min(shape) < 1:
        raise UserError(f"the image holds no voxel: its grid is {shape}", str(path))


@quiet
def read_grid(path: Path) -> Grid:
    """The grid of an image, from its header only (refused when its datatype is not one
    real number per voxel: RGB, complex; when it has no voxel; when its affine holds NaN
    or Inf)."""
    try:   # a volume of a compressed 4-D file: nibabel's slicer reads into the stream
        img = _volume(_load(path), path)
    except (EOFError, zlib.error) as exc:     # (check printed gzip's traceback, exit 1)
        raise UserError(_gzip_problem(exc), str(path)) from None
    _scalar(img, path)
    shape = _shape3(img, path)
    _grid_size(shape, path)
    return Grid(shape, _affine(img, path), nifti_space(img.header))


# ---------------------------------------------------------------- the fast path of packing
# Packing reads every image once; nibabel spends more time building and checking each
# header than zlib spends decompressing the data (0.9 of 1.3 ms per small image).  The
# images of a study nearly always share the first image's geometry byte for byte, so a
# single-file NIfTI-1 whose geometry fields equal the grid's, stored as float32 or float64
# without scaling, is read here directly: the same numbers nibabel gives, in the stored
# dtype.  Anything else (other types, scaling, other geometry, 4-D volumes, a short or odd
# file) goes through nibabel as before, which also words the errors.  Here and in
# read_volume a gzip stream is always decompressed to its end, so zlib checks its CRC-32
# and length: nibabel reads only the bytes it needs and would give a corrupt file's garbage.

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
    except OSError:
        return None  # nibabel says what is wrong
    gz, unzip = name.endswith(".gz"), None
    if gz:  # the header first: another layout costs no decompression
        if not raw.startswith(_GZIP_MAGIC):
            return None  # read_volume says what is wrong
        unzip = zlib.decompressobj(31)
        try:
            head = unzip.decompress(raw, 352)
        except zlib.error as exc:
            raise UserError(_gzip_problem(exc), name) from None
    else:
        head = raw[:352]
    if len(head) < 352 or head[344:348] != b"n+1\0" or _geometry(head) != grid.geometry:
        return None
    if int.from_bytes(head[:4], "little") == 348:
        order = "<"
    elif int.from_bytes(head[:4], "big") == 348:
        order = ">"
    else:
        return None
    code, = np.frombuffer(head, dtype=order + "i2", count=1, offset=70)
    kind = _DIRECT_TYPES.get(int(code))
    offset, slope, inter = (float(x) for x in np.frombuffer(head, dtype=order + "f4", count=3,
                                                             offset=108))
    no_scaling = slope == 0.0 or np.isnan(slope) or (slope == 1.0 and inter == 0.0)
    if kind is None or not no_scaling or offset != int(offset) or offset < 352:
        return None
    # the whole stream, verified (CRC-32 and length): nibabel would not notice corruption
    data = _gunzip(path, raw, unzip, head) if gz else raw
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


@quiet
def read_volume(path: Path, grid: Grid | None = None, reference: str | None = None,
                dtype: type = np.float32) -> np.ndarray:
    """A 3-D image's data (scaling applied) as ``dtype``, checked to lie on ``grid``.

    Raises
    ------
    UserError
        ``<path>: not on the grid of <reference>: <why>`` or an unreadable/4-D image.
    """
    full = _load(path, verify=True)
    img = _volume(full, path)
    _scalar(img, path)
    shape = _shape3(img, path)
    if grid is not None:
        why = grid.differs(shape, _affine(img, path))
        if why is not None:
            raise UserError(f"not on the grid of {reference or 'the first image'}: {why}", str(path))
    why = _short_data(full, path)
    if why is not None:
        raise UserError(why, str(path))
    try:
        data = np.asarray(img.get_fdata(dtype=np.float64 if dtype == np.float64 else np.float32))
    except Exception as exc:
        raise UserError(f"cannot read the image data ({type(exc).__name__}: {exc})", str(path)) from None
    return data.reshape(shape).astype(dtype, copy=False)


#: Characters that would break AFNI's label list or its XML, and their stand-ins.
_AFNI_UNSAFE = str.maketrans({"~": "-", '"': "'", "<": "(", ">": ")", "&": "+"})
#: AFNI's ID code prefix (its default ``IDCODE_PREFIX``).
AFNI_ID_PREFIX = "XYZ_"


def afni_idcode(identity: str) -> str:
    """An AFNI dataset ID code for ``identity``, made as AFNI's ``UNIQ_hashcode`` makes one:
    the MD5 hash of the text, Base64-encoded, its first 22 characters with ``/`` -> ``-``
    and ``+`` -> ``_``, after the prefix ``XYZ_`` (26 characters in all).  AFNI takes two
    datasets with the same ID code for one, so every map gets its own; the same identity
    always gives the same code (a re-export writes the same bytes)."""
    import base64
    import hashlib

    digest = hashlib.md5(identity.encode("utf-8", "surrogateescape"),
                         usedforsecurity=False).digest()
    code = base64.b64encode(digest).decode("ascii")[:22]
    return AFNI_ID_PREFIX + code.replace("/", "-").replace("+", "_")


def afni_labels(header, labels, idcode: str) -> bytes:
    """An AFNI NIfTI extension (code 4) naming the volumes (``BRICK_LABS``), so AFNI shows
    them (``3dinfo -label``), with the dataset's ID code ``idcode`` (:func:`afni_idcode`,
    unique per file).  ``NIfTI_nums`` records dimensions and datatype as AFNI does; AFNI
    ignores the extension if a later program changes them."""
    dim = [int(x) for x in header["dim"]]
    nt = dim[4] if dim[0] >= 4 else 1
    nu = dim[5] if dim[0] >= 5 else 1
    nums = f"{dim[1]},{dim[2]},{dim[3]},{nt},{nu},{int(header['datatype'])}"
    text = "~".join(str(x).translate(_AFNI_UNSAFE) for x in labels)
    return ("<?xml version='1.0' ?>\n<AFNI_attributes\n"
            f"  self_idcode=\"{idcode.translate(_AFNI_UNSAFE)}\"\n"
            f"  NIfTI_nums=\"{nums}\"\n  ni_form=\"ni_group\" >\n<AFNI_atr\n"
            "  ni_type=\"String\"\n  ni_dimen=\"1\"\n  atr_name=\"BRICK_LABS\" >\n"
            f" \"{text}\"\n</AFNI_atr>\n</AFNI_attributes>\n").encode("ascii", "replace")


def _input_geometry(info: dict, affine: np.ndarray, shape: tuple[int, ...]):
    """A NIfTI-1 header holding the input's qform and sform (codes, the raw quaternion and
    srow fields, qfac and voxel sizes) as recorded in ``space`` by :func:`nifti_space`, or
    ``None`` when they are not recorded (results of older versions) or do not place the
    voxels where ``affine`` (the results' ``affine``) does."""
    import nibabel as nib

    if not all(k in info for k in ("quatern", "pixdim", "srow")):
        return None
    try:
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(tuple(shape))  # the affine of a header without codes needs it
        for key, value in zip(_QUATERN_FIELDS, info["quatern"]):
            hdr[key] = float(value)
        for key, row in zip(_SROW_FIELDS, info["srow"]):
            hdr[key] = np.asarray(row, dtype=np.float64)
        pixdim = np.array(hdr["pixdim"], dtype=np.float64)
        pixdim[:4] = np.asarray(info["pixdim"], dtype=np.float64)
        hdr["pixdim"] = pixdim
        hdr["qform_code"] = int(info.get("qform_code", 0))
        hdr["sform_code"] = int(info.get("sform_code", 0))
        best = hdr.get_best_affine()
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    if not np.allclose(best, affine, rtol=0, atol=AFFINE_ATOL):
        return None
    return hdr


def save_map(path: Path, data: Any, affine: np.ndarray, description: str = "",
             space: str = "", intent: str | None = None,
             labels: tuple[str, ...] | None = None, idcode: str | None = None) -> None:
    """Write ``data`` (3-D or 4-D) as NIfTI with its own dtype (no scaling), atomically.

    ``data`` is an array or, for a map too large to hold whole, anything with ``shape``,
    ``dtype`` and ``volume(k)`` (the k-th 3-D volume; export's
    :class:`~mpiblmm.io.export.ScatteredMap`): the file is written a volume at a time
    (:func:`_atomic_stream`), so a map costs a volume of memory, not a grid per volume (a
    memory audit: a 24-column beta map of a 2 mm MNI grid took 165 MiB above the budget).

    ``space`` (the input's, see :func:`nifti_space`) gives the geometry: the input's qform
    and sform, each with its code and its own matrix, and the input's voxel sizes (pixdim),
    written back as the input had them; and the spatial units.  Without the recorded
    matrices (results of older versions) both transforms are ``affine`` with the input's
    codes; without ``space`` both codes are 1 (scanner) and the units mm.

    ``intent`` (a nibabel intent name such as ``"z score"``) is the map's intent; by default
    NONE.  The input's intent is never copied: it described the input, and a map of beta,
    p or Satterthwaite t (whose df vary by voxel) is no "t test (12)" map.  ``labels`` name
    the volumes for AFNI (:func:`afni_labels`), with the AFNI ID code ``idcode`` (default:
    one made from the absolute path of ``path``).  The file is written beside ``path``
    under a temporary name and renamed, so a reader never sees half a file and a
    re-export replaces maps in place.
    """
    import nibabel as nib

    info = json.loads(space) if space else {}
    if not hasattr(data, "volume"):
        data = np.asarray(data)
    shape, dtype = tuple(data.shape), np.dtype(data.dtype)
    # the header is made from a placeholder of the map's shape that costs no memory
    placeholder = np.broadcast_to(np.zeros((), dtype=dtype), shape)
    affine = np.asarray(affine, dtype=np.float64)
    geometry = (_input_geometry(info, affine, shape)
                if info.get("format", "nifti") == "nifti" else None)
    if geometry is not None:  # the affine is the header's own: nibabel keeps the header
        img = nib.Nifti1Image(placeholder, geometry.get_best_affine(), header=geometry)
    else:
        img = nib.Nifti1Image(placeholder, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units(info.get("xyz_units", "mm"))
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    if geometry is None:
        img.set_qform(img.affine, code=int(info.get("qform_code", 1)))
        img.set_sform(img.affine, code=int(info.get("sform_code", 1)))
    if intent is not None and intent != "none":
        img.header.set_intent(intent, (), name="mpiblmm")
    else:
        img.header.set_intent("none", (), name="")
    if labels:
        code = idcode or afni_idcode(os.path.abspath(path))
        img.header.extensions.append(
            nib.nifti1.Nifti1Extension(4, afni_labels(img.header, labels, code)))
    if len(shape) == 3:
        volumes = (data if isinstance(data, np.ndarray) else data.volume(0),)
    else:
        volumes = (data[..., k] if isinstance(data, np.ndarray) else data.volume(k)
                   for k in range(shape[3]))
    _atomic_stream(img, volumes, Path(path))


def _atomic_stream(img, volumes, path: Path) -> None:
    """Write the NIfTI-1 image ``img`` (its header final; its data ignored) with the 3-D
    arrays ``volumes`` as its data, one after the other, atomically as :func:`_atomic_save`:
    the bytes ``nib.save`` writes for the whole array (header and extensions, padding to
    ``vox_offset``, then the data in Fortran order, the last axis slowest), through the
    file opener it uses (gzip for ``.nii.gz``)."""
    from nibabel.openers import ImageOpener
    from nibabel.volumeutils import seek_tell

    def write(tmp: Path) -> None:
        img.update_header()
        header = img.header
        out = header.get_data_dtype()
        with ImageOpener(str(tmp), "wb") as fobj:
            header.write_to(fobj)
            seek_tell(fobj, header.get_data_offset(), write0=True)
            for vol in volumes:
                fobj.write(np.asarray(vol, dtype=out).tobytes(order="F"))

    _atomically(path, write)


def _atomically(path: Path, write) -> None:
    """``write(tmp)`` to :func:`_temporary_name` of ``path``, then rename it to ``path`` (a
    reader never sees half a file); the temporary file never stays."""
    tmp = _temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _temporary_name(path: Path) -> Path:
    """Where a map is written before it is renamed to ``path``: beside it, hidden, with the
    writer's pid, the suffix kept (``.nii.gz``, ``.func.gii``, ``.dscalar.nii``) so that
    nibabel picks the format from it."""
    name = path.name
    suffix = next((s for s in MAP_SUFFIXES if name.endswith(s)), path.suffix)
    return path.with_name(f".{name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")


def _atomic_save(img, path: Path) -> None:
    """``nib.save`` under a temporary name beside ``path``, then rename (readers never see
    half a file).  Suffixes with two parts (``.nii.gz``, ``.func.gii``, ``.dscalar.nii``)
    are kept so nibabel picks the format from the temporary name."""
    import nibabel as nib

    _atomically(path, lambda tmp: nib.save(img, str(tmp)))
