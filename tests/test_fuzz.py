"""Property-based fuzzing (hypothesis) of the spec loader, the design checks and a chunk's
analysis: random specs and small random designs and data never give a traceback (only the
typed :class:`~mpiblmm.errors.UserError`) and never hang (a deadline per example).

Serial and in-process; examples are bounded and derandomised so CI runs the same cases in
well under a minute.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings  # the `test` extra
from hypothesis import strategies as st

from mpiblmm.checks import check_fittable
from mpiblmm.design import build_design, design_from_spec
from mpiblmm.errors import UserError
from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
from mpiblmm.lmm.model import STATUS_CODES
from mpiblmm.lmm.products import random_design
from mpiblmm.spec import load_spec

FUZZ = settings(max_examples=60, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _model(design) -> Model:
    rd = random_design([f.codes for f in design.factors], [f.Z for f in design.factors])
    cons = tuple(ContrastDef(c.name, np.asarray(c.L, dtype=float), c.kind, c.alternative)
                 for c in design.contrasts)
    return Model(np.asarray(design.X, dtype=float), rd, cons)


def _check_analysis(design, Y: np.ndarray, stg: Settings) -> None:
    """The analysis of a design that passed the checks: never raises, statuses are known
    codes, fitted voxels have finite estimates and the others NaN."""
    out = analyse_chunk(_model(design), Y, stg)
    status = out["status"]
    assert set(np.unique(status).tolist()) <= set(STATUS_CODES)
    fitted = status <= 2
    assert np.isfinite(out["beta"][fitted]).all() and np.isfinite(out["sigma2"][fitted]).all()
    assert np.isnan(out["beta"][~fitted]).all()


# --------------------------------------------------------------------------- random specs
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 500),
                         st.floats(allow_nan=False, width=32), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=10)
cells = st.one_of(st.integers(-3, 3).map(str), st.floats(-10, 10).map(lambda x: f"{x:.3g}"),
                  st.sampled_from(["", " ", "nan", "inf", "x", "1e400", "é"]))


def csv_text(rows, cols):
    return st.lists(st.lists(cells, min_size=cols, max_size=cols), min_size=rows,
                    max_size=rows).map(lambda rs: "".join(",".join(r) + "\n" for r in rs))


@st.composite
def spec_folders(draw):
    """A spec (some keys valid, some random) and its CSV files, as {file name: text}."""
    n = draw(st.integers(2, 6))
    files = {}
    n = 3 * n
    good_x = "".join(f"1,{i % 3},{(i * 7) % 5 + 0.5 * (i % 2)}\n" for i in range(n))
    X = draw(st.one_of(csv_text(n, draw(st.integers(1, 3))), st.just(good_x), st.just(good_x)))
    files["X.csv"] = X
    files["f.csv"] = draw(st.one_of(
        st.just("".join(f"s{i // 3}\n" for i in range(n))),
        st.just("".join(f"s{i // 3}\n" for i in range(n))),
        st.lists(st.sampled_from(["a", "b", "c", "", "a,b"]), min_size=1, max_size=n + 1)
        .map(lambda ls: "".join(x + "\n" for x in ls))))
    files["Z.csv"] = draw(st.one_of(
        csv_text(draw(st.sampled_from([n, n - 1])), draw(st.integers(1, 2))),
        st.just("".join(f"1,{i % 3}\n" for i in range(n))), st.just("1\n" * n)))
    files["images.txt"] = "".join(f"img{i}.nii\n" for i in range(n))
    spec = {"images": "images.txt", "X": "X.csv",
            "random": [{"name": "s", "factor": "f.csv", "design": "Z.csv"}],
            "contrasts": [{"name": "c", "weights": [0, 1, 0]}]}
    for key in draw(st.lists(st.sampled_from(
            ["images", "X", "random", "contrasts", "missingness", "estimation",
             "max_memory_mb", "fixed_names", "zero_is_missing", "output", "junk"]),
            max_size=draw(st.sampled_from([0, 0, 1, 3])), unique=True)):
        spec[key] = draw(json_values)
    if draw(st.booleans()):
        spec["missingness"] = {"min_n": draw(st.one_of(st.integers(1, 20), st.integers(-1, 0))),
                               "min_fraction": draw(st.one_of(st.floats(0, 1), st.floats(0, 1),
                                                              st.floats(-0.5, 1.5)))}
    if draw(st.booleans()):
        spec["estimation"] = {"method": draw(st.sampled_from(["REML", "ML", "REML", "ML", "x"])),
                              "max_iterations": draw(st.sampled_from([1, 2, 5, 0]))}
    text = json.dumps(spec)
    if draw(st.sampled_from([False] * 9 + [True])):      # now and then, a broken file
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "}", "\udcff", ",,"]))
    return text, files


@FUZZ
@given(spec_folders())
def test_random_specs_fail_only_with_user_errors(case):
    text, files = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, content in files.items():
            (folder / name).write_text(content)
        (folder / "spec.json").write_bytes(text.encode("utf-8", errors="surrogateescape"))
        try:
            spec = load_spec(folder / "spec.json", check_files=False)
            design = design_from_spec(spec)
            check_fittable(design, spec)
        except UserError as exc:
            assert "\n" not in str(exc)
            event(f"refused: {(exc.where or '').split('/')[-1]} {exc.message[:25]}")
            return
        event("analysed")
        rng = np.random.default_rng(0)
        Y = rng.normal(size=(3, design.n))
        _check_analysis(design, Y, Settings(method=spec.estimation.method,
                                            max_iterations=spec.estimation.max_iterations,
                                            min_n=spec.missingness.min_n or 0,
                                            min_fraction=spec.missingness.min_fraction))


# --------------------------------------------------------------------------- random designs
@st.composite
def designs(draw):
    n = draw(st.integers(3, 30))
    p = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    X[:, 0] = 1.0
    kind = draw(st.sampled_from(["fine", "duplicate", "zero", "integer"]))
    if kind == "duplicate" and p > 1:
        X[:, -1] = X[:, 0]
    elif kind == "zero" and p > 1:
        X[:, -1] = 0.0
    elif kind == "integer":
        X = np.round(X)
    factors = []
    for k in range(draw(st.integers(1, 2))):
        levels = draw(st.one_of(st.integers(2, max(2, n // 4)), st.integers(2, max(2, n // 4)),
                                st.integers(1, n)))
        labels = [f"l{i}" for i in rng.integers(0, levels, n)]
        q = draw(st.sampled_from([1, 1, 2, 3]))
        Z = None if q == 1 and draw(st.booleans()) else rng.normal(size=(n, q))
        if Z is not None and draw(st.booleans()):
            Z[:, 0] = 1.0
            if q > 1 and draw(st.integers(0, 3)) == 0:
                Z[:, 1] = 1.0                            # the intercept twice
        factors.append((f"f{k}", labels, Z, None))
    contrasts = [("c", np.eye(p)[-1], "two-sided")]
    v = draw(st.integers(1, 4))
    Y = rng.normal(size=(v, n)) * draw(st.sampled_from([1.0, 1e-6, 1e6]))
    data = draw(st.sampled_from(["noise", "constant", "missing", "all missing", "float32"]))
    if data == "constant":
        Y[0] = 5.0
    elif data == "missing":
        Y[rng.random(Y.shape) < 0.3] = np.nan
    elif data == "all missing":
        Y[0] = np.nan
    elif data == "float32":
        Y = Y.astype(np.float32)
    stg = Settings(method=draw(st.sampled_from(["REML", "ML"])),
                   max_iterations=draw(st.sampled_from([None, 1, 3])),
                   min_n=draw(st.integers(0, n + 2)),
                   min_fraction=draw(st.sampled_from([0.0, 0.5, 1.0])))
    return X, factors, contrasts, Y, stg


@FUZZ
@given(designs())
def test_random_designs_are_refused_clearly_or_analysed(case):
    X, factors, contrasts, Y, stg = case
    try:
        design = build_design(X, factors, contrasts)
        check_fittable(design)
    except UserError as exc:
        assert "\n" not in str(exc)
        event("refused")
        return
    event("analysed")
    _check_analysis(design, Y, stg)
