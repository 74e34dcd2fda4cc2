"""``mpiblmm report results.h5 [--out DIR]``: one self-contained HTML page about a fit.

From ``results.h5`` alone (plus the mean image of ``packed.h5`` beside it, when present):
:mod:`.data` reads what is shown, :mod:`.figures` draws it with matplotlib (Agg),
:mod:`.page` lays it out as HTML with the figures embedded as PNG.  No statistics are
recomputed.  Runs on rank 0; other ranks of an MPI launch wait and return the same code.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from mpiblmm.errors import UserError
from mpiblmm.parallel import IOFailure

#: errno values of a write that failed for the file system's reasons (exit code 4); a
#: read-only output is the user's to choose otherwise (2, as fit and export say it).
_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)


def make_report(results: str | Path, out_dir: str | Path | None = None,
                background: str | Path | None = None) -> Path:
    """Write ``report.html`` for ``results`` into ``out_dir`` (default ``report/`` beside it)."""
    from mpiblmm.report.data import load_report_data
    from mpiblmm.report.page import write_report

    results = Path(results)
    out = results.parent / "report" if out_dir is None else Path(out_dir)
    try:
        data = load_report_data(results, None if background is None else Path(background))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        # a results file changed by hand past what the checks name (an attribute of another
        # type, a grid that does not hold its voxels): one line, not a traceback
        raise UserError(f"not a results file as the fit writes it, changed after the fit? "
                        f"({type(exc).__name__}: {exc}); fit again with --overwrite",
                        str(results)) from None
    try:
        return write_report(data, out)
    except OSError as exc:
        # a full disk, a quota, an I/O error: exit code 4, as every failed write (README);
        # anything else (a path under a file, no permission) is the user's to mend: 2
        kind = IOFailure if exc.errno in _WRITE_FAILURES else UserError
        raise kind(f"cannot write the report ({exc.strerror})", str(out)) from None


def run_report(args: Any) -> int:
    """Handler of ``mpiblmm report`` (every rank calls it; rank 0 writes the page)."""
    from mpiblmm.io import on_root
    from mpiblmm.parallel import world_if_parallel

    comm = world_if_parallel()
    path = on_root(comm, lambda: make_report(args.results, getattr(args, "out", None),
                                             getattr(args, "background", None)))
    if comm is None or comm.Get_rank() == 0:
        print(f"mpiblmm: wrote {path}", flush=True)
    return 0



__all__ = ["make_report", "run_report"]
