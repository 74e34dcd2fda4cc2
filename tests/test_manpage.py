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
