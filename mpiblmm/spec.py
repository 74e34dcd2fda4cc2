"""Read and validate an analysis spec (JSON, matrix or formula form): the one place that
knows its keys.

:func:`load_spec` turns ``spec.json`` into a frozen :class:`Spec`.  It validates the keys,
types and values against the JSON Schema of :mod:`mpiblmm.schema` (``mpiblmm schema``),
then checks what the schema cannot, resolves every path and checks that the files exist.  It reads no CSV
and of the images only the first one's header, for how many observations it holds (a 4-D
``images`` file, or a 4-D or multi-map file in a list, where one file is one observation):
:mod:`mpiblmm.design` reads the tables, :mod:`mpiblmm.io.ingest` the images.
Every problem is a :class:`~mpiblmm.errors.SpecError` whose text is one line,
``spec.json: <key>: <problem>`` (or ``<file>: row N: <problem>`` for a list file).

Paths in the spec are relative to the spec file's folder unless absolute; paths inside a list
file (``images.txt``, a masks list) are relative to that list file's folder.  Paths are kept
as written joined to those folders (not made absolute), so messages show what the user typed.

The full contract, for users, is ``docs/SPEC.md``.  The spec is cheap to load but stats every
image; in an MPI job load it on one rank and broadcast the (picklable) :class:`Spec`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpiblmm.errors import SpecError
from mpiblmm.io.surface import cifti_kind_problem

#: Names of contrasts and factors become HDF5 group names and file names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit"

#: The longest file name (in bytes) of common file systems (``NAME_MAX``: ext4, XFS, NFS,
#: Lustre, GPFS).
NAME_MAX = 255
#: The longest file names ``export`` writes for a contrast or a random factor of name ``{}``:
#: the temporary name of a map, ``.<map>.tmp<pid><suffix>`` (``mpiblmm.io.nifti``'s atomic
#: save), with the longest statistic of a contrast (``neglog10p``, ``docs/RESULTS.md``), the
#: largest Linux pid (``pid_max`` is at most 4194304) and the longest map suffix
#: (``.dscalar.nii``; NIfTI's is ``.nii.gz``).  A name that makes these longer than
#: :data:`NAME_MAX` would fail only when the maps are written, after the whole fit.
LONGEST_MAP_FILES = {
    "contrast": (".con_{}_neglog10p.tmp4194304.dscalar.nii", "con_<name>_neglog10p.nii.gz"),
    "factor": (".random_{}.tmp4194304.dscalar.nii", "random_<name>.nii.gz"),
}

#: Image files: NIfTI volumes (CIFTI dense scalar .dscalar.nii included) and GIfTI surface maps
#: (mpiblmm.io.images picks the reader).
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".func.gii", ".shape.gii")
#: Mask files: images, and GIfTI label files (a surface ROI; inside where the label is not 0).
MASK_SUFFIXES = NIFTI_SUFFIXES + (".label.gii",)
IMAGE_KINDS = "a NIfTI file (.nii, .nii.gz), GIfTI (.func.gii, .shape.gii) or CIFTI (.dscalar.nii)"
MASK_KINDS = ("a NIfTI file (.nii, .nii.gz), GIfTI (.func.gii, .shape.gii, .label.gii) or CIFTI "
              "(.dscalar.nii, .dlabel.nii)")
#: Characters of a shell wildcard: paths are never expanded, so a glob names no file.
GLOB_CHARACTERS = re.compile(r"[*?\[]")
ALTERNATIVES = ("two-sided", "greater", "less")
#: The largest ``estimation.max_iterations``: far above what a voxel needs (the default is
#: 300, BLMM's 10000), and small enough for the estimator's integer counters.
MAX_ITERATIONS = 10**6
#: The largest ``max_memory_mb`` (and ``--max-memory-mb``): 2**30 MiB, 1 PiB per rank, far
#: above any node's memory.  The budget is turned into byte counts (MiB x 2**20) that size the
#: chunks; a budget near the largest float (1e308) overflowed them, after the inputs were
#: packed.
MAX_MEMORY_MB = 2**30

TOP_KEYS = frozenset({
    "images", "X", "random", "covariates", "formula", "contrasts", "output", "fixed_names",
    "analysis_mask", "observation_masks", "zero_is_missing", "missingness", "estimation",
    "max_memory_mb",
})
#: The keys of each form: a spec is in exactly one of them.
MATRIX_KEYS = ("X", "random")
FORMULA_KEYS = ("covariates", "formula")


def max_name_bytes(kind: str) -> int:
    """The longest name (UTF-8 bytes) a ``kind`` (``"contrast"`` or ``"factor"``) may have
    for its map files to fit in :data:`NAME_MAX`."""
    return NAME_MAX - len(LONGEST_MAP_FILES[kind][0].format("").encode("utf-8"))


def name_length_problem(name: str, kind: str) -> str | None:
    """Why ``name`` cannot name a contrast or factor (its map file names would be too long
    for the file system), or ``None`` when it can."""
    size, limit = len(name.encode("utf-8")), max_name_bytes(kind)
    if size <= limit:
        return None
    return (f"name too long: {size} bytes, at most {limit} (it names the map files, e.g. "
            f"{LONGEST_MAP_FILES[kind][1]}, and a file name has at most {NAME_MAX} bytes)")


def short_name(name: str, width: int = 40) -> str:
    """``name``, cut to ``width`` characters with ``...`` (for messages about long names)."""
    return name if len(name) <= width else name[: width - 3] + "..."


# --------------------------------------------------------------------------- the Spec
class VolumePath(type(Path())):  # type: ignore[misc]
    """Volume ``volume`` (from 0) of a 4-D NIfTI: one observation of a 4-D ``images``.

    A path to the file (``str`` shows the file) that also says which volume to read;
    :mod:`mpiblmm.io.nifti` reads that volume.  Pickles with its volume (specs are
    broadcast to every rank).
    """

    volume: int = 0

    def __reduce__(self):
        return volume_path, (str(self), self.volume)


def volume_path(path: str | os.PathLike, volume: int) -> VolumePath:
    """The path of volume ``volume`` of the 4-D image ``path``."""
    p = VolumePath(path)
    p.volume = int(volume)
    return p


@dataclass(frozen=True)
class PackedImages:
    """Images already packed into HDF5 (``"images": {"h5": ..., "dataset": ...}``)."""

    h5: Path
    dataset: str


@dataclass(frozen=True)
class FactorSpec:
    """One grouping factor of the matrix form.

    ``design`` is ``None`` for a random intercept only (a column of ones).
    """

    name: str
    factor: Path
    design: Path | None
    effect_names: tuple[str, ...] | None


@dataclass(frozen=True)
class ContrastSpec:
    """A contrast as written: ``kind`` is ``"T"`` (one row) or ``"F"`` (a list of rows).

    Rows are numbers in coefficient order (``weights``) or, in ``by_name``, coefficient
    name -> weight pairs (a JSON object; then ``weights`` is empty until the names are known).
    """

    name: str
    weights: tuple[tuple[float, ...], ...]
    kind: str
    alternative: str
    by_name: tuple[tuple[tuple[str, float], ...], ...] | None = None


@dataclass(frozen=True)
class Missingness:
    """Minimum observations for a voxel to be fitted; ``min_n=None`` lets the estimator decide."""

    min_n: int | None = None
    min_fraction: float = 0.0


@dataclass(frozen=True)
class Estimation:
    """Estimator settings; ``None`` means the estimator's own default."""

    method: str = "REML"
    tolerance: float | None = None
    max_iterations: int | None = None


