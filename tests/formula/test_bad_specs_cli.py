"""Malformed specs, formulas and covariate tables through `mpiblmm fit` at 2 ranks.

Every case must end with exit code 2 and exactly one line on stderr,
``mpiblmm: error: <where>: <problem>``, naming the key, file, row or term at fault, and no
traceback.  The base study is a small simulated study in the formula form.
"""

from __future__ import annotations

import json

import pytest

from mpiblmm.study import write_study

CSV = "participants.csv"


def _spec(**change):
    def apply(spec, folder):
        for k, v in change.items():
            if v is None:
                spec.pop(k, None)
            else:
                spec[k] = v
    return apply


def _contrast(weights, name="time"):
    return _spec(contrasts=[{"name": name, "weights": weights}])


def _formula(text):
    return _spec(formula=text)


def _table(edit):
    """Write an edited copy of participants.csv and point the spec at it."""
    def apply(spec, folder):
        lines = (folder / CSV).read_text().splitlines()
        (folder / "edited.csv").write_text("\n".join(edit(lines)) + "\n")
        spec["covariates"] = "edited.csv"
    return apply


def _both(*changes):
    def apply(spec, folder):
        for change in changes:
            change(spec, folder)
    return apply


def _cell(row, column, value):
    def edit(lines):
        header = lines[0].split(",")
        cells = lines[row].split(",")
        cells[header.index(column)] = value
        return lines[:row] + [",".join(cells)] + lines[row + 1:]
    return edit


