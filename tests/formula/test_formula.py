"""The formula front end: R's column names and coding, the bar syntax, the table's rules.

No R on CI: the expected names are written by hand from R's rules for
``colnames(model.matrix(formula, data))`` (read.csv's column types, treatment contrasts,
reference level the first sorted level; terms ordered by degree, the variables of an
interaction in order of first appearance; a factor coded by contrasts when the term without
it is in the model, else by indicators) and lme4's ``findbars``/``expandSlash`` naming.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpiblmm.errors import SpecError
from mpiblmm.formula import default_contrasts, formula_model, parse_formula
from mpiblmm.formula_table import read_table

ROWS = [  # subject, visit, age, time, sex, site, grp, code
    ("s1", 1, 61.5, 0.0, "M", "b", "x", "01"), ("s1", 2, 62.5, 1.0, "M", "b", "y", "1"),
    ("s2", 1, 55.0, 0.0, "F", "a", "z", "01"), ("s2", 2, 56.1, 1.1, "F", "a", "x", "2"),
    ("s3", 1, 70.2, 0.0, "M", "c", "y", "1"), ("s3", 2, 71.0, 0.8, "M", "c", "z", "2"),
    ("s4", 1, 48.3, 0.0, "F", "b", "x", "01"), ("s4", 3, 50.3, 2.0, "F", "b", "y", "2"),
    ("s5", 1, 66.0, 0.0, "F", "c", "z", "1"), ("s5", 2, 67.2, 1.2, "F", "a", "x", "01"),
]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "participants.csv"
    path.write_text("subject,visit,age,time,sex,site,grp,code\n"
                    + "".join(",".join(map(str, r)) + "\n" for r in ROWS))
    return read_table(path)


@pytest.mark.parametrize("formula, names", [
    ("y ~ age + time * sex + (1 | subject)", ["(Intercept)", "age", "time", "sexM", "time:sexM"]),
    # the variables of an interaction in order of first appearance in the formula
    ("y ~ sex + time + time:sex + (1 | subject)", ["(Intercept)", "sexM", "time", "sexM:time"]),
    ("y ~ 0 + sex + age + (1 | subject)", ["sexF", "sexM", "age"]),
    ("y ~ age - 1 + (1 | subject)", ["age"]),
    ("y ~ -1 + age + (1 | subject)", ["age"]),
    ("y ~ site * grp + (1 | subject)",
     ["(Intercept)", "siteb", "sitec", "grpy", "grpz",
      "siteb:grpy", "sitec:grpy", "siteb:grpz", "sitec:grpz"]),
    ("y ~ factor(visit) + (1 | subject)", ["(Intercept)", "factor(visit)2", "factor(visit)3"]),
    ("y ~ I(age^2) + log(age) + (1 | subject)", ["(Intercept)", "I(age^2)", "log(age)"]),
    ("y ~ I(age/10) + (1 | subject)", ["(Intercept)", "I(age/10)"]),
    # terms by degree; `sex` without `age`'s main effect: indicators for every level
    ("y ~ age:sex + time + (1 | subject)", ["(Intercept)", "time", "age:sexF", "age:sexM"]),
    ("y ~ (1 | subject)", ["(Intercept)"]),
    ("~ age + (1 | subject)", ["(Intercept)", "age"]),
])
def test_fixed_names_are_r_colnames(table, formula, names):
    assert list(formula_model(formula, table).names) == names


def test_treatment_coding_values(table):
    m = formula_model("y ~ age + time * sex + site + (1 | subject)", table)
    sex = np.array([r[4] == "M" for r in ROWS], dtype=float)
    time = np.array([r[3] for r in ROWS])
    assert list(m.names) == ["(Intercept)", "age", "time", "sexM", "siteb", "sitec", "time:sexM"]
    np.testing.assert_array_equal(m.X[:, 0], 1.0)
    np.testing.assert_array_equal(m.X[:, 3], sex)
    np.testing.assert_array_equal(m.X[:, 4], [r[5] == "b" for r in ROWS])
    np.testing.assert_array_equal(m.X[:, 6], time * sex)
    assert dict(m.terms)["site"] == (4, 5)


def test_default_contrasts_are_lmertest_summary_and_anova(table):
    m = formula_model("y ~ age + site + (1 | subject)", table)
    cons = default_contrasts(m)
    assert [c[0] for c in cons] == ["(Intercept)", "age", "siteb", "sitec", "site"]
    np.testing.assert_array_equal(cons[1][1], [0, 1, 0, 0])
    np.testing.assert_array_equal(cons[4][1], [[0, 0, 1, 0], [0, 0, 0, 1]])


def test_random_terms_and_groupings(table):
    m = formula_model("y ~ time + (1 + time | subject) + (1 | site/grp) + (time || sex)", table)
    names = [f[0] for f in m.factors]
    # lme4 1.1-31 (VarCorr): grp.site subject site sex [time] sex.1 [(Intercept)]: the terms
    # by decreasing number of levels (6, 5, 3, 2, 2: the tie reversed), then
    # make.names(unique = TRUE), as the grouping sex repeats; the order stays the formula's
    assert names == ["subject", "grp.site", "site", "sex.1", "sex"]
    effects = [f[3] for f in m.factors]
    assert effects == [("(Intercept)", "time"), ("(Intercept)",), ("(Intercept)",),
                       ("(Intercept)",), ("time",)]
    assert m.factors[1][1][:3] == ["x:b", "y:b", "z:a"]
    np.testing.assert_array_equal(m.factors[0][2][:, 1], [r[3] for r in ROWS])


def test_categorical_random_effects_and_interaction_grouping(table):
    m = formula_model("y ~ 1 + (0 + sex | site:grp) + (sex | subject)", table)
    assert m.factors[0][0] == "site:grp" and m.factors[0][3] == ("sexF", "sexM")
    assert m.factors[1][3] == ("(Intercept)", "sexM")


def test_number_labels_are_rs_numbers(table):
    # R: read.csv reads 01 and 1 as the integer 1: one level (R's: test_labels_r.py)
    m = formula_model("y ~ 1 + (1 | code)", table)
    assert sorted(set(m.factors[0][1])) == ["1", "2"]


@pytest.mark.parametrize("formula, message", [
    ("y ~ age +", "empty term"),
    ("age + (1 | subject)", "no '~'"),
    ("y ~ age ~ time", "more than one '~'"),
    ("y ~ age + 1 | subject", "must stand alone in parentheses"),
    ("y ~ age + (1 | )", "nothing after '|'"),
    ("y ~ age + ( | subject)", "nothing before '|'"),
    ("y ~ age + (1 | subject + site)", "unsupported grouping"),
    ("y ~ age + (1 | subjekt)", "no grouping column 'subjekt'"),
    ("y ~ agee + (1 | subject)", "did you mean 'age'"),
    ("y ~ age - (1 | subject)", "cannot be subtracted"),
    ("y ~ (age + (1 | subject)", "unbalanced"),
    ("age ~ time + (1 | subject)", "the response is the image data"),
    # a fault audit: a column named y got "write y ~ ...", what the user had written
    ("age ~ time + (1 | subject)", "leave the left side out (~ time + (1 | subject)) or rename"),
    ("y ~ 0 + (1 | subject)", "no columns"),
    ("y ~ age + offset(age) + (1 | subject)", "unknown function 'offset': offsets (a term "
                                              "with its coefficient fixed at 1) are not "
                                              "supported: subtract the offset from the images"),
    ("y ~ I(!(time > 1)) + (1 | subject)", "R's ! (not) is not supported here: write the "
                                           "comparison the other way round"),
    ("y ~ I(time > 1 & age > 60) + (1 | subject)", "term 'I(time > 1 & age > 60)': & inside "
     "I() joins comparisons here, each in parentheses, e.g. I((time > 1) & (age > 50))"),
    ("y ~ I(age & (time > 1)) + (1 | subject)", "term 'I(age & (time > 1))': & inside I() "
     "joins comparisons here"),
    ("y ~ I((age > 60) | (time > 1)) + (1 | subject)", "a '|' inside I() is read as a "
     "random-effects bar, as lme4 reads it"),
    ("y ~ ordered(visit) + (1 | subject)", "unknown function 'ordered': ordered factors (R's "
                                           "polynomial contrasts) are written "
                                           "C(factor(x), contr.poly) here"),
    ("y ~ . + (1 | subject)", "'.' (every column) is not supported"),
    ("y ~ age + (1 | subject:)", "unsupported grouping 'subject:'"),
    ("y ~ age + (1 + (1 | visit) | subject)", "more than one bar"),
    ("y ~ age + (1 | subject) | site", "must stand alone in parentheses"),
    # C() as R takes it, with R's five contrasts by name only (test_formula_r.py has them)
    ("y ~ C(site, contr.diff) + (1 | subject)", "term 'C(site, contr.diff)': C() takes"),
    ("y ~ C(site, contr.treatment(3)) + (1 | subject)", "term 'C(site, contr.treatment(3))'"),
    ("y ~ C(site, sum, 1) + (1 | subject)", "term 'C(site, sum, 1)': C() takes"),
    ("y ~ C(site, base = 2) + (1 | subject)", "term 'C(site, base = 2)': C() takes"),
    ("y ~ C(site, \"contr.sum\") + (1 | subject)", "C() takes the variable and one of R's"),
    ("y ~ age + (C(site, custom) | subject)", "term 'C(site, custom)': C() takes"),
    ("y ~ factor(site, ordered = TRUE) + (1 | subject)", "factor() takes only the variable"),
    ("y ~ as.factor(visit, levels = 2) + (1 | subject)", "as.factor() takes only the variable"),
    # a fuzz audit: Python's parser was named, "invalid syntax (<unknown>, line 1)"
    ("y ~ __import__('os').system('true') + (1 | subject)",
     "not a term R's formula syntax writes (invalid syntax near"),
])
def test_formula_errors_name_the_term(table, formula, message):
    with pytest.raises(SpecError) as info:
        formula_model(formula, table)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_value_names_row_and_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("subject,age,sex\na,1,M\nb,NA,F\nc,3,\n")
    t = read_table(path)
    with pytest.raises(SpecError, match=r"t.csv: row 3: column 'age': missing value 'NA'"):
        formula_model("y ~ age + (1 | subject)", t)
    with pytest.raises(SpecError, match=r"t.csv: row 4: column 'sex': missing value ''"):
        formula_model("y ~ sex + (1 | subject)", t)
    formula_model("y ~ 1 + (1 | subject)", t)   # unused columns may have gaps


def test_table_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(SpecError, match=r"t.csv: row 3: has 1 columns; the header has 2"):
        read_table(path)
    path.write_text("a,a\n1,2\n")
    with pytest.raises(SpecError, match="appears twice"):
        read_table(path)


def test_parse_keeps_lme4_expansion():
    # names as lme4 gives them (checked with lme4 1.1-31: VarCorr's grp)
    p = parse_formula("y ~ a + (1 | g1/g2/g3) - 1")
    assert p.fixed == "a - 1"
    assert [b.name for b in p.bars] == ["g3:(g2:g1)", "g2:g1", "g1"]
    assert [b.group for b in p.bars] == [("g3", "g2", "g1"), ("g2", "g1"), ("g1",)]
    p = parse_formula("y ~ (1 | site/subject) + (time || subject) + (1 | a:b)")
    # the groupings; the factors' unique names need the table (formula_model)
    assert [b.name for b in p.bars] == ["subject:site", "site", "subject", "subject", "a:b"]
    assert p.bars[0].name == "subject:site" and p.bars[2].terms == "1"
    # lme4's findbars order: `||` expanded before `/`, a `||` term's pieces by degree
    p = parse_formula("y ~ (a:t + t || g1/g2)")
    assert [(b.terms, b.name) for b in p.bars] == [
        ("1", "g2:g1"), ("0 + a:t", "g2:g1"), ("0 + t", "g2:g1"),
        ("1", "g1"), ("0 + a:t", "g1"), ("0 + t", "g1")]
    assert [b.lme4_order for b in p.bars] == [(0, 0, 0), (0, 2, 0), (0, 1, 0),
                                              (0, 0, 1), (0, 2, 1), (0, 1, 1)]


def test_cells_r_reads_as_text_are_text(tmp_path):
    """Python's float() takes '62_5' (625) and other scripts' digits; R's read.csv makes the
    column text (audit, tenth session)."""
    for cell in ("62_5", "\u0665\u0665"):
        path = tmp_path / "c.csv"
        path.write_text("subject,age\n" + "".join(f"s{i % 4},{60 + i}\n" for i in range(11))
                        + f"s3,{cell}\n")
        model = formula_model("y ~ age + (1 | subject)", read_table(path))
        assert len(model.names) == 12, model.names      # a factor of 12 levels, as in R


def test_a_column_named_intercept_is_refused(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("subject,Intercept,age\n" + "".join(f"s{i % 4},{i * 0.1},{i}\n"
                                                        for i in range(12)))
    with pytest.raises(SpecError, match="column 'Intercept' .* rename the column"):
        formula_model("y ~ age + Intercept + (1 | subject)", read_table(path))


def test_a_transform_that_gives_nan_names_its_row(tmp_path):
    """A formula audit: log(x) of a negative x gave formulaic's "'log(x)' contains null values
    after evaluation", naming no row (R: "NaNs produced", and lmer drops the row)."""
    path = tmp_path / "t.csv"
    path.write_text("subject,x,age.z\n" + "".join(
        f"s{i % 4},{i - 2 if i != 5 else -3},{i}\n" for i in range(12)))
    t = read_table(path)
    for term, row in (("log(x)", 2), ("sqrt(x + 1)", 2), ("log(age.z - 7)", 2)):
        with pytest.raises(SpecError) as err:
            formula_model(f"y ~ {term} + (1 | subject)", t)
        assert str(err.value) == (f"fixed part: {term} is not a number (NaN) at row {row} of "
                                  f"{path} (a log or square root of a negative value?): "
                                  "remove the row and its image, or change the term")
    with pytest.raises(SpecError, match=r"^random term \(0 \+ log\(x\) \| subject\): "
                                        r"log\(x\) is not a number \(NaN\) at row 2 of"):
        formula_model("y ~ 1 + (0 + log(x) | subject)", t)


