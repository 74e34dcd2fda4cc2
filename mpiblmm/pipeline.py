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

Checkpoint and resume: the voxels of every chunk written are marked in ``progress/done``;
``--resume`` reopens the results file (refused unless its ``input_hash``, see
:func:`input_hash`, matches the model, settings and data of this run), gives done voxels cost
0 when the voxels are shared among the ranks (any rank count) and fits only the others.  A
voxel's arithmetic does not depend on its chunk or rank, so the results are the bits an
uninterrupted run gives.  Without ``--resume`` or ``--overwrite`` an existing results file
is refused.  Rank 0 holds the output folder's lock (:mod:`mpiblmm.io.lock`) from setup to
the end.  SIGTERM/SIGINT (:mod:`mpiblmm.interrupt`): the ranks stop at a chunk end (or
abandon the chunk in hand after the grace period), close the file, and the job ends with
exit code 3 and one line naming ``--resume``.  A signal while the images are packed stops
the packing at a block boundary (:class:`~mpiblmm.io.ingest.PackingStopped`), with the same
exit code and line; ``packed.h5`` is left incomplete and ``--resume`` packs again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mpiblmm import __version__, interrupt, watchdog
from mpiblmm.checks import check_fittable, design_notes
from mpiblmm.design import Design, design_from_spec
from mpiblmm.errors import UserError
from mpiblmm.io import agree, make_dirs, maps_folder_problem, on_root
from mpiblmm.io.export import (ExportStopped, export_nifti, forget_maps, maps_state,
                               store_headline)
from mpiblmm.io.ingest import (DEFAULT_MEMORY_MB, PackingStopped, ReadingStopped, SlabReader,
                               prepare_input, shared_input_fingerprint)
from mpiblmm.io.lock import OutputLock, acquire_lock
from mpiblmm.io.images import units
from mpiblmm.io.results import (RESULTS_NAME, ResultsLayout, check_resumable, create_results,
                                creating_marker, open_results, unfinished_creation)
from mpiblmm.lmm.analysis import (ContrastDef, Model, Settings, analyse_chunk, bytes_per_voxel,
                                  fit_mb_per_voxel, results_held_mb)
from mpiblmm.lmm.estimate import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE
from mpiblmm.lmm.structure import choose
from mpiblmm.lmm.model import STATUS_CODES, STATUS_SINGULAR
from mpiblmm.lmm.products import random_design
from mpiblmm.memory import agreed_work_budget_mb, one_voxel_problem
from mpiblmm.parallel import (INTERRUPTED_EXIT_CODE, IOFailure, Slab, at_abort,
                              forget_abort_hook, no_hang, partition, partition_by_cost,
                              summarise_over_ranks)
from mpiblmm.progress import JobLog, LogOptions, Progress
from mpiblmm.source_digest import source_digest
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
#: shared fast path) against a complete one.  Measured (``analyse_chunk``, chunks of 200,
#: 1-15% of a voxel's images missing, CPU): one factor 1.33 at n = 240, 1.66 at 1,000, 1.59
#: (intercept) and 1.71 (slope) at 4,000; nested site/family/subject 1.68; crossed 0.95.
#: It was 2.0, from the demo study: at the edge of the brain, where incomplete voxels come
#: in runs, a rank of complete voxels got 17-50% more work than one of incomplete voxels.
INCOMPLETE_COST = 1.6
#: Upper bound on voxels per chunk: beyond this vectorisation gains nothing.
MAX_CHUNK = 16384


@dataclass(frozen=True)
class FitOptions:
    """Command-line overrides of the spec."""

    output: str | None = None
    max_memory_mb: float | None = None
    quiet: bool = False
    log: LogOptions = LogOptions()  # --log-file, --progress-interval, --rank-logs
    resume: bool = False
    overwrite: bool = False
    grace_seconds: float = interrupt.DEFAULT_GRACE_SECONDS
    chunk_voxels: int | None = None  # most voxels per chunk (None: the memory budget decides)


class FitStopped(Exception):
    """The fit stopped at a signal; what was done is kept (raised on every rank together)."""


