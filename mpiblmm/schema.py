"""The spec's JSON Schema (both forms) and its errors as one-line messages.

``mpiblmm schema`` prints :data:`SCHEMA` so editors can check a spec as it is written;
:func:`mpiblmm.spec.parse_spec` validates against the same schema first (every rule JSON
Schema can express: keys, types, ranges, name patterns, enumerations), then checks what it
cannot (files, the rows of F contrasts, cross-key rules).  :func:`schema_problems` lists
every violation as ``(key, problem)`` in the loader's wording, e.g.
``("contrasts[0] (\\"c\\").weights[1]", "expected a number, got \\"x\\"")``; unknown keys
come with a did-you-mean suggestion.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mpiblmm.spec import (  # noqa: E402
    ALTERNATIVES, MAX_ITERATIONS, MAX_MEMORY_MB, NAME_PATTERN, NAME_RULE, TOP_KEYS)

NAME = {"type": "string", "pattern": NAME_PATTERN.pattern, "description": NAME_RULE}
PATH = {"type": "string", "minLength": 1, "description": "a non-empty string"}
NAMES = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1},
         "description": "a non-empty list of names"}
PATHS = {"oneOf": [PATH, {"type": "array", "minItems": 1, "items": PATH}],
         "description": "a list file or a JSON list of paths"}
ROW = {"type": "array", "minItems": 1, "items": {"type": "number"},
       "description": "a non-empty list of numbers"}
NAMED_ROW = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "number"},
             "description": "coefficient names and their weights"}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/mpiblmm/mpiblmm/spec.schema.json",
    "title": "mpiblmm analysis spec",
    "description": ("Matrix form (X, random) or formula form (covariates, formula); "
                    "see docs/SPEC.md"),
    "type": "object",
    "required": ["images"],
    "additionalProperties": False,
    "properties": {
        "images": {
            "oneOf": [
                PATH,
                {"type": "array", "minItems": 1, "items": PATH},
                {"type": "object", "required": ["h5"], "additionalProperties": False,
                 "properties": {"h5": PATH, "dataset": PATH}},
            ],
            "description": "a list file, a JSON list of NIfTI paths, one 4-D NIfTI, or {\"h5\": ...}",
        },
        "X": PATH,
        "random": {
            "type": "array", "minItems": 1, "description": "a non-empty list of factors",
            "items": {
                "type": "object", "required": ["name", "factor"], "additionalProperties": False,
                "properties": {"name": NAME, "factor": PATH, "design": PATH,
                               "effect_names": NAMES},
            },
        },
        "covariates": PATH,
        "formula": {"type": "string", "minLength": 1, "description": "an lme4 formula, e.g. "
                    "\"y ~ age + (1 | subject)\""},
        "contrasts": {
            "type": "array", "description": "a list of contrasts",
            "items": {
                "type": "object", "required": ["name", "weights"], "additionalProperties": False,
                "properties": {
                    "name": NAME,
                    "weights": {
                        "oneOf": [ROW, {"type": "array", "minItems": 1, "items": ROW},
                                  NAMED_ROW, {"type": "array", "minItems": 1, "items": NAMED_ROW}],
                        "description": ("a row of numbers (T), a list of rows (F), or "
                                        "coefficient names and weights"),
                    },
                    "alternative": {"enum": list(ALTERNATIVES)},
                },
            },
        },
        "output": PATH,
        "fixed_names": NAMES,
        "analysis_mask": {"type": ["string", "null"], "minLength": 1,
                          "description": "a non-empty string"},
        "observation_masks": PATHS,
        "zero_is_missing": {"type": "boolean", "description": "true or false"},
        "missingness": {
            "type": ["object", "null"], "additionalProperties": False,
            "properties": {
                "min_n": {"type": ["integer", "null"], "minimum": 1,
                          "description": "a whole number of at least 1"},
                "min_fraction": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                                 "description": "a number between 0.0 and 1.0"},
            },
        },
        "estimation": {
            "type": ["object", "null"], "additionalProperties": False,
            "properties": {
                "method": {"type": ["string", "null"],
                           "pattern": "^([Rr][Ee][Mm][Ll]|[Mm][Ll])$",
                           "description": "\"REML\" or \"ML\""},
                "tolerance": {"type": ["number", "null"], "exclusiveMinimum": 0,
                              "description": "a number greater than 0"},
                "max_iterations": {"type": ["integer", "null"], "minimum": 1,
                                   "maximum": MAX_ITERATIONS,
                                   "description": f"a whole number from 1 to {MAX_ITERATIONS}"},
            },
        },
        "max_memory_mb": {"type": ["number", "null"], "exclusiveMinimum": 0,
                          "maximum": MAX_MEMORY_MB,
                          "description": f"a number greater than 0 and at most {MAX_MEMORY_MB} "
                                         "(MiB per rank: 1 PiB)"},
    },
    "oneOf": [
        {"title": "matrix form", "required": ["X", "random"],
         "not": {"anyOf": [{"required": ["covariates"]}, {"required": ["formula"]}]}},
        {"title": "formula form", "required": ["covariates", "formula"],
         "not": {"anyOf": [{"required": ["X"]}, {"required": ["random"]},
                           {"required": ["fixed_names"]}]}},
    ],
}

assert set(SCHEMA["properties"]) == TOP_KEYS, "the schema and spec.TOP_KEYS must agree"

_TYPE_WORDS = {"string": "a non-empty string", "number": "a number", "integer": "a whole number",
               "boolean": "true or false", "array": "a list", "object": "a JSON object",
               "null": "null"}


def schema_text() -> str:
    """The schema as printed by ``mpiblmm schema``."""
    return json.dumps(SCHEMA, indent=2) + "\n"


def run_schema(args: Any) -> int:
    """Handler of ``mpiblmm schema``: rank 0 prints the schema."""
    import sys

    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        sys.stdout.write(schema_text())
        sys.stdout.flush()
    return 0


def schema_problems(raw: Any) -> list[tuple[str, str]]:
    """Every schema violation of a decoded spec as ``(key, problem)``, in document order."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(SCHEMA)
    out = []
    for error in sorted(validator.iter_errors(raw), key=lambda e: [str(x) for x in e.absolute_path]):
        out.extend(_translate(error, raw))
    seen, unique = set(), []
    for item in out:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def key_text(path: Any, raw: Any) -> str:
    """``contrasts[0] ("c").weights[1]`` from a JSON path (contrasts named when they can be)."""
    text, node = "", raw
    parts = list(path)
    for i, part in enumerate(parts):
        if isinstance(part, int):
            text += f"[{part}]"
            if i == 1 and parts[0] == "contrasts" and isinstance(node, list) and part < len(node) \
                    and isinstance(node[part], dict) and isinstance(node[part].get("name"), str) \
                    and re.match(NAME["pattern"], node[part]["name"]):
                text += f' ("{node[part]["name"]}")'
        else:
            text += ("." if text else "") + str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return text


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _translate(error: Any, raw: Any) -> list[tuple[str, str]]:
    from mpiblmm.spec import unknown_key

    key = key_text(error.absolute_path, raw)
    schema = error.schema if isinstance(error.schema, dict) else {}
    what = schema.get("description")
    kind = error.validator
    value = error.instance
    if kind == "additionalProperties":
        allowed = set(schema.get("properties", {}))
        extra = [k for k in value if k not in allowed]
        return [(f"{key}.{k}" if key else k, unknown_key(k, allowed)) for k in extra]
    if kind == "required":
        missing = error.message.split("'")[1]
        return [(f"{key}.{missing}" if key else missing, "required key is missing")]
    if kind == "oneOf" and not error.absolute_path and isinstance(value, dict):
        return _form_problem(value)
    if kind in ("oneOf", "anyOf"):
        return _best_branch(error, raw, what, value)
    if kind == "type":
        want = schema.get("type")
        want = want[0] if isinstance(want, list) else want
        return [(key, f"expected {what or _TYPE_WORDS.get(want, want)}, got {_show(value)}")]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return [(key, f"expected {what or 'a number in range'}, got {_show(value)}")]
    if kind in ("minItems", "minProperties"):
        if key in ("images", "observation_masks") and value == []:
            return [(key, "the list is empty")]
        return [(key, f"expected {what or 'a non-empty list'}, got {_show(value)}")]
    if kind == "minLength":
        return [(key, f"expected {what or 'a non-empty string'}, got {_show(value)}")]
    if kind == "pattern":
        if key.endswith("name"):
            return [(key, f"invalid name {value!r} (use {what})")]
        return [(key, f"expected {what}, got {_show(value)}")]
    if kind == "enum":
        return [(key, f"expected one of {', '.join(map(str, error.validator_value))}, "
                      f"got {_show(value)}")]
    return [(key, error.message)]


