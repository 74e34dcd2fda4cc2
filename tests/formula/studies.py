"""Formula-form studies of the lme4 reference datasets, beside their matrix-form twins.

Each case writes the covariates table a user would have (text labels, a text ``sex`` column
where the case asks for it), the formula, and the matrix-form spec of the same model (X with
the columns R's ``model.matrix`` gives, in its order), sharing one set of NIfTI images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.cli.studies import write_reference_study


@dataclass(frozen=True)
class Case:
    """A reference dataset written in both forms."""

    dataset: str
    formula: str
    names: tuple[str, ...]        # R's colnames(model.matrix(...)), written by hand
    columns: tuple[str, ...]      # how each column of X is made from the dataset's X
    contrasts: tuple[dict, ...]   # formula form (weights by name where given so)


def _cells(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1]


def _x_text(folder: Path) -> list[list[str]]:
    return [line.split(",") for line in _cells(folder / "X.csv")]


def write_both(ds, case: Case, folder: Path, method: str) -> tuple[Path, Path]:
    """Write the matrix spec (``spec.json``) and the formula spec (``formula.json``)."""
    matrix_spec = write_reference_study(ds, folder, method)
    src = ds.path
    x_text = _x_text(src)
    fixed = list(ds.fixed_names)
    header, cols = [], []
    for name in fixed[1:]:                              # column 0 is the intercept
        j = fixed.index(name)
        text = [row[j] for row in x_text]
        if name == "sex":                               # 0/1 -> the text a table holds
            text = ["M" if float(t) == 1.0 else "F" for t in text]
        header.append(name)
        cols.append(text)
    for f in ds.factors:
        header.append(f.name)
        cols.append(_cells(src / f"factor_{f.name}.csv"))
    rows = [",".join(r) for r in zip(*cols)]
    (folder / "participants.csv").write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")

    X = np.column_stack([_make_column(c, ds) for c in case.columns])
    np.savetxt(folder / "X.csv", X, delimiter=",", fmt="%.17g")
    spec = json.loads(matrix_spec.read_text())
    spec["fixed_names"] = list(case.names)
    spec["contrasts"] = [dict(c, weights=_vector(c["weights"], case.names))
                         for c in case.contrasts]
    matrix_spec.write_text(json.dumps(spec, indent=1))

    formula = {k: v for k, v in spec.items() if k not in ("X", "random", "fixed_names")}
    formula.update({"covariates": "participants.csv", "formula": case.formula,
                    "contrasts": list(case.contrasts), "output": "results_formula"})
    formula_spec = folder / "formula.json"
    formula_spec.write_text(json.dumps(formula, indent=1))
    return matrix_spec, formula_spec


def _make_column(how: str, ds) -> np.ndarray:
    """``"1"``, a dataset column name, or ``"a*b"`` (a product of two of them)."""
    if how == "1":
        return np.ones(ds.n)
    parts = how.split("*")
    out = np.ones(ds.n)
    for p in parts:
        out = out * ds.X[:, list(ds.fixed_names).index(p)]
    return out


def _vector(weights, names):
    if isinstance(weights, dict):
        return [float(weights.get(n, 0.0)) for n in names]
    return weights


CASES = {
    "intercept": Case(
        "intercept", "y ~ age + time + (1 | subject)",
        ("(Intercept)", "age", "time"), ("1", "age", "time"),
        ({"name": "age", "weights": {"age": 1}},
         {"name": "age_time", "weights": [[0, 1, 0], [0, 0, 1]]})),
    "crossed": Case(
        "crossed", "y ~ age + time + (1 | subject) + (1 | site)",
        ("(Intercept)", "age", "time"), ("1", "age", "time"),
        ({"name": "time", "weights": {"time": 1}},
         {"name": "age_minus_time", "weights": {"age": 1, "time": -1}},
         {"name": "age_time", "weights": [[0, 1, 0], [0, 0, 1]]})),
    # text covariate (sex F/M) with an interaction; R orders the columns by degree and
    # the variables of `time:sex` as they first appear: (Intercept) age time sexM time:sexM
    "slope": Case(
        "slope", "y ~ age + time * sex + (1 + time | subject)",
        ("(Intercept)", "age", "time", "sexM", "time:sexM"),
        ("1", "age", "time", "sex", "time*sex"),
        ({"name": "time", "weights": {"time": 1}},
         {"name": "sex", "weights": {"sexM": 1}},
         {"name": "sex_by_time", "weights": {"time:sexM": 1}, "alternative": "greater"},
         {"name": "age_time", "weights": [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]})),
}