def test_dotted_column_names_in_messages(tmp_path):
    """Columns named as read.csv names them (age.z) are renamed for formulaic, which would
    read age.z inside a call as an attribute: messages name them as written (R's values
    and names: test_formula_r.py)."""
    path = tmp_path / "t.csv"
    path.write_text("subject,age.z,grp.f\n" + "".join(
        f"s{i % 4},{i * 0.5 + 1},{'ab'[i % 2]}\n" for i in range(12)))
    t = read_table(path)
    with pytest.raises(SpecError, match=r"term 'log\(age\.zz\)': no column 'age\.zz' .*"
                                        r"did you mean 'age\.z'"):
        formula_model("y ~ log(age.zz) + (1 | subject)", t)
    with pytest.raises(SpecError, match=r"'I\(age\.z/0\)' is not a finite number"):
        formula_model("y ~ I(age.z/0) + (1 | subject)", t)
    m = formula_model("y ~ I(age.z^2):grp.f + (0 + scale(age.z) | subject)", t)
    assert list(m.names) == ["(Intercept)", "I(age.z^2):grp.fa", "I(age.z^2):grp.fb"]
    assert m.factors[0][3] == ("scale(age.z)",)


def test_bids_missing_values_are_missing_not_a_level(tmp_path):
    """'n/a' is BIDS's missing value: it made a numeric column a factor of many levels, exit
    0 (audit, tenth session); a missing cell in a used column is an error naming it."""
    path = tmp_path / "c.csv"
    rows = [f"s{i % 4},{60 + i}" for i in range(12)]
    rows[8] = "s0,n/a"
    path.write_text("subject,age\n" + "\n".join(rows) + "\n")
    with pytest.raises(SpecError, match="age"):
        formula_model("y ~ age + (1 | subject)", read_table(path))


