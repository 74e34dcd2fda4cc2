"""`mpiblmm convert-blmm blmm_config.yml [--output spec.json]`: a BLMM configuration as a spec.

BLMM (Maullin-Sapey & Nichols) describes a study in YAML: ``Y_files`` (a list file of
images), ``X`` (design CSV), ``Z`` (``- f1: {name, factor, design}``), ``contrasts``
(``- c1: {name, vector}``), ``Missingness`` (``MinN``, ``MinPercent``), ``analysis_mask``,
``data_mask_files``, ``outdir``, ``maxnit``, ``tol``.  Its files have the formats of the
matrix form (CSV without header; a factor file of level indices), and BLMM treats 0 as
missing like the spec's default ``zero_is_missing``, so the conversion is key by key.

BLMM resolves relative paths against the working directory; the spec resolves them
against its own folder (and a list file's entries against the list file's folder).  So
every path is resolved here against the working directory and written relative to the
spec's folder (absolute when the spec is printed); an image or mask list whose entries
would resolve differently is written into the spec as a JSON list.

Every BLMM option without an equivalent is reported, one line each, on stderr; an option
whose loss would change the results (``data_mask_thresh``), a factor file whose codes BLMM
reads as fewer levels than the spec would (``2`` and ``2.0``), a misspelt ``contrasts`` key,
or a value that cannot be honoured (``MinPercent`` above 1, an absurd ``maxnit``, a malformed
contrast) is an error naming the key.  Spellings BLMM 0.1.1 itself would fail on but whose
meaning is plain (``tol`` as a YAML number, ``f2`` listed before ``f1``) are converted as
meant; without contrasts the model is converted with a note (no contrast maps).  BLMM's T
maps hold the one-sided (upper-tail) -log10 p, so T contrasts are written with
``"alternative": "greater"``.

BLMM's own voxel rules (``blmm_concat``) go into ``missingness.min_n``: it drops every voxel
with ``n <= p + 1`` observations and, in its ``safeMode`` (on unless set to 0), with
``n <= q``, q the number of random effects (levels x effects, summed over the factors).  Its
analysis mask keeps only the voxels equal to 1 (``get_amInds``), where mpiblmm keeps every
non-zero one, and it multiplies each image by its data mask, where mpiblmm only drops the
observations where the mask is 0: an analysis or data mask with values other than 0 and 1
(NaN aside, missing in both) is refused.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import os
import re
import sys
from pathlib import Path
from typing import Any

from mpiblmm.errors import SpecError
from mpiblmm.spec import MAX_ITERATIONS

CLUSTER = "cluster setting: mpiblmm shares voxels over MPI ranks (mpirun -n N)"
#: BLMM options with no mpiblmm equivalent whose absence does not change the results, and why.
NO_EQUIVALENT = {
    "MAXMEM": "mpiblmm budgets memory per rank: set max_memory_mb (MiB, default 2048)",
    "diskMem": "mpiblmm never writes BLMM's ZtY files: each rank fits its voxels in chunks "
               "sized by max_memory_mb (MiB per rank)",
    "OutputCovB": "mpiblmm always writes cov_beta, into results.h5 only (no map like "
                  "blmm_vox_cov)",
    "minlog": "mpiblmm stores -log10(p) without a floor",
    "method": "mpiblmm's estimator is its own (Fisher scoring with a polish); BLMM's pSFS/SFS/"
              "pFS/FS choice does not apply",
    "clusterType": CLUSTER,
    "numNodes": CLUSTER,
    "voxelBatching": CLUSTER,
    "maxnvb": CLUSTER,
    "resms": "mpiblmm does not compute BLMM's resms (e'e/(n-p), blmm_vox_resms); it writes the "
             "model's residual variance sigma2 (sigma2.nii.gz, sigma2 in results.h5)",
}
#: mpiblmm's default estimation.tolerance (``mpiblmm.lmm.estimate.fit``); BLMM's is 1e-6.
DEFAULT_TOLERANCE = 1e-12
#: mpiblmm's default estimation.max_iterations (``mpiblmm.lmm.estimate.fit``).
DEFAULT_MAX_ITERATIONS = 300
#: Keys BLMM's setup writes into the config it is given (and into outdir/inputs.yml) when it
#: runs: not the user's options, ignored without a note.
BLMM_WRITTEN = {"q"}
#: BLMM 0.1.1's estimation methods other than its default pSFS (``blmm_estimate``).
OTHER_METHODS = (
    "mpiblmm fits REML with its own estimator, as BLMM's default pSFS does; BLMM 0.1.1 calls "
    "FS, SFS and pFS without reml (maximum likelihood) and fails in them (TypeError, "
    "ValueError): set estimation.method to ML in the spec for ML estimates")
#: Why ``data_mask_thresh`` is refused (BLMM's ``blmm_batch.obtainY``: after multiplying an
#: image by its data mask, every value below the threshold becomes 0, i.e. missing).
DATA_MASK_THRESH = (
    "cannot be converted: BLMM treats every image value below it (after multiplying by "
    "data_mask_files) as missing, and mpiblmm has no such threshold; set those values to 0 or "
    "NaN in the images themselves (both are missing in mpiblmm) and delete data_mask_thresh")
#: BLMM's blmm_vox_conTlp is -log10 of the upper-tail p (``T2P3D``).
T_ALTERNATIVE = "greater"
ALTERNATIVE_NOTE = (
    'contrasts: T contrasts are written with "alternative": "greater", as BLMM\'s '
    "blmm_vox_conTlp is the one-sided (upper-tail) -log10 p; delete it from the spec for "
    "two-sided p-values")
#: BLMM 0.1.1 opens the entries of Y_files and data_mask_files after changing directory into
#: its own package (``os.chdir`` in ``blmm_setup`` and ``blmm_batch``).
RELATIVE_ENTRIES = ("BLMM 0.1.1 cannot read relative entries (it changes directory into its "
                    "own package folder first: 'The image ... does not exist')")
NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")
VECTOR_SHAPE = "a vector such as [1, 0, 0] (T) or a matrix such as [[1, 0, 0], [0, 1, 0]] (F)"


def run_convert(args: Any) -> int:
    """Handler of ``mpiblmm convert-blmm`` (rank 0 converts; every rank agrees on errors)."""
    from mpi4py import MPI

    from mpiblmm.parallel import agree_on_user_error

    comm = MPI.COMM_WORLD
    problem = None
    if comm.Get_rank() == 0:
        try:
            spec, notes = convert_file(args.config, args.output)
            text = json.dumps(spec, indent=2) + "\n"
            if args.output:
                Path(args.output).write_text(text)
            else:
                sys.stdout.write(text)
            for note in notes + conversion_notes(spec):
                print(f"mpiblmm: convert-blmm: {note}", file=sys.stderr)
            if args.output:
                print(f"mpiblmm: spec written to {args.output}; check it with: mpiblmm check "
                      f"{args.output}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
        except (SpecError, OSError) as exc:
            problem = exc if isinstance(exc, SpecError) else SpecError(
                f"cannot write: {exc.strerror or exc}", str(args.output))
    agree_on_user_error(comm, problem)
    return 0


def conversion_notes(spec: dict) -> list[str]:
    """What the converted spec says differently from its defaults on BLMM's behalf (printed
    after the notes of :func:`convert_file`)."""
    if any(c.get("alternative") == T_ALTERNATIVE for c in spec.get("contrasts", [])):
        return [ALTERNATIVE_NOTE]
    return []


def convert_file(config: str | os.PathLike, output: str | os.PathLike | None = None,
                 cwd: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """Read a BLMM config; return (spec, notes).  ``output`` is where the spec will be
    written (paths are made relative to its folder), ``cwd`` BLMM's working directory."""
    import yaml

    config = Path(config)
    try:
        raw = yaml.load(config.read_text(), Loader=_unique_key_loader())  # noqa: S506 (safe)
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror or exc}", str(config)) from None
    except UnicodeDecodeError:
        raise SpecError("cannot read: not a text file (UTF-8)", str(config)) from None
    except _DuplicateKey as exc:
        raise SpecError(str(exc), str(config)) from None
    except yaml.YAMLError as exc:
        raise SpecError("not valid YAML: " + " ".join(str(exc).split()), str(config)) from None
    if not isinstance(raw, dict):
        raise SpecError("expected a YAML mapping of BLMM options", str(config))
    return convert(raw, str(config), Path(cwd or os.getcwd()),
                   Path(output).resolve().parent if output else None)


