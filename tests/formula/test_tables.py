"""The covariates table: tab-separated files (BIDS's ``participants.tsv``), unknown columns
named deterministically, and columns whose names are not syntactic R names.

R's behaviour for the last (R 4.2.2, lme4 1.1-31; the fixed and random names over
``r_colnames_spaced_data.csv`` are recorded by ``make_r_colnames.R`` and checked in
``test_formula_r.py``)::

    d <- read.csv("participants.csv")        # "age at scan" -> age.at.scan (make.names)
    colnames(model.matrix(y ~ age.at.scan, d))                # "(Intercept)" "age.at.scan"
    e <- read.csv("participants.csv", check.names = FALSE)
    colnames(model.matrix(y ~ `age at scan`, e))              # "(Intercept)" "`age at scan`"
    names(lFormula(y ~ 1 + (1 | `sub ject`), e)$reTrms$cnms)  # "sub ject"
    make.names(c("âge moyen", "if", "1st visit", "a b", "a.b"), unique = TRUE)
    # "âge.moyen" "if." "X1st.visit" "a.b.1" "a.b"     (a UTF-8 locale)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpiblmm.errors import SpecError
from mpiblmm.formula import default_contrasts, formula_model, parse_formula
from mpiblmm.formula_table import read_table
from mpiblmm.formula_names import ColumnAliases, r_make_name, r_make_names_unique

HEADER = ["subject", "age", "sex", "group", "visit", "site"]
ROWS = [("sub-01", "60.1", "M", "patient", "1", "A"), ("sub-01", "61.6", "M", "patient", "2", "A"),
        ("sub-02", "57.9", "F", "control", "1", "A"), ("sub-02", "59.4", "F", "control", "2", "n/a"),
        ("sub-03", "70.2", "F", "patient", "1", "B"), ("sub-03", "71.0", "F", "patient", "2", "B"),
        ("sub-04", "48.3", "M", "control", "1", "B"), ("sub-04", "50.3", "M", "control", "2", "B")]
FORMULA = "y ~ age + sex + group * factor(visit) + (1 | subject)"


def _write(path: Path, header, rows, sep: str) -> Path:
    path.write_text("".join(sep.join(r) + "\n" for r in [header, *rows]))
    return path


# --------------------------------------------------------------------------- TSV
@pytest.mark.parametrize("name, sep", [("participants.tsv", "\t"), ("participants.txt", "\t"),
                                       ("PARTICIPANTS.TSV", "\t")])
def test_tab_separated_table_is_read_as_the_csv(tmp_path, name, sep):
    """BIDS's participants.tsv (``n/a`` missing, here in a column the formula does not use):
    the same table and model as the CSV."""
    tsv = read_table(_write(tmp_path / name, HEADER, ROWS, sep))
    csv = read_table(_write(tmp_path / "participants.csv", HEADER, ROWS, ","))
    assert tsv.names == csv.names == tuple(HEADER)
    assert tsv.cells == csv.cells
    a, b = formula_model(FORMULA, tsv), formula_model(FORMULA, csv)
    assert a.names == b.names
    np.testing.assert_array_equal(a.X, b.X)


def test_csv_with_tabs_in_a_name_stays_csv(tmp_path):
    table = read_table(_write(tmp_path / "t.csv", ["subject", "a\tb"], [("s1", "1"), ("s2", "2")], ","))
    assert table.names == ("subject", "a\tb")


def test_tsv_missing_value_n_a_in_a_used_column(tmp_path):
    table = read_table(_write(tmp_path / "participants.tsv", HEADER, ROWS, "\t"))
    with pytest.raises(SpecError) as err:
        formula_model(FORMULA + " + (1 | site)", table)
    assert err.value.where == f"{tmp_path / 'participants.tsv'}: row 5"
    assert "column 'site': missing value 'n/a'" in err.value.message


# --------------------------------------------------------------------------- unknown columns
def test_unknown_column_is_the_first_written_and_names_its_term(tmp_path):
    """No age, sex, group, visit: the error names age and its term, not the whole fixed
    part, and lists the columns."""
    table = read_table(_write(tmp_path / "p.csv", ["subject", "score"],
                              [("s1", "1"), ("s2", "2")], ","))
    with pytest.raises(SpecError) as err:
        formula_model(FORMULA, table)
    assert err.value.message == (f"term 'age': no column 'age' in {tmp_path / 'p.csv'} "
                                 "(its columns: subject, score)")
    with pytest.raises(SpecError, match=r"^term 'group \* factor\(visit\)': no column 'group'"):
        formula_model("y ~ score + group * factor(visit) + (1 | subject)", table)
    with pytest.raises(SpecError, match=r"^random term \(1 \+ tme \+ agee \| subject\): no column 'tme'"):
        formula_model("y ~ score + (1 + tme + agee | subject)", table)


def test_unknown_column_message_is_the_same_in_every_process(tmp_path):
    """The unknown variables are a set: its order changed with the hash seed."""
    path = _write(tmp_path / "p.tsv", ["subject", "score"], [("s1", "1"), ("s2", "2")], "\t")
    code = ("import sys\nfrom mpiblmm.formula import formula_model\nfrom mpiblmm.formula_table import read_table\n"
            "try:\n    formula_model(sys.argv[1], read_table(sys.argv[2]))\n"
            "except Exception as exc:\n    print(exc.message)\n")
    seen = set()
    for seed in range(6):
        out = subprocess.run([sys.executable, "-c", code, "y ~ visit + sex + group + age + (1|s)",
                              str(path)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)})
        seen.add(out.stdout)
    assert seen == {f"term 'visit': no column 'visit' in {path} (its columns: subject, score)\n"}


def test_a_table_read_as_one_column_says_so(tmp_path):
    table = read_table(_write(tmp_path / "p.csv", HEADER, ROWS, "|"))
    with pytest.raises(SpecError, match=r"^term 'age': no column 'age' .*its columns: "
                                        r"'subject\|age\|sex\|group\|visit\|site'; one column only"):
        formula_model(FORMULA, table)


def test_a_semicolon_table_is_read_as_read_csv2(tmp_path):
    """A header with ';' and no ',' or tab: R's read.csv2 (sep ';', dec ','); the model is
    the comma CSV's (R's values over such a table: test_labels_r.py)."""
    european = [tuple(c.replace(".", ",") for c in row) for row in ROWS]
    semi = read_table(_write(tmp_path / "p.csv", HEADER, european, ";"))
    comma = read_table(_write(tmp_path / "q.csv", HEADER, ROWS, ","))
    assert semi.cells == comma.cells
    formula = "y ~ age + sex + group + (1 | subject)"
    a, b = formula_model(formula, semi), formula_model(formula, comma)
    assert a.names == b.names == ("(Intercept)", "age", "sexM", "grouppatient")
    np.testing.assert_array_equal(a.X, b.X)
    # a comma in a header cell: a comma CSV (whose cells may then hold ';')
    assert read_table(_write(tmp_path / "r.csv", ["a;b", "c"], [("1;2", "3")], ",")).names \
        == ("a;b", "c")
    # a decimal point there: text to read.csv2 (str(read.csv2(...)): chr), where '.' may be
    # a thousands separator; read as a number without a word before (a fuzz audit)
    dotted = read_table(_write(tmp_path / "d.csv", HEADER, ROWS, ";"))
    with pytest.raises(SpecError) as err:
        formula_model(formula, dotted)
    assert str(err.value).endswith(
        "d.csv: row 2: column 'age': '60.1' has a decimal point in a table separated by "
        "semicolons, where "
        "R's read.csv2 reads ',' as the decimal mark and this cell as text (a '.' may be a "
        "thousands separator there): write '60,1', or separate the cells by commas")
    assert formula_model("y ~ sex + (1 | subject)", dotted).names == ("(Intercept)", "sexM")


# --------------------------------------------------------------------------- non-syntactic names
SPACED = ["subject", "sub ject", "age at scan", "grp-f", "if", "a.b", "a b"]
SPACED_ROWS = [(f"s{i // 2}", f"u{i % 3}", f"{50 + 1.7 * i + (i % 3) * 0.3:.2f}",
                ["c", "p-1", "p 2"][i % 3], f"{(i * 7) % 5}", f"{(i * 3) % 4}",
                ["x", "y"][(i // 3) % 2]) for i in range(12)]


@pytest.fixture
def spaced(tmp_path):
    return read_table(_write(tmp_path / "part_sp.csv", SPACED, SPACED_ROWS, ","))


def test_make_names_of_columns_is_rs():
    # R: make.names(c("âge moyen", "if", "1st visit", "a b", "a.b", "x-y"), unique = TRUE)
    assert r_make_names_unique(["âge moyen", "if", "1st visit", "a b", "a.b", "x-y"]) == \
        ["âge.moyen", "if.", "X1st.visit", "a.b.1", "a.b", "x.y"]
    assert r_make_name("é") == "é"


def test_read_csv_name_and_backticks_both_name_the_column(spaced):
    """As R: read.csv's name (make.names) after read.csv, the raw name in backticks after
    read.csv(check.names = FALSE); each named as R names it."""
    a = formula_model("y ~ age.at.scan + grp.f + if. + a.b.1 + (1 + age.at.scan | sub.ject)", spaced)
    b = formula_model("y ~ `age at scan` + `grp-f` + `if` + `a b` + (1 + `age at scan` | `sub ject`)",
                      spaced)
    assert list(a.names) == ["(Intercept)", "age.at.scan", "grp.fp 2", "grp.fp-1", "if.", "a.b.1y"]
    assert list(b.names) == ["(Intercept)", "`age at scan`", "`grp-f`p 2", "`grp-f`p-1", "`if`",
                             "`a b`y"]
    np.testing.assert_array_equal(a.X, b.X)
    assert [(f[0], f[3]) for f in a.factors] == [("sub.ject", ("(Intercept)", "age.at.scan"))]
    assert [(f[0], f[3]) for f in b.factors] == [("sub ject", ("(Intercept)", "`age at scan`"))]
    assert [f[1] for f in a.factors] == [f[1] for f in b.factors] == \
        [[r[1] for r in SPACED_ROWS]]
    assert [c[0] for c in default_contrasts(b)][:2] == ["(Intercept)", "`age at scan`"]
    # a syntactic name in backticks is the name (R deparses `a.b` as a.b)
    assert list(formula_model("y ~ `a.b` + (1 | subject)", spaced).names) == ["(Intercept)", "a.b"]


def test_backticked_groupings_are_named_as_lme4(spaced):
    # lme4: names(cnms) of (1 | `sub ject`:subject) and (1 | subject/`sub ject`)
    p = parse_formula("y ~ (1 | `sub ject`:subject) + (1 | subject/`sub ject`) + (1 | `subject`:g)")
    assert [b.name for b in p.bars] == ["`sub ject`:subject", "`sub ject`:subject", "subject",
                                        "subject:g"]
    model = formula_model("y ~ 1 + (1 | subject/`sub ject`)", spaced)
    assert [f[0] for f in model.factors] == ["`sub ject`:subject", "subject"]
    assert model.factors[0][1][:2] == ["u0:s0", "u1:s0"]


def test_unknown_name_suggests_one_the_formula_can_use(spaced):
    with pytest.raises(SpecError, match=r"no column 'age_at_scan' .*\(did you mean 'age\.at\.scan'\?\)"):
        formula_model("y ~ age_at_scan + (1 | subject)", spaced)
    with pytest.raises(SpecError, match=r"no column 'age at scn' .*did you mean 'age\.at\.scan'"):
        formula_model("y ~ `age at scn` + (1 | subject)", spaced)
    with pytest.raises(SpecError, match=r"no grouping column '`sub jct`' .*did you mean 'sub\.ject'"):
        formula_model("y ~ 1 + (1 | `sub jct`)", spaced)


def test_aliases_rename_and_restore():
    aliases = ColumnAliases(["age at scan", "age.z", "age"])
    text = aliases.rename("`age at scan` + age.at.scan + log(`age.z`) + age + I(\"`age`\")")
    assert "`" not in text.split("I(")[0] and text.endswith('I("`age`")')
    assert aliases.restore(text) == '`age at scan` + age.at.scan + log(age.z) + age + I("`age`")'


# --------------------------------------------------------------------------- check and fit
def test_check_reads_a_tsv_and_contrasts_by_non_syntactic_names(tmp_path):
    """`mpiblmm check` (the fit's design_from_formula) on participants.tsv with a column
    'age at scan', contrasts by R's coefficient names of both spellings."""
    from mpiblmm.study import write_study

    write_study(tmp_path, subjects=4, visits=3, shape=(2, 2, 2), seed=2, form="formula")
    lines = (tmp_path / "participants.csv").read_text().splitlines()
    lines[0] = lines[0].replace("age", "age at scan")
    (tmp_path / "participants.tsv").write_text("\n".join(ln.replace(",", "\t") for ln in lines) + "\n")
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec["covariates"] = "participants.tsv"

    def check_names(age: str) -> None:
        spec["formula"] = f"y ~ {age} + time + (1 + time | subject)"
        spec["contrasts"] = [{"name": "age", "weights": {age: 1}}]
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        run = subprocess.run([sys.executable, "-m", "mpiblmm", "check", "spec.json"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert f"(Intercept), {age}, time" in run.stdout

    check_names("`age at scan`")
    check_names("age.at.scan")


def test_a_table_not_in_utf8_names_the_row_of_the_first_bad_byte(tmp_path):
    """A Latin-1 table (a fault audit's): the decoder's byte position meant nothing to a
    user; the row does, for the covariates table and for the matrix form's CSV files."""
    from mpiblmm.design import read_numeric_csv

    path = tmp_path / "participants.csv"
    path.write_bytes(b"subject,site\nsub-01,A\nsub-02,Montr\xe9al\n")
    with pytest.raises(SpecError) as err:
        read_table(path)
    assert str(err.value) == (f"{path}: row 3: not UTF-8 text (byte 0xe9); save the file as "
                              "UTF-8")
    x = tmp_path / "X.csv"
    x.write_bytes(b"1,0\n1,1\n" * 3000 + b"1,\xff\n")        # past the reader's first chunk
    with pytest.raises(SpecError, match=r"X.csv: row 6001: not UTF-8 text \(byte 0xff\)"):
        read_numeric_csv(x)


def test_cells_differing_only_by_spaces_are_an_error_where_used(tmp_path):
    """R's read.csv keeps ' M' and 'M' apart (two levels of sex, another model than
    mpiblmm's stripped one: a formula audit's llh -161.2 against lme4's -159.6); numbers
    with spaces, missing cells and unused columns are as before."""
    path = tmp_path / "participants.csv"
    rows = [",".join(r) for r in ROWS]
    rows[2] = rows[2].replace(",F,", ", F,").replace(",1,", ", 1 ,")   # sex ' F', visit ' 1 '
    rows[3] = rows[3].replace(",n/a", ", n/a")                           # missing: as before
    rows[1] = rows[1][:-1] + " A"                                        # site: not used
    path.write_text(",".join(HEADER) + "\n" + "\n".join(rows) + "\n")
    table = read_table(path)
    assert table.spaced.keys() == {"sex", "site"}
    with pytest.raises(SpecError) as err:
        formula_model(FORMULA, table)
    assert str(err.value) == (f"{path}: row 5: column 'sex': 'F' and ' F' differ only by "
                              "spaces around them: R's read.csv reads two levels, mpiblmm "
                              "would read one; write them alike")
    model = formula_model("y ~ age + factor(visit) + (1 | subject)", table)
    assert "factor(visit)2" in model.names      # ' 1 ' is the number 1, as in R


def test_lines_of_empty_cells_are_skipped_and_counted(tmp_path):
    path = tmp_path / "participants.csv"
    path.write_text(",".join(HEADER) + "\n" + ",".join(ROWS[0]) + "\n,,,,,\n\n"
                    + ",".join(ROWS[1]) + "\n,,,,,\n")
    table = read_table(path)
    assert table.n == 2 and table.lines == (2, 5) and table.empty_lines == (3, 6)
