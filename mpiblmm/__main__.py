"""``python -m mpiblmm``: the same as the ``mpiblmm`` console script."""

import sys

from mpiblmm.cli import main

sys.exit(main())
