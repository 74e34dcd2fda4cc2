"""Design from a spec: CSV reading, level coding, Z layout, contrasts, and every error path."""

from __future__ import annotations

import numpy as np
import pytest

from mpiblmm.design import build_design, design_from_spec
from mpiblmm.errors import ContrastError, SpecError
from mpiblmm.spec import load_spec
from tests.test_spec import write_study


def test_design_from_spec(tmp_path):
    path = write_study(tmp_path, fixed_names=["icpt", "age"])
    (tmp_path / "f.csv").write_text("b\na\nb\nc\n")
    d = design_from_spec(load_spec(path))
    assert d.n == 4 and d.p == 2 and d.fixed_names == ("icpt", "age")
    np.testing.assert_array_equal(d.X, [[1, 0], [1, 1], [1, 2], [1, 3]])
    f = d.factors[0]
    assert f.labels == ("b", "a", "c")          # order of first appearance
    np.testing.assert_array_equal(f.codes, [0, 1, 0, 2])
    assert f.effect_names == ("z0", "z1")
    assert d.structure.factors[0].n_levels == 3 and d.structure.q == 6
    assert not d.X.flags.writeable and not f.codes.flags.writeable
    c_t, c_f = d.contrasts
    assert c_t.kind == "T" and c_t.L.shape == (1, 2) and c_t.alternative == "two-sided"
    assert c_f.kind == "F" and c_f.L.shape == (2, 2)
    Z = d.Z()
    assert Z.shape == (4, 6)
    # observation 3 is level c (code 2): columns 4 (intercept) and 5 (slope)
    np.testing.assert_array_equal(Z[3], [0, 0, 0, 0, 1, 3])
    np.testing.assert_array_equal(Z[1], [0, 0, 1, 1, 0, 0])


def test_default_intercept_and_crossed_factors():
    X = np.ones((4, 1))
    d = build_design(X, [("s", ["1", "1", "2", "2"], None, None),
                         ("site", ["x", "y", "x", "y"], np.ones((4, 1)), ["icpt"])])
    assert d.fixed_names == ("x0",)
    assert d.factors[0].effect_names == ("(Intercept)",)
    assert d.structure.offsets == (0, 2) and d.structure.q == 4
    np.testing.assert_array_equal(d.Z(), [[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1]])


@pytest.mark.parametrize("file, text, expected", [
    ("X.csv", "1,0\n1,1\n1,x\n1,3\n", "X.csv: row 3: column 2: not a number: 'x'"),
    ("X.csv", "a,b\n1,1\n1,2\n1,3\n", "X.csv: row 1: column 1: not a number: 'a' (the file must have no header row)"),
    ("X.csv", "1,0\n1,1\n1\n1,3\n", "X.csv: row 3: has 1 columns; row 1 has 2"),
    ("X.csv", "1,0\n\n1,2\n1,3\n", "X.csv: row 2: empty row"),
    ("X.csv", "1,0\n1,nan\n1,2\n1,3\n", "X.csv: row 2: column 2: not a finite number"),
    ("X.csv", "", "X.csv: the file is empty"),
    ("Z.csv", "1,0\n1,1\n1,2\n", "Z.csv: has 3 rows but"),
    ("f.csv", "a\nb\n", "f.csv: has 2 rows but"),
    ("f.csv", "subject\n1\n1\n2\n2\n", "f.csv: X.csv has 4: its first row "
     "'subject' looks like a header (every other row is a number); a factor file has no "
     "header row: delete that line"),
    ("f.csv", "a\nb\nb\nc\nc\n", "f.csv: has 5 rows but"),     # labels: no header guess
    ("f.csv", "a\n\nb\nc\n", "f.csv: row 2: empty level label"),
    ("f.csv", "a,1\nb\nb\nc\n", "f.csv: row 1: expected one column"),
    ("Z.csv", "1,0\n1,1\n1,q\n1,3\n", "Z.csv: row 3: column 2: not a number"),
])
def test_csv_errors(tmp_path, file, text, expected):
    path = write_study(tmp_path)
    (tmp_path / file).write_text(text)
    with pytest.raises(SpecError) as info:
        design_from_spec(load_spec(path))
    assert str(info.value).startswith(str(tmp_path / expected.split(":")[0]))
    assert expected.split(": ", 1)[1] in str(info.value)