@dataclass(frozen=True)
class Spec:
    """A validated analysis spec, matrix form (``X``, ``random``) or formula form
    (``covariates``, ``formula``; then ``X`` is ``None`` and ``random`` empty).

    Exactly one of ``images`` (NIfTI paths, one per observation) and ``packed`` is set.
    ``text`` is the spec file as read, kept for the results file's ``spec`` attribute.
    ``contrasts`` is ``None`` when the key is absent (the formula form then tests every
    coefficient and every term of several columns).
    """

    path: Path
    text: str
    images: tuple[Path, ...] | None
    packed: PackedImages | None
    X: Path | None
    random: tuple[FactorSpec, ...]
    contrasts: tuple[ContrastSpec, ...] | None
    output: Path
    covariates: Path | None = None
    formula: str | None = None
    fixed_names: tuple[str, ...] | None = None
    analysis_mask: Path | None = None
    observation_masks: tuple[Path, ...] | None = None
    zero_is_missing: bool = True
    missingness: Missingness = Missingness()
    estimation: Estimation = Estimation()
    max_memory_mb: float | None = None

    @property
    def folder(self) -> Path:
        """The folder relative paths in the spec are resolved against."""
        return self.path.parent

    @property
    def is_formula(self) -> bool:
        """True for the formula form."""
        return self.formula is not None

    @property
    def n_images(self) -> int | None:
        """Number of NIfTI images, or ``None`` for packed input (known once the file is open)."""
        return None if self.images is None else len(self.images)