class _DuplicateKey(Exception):
    """A key given twice in one YAML mapping (PyYAML keeps the last without a word)."""


def _unique_key_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in a mapping, as the JSON spec does:
    a fault audit's config named ``Y_files`` twice and the first was dropped silently."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # an unhashable key: the base loader names it
                if key in seen:
                    raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: {key!s} is given "
                                        "twice: keep one")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def convert(raw: dict, where: str, cwd: Path, folder: Path | None) -> tuple[dict, list[str]]:
    """The spec of a decoded BLMM config.

    ``folder``: the spec's folder (paths are written relative to it), ``None`` for absolute.
    """
    notes: list[str] = []

    def need(key: str) -> Any:
        if raw.get(key) in (None, ""):
            close = _misspelt(key, raw)
            raise SpecError("required BLMM option is missing" + (
                f" (is {close!r} a misspelling of it?)" if close else ""), f"{where}: {key}")
        return raw[key]

    def path(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"expected a path, got {value!r}", f"{where}: {key}")
        p = _resolve(value, cwd)
        if folder is None:
            return str(p)
        return os.path.relpath(p, folder)

    home = Path(where).resolve().parent
    away = home != cwd.resolve()       # converted outside the config's folder
    if away:
        for key, value in _input_files(raw):
            _not_only_beside(value, cwd, home, f"{where}: {key}")

    spec: dict[str, Any] = {}
    spec["images"] = _list_or_file(need("Y_files"), "Y_files", path, cwd, notes)
    spec["X"] = path(need("X"), "X")
    _header_free(raw["X"], cwd, f"{where}: X")
    spec["random"] = _factors(need("Z"), where, path, notes)
    for label, f in _items(raw["Z"], f"{where}: Z", "f"):
        _header_free(f["design"], cwd, f"{where}: Z: {label}.design")
    _unique(spec["random"], "Z", notes)
    _one_spelling_per_level(raw, cwd, where)
    if raw.get("contrasts") is None and _misspelt("contrasts", raw):
        need("contrasts")                  # a misspelt key: refused, naming it
    if raw.get("contrasts") is not None:
        spec["contrasts"] = _contrasts(raw["contrasts"], where, notes,
                                       _x_columns(raw["X"], cwd))
        _unique(spec["contrasts"], "contrasts", notes)
    else:
        notes.append("contrasts: none given (BLMM needs at least one): the fit estimates the "
                     "model and writes no contrast maps; add contrasts to the spec")
    if raw.get("analysis_mask"):
        spec["analysis_mask"] = path(raw["analysis_mask"], "analysis_mask")
        _check_analysis_mask(raw["analysis_mask"], cwd, f"{where}: analysis_mask")
    if "data_mask_thresh" in raw:
        raise SpecError(DATA_MASK_THRESH, f"{where}: data_mask_thresh")
    if raw.get("data_mask_files"):
        masks: list[Path] = []
        spec["observation_masks"] = _list_or_file(raw["data_mask_files"], "data_mask_files",
                                                  path, cwd, notes, masks)
        if not masks or not _zero_one_masks(masks, f"{where}: data_mask_files"):
            notes.append("data_mask_files: written as observation_masks: BLMM multiplies each "
                         "image by its mask, mpiblmm only drops the observations where the "
                         "mask is 0; the same for 0/1 masks (multiply the images by any other "
                         "masks first)")
    missing = _missingness(raw.get("Missingness"), where, notes)
    floor = _blmm_min_n(raw, cwd, notes, missing.get("min_fraction"))
    # X or a factor's files not found (a fault audit: a wrong path gave no word, and with
    # the path then corrected in the spec the fit kept voxels BLMM drops): say what the
    # conversion could not do
    unread = _unread_inputs(raw, cwd)
    if floor is None and unread:
        notes.append(f"Missingness: BLMM's own voxel rules (n > p + 1, and n > q in its "
                     f"safeMode) are not in the spec: {', '.join(unread)} "
                     f"{'names' if len(unread) == 1 else 'name'} no file "
                     f"(relative paths are read from the working directory, {cwd}); convert "
                     "again where BLMM runs, once the files are there")
    if floor is not None and floor[0] > missing.get("min_n", 0):
        missing["min_n"] = floor[0]
        notes.append(floor[1])
    if missing:
        spec["missingness"] = missing
    estimation = {}
    if raw.get("maxnit") is not None:
        estimation["max_iterations"] = _max_iterations(raw["maxnit"], f"{where}: maxnit")
        if estimation["max_iterations"] < DEFAULT_MAX_ITERATIONS:
            notes.append(f"maxnit: {estimation['max_iterations']} converted as given, below "
                         f"mpiblmm's default {DEFAULT_MAX_ITERATIONS}: it caps every iteration "
                         "of a voxel's fit (Fisher scoring and the polish after it), so voxels "
                         "stopped by it end short of the optimum with status 1; delete it to "
                         "use the default")
    if raw.get("tol") is not None:
        estimation["tolerance"] = _tolerance(raw["tol"], f"{where}: tol")
        if estimation["tolerance"] > DEFAULT_TOLERANCE:
            notes.append(f"tol: {estimation['tolerance']:g} converted as given, looser than "
                         f"mpiblmm's default {DEFAULT_TOLERANCE:g} (a voxel stops when its "
                         "log-likelihood changes by less): delete it to fit as close to "
                         "lme4's optimum as mpiblmm's default does")
    if estimation:
        spec["estimation"] = estimation
    spec["output"] = path(need("outdir"), "outdir")
    for key in raw:
        if key in KNOWN:
            continue
        reason = NO_EQUIVALENT.get(key)
        if key == "method" and str(raw[key]).strip() != "pSFS":
            reason = OTHER_METHODS
        notes.append(f"{key}: no equivalent in mpiblmm: {reason}" if reason else
                     f"{key}: unknown BLMM option, not converted")
    return spec, notes


