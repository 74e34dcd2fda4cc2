"""The man page, README.md and the docs say what the command does.

Exit codes: the man page's EXIT STATUS lists every code README.md's table does (0-4, and 1
also for an MPI launch mismatch); the status codes of the maps include 9; the images entry
names 4-D NIfTI and surface inputs.  docs/SPEC.md documents surface inputs;
docs/MIGRATING.md does not hedge about commands every version has.
"""

from __future__ import annotations

import re
from pathlib import Path

from mpiblmm.manpage import main as build_manpage

REPO = Path(__file__).resolve().parents[2]


def _man(tmp_path) -> str:
    page = tmp_path / "mpiblmm.1"
    assert build_manpage([str(page)]) == 0
    text = page.read_text()
    for code in ("\\-", "\\fB", "\\fR", "\\fI", "\\&"):
        text = text.replace(code, "-" if code == "\\-" else "")
    return text


def _section(text: str, name: str) -> str:
    return text.split(f".SH {name}")[1].split(".SH")[0]


def test_exit_status_lists_the_codes_of_the_readme(tmp_path):
    exit_status = _section(_man(tmp_path), "EXIT STATUS")
    readme = (REPO / "README.md").read_text().split("Exit codes:")[1]
    codes = re.findall(r"^\| (\d) \|", readme, re.M)
    assert codes == ["0", "1", "2", "3", "4"]
    for code in codes:
        assert f".B {code}\n" in exit_status, code
    # code 1: a bug (traceback), and a launch mismatch in one line: both say so
    assert "MPI sees only 1" in exit_status and "traceback" in exit_status
    row = re.search(r"^\| 1 \|(.*)$", readme, re.M).group(1)
    assert "MPI sees only 1" in row and "traceback" in row
    assert "--resume" in _section(_man(tmp_path), "EXIT STATUS").split(".B 3")[1]


def test_man_page_lists_status_9_and_every_kind_of_input(tmp_path):
    text = _man(tmp_path)
    outputs = " ".join(_section(text, "OUTPUTS").split())
    assert "9 random effects not identifiable" in outputs
    reference = " ".join(_section(text, "SPEC REFERENCE").split())
    images = reference.split(".B images")[1].split(".TP")[0]
    for kind in ("4-D NIfTI", "GIfTI", "CIFTI", "one file per observation"):
        assert kind in images, kind
    assert ".label.gii" in reference.split(".B analysis_mask")[1].split(".TP")[0]
    assert "where this version supports it" not in reference


def test_spec_documents_surface_inputs_and_migrating_does_not_hedge():
    spec = (REPO / "docs" / "SPEC.md").read_text()
    section = spec.split("### Surface data: GIfTI and CIFTI")[1].split("\n### ")[0]
    for fact in (".func.gii", ".dscalar.nii", "One file per observation", "One kind per study",
                 "AnatomicalStructurePrimary", ".label.gii", "Outputs"):
        assert fact in section, fact
    migrating = (REPO / "docs" / "MIGRATING.md").read_text()
    assert "your version" not in migrating
    fsl = migrating.split("## From FSL, SPM or AFNI")[1]
    for fact in ("4-D NIfTI", "zstat", "1-p", "neglog10p", "NaN", "intent"):
        assert fact in fsl, fact
