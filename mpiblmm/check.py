"""`mpiblmm check spec.json [--ranks N]`: everything a fit would validate, without fitting.

Lists **every** problem it can find, one line each (the fit stops at the first): the JSON
Schema's violations, then the files the spec names, the output folder, the grids of the
images (a packed HDF5 input: the fit's own checks of its attributes and voxels), the analysis
mask and the first image's data, the tables and the formula, each contrast, and the
thresholds and rank of the design and of each factor's covariates.  Where the fit has a check
the same helper is called here (``mpiblmm.checks.fittable_problems`` -- all of them, where
the fit stops at the first --, ``mpiblmm.io.folder_problem``, ``mpiblmm.memory.work_budget_mb``,
``mpiblmm.io.ingest.describe_packed`` / ``analysis_mask_voxels`` / ``rows_problem``,
``mpiblmm.io.images.verify_data``), so both print the same line.  Every image's and
observation mask's data is verified to be complete and readable
(:func:`mpiblmm.io.images.verify_data`: an uncompressed NIfTI's size against its header, a
compressed one decompressed once to its end, so its CRC-32 and length are checked; a
surface file read), so a truncated or corrupt later image is named here, not only by the
fit's packing.  Under ``mpiexec`` the ranks share that reading (contiguous blocks of the
files); alone, one process reads them all (for a study of many compressed images this is
most of check's time: about the first pass of packing).  With no problem it
prints the model summary: n, p and the coefficient names, each factor's levels and effects,
the contrasts, the candidate voxels, the expected memory per rank and a rough run time for
N ranks from the estimator's cost measured here on a few simulated voxels of this design.

Runs on rank 0; the other ranks only verify their share of the images' data when rank 0
asks (a broadcast; rank 0 always ends with one, so no rank waits forever) and agree on the
exit code (0, or 2 with problems).  A :class:`UserError` anywhere in it is one of its
problems, never rank 0's alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mpiblmm.errors import USER_ERROR_EXIT_CODE, UserError
from mpiblmm.io.images import units

#: Voxels the run-time estimate fits (simulated from the design).
TIMING_VOXELS = 256


def run_check(args: Any) -> int:
    """Handler of ``mpiblmm check`` (every rank calls; rank 0 works)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    code = 0
    shared = comm.Get_size() > 1
    if comm.Get_rank() != 0:
        while shared:  # rank 0 asks for shares of the data to verify, then sends the code
            kind, value = comm.bcast(None, root=0)
            if kind == "done":
                return int(value)
            _verify_share(comm, value)
    if comm.Get_rank() == 0:
        verify = (lambda files: _verify_on_root(comm, files)) if shared else None
        try:
            problems, summary = check_spec(args.spec, ranks=args.ranks or comm.Get_size(),
                                           verify=verify)
        except UserError as exc:  # one of check's problems, never rank 0's alone (an abort)
            problems, summary = [str(exc)], []
        if problems:
            for line in problems:
                print(f"mpiblmm: error: {line}", file=sys.stderr)
            for line in summary:  # with problems: notes that may explain them
                print(f"mpiblmm: {line}", file=sys.stderr)
            print(f"mpiblmm: {len(problems)} problem(s) found in {args.spec}", file=sys.stderr)
            code = USER_ERROR_EXIT_CODE
        else:
            print("\n".join(summary))
        sys.stdout.flush()
        sys.stderr.flush()
    if shared:
        comm.bcast(("done", code), root=0)
    return code


# --------------------------------------------------------------------------- image data
def verify_files(files: list) -> list[tuple[int, str]]:
    """``(index, problem)`` of each of ``files`` (``(path, grid, reference)``) whose data is
    incomplete or unreadable (:func:`mpiblmm.io.images.verify_data`, the fit's words)."""
    from mpiblmm.io.images import verify_data

    out = []
    for i, (path, grid, reference) in enumerate(files):
        try:
            verify_data(path, grid, reference)
        except UserError as exc:
            out.append((i, str(exc)))
    return out


