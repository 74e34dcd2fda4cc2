"""R's order of text (mpiblmm/r_collation.py) against R's own ``sort`` under ICU collation.

``r_sort_data.txt``: 400 strings of letters of both cases, an accented letter, digits, blanks
and ASCII punctuation, in the order R 4.2.2's ``sort`` gives them (C.UTF-8 with ICU, as R
on Linux and macOS collates), made by ``make_r_sort.R`` beside this file.
"""

from __future__ import annotations

from pathlib import Path

from mpiblmm.r_collation import r_sort_key, r_sorted

HERE = Path(__file__).resolve().parent


def test_sorts_as_r_sorts():
    r_order = (HERE / "r_sort_data.txt").read_text(encoding="utf-8").splitlines()
    shuffled = sorted(r_order, key=lambda s: (len(s), s[::-1]))
    assert sorted(shuffled, key=r_sort_key) == r_order


def test_mixed_case_levels_put_r_s_reference_first():
    assert r_sorted(["c", "B", "a", "B"]) == ["a", "B", "c"]          # code point: B, a, c
    assert r_sorted(["site1", "site_1", "Site2"]) == ["site_1", "site1", "Site2"]
    assert r_sorted(["z", "\u00e9", "e", "E"]) == ["e", "E", "\u00e9", "z"]
