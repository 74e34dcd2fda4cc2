"""``mpiblmm env``: what a user needs to trust an installation, and the checks that fail it.

Reports the MPI library and version, the ranks of the communicator (and their hosts),
h5py and HDF5 versions and whether h5py has MPI support on every rank, numpy's BLAS and
its thread count, and the thread variables. Exits non-zero, saying why, when

- the launcher started several processes but MPI sees one (mpi4py built against a
  different MPI than the mpiexec used: every rank thinks it is rank 0 of 1), or
- h5py has no MPI support on some rank.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
from typing import Any

from mpiblmm import __version__
from mpiblmm.parallel import launcher_mismatch, launcher_size

#: Thread variables worth showing (BLAS/OpenMP read them when they load).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def rank_facts() -> dict[str, Any]:
    """Facts that can differ between ranks (hosts, per-node installs)."""
    import h5py

    return {"host": socket.gethostname(), "h5py_mpi": bool(h5py.get_config().mpi)}


def mpi_facts(comm: Any) -> dict[str, str]:
    """MPI library, standard version, mpi4py and how it was built."""
    import mpi4py
    from mpi4py import MPI

    library = MPI.Get_library_version().strip().splitlines()
    major, minor = MPI.Get_version()
    found = launcher_size()
    return {
        "MPI library": " ".join(library[0].split()) if library else "unknown",
        "MPI standard": f"{major}.{minor}",
        "mpi4py": f"{mpi4py.__version__} (loaded {', '.join(loaded_mpi_libraries()) or '?'})",
        "launcher": f"{found[1]}={found[0]}" if found else "none detected (plain process)",
    }


def loaded_mpi_libraries(maps: str = "/proc/self/maps") -> list[str]:
    """Paths of the MPI shared libraries this process has loaded (Linux; else empty)."""
    try:
        with open(maps) as handle:
            paths = {line.split()[-1] for line in handle if "/libmpi" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def hdf5_facts() -> dict[str, str]:
    """h5py and HDF5 versions and h5py's MPI support on this rank."""
    import h5py

    return {
        "h5py": h5py.version.version,
        "HDF5": h5py.version.hdf5_version,
        "h5py MPI": "yes" if h5py.get_config().mpi else "NO",
    }


def blas_facts() -> dict[str, str]:
    """numpy version and the BLAS it uses with its thread count (via threadpoolctl)."""
    import numpy

    facts = {"numpy": numpy.__version__}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        facts["BLAS"] = "unknown (threadpoolctl not installed)"
        return facts
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    facts["BLAS"] = (
        "; ".join(
            f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
            for p in pools
        )
        or "none found"
    )
    facts["thread variables"] = " ".join(
        f"{name}={os.environ.get(name, '(unset)')}" for name in THREAD_VARIABLES
    )
    return facts


def collect(comm: Any) -> tuple[dict[str, str], list[str]]:
    """Collective: the report (as ordered key -> value) and the list of problems found."""
    per_rank = comm.gather(rank_facts(), root=0)
    facts: dict[str, str] = {
        "mpiblmm": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
    }
    facts.update(mpi_facts(comm))
    problems = []
    mismatch = launcher_mismatch(comm)
    if mismatch:
        problems.append(mismatch)
    if comm.Get_rank() == 0:
        hosts = sorted({r["host"] for r in per_rank})
        facts["ranks"] = f"{comm.Get_size()} on {len(hosts)} host(s): {', '.join(hosts[:8])}"
        facts.update(hdf5_facts())
        without_mpi = [i for i, r in enumerate(per_rank) if not r["h5py_mpi"]]
        if without_mpi:
            problems.append(
                f"h5py has no MPI support on rank(s) {without_mpi}: rebuild it with "
                f"`rm -rf .venv && scripts/setup.sh` (HDF5_DIR = a parallel HDF5)"
            )
        facts.update(blas_facts())
        facts.update(kernel_facts(problems))
    return facts, problems


def kernel_facts(problems: list[str]) -> dict[str, str]:
    """Whether each compiled kernel is in use (and if not why); a kernel that should be
    there and is not (not built, built from older sources) is a problem."""
    from .lmm.blocked import kernel
    from .lmm.structures import level_kernel
    facts = {}
    for name, module, source, serves, slower in (
            ("compiled kernel", kernel, "mpiblmm/lmm/blocked/_kernel.c",
             "one-effect nested factors", "several-factor fits run several times slower"),
            ("one-factor kernel", level_kernel, "mpiblmm/lmm/structures/_level_kernel.c",
             "one factor, 1-3 effects", "one-factor fits run about 3x slower")):
        facts[name] = (f"yes ({serves})" if module.available()
                       else f"NO, {module.WHY_NOT} (numpy path)")
        if not module.available() and module.WHY_NOT != module.TURNED_OFF:
            problems.append(f"mpiblmm's {name} ({source}) is {module.WHY_NOT}: {slower}; "
                            f"rerun scripts/setup.sh")
    return facts


def format_report(facts: dict[str, str], problems: list[str]) -> str:
    """The report as aligned ``key  value`` lines, ending with the status."""
    width = max(len(k) for k in facts) + 2
    lines = [f"{key:<{width}}{value}" for key, value in facts.items()]
    if problems:
        lines += [f"{'status':<{width}}PROBLEM"] + [f"  - {p}" for p in problems]
    else:
        lines.append(f"{'status':<{width}}OK")
    return "\n".join(lines)


def run_env(args: argparse.Namespace) -> int:
    """Print the environment report on rank 0; exit code 1 if a problem was found."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    facts, problems = collect(comm)
    failed = comm.bcast(bool(problems), root=0) if comm.Get_size() > 1 else bool(problems)
    if comm.Get_rank() == 0:
        print(format_report(facts, problems), flush=True)
        if problems:
            print("mpiblmm: error: the installation has problems (see status above)",
                  file=sys.stderr, flush=True)
    return 1 if failed else 0