def _verify_share(comm: Any, files: list) -> list[tuple[int, str]] | None:
    """Collective: each rank verifies its contiguous block of ``files``; rank 0 gets every
    problem (``None`` elsewhere)."""
    from mpiblmm.parallel import partition

    part = partition(len(files), comm.Get_size(), comm.Get_rank())
    mine = [(part.start + i, why) for i, why in verify_files(files[part.start:part.stop])]
    gathered = comm.gather(mine, root=0)
    return None if gathered is None else sorted(x for got in gathered for x in got)


def _verify_on_root(comm: Any, files: list) -> list[tuple[int, str]]:
    """Rank 0: the other ranks, waiting in :func:`run_check`, take their shares."""
    comm.bcast(("verify", files), root=0)
    return _verify_share(comm, files) or []


def check_spec(path: str | Path, ranks: int = 1,
               verify: Any = None) -> tuple[list[str], list[str]]:
    """Validate a spec fully; return (problems, summary lines); with problems, the second
    list holds only notes that may explain them.  ``verify``: how the images' data is
    verified (a function of a list of ``(path, grid, reference)`` giving ``(index,
    problem)`` pairs; default :func:`verify_files` in this process)."""
    from mpiblmm.checks import min_n_problem
    from mpiblmm.schema import schema_problems
    from mpiblmm.spec import parse_spec, read_spec_json

    path = Path(path)
    problems: list[str] = []
    try:
        text, raw = read_spec_json(path)  # the fit's reading, in its words
    except UserError as exc:
        return [str(exc)], []
    if not isinstance(raw, dict):
        return [f"{path}: expected a JSON object at the top level"], []
    problems += [f"{path}: {key}: {msg}" for key, msg in schema_problems(raw)]
    if problems:
        return problems, []
    from mpiblmm.io.nifti import quiet_nibabel

    try:
        with quiet_nibabel():  # it reads the first and last images' headers (4-D or not)
            spec = parse_spec(raw, path, text=text, check_files=False)
    except UserError as exc:
        return [str(exc)], []
    problems += _missing_files(spec, raw)
    if problems:
        return problems, []
    _output(spec, problems)
    before = len(problems)
    grid, n_images = _images(spec, problems, verify or verify_files)
    candidates = _candidates(spec, grid, problems) if len(problems) == before else None
    design = _design(spec, problems)
    _budget(spec, path, design, problems)
    if design is None:      # what does not need the design is still listed (issue 10)
        if n_images is not None and (problem := min_n_problem(spec, n_images)) is not None:
            problems.append(str(problem))
        return problems, []
    _thresholds(spec, design, n_images, problems)
    if problems:  # (a column read as text may be why: p >= n, a rank-deficient X)
        return problems, _text_column_notes(spec)
    try:
        _estimable(design)
        return [], _summary(spec, design, candidates or (0, "unknown"), ranks,
                            units(getattr(grid, "space", "")))
    except UserError as exc:  # whatever the fit would refuse that the steps above missed
        return [str(exc)], []