def _best_branch(error: Any, raw: Any, what: str | None, value: Any) -> list[tuple[str, str]]:
    """For a value that fits no branch: the errors of the branch it fits best (its top-level
    type matches, fewest errors), else 'expected <description>'."""
    branches: dict[int, list] = {}
    for sub in error.context:
        branches.setdefault(sub.schema_path[0], []).append(sub)
    fitting = [errs for errs in branches.values()
               if not any(e.validator == "type" and not e.relative_path for e in errs)]
    if not fitting:
        return [(key_text(error.absolute_path, raw), f"expected {what or 'another value'}, got {_show(value)}")]
    best = min(fitting, key=len)
    out = []
    for sub in best:
        out.extend(_translate(sub, raw))
    return out


def _form_problem(raw: dict) -> list[tuple[str, str]]:
    matrix = [k for k in ("X", "random") if k in raw]
    formula = [k for k in ("covariates", "formula") if k in raw]
    if matrix and formula:
        return [(matrix[0], "give either X and random (matrix form) or covariates and "
                            "formula (formula form), not both")]
    if formula and "fixed_names" in raw:
        return [("fixed_names", "not used with a formula (the coefficients take R's names "
                                "from the formula)")]
    need = ("covariates", "formula") if formula else ("X", "random")
    missing = [k for k in need if k not in raw]
    if not matrix and not formula:
        return [("X", "required key is missing (or give covariates and formula)")]
    return [(k, "required key is missing") for k in missing]