def run_fit(args: Any) -> int:
    """Handler of ``mpiblmm fit`` (called on every rank inside the CLI's guard).

    Returns 0, or :data:`~mpiblmm.parallel.INTERRUPTED_EXIT_CODE` after SIGTERM/SIGINT.
    """
    from mpi4py import MPI

    options = FitOptions(output=args.output, max_memory_mb=args.max_memory_mb,
                         quiet=bool(args.quiet), log=LogOptions.from_args(args),
                         resume=bool(getattr(args, "resume", False)),
                         overwrite=bool(getattr(args, "overwrite", False)),
                         grace_seconds=float(getattr(args, "grace_seconds", None)
                                             or interrupt.DEFAULT_GRACE_SECONDS),
                         chunk_voxels=getattr(args, "chunk_voxels", None))
    interrupt.install(options.grace_seconds)
    # ends the job where a rank's main thread cannot: stuck inside MPI or HDF5 (watchdog.py),
    # also in the barrier below, whose partner the launcher may have killed
    dog = watchdog.start(MPI.COMM_WORLD, options.grace_seconds)
    try:
        fit_study(args.spec, MPI.COMM_WORLD, options, dog)
    except FitStopped:  # raised on every rank together: the barrier cannot wait forever
        # Leave together, once every rank has closed its files and rank 0 has released the
        # lock and printed its line: a launcher that ends the job at the first non-zero exit
        # (srun --kill-on-bad-exit=1, hydra, Open MPI) then finds the others leaving too.
        # The watchdog stays up to the process's end: a partner the launcher killed leaves
        # this rank waiting in the barrier or in MPI_Finalize.
        dog = None
        interrupt.hold_until_exit()   # a second signal now must not turn 3 into 15
        MPI.COMM_WORLD.Barrier()
        return INTERRUPTED_EXIT_CODE
    else:
        # Results and maps are complete: a signal from now on (a batch system's time limit
        # reached while MPI finalizes) leaves with 0, not killed by signal 15.
        if dog is not None:
            dog.finish(0)
            dog = None
        interrupt.hold_until_exit()
    finally:
        if dog is not None:
            dog.stop()
        interrupt.uninstall()
    return 0


def model_from_design(design: Design) -> Model:
    """The numerical model (X, random design, contrasts) of a design."""
    rd = random_design([f.codes for f in design.factors], [f.Z for f in design.factors],
                       names=[f.name for f in design.factors],
                       effect_names=[f.effect_names for f in design.factors])
    contrasts = tuple(ContrastDef(c.name, np.asarray(c.L, dtype=float), c.kind, c.alternative,
                                  c.sequential, c.term) for c in design.contrasts)
    return Model(np.asarray(design.X, dtype=float), rd, contrasts, design.type3_basis)


def settings_from_spec(spec: Spec, budget_mb: float = DEFAULT_MEMORY_MB) -> Settings:
    """Selection and estimation settings of a spec, with the estimator's share of the budget.

    A default written out (``"tolerance": 1e-12``) is the default left out: the same fit,
    so the same ``input_hash``, and a ``--resume`` after adding or removing it is taken."""
    est = spec.estimation
    return Settings(method=est.method,
                    tolerance=None if est.tolerance == DEFAULT_TOLERANCE else est.tolerance,
                    max_iterations=(None if est.max_iterations == DEFAULT_MAX_ITERATIONS
                                    else est.max_iterations),
                    min_n=spec.missingness.min_n or 0,
                    min_fraction=spec.missingness.min_fraction,
                    memory_budget=int(CHUNK_SHARE * budget_mb * 2**20))


def my_slab(packed, size: int, rank: int, done: np.ndarray | None = None):
    """This rank's contiguous voxels: balanced by cost where the observation counts are known.

    Complete voxels share their product forms and fit faster than voxels with missing
    observations, so slabs are cut where the cumulative cost, not the count, is equal.
    Voxels already ``done`` (a resumed fit) cost nothing.
    """
    if packed.n_observed is None and done is None:
        return partition(packed.n_voxels, size, rank)
    if packed.n_observed is None:
        costs = np.ones(packed.n_voxels)
    else:
        costs = np.where(packed.n_observed == packed.n_observations, 1.0, INCOMPLETE_COST)
    if done is not None:
        costs = np.where(done != 0, 0.0, costs)
    return partition_by_cost(costs, size, rank)