# --------------------------------------------------------------------------- files
def _missing_files(spec: Any, raw: dict) -> list[str]:
    """Every file the spec names that does not exist (list files: every row)."""
    from mpiblmm.spec import not_a_file, read_path_list

    out = []
    where = str(spec.path)

    def need(p: Path | None, key: str) -> None:
        if p is not None and not Path(p).is_file():
            out.append(f"{where}: {key}: {not_a_file(Path(p))}")

    for key in ("X", "covariates", "analysis_mask"):
        need(getattr(spec, key), key)
    for i, f in enumerate(spec.random):
        need(f.factor, f"random[{i}].factor")
        need(f.design, f"random[{i}].design")
    if spec.packed is not None:
        need(spec.packed.h5, "images.h5")
    for key, paths in (("images", spec.images), ("observation_masks", spec.observation_masks)):
        if paths is None:
            continue
        listed = raw.get(key)
        if isinstance(listed, str) and not str(listed).endswith((".nii", ".nii.gz")):
            lf = Path(os.path.expanduser(listed))
            lf = lf if lf.is_absolute() else Path(spec.folder) / lf
            try:
                read_path_list(lf, nifti=True, check_files=False)
            except UserError as exc:
                out.append(str(exc))
                continue
            lines = [ln.strip() for ln in lf.read_text(encoding="utf-8-sig").splitlines()]
            rows = [i + 1 for i, ln in enumerate(lines) if ln and not ln.startswith("#")]
            for row, p in zip(rows, paths):
                if not Path(p).is_file():
                    out.append(f"{lf}: row {row}: {not_a_file(Path(p))}")
        else:
            for i, p in enumerate(paths):
                if not Path(p).is_file():
                    out.append(f"{where}: {key}[{i}]: {not_a_file(Path(p))}")
    return out


def _budget(spec: Any, path: Path, design: Any, problems: list[str]) -> None:
    """The memory budget: the fit's own checks, measured as the fit measures its ranks (once
    the design is built: a formula's table and a cohort's design count; plus what a fit rank
    holds beyond this process, :func:`mpiblmm.memory.rank_baseline_mb`), so a budget the fit
    would refuse is refused here in its words: too little to run
    (:func:`mpiblmm.memory.work_budget_mb`) and, with a ``design``, too little for one voxel's
    fit of it (:func:`mpiblmm.memory.one_voxel_problem`)."""
    from mpiblmm.io.ingest import DEFAULT_MEMORY_MB
    from mpiblmm.lmm.analysis import fit_mb_per_voxel, results_held_mb
    from mpiblmm.memory import one_voxel_problem, rank_baseline_mb, work_budget_mb
    from mpiblmm.pipeline import FitOptions, _budget_source, model_from_design

    import h5py  # noqa: F401  what a rank of the fit has imported when it measures itself
    import nibabel  # noqa: F401

    budget = spec.max_memory_mb or DEFAULT_MEMORY_MB
    where = _budget_source(str(path), spec, FitOptions())
    model = None if design is None else model_from_design(design)
    try:
        held = 0.0 if model is None else results_held_mb(model)
        work = work_budget_mb(budget, rank_baseline_mb() + held, where)
    except UserError as exc:
        problems.append(str(exc))
        return
    if model is not None:
        problem = one_voxel_problem(budget, work, fit_mb_per_voxel(model), where)
        if problem is not None:
            problems.append(str(problem))


def _output(spec: Any, problems: list[str]) -> None:
    """The output folder: the fit creates it (:func:`mpiblmm.io.make_dirs`); here the same
    error is predicted without creating anything (a file, under a file, not writable)."""
    from mpiblmm.io import folder_problem, maps_folder_problem

    where = f"{spec.path}: output"
    problem = folder_problem(spec.output, where) or maps_folder_problem(spec.output, where)
    if problem is not None:
        problems.append(str(problem))


