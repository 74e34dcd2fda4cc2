"""The bad-input suite (issue 11): every malformed spec, table, image, packed file, threshold,
contrast or unfittable design ends `mpiblmm fit` at 2 ranks with exit code 2 on every rank,
exactly one line on stderr naming the culprit, no traceback, no hang, and no results file
that claims to be complete.

The cases are a table (:data:`CASES`): each writes what it needs into its own folder on top
of one small valid study, and says which text the error line must contain.  All cases run
in one `mpiexec -n 2` job (``bad_inputs_driver.py`` calls the CLI in-process per case), so
the suite costs one launch, not one per case.  A control case (the valid study) must fit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

N_SUB, VISITS, GRID = 8, 3, (3, 3, 2)
N = N_SUB * VISITS


# --------------------------------------------------------------------------- the valid study
def write_base(folder: Path) -> None:
    """A small valid study: 8 subjects x 3 visits, random intercept + slope, 18 voxels."""
    import h5py
    import nibabel as nib

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    t = np.tile(np.arange(VISITS), N_SUB).astype(float)
    X = np.column_stack([np.ones(N), t, rng.normal(size=N)])
    sub = np.repeat(np.arange(N_SUB), VISITS)
    Y = (100 + X @ [0, 1, 0.5])[:, None] + rng.normal(size=(N_SUB, 18))[sub] \
        + rng.normal(size=(N, 18))
    Y = Y.astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    (folder / "images").mkdir()
    for i in range(N):
        nib.save(nib.Nifti1Image(Y[i].reshape(GRID), affine), folder / f"images/obs{i:02d}.nii")
    (folder / "images.txt").write_text("".join(f"images/obs{i:02d}.nii\n" for i in range(N)))
    np.savetxt(folder / "X.csv", X, delimiter=",")
    (folder / "factor.csv").write_text("".join(f"s{s}\n" for s in sub))
    np.savetxt(folder / "Z.csv", np.column_stack([np.ones(N), t]), delimiter=",")
    nib.save(nib.Nifti1Image(np.ones(GRID, dtype=np.uint8), affine), folder / "mask.nii")
    with h5py.File(folder / "packed.h5", "w") as f:
        d = f.create_dataset("Y", data=Y)
        d.attrs["grid_shape"] = np.array(GRID)
        d.attrs["affine"] = affine


def base_spec(base: Path, case: Path) -> dict:
    return {
        "images": str(base / "images.txt"),
        "X": str(base / "X.csv"),
        "random": [{"name": "subject", "factor": str(base / "factor.csv"),
                    "design": str(base / "Z.csv")}],
        "contrasts": [{"name": "time", "weights": [0, 1, 0]}],
        "output": str(case / "results"),
    }


# --------------------------------------------------------------------------- case helpers
Case = tuple[str, Callable[[Path, Path], list[str]], str]   # name, writer -> argv, culprit


def _spec_argv(case: Path, spec: dict | str | bytes, *extra: str) -> list[str]:
    path = case / "spec.json"
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    else:
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return ["fit", str(path), "--quiet", *extra]


def edit(change: Callable[[dict, Path, Path], None], *extra: str):
    """A case whose spec is the base spec changed by ``change(spec, base, case)``."""
    def write(base: Path, case: Path) -> list[str]:
        spec = base_spec(base, case)
        change(spec, base, case)
        return _spec_argv(case, spec, *extra)
    return write


def raw(text: str | bytes):
    return lambda base, case: _spec_argv(case, text)


def setkey(key: str, value):
    """Set ``key`` (dotted path, list indices as numbers) of the spec to ``value``."""
    def change(spec, base, case):
        parts = key.split(".")
        node = spec
        for p in parts[:-1]:
            p = int(p) if p.isdigit() else p
            if isinstance(node, dict) and p not in node:
                node[p] = {}
            node = node[p]
        last = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        node[last] = value
    return edit(change)


def delkey(key: str):
    def change(spec, base, case):
        parts = key.split(".")
        node = spec
        for p in parts[:-1]:
            node = node[int(p) if p.isdigit() else p]
        del node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]]
    return edit(change)


def with_file(key: str, name: str, content: str | bytes | Callable[[Path], object]):
    """Write ``content`` to ``case/name`` and point ``key`` at it."""
    def change(spec, base, case):
        path = case / name
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        parts = key.split(".")
        node = spec
        for p in parts[:-1]:
            node = node[int(p) if p.isdigit() else p]
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = str(path)
    return edit(change)


def csv_of(a: np.ndarray) -> str:
    return "".join(",".join(f"{x:.10g}" for x in row) + "\n" for row in np.atleast_2d(a))


def base_X() -> np.ndarray:
    t = np.tile(np.arange(VISITS), N_SUB).astype(float)
    return np.column_stack([np.ones(N), t, np.random.default_rng(0).normal(size=N)])


def nifti(data: np.ndarray, affine=None):
    def write(path: Path):
        import nibabel as nib

        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None
                                 else affine), path)
    return write


def images_replaced(index: int, writer: Callable[[Path], object], name: str = "bad.nii"):
    """The image list with image ``index`` replaced by a file ``writer`` makes."""
    def change(spec, base, case):
        writer(case / name)
        paths = [str(base / f"images/obs{i:02d}.nii") for i in range(N)]
        paths[index] = str(case / name)
        spec["images"] = paths
    return edit(change)


def packed(make: Callable[[Path], None], dataset: str | None = None):
    def change(spec, base, case):
        make(case / "p.h5")
        spec["images"] = {"h5": str(case / "p.h5")}
        if dataset is not None:
            spec["images"]["dataset"] = dataset
    return edit(change)


def h5(build: Callable):
    def make(path: Path):
        import h5py

        with h5py.File(path, "w") as f:
            build(f)
    return make


def _Y() -> np.ndarray:
    return np.random.default_rng(1).normal(100, 1, size=(N, 18)).astype(np.float32)


def _packed_ok(f, Y=None, affine=None, grid=GRID):
    d = f.create_dataset("Y", data=_Y() if Y is None else Y)
    d.attrs["grid_shape"] = np.array(grid)
    d.attrs["affine"] = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine


def x_file(a: np.ndarray):
    """X replaced by ``a`` (contrasts dropped: their width would be the first complaint)."""
    def change(spec, base, case):
        (case / "X.csv").write_text(csv_of(a))
        spec["X"] = str(case / "X.csv")
        spec["contrasts"] = []
    return edit(change)


def z_file(a: np.ndarray):
    return with_file("random.0.design", "Z.csv", csv_of(a))


def factor_file(labels: list[str]):
    return with_file("random.0.factor", "factor.csv", "".join(f"{x}\n" for x in labels))


def _t():
    return np.tile(np.arange(VISITS), N_SUB).astype(float)


def cli_output(value: str):
    def write(base: Path, case: Path) -> list[str]:
        return _spec_argv(case, base_spec(base, case), "--output", value)
    return write


# --------------------------------------------------------------------------- the table
CASES: list[Case] = [
    # ---- the spec file itself
    ("invalid JSON", raw("{ not json"), "not valid JSON"),
    ("invalid UTF-8 spec", raw(b'{"images": "\xff\xfe"}'), "spec.json"),
    ("top level is a list", raw("[1, 2]"), "JSON object"),
    ("key given twice", raw('{"X": "a", "X": "b"}'), "key given twice"),
    ("empty spec", raw(""), "spec.json"),
    ("unknown top key", setkey("colour", "blue"), "colour"),
    ("images missing", delkey("images"), "images"),
    ("X missing", delkey("X"), "spec.json: X"),
    ("random missing", delkey("random"), "spec.json: random"),
    ("images is a number", setkey("images", 3), "images"),
    ("images empty list", setkey("images", []), "images"),
    ("image list file missing", setkey("images", "nope.txt"), "nope.txt"),
    ("image list names a missing file",
     with_file("images", "list.txt", "missing.nii\n"), "list.txt: row 1"),
    ("image list names a non-NIfTI", with_file("images", "list.txt", "a.png\n"), "list.txt: row 1"),
    ("image list is empty", with_file("images", "list.txt", "# nothing\n"), "list.txt"),
    ("image list is a folder", edit(lambda s, b, c: s.update(images=str(b / "images"))),
     "images: is a directory, not a file"),
    ("X is a number", setkey("X", 12), "spec.json: X"),
    ("X file missing", setkey("X", "missing.csv"), "missing.csv"),
    ("random not a list", setkey("random", {"name": "s"}), "spec.json: random"),
    ("random empty", setkey("random", []), "spec.json: random"),
    ("factor without name", delkey("random.0.name"), "random[0].name"),
    ("factor without file", delkey("random.0.factor"), "random[0].factor"),
    ("factor with a bad name", setkey("random.0.name", "my subject"), "random[0].name"),
    ("factor with an unknown key", setkey("random.0.slope", True), "random[0].slope"),
    ("factor design file missing", setkey("random.0.design", "nope.csv"), "random[0].design"),
    ("factor effect_names wrong count", setkey("random.0.effect_names", ["a"]),
     "random[0].effect_names"),
    ("two factors with one name",
     edit(lambda s, b, c: s["random"].append(dict(s["random"][0]))), "appears twice"),
    ("fixed_names wrong count", setkey("fixed_names", ["a", "b"]), "fixed_names"),
    ("fixed_names repeated", setkey("fixed_names", ["a", "a", "b"]), "fixed_names"),
    ("output empty string", setkey("output", ""), "output"),
    ("zero_is_missing not a boolean", setkey("zero_is_missing", "yes"), "zero_is_missing"),
    ("analysis_mask not NIfTI", setkey("analysis_mask", "mask.txt"), "analysis_mask"),
    ("observation_masks count", setkey("observation_masks", []), "observation_masks"),
    ("max_memory_mb zero", setkey("max_memory_mb", 0), "max_memory_mb"),
    ("max_memory_mb text", setkey("max_memory_mb", "lots"), "max_memory_mb"),
    ("max_memory_mb too small to run", setkey("max_memory_mb", 20), "give at least"),
    # (a fault audit's: tracebacks from Python's float, json and os)
    ("max_memory_mb too large for a float", setkey("max_memory_mb", 10**400), "max_memory_mb"),
    ("max_memory_mb 1e308", setkey("max_memory_mb", 1e308),
     "max_memory_mb: expected a number greater than 0 and at most 1073741824"),
    ("tolerance too large for a float", setkey("estimation.tolerance", 10**400),
     "estimation.tolerance: expected a number"),
    ("contrast weight too large for a float", setkey("contrasts.0.weights", [0, 10**400, 0]),
     'contrasts[0] ("time").weights[1]: expected a number'),
    ("output with a NUL character", setkey("output", "res\0ults"),
     "output: contains a NUL character"),
    ("image list row with a NUL character", with_file("images", "list.txt", "a\0.nii\n"),
     "list.txt: row 1: contains a NUL character"),
    ("spec nested too deeply", raw('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     "not valid JSON for mpiblmm: nested too deeply"),
    # ---- contrasts
    ("contrasts not a list", setkey("contrasts", {"time": [0, 1, 0]}), "contrasts"),
    ("contrast without weights", delkey("contrasts.0.weights"), 'contrasts[0] ("time").weights'),
    ("contrast too short", setkey("contrasts.0.weights", [0, 1]), 'contrasts[0] ("time").weights'),
    ("contrast all zero", setkey("contrasts.0.weights", [0, 0, 0]), 'contrasts[0] ("time").weights'),
    ("contrast weights text", setkey("contrasts.0.weights", ["a", 1, 0]), 'contrasts[0] ("time").weights'),
    ("contrast weight NaN", setkey("contrasts.0.weights", [0, float("nan"), 0]),
     'contrasts[0] ("time").weights'),
    ("contrast bad name", setkey("contrasts.0.name", "a/b"), "contrasts[0].name"),
    ("contrast name too long for its map files", setkey("contrasts.0.name", "t" * 300),
     f'contrasts[0] ("{"t" * 37}..."): name too long: 300 bytes, at most 217'),
    ("factor name too long for its map files", setkey("random.0.name", "s" * 230),
     "random[0].name: name too long: 230 bytes, at most 224"),
    ("contrast names repeated",
     edit(lambda s, b, c: s["contrasts"].append(dict(s["contrasts"][0]))), "appears twice"),
    ("contrast bad alternative", setkey("contrasts.0.alternative", "up"),
     'contrasts[0] ("time").alternative'),
    ("one-sided F contrast",
     edit(lambda s, b, c: s["contrasts"].append({"name": "F", "weights": [[0, 1, 0], [0, 0, 1]],
                                                 "alternative": "greater"})),
     'contrasts[1] ("F").alternative'),
    ("F contrast rows dependent",
     edit(lambda s, b, c: s["contrasts"].append({"name": "F", "weights": [[0, 1, 0], [0, 2, 0]]})),
     'contrasts[1] ("F").weights'),
    # ---- missingness and estimation
    ("min_n zero", setkey("missingness.min_n", 0), "missingness.min_n"),
    ("min_n above n", setkey("missingness.min_n", N + 1), "missingness.min_n"),
    ("min_fraction above 1", setkey("missingness.min_fraction", 1.5), "missingness.min_fraction"),
    ("missingness unknown key", setkey("missingness.min_count", 3), "missingness.min_count"),
    ("method unknown", setkey("estimation.method", "GLS"), "estimation.method"),
    ("tolerance negative", setkey("estimation.tolerance", -1), "estimation.tolerance"),
    ("max_iterations zero", setkey("estimation.max_iterations", 0), "estimation.max_iterations"),
    ("max_iterations fractional", setkey("estimation.max_iterations", 1.5),
     "estimation.max_iterations"),
    # ---- CSV tables
    ("X with a header", with_file("X", "X.csv", "a,b,c\n" + csv_of(base_X())), "X.csv: row 1"),
    ("X with NaN", with_file("X", "X.csv", csv_of(base_X()).replace("1,", "nan,", 1)),
     "X.csv: row 1"),
    ("X ragged", with_file("X", "X.csv", csv_of(base_X()) + "1,2\n"), f"X.csv: row {N + 1}"),
    ("X empty", with_file("X", "X.csv", ""), "X.csv"),
    ("X invalid UTF-8", with_file("X", "X.csv", b"1,\xff\n"), "X.csv"),
    ("X fewer rows than images", x_file(base_X()[:-1]), "X.csv"),
    ("factor two columns", with_file("random.0.factor", "factor.csv", "a,b\n" * N), "factor.csv"),
    ("factor wrong rows", factor_file([f"s{i}" for i in range(N - 2)]), "factor.csv"),
    ("factor empty label", factor_file(["s0"] * (N - 1) + [" "]), "factor.csv"),
    ("Z wrong rows", z_file(np.ones((N - 1, 2))), "Z.csv"),
    ("Z not numeric", with_file("random.0.design", "Z.csv", "1,x\n" * N), "Z.csv: row 1"),
    # ---- designs that cannot be fitted anywhere
    ("X rank deficient", x_file(np.column_stack([base_X(), 2 * base_X()[:, 1]])), "column 4"),
    ("X zero column", x_file(np.column_stack([base_X(), np.zeros(N)])), "column 4"),
    ("more fixed effects than observations",
     x_file(np.random.default_rng(2).normal(size=(N, N))), "only 24 observations"),
    ("one observation per level, intercept and slope",
     factor_file([f"s{i}" for i in range(N)]), "not identifiable"),
    ("as many levels as observations, intercept only",
     edit(lambda s, b, c: (s["random"][0].pop("design"),
                           (c / "f.csv").write_text("".join(f"s{i}\n" for i in range(N))),
                           s["random"][0].update(factor=str(c / "f.csv")))),
     "not identifiable"),
    ("factor with one level", factor_file(["all"] * N), "1 level"),
    ("duplicated intercept in Z", z_file(np.ones((N, 2))), "column 2"),
    ("Z column a multiple of another", z_file(np.column_stack([_t(), 3 * _t()])), "column 2"),
    # ---- images
    ("image not a NIfTI file", images_replaced(3, lambda p: p.write_bytes(b"garbage" * 50)),
     "bad.nii"),
    ("image on another grid", images_replaced(5, nifti(np.ones((4, 3, 2), np.float32))),
     "bad.nii"),
    ("image with another affine", images_replaced(
        2, nifti(np.ones(GRID, np.float32), np.diag([3.0, 2.0, 2.0, 1.0]))), "bad.nii"),
    ("image 4-D", images_replaced(1, nifti(np.ones(GRID + (2,), np.float32))), "bad.nii"),
    ("every image empty", edit(lambda s, b, c: (
        [nifti(np.zeros(GRID, np.float32))(c / f"z{i}.nii") for i in range(N)],
        s.update(images=[str(c / f"z{i}.nii") for i in range(N)]))), "no voxel is observed"),
    ("every observation mask empty", edit(lambda s, b, c: (
        nifti(np.zeros(GRID, np.uint8))(c / "zero_mask.nii"),
        s.update(observation_masks=[str(c / "zero_mask.nii")] * N))),
     "where its observation mask is non-zero"),
    ("analysis mask on another grid",
     with_file("analysis_mask", "m.nii", nifti(np.ones((2, 2, 2), np.uint8))), "m.nii"),
    ("analysis mask empty",
     with_file("analysis_mask", "m.nii", nifti(np.zeros(GRID, np.uint8))), "no voxel"),
    # ---- packed HDF5
    ("packed file not HDF5", packed(lambda p: p.write_bytes(b"nope" * 100)), "p.h5"),
    ("packed dataset missing", packed(h5(_packed_ok), dataset="/Z"), "p.h5"),
    ("packed wrong number of observations",
     packed(h5(lambda f: _packed_ok(f, Y=_Y()[:-1]))), "p.h5"),
    ("packed 1-D dataset", packed(h5(lambda f: f.create_dataset("Y", data=np.ones(N)))), "p.h5"),
    ("packed text dataset", packed(h5(lambda f: f.create_dataset("Y", data=np.array([b"a"] * N)))),
     "p.h5"),
    ("packed without affine", packed(h5(lambda f: f.create_dataset("Y", data=_Y()))), "affine"),
    ("packed NaN affine",
     packed(h5(lambda f: _packed_ok(f, affine=np.full((4, 4), np.nan)))), "affine"),
    ("packed grid does not match",
     packed(h5(lambda f: _packed_ok(f, grid=(4, 4, 4)))), "p.h5"),
    ("packed with observation masks",
     edit(lambda s, b, c: (s.update(images={"h5": str(b / "packed.h5")}),
                           s.update(observation_masks=[str(b / "mask.nii")] * N))),
     "observation_masks"),
    # ---- the command line
    ("--output empty", cli_output(""), "--output"),
    ("--max-memory-mb too small", edit(lambda s, b, c: None, "--max-memory-mb", "5"),
     "--max-memory-mb"),
    ("spec is a folder", lambda b, c: ["fit", str(c)], "SPEC is a directory"),
    ("--chunk-voxels zero", edit(lambda s, b, c: None, "--chunk-voxels", "0"),
     "fit: argument --chunk-voxels: expected a number of at least 1, got 0"),
    ("--resume with --overwrite", edit(lambda s, b, c: None, "--resume", "--overwrite"),
     "fit: argument --overwrite: not allowed with argument --resume"),
    ("simulate into a file", lambda b, c: ["simulate", str(b / "X.csv"), "--subjects", "4"],
     "X.csv exists and is not a folder"),
    ("simulate into an earlier study", lambda b, c: ["simulate", str(b), "--subjects", "4"],
     "OUT_DIR: " + "{base}" + " is not empty: choose a new or empty folder"),
    ("--grace-seconds too large", edit(lambda s, b, c: None, "--grace-seconds", "1e300"),
     "fit: argument --grace-seconds: expected at most 604800 seconds"),
    ("--max-memory-mb too large", edit(lambda s, b, c: None, "--max-memory-mb", "2000000000"),
     "fit: argument --max-memory-mb: expected at most 1073741824 MiB"),
    ("simulate with slopes of a missing factor",
     lambda b, c: ["simulate", str(c / "sim"), "--subjects", "4", "--slopes", "rater"],
     "--slopes: no factor 'rater'"),
    ("export of a file that is not HDF5",
     lambda b, c: ((c / "r.h5").write_bytes(b"junk" * 64), ["export", str(c / "r.h5")])[1], "r.h5"),
    ("export of an incomplete results file", lambda b, c: (
        h5(lambda f: f.attrs.update(complete=False, format="mpiblmm-results-1"))(c / "r.h5"),
        ["export", str(c / "r.h5")])[1], "r.h5"),
    ("export of another program's HDF5 file", lambda b, c: (
        h5(lambda f: f.create_dataset("x", data=[1.0]))(c / "r.h5"),
        ["export", str(c / "r.h5")])[1], "r.h5"),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 60
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.spawns_mpiexec
def test_every_bad_input_is_one_line_and_exit_2_at_two_ranks(tmp_path, run_mpi):
    import h5py

    base = tmp_path / "base"
    write_base(base)
    cases = [{"name": "control: the valid study",
              "argv": _spec_argv(_mk(tmp_path / "control"), base_spec(base, tmp_path / "control"))}]
    culprits = {}
    for i, (name, writer, culprit) in enumerate(CASES):
        case = _mk(tmp_path / f"case{i:02d}")
        cases.append({"name": name, "argv": writer(base, case)})
        culprits[name] = (culprit.replace("{base}", str(base)), case)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    driver = Path(__file__).with_name("bad_inputs_driver.py")
    job = run_mpi(2, [sys.executable, str(driver), str(tmp_path / "cases.json"),
                      str(tmp_path / "out.json")], timeout=600)
    assert not job.timed_out, job.stdout[-2000:] + job.stderr[-3000:]
    if job.returncode != 0:                      # a case ended the job: show its output
        last = len(job.stdout.strip().splitlines()) - 1
        died = "".join(p.read_text(errors="replace")
                       for p in sorted(tmp_path.glob(f"out.json.{last}.*")))
        pytest.fail(f"{job.stdout.strip().splitlines()[-1]} ended the job "
                    f"({job.returncode}):\n{died[-4000:]}\n{job.stderr[-2000:]}")
    results = json.loads((tmp_path / "out.json").read_text())
    control = results.pop(0)
    assert [r["code"] for r in control["ranks"]] == [0, 0], control
    problems = []
    for r in results:
        culprit, case = culprits[r["name"]]
        codes = [x["code"] for x in r["ranks"]]
        err = "".join(x["stderr"] for x in r["ranks"])
        lines = err.strip().splitlines()
        ok = (codes == [2, 2] and len(lines) == 1 and lines[0].startswith("mpiblmm: error: ")
              and culprit in lines[0] and "Traceback" not in err)
        for res in case.rglob("results.h5"):
            with h5py.File(res, "r") as f:
                ok = ok and not bool(f.attrs.get("complete", False))
        if not ok:
            problems.append(f"{r['name']}: codes {codes}, expected {culprit!r} in: {err[-600:]!r}")
    assert not problems, "\n".join(problems)


def _mk(path: Path) -> Path:
    path.mkdir()
    return path
