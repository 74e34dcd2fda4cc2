"""Surface data: GIfTI (``.func.gii``, ``.shape.gii``) and CIFTI-2 dense scalar (``.dscalar.nii``).

Behind the same interface as :mod:`mpiblmm.io.nifti` (``read_grid``, ``read_volume``, a map
writer), so packing, fitting and the results file do not know they hold a surface:

- a study's ``N`` vertices (GIfTI) or grayordinates (CIFTI) are a grid of shape ``(N, 1, 1)``
  with the identity affine; one file per observation, holding one map;
- the :class:`~mpiblmm.io.nifti.Grid`'s ``space`` JSON says which format and carries what the
  writer needs to give the maps back in that format: GIfTI's structure metadata, CIFTI's
  brain-model axis (its XML, compressed; for very large headers the path of the first input,
  which must then still exist at export, with the :func:`models_digest` of its brain models:
  a file that has other brain models by then is refused, never written into the maps);
- every image and mask must be of the first image's structure: a GIfTI whose
  ``AnatomicalStructurePrimary`` differs from the first image's (a right hemisphere among left
  ones, with the same vertex count) is refused, as is a CIFTI file whose brain models differ
  (:func:`structure_problem`); a GIfTI without that metadata is not checked;
- a ``.label.gii`` or ``.dlabel.nii`` file is read as a mask (its label keys; non-zero:
  inside), never as data; other CIFTI kinds (``.dtseries.nii``, parcels, connectomes) are
  refused by name (:func:`cifti_kind_problem`);
- where the first GIfTI names no structure, the files that do must agree with each other
  (:func:`one_structure`), and the maps carry theirs;
- :func:`save_surface_map` writes ``(N, k)`` maps as one ``.func.gii`` with k data arrays, or one
  ``.dscalar.nii`` with k named scalar rows, atomically (temporary name, then rename).

GIfTI allows float32, int32 and uint8 data only: float maps are written as float32 there.
CIFTI maps keep their dtype.
"""

from __future__ import annotations

import base64
import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mpiblmm.errors import UserError
from mpiblmm.io.nifti import Grid, _atomic_save, quiet

GIFTI_SUFFIXES = (".func.gii", ".shape.gii")
#: A GIfTI label file (a surface ROI): accepted as an analysis or observation mask only.
GIFTI_MASK_SUFFIXES = GIFTI_SUFFIXES + (".label.gii",)
CIFTI_SUFFIXES = (".dscalar.nii",)
#: A CIFTI dense label file (a grayordinate ROI): accepted as a mask only, as ``.label.gii``.
CIFTI_MASK_SUFFIXES = CIFTI_SUFFIXES + (".dlabel.nii",)
#: CIFTI-2 files of other kinds (Connectome Workbench's names), refused by name: they are
#: NIfTI-2 files too, and read as volumes they were refused in words about 3-D images.
OTHER_CIFTI = {".dtseries.nii": "a dense time series", ".ptseries.nii": "a parcel time series",
               ".pscalar.nii": "a parcel scalar file", ".plabel.nii": "a parcel label file",
               ".dconn.nii": "a dense connectome", ".pconn.nii": "a parcel connectome",
               ".pdconn.nii": "a parcel-dense connectome",
               ".dpconn.nii": "a dense-parcel connectome"}
#: The GIfTI metadata that names the structure (hemisphere) a file's vertices belong to.
STRUCTURE_KEY = "AnatomicalStructurePrimary"
#: Largest compressed CIFTI header kept inside ``space`` (HDF5 attributes stop at 64 KiB).
MAX_HEADER_CHARS = 48_000
#: Keys of a CIFTI ``space`` that keeps the path of its template (the first input): the
#: :func:`models_digest` and the number of grayordinates of its brain models at the fit.
TEMPLATE_DIGEST = "template_models_sha256"
TEMPLATE_COUNT = "template_grayordinates"
#: GIfTI data arrays may hold these dtypes only (GIfTI 1.0, section 2.3.4).
_GIFTI_DTYPES = {"u": np.uint8, "i": np.int32, "f": np.float32, "b": np.uint8}