# --------------------------------------------------------------------------- loading
def load_spec(path: str | os.PathLike, check_files: bool = True,
              check_listed: bool = True) -> Spec:
    """Read and validate ``spec.json``.

    Parameters
    ----------
    path
        The spec file.
    check_files
        Check that every named file exists (one ``stat`` per image).
    check_listed
        With ``check_files``: also the files of the ``images`` and ``observation_masks``
        lists.  ``False`` leaves them to the caller (the fit shares their ``stat`` calls over
        its ranks: :func:`mpiblmm.io.ingest.shared_input_fingerprint`); the list files
        themselves and every other file are still checked.

    Returns
    -------
    Spec

    Raises
    ------
    SpecError
        One line naming the spec file and key, or the list file and row.
    """
    path = Path(path)
    text, raw = read_spec_json(path)
    return parse_spec(raw, path, text=text, check_files=check_files, check_listed=check_listed)


def read_spec_json(path: str | os.PathLike) -> tuple[str, Any]:
    """The spec file's text and its decoded JSON (``fit`` and ``check`` both read it so).

    Raises
    ------
    SpecError
        One line naming the spec file: unreadable, not UTF-8, not JSON, a key given twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror or exc}", str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text (byte {exc.start + 1} cannot be decoded); save the "
                        "spec as UTF-8", str(path)) from None
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise SpecError(f"key given twice: {exc.args[0]!r}", str(path)) from None
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
            f"{_yaml_hint(text)}", str(path)) from None
    except RecursionError:  # Python's decoder recurses once per level of [ and {
        raise SpecError("not valid JSON for mpiblmm: nested too deeply (lists or objects "
                        "inside each other hundreds of levels deep)", str(path)) from None
    except ValueError as exc:  # a literal too long for an int (Python's int_max_str_digits)
        problem = (f"a number with more than {_max_digits()} digits" if "digits" in str(exc)
                   else " ".join(str(exc).split()))
        raise SpecError(f"not valid JSON for mpiblmm: {problem}", str(path)) from None
    return text, raw


def _yaml_hint(text: str) -> str:
    """A note for a spec written as YAML (``key: value`` lines, BLMM's format): what to do."""
    first = next((line for line in text.splitlines() if line.strip()
                  and not line.lstrip().startswith("#")), "")
    if re.match(r"\s*[A-Za-z_][\w ]*:\s", first + " ") and not first.lstrip().startswith("{"):
        return (" (this looks like YAML: a spec is JSON; a BLMM configuration is converted by "
                "mpiblmm convert-blmm)")
    return ""


def _max_digits() -> int:
    """The most digits Python turns into an int (``sys.get_int_max_str_digits``, 4300)."""
    import sys

    get = getattr(sys, "get_int_max_str_digits", None)
    return get() if get is not None else 4300


def parse_spec(raw: Any, path: Path, text: str | None = None, check_files: bool = True,
               check_listed: bool = True) -> Spec:
    """Validate an already decoded spec; ``path`` is where it came from (for messages, paths).
    ``check_files``, ``check_listed``: as :func:`load_spec`'s."""
    v = _Validator(Path(path), check_files, check_listed)
    if not isinstance(raw, dict):
        raise SpecError("expected a JSON object at the top level", str(path))
    from mpiblmm.schema import schema_problems

    problems = schema_problems(raw)  # keys, types, ranges, names: the JSON Schema's rules
    if problems:
        raise v.error(*problems[0])
    # What the schema cannot say: files, paths in list files, rows of F contrasts, names
    # that appear twice, cross-key rules.
    formula_form = "formula" in raw
    images, packed = v.images(raw["images"])
    masks = None
    if "observation_masks" in raw:
        if packed is not None:
            raise v.error("observation_masks", "not allowed with packed HDF5 images "
                          "(apply the masks when packing)")
        masks = v.path_list(raw["observation_masks"], "observation_masks", nifti=True,
                            mask=True)
        if images is not None and len(masks) != len(images):
            raise v.error("observation_masks", f"{len(masks)} masks for {len(images)} images "
                          "(give one mask per image)")
    return Spec(
        path=Path(path),
        text=text if text is not None else json.dumps(raw, indent=2),
        images=images,
        packed=packed,
        X=None if formula_form else v.file(raw["X"], "X"),
        random=() if formula_form else v.random(raw["random"]),
        contrasts=v.contrasts(raw["contrasts"]) if "contrasts" in raw else None,
        output=v.resolve(v.path_text(raw.get("output", "results"), "output")),
        covariates=v.file(raw["covariates"], "covariates") if formula_form else None,
        formula=v.string(raw["formula"], "formula") if formula_form else None,
        fixed_names=v.names(raw["fixed_names"], "fixed_names") if "fixed_names" in raw else None,
        analysis_mask=(v.file(raw["analysis_mask"], "analysis_mask", nifti=True, mask=True)
                       if raw.get("analysis_mask") is not None else None),
        observation_masks=masks,
        zero_is_missing=v.boolean(raw.get("zero_is_missing", True), "zero_is_missing"),
        missingness=v.missingness(_or_default(raw, "missingness", {})),
        estimation=v.estimation(_or_default(raw, "estimation", {})),
        max_memory_mb=(v.memory_mb(raw["max_memory_mb"])
                       if raw.get("max_memory_mb") is not None else None),
    )


def unknown_key(key: str, allowed: Any) -> str:
    """``unknown key`` with a did-you-mean suggestion and the allowed keys."""
    import difflib

    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (allowed: {', '.join(sorted(allowed))})"


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _Validator:
    """What the JSON Schema cannot say, for a spec that passed it (:mod:`mpiblmm.schema`
    checks keys, types, ranges, name patterns and enumerations first): blank strings,
    non-finite numbers (Python's JSON reads NaN), names given twice, files, rows of F
    contrasts.  Every method raises a one-line :class:`SpecError`."""

    def __init__(self, path: Path, check_files: bool, check_listed: bool = True) -> None:
        self.path = path
        self.folder = path.parent
        self.check_files = check_files
        self.check_listed = check_files and check_listed  # the files a list names

    def error(self, key: str, problem: str) -> SpecError:
        return SpecError(problem, f"{self.path}: {key}")

    # ---- scalars (types and ranges: the schema)
    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {_show(value)}")
        if "\0" in value:  # no file name, formula or name holds one; os calls refuse it
            raise self.error(key, _nul_problem(value))
        return value

    def path_text(self, value: Any, key: str) -> str:
        """A path as written: a non-empty string the file system can take."""
        text = self.string(value, key)
        problem = path_problem(text)
        if problem is not None:
            raise self.error(key, problem)
        return text

    def boolean(self, value: Any, key: str) -> bool:
        return bool(value)

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_show(value)}")
        try:
            number = float(value)  # JSON's integers have no bound; a float does
        except OverflowError:
            raise self.error(key, f"expected a number, got {_show(value)} (too large for a "
                                  "floating-point number)") from None
        if not math.isfinite(number):
            raise self.error(key, f"expected a number, got {_show(value)}")
        return number

    def memory_mb(self, value: Any) -> float:
        """``max_memory_mb``: a number of MiB up to :data:`MAX_MEMORY_MB` (the schema says
        so too; checked here as well, for a huge integer the schema compares exactly)."""
        number = self.number(value, "max_memory_mb")
        if number > MAX_MEMORY_MB:
            raise self.error("max_memory_mb", f"expected at most {MAX_MEMORY_MB} (MiB per rank, "
                                              f"1 PiB), got {_show(value)}")
        return number

    def integer(self, value: Any, key: str) -> int:
        return int(value)

    def name(self, value: Any, key: str) -> str:
        return value

    def names(self, value: Any, key: str) -> tuple[str, ...]:
        out = tuple(self.string(x, f"{key}[{i}]") for i, x in enumerate(value))
        seen = first_duplicate(out)
        if seen is not None:
            raise self.error(key, f"name {seen!r} appears twice")
        return out

    # ---- paths
    def resolve(self, text: str, folder: Path | None = None) -> Path:
        p = Path(os.path.expanduser(text))
        return p if p.is_absolute() else (folder if folder is not None else self.folder) / p

    def file(self, value: Any, key: str, nifti: bool = False, mask: bool = False,
             listed: bool = False) -> Path:
        p = self.resolve(self.path_text(value, key))
        if nifti and not str(p).endswith(MASK_SUFFIXES if mask else NIFTI_SUFFIXES):
            raise self.error(key, f"expected {MASK_KINDS if mask else IMAGE_KINDS}: {p}")
        if nifti and (kind := cifti_kind_problem(str(p), mask)):
            raise self.error(key, f"{kind}: {p}")
        if (self.check_listed if listed else self.check_files) and not p.is_file():
            raise self.error(key, not_a_file(p))
        if not self.check_files and not nifti and p.is_dir():  # one stat: not one per image
            raise self.error(key, not_a_file(p))
        return p

    def path_list(self, value: Any, key: str, nifti: bool, mask: bool = False) -> tuple[Path, ...]:
        """A JSON list of paths, or a text file with one path per line."""
        if isinstance(value, list):
            if not value:
                raise self.error(key, "the list is empty")
            out = []
            for i, item in enumerate(value):
                out.append(self.file(item, f"{key}[{i}]", nifti=nifti, mask=mask, listed=True))
            if key == "images":
                self.one_observation(out[0], f"{self.path}: {key}[0]")
            return tuple(out)
        p = self.resolve(self.path_text(value, key))
        if GLOB_CHARACTERS.search(str(value)) and not p.exists():
            # The shell expands wildcards; a spec is JSON, so a glob names no file.
            raise self.error(key, f"wildcards are not expanded: {value} (list the files in a "
                             "text file, one per line, or in a JSON list)")
        list_file = self.file(value, key)  # a directory is refused even without check_files
        if str(list_file).endswith(MASK_SUFFIXES):
            if kind := cifti_kind_problem(str(list_file), mask):
                raise self.error(key, f"{kind}: {list_file}")
            if key == "images":
                return self.volumes(list_file, key)
            raise self.error(key, f"expected a text file listing one image per line, got an image: {list_file}")
        if not list_file.is_file():   # also where files are not checked (check): fit's words
            raise self.error(key, not_a_file(list_file))
        out = read_path_list(list_file, nifti=nifti, check_files=self.check_listed, mask=mask)
        if key == "images":
            self.one_observation(out[0], f"{list_file}: row {_first_row(list_file)}")
        return out

    def volumes(self, path: Path, key: str) -> tuple[Path, ...]:
        """One 4-D NIfTI, one volume per observation (FSL randomise's convention).

        A surface file is one observation (mpiblmm.io.surface): one given alone is refused,
        whether it holds one map or several."""
        from mpiblmm.io import surface

        fmt = surface.surface_format(path)
        if fmt is not None and not path.is_file():  # (check_files=False): not a list file
            raise self.error(key, not_a_file(path))
        if fmt is not None:
            maps = _count_maps(path, f"{self.path}: {key}")
            if maps != 1:
                raise self.error(key, surface.maps_problem(fmt, maps))
            raise self.error(key, f"one {'GIfTI' if fmt == 'gifti' else 'CIFTI'} file given: "
                             "expected one file per observation (list them in a text file, one "
                             "per line, or in a JSON list)")
        if not path.is_file():
            return (path,)  # not checked (check_files=False): read when the file exists
        shape = _nifti_shape(path, f"{self.path}: {key}")
        if len(shape) != 4 or shape[3] < 2:
            got = (f"a 4-D NIfTI with {shape[3]} volume" if len(shape) == 4
                   else f"an image of shape {tuple(shape)}")
            raise self.error(key, f"one image given, {got}: expected a 4-D NIfTI with one "
                             "volume per observation (or a list of images)")
        return tuple(volume_path(path, i) for i in range(int(shape[3])))

    def one_observation(self, path: Path, where: str) -> None:
        """Refuse a listed image (the first: its header only is read) that holds several
        observations: in a list one file is one observation, so the number of rows would
        not match the design and that mismatch would hide the cause."""
        from mpiblmm.io import surface

        if not path.is_file():
            return  # the readers say what is wrong with it
        fmt = surface.surface_format(path)
        if fmt is not None:
            maps = _count_maps(path, where, quiet=True)
            if maps is not None and maps > 1:
                raise SpecError(surface.maps_problem(fmt, maps), where)
            return
        shape = _nifti_shape(path, where, quiet=True)
        if shape is not None and len(shape) == 4 and shape[3] > 1:
            raise SpecError(f"a 4-D NIfTI with {shape[3]} volumes in a list of images, where "
                            "each file is one observation: give that file alone as \"images\" "
                            "(not in a list) for one observation per volume, or list one 3-D "
                            "image per observation", where)

    def images(self, value: Any) -> tuple[tuple[Path, ...] | None, PackedImages | None]:
        if isinstance(value, dict):
            h5 = self.file(value["h5"], "images.h5")
            dataset = self.string(value.get("dataset", "/Y"), "images.dataset")
            return None, PackedImages(h5, dataset)
        return self.path_list(value, "images", nifti=True), None

    # ---- sections
    def random(self, value: Any) -> tuple[FactorSpec, ...]:
        out = []
        for i, entry in enumerate(value):
            key = f"random[{i}]"
            too_long = name_length_problem(entry["name"], "factor")
            if too_long is not None:
                raise self.error(f"{key}.name", too_long)
            out.append(FactorSpec(
                name=self.name(entry["name"], f"{key}.name"),
                factor=self.file(entry["factor"], f"{key}.factor"),
                design=self.file(entry["design"], f"{key}.design") if "design" in entry else None,
                effect_names=(self.names(entry["effect_names"], f"{key}.effect_names")
                              if "effect_names" in entry else None),
            ))
        dup = first_duplicate([f.name for f in out])
        if dup is not None:
            raise self.error("random", f"factor name {dup!r} appears twice")
        return tuple(out)

    def contrasts(self, value: Any) -> tuple[ContrastSpec, ...]:
        out = []
        for i, entry in enumerate(value):
            key = f"contrasts[{i}]"
            name = self.name(entry["name"], f"{key}.name")
            too_long = name_length_problem(name, "contrast")
            if too_long is not None:
                raise self.error(f'{key} ("{short_name(name)}")', too_long)
            key = f'{key} ("{name}")'
            if isinstance(entry["weights"], dict) or (
                    isinstance(entry["weights"], list) and entry["weights"]
                    and all(isinstance(r, dict) for r in entry["weights"])):
                by_name, kind = self.named_weights(entry["weights"], f"{key}.weights")
                weights = ()
            else:
                by_name = None
                weights, kind = self.weights(entry["weights"], f"{key}.weights")
            alternative = entry.get("alternative", "two-sided")
            if kind == "F" and alternative != "two-sided":
                raise self.error(f"{key}.alternative",
                                 "an F contrast (a list of rows) has no direction; use one row for a one-sided T test")
            out.append(ContrastSpec(name, weights, kind, alternative, by_name))
        dup = first_duplicate([c.name for c in out])
        if dup is not None:
            raise self.error("contrasts", f"contrast name {dup!r} appears twice")
        return tuple(out)

    def weights(self, value: Any, key: str) -> tuple[tuple[tuple[float, ...], ...], str]:
        if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
            rows = tuple(self.row(r, f"{key}[{i}]") for i, r in enumerate(value))
            if len({len(r) for r in rows}) != 1:
                raise self.error(key, "the rows have different lengths")
            return rows, "F"
        return (self.row(value, key),), "T"

    def named_weights(self, value: Any, key: str) -> tuple[tuple, str]:
        """``{"coefficient": weight, ...}`` (T) or a list of such objects (F)."""
        rows = [value] if isinstance(value, dict) else value
        out = []
        for i, row in enumerate(rows):
            where = key if isinstance(value, dict) else f"{key}[{i}]"
            out.append(tuple((str(k), self.number(w, f"{where}.{k}")) for k, w in row.items()))
        return tuple(out), "T" if isinstance(value, dict) else "F"

    def row(self, value: Any, key: str) -> tuple[float, ...]:
        return tuple(self.number(x, f"{key}[{j}]") for j, x in enumerate(value))

    def missingness(self, value: Any) -> Missingness:
        min_n = value.get("min_n")
        return Missingness(
            min_n=None if min_n is None else self.integer(min_n, "missingness.min_n"),
            min_fraction=self.number(_or_default(value, "min_fraction", 0.0),
                                     "missingness.min_fraction"),
        )

    def estimation(self, value: Any) -> Estimation:
        tol = value.get("tolerance")
        iters = value.get("max_iterations")
        return Estimation(
            method=_or_default(value, "method", "REML").upper(),
            tolerance=None if tol is None else self.number(tol, "estimation.tolerance"),
            max_iterations=None if iters is None else self.integer(iters, "estimation.max_iterations"),
        )