def test_a_logical_column_inside_I_is_refused_not_a_zero_column(tmp_path):
    """A logical column (TRUE/FALSE cells) is a factor of those labels here, not R's logical
    vector: I(smoker == TRUE) compared text with True, a zero column left out with a note
    where R has the smoker indicator; I(smoker & time > 1) failed in formulaic's words."""
    path = tmp_path / "t.csv"
    path.write_text("subject,time,smoker,sex\n" + "".join(
        f"s{i % 4},{i % 3},{'TF'[i % 4 // 2]},{'MF'[i % 2]}\n" for i in range(12)))
    t = read_table(path)
    for formula in ("y ~ I(smoker == TRUE) + (1 | subject)",
                    "y ~ time + I(smoker & time > 1) + (1 | subject)"):
        with pytest.raises(SpecError, match=r"'smoker' is a logical column \(TRUE/FALSE\), "
                                            r".* cannot be used inside I\(\): write smoker for "
                                            r"its TRUE level \(the column smokerTRUE\)"):
            formula_model(formula, t)
    assert formula_model("y ~ smoker + (1 | subject)", t).names == ("(Intercept)", "smokerTRUE")
    # a text column compared with a string, a string naming the logical column: as before
    m = formula_model("y ~ I(sex == 'smoker') + I(time > 1) + (1 | subject)", t)
    assert m.names[-1] == "I(time > 1)TRUE"