def surface_format(path: Path | str) -> str | None:
    """``"gifti"``, ``"cifti"`` or ``None`` (not a surface file) from the file name."""
    name = str(path)
    if name.endswith(GIFTI_MASK_SUFFIXES):
        return "gifti"
    if name.endswith(CIFTI_MASK_SUFFIXES):
        return "cifti"
    return None


def cifti_kind_problem(name: str, mask: bool) -> str | None:
    """Why a file named ``name`` cannot be an image (``mask``: a mask) by its CIFTI kind;
    ``None`` for dense scalar files (and dense label masks) and for non-CIFTI names."""
    found = next(((s, what) for s, what in OTHER_CIFTI.items() if name.endswith(s)), None)
    if found is None and not mask and name.endswith(".dlabel.nii"):
        found = (".dlabel.nii", "a dense label file (a mask, not data)")
    if found is None:
        return None
    return (f"{found[1]} ({found[0]}): CIFTI images are read from dense scalar "
            f"files (.dscalar.nii), one map per observation"
            + ("" if mask else "; masks may also be dense label files (.dlabel.nii)"))


def _load(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise UserError("file not found", str(path)) from None
    except Exception as exc:
        raise UserError(f"not a readable surface file ({type(exc).__name__}: {exc})",
                        str(path)) from None


def maps_problem(fmt: str, count: int) -> str:
    """The words for a surface file holding ``count`` maps where one (one observation) is
    expected: mpiblmm reads one observation per surface file."""
    if fmt == "gifti":
        return (f"a GIfTI file with {count} data arrays: expected one data array (give one file "
                "per observation)")
    return f"a CIFTI file with {count} maps: expected one map (give one file per observation)"


@quiet
def count_maps(path: Path) -> int:
    """The number of maps in the surface file ``path``: GIfTI data arrays, CIFTI rows."""
    img = _load(Path(path))
    if surface_format(path) == "gifti":
        return len(img.darrays)
    return int(img.shape[0]) if len(img.shape) == 2 else 1


def _gifti_data(img, path: Path) -> np.ndarray:
    arrays = img.darrays
    if len(arrays) != 1:
        raise UserError(maps_problem("gifti", len(arrays)), str(path))
    data = np.asarray(arrays[0].data)
    if data.ndim != 1 and not (data.ndim == 2 and 1 in data.shape):
        raise UserError(f"expected a per-vertex map, got data of shape {data.shape}", str(path))
    return data.reshape(-1)


def _cifti_data(img, path: Path) -> np.ndarray:
    from nibabel import cifti2

    if not isinstance(img, cifti2.Cifti2Image):
        raise UserError("not a CIFTI-2 file", str(path))
    if len(img.shape) == 2 and img.shape[0] != 1:
        raise UserError(maps_problem("cifti", img.shape[0]), str(path))
    if len(img.shape) != 2:
        raise UserError(f"expected a dense scalar file with one map (1 x grayordinates), "
                        f"got shape {img.shape}", str(path))
    if not isinstance(img.header.get_axis(1), cifti2.BrainModelAxis):
        raise UserError("expected dense data (brain models along the second axis)", str(path))
    try:
        return np.asarray(img.get_fdata(dtype=np.float64)).reshape(-1)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # (its header read well)
        # nibabel's words, on one line and without the file name (given first)
        why = " ".join(str(exc).split(str(path))[0].split()).removesuffix(" from")
        raise UserError(f"its data could not be read, the file is cut short or damaged ({why})",
                        str(path)) from None


def _gifti_meta(img) -> dict:
    """A GIfTI's ``AnatomicalStructure*`` metadata: the file's, overridden by its data
    array's."""
    meta = dict(img.meta) if img.meta is not None else {}
    darray_meta = dict(img.darrays[0].meta) if img.darrays[0].meta is not None else {}
    return {k: v for k, v in {**meta, **darray_meta}.items() if k.startswith("AnatomicalStructure")}


def _space(img, fmt: str, path: Path) -> str:
    if fmt == "gifti":
        return json.dumps({"format": "gifti", "meta": _gifti_meta(img)}, sort_keys=True)
    xml = img.header.to_xml()
    packed = base64.b64encode(zlib.compress(xml, 9)).decode("ascii")
    info: dict[str, Any] = {"format": "cifti"}
    if len(packed) <= MAX_HEADER_CHARS:
        info["header"] = packed
    else:  # the export reloads the file: what it must find there, to know it is this one
        models = img.header.get_axis(1)
        info["template"] = str(Path(path).resolve())
        info[TEMPLATE_DIGEST] = models_digest(models)
        info[TEMPLATE_COUNT] = int(len(models))
    return json.dumps(info, sort_keys=True)


def models_digest(axis) -> str:
    """A SHA-256 of a CIFTI brain-model axis: every grayordinate's structure, vertex and
    voxel index, the vertex counts of the surfaces and the volume's shape and affine --
    what the maps' brain models are (not the file's bytes, nor nibabel's XML, which may
    change with nibabel's version for the same models)."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps({"n": len(axis), "nvertices": {str(k): int(v) for k, v in
                                                       axis.nvertices.items()},
                         "volume_shape": None if axis.volume_shape is None
                         else [int(x) for x in axis.volume_shape]}, sort_keys=True).encode())
    h.update("\n".join(str(n) for n in axis.name).encode("utf-8", "surrogateescape"))
    for array in (axis.vertex, axis.voxel) + (() if axis.affine is None else (axis.affine,)):
        kind = "<f8" if np.asarray(array).dtype.kind == "f" else "<i8"
        h.update(np.ascontiguousarray(array, dtype=kind).tobytes())
    return h.hexdigest()


def points(fmt: str) -> str:
    """What a surface file's values are counted in: GIfTI vertices, CIFTI grayordinates
    (vertices and voxels together)."""
    return "grayordinates" if fmt == "cifti" else "vertices"


def _grid(n: int, space: str) -> Grid:
    return Grid((int(n), 1, 1), np.eye(4), space)


@quiet
def read_grid(path: Path) -> Grid:
    """The grid of a surface file: ``(N, 1, 1)``, identity affine, and its ``space``."""
    path = Path(path)
    fmt = surface_format(path)
    img = _load(path)
    data = _gifti_data(img, path) if fmt == "gifti" else _cifti_data(img, path)
    if data.size == 0:  # nothing could be fitted (the fit would find no voxel observed)
        raise UserError("holds no vertex: its map is empty", str(path))
    return _grid(data.size, _space(img, fmt, path))


@quiet
def read_volume(path: Path, grid: Grid | None = None, reference: str | None = None,
                dtype: type = np.float32, seen: dict | None = None) -> np.ndarray:
    """A surface file's one map as ``(N, 1, 1)`` ``dtype``, checked to have ``grid``'s size.
    ``seen``: a GIfTI's structure, where it names one, is recorded there (structure -> the
    first file naming it), for :func:`one_structure`."""
    path = Path(path)
    fmt = surface_format(path)
    img = _load(path)
    data = _gifti_data(img, path) if fmt == "gifti" else _cifti_data(img, path)
    if seen is not None and fmt == "gifti":
        structure = _structure(img, fmt)
        if structure is not None:
            seen.setdefault(structure, str(path))
    if grid is not None:
        why = grid.differs((data.size, 1, 1), np.eye(4))
        if why is not None:
            raise UserError(f"not on the surface of {reference or 'the first image'}: "
                            f"{data.size} {points(fmt)}, expected {grid.shape[0]}", str(path))
        why = structure_problem(grid.space, _structure(img, fmt), reference)
        if why is not None:
            raise UserError(why, str(path))
    return data.astype(dtype).reshape(-1, 1, 1)


def _structure(img, fmt: str) -> Any:
    """What a surface file covers: a GIfTI's structure name (``None`` when it has none), a
    CIFTI file's brain-model axis."""
    if fmt == "gifti":
        return _gifti_meta(img).get(STRUCTURE_KEY)
    return img.header.get_axis(1)