def test_trailing_blank_lines_are_fine(tmp_path):
    path = write_study(tmp_path)
    (tmp_path / "X.csv").write_text("1,0\n1,1\n1,2\n1,3\n\n\n")
    assert design_from_spec(load_spec(path)).n == 4


def test_image_count_must_match(tmp_path):
    path = write_study(tmp_path)
    (tmp_path / "X.csv").write_text("1,0\n1,1\n1,2\n")
    with pytest.raises(SpecError, match=r"spec.json: images: lists 4 images but .*X.csv has 3 rows"):
        design_from_spec(load_spec(path))


@pytest.mark.parametrize("contrasts, expected", [
    ([{"name": "c", "weights": [0, 1, 0]}], "contrasts[0] (\"c\").weights: each row needs 2 weights"),
    ([{"name": "c", "weights": [0, 0]}], "contrasts[0] (\"c\").weights: all weights are zero"),
    ([{"name": "ok", "weights": [0, 1]}, {"name": "c", "weights": [[0, 1], [0, 2]]}],
     "contrasts[1] (\"c\").weights: the 2 rows are linearly dependent (rank 1)"),
    # from a fault audit: F = inf and p = 0 at most voxels, though these rows span the
    # same hypothesis as [0, 1], [1, 0]
    ([{"name": "c", "weights": [[0, 1], [1e-8, 1]]}],
     "contrasts[0] (\"c\").weights: the 2 rows are nearly linearly dependent (scaled to "
     "length 1, their smallest singular value is 5e-09 of the largest)"),
    # ... and t = -0 with se = inf, or NaN t at fitted voxels
    ([{"name": "c", "weights": [0, 1e308]}],
     "contrasts[0] (\"c\").weights: the largest weight is 1e+308: outside 1e-100 .. 1e+100"),
    ([{"name": "c", "weights": [[0, 1e-300], [1e-300, 0]]}],
     "contrasts[0] (\"c\").weights: row 1's largest weight is 1e-300: outside"),
])
def test_contrast_errors(tmp_path, contrasts, expected):
    path = write_study(tmp_path, contrasts=contrasts)
    with pytest.raises(ContrastError) as info:
        design_from_spec(load_spec(path))
    assert str(info.value).startswith(f"{path}: {expected}")


def test_a_contrast_by_name_without_fixed_names_says_how_to_name_the_columns(tmp_path):
    """X's columns are x0, x1, ... until the spec names them: the error says which key does."""
    path = write_study(tmp_path, contrasts=[{"name": "c", "weights": {"time": 1}}])
    with pytest.raises(ContrastError, match=r"no coefficient 'time'; name the columns of X "
                                            r"with the spec's \"fixed_names\""):
        design_from_spec(load_spec(path))
    named = write_study(tmp_path, contrasts=[{"name": "c", "weights": {"tme": 1}}],
                        fixed_names=["intercept", "time"])
    with pytest.raises(ContrastError) as info:
        design_from_spec(load_spec(named))
    assert "fixed_names" not in str(info.value)


@pytest.mark.parametrize("overrides, expected", [
    ({"fixed_names": ["a", "b", "c"]}, "fixed_names: 3 names for the 2 columns"),
    ({"random": [{"name": "s", "factor": "f.csv", "design": "Z.csv", "effect_names": ["a"]}]},
     "random[0].effect_names: 1 names for the 2 columns"),
])
def test_name_count_errors(tmp_path, overrides, expected):
    path = write_study(tmp_path, **overrides)
    with pytest.raises(SpecError) as info:
        design_from_spec(load_spec(path))
    assert str(info.value).startswith(f"{path}: {expected}")


def _formula_spec(tmp_path, csv_text, formula):
    from mpiblmm.spec import parse_spec

    (tmp_path / "c.csv").write_text(csv_text)
    raw = {"images": [f"i{k}.nii" for k in range(csv_text.count("\n") - 1)],
           "covariates": "c.csv", "formula": formula}
    return parse_spec(raw, tmp_path / "spec.json", check_files=False)


def test_two_coefficients_of_one_name_are_refused(tmp_path):
    """A level 'b' of text column 'site' and a numeric column 'siteb': a contrast
    {"siteb": 1} took the site dummy, and a default contrast was dropped (audit, tenth
    session)."""
    rows = "".join(f"s{i % 4},{'ab'[i % 2]},{i * 0.5}\n" for i in range(12))
    spec = _formula_spec(tmp_path, "subject,site,siteb\n" + rows, "y ~ site + siteb + (1 | subject)")
    with pytest.raises(SpecError, match=r"columns 2 and 3 of the fixed part are both named "
                                        r"'siteb'.*rename a column"):
        design_from_spec(spec)