def _images(spec: Any, problems: list[str], verify: Any = None) -> tuple[Any, int | None]:
    """The grid (from the headers) and the number of observations; grid problems listed,
    then the problems of the data of every image and observation mask on the grid
    (``verify``, see :func:`check_spec`; the first image's data is read by
    :func:`_candidates`, the analysis mask's too).

    Packed input: the fit's own validation of the file (:func:`~mpiblmm.io.ingest.
    describe_packed`: attributes, voxel list, analysis mask; no observation is read)."""
    from mpiblmm.io.images import grid_problem, read_grid
    from mpiblmm.io.surface import named_structure

    if spec.packed is not None:
        from mpiblmm.io.ingest import describe_packed

        try:
            n, shape, _, stored, keep, _, ours, stored_zim, _, _ = describe_packed(
                spec.packed.h5, spec.packed.dataset, spec.analysis_mask)
        except UserError as exc:
            problems.append(str(exc))
            return None, None
        exact = ours and (stored_zim or not spec.zero_is_missing)  # no data read by the fit
        return _PackedGrid(shape, int(keep.size), int(stored.size),
                           spec.analysis_mask is not None, exact), n
    grid = None
    try:
        grid = read_grid(spec.images[0])
    except UserError as exc:
        problems.append(str(exc))
        return None, len(spec.images)
    data = {}  # files on the grid whose data is to be verified: one entry per file
    # the structure is compared with the first image's or, where that names none (GIfTI),
    # with the first file's that names one (the fit: mpiblmm.io.surface.one_structure)
    ref, ref_path, unnamed = grid, str(spec.images[0]), named_structure(grid.space) is None
    for p in list(spec.images[1:]) + list(spec.observation_masks or ()) + \
            ([spec.analysis_mask] if spec.analysis_mask else []):
        try:
            g = read_grid(p)
        except UserError as exc:
            if str(exc) not in problems:      # the volumes of a 4-D file: its line once
                problems.append(str(exc))
            continue
        why = grid_problem(ref, p, g, reference=ref_path)  # kind, size, structure
        if why is not None:
            problems.append(f"{p}: {why}")
            continue
        if unnamed and named_structure(g.space) is not None:
            ref, ref_path, unnamed = g, str(p), False
        if p != spec.analysis_mask and str(p) != str(spec.images[0]):
            data.setdefault(str(p), p)  # the volumes of a 4-D file: the file once
    if verify is not None and data:
        files = [(p, grid, str(spec.images[0])) for p in data.values()]
        found = [why for _, why in verify(files)]
        problems.extend(found)
        if spec.observation_masks and not found and _masks_all_empty(spec, grid):
            from mpiblmm.io.ingest import nothing_observed

            problems.append(str(nothing_observed(spec.analysis_mask, True,
                                                 str(spec.images[0]), spec.zero_is_missing)))
    return grid, len(spec.images)


def _masks_all_empty(spec: Any, grid: Any) -> bool:
    """True when every observation mask is 0, NaN or Inf everywhere, so the fit's packing
    would find no voxel observed (its line, :func:`mpiblmm.io.ingest.nothing_observed`).
    Reads the masks in order and stops at the first with an observed voxel (usually the
    first).  (A mask non-zero only where its image is missing is found by the fit alone,
    which reads the images too.)"""
    from mpiblmm.io.images import read_mask

    for p in dict.fromkeys(spec.observation_masks):  # a mask listed twice: read once
        try:
            if read_mask(p, grid, str(spec.images[0])).any():
                return False
        except Exception:  # unreadable: said by the data's verification, not twice here
            return False
    return True


class _PackedGrid:
    """The grid of packed input: its stored voxels, and those inside the analysis mask."""

    def __init__(self, shape: tuple[int, ...], voxels: int, stored: int, masked: bool,
                 exact: bool) -> None:
        self.shape = shape
        self.voxels = voxels    # stored voxels inside the analysis mask (if any)
        self.stored = stored    # voxels the file stores
        self.masked = masked
        self.exact = exact      # a file we packed: every stored voxel is observed