@lru_cache(maxsize=8)
def _space_structure(space: str) -> tuple[str, Any]:
    """(format, what it covers) of a grid's ``space``, as :func:`_structure` gives it for
    the image it came from; cached, as every image of a study is compared with one space."""
    info = json.loads(space) if space else {}
    fmt = str(info.get("format", ""))
    if fmt == "gifti":
        return fmt, info.get("meta", {}).get(STRUCTURE_KEY)
    if fmt == "cifti":
        return fmt, _brain_models(info)
    return fmt, None


def named_structure(space: str) -> str | None:
    """The ``AnatomicalStructurePrimary`` a GIfTI grid's ``space`` names (``None``: none, or
    not GIfTI)."""
    fmt, structure = _space_structure(space)
    return structure if fmt == "gifti" else None


def one_structure(space: str, seen: Sequence[tuple[str, str]]) -> tuple[str, str | None]:
    """A GIfTI study whose first image names no structure: the files that name one
    (``seen``: (structure, file) in the images' order) must name the same, which the maps
    then carry.  Returns the ``space`` with that structure (unchanged if none is named) and
    the problem, ``"<file>: <why>"``, when two files name different structures."""
    first: tuple[str, str] | None = None
    for structure, path in seen:
        if first is None:
            first = (structure, path)
        elif structure != first[0]:
            return space, (f"{path}: anatomical structure {structure}, but {first[1]} is "
                           f"{first[0]}: every image and mask of a surface study must be of "
                           "one structure")
    if first is None:
        return space, None
    info = json.loads(space)
    info["meta"] = {**info.get("meta", {}), STRUCTURE_KEY: first[0]}
    return json.dumps(info, sort_keys=True), None