def _misspelt(key: str, raw: dict) -> str | None:
    """An unknown option of ``raw`` that looks like ``key`` misspelt (``contrast``), or None."""
    close = difflib.get_close_matches(key, [str(k) for k in raw if k not in KNOWN], 1, 0.75)
    return close[0] if close else None


#: The BLMM options the conversion reads (besides those BLMM writes into its own config).
CONVERTED = {"Y_files", "X", "Z", "contrasts", "analysis_mask", "data_mask_files",
             "Missingness", "maxnit", "tol", "outdir", "safeMode"}
KNOWN = CONVERTED | BLMM_WRITTEN


def _list_or_file(value: Any, key: str, path, cwd: Path, notes: list[str],
                  files: list[Path] | None = None) -> Any:
    """A BLMM list file: kept when its entries resolve the same for the spec, else inlined.
    ``files`` (if given) receives the entries as absolute paths, as the spec will read them."""
    list_path = Path(os.path.expanduser(str(value)))
    list_path = list_path if list_path.is_absolute() else cwd / list_path
    try:
        entries = [ln.strip() for ln in list_path.read_text().splitlines()
                   if ln.strip() and not ln.strip().startswith("#")]
    except (OSError, UnicodeDecodeError):
        return path(value, key)  # the spec's loader names the missing or unreadable file
    expanded = [Path(os.path.expanduser(e)) for e in entries]
    relative = [e for e in expanded if not e.is_absolute()]
    base = list_path.parent
    if relative and list_path.parent.resolve() != cwd.resolve():
        at_cwd = all((cwd / e).exists() for e in relative)
        at_list = all((list_path.parent / e).exists() for e in relative)
        if at_list and not at_cwd:
            notes.append(f"{key}: {RELATIVE_ENTRIES}; they name files relative to the list's "
                         "folder, where mpiblmm reads them: the list is kept")
        else:
            notes.append(f"{key}: {RELATIVE_ENTRIES}; they are read relative to the working "
                         "directory, as BLMM reads its other paths, and written into the spec "
                         "as a list of paths")
            base = cwd
    if files is not None:
        files.extend(e if e.is_absolute() else base / e for e in expanded)
    if base == cwd and relative and list_path.parent.resolve() != cwd.resolve():
        return [path(e, f"{key} entry") for e in entries]
    return path(value, key)