def test_default_contrasts_whose_file_names_collide_are_refused(tmp_path):
    rows = "".join(f"s{i % 4},{i + 1.0},{(i * 7) % 5 + 1.0},{i * 0.3}\n" for i in range(12))
    spec = _formula_spec(tmp_path, "subject,a,b,a_b\n" + rows, "y ~ I(a/b) + a_b + (1 | subject)")
    design_from_spec(spec)   # 'I(a/b)' -> 'I(a_b)' and 'a_b': distinct
    spec = _formula_spec(tmp_path, "subject,a,b,a_b\n" + rows,
                         "y ~ I(a/b) + I(a_b) + (1 | subject)")
    with pytest.raises(SpecError, match=r"two default contrasts would be named 'I\(a_b\)'"):
        design_from_spec(spec)


def test_a_matrix_cell_is_a_number_only_as_csv_readers_read_one(tmp_path):
    """float() takes '1_0' (10); the X file's cell is refused as not a number."""
    from mpiblmm.design import read_numeric_csv

    (tmp_path / "X.csv").write_text("1,2.5\n1,1_0\n")
    with pytest.raises(SpecError, match=r"row 2: column 2: not a number: '1_0'"):
        read_numeric_csv(tmp_path / "X.csv")
    (tmp_path / "ok.csv").write_text("1, 2.5e-3\n-1,.5\n")
    assert read_numeric_csv(tmp_path / "ok.csv").tolist() == [[1.0, 0.0025], [-1.0, 0.5]]


@pytest.mark.parametrize("text, hint", [
    ("1\t2.5\t0\n1\t3\t1\n", "(numbers separated by tabs: the file must be comma-separated)"),
    ("1;2.5\n1;3\n", "(numbers separated by semicolons: the file must be comma-separated)"),
    ("intercept,age\n1,2\n", "(the file must have no header row)"),
    # BLMM's loader drops an ID column; told "no header row", a user deleted a subject
    ("sub01,1,2\nsub02,1,3\n", "column 1: text in every row ('sub01', 'sub02', ...), as in "
                                 "an ID column: the file must hold numbers only; delete that column"),
    # ... and a header row beside it: both at once (the header was said on the next run)
    ("id,int,age\nsub01,1,2\n", "row 1: column 1: text in every row ('id', 'sub01', ...), as "
                                 "in an ID column, and this row is a header row: the file must "
                                 "hold numbers only; delete that column and this row"),
])
def test_a_numeric_csv_says_why_a_cell_is_not_a_number(tmp_path, text, hint):
    """A fault audit's tab-separated X.csv was told to drop its header row."""
    from mpiblmm.design import read_numeric_csv

    (tmp_path / "X.csv").write_text(text)
    with pytest.raises(SpecError) as info:
        read_numeric_csv(tmp_path / "X.csv")
    assert str(info.value).endswith(hint)


def test_a_4d_image_of_too_few_volumes_is_counted_in_volumes(tmp_path):
    """One 4-D NIfTI given as "images": its volumes are the observations, and the line says
    so (it said "lists 3 images" of a spec that lists one file)."""
    import nibabel as nib

    path = write_study(tmp_path, images="all.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2, 3), dtype=np.float32), np.eye(4)),
             str(tmp_path / "all.nii.gz"))
    with pytest.raises(SpecError, match=r"spec.json: images: .*all.nii.gz has 3 volumes but "
                                        r".*X.csv has 4 rows"):
        design_from_spec(load_spec(path))


def test_an_unreadable_csv_is_named_in_words_not_python_s(tmp_path):
    # a fuzz audit: "cannot read: [Errno 13] Permission denied: '...'" (Python's text), where
    # an image said "cannot read the file (Permission denied)"
    from mpiblmm.design import read_numeric_csv
    from mpiblmm.errors import SpecError
    from mpiblmm.formula_table import read_table

    for read in (read_numeric_csv, read_table):
        with pytest.raises(SpecError) as err:
            read(tmp_path)                          # a folder: EISDIR, as EACCES would be
        assert str(err.value) == f"{tmp_path}: cannot read the file (Is a directory)"
