"""`mpiblmm fit spec.json`: the stages of a fit, chained; no mathematics lives here.

Stages (every rank runs them; the collective ones are marked):

1. setup    rank 0 reads and validates the spec and design files; a user error is agreed
            by every rank before anything collective happens (collective: agree + bcast).
2. ingest   NIfTI images -> ``<output>/packed.h5`` (observations x candidate voxels), or an
            already packed file (collective).
3. create   ``<output>/results.h5`` with every dataset at full size (collective).
4. fit      each rank takes its contiguous slab of voxels and works through it in chunks
            sized by the memory budget: read the chunk, analyse it
            (:func:`mpiblmm.lmm.analysis.analyse_chunk`), write its rows.  Reads and writes
            are independent I/O, so a rank never waits for another inside this loop.
5. finish   status counts and timers are reduced over ranks, stored as attributes, and
            ``complete`` is set last (collective).
6. export   NIfTI maps, shared across ranks by map (collective).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mpiblmm.checks import check_fittable
from mpiblmm.design import Design, design_from_spec
from mpiblmm.errors import SpecError
from mpiblmm.io import make_dirs, on_root
from mpiblmm.io.export import export_nifti, store_headline
from mpiblmm.io.ingest import DEFAULT_MEMORY_MB, SlabReader, prepare_input
from mpiblmm.io.results import RESULTS_NAME, ResultsLayout, create_results
from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk, bytes_per_voxel
from mpiblmm.lmm.structure import choose
from mpiblmm.lmm.model import STATUS_CODES, STATUS_SINGULAR
from mpiblmm.lmm.products import random_design
from mpiblmm.memory import agreed_work_budget_mb
from mpiblmm.parallel import partition, partition_by_cost, summarise_over_ranks
from mpiblmm.progress import JobLog, LogOptions, Progress
from mpiblmm.spec import Spec, load_spec
from mpiblmm.timers import PhaseTimer, summarise_phases

#: Phases timed up to the point the results file is complete (stored in its ``summary``).
PHASES = ["setup", "ingest", "create", "read", "fit", "write", "finish"]
#: Share of the memory budget given to a chunk's working arrays (the rest: data, HDF5, numpy).
CHUNK_SHARE = 0.5
#: Share of the work budget given to packing's own arrays; the rest is for HDF5's and
#: MPI-IO's buffers (collective writes of a chunked dataset), which packing does not count.
INGEST_SHARE = 0.5
#: Relative cost of fitting a voxel with missing observations (its own product forms, no
#: shared fast path) against a complete one; measured on the demo study.
INCOMPLETE_COST = 2.0
#: Upper bound on voxels per chunk: beyond this vectorisation gains nothing.
MAX_CHUNK = 16384


@dataclass(frozen=True)
class FitOptions:
    """Command-line overrides of the spec."""

    output: str | None = None
    max_memory_mb: float | None = None
    quiet: bool = False
    log: LogOptions = LogOptions()  # --log-file, --progress-interval, --rank-logs


def run_fit(args: Any) -> int:
    """Handler of ``mpiblmm fit`` (called on every rank inside the CLI's guard)."""
    from mpi4py import MPI

    options = FitOptions(output=args.output, max_memory_mb=args.max_memory_mb,
                         quiet=bool(args.quiet), log=LogOptions.from_args(args))
    fit_study(args.spec, MPI.COMM_WORLD, options)
    return 0


def model_from_design(design: Design) -> Model:
    """The numerical model (X, random design, contrasts) of a design."""
    rd = random_design([f.codes for f in design.factors], [f.Z for f in design.factors],
                       names=[f.name for f in design.factors],
                       effect_names=[f.effect_names for f in design.factors])
    contrasts = tuple(ContrastDef(c.name, np.asarray(c.L, dtype=float), c.kind, c.alternative)
                      for c in design.contrasts)
    return Model(np.asarray(design.X, dtype=float), rd, contrasts)


def settings_from_spec(spec: Spec, budget_mb: float = DEFAULT_MEMORY_MB) -> Settings:
    """Selection and estimation settings of a spec, with the estimator's share of the budget."""
    return Settings(method=spec.estimation.method, tolerance=spec.estimation.tolerance,
                    max_iterations=spec.estimation.max_iterations,
                    min_n=spec.missingness.min_n or 0,
                    min_fraction=spec.missingness.min_fraction,
                    memory_budget=int(CHUNK_SHARE * budget_mb * 2**20))


def my_slab(packed, size: int, rank: int):
    """This rank's contiguous voxels: balanced by cost where the observation counts are known.

    Complete voxels share their product forms and fit faster than voxels with missing
    observations, so slabs are cut where the cumulative cost, not the count, is equal.
    """
    if packed.n_observed is None:
        return partition(packed.n_voxels, size, rank)
    costs = np.where(packed.n_observed == packed.n_observations, 1.0, INCOMPLETE_COST)
    return partition_by_cost(costs, size, rank)


def chunk_voxels(budget_mb: float, n: int, model: Model) -> int:
    """Voxels per chunk so one chunk's working arrays fit the share of the (work) budget;
    ``$MPIBLMM_CHUNK_VOXELS`` caps it further (tests that need many small chunks)."""
    per = bytes_per_voxel(n, model.X.shape[1], model.structure, len(model.contrasts),
                          blocks=choose(model.rd))
    most = min(MAX_CHUNK, int(os.environ.get("MPIBLMM_CHUNK_VOXELS") or MAX_CHUNK))
    return int(max(1, min(most, CHUNK_SHARE * budget_mb * 2**20 // per)))


def _load(spec_path: str, options: FitOptions) -> tuple[Spec, Design]:
    """The spec with the command line's overrides applied, and its design; the output folder
    is created here, so an unwritable one is a user error before any collective I/O."""
    from dataclasses import replace

    spec = load_spec(spec_path)
    where = f"{spec_path}: output"
    if options.output is not None:
        if not options.output.strip():
            raise SpecError("is empty; name the output folder", "--output")
        spec = replace(spec, output=Path(options.output).resolve())
        where = "--output"
    if options.max_memory_mb is not None:
        spec = replace(spec, max_memory_mb=float(options.max_memory_mb))
    design = design_from_spec(spec)
    check_fittable(design, spec)
    make_dirs(spec.output, where)
    return spec, design


def fit_study(spec_path: str, comm: Any, options: FitOptions = FitOptions()) -> Path:
    """Fit a study end to end on the ranks of ``comm``; return the results file's path."""
    rank, size = comm.Get_rank(), comm.Get_size()
    log = JobLog.open(comm, options.quiet, options.log)  # rank 0's lines (progress.py)
    say = log.say
    timer = PhaseTimer(on_enter=log.phase)

    with timer.phase("setup"):
        import h5py  # noqa: F401
        import nibabel  # noqa: F401  every rank imports it now, side by side, rather than
        # rank 0 alone inside the packing's first step while the others wait for it
        spec, design = on_root(comm, lambda: _load(spec_path, options))
        model = model_from_design(design)
        budget = spec.max_memory_mb or DEFAULT_MEMORY_MB
        # the budget is the peak per rank, interpreter included: size the work by what is left
        work = agreed_work_budget_mb(comm, budget, _budget_source(spec_path, spec, options))
        settings = settings_from_spec(spec, work)
    with timer.phase("ingest"):
        packed = prepare_input(replace(spec, max_memory_mb=INGEST_SHARE * work), comm,
                               n_expected=design.n)
    say(f"mpiblmm: {packed.n_voxels} voxels x {packed.n_observations} observations, "
        f"{design.p} fixed effects, {len(design.factors)} random factor(s), "
        f"{settings.method}, {size} rank(s)")

    results_path = Path(spec.output) / RESULTS_NAME
    with timer.phase("create"):
        layout = ResultsLayout.from_design(design, packed.n_voxels, packed.grid_shape,
                                           packed.affine, settings.method, spec.text)
        writer = create_results(results_path, layout, packed.voxels, comm)
        writer.file.attrs["space"] = packed.space  # the input's format and header codes (maps)

    mine = my_slab(packed, size, rank)
    step = chunk_voxels(work, design.n, model)
    n_chunks = math.ceil(mine.size / step) if mine.size else 0
    it_sum, it_max = 0.0, 0.0  # over this rank's fitted voxels
    progress = Progress(comm, packed.n_voxels, log, mine.size, n_chunks)  # collective
    with SlabReader(packed, comm) as reader:
        for c, start in enumerate(range(mine.start, mine.stop, step)):
            stop = min(start + step, mine.stop)
            with timer.phase("read"):
                Y = reader.read(start, stop, collective=False)
            with timer.phase("fit"):
                values = analyse_chunk(model, Y, settings)
            with timer.phase("write"):
                writer.write(start, stop, values)
            it = values["iterations"][values["status"] <= STATUS_SINGULAR]
            if it.size:
                it_sum, it_max = it_sum + float(it.sum()), max(it_max, float(it.max()))
            progress.chunk_done(stop - start)  # never waits for other ranks
    progress.close()  # rank 0 collects the last counts; the others post theirs

    with timer.phase("finish"):
        from mpi4py import MPI

        it_sum = comm.allreduce(it_sum, op=MPI.SUM)
        it_max = comm.allreduce(it_max, op=MPI.MAX)
        phases = summarise_phases(comm, timer, PHASES)
        peak = summarise_over_ranks(comm, peak_memory_mb())
        summary = {"ranks": size, "chunk_voxels": step, "memory_budget_mb": budget,
                   "work_budget_mb": work,
                   "iterations_max": it_max, "seconds": phases, "peak_memory_mb": list(peak)}
        counts = writer.finish(summary)
    n_fitted = sum(v for k, v in counts.items() if k <= STATUS_SINGULAR)
    with timer.phase("export"):
        export_nifti(results_path, results_path.parent / "nifti", comm=comm)
    phases = {**{k: v for k, v in phases.items() if k != "total"},
              **store_headline(results_path, comm, timer)}  # export, then the headline total
    if rank == 0 and log.active:  # stdout unless --quiet, and --log-file
        _print_summary(say, counts, n_fitted, it_sum, it_max, phases, results_path,
                       timer.seconds["export"], timer.total(), peak, budget)
    log.close()
    return results_path


def _budget_source(spec_path: str, spec: Spec, options: FitOptions) -> str:
    """Where the memory budget came from, for messages."""
    if options.max_memory_mb is not None:
        return "--max-memory-mb"
    return f"{spec_path}: max_memory_mb" if spec.max_memory_mb else "the default memory budget"


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _print_summary(say, counts, n_fitted, it_sum, it_max, phases, results_path, export,
                   total, peak, budget) -> None:
    V = sum(counts.values())
    say(f"mpiblmm: fitted {n_fitted} of {V} voxels in {phases['total'][2]:.2f} s")
    for code in sorted(counts):
        say(f"  status {code:>3}: {counts[code]:>8}  {STATUS_CODES.get(code, 'not processed')}")
    if n_fitted:
        say(f"  iterations: mean {it_sum / n_fitted:.1f}, max {int(it_max)}")
    say("  seconds per phase (min / median / max over ranks):")
    for name, (lo, med, hi) in phases.items():
        say(f"    {name:<7} {lo:8.2f} {med:8.2f} {hi:8.2f}")
    say(f"  peak memory per rank (MiB, min / median / max): "
        f"{peak[0]:.0f} / {peak[1]:.0f} / {peak[2]:.0f}; budget {budget:.0f}")
    say(f"  results: {results_path}  maps: {results_path.parent / 'nifti'}")
    sys.stdout.flush()