def _or_default(value: dict, key: str, default: Any) -> Any:
    """``value[key]``, or ``default`` where it is absent or null (SPEC.md: "omitted (or
    null) values take the estimator's defaults")."""
    got = value.get(key)
    return default if got is None else got


def _nifti_shape(path: Path, where: str, quiet: bool = False) -> tuple[int, ...] | None:
    """The shape in a NIfTI's header; unreadable: a :class:`SpecError` (``None`` when
    ``quiet``: the readers say what is wrong with it, in their words)."""
    try:
        import nibabel as nib

        from mpiblmm.io.nifti import quiet_nibabel

        with quiet_nibabel():  # its header fixes ("vox offset ...") are not the user's news
            shape = tuple(int(s) for s in nib.load(str(path)).shape)
        while len(shape) > 4 and shape[-1] == 1:  # (x, y, z, n, 1): n volumes, as the
            shape = shape[:-1]                     # readers drop trailing singletons too
        return shape
    except Exception as exc:  # nibabel raises several types for unreadable files
        if quiet:
            return None
        why = " ".join(str(exc).split()) or "unreadable header"
        raise SpecError(f"not a readable NIfTI image ({why}): {path}", where) from None


def _count_maps(path: Path, where: str, quiet: bool = False) -> int | None:
    """The maps in a surface file (:func:`mpiblmm.io.surface.count_maps`); unreadable: a
    :class:`SpecError` naming ``where`` (``None`` when ``quiet``)."""
    from mpiblmm.io import surface

    try:
        return surface.count_maps(path)
    except Exception as exc:  # a UserError naming the file, or nibabel's
        if quiet:
            return None
        raise SpecError(str(exc), where) from None