def _items(value: Any, where: str, prefix: str) -> list[tuple[str, dict]]:
    """BLMM's ``- f1: {...}`` / ``- c1: {...}`` lists (a mapping is accepted too)."""
    if isinstance(value, dict):
        value = [{k: v} for k, v in value.items()]
    if not isinstance(value, list):
        raise SpecError(f"expected a list of {prefix}1, {prefix}2, ... entries", where)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or len(item) != 1:
            raise SpecError(f"entry {i + 1}: expected '{prefix}{i + 1}:' with its fields", where)
        (label, fields), = item.items()
        if not isinstance(fields, dict):
            raise SpecError(f"{label}: expected its fields (name, ...)", where)
        out.append((str(label), fields))
    return out


def _factors(value: Any, where: str, path, notes: list[str]) -> list[dict]:
    out = []
    for label, f in _items(value, f"{where}: Z", "f"):
        for req in ("factor", "design"):
            if not f.get(req):
                raise SpecError("required field is missing", f"{where}: Z: {label}.{req}")
        name = _name(f.get("name") or label, f"Z: {label}.name", notes)
        out.append({"name": name, "factor": path(f["factor"], f"Z {label}.factor"),
                    "design": path(f["design"], f"Z {label}.design")})
        for key in f:
            if key not in ("name", "factor", "design"):
                notes.append(f"Z: {label}.{key}: unknown BLMM field, not converted (a factor "
                             "has name, factor and design)")
    return out


def _contrasts(value: Any, where: str, notes: list[str], p: int | None) -> list[dict]:
    """BLMM's contrasts; ``p``: the columns of X (``None`` when X cannot be read here: then
    every contrast must have the length of the first, as BLMM takes p from it)."""
    out = []
    first = None
    for label, c in _items(value, f"{where}: contrasts", "c"):
        key = f"{where}: contrasts: {label}.vector"
        if c.get("vector") is None:
            raise SpecError("required field is missing", key)
        vector = _vector(c["vector"], key)
        kind = "F" if isinstance(vector[0], list) else "T"
        rows = vector if kind == "F" else [vector]
        width = len(rows[0])
        if p is not None and width != p:
            raise SpecError(f"has {width} weights per row, but X has {p} columns (one weight "
                            "per column)", key)
        if p is None and first is not None and width != first[1]:
            raise SpecError(f"has {width} weights per row, but {first[0]} has {first[1]} (one "
                            "weight per column of X)", key)
        first = first or (label, width)
        _check_rank(rows, key)
        stat = str(c.get("statType") or kind).upper()  # BLMM's template leaves it empty
        if stat != kind:
            notes.append(f"contrasts: {label}.statType: {stat} given, but the vector makes a "
                         f"{kind} contrast; mpiblmm takes the kind from the vector")
        for extra in sorted(set(c) - {"name", "vector", "statType"}):
            notes.append(f"contrasts: {label}.{extra}: unknown BLMM field, not converted")
        entry = {"name": _name(c.get("name") or label, f"contrasts: {label}.name", notes),
                 "weights": vector}
        if kind == "T":
            entry["alternative"] = T_ALTERNATIVE
        out.append(entry)
    return out


