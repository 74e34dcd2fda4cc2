"""The covariates table of the formula form, read as R's ``read.csv`` reads it.

One row per image under a header row: comma-separated, tab-separated for a ``.tsv`` file
(BIDS's ``participants.tsv``) or a header with tabs and no commas, semicolon-separated with
decimal commas as R's ``read.csv2``.  A column whose cells are all numbers is numeric, any
other is text (a factor); a missing cell (:data:`MISSING_TOKENS`) is an error only in a
column the formula uses (:func:`used_column`, naming the row).  Numbers and factor levels are
written as R writes them (:func:`r_number`, :func:`r_level`, :func:`r_labels`), since they
name columns and levels.  :mod:`mpiblmm.formula` builds the model from the table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpiblmm.errors import SpecError, not_utf8

#: Cells read as a missing value (``n/a``: BIDS's own, in participants.tsv).
MISSING_TOKENS = frozenset({"", "NA", "N/A", "n/a", "na", "NaN", "nan", "NULL", "null", "."})
@dataclass(frozen=True)
class Table:
    """A covariates table: header names, the cells of each column (text), the file line of each row."""

    path: Path
    names: tuple[str, ...]
    cells: dict[str, list[str]]
    lines: tuple[int, ...]
    #: lines whose every cell is empty (``,,,``: a spreadsheet's trailing rows), skipped
    empty_lines: tuple[int, ...] = ()
    #: per column, the first two cells that differ only by spaces around them
    #: ``(line, cell, other)``: one level here, two in R's ``read.csv`` (:func:`used_column`)
    spaced: dict[str, tuple[int, str, str]] = dataclasses.field(default_factory=dict)
    #: a semicolon-separated table's columns with a number written with a decimal point
    #: ``(line, cell)``: text to R's ``read.csv2`` (:func:`used_column`)
    dotted: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.lines)


def table_delimiter(path: Path, header: str) -> str:
    """The table's separator: a tab for a ``.tsv`` file (BIDS's ``participants.tsv``) or a
    header line with tabs and no commas; a semicolon for a header line with semicolons and
    neither commas nor tabs (the European CSV of R's ``read.csv2``: its decimal mark is the
    comma, :func:`read_table`); else a comma (CSV)."""
    if Path(path).suffix.lower() == ".tsv" or ("\t" in header and "," not in header):
        return "\t"
    if ";" in header and "," not in header and "\t" not in header:
        return ";"
    return ","


#: A number with a decimal comma (``61,5``, ``-0,25``, ``1,5e-3``): R's ``read.csv2``
#: (``dec = ","``) reads it as ``61.5``.
DECIMAL_COMMA = re.compile(r"\s*[-+]?([0-9]+,[0-9]*|,[0-9]+)([eE][-+]?[0-9]+)?\s*")


def read_table(path: Path) -> Table:
    """Read a CSV (or TSV, or a semicolon-separated table: :func:`table_delimiter`) with a
    header row; every row as wide as the header.  In a semicolon-separated table a number
    with a decimal comma is read as R's ``read.csv2`` reads it (``61,5`` is 61.5).

    Errors: ``<file>: row N: <problem>`` with N the line number.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
        header = next((line for line in text.splitlines() if line.strip()), "")
        delimiter = table_delimiter(path, header)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    except (OSError, csv.Error) as exc:
        raise SpecError(f"cannot read the file ({getattr(exc, 'strerror', None) or exc})",
                        str(path)) from None
    empty = tuple(line for line, row in rows if len(row) > 1 and not any(c.strip() for c in row))
    rows = [(line, row) for line, row in rows if any(c.strip() for c in row)]
    if not rows:
        raise SpecError("the file is empty (expected a header row, then one row per image)",
                        str(path))
    header = [h.strip() for h in rows[0][1]]
    for j, h in enumerate(header):
        if not h:
            raise SpecError(f"column {j + 1} has an empty name in the header row", f"{path}: row {rows[0][0]}")
        if header.index(h) != j:
            raise SpecError(f"column name {h!r} appears twice in the header row", f"{path}: row {rows[0][0]}")
    if len(rows) == 1:
        raise SpecError("has a header row but no data rows", str(path))
    cells: dict[str, list[str]] = {h: [] for h in header}
    raw: dict[str, dict[str, tuple[int, str]]] = {h: {} for h in header}
    spaced: dict[str, tuple[int, str, str]] = {}
    dotted: dict[str, tuple[int, str]] = {}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise SpecError(f"has {len(row)} columns; the header has {len(header)}", f"{path}: row {line}")
        for h, c in zip(header, row):
            seen = raw[h].setdefault(c.strip(), (line, c))
            if (seen[1] != c and h not in spaced and not NUMBER.fullmatch(c)
                    and c.strip() not in MISSING_TOKENS):
                spaced[h] = (line, c, seen[1])
            c = c.strip()
            if delimiter == ";" and DECIMAL_COMMA.fullmatch(c):   # read.csv2's dec = ","
                c = c.replace(",", ".")
            elif delimiter == ";" and "." in c and NUMBER.fullmatch(c):
                dotted.setdefault(h, (line, c))
            cells[h].append(c)
    return Table(Path(path), tuple(header), cells, tuple(line for line, _ in rows[1:]),
                 empty, spaced, dotted)


