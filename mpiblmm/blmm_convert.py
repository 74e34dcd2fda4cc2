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

Every BLMM option without an equivalent is reported, one line each, on stderr.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import sys
from pathlib import Path
from typing import Any

from mpiblmm.errors import SpecError

#: BLMM options with no mpiblmm equivalent, and why.
NO_EQUIVALENT = {
    "MAXMEM": "mpiblmm budgets memory per rank: set max_memory_mb (MiB, default 2048)",
    "data_mask_thresh": "mpiblmm has no data threshold: values below it stay observations "
                        "(apply it to the images, or use observation_masks)",
    "OutputCovB": "mpiblmm always writes cov_beta",
    "minlog": "mpiblmm stores -log10(p) without a floor",
    "method": "mpiblmm's estimator is its own (Fisher scoring with a polish); BLMM's pSFS/SFS/"
              "pFS/FS choice does not apply",
    "voxelBatching": "mpiblmm shares voxels over MPI ranks (mpirun -n N)",
    "maxnvb": "mpiblmm shares voxels over MPI ranks (mpirun -n N)",
    "resms": "mpiblmm always writes sigma2",
    "safeMode": "mpiblmm fits a voxel only with enough observations (missingness.min_n "
                "defaults to what the estimator needs)",
}
NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")


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
            for note in notes:
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


