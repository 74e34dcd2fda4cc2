"""``python -m mpiblmm``: the same as the ``mpiblmm`` console script."""

from mpiblmm.cli import run

run()