def _cifti_structures(axis) -> str:
    return ", ".join(sorted({str(n).replace("CIFTI_STRUCTURE_", "") for n in axis.name})) or "none"


def structure_problem(space: str, structure: Any, reference: str | None = None) -> str | None:
    """Why a surface file covering ``structure`` (:func:`_structure`) cannot be read with the
    first image's, whose grid ``space`` is given; ``None`` when it can.

    The rule: a study is one surface.  GIfTI: when both name an ``AnatomicalStructurePrimary``
    they must be the same (the vertex count alone cannot tell a left hemisphere from a right
    one).  CIFTI: the brain models (structures, vertex and voxel indices) must be the same.
    Files of another format are :func:`mpiblmm.io.images.kind_problem`'s.
    """
    fmt, first = _space_structure(space)
    ref = reference or "the first image"
    if fmt == "gifti" and structure is not None and first is not None and structure != first:
        return (f"anatomical structure {structure}, but {ref} is {first}: every image and "
                "mask of a surface study must be of one structure")
    if fmt == "cifti" and not isinstance(structure, str) and structure is not None \
            and structure != first:
        mine, theirs = _cifti_structures(structure), _cifti_structures(first)
        what = (f"brain models of {mine}, but {ref} has {theirs}" if mine != theirs else
                f"other brain models (vertices or voxels of {mine}) than {ref}")
        return f"{what}: every image and mask of a CIFTI study must have the same brain models"
    return None


def space_problem(space: str, other: str, reference: str | None = None) -> str | None:
    """:func:`structure_problem` between two grids' ``space`` (the first image's, another
    file's, both from :func:`read_grid`), for checks that read headers only."""
    fmt, covers = _space_structure(other)
    if fmt not in ("gifti", "cifti"):
        return None
    return structure_problem(space, covers, reference)


@quiet
def _brain_models(info: dict):
    """The CIFTI brain-model axis stored in a ``space``."""
    from nibabel.cifti2.parse_cifti2 import Cifti2Extension

    if "header" in info:
        try:
            xml = zlib.decompress(base64.b64decode(str(info["header"]), validate=True))
            return Cifti2Extension(code=32, content=xml).get_content().get_axis(1)
        except Exception as exc:  # noqa: BLE001  (base64, zlib, XML and nibabel's own errors)
            raise UserError(f"its CIFTI brain models cannot be read "
                            f"({type(exc).__name__}: {exc})", "attribute 'space'") from None
    template = Path(info.get("template", ""))
    if not template.is_file():
        raise UserError("the CIFTI template (the first input image, whose brain models the maps "
                        "need) is gone", str(template))
    axis = _template_models(template)
    if TEMPLATE_DIGEST in info and models_digest(axis) != info[TEMPLATE_DIGEST]:
        raise _template_changed(template, len(axis), info.get(TEMPLATE_COUNT))
    return axis