def used_column(table: Table, name: str, what: str) -> list[str]:
    """The cells of a column the formula uses; a missing cell is an error naming its row, and
    so are two cells of a text column that differ only by spaces around them (``M`` and
    `` M``: R's ``read.csv`` reads two levels, where a hand-edited table meant one)."""
    if name in table.dotted:
        line, cell = table.dotted[name]
        raise SpecError(f"column {name!r}: {cell!r} has a decimal point in a table separated "
                        "by semicolons, where R's read.csv2 reads ',' as the decimal mark and "
                        f"this cell as text (a '.' may be a thousands separator there): write "
                        f"{cell.replace('.', ',')!r}, or separate the cells by commas",
                        f"{table.path}: row {line}")
    if name in table.spaced and numeric_column(table, name) is None:
        line, cell, other = table.spaced[name]
        raise SpecError(f"column {name!r}: {cell!r} and {other!r} differ only by spaces around "
                        "them: R's read.csv reads two levels, mpiblmm would read one; write "
                        "them alike", f"{table.path}: row {line}")
    for line, cell in zip(table.lines, table.cells[name]):
        if cell in MISSING_TOKENS:
            raise SpecError(f"column {name!r}: missing value {cell!r} in a column the formula "
                            f"uses ({what}); remove the row and its image, or fill it",
                            f"{table.path}: row {line}")
    return table.cells[name]


#: A cell that is a number as R's ``read.csv`` reads one: ASCII digits, a point, an
#: exponent (Python's ``float`` also takes ``62_5`` and other scripts' digits: text to R).
NUMBER = re.compile(r"\s*[-+]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|inf|infinity|nan)\s*",
                    re.IGNORECASE)


def numeric_column(table: Table, name: str) -> np.ndarray | None:
    """The column as numbers when every cell is one (:data:`NUMBER`; int64 when all are
    whole numbers written without a point, so ``factor(x)`` levels read ``2``, not ``2.0``,
    as in R), else ``None`` (text)."""
    if not all(NUMBER.fullmatch(c) for c in table.cells[name]):
        return None
    try:
        return np.asarray([int(c) for c in table.cells[name]], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    values = np.empty(table.n)
    for i, cell in enumerate(table.cells[name]):
        try:
            values[i] = float(cell)
        except ValueError:
            return None
        if not math.isfinite(values[i]):
            raise SpecError(f"column {name!r}: not a finite number: {cell!r}",
                            f"{table.path}: row {table.lines[i]}")
    return values


#: The cells R's ``read.csv`` (``type.convert``) reads as a logical column, when every cell
#: is one of them: ``T``/``F`` too (``TRUE``/``FALSE`` to R); ``true``, ``True`` are text.
R_LOGICAL = {"TRUE": "TRUE", "T": "TRUE", "FALSE": "FALSE", "F": "FALSE"}


def r_labels(table: Table, name: str) -> list[str]:
    """The cells of a column as R's ``as.character`` writes the column ``read.csv`` reads:
    numbers as R prints them (``01``, ``1.0`` and ``1`` are all ``1``; ``2.50`` is ``2.5``),
    a logical column's ``T``/``F`` as ``TRUE``/``FALSE``, text as is.  The levels of a
    text column and of a grouping factor are these labels, as R's are."""
    values = numeric_column(table, name)
    if values is not None:
        return [r_level(v) for v in values.tolist()]
    cells = table.cells[name]
    if all(c in R_LOGICAL for c in cells):
        return [R_LOGICAL[c] for c in cells]
    return cells


#: The words of a :func:`suspicious_text_columns` note (errors it may explain quote it).
TEXT_COLUMN = "is read as text (a factor) because of"


def suspicious_text_columns(table: Table, most: int = 2) -> list[str]:
    """Notes on columns read as text (factors) although all but at most ``most`` of their
    cells are numbers (``2.O`` typed for ``2.0``): as in R, one such cell turns a covariate
    into a factor of many levels, silently; ``check`` says so."""
    notes = []
    for name in table.names:
        bad = []
        for line, cell in zip(table.lines, table.cells[name]):
            if not NUMBER.fullmatch(cell):
                if cell not in MISSING_TOKENS:
                    bad.append((line, cell))
                    if len(bad) > most:
                        break
        numbers = table.n - len(bad)
        if 0 < len(bad) <= most and numbers >= 5 * len(bad):
            cells = ", ".join(f"row {line}: {cell!r}" for line, cell in bad)
            notes.append(f"column {name!r} of {table.path} {TEXT_COLUMN} {cells}; every other "
                         "cell is a number: fix the cell if it is a typo")
    return notes


def r_number(x: float) -> str:
    """A number as R prints it (15 significant digits at most, scientific notation only
    where it is shorter): ``2``, ``0.5``, ``1e+06``, ``1e-04``, ``10000``, ``1234567.5``."""
    if x == 0:
        return "0"
    for digits in range(1, 16):
        sci = f"{x:.{digits - 1}e}"
        if float(sci) == x:
            break
    mantissa, exponent = sci.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    e = int(exponent)
    sci = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e):02d}"
    fixed = f"{x:.{max(0, digits - 1 - e)}f}"
    return fixed if len(fixed) <= len(sci) else sci


def r_level(level: Any) -> str:
    """A factor level as R's ``as.character`` writes it: a number as R prints it (``2`` not
    ``2.0``, ``1e+05``; a whole number written without a point is an integer to read.csv,
    when it fits in 32 bits), ``TRUE``/``FALSE``; text as is."""
    if isinstance(level, (bool, np.bool_)):
        return "TRUE" if level else "FALSE"
    if isinstance(level, (int, np.integer)) and abs(int(level)) < 2**31:
        return str(int(level))
    if isinstance(level, (int, float, np.integer, np.floating)):
        return r_number(float(level))
    return str(level)