# --------------------------------------------------------------------------- design
def _design(spec: Any, problems: list[str]) -> Any:
    """The design without contrasts (its first problem listed), then each contrast alone."""
    from mpiblmm.design import build_design, design_from_spec

    try:
        design = design_from_spec(replace(spec, contrasts=() if spec.contrasts is not None else None))
    except UserError as exc:
        problems.append(str(exc))
        return None
    if spec.contrasts is None:
        return design
    from mpiblmm.design import contrast_problem, spec_contrasts
    from mpiblmm.formula_table import TEXT_COLUMN

    typos = [note for note in design.notes if TEXT_COLUMN in note]

    good = []
    for i, c in enumerate(spec.contrasts):
        one = replace(spec, contrasts=(c,))
        try:
            (name, w, alt), = spec_contrasts(one, design.fixed_names)
            build_design(design.X, _factor_tuples(design), [(name, w, alt)], design.fixed_names,
                         where=f"{spec.path}: contrasts")
            good.append((name, w, alt))
        except UserError as exc:
            exc = contrast_problem(exc, design.left_out, typos)    # the fit's words
            problems.append(str(exc).replace("contrasts[0]", f"contrasts[{i}]", 1))
    return replace(build_design(design.X, _factor_tuples(design), good, design.fixed_names,
                                where=f"{spec.path}: contrasts"),
                   notes=design.notes, left_out=design.left_out)


def _factor_tuples(design: Any) -> list:
    return [(f.name, [f.labels[c] for c in f.codes], f.Z, f.effect_names) for f in design.factors]


def _thresholds(spec: Any, design: Any, n_images: int | None, problems: list[str]) -> None:
    from mpiblmm.checks import fittable_problems

    where = str(spec.path)
    n = design.n
    if n_images is not None and spec.packed is not None:
        from mpiblmm.io.ingest import rows_problem

        problem = rows_problem(spec, n_images, n)  # the fit's words
        if problem is not None:
            problems.append(str(problem))
    elif n_images is not None and n_images != n:
        problems.append(f"{where}: images: {n_images} observations but the design has {n} rows")
    # p >= n, rank-deficient X, min_n, lme4's grouping-factor checks and dependent
    # covariates Z: the fit's own checks, all of them, in its words
    problems.extend(str(problem) for problem in fittable_problems(design, spec))


def _estimable(design: Any) -> None:
    """What the fit checks of the random design before any data (a crossed remainder too
    large for the blocked estimator raises :class:`UserError`), as it does."""
    from mpiblmm.lmm.structure import choose
    from mpiblmm.pipeline import model_from_design

    choose(model_from_design(design).rd)


# --------------------------------------------------------------------------- summary
def _text_column_notes(spec: Any) -> list[str]:
    """``note: column 'age' is read as text ...`` lines of a formula spec's covariates (a
    cell such as ``2.O`` makes a numeric column a factor, as in R)."""
    if not spec.is_formula:
        return []
    from mpiblmm.formula_table import read_table, suspicious_text_columns

    return [f"note: {note}" for note in suspicious_text_columns(read_table(spec.covariates))]