def chunk_voxels(budget_mb: float, n: int, model: Model, most: int | None = None) -> int:
    """Voxels per chunk so one chunk's working arrays fit the share of the (work) budget, and
    at most ``most`` (``--chunk-voxels``) or ``$MPIBLMM_CHUNK_VOXELS`` when given."""
    per = bytes_per_voxel(n, model.X.shape[1], model.structure, len(model.contrasts),
                          blocks=choose(model.rd))
    cap = min(MAX_CHUNK, int(os.environ.get("MPIBLMM_CHUNK_VOXELS") or MAX_CHUNK))
    if most is not None:
        cap = min(cap, int(most))
    return int(max(1, min(cap, CHUNK_SHARE * budget_mb * 2**20 // per)))


def pending_chunks(mine: Slab, done: np.ndarray | None, step: int) -> list[tuple[int, int]]:
    """The chunks ``[start, stop)`` of this rank's slab still to fit: runs of voxels not
    ``done``, cut every ``step`` voxels."""
    if done is None:
        runs = [(mine.start, mine.stop)] if mine.size else []
    else:
        todo = np.concatenate(([False], done[mine.start:mine.stop] == 0, [False]))
        edges = np.flatnonzero(np.diff(todo.astype(np.int8)))
        runs = [(mine.start + int(a), mine.start + int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return [(lo, min(lo + step, hi)) for a, hi in runs for lo in range(a, hi, step)]


def _settings_fields(settings: Settings, p: int) -> dict:
    """The settings that decide a fit's numbers (not the memory budget): a ``min_n`` of 1 is
    the default's rule (0), as a voxel needs an observation anyway.  (Up to p + 1 was taken
    for the default, but a voxel with no more observations than columns is fitted on the
    columns its rows support, so ``min_n`` 4 at p = 3 refuses voxels the default fits: a
    resume with it changed was accepted.)  ``p`` is kept for the callers."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k != "memory_budget"}
    if fields["min_n"] <= 1:
        fields["min_n"] = 0
    return fields


def _input_items(design: Design, settings: Settings, data_fingerprint: str):
    """What decides a fit's numbers, as (part, item) pairs in a fixed order: the part names
    what a user would say changed (:func:`input_parts`)."""
    yield from (("version", "mpiblmm-input-1"), ("version", __version__),
                ("version", source_digest()), ("settings", _settings_fields(settings, design.p)), ("data", data_fingerprint),
                ("fixed", np.asarray(design.X, dtype=float)), ("fixed", list(design.fixed_names)))
    for f in design.factors:
        for item in (f.name, np.asarray(f.codes, dtype=np.int64), np.asarray(f.Z, dtype=float),
                     list(f.effect_names)):
            yield "random", item
    for c in design.contrasts:
        items = [c.name, np.asarray(c.L, dtype=float), c.kind, c.alternative]
        if c.sequential:  # its rows follow each voxel's X'X
            items += ["sequential", list(c.sequential)]
        if c.term:  # anova's test of the term where a voxel drops columns
            items += ["term", c.term]
        yield from (("contrasts", item) for item in items)
    if design.type3_basis is not None:
        yield "contrasts", "type3"
        yield "contrasts", np.asarray(design.type3_basis.R, dtype=float)
        yield "contrasts", [[t.label, list(t.x_cols), list(t.r_cols), sorted(t.variables),
                             sorted(t.marginal), sorted(t.numeric)]
                            for t in design.type3_basis.terms]
        if design.type3_basis.treatment_X is not None:
            yield "contrasts", "treatment_X"
            yield "contrasts", np.asarray(design.type3_basis.treatment_X, dtype=float)


def _item_bytes(x: Any) -> bytes:
    """What one item adds to the hashes (an array with its dtype and shape), then a NUL."""
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        return f"{a.dtype.str}{a.shape}".encode() + a.tobytes() + b"\0"
    return json.dumps(x, sort_keys=True, default=str).encode() + b"\0"


def input_digests(design: Design, settings: Settings, data_fingerprint: str) -> tuple[str, dict]:
    """``input_hash`` and ``input_parts``, in one pass over what decides a fit's numbers.

    ``input_hash``: a hash of the model (X, random factors, contrasts), the estimation and
    selection settings, the data (a fingerprint of the input files) and the mpiblmm version
    and sources (:func:`~mpiblmm.source_digest.source_digest`).
    Not the memory budget, chunking or rank count: they do not change a voxel's bits.
    Stored in ``results.h5`` for ``--resume``.

    ``input_parts``: the same, part by part, so a refused ``--resume`` can say what changed:
    the version, the sources' digest and each setting as values, the number of observations, and a hash of each
    of the data, the fixed effects, the random effects and the contrasts.  Stored (JSON)."""
    total, hashes = hashlib.sha256(), {}
    for part, item in _input_items(design, settings, data_fingerprint):
        raw = _item_bytes(item)
        total.update(raw)
        hashes.setdefault(part, hashlib.sha256()).update(raw)
    parts = {k: h.hexdigest()[:16] for k, h in hashes.items() if k not in ("version", "settings")}
    parts["version"] = __version__
    parts["code"] = source_digest()
    parts["observations"] = int(design.n)
    parts["settings"] = json.loads(json.dumps(_settings_fields(settings, design.p),
                                              default=str))
    return total.hexdigest(), parts


def input_hash(design: Design, settings: Settings, data_fingerprint: str) -> str:
    """The ``input_hash`` of :func:`input_digests`."""
    return input_digests(design, settings, data_fingerprint)[0]


@dataclass(frozen=True)
class Setup:
    """What rank 0 found and decided in setup (broadcast to every rank)."""

    spec: Spec | None  # (every rank has it before rank 0 makes the rest: it is not sent again)
    design: Design
    input_hash: str
    lock: OutputLock
    done: np.ndarray | None  # progress/done of the results file resumed, or None
    note: str = ""
    fingerprint: str = ""  # input_fingerprint of the spec (packing reuses it)
    created_output: bool = False  # the output folder did not exist before this run
    input_parts: dict = dataclasses.field(default_factory=dict)  # see input_digests()


def _read_spec(spec_path: str, options: FitOptions, check_listed: bool = False) -> Spec:
    """Rank 0: the spec with the command line's overrides applied.  The files its image and
    mask lists name are checked by :func:`shared_input_fingerprint` (over every rank) unless
    ``check_listed``.  A spec that fails without that check is parsed again with it, so its
    first problem is the one a full parse finds first (a missing image before a missing
    X.csv)."""
    try:
        try:
            spec = load_spec(spec_path, check_listed=check_listed)
        except UserError:
            if not check_listed:
                load_spec(spec_path)  # raises the first problem in the spec's order
            raise
    except UnicodeDecodeError as exc:  # a file the spec reads is not text (spec.py's job)
        raise UserError(f"it, or a list file it names, is not UTF-8 text (byte {exc.start}: "
                        f"{exc.reason})", spec_path) from None
    if options.output is not None:
        if not str(options.output).strip():
            raise UserError("is empty: name the output folder (e.g. -o results)", "--output")
        spec = replace(spec, output=Path(options.output).resolve())
    if options.max_memory_mb is not None:
        spec = replace(spec, max_memory_mb=float(options.max_memory_mb))
    return spec


def _refuse_listed(spec_path: str, options: FitOptions) -> None:
    """Rank 0, when a file listed in the spec is not a regular file: the full parse, which
    raises the spec's own line for it (its list file and row)."""
    _read_spec(spec_path, options, check_listed=True)


def _load(spec: Spec, spec_path: str, options: FitOptions, fingerprint: str) -> Setup:
    """Rank 0: the spec's design, the output folder (created, so an unwritable one is a user
    error before any collective I/O) and its lock, and what to do about results already there
    (refuse, resume or replace).  The setup's ``spec`` is left to the caller (every rank has
    it already)."""
    where = "--output" if options.output is not None else f"{spec_path}: output"
    design = design_from_spec(spec)
    check_fittable(design, spec)
    choose(model_from_design(design).rd)  # a crossed remainder too large: a user error now
    settings = settings_from_spec(spec, spec.max_memory_mb or DEFAULT_MEMORY_MB)
    created = not os.path.lexists(spec.output)
    make_dirs(spec.output, where)
    problem = maps_folder_problem(spec.output, where)
    if problem is not None:
        raise problem
    lock = acquire_lock(Path(spec.output), where)
    try:
        digest, parts = input_digests(design, settings, fingerprint)
        results = Path(spec.output) / RESULTS_NAME
        if results.is_dir():  # neither --resume nor --overwrite could use or replace it
            raise UserError("is a folder, not a results file: move it away", str(results))
        done, note = None, ""
        if (results.exists() or results.is_symlink()) and unfinished_creation(results):
            # A job stopped while creating it (killed, or out of space): no voxel was fitted.
            try:
                results.unlink()
                creating_marker(results).unlink()
            except OSError as exc:
                raise UserError(f"cannot replace {results}, left unfinished by a job stopped "
                                f"while creating it ({exc.strerror})", where) from None
            _forget_maps(results)
            note = (f"{results} was left unfinished by a job stopped while creating it (no "
                    f"voxel fitted): starting a new fit")
        if results.exists() or results.is_symlink():
            if options.resume:
                done = check_resumable(results, digest, parts)
                if not os.access(results, os.W_OK):
                    raise UserError(f"cannot resume {results}: the file is read-only; make it "
                                    f"writable or use --overwrite", "--resume")
                note = f"resuming: {int(np.count_nonzero(done))} of {done.size} voxels already done"
            elif options.overwrite:
                try:
                    results.unlink()
                except OSError as exc:
                    raise UserError(f"cannot replace {results} ({exc.strerror})",
                                    "--overwrite") from None
                _forget_maps(results)
            else:
                raise _exists(results, where)
        elif options.resume and not note:
            note = "nothing to resume (no results file yet): starting a new fit"
    except BaseException:
        lock.release()
        raise
    notes = [note] * bool(note) + [f"note: {n}" for n in design_notes(spec, design)]
    note = "\n".join(notes)
    return Setup(None, design, digest, lock, done, note, fingerprint, created, parts)


def _exists(results: Path, where: str) -> UserError:
    """The refusal of an existing results file without --resume or --overwrite; for a
    finished fit whose maps are not all written (an export that was killed), the advice is
    ``mpiblmm export``, not a new fit."""
    state = maps_state(results)
    if state is not None and state[0] and not state[1]:
        return UserError(f"{results} already exists and its fit is complete, but its maps in "
                         f"{results.parent / 'nifti'} are not (the export was interrupted): "
                         f"run `mpiblmm export {results}` to write them (--resume also "
                         f"writes them; --overwrite fits again)", where)
    return UserError(f"{results} already exists: use --resume to continue that fit, "
                     f"or --overwrite to replace it", where)


def _forget_maps(results: Path) -> None:
    """--overwrite: the maps of the replaced fit go with it (those its ``maps.json`` lists,
    and those an export that was stopped or killed before its ``maps.json`` had begun to
    write, which its pending list names), so no map of the old model is left beside a new
    fit, finished or not; files the exports did not write stay."""
    folder = results.parent / "nifti"
    try:
        forget_maps(folder)   # an unwritable folder is reported here, by its lists
    except OSError as exc:
        raise UserError(f"cannot replace {exc.filename or folder} ({exc.strerror or exc})",
                        "--overwrite") from None


def fit_study(spec_path: str, comm: Any, options: FitOptions = FitOptions(),
              dog: watchdog.Watchdog | None = None) -> Path:
    """Fit a study end to end on the ranks of ``comm``; return the results file's path.
    ``dog``: told to watch the output folder's free space once the setup made it.

    Raises :class:`FitStopped` on every rank when the fit stopped at SIGTERM/SIGINT.
    """
    rank = comm.Get_rank()
    log = JobLog.open(comm, options.quiet, options.log)  # rank 0's lines (progress.py)
    timer = PhaseTimer(on_enter=log.phase)

    with timer.phase("setup"):
        import h5py  # noqa: F401
        import nibabel  # noqa: F401  every rank imports it now, side by side, rather than
        # rank 0 alone inside the packing's first step while the others wait for it
        # the spec on rank 0; the stat calls of its 10^4-10^5 images over every rank; then
        # the design, the output folder and what is there, on rank 0 again
        spec = on_root(comm, lambda: _read_spec(spec_path, options))
        fingerprint = shared_input_fingerprint(
            spec, comm, on_problem=lambda: _refuse_listed(spec_path, options))
        setup = replace(on_root(comm, lambda: _load(spec, spec_path, options, fingerprint)),
                        spec=spec)
    hook = at_abort(setup.lock.release)  # whichever rank aborts releases the lock
    if dog is not None:
        dog.watch(Path(setup.spec.output), lambda: log.current)
    failed = True
    try:
        results = _fit(setup, comm, options, log, timer, spec_path)
        failed = False
        return results
    finally:
        log.close()
        if rank == 0:
            setup.lock.release()
            if failed:
                _remove_if_empty(setup)
        forget_abort_hook(hook)


def _remove_if_empty(setup: Setup) -> None:
    """Rank 0, when the fit failed: the output folder this run created goes again if nothing
    was left in it (a refused input must not leave an empty results folder behind)."""
    if setup.created_output and setup.spec is not None:
        try:
            os.rmdir(setup.spec.output)
        except OSError:  # not empty (a packed input or a log kept for --resume), or gone
            pass


def _fit(setup: Setup, comm: Any, options: FitOptions, log: JobLog, timer: PhaseTimer,
         spec_path: str) -> Path:
    rank, size = comm.Get_rank(), comm.Get_size()
    say = log.say
    spec, design, done = setup.spec, setup.design, setup.done
    with timer.phase("setup"):
        model = model_from_design(design)
        budget = spec.max_memory_mb or DEFAULT_MEMORY_MB
        # the budget is the peak per rank, interpreter included: size the work by what is left
        source = _budget_source(spec_path, spec, options)
        work = agreed_work_budget_mb(comm, budget, source, results_held_mb(model))
        # chunks hold one voxel at least: a budget that cannot is refused now, not exceeded
        agree(comm, one_voxel_problem(budget, work, fit_mb_per_voxel(model), source))
        settings = settings_from_spec(spec, work)
    for line in setup.note.splitlines():
        say(f"mpiblmm: {line}")
    with timer.phase("ingest"):
        try:
            packed = prepare_input(replace(spec, max_memory_mb=INGEST_SHARE * work), comm,
                                   n_expected=design.n, fingerprint=setup.fingerprint or None)
        except PackingStopped as stop:  # on every rank, at the same block boundary
            _stop_packing(comm, stop.path, done, Path(spec.output) / RESULTS_NAME, log,
                          options.overwrite, reading=isinstance(stop, ReadingStopped))
    if done is not None and done.size != packed.n_voxels:
        agree(comm, UserError(f"cannot resume: it holds {done.size} voxels but the input has "
                              f"{packed.n_voxels}; use --overwrite to start again",
                              str(Path(spec.output) / RESULTS_NAME)))
    unit = units(packed.space)[1]       # voxels, or a surface's vertices or grayordinates
    say(f"mpiblmm: {packed.n_voxels} {unit} x {packed.n_observations} observations, "
        f"{design.p} fixed effects, {len(design.factors)} random factor(s), "
        f"{settings.method}, {size} rank(s)")

    results_path = Path(spec.output) / RESULTS_NAME
    stopper = interrupt.StopAgreement(comm)
    with timer.phase("create"):
        if done is None:
            layout = ResultsLayout.from_design(design, packed.n_voxels, packed.grid_shape,
                                               packed.affine, settings.method, spec.text)
            writer = create_results(results_path, layout, packed.voxels, comm,
                                    input_hash=setup.input_hash, space=packed.space,
                                    input_parts=setup.input_parts)
        else:
            writer = open_results(results_path, comm, input_hash=setup.input_hash,
                                  space=packed.space)

    mine = my_slab(packed, size, rank, done)
    step = chunk_voxels(work, design.n, model, options.chunk_voxels)
    if options.chunk_voxels and step < min(int(options.chunk_voxels), packed.n_voxels):
        say(f"mpiblmm: note: --chunk-voxels {options.chunk_voxels}: chunks of {step} {unit}, "
            f"the most the memory budget ({budget:g} MiB per rank) allows")
    chunks = pending_chunks(mine, done, step)
    resumed_here = 0 if done is None else int(np.count_nonzero(done[mine.start:mine.stop]))
    progress = Progress(comm, packed.n_voxels, log, mine.size, len(chunks),  # collective
                        resumed_total=0 if done is None else int(np.count_nonzero(done)),
                        unit=unit)
    if resumed_here:
        progress.chunk_done(resumed_here, resumed=True)
    written = 0
    with SlabReader(packed, comm) as reader, no_hang(comm, results_path, "fitting"):
        for start, stop in chunks:
            if stopper.should_stop():
                break
            with timer.phase("read"):
                Y = reader.read(start, stop, collective=False)
            try:
                with timer.phase("fit"), interrupt.abandonable():
                    values = analyse_chunk(model, Y, settings)
            except interrupt.ChunkAbandoned:
                break
            with timer.phase("write"):
                writer.write(start, stop, values)
            written += stop - start
            progress.chunk_done(stop - start)  # never waits for other ranks
        # this rank's final count, before the reader's collective close and settle wait for
        # the others (after the close, rank 0 counted itself unfinished until the slowest
        # rank was done: "0/2 ranks finished" for the whole of a stalled rank's delay)
        progress.chunks_done()

    if stopper.settle():
        _stop(comm, writer, written, done, packed.n_voxels, results_path, progress,
              options.overwrite)
    progress.close()  # rank 0 collects the last counts; the others post theirs

    with timer.phase("finish"):
        tallied, it_sum, it_max, dropped = writer.tally()  # the whole file, resumed part too
        phases = summarise_phases(comm, timer, PHASES)
        peak = summarise_over_ranks(comm, peak_memory_mb())
        summary = {"ranks": size, "chunk_voxels": step, "memory_budget_mb": budget,
                   "work_budget_mb": work,
                   "iterations_max": it_max, "seconds": phases, "peak_memory_mb": list(peak),
                   "resumed_voxels": 0 if done is None else int(np.count_nonzero(done))}
        counts = writer.finish(summary, tallied)
    # The file (or its folder) removed or moved while the job ran: the fit went into it all
    # the same; say so with exit code 4, not a "file not found" from the export (exit 2).
    gone = None
    if rank == 0 and not results_path.is_file():
        gone = IOFailure("no longer there when the fit ended (it, or its folder, was removed "
                         "or moved while the job ran): the maps are not written; if it was "
                         "moved, it is complete: run `mpiblmm export` on it where it is now; "
                         "if it was removed, its results are lost: fit again",
                         str(results_path))
    agree(comm, gone)
    n_fitted = sum(v for k, v in counts.items() if k <= STATUS_SINGULAR)
    with timer.phase("export"):
        try:
            export_nifti(results_path, results_path.parent / "nifti", comm=comm)
        except ExportStopped:
            if rank == 0:
                _stop_line(log, f"mpiblmm: stopped by {interrupt.signal_name() or 'a signal'} "
                                f"while writing the maps; the results are complete: run "
                                f"`mpiblmm export {results_path}` to write them")
            raise FitStopped() from None
    # the peak again, with the maps' (the summary written inside finish has it without them)
    peak = summarise_over_ranks(comm, peak_memory_mb())
    phases = {**{k: v for k, v in phases.items() if k != "total"},
              **store_headline(results_path, comm, timer, ("finish", "export"),
                               {"peak_memory_mb": list(peak)})}
    if rank == 0 and log.active:  # stdout unless --quiet, and --log-file
        _print_summary(say, counts, n_fitted, it_sum, it_max, phases, results_path,
                       timer.seconds["export"], timer.total(), peak, budget, dropped,
                       summary["resumed_voxels"], unit)
    if rank == 0 and n_fitted == 0:
        # a job that ran to the end without a single estimate: a batch log must say so
        why = "; ".join(f"{counts[c]} with status {c}, "
                        f"{STATUS_CODES.get(c, 'not processed').removeprefix('not fitted: ')}"
                        for c in sorted(counts))
        print(f"mpiblmm: warning: no voxel was fitted: {why}", file=sys.stderr, flush=True)
    return results_path


def _budget_source(spec_path: str, spec: Spec, options: FitOptions) -> str:
    """Where the memory budget came from, for messages."""
    if options.max_memory_mb is not None:
        return "--max-memory-mb"
    return f"{spec_path}: max_memory_mb" if spec.max_memory_mb else "the default memory budget"


def _stop(comm: Any, writer: Any, written: int, done: np.ndarray | None, n_voxels: int,
          results_path: Path, progress: Progress, overwrite: bool = False) -> None:
    """Collective: close the results file as it is, report the voxels done over all ranks
    (the progress line and the stop line agree) and raise :class:`FitStopped` everywhere."""
    from mpi4py import MPI

    writer.close()
    total = int(comm.allreduce(written, op=MPI.SUM))
    total += 0 if done is None else int(np.count_nonzero(done))
    progress.abandon(total)
    if comm.Get_rank() == 0:
        name = interrupt.signal_name() or "a signal"
        _stop_line(progress.log,
                   f"mpiblmm: stopped by {name}: {total} of {n_voxels} {progress.unit} are done and kept "
                   f"in {results_path}; run the same command with --resume "
                   f"{'in place of --overwrite ' if overwrite else ''}to continue")
    raise FitStopped()


def _stop_line(log: JobLog, text: str) -> None:
    """Rank 0: a stopped fit's last line, on stderr and in the log file (``--log-file``),
    where a batch user reads the job's progress and its "fit stopped at" line."""
    print(text, file=sys.stderr, flush=True)
    log.to_log_file(text)


def _stop_packing(comm: Any, packed: Path, done: np.ndarray | None, results_path: Path,
                  log: JobLog, overwrite: bool = False, reading: bool = False) -> None:
    """Packing stopped at a signal on every rank (:class:`~mpiblmm.io.ingest.PackingStopped`):
    rank 0 prints the one line of a stopped fit, and :class:`FitStopped` is raised
    everywhere.  ``packed.h5`` is not complete, so ``--resume`` packs again from the start;
    voxels a resumed results file holds (``done``) are kept.  ``reading``: the input was
    packed already (``images: {"h5": ...}``) and only read, so it is unchanged."""
    if comm.Get_rank() == 0:
        name = interrupt.signal_name() or "a signal"
        kept = ("no voxel is fitted yet" if done is None else
                f"{int(np.count_nonzero(done))} of {done.size} voxels are done and kept in "
                f"{results_path}")
        where = (f"while reading the packed images {packed} (unchanged)" if reading else
                 f"while packing the images into {packed} (not complete; packing starts again)"
                 if packed.exists() else
                 "while packing the images (nothing written yet; packing starts again)")
        _stop_line(log, f"mpiblmm: stopped by {name} {where}: {kept}; run the same command "
                        f"with --resume {'in place of --overwrite ' if overwrite else ''}"
                        f"to continue")
    raise FitStopped()


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _print_summary(say, counts, n_fitted, it_sum, it_max, phases, results_path, export,
                   total, peak, budget, dropped, resumed=0, unit="voxels") -> None:
    V = sum(counts.values())
    earlier = (f" ({resumed} of the {V} by an earlier run, resumed; the times are this "
               f"run's)" if resumed else "")
    say(f"mpiblmm: fitted {n_fitted} of {V} {unit} in {phases['total'][2]:.2f} s{earlier}")
    for code in sorted(counts):
        say(f"  status {code:>3}: {counts[code]:>8}  {STATUS_CODES.get(code, 'not processed')}")
    if dropped:   # lme4's "fixed-effect model matrix is rank deficient so dropping ..."
        say(f"  {dropped} fitted {unit} leave X rank deficient on their observed rows: fitted "
            f"without the dependent columns, as lme4 drops them (NaN there in beta)")
    if n_fitted:
        say(f"  iterations: mean {it_sum / n_fitted:.1f}, max {int(it_max)}")
    say("  seconds per phase (min / median / max over ranks):")
    for name, (lo, med, hi) in phases.items():
        say(f"    {name:<7} {lo:8.2f} {med:8.2f} {hi:8.2f}")
    say(f"  peak memory per rank (MiB, min / median / max): "
        f"{peak[0]:.0f} / {peak[1]:.0f} / {peak[2]:.0f}; budget {budget:.0f}")
    say(f"  results: {results_path}  maps: {results_path.parent / 'nifti'}")
    sys.stdout.flush()