def _first_row(list_file: Path) -> int:
    """The line number of the first path in a list file (after blank and ``#`` lines)."""
    lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    return next(i for i, line in enumerate(lines, start=1)
                if line.strip() and not line.strip().startswith("#"))


def read_path_list(list_file: Path, nifti: bool = True, check_files: bool = True,
                   mask: bool = False) -> tuple[Path, ...]:
    """Paths listed one per line in ``list_file`` (blank and ``#`` lines ignored); ``mask``:
    they are masks (label GIfTI files allowed).

    Relative paths are relative to ``list_file``'s folder.  Errors read
    ``<list_file>: row N: <problem>`` with N the line number.
    """
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the file ({getattr(exc, 'strerror', None) or exc})",
                        str(list_file)) from None
    out = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{list_file}: row {number}"
        problem = path_problem(text)
        if problem is not None:
            raise SpecError(problem, where)
        p = Path(os.path.expanduser(text))
        p = p if p.is_absolute() else list_file.parent / p
        if nifti and not text.endswith(MASK_SUFFIXES if mask else NIFTI_SUFFIXES):
            raise SpecError(f"expected {MASK_KINDS if mask else IMAGE_KINDS}: {text}", where)
        if nifti and (kind := cifti_kind_problem(text, mask)):
            raise SpecError(f"{kind}: {text}", where)
        if check_files and not p.is_file():
            raise SpecError(not_a_file(p), where)
        out.append(p)
    if not out:
        raise SpecError("lists no files", str(list_file))
    return tuple(out)