def _vector(value: Any, key: str) -> list:
    """A contrast as BLMM's ``str2vec`` reads it: the text of the YAML value, quotes removed,
    every single space a separator (``[0 0 1]`` is ``[0, 0, 1]``), then evaluated (here as
    numbers and lists only, without ``eval``).  A list of numbers (T) or of equally long
    lists of numbers (F), every weight finite.  ``str2vec`` deletes every comma, so it reads
    ``'[1,0,0]'`` (a quoted string without spaces) as ``[100]``: refused rather than guessed."""
    text = str(value).replace("'", "")
    text = text.replace("][", "], [").replace("],[", "], [").replace("] [", "], [")
    text = text.replace("[ [", "[[").replace("] ]", "]]")
    if re.search(r",[^ \]]", text):
        raise SpecError("BLMM joins the numbers around a comma without a space after it (it "
                        f"reads '[1,0,0]' as [100]): put a space after each comma: {_show(value)}",
                        key)
    text = ", ".join(part.replace(",", "") for part in text.split(" "))
    try:
        vector = _literal(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError):
        raise SpecError(f"not {VECTOR_SHAPE}: {_show(value)}", key) from None
    if not isinstance(vector, list) or not vector:
        raise SpecError(f"expected {VECTOR_SHAPE}, got {_show(value)}", key)
    if all(isinstance(x, list) for x in vector):
        if any(not row or any(isinstance(x, list) for x in row) for row in vector):
            raise SpecError(f"expected {VECTOR_SHAPE}, got {_show(value)}", key)
        if len({len(row) for row in vector}) != 1:
            raise SpecError(f"the rows have different lengths: {_show(value)}", key)
        weights = [x for row in vector for x in row]
    elif any(isinstance(x, list) for x in vector):
        raise SpecError(f"expected {VECTOR_SHAPE}, got {_show(value)}", key)
    else:
        weights = vector
    if not all(math.isfinite(x) for x in weights):
        raise SpecError(f"every weight must be a finite number: {_show(value)}", key)
    return vector


def _literal(node: ast.AST) -> Any:
    """Lists (or tuples) of arithmetic, as lists of numbers."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(x) for x in node.elts]
    value = _arith(node)
    return float(value) if isinstance(value, int) and abs(value) > 2**53 else value


def _check_rank(rows: list[list], key: str) -> None:
    """The contrast can be tested: not all zero, an F contrast's rows independent (the
    spec's own rule, :func:`mpiblmm.design.rank_problem`)."""
    import numpy as np

    from mpiblmm.design import rank_problem

    problem = rank_problem(np.asarray(rows, dtype=np.float64))
    if problem is not None:
        raise SpecError(problem, key)


def _resolve(value: str, cwd: Path) -> Path:
    """A path of the config as BLMM resolves it: ``~`` expanded, relative to ``cwd``."""
    p = Path(os.path.expanduser(value.strip()))
    return p if p.is_absolute() else cwd / p


def _not_only_beside(value: Any, cwd: Path, home: Path, key: str) -> None:
    """Converted outside the config's folder ``home``: a relative input path that names no
    file in the working directory (where BLMM reads it) but one beside the config is an error
    saying where to run (the spec would name files that are not there, and BLMM's voxel rules
    could not be read from X and Z).  A file found nowhere is left to the spec's loader."""
    if not isinstance(value, str) or not value.strip():
        return  # a missing or malformed value: the conversion names it
    given = Path(os.path.expanduser(value.strip()))
    if given.is_absolute() or (cwd / given).exists():
        return
    if (home / given).exists():
        raise SpecError(f"{value.strip()} is not in the working directory {cwd}, where BLMM "
                        "reads relative paths, but beside the config: run convert-blmm in "
                        f"{home}, where BLMM would run", key)