def _summary(spec: Any, design: Any, candidates: tuple[int, str], ranks: int,
             words: tuple[str, str] = ("voxel", "voxels")) -> list[str]:
    from mpiblmm.io.ingest import DEFAULT_MEMORY_MB

    out = [f"spec: {spec.path} ({'formula' if spec.is_formula else 'matrix'} form)"]
    if spec.is_formula:
        out.append(f"formula: {spec.formula}")
    from mpiblmm.checks import design_notes

    out += [f"note: {note}" for note in design_notes(spec, design)]
    out.append(f"observations: n = {design.n}")
    out.append(f"fixed effects: p = {design.p}: {', '.join(design.fixed_names)}")
    out.append(f"random factors: {len(design.factors)}, q = {design.structure.q}")
    for f in design.factors:
        sizes = np.bincount(f.codes, minlength=f.n_levels)
        out.append(f"  {f.name}: {f.n_levels} levels ({sizes.min()}-{sizes.max()} observations "
                   f"each), {f.n_effects} effect(s): {', '.join(f.effect_names)}")
    out.append(f"contrasts: {len(design.contrasts)}")
    for c in design.contrasts:
        rows = "; ".join(_weights(r, design.fixed_names) for r in c.L)
        side = "" if c.kind == "F" or c.alternative == "two-sided" else f" ({c.alternative})"
        per_voxel = (" (lmerTest's type I rows: these with every observation, each voxel's "
                     "own where some are missing)") if c.sequential else ""
        out.append(f"  {c.name}: {c.kind}{side}: {rows}{per_voxel}")
    out.append(f"estimation: {spec.estimation.method}; missingness: min_n "
               f"{spec.missingness.min_n or 'auto'}, min_fraction {spec.missingness.min_fraction}")
    voxels, how = candidates
    one, unit = words                     # voxels, or a surface's vertices or grayordinates
    out.append(f"candidate {unit}: {how}")
    budget = spec.max_memory_mb or DEFAULT_MEMORY_MB
    mem, chunk = _memory(design, voxels, ranks, budget)
    over = ("; above the budget only by this count: the fit's own check of one voxel, "
            "tighter, passes" if mem > budget else "")
    out.append(f"memory per rank: at most about {mem:.0f} MiB (chunks of {chunk} {unit}; "
               f"budget {budget:.0f} MiB; the per-{one} estimate is generous, measured peaks "
               f"are often half of it or less{over})")
    fixed, ms = _chunk_cost(spec, design)
    mine = math.ceil(voxels / max(ranks, 1))                   # the largest slab's voxels
    seconds = (math.ceil(mine / max(chunk, 1)) * fixed + mine * ms) / 1000.0
    out.append(f"run time: fitting {_duration(seconds)} on {ranks} rank(s), a lower "
               f"bound (the estimator took {ms:.2f} ms per {one} and {fixed:.0f} ms per chunk "
               f"here on {_chunk_cost.voxels} simulated complete {unit}; missing data and "
               "boundary fits cost more, up to 2x in audits; start-up, packing the images, "
               "reading and writing add to it)")
    out.append("check: OK")
    return out


def _weights(row: np.ndarray, names: tuple[str, ...]) -> str:
    parts = [f"{w:+g} {n}" for w, n in zip(row, names) if w != 0]
    return " ".join(parts).lstrip("+")


def _candidates(spec: Any, grid: Any, problems: list[str]) -> tuple[int, str] | None:
    """Voxels the fit would consider: the analysis mask's, else the whole grid (an upper
    bound: voxels no image observes are dropped when the images are packed).

    Reads the analysis mask and the first image only; what the fit would refuse in them (an
    empty mask, unreadable data) is listed in ``problems`` (then ``None``)."""
    if grid is None:
        return None
    if isinstance(grid, _PackedGrid):
        where = "in the packed input" + (", inside the analysis mask" if grid.masked else "")
        if grid.exact:
            return grid.voxels, f"{grid.voxels} ({where})"
        return grid.voxels, (f"at most {grid.voxels} ({where}, of {grid.stored} stored; voxels "
                             "no observation observes are dropped)")
    from mpiblmm.io.images import grid_kind, read_volume, verify_size
    from mpiblmm.io.ingest import analysis_mask_voxels, missing
    from mpiblmm.io.surface import points

    unit = units(grid.space)[1]
    total = int(np.prod(grid.shape))
    kind = grid_kind(grid)
    if kind in ("gifti", "cifti"):
        on = f"{points(kind)} of the surface"
        where = f"all {total} {on}, no analysis mask"
    else:
        on = "on the grid"
        where = f"the grid {' x '.join(map(str, grid.shape))}, no analysis mask"
    reference = str(spec.images[0])
    try:
        verify_size(spec.images[0])  # as the fit: a short file before its grid's arrays
        inside = None
        if spec.analysis_mask is not None:
            inside = analysis_mask_voxels(spec.analysis_mask, grid, reference=reference)
            where = f"in the analysis mask, of {total} {on}"
        first = read_volume(spec.images[0], grid, reference, dtype=np.float64)
    except UserError as exc:
        problems.append(str(exc))
        return None
    if inside is None:
        inside = np.ones(grid.shape, dtype=bool)
    v = int(np.count_nonzero(inside))
    seen = int(np.count_nonzero(inside & ~missing(first, spec.zero_is_missing)))
    # (check reads the first image only: if none observes a voxel, the fit refuses them)
    why = "" if seen else (", every value 0 (missing while zero_is_missing is true), NaN or Inf"
                           if spec.zero_is_missing else ", every value NaN or Inf")
    return v, (f"at most {v} ({where}; {seen} observed in the first image{why}; {unit} no "
               "image observes are dropped)")


