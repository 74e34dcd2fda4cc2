"""Build the ``mpiblmm.1`` man page from :func:`mpiblmm.cli.get_parser` with argparse-manpage,
plus the sections of ``manpage.include`` (exit status, spec reference, outputs, examples).

``python -m mpiblmm.manpage OUT`` writes the page to OUT (``-`` for stdout).
``scripts/setup.sh`` installs it as ``.venv/share/man/man1/mpiblmm.1`` (editable installs do
not run setuptools' install step); a wheel build gets it from the argparse-manpage hook in
``pyproject.toml`` instead. Imports neither mpi4py nor h5py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mpiblmm import __version__

#: The one-line summary in the man page's NAME section.
DESCRIPTION = "MPI-parallel voxel-wise linear mixed models for neuroimaging studies"
#: Sections beyond ``--help`` (exit status, spec reference, outputs, examples, see also), in
#: argparse-manpage's include format; the wheel build reads the same file (pyproject.toml).
INCLUDE = Path(__file__).with_name("manpage.include")


def manpage_arguments(output: str) -> list[str]:
    """Command-line arguments for ``argparse-manpage`` that document ``mpiblmm``."""
    return [
        "--module", "mpiblmm.cli",
        "--function", "get_parser",
        "--prog", "mpiblmm",
        "--project-name", "mpiblmm",
        "--description", DESCRIPTION,
        "--version", __version__,
        "--manual-title", "mpiblmm manual",
        "--include", str(INCLUDE),
        "--output", output,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the man page to the path given as the only argument (default: stdout)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    output = argv[0] if argv else "-"
    from argparse_manpage import cli as manpage_cli

    saved = sys.argv
    sys.argv = ["argparse-manpage", *manpage_arguments(output)]
    try:
        manpage_cli.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