def _input_files(raw: dict) -> list[tuple[str, Any]]:
    """The config's input files as (key, value): the image list, X, the masks and the
    factors' files (none of a malformed Z's: the conversion names what is wrong with it)."""
    files = [(key, raw.get(key)) for key in ("Y_files", "X", "analysis_mask", "data_mask_files")]
    if isinstance(raw.get("Z"), (list, dict)):
        try:
            files += [(f"Z: {label}.{part}", f.get(part)) for label, f in _items(raw["Z"], "Z", "f")
                      for part in ("factor", "design")]
        except SpecError:
            pass
    return files


def _unread_inputs(raw: dict, cwd: Path) -> list[str]:
    """The keys of X and the factors' files whose paths name no file here (BLMM's voxel rules
    are read from them)."""
    return [key for key, value in _input_files(raw) if (key == "X" or key.startswith("Z: "))
            and isinstance(value, str) and value.strip() and not _resolve(value, cwd).is_file()]


def _header_free(value: Any, cwd: Path, key: str) -> None:
    """A numeric CSV of BLMM's (``X``, a factor's ``design``) as mpiblmm reads it: BLMM
    skips a header row, the spec's files have none, so a headed file is an error naming the
    key (with it the conversion could not check the contrasts or set BLMM's ``min_n``, and
    the fit would refuse the file).  A file not found here is left to the spec's loader."""
    from mpiblmm.design import read_numeric_csv

    if not isinstance(value, str) or not value.strip():
        return
    p = _resolve(value, cwd)
    if not p.is_file():
        return
    try:
        read_numeric_csv(p)
    except SpecError as exc:
        if exc.message.endswith("(the file must have no header row)"):
            raise SpecError(f"{p} starts with a header row, which BLMM skips but mpiblmm's "
                            "CSV files must not have: delete that line (the conversion "
                            "keeps the path)", key) from None
        raise SpecError(str(exc), key) from None


def _unique(entries: list[dict], key: str, notes: list[str]) -> None:
    """Names made unique in place (``name_2``, ...): BLMM only prints them, the spec keys
    results by them."""
    seen = {e["name"] for e in entries}
    used: set[str] = set()
    for e in entries:
        name = e["name"]
        if name in used:
            k = 2
            while f"{name}_{k}" in seen or f"{name}_{k}" in used:
                k += 1
            notes.append(f"{key}: a second {name!r} renamed {name}_{k} (names key the results)")
            e["name"] = f"{name}_{k}"
        used.add(e["name"])


def _x_columns(value: Any, cwd: Path) -> int | None:
    """The number of columns of BLMM's X, or ``None`` when it cannot be read here (the
    spec's loader reports that)."""
    from mpiblmm.design import read_numeric_csv

    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return read_numeric_csv(_resolve(value, cwd)).shape[1]
    except SpecError:
        return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(value: Any, key: str, notes: list[str]) -> str:
    text = str(value).strip()
    name = NAME_BAD.sub("_", text)
    if not name or not name[0].isalnum():
        name = "n" + name
    if name != text:
        notes.append(f"{key}: {text!r} renamed {name!r} (names become file names)")
    return name