def _memory(design: Any, voxels: int, ranks: int, budget: float,
            base: float | None = None) -> tuple[float, int]:
    """Memory per rank and voxels per chunk, sized as the fit sizes them
    (:func:`mpiblmm.pipeline.chunk_voxels` of the budget less what a rank holds at its start,
    ``base``: this process's resident memory by default, which check measures as the fit
    does; with the blocked pattern, whose Z'Z is its non-zero blocks, not q x q)."""
    from mpiblmm.lmm.analysis import bytes_per_voxel
    from mpiblmm.lmm.structure import choose
    from mpiblmm.pipeline import chunk_voxels, model_from_design

    from mpiblmm.memory import rank_baseline_mb

    model = model_from_design(design)
    per = bytes_per_voxel(design.n, design.p, design.structure, len(design.contrasts),
                          blocks=choose(model.rd))
    mine = max(1, math.ceil(voxels / max(ranks, 1)))
    base = rank_baseline_mb() if base is None else base  # what the fit subtracts from it
    work = max(budget - base, 1.0)
    chunk = int(max(1, min(chunk_voxels(work, design.n, model), mine)))
    return base + chunk * per / 2**20 + 8.0 * design.n * chunk / 2**20, chunk


def _chunk_cost(spec: Any, design: Any) -> tuple[float, float]:
    """Fit chunks of voxels simulated from the design: ``(ms per chunk, ms per voxel)``.

    A first chunk of 4 voxels (which also pays the one-time set-up) sizes the others: as
    many voxels (64 to :data:`TIMING_VOXELS`) as take about a second, and the first quarter
    of them; the two times give the cost per voxel and the fixed cost of a chunk (a journey
    audit: one chunk of 5 voxels of a four-factor design put 189 ms on each voxel, and the
    run time 9x the fit's).
    """
    from mpiblmm.lmm.analysis import analyse_chunk
    from mpiblmm.pipeline import model_from_design, settings_from_spec

    rng = np.random.default_rng(0)
    model = model_from_design(design)
    settings = settings_from_spec(spec)

    def voxels(k: int) -> np.ndarray:
        Y = np.repeat((design.X @ rng.standard_normal(design.p))[:, None], k, axis=1)
        for f in design.factors:
            b = rng.standard_normal((f.n_levels, f.n_effects, k))
            Y += np.einsum("nq,nqv->nv", f.Z, b[f.codes])
        Y += rng.standard_normal(Y.shape)
        return np.ascontiguousarray(Y.T)  # (voxels, n), as the fit reads it

    def timed(Y: np.ndarray) -> float:
        start = time.perf_counter()
        analyse_chunk(model, Y, settings)
        return time.perf_counter() - start

    per = timed(voxels(4)) / 4
    # at least 64 voxels, as a chunk's vectorised work costs less per voxel up to dozens of
    # them (16 where 4 took over a second: a design that slow would hold check a minute)
    k = int(min(TIMING_VOXELS, max(64 if per < 0.25 else 16, 1.0 / max(per, 1e-6))))
    Y = voxels(k)
    # the small chunk's voxels are the large one's first: their own costs (a boundary fit
    # costs several regular ones) cancel in the difference
    t_small, t_large = timed(Y[:k // 4]), timed(Y)
    ms = 1000.0 * max((t_large - t_small) / (k - k // 4), 0.05 * t_large / k)
    fixed = max(1000.0 * t_small - (k // 4) * ms, 0.0)
    _chunk_cost.voxels = k
    return fixed, ms


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"