def test_true_inside_a_string_stays_a_string(tmp_path):
    """R's TRUE became Python's True also inside quotes: I(answer == "TRUE") compared a text
    column with "True", a zero column."""
    path = tmp_path / "t.csv"
    path.write_text("subject,answer\n" + "".join(
        f"s{i % 4},{['TRUE', 'no', 'maybe'][i % 3]}\n" for i in range(12)))
    m = formula_model('y ~ I(answer == "TRUE") + (1 | subject)', read_table(path))
    assert m.names == ("(Intercept)", 'I(answer == "TRUE")TRUE')
    np.testing.assert_array_equal(m.X[:, 1], [1.0, 0.0, 0.0] * 4)


def test_a_logical_in_I_without_an_intercept_is_coded_as_r_codes_it_beside_a_factor(tmp_path):
    """0 + I(t > 1) + sex: R codes the logical by indicators and sex by contrasts (sexM is
    M - F); the 0/1 column beside indicators of sex had the same width but sexM was the level
    M (formula recheck): the factor model is used wherever it can be evaluated."""
    path = tmp_path / "t.csv"
    path.write_text("subject,time,sex\n" + "".join(
        f"s{i % 4},{i % 3},{'MF'[i % 2]}\n" for i in range(12)))
    m = formula_model("y ~ 0 + I(time > 1) + sex + (1 | subject)", read_table(path))
    assert m.names == ("I(time > 1)FALSE", "I(time > 1)TRUE", "sexM")