def _missingness(value: Any, where: str, notes: list[str] | None = None) -> dict:
    """BLMM's ``Missingness`` (``blmm_concat``): a voxel is kept with at least ``MinN``
    observations and at least ``MinPercent`` x n, ``MinPercent`` a fraction (0.1) or a
    percentage string (``"10%"``) from 0 to 1.  BLMM reads the keys ``MinPercent`` (else
    ``minpercent``) and ``minn`` (else ``MinN``) only; any other spelling (``minPercent``) it
    ignores, and so does the conversion, with a note."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise SpecError("expected MinN and/or MinPercent", f"{where}: Missingness")
    lower = {}
    for first, second in (("MinPercent", "minpercent"), ("minn", "MinN")):
        for k in (first, second):
            if k in value:
                lower[first.lower()] = value[k]
                break
    for k in value:
        if k not in ("MinPercent", "minpercent", "MinN", "minn") and notes is not None:
            notes.append(f"Missingness.{k}: ignored, as BLMM ignores it: BLMM reads only "
                         "MinPercent (or minpercent) and MinN (or minn)")
    out = {}
    if lower.get("minn") is not None:
        key = f"{where}: Missingness.MinN"
        min_n = _number(lower["minn"], key)
        if not _finite(min_n) or min_n > 2**31 - 1:
            raise SpecError(f"expected a number of observations, got {_show(lower['minn'])}", key)
        if min_n >= 1:  # BLMM drops voxels with fewer than MinN observations
            out["min_n"] = math.ceil(min_n)
    if lower.get("minpercent") is not None:
        key = f"{where}: Missingness.MinPercent"
        text = str(lower["minpercent"])
        frac = _number(text.replace("%", ""), key)
        if "%" in text:
            frac = frac / 100.0 if _finite(frac) else math.nan
        if not _finite(frac) or not 0 <= frac <= 1:
            raise SpecError("expected a fraction from 0 to 1 (0.1 keeps the voxels observed in "
                            "at least 10% of the images) or a percentage such as '10%', got "
                            f"{_show(lower['minpercent'])} (BLMM refuses it too)", key)
        out["min_fraction"] = frac
    return out


def _one_spelling_per_level(raw: dict, cwd: Path, where: str) -> None:
    """BLMM reads a factor file's codes as numbers (``2`` and ``2.0`` are one level, ``01``
    and ``1`` too); the spec reads them as labels, so such a file would give mpiblmm more
    levels, another model without a word: refused, naming the file, the key and two codes.
    So is a file whose first row looks like a header (:func:`~mpiblmm.design.header_like`):
    the spec would read it as a level.  Files that cannot be read here are left to the
    spec's loader."""
    from mpiblmm.design import header_like, read_labels_csv

    for label, f in _items(raw.get("Z"), f"{where}: Z", "f"):
        value = f.get("factor")
        if not isinstance(value, str) or not value.strip():
            continue
        try:
            codes = read_labels_csv(_resolve(value, cwd))
        except (SpecError, OSError, UnicodeDecodeError):
            continue                                 # unreadable: the spec's loader says so
        if header_like(codes):
            # BLMM's loadFile skips no header of a one-column file: the row is a level, the
            # file one row longer than X, and BLMM fails
            raise SpecError(f"{_resolve(value, cwd)} starts with a header row ({codes[0]!r}), "
                            "which BLMM reads as a level and mpiblmm's factor files must not "
                            "have: delete that line (the conversion keeps the path)",
                            f"{where}: Z: {label}.factor")
        try:
            numbers = [float(code) for code in codes]
        except ValueError:
            continue                          # not numbers: labels, the spec's loader's
        first: dict[float, str] = {}
        for number, code in zip(numbers, codes):
            if first.setdefault(number, code) != code:
                raise SpecError(
                    f"codes {first[number]!r} and {code!r} are one level to BLMM (it reads "
                    "the codes as numbers) but two to mpiblmm (it reads them as labels): "
                    "write every code of a level alike", f"{where}: Z: {label}.factor")


def _blmm_min_n(raw: dict, cwd: Path, notes: list[str],
                fraction: float | None) -> tuple[int, str] | None:
    """BLMM's own minimum of observations per voxel (``blmm_concat``), as ``(min_n, note)``:
    it drops a voxel with ``n <= p + 1``, in ``safeMode`` (``safeMode: 1``, its default)
    with ``n <= q``, q = levels x random effects summed over the factors (all levels of the
    factor files, as BLMM counts them), and with fewer than ``MinPercent`` x n compared in
    floating point (``fraction``; 0.07 x 100 is 7.000000000000001 there, so 7 observations
    are too few, where ``min_fraction`` reads 0.07 as the decimal).  ``None`` when X or a
    factor's files cannot be read here (the spec's loader reports them).  When q is not below the number of images BLMM
    fits no voxel at all: the safe-mode rule is then left out, with a note."""
    from mpiblmm.design import read_labels_csv, read_numeric_csv
    from mpiblmm.lmm.analysis import fewest_of_fraction

    def resolve(value: Any) -> Path | None:
        if not isinstance(value, str) or not value.strip():
            return None
        return _resolve(value, cwd)

    try:
        x_path = resolve(raw.get("X"))
        if x_path is None:
            return None
        n, p = read_numeric_csv(x_path).shape
        q = 0
        for _, f in _items(raw.get("Z"), "Z", "f"):
            factor, design = resolve(f.get("factor")), resolve(f.get("design"))
            if factor is None or design is None:
                return None
            labels = read_labels_csv(factor)
            try:                              # BLMM reads the levels as numbers (1 == 1.0)
                levels = len({float(x) for x in labels})
            except ValueError:
                levels = len(set(labels))
            q += levels * read_numeric_csv(design).shape[1]
    except (SpecError, OSError, UnicodeDecodeError, ValueError):
        return None
    safe = raw.get("safeMode", 1)
    safe = not isinstance(safe, str) and safe == 1        # BLMM: inputs['safeMode'] == 1
    floor = p + 2
    why = f"more than p + 1 = {p + 1} observations"
    if safe and q + 1 > n:
        notes.append(f"safeMode: BLMM drops every voxel here (q = {q} random effects, levels x "
                     f"effects, is not below the {n} observations); not converted: mpiblmm fits "
                     "the voxels whose random effects are identifiable")
    elif not safe:
        notes.append("safeMode: 0: BLMM then fits voxels with no more observations than "
                     "random effects; mpiblmm still does not fit a voxel whose observed rows "
                     "cannot identify its random effects (a factor seen at fewer than 2 levels, "
                     "or n <= observed levels x effects: status 9)")
    elif safe and q + 1 > floor:
        floor = q + 1
        why += (f" and, in its safeMode (on by default; safeMode: 0 turns it off), more than "
                f"q = {q} (levels x random effects, summed over the factors)")
    if fraction is not None:
        product = fraction * n          # blmm_concat drops n_sv < MinPercent * n, in floats
        if math.ceil(product) > max(floor, fewest_of_fraction(fraction, n)):
            floor = math.ceil(product)
            why += (f" and at least MinPercent x n = {fraction!r} x {n} = {product!r} "
                    "observations, compared in floating point")
    return floor, (f"missingness.min_n: set to {floor}, as BLMM fits a voxel only with {why}; "
                   "lower it in the spec to fit more voxels than BLMM")