def convert_file(config: str | os.PathLike, output: str | os.PathLike | None = None,
                 cwd: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """Read a BLMM config; return (spec, notes).  ``output`` is where the spec will be
    written (paths are made relative to its folder), ``cwd`` BLMM's working directory."""
    import yaml

    config = Path(config)
    try:
        raw = yaml.safe_load(config.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror or exc}", str(config)) from None
    except yaml.YAMLError as exc:
        raise SpecError("not valid YAML: " + " ".join(str(exc).split()), str(config)) from None
    if not isinstance(raw, dict):
        raise SpecError("expected a YAML mapping of BLMM options", str(config))
    return convert(raw, str(config), Path(cwd or os.getcwd()),
                   Path(output).resolve().parent if output else None)


def convert(raw: dict, where: str, cwd: Path, folder: Path | None) -> tuple[dict, list[str]]:
    """The spec of a decoded BLMM config.

    ``folder``: the spec's folder (paths are written relative to it), ``None`` for absolute.
    """
    notes: list[str] = []

    def need(key: str) -> Any:
        if raw.get(key) in (None, ""):
            raise SpecError("required BLMM option is missing", f"{where}: {key}")
        return raw[key]

    def path(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"expected a path, got {value!r}", f"{where}: {key}")
        p = Path(os.path.expanduser(value.strip()))
        p = p if p.is_absolute() else cwd / p
        if folder is None:
            return str(p)
        return os.path.relpath(p, folder)

    spec: dict[str, Any] = {}
    spec["images"] = _list_or_file(need("Y_files"), "Y_files", path, cwd, notes)
    spec["X"] = path(need("X"), "X")
    spec["random"] = _factors(need("Z"), where, path, notes)
    if raw.get("contrasts") is not None:
        spec["contrasts"] = _contrasts(raw["contrasts"], where, notes)
    if raw.get("analysis_mask"):
        spec["analysis_mask"] = path(raw["analysis_mask"], "analysis_mask")
    if raw.get("data_mask_files"):
        spec["observation_masks"] = _list_or_file(raw["data_mask_files"], "data_mask_files",
                                                  path, cwd, notes)
    missing = _missingness(raw.get("Missingness"), where)
    if missing:
        spec["missingness"] = missing
    estimation = {}
    if raw.get("maxnit") is not None:
        estimation["max_iterations"] = int(_number(raw["maxnit"], f"{where}: maxnit"))
    if raw.get("tol") is not None:
        estimation["tolerance"] = _number(raw["tol"], f"{where}: tol")
    if estimation:
        spec["estimation"] = estimation
    spec["output"] = path(need("outdir"), "outdir")
    known = {"Y_files", "X", "Z", "contrasts", "analysis_mask", "data_mask_files",
             "Missingness", "maxnit", "tol", "outdir"}
    for key in raw:
        if key in known:
            continue
        reason = NO_EQUIVALENT.get(key)
        notes.append(f"{key}: no equivalent in mpiblmm: {reason}" if reason else
                     f"{key}: unknown BLMM option, not converted")
    return spec, notes


def _list_or_file(value: Any, key: str, path, cwd: Path, notes: list[str]) -> Any:
    """A BLMM list file: kept when its entries resolve the same for the spec, else inlined."""
    list_path = Path(os.path.expanduser(str(value)))
    list_path = list_path if list_path.is_absolute() else cwd / list_path
    try:
        entries = [ln.strip() for ln in list_path.read_text().splitlines()
                   if ln.strip() and not ln.strip().startswith("#")]
    except OSError:
        return path(value, key)  # the spec's loader names the missing file
    relative = [e for e in entries if not Path(os.path.expanduser(e)).is_absolute()]
    if not relative or list_path.parent.resolve() == cwd.resolve():
        return path(value, key)
    notes.append(f"{key}: its relative entries are relative to the working directory in BLMM; "
                 "written into the spec as a list of paths")
    return [path(e, f"{key} entry") for e in entries]


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
    return out


def _contrasts(value: Any, where: str, notes: list[str]) -> list[dict]:
    out = []
    for label, c in _items(value, f"{where}: contrasts", "c"):
        if c.get("vector") is None:
            raise SpecError("required field is missing", f"{where}: contrasts: {label}.vector")
        vector = c["vector"]
        if isinstance(vector, str):
            try:
                vector = ast.literal_eval(vector)
            except (ValueError, SyntaxError):
                raise SpecError(f"not a vector or matrix: {vector!r}",
                                f"{where}: contrasts: {label}.vector") from None
        kind = "F" if isinstance(vector, list) and vector and isinstance(vector[0], list) else "T"
        stat = str(c.get("statType", kind)).upper()
        if stat != kind:
            notes.append(f"contrasts: {label}.statType: {stat} given, but the vector makes a "
                         f"{kind} contrast; mpiblmm takes the kind from the vector")
        for extra in sorted(set(c) - {"name", "vector", "statType"}):
            notes.append(f"contrasts: {label}.{extra}: unknown BLMM field, not converted")
        out.append({"name": _name(c.get("name") or label, f"contrasts: {label}.name", notes),
                    "weights": vector})
    return out


def _name(value: Any, key: str, notes: list[str]) -> str:
    text = str(value).strip()
    name = NAME_BAD.sub("_", text)
    if not name or not name[0].isalnum():
        name = "n" + name
    if name != text:
        notes.append(f"{key}: {text!r} renamed {name!r} (names become file names)")
    return name


def _missingness(value: Any, where: str) -> dict:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise SpecError("expected MinN and/or MinPercent", f"{where}: Missingness")
    lower = {str(k).lower(): v for k, v in value.items()}
    out = {}
    if lower.get("minn") is not None:
        out["min_n"] = int(_number(lower["minn"], f"{where}: Missingness.MinN"))
    if lower.get("minpercent") is not None:
        text = str(lower["minpercent"])
        frac = (_number(text.replace("%", ""), f"{where}: Missingness.MinPercent") / 100.0
                if "%" in text else _number(text, f"{where}: Missingness.MinPercent"))
        out["min_fraction"] = frac
    return out


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg}


def _number(value: Any, where: str) -> float:
    """A number as BLMM accepts it: YAML number or a Python arithmetic string (``1e-6``,
    ``2**32``), evaluated without ``eval``."""
    if isinstance(value, bool):
        raise SpecError(f"expected a number, got {value!r}", where)
    if isinstance(value, (int, float)):
        return value
    try:
        return _arith(ast.parse(str(value).strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError):
        raise SpecError(f"expected a number, got {value!r}", where) from None


def _arith(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("not arithmetic")