CASES = {
    # ---- keys of the spec
    "unknown key": (_spec(formual="y ~ 1"), "formual: unknown key; did you mean 'formula'?"),
    "both forms": (_spec(X="X.csv"), "X: give either X and random"),
    "covariates not found": (_spec(covariates="nope.csv"), "covariates: file not found"),
    "formula missing": (_spec(formula=None), "formula: required key is missing"),
    "formula not text": (_spec(formula=3), "formula: expected an lme4 formula"),
    "formula empty": (_spec(formula=""), "formula: expected an lme4 formula"),
    "fixed_names with formula": (_spec(fixed_names=["a"]), "fixed_names: not used with a formula"),
    "images not found": (_spec(images="none.txt"), "images: file not found"),
    "min_n zero": (_spec(missingness={"min_n": 0}), "missingness.min_n: expected a whole number"),
    "method": (_spec(estimation={"method": "OLS"}), 'estimation.method: expected "REML" or "ML"'),
    "memory": (_spec(max_memory_mb="lots"), "max_memory_mb: expected a number greater than 0"),
    # an exact dependence is dropped as lme4 drops it (tests/formula/test_dropped_as_lme4.py);
    # one only near (a covariate far from zero beside the intercept) is refused
    "nearly dependent fixed column": (_both(_formula("y ~ time + I(age + 1e7) + (1 | subject)"),
                                            _spec(contrasts=None)),
                                      "formula: column 3 ('I(age + 1e+07)') is nearly a "
                                      "linear combination of the columns before it"),
    # ---- contrasts
    "unknown coefficient": (_contrast({"tme": 1}),
                            "contrasts[0] (\"time\").weights: no coefficient 'tme'; did you mean 'time'?"),
    "short vector": (_contrast([0, 1]), "contrasts[0] (\"time\").weights: each row needs 3 weights, "
                     "one per column of X ((Intercept), age, time), got 2"),
    "weight not a number": (_contrast({"time": "a"}),
                            "contrasts[0] (\"time\").weights.time: expected a number"),
    "dependent rows": (_contrast([{"time": 1}, {"time": 2}]),
                       "contrasts[0] (\"time\").weights: the 2 rows are linearly dependent"),
    "zero weights": (_contrast({"time": 0}), "contrasts[0] (\"time\").weights: all weights are zero"),
    "bad contrast name": (_contrast({"time": 1}, name="a b"), "contrasts[0].name: invalid name"),
    "one-sided F": (_spec(contrasts=[{"name": "f", "weights": [{"age": 1}, {"time": 1}],
                                      "alternative": "less"}]),
                    "contrasts[0] (\"f\").alternative: an F contrast"),
    # ---- the formula
    "unknown column": (_formula("y ~ agee + (1 | subject)"), "formula: term 'agee': no column 'agee' in"),
    "unknown grouping": (_formula("y ~ age + (1 | subjekt)"), "no grouping column 'subjekt'"),
    "bar outside parentheses": (_formula("y ~ age + 1 | subject"), "must stand alone in parentheses"),
    "two tildes": (_formula("y ~ age ~ time"), "formula: more than one '~'"),
    "no tilde": (_formula("age + (1 | subject)"), "formula: no '~'"),
    "empty grouping": (_formula("y ~ age + (1 | )"), "nothing after '|'"),
    "empty bar terms": (_formula("y ~ age + ( | subject)"), "nothing before '|'"),
    "unbalanced": (_formula("y ~ (age + (1 | subject)"), "formula: unbalanced"),
    "grouping expression": (_formula("y ~ age + (1 | subject + visit)"), "unsupported grouping"),
    "response is a column": (_formula("age ~ time + (1 | subject)"), "the response is the image data"),
    "no fixed columns": (_formula("y ~ 0 + (1 | subject)"), "formula: the fixed part has no columns"),
    "subtracted bar": (_formula("y ~ age - (1 | subject)"), "cannot be subtracted"),
    "unknown random covariate": (_formula("y ~ age + (1 + tim | subject)"),
                                 "random term (1 + tim | subject): no column 'tim'"),
    "empty term": (_formula("y ~ age + + (1 | subject)"), "formula: empty term"),
    "no random term": (_formula("y ~ age + time"),
                       "formula: no random-effects term such as (1 | subject)"),
    "non-finite transform": (_formula("y ~ I(age/0) + (1 | subject)"),
                             "formula: column 'I(age/0)' is not a finite number"),
    "single-level factor": (_both(_table(lambda ls: [ls[0] + ",site"] + [x + ",A" for x in ls[1:]]),
                                  _formula("y ~ age + site + (1 | subject)")),
                            "formula: term 'site': site has a single level ('A' in every row)"),
    "single-level random covariate": (
        _both(_table(lambda ls: [ls[0] + ",arm"] + [x + ",B" for x in ls[1:]]),
              _formula("y ~ age + (1 + arm | subject)")),
        "random term (1 + arm | subject): term 'arm': arm has a single level"),
    # ---- constructs R has and mpiblmm refuses, in one line naming the term
    "ordered": (_formula("y ~ age + ordered(subject) + (1 | subject)"),
                "formula: term 'ordered(subject)': unknown function 'ordered'"),
    "natural spline": (_formula("y ~ ns(age, 3) + (1 | subject)"),
                       "formula: term 'ns(age, 3)': unknown function 'ns'"),
    "as.numeric": (_formula("y ~ as.numeric(age) + (1 | subject)"),     # was a Python
                   "formula: as.numeric() is not supported: write the column itself"),  # syntax error
    "is.na": (_formula("y ~ age + (1 | subject) + is.na(time)"),
              "formula: is.na() is not supported"),
    "package prefix": (_formula("y ~ splines::ns(age, 3) + (1 | subject)"),
                       "formula: 'splines::ns': package prefixes (splines::) are not supported"),
    # ---- the covariates table
    "missing value": (_table(_cell(3, "age", "NA")), "edited.csv: row 4: column 'age': missing value 'NA'"),
    "missing label": (_table(_cell(2, "subject", "")), "edited.csv: row 3: column 'subject': missing value"),
    "ragged row": (_table(lambda ls: ls[:4] + [ls[4].rsplit(",", 1)[0]] + ls[5:]),
                   "edited.csv: row 5: has 3 columns; the header has 4"),
    "too few rows": (_table(lambda ls: ls[:-1]), "images: lists 12 images but "),
    "a row of empty cells": (_table(lambda ls: ls[:4] + [",,,"] + ls[5:]),  # skipped, but said
                             "edited.csv has 11 rows (one image per row); 1 line(s) of empty "
                             "cells not counted (line 5)"),
    "labels differing by spaces": (   # R's read.csv reads ' A' and 'A' as two levels
        _both(_table(lambda ls: [ls[0] + ",arm"] + [x + (", A" if i % 2 else ",A")
                                                    for i, x in enumerate(ls[1:])]),
              _formula("y ~ age + arm + (1 | subject)")),
        "edited.csv: row 3: column 'arm': ' A' and 'A' differ only by spaces around them"),
    "duplicate column": (_table(lambda ls: [ls[0].replace("visit", "age")] + ls[1:]),
                         "edited.csv: row 1: column name 'age' appears twice"),
    "empty table": (_table(lambda ls: []), "edited.csv: the file is empty"),
    "typo in a numeric covariate": (  # the fit names the cell too, as `check` does
        _both(_table(_cell(6, "age", "abc")), _contrast({"age": 1}, name="age")),
        "no coefficient 'age'"),
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    write_study(folder, subjects=4, visits=3, shape=(2, 2, 2), seed=2, form="formula")
    return folder


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, study, run_mpi, mpiblmm_command):
    change, expected = CASES[case]
    spec = json.loads((study / "spec.json").read_text())
    change(spec, study)
    path = study / f"bad_{case.replace(' ', '_')}.json"
    path.write_text(json.dumps(spec))
    run = run_mpi(2, [*mpiblmm_command, "fit", str(path)], timeout=120)
    assert not run.timed_out
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpiblmm: error: "), run.stderr
    assert expected in lines[0], lines[0]
    if case == "typo in a numeric covariate":
        assert "(perhaps because column 'age' of" in lines[0], lines[0]
        assert "row 7: 'abc'" in lines[0], lines[0]
    assert "Traceback" not in run.stderr + run.stdout
    assert not (study / "results" / "results.h5").exists()


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