def _zero_one_masks(masks: list[Path], key: str) -> bool:
    """Whether every data mask was read and holds only 0, 1 and NaN; a mask with other finite
    values is refused: BLMM multiplies each image by its mask (``blmm_batch.obtainY``), so
    such a mask rescales the data in BLMM but only marks "observed" in mpiblmm.  ``False``
    when a mask cannot be read here (the spec's loader reports it)."""
    for mask in masks:
        other = _other_values(mask)
        if other is None:
            return False
        if other:
            raise SpecError(f"{mask}: has values other than 0 and 1 ({other}): BLMM multiplies "
                            "each image by its mask, mpiblmm only drops the observations where "
                            "the mask is 0; multiply the images by the masks first (and list the "
                            "products in Y_files), or give 0/1 masks", key)
    return True


def _other_values(path: Path) -> str | None:
    """What of the image ``path`` is neither 0, 1 nor NaN, as ``"2, 0.5 in 7 voxels"`` ("" if
    nothing); ``None`` when it cannot be read here (the spec's loader says why)."""
    import numpy as np

    try:
        import nibabel as nib

        data = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)
    except Exception:  # noqa: BLE001  (not an image here: the spec's loader says why)
        return None
    other = data[np.isfinite(data) & (data != 0) & (data != 1)]
    if other.size == 0:
        return ""
    values = np.unique(other)
    shown = ", ".join(f"{v:g}" for v in values[:3]) + (", ..." if len(values) > 3 else "")
    return f"{shown} in {other.size} voxels"


def _check_analysis_mask(value: Any, cwd: Path, key: str) -> None:
    """BLMM analyses the voxels where its analysis mask is exactly 1 (``get_amInds``: ``am ==
    1``), mpiblmm those where it is non-zero: a mask with other finite values is refused (a
    mask that cannot be read here is left to the spec's loader)."""
    if not isinstance(value, str) or not value.strip():
        return
    other = _other_values(_resolve(value, cwd))
    if other:
        raise SpecError(f"has values other than 0 and 1 ({other}): BLMM analyses only the "
                        "voxels where it is exactly 1, mpiblmm every voxel where it is "
                        "non-zero; write a mask that is 1 where this one is 1 and 0 elsewhere, "
                        "and name it here", key)


def _max_iterations(value: Any, key: str) -> int:
    n = _number(value, key)
    if not _finite(n) or n != int(n) or not 1 <= n <= MAX_ITERATIONS:
        raise SpecError(f"expected a whole number of iterations from 1 to {MAX_ITERATIONS} "
                        f"(mpiblmm's estimation.max_iterations), got {_show(value)}", key)
    return int(n)


def _tolerance(value: Any, key: str) -> float:
    t = _number(value, key)
    if not _finite(t) or t <= 0:
        raise SpecError(f"expected a number greater than 0, got {_show(value)}", key)
    return t


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg}


def _number(value: Any, where: str) -> float:
    """A number as BLMM accepts it: YAML number or a Python arithmetic string (``1e-6``,
    ``2**32``), evaluated without ``eval``.  May be infinite or NaN (``1e400``, ``.nan``):
    the caller checks the range."""
    if isinstance(value, bool):
        raise SpecError(f"expected a number, got {value!r}", where)
    if isinstance(value, (int, float)):
        return value
    try:
        return _arith(ast.parse(str(value).strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError):
        raise SpecError(f"expected a number, got {value!r}", where) from None


def _arith(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_arith(node.left), _arith(node.right))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("not arithmetic")


def _power(base: float, exponent: float) -> float:
    """``base ** exponent``, exact for small whole numbers (``2**32``), else in floating point
    (so ``10**10**10`` is infinite at once rather than a number of ten billion digits)."""
    if isinstance(base, int) and isinstance(exponent, int) and 0 <= exponent <= 1024 \
            and abs(base) <= 2**32:
        return base ** exponent
    try:
        result = float(base) ** float(exponent)
    except OverflowError:
        return math.inf
    if isinstance(result, complex):
        raise ValueError("not a real number")
    return result
