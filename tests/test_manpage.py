"""The man page: built from the argparse parser, lists every subcommand, installed by setup."""

import sys
from pathlib import Path

import pytest

from mpiblmm.cli import DISPATCH
from mpiblmm.manpage import main as build_manpage


def test_manpage_lists_every_subcommand(tmp_path):
    page = tmp_path / "mpiblmm.1"
    assert build_manpage([str(page)]) == 0
    text = page.read_text()
    assert text.startswith(".TH") or "\n.TH" in text
    for command in DISPATCH:
        assert f"mpiblmm {command}" in text.replace("\\-", "-").replace("\\fB", "").replace(
            "\\fR", ""), f"subcommand {command} missing from the man page"
    assert "--max-memory-mb" in text.replace("\\-", "-")


def test_manpage_is_installed_in_the_environment():
    installed = Path(sys.prefix, "share", "man", "man1", "mpiblmm.1")
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running inside a virtual environment made by scripts/setup.sh")
    assert installed.is_file(), f"{installed} missing: run scripts/setup.sh"
    text = installed.read_text().replace("\\-", "-")  # roff escapes hyphens: convert-blmm
    for command in DISPATCH:
        assert command in text


def _plain(text: str) -> str:
    return text.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")


def test_manpage_has_exit_codes_spec_reference_and_examples(tmp_path):
    page = tmp_path / "mpiblmm.1"
    assert build_manpage([str(page)]) == 0
    text = _plain(page.read_text())
    for section in ("EXIT STATUS", "SPEC REFERENCE", "OUTPUTS", "EXAMPLES", "SEE ALSO"):
        assert f".SH {section}" in text, section
    exit_status = text.split(".SH EXIT STATUS")[1].split(".SH")[0]
    for code in ("0", "1", "2"):
        assert f".B {code}\n" in exit_status
    reference = text.split(".SH SPEC REFERENCE")[1].split(".SH")[0]
    for key in ("images", "X", "random", "contrasts", "output", "fixed_names", "analysis_mask",
                "observation_masks", "zero_is_missing", "missingness", "estimation",
                "max_memory_mb", "formula", "covariates"):  # both forms of the spec
        assert f".B {key}\n" in reference, key
    assert "mpiexec -n 4 mpiblmm fit study/spec.json" in text


def test_help_shows_defaults_and_where_maps_go():
    from mpiblmm.cli import get_parser

    parser = get_parser()
    sub = parser._subparsers._group_actions[0].choices  # noqa: SLF001  argparse's own API
    simulate = sub["simulate"].format_help()
    for default in ("(default: 60)", "(default: 4)", "(default: 20 20 15)", "(default: 0)",
                    "(default: 0.3)"):
        assert default in " ".join(simulate.split()), default
    assert "else 2048" in " ".join(sub["fit"].format_help().split())
    export = " ".join(sub["export"].format_help().split())
    assert "nifti/ beside RESULTS_H5" in export and "--fdr" in export