def _nul_problem(text: str) -> str:
    """The words for a string holding a NUL character (shown escaped: no NUL in the line)."""
    return f"contains a NUL character (\\u0000): {_show(text)}"


def path_problem(text: str) -> str | None:
    """Why ``text`` cannot be a path on this system, or ``None``: a NUL character (every
    system call refuses it), or a name longer than :data:`NAME_MAX` bytes (an output folder
    of that name failed only when created).  Shown escaped, so the error line holds no NUL."""
    if "\0" in text:
        return _nul_problem(text)
    for name in Path(text).parts:
        size = len(name.encode("utf-8", errors="surrogateescape"))
        if size > NAME_MAX:
            return (f"a name in the path is {size} bytes long, at most {NAME_MAX}: "
                    f"{short_name(name)}")
    return None


def not_a_file(path: Path) -> str:
    """What is wrong with a path that should name a file but is not one (``fit`` and
    ``check`` both word it so): a directory, a symbolic link loop, something that is not a
    regular file (a FIFO, a device, a socket), a path that cannot be looked up, or none."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"symbolic link loop: {path}"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, None):
            return f"file not found: {path}{_glob_hint(path)}"
        return f"cannot be looked up ({exc.strerror}): {path}"
    except ValueError:  # a NUL byte in the path
        return f"file not found: {path}"
    if stat.S_ISDIR(mode):
        return f"is a directory, not a file: {path}"
    if not stat.S_ISREG(mode):
        return f"not a regular file: {path}"
    return f"file not found: {path}"


def _glob_hint(path: Path) -> str:
    """For a path not found that holds wildcard characters: that they are not expanded."""
    return (" (wildcards are not expanded: list the files)"
            if GLOB_CHARACTERS.search(path.name) else "")


def first_duplicate(items: Any) -> Any:
    """The first item that appears a second time, or None."""
    seen = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, Path) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
