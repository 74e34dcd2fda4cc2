"""Build hook only; all metadata lives in pyproject.toml.

argparse-manpage's build_py step imports ``mpiblmm.cli`` to write ``man/mpiblmm.1`` (which
its install step puts into ``<prefix>/share/man/man1``); the source tree must be importable
for that, and setuptools' PEP 517 backend does not put it on ``sys.path`` by itself.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from setuptools import setup  # noqa: E402

setup()