def stored_space_problem(info: dict, n: int) -> str | None:
    """Why a surface ``space`` stored in a packed or results file (parsed: ``info``) cannot
    give maps of ``n`` vertices or grayordinates back in its format; ``None`` when it can.
    A space mpiblmm wrote always can: this catches hand-made packed files."""
    fmt = info.get("format")
    if fmt == "gifti":
        meta = info.get("meta", {})
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in meta.items()):
            return "its GIfTI 'meta' must be an object of text values"
        return None
    if "header" not in info and "template" not in info:
        return "its CIFTI brain models are missing (neither 'header' nor 'template')"
    try:
        models = _brain_models(info)   # (a template gone or changed: its own error, naming it)
    except UserError as exc:
        if "header" not in info:
            raise
        return str(exc).removeprefix("attribute 'space': ")
    if len(models) != n:
        return f"its CIFTI brain models hold {len(models)} grayordinates, the data {n}"
    return None


def _template_models(template: Path):
    """The brain-model axis of the CIFTI template, refused in one line when the file is no
    longer a dense CIFTI file (replaced since the fit)."""
    from nibabel import cifti2

    img = _load(template)
    try:
        axis = img.header.get_axis(1)
    except Exception:  # a NIfTI now has that name
        axis = None
    if not isinstance(axis, cifti2.BrainModelAxis):  # (or CIFTI of parcels, of series...)
        raise UserError("changed since the fit: the CIFTI template (the first input image, "
                        "whose brain models the maps need) is no longer a dense CIFTI file; "
                        "restore the file the fit read", str(template))
    return axis


def _template_changed(template: Path, count: int, expected: Any) -> UserError:
    """The refusal of a CIFTI template whose brain models are not those the fit read."""
    was = f", {expected} at the fit" if expected is not None else ""
    return UserError(f"changed since the fit: the CIFTI template (the first input image, "
                     f"whose brain models the maps need) now has other brain models "
                     f"({count} grayordinates{was}); restore the file the fit read",
                     str(template))


def save_surface_map(path: Path, data: np.ndarray, space: str, names: Sequence[str],
                     description: str = "", intent: str | None = None) -> None:
    """Write per-vertex ``data`` (N,) or (N, k) in the format of ``space``, atomically.

    GIfTI: one data array per column, named by ``names`` (metadata ``Name``), float32/int32/
    uint8, with the NIfTI intent ``intent`` (a nibabel name such as ``"z score"``, as for the
    volume maps; NONE by default).  CIFTI: a dense scalar file (intent ConnDenseScalar, which
    the format fixes), one named row per column, the input's brain models.
    """
    data = np.asarray(data)
    data = data.reshape(data.shape[0], -1)
    info = json.loads(space)
    if info["format"] == "gifti":
        from nibabel import gifti

        from nibabel.nifti1 import intent_codes

        dtype = _GIFTI_DTYPES[data.dtype.kind]
        code = intent_codes.niistring[intent or "none"]
        meta = dict(info.get("meta", {}))
        if description:
            meta["Description"] = description
        img = gifti.GiftiImage(meta=gifti.GiftiMetaData(meta))
        for j, name in enumerate(names):
            img.add_gifti_data_array(gifti.GiftiDataArray(
                np.ascontiguousarray(data[:, j].astype(dtype)), intent=code,
                datatype=np.dtype(dtype).name, meta=gifti.GiftiMetaData({"Name": str(name)})))
    else:
        from nibabel import cifti2

        models = _brain_models(info)
        if "template" in info and len(models) != data.shape[0]:  # an older results file's
            # template (no digest kept), replaced since: nibabel would fail, in two lines
            raise _template_changed(Path(info.get("template", "")), len(models), data.shape[0])
        axes = (cifti2.ScalarAxis([str(n) for n in names]), models)
        img = cifti2.Cifti2Image(np.ascontiguousarray(data.T), cifti2.Cifti2Header.from_axes(axes))
        # the intent name too, as Workbench writes it (readers key on the code)
        img.nifti_header.set_intent("ConnDenseScalar", name="ConnDenseScalar")
    _atomic_save(img, Path(path))


__all__ = ["GIFTI_SUFFIXES", "GIFTI_MASK_SUFFIXES", "CIFTI_SUFFIXES", "CIFTI_MASK_SUFFIXES",
           "cifti_kind_problem", "count_maps", "named_structure", "one_structure",
           "maps_problem", "surface_format", "read_grid", "read_volume", "save_surface_map",
           "space_problem", "stored_space_problem", "structure_problem"]
