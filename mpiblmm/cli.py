"""The ``mpiblmm`` command line: the argparse parser and dispatch to the subcommands.

This module must import neither mpi4py nor h5py at module level: argparse-manpage imports
it to build the man page, and importing mpi4py initialises MPI.  Handlers import what they
need when they run.  Every subcommand runs inside :func:`mpiblmm.parallel.run_guarded`, so a
:class:`~mpiblmm.errors.UserError` becomes one line on stderr and exit code 2 on every rank,
and any other exception aborts the whole MPI job.

Standard output whose reader has gone (``mpiblmm check spec.json | head -1``, ``mpiblmm env |
true``) is :class:`QuietWhenClosed`: what is still printed is dropped, the command runs to its
end and exits with the code it would have had, no traceback.  A fit whose output pipe closes
so keeps working and releases its lock.  (Under MPICH's ``mpiexec`` piped into ``head`` it is
the launcher whose reader goes: ``mpiexec`` dies of it and kills the ranks, which nothing in
them can prevent; the lock they leave is stale and the next fit replaces it.)

Dispatch targets (written by the pipeline/IO work; each takes the argparse namespace and
returns an exit code):

- ``fit``      -> ``mpiblmm.pipeline.run_fit(args)``
- ``export``   -> ``mpiblmm.io.export.run_export(args)``
- ``simulate`` -> ``mpiblmm.study.run_simulate(args)``
- ``report``   -> ``mpiblmm.report.run_report(args)``
- ``env``      -> ``mpiblmm.envreport.run_env(args)``
- ``check``    -> ``mpiblmm.check.run_check(args)``
- ``schema``   -> ``mpiblmm.schema.run_schema(args)``
- ``convert-blmm`` -> ``mpiblmm.blmm_convert.run_convert(args)``
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from mpiblmm import __version__
from mpiblmm.allocator import keep_freed_memory
from mpiblmm.errors import USER_ERROR_EXIT_CODE, UserError, warn_unwritable
from mpiblmm.interrupt import MAX_GRACE_SECONDS

#: Variables that pin BLAS/OpenMP to one thread per rank unless the user set them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Subcommand name -> (module, function) it dispatches to.
DISPATCH = {
    "env": ("mpiblmm.envreport", "run_env"),
    "fit": ("mpiblmm.pipeline", "run_fit"),
    "export": ("mpiblmm.io.export", "run_export"),
    "simulate": ("mpiblmm.study", "run_simulate"),
    "check": ("mpiblmm.check", "run_check"),
    "schema": ("mpiblmm.schema", "run_schema"),
    "convert-blmm": ("mpiblmm.blmm_convert", "run_convert"),
    "report": ("mpiblmm.report", "run_report"),
}


class CommandLineError(SystemExit):
    """A bad command line (unknown option, bad value, options that exclude each other).

    Raised by the parser instead of printing argparse's usage and error and exiting: under
    ``mpiexec -n N`` every rank parses the same arguments, so that text came out N times.
    :func:`main` reports it as one line, ``mpiblmm: error: <command>: <problem>``, printed by
    rank 0, and exit code 2 on every rank.  A :class:`SystemExit` with code 2, so a caller of
    ``get_parser().parse_args`` that does not catch it still exits as argparse would.

    Parameters
    ----------
    prog
        The parser that refused the arguments (``mpiblmm`` or ``mpiblmm fit``, ...).
    problem
        argparse's message, e.g. ``argument --chunk-voxels: expected a number of at least
        1, got 0``.
    """

    def __init__(self, prog: str, problem: str) -> None:
        super().__init__(USER_ERROR_EXIT_CODE)
        self.prog = prog
        self.problem = problem

    def __str__(self) -> str:
        command = self.prog.split(None, 1)[1] if " " in self.prog else ""
        where = f"{command}: " if command else ""
        return f"{where}{self.problem} (see `{self.prog} --help`)"


#: Environment variables in which MPI launchers tell a process its rank (MPICH's Hydra and
#: Intel MPI, Open MPI, PMIx, MVAPICH2, Slurm's srun), read before MPI is initialised.
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK",
                           "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def launcher_rank() -> int | None:
    """This process's rank as its launcher says (``None`` when not launched as one of
    several), without initialising MPI: ``--help`` and ``--version`` need no MPI."""
    for name in LAUNCHER_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are a :class:`CommandLineError` (its subparsers too:
    ``add_subparsers`` makes them of the parser's class), and whose ``--help`` and
    ``--version`` text is printed by rank 0 only: under ``mpiexec -n N`` every process parses
    the same arguments, and the text came out N times."""

    def error(self, message: str) -> NoReturn:
        if {"--resume", "--overwrite"} <= set(message.replace(":", " ").split()):
            # After a stop the line says "run the same command with --resume"; a command
            # that had --overwrite then has both, which exclude each other.
            message += "; to continue a stopped fit, replace --overwrite with --resume"
        raise CommandLineError(self.prog, message)

    def _print_message(self, message: str, file=None) -> None:
        # argparse prints help, usage and version through this one method
        if launcher_rank() in (None, 0):
            super()._print_message(message, file)


def get_parser() -> argparse.ArgumentParser:
    """Build the ``mpiblmm`` argument parser (also used by argparse-manpage).

    Returns
    -------
    argparse.ArgumentParser
        The parser with one subparser per subcommand; ``args.command`` names the one chosen.
    """
    parser = _Parser(
        prog="mpiblmm",
        description=(
            "Fit voxel-wise linear mixed models to neuroimaging studies in one MPI job, "
            "e.g. `mpirun -n 512 mpiblmm fit spec.json`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mpiblmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser(
        "env",
        help="report MPI, HDF5, h5py and BLAS set-up; fail if the launcher and mpi4py disagree",
        description=(
            "Report what a user needs to trust the installation: MPI vendor and version, "
            "the number of ranks, h5py/HDF5 versions and MPI support, numpy's BLAS and its "
            "thread count. Exits non-zero if the job was launched as several processes but "
            "MPI sees only one (mpi4py built against a different MPI than the mpiexec used)."
        ),
    )

    fit = sub.add_parser(
        "fit",
        help="fit the model described by a spec file at every voxel",
        description="Fit the linear mixed model described by SPEC at every voxel of the mask.",
    )
    fit.add_argument("spec", metavar="SPEC", help="the analysis spec (JSON)")
    fit.add_argument(
        "--output", "-o", metavar="DIR",
        help="output folder, relative to the current folder (default: the spec's \"output\", "
             "relative to the spec's folder)"
    )
    fit.add_argument(
        "--max-memory-mb",
        type=_memory_mb,
        metavar="MB",
        help="memory budget per rank, in MiB, used to size voxel chunks "
        "(default: the spec's max_memory_mb, else 2048)",
    )
    fit.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors")
    # -- progress and logs (mpiblmm/progress.py) --
    fit.add_argument(
        "--log-file",
        metavar="FILE",
        help="also append rank 0's lines (progress, summary, a stopped fit's --resume line) "
             "to FILE; written even with --quiet",
    )
    fit.add_argument(
        "--progress-interval",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines for the whole job (default 10; 0: start and end only)",
    )
    fit.add_argument(
        "--rank-logs",
        metavar="DIR",
        help="write one log per rank (its slab, chunks and phases) as DIR/rank-NNNNN.log",
    )
    existing = fit.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the fit whose results.h5 is in the output folder (same spec and data, "
        "any number of ranks): only voxels not yet done are fitted; with no results.h5 yet, "
        "a new fit (so a batch job can always pass it)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results already in the output folder (without --resume or "
        "--overwrite, existing results are refused)",
    )
    fit.add_argument(
        "--grace-seconds",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="after SIGTERM/SIGINT, seconds a rank may still spend on the chunk in hand before "
        "abandoning it (default 30); the job then exits with code 3: rerun with --resume",
    )
    fit.add_argument(
        "--chunk-voxels",
        type=_positive_int,
        metavar="N",
        help="at most N voxels per chunk (default: as many as the memory budget allows); "
        "chunks are the checkpoints of --resume",
    )

    export = sub.add_parser(
        "export",
        help="write the maps (NIfTI, or GIfTI/CIFTI for surface studies) from a results file",
        description=(
            "Write the maps stored in RESULTS_H5 into DIR, in the input's format: NIfTI "
            "(.nii.gz) with the input's qform/sform codes, or .func.gii / .dscalar.nii for "
            "surface studies; plus mask, z and (with --fdr) q-value maps, and maps.json."
        ),
    )
    export.add_argument("results", metavar="RESULTS_H5", help="results file written by `fit`")
    export.add_argument(
        "out_dir", metavar="DIR", nargs="?",
        help="output folder (default: the folder nifti/ beside RESULTS_H5)",
    )
    export.add_argument(
        "--fdr", action="store_true",
        help="also write con_<name>_q: Benjamini-Hochberg FDR q-values over the fitted voxels",
    )

    report = sub.add_parser(
        "report",
        help="write an HTML report with figures of a results file",
        description=(
            "Write one self-contained HTML page (report.html, figures embedded as PNG) about "
            "RESULTS_H5: contrast maps, voxel status and counts, the analysis mask, n per "
            "voxel, iterations, df ranges and time per phase. Reads the results file (and the "
            "mean image of packed.h5 beside it, when present); recomputes no statistics."
        ),
    )
    report.add_argument("results", metavar="RESULTS_H5", help="results file written by `fit`")
    report.add_argument(
        "--out", metavar="DIR",
        help="folder for report.html (default: the folder report/ beside RESULTS_H5)",
    )
    report.add_argument(
        "--background", metavar="IMAGE",
        help="NIfTI image on the study grid to draw the maps over "
        "(default: the mean of the observations, from packed.h5 beside RESULTS_H5)",
    )

    simulate = sub.add_parser(
        "simulate",
        help="write a simulated longitudinal study with known truth",
        description="Simulate a study (images, design table and spec) with known parameters.",
    )
    simulate.add_argument("out_dir", metavar="OUT_DIR",
                          help="folder to write the study into: a new or empty one")
    simulate.add_argument("--subjects", type=_positive_int, default=60,
                          help="number of subjects (default: %(default)s)")
    simulate.add_argument("--visits", type=_positive_int, default=4,
                          help="visits per subject (default: %(default)s)")
    simulate.add_argument(
        "--shape",
        type=_positive_int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=(20, 20, 15),
        help="image shape in voxels (default: 20 20 15)",
    )
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    simulate.add_argument(
        "--missing-fraction",
        type=_fraction,
        default=0.3,
        metavar="F",
        help="fraction of voxels, the outermost, that miss 1-15%% of their observations "
        "(default: %(default)s)",
    )
    simulate.add_argument("--sites", type=_positive_int, default=0, metavar="N",
                          help="subjects nested in N sites (a random intercept per site)")
    simulate.add_argument("--families", type=_positive_int, default=0, metavar="N",
                          help="subjects nested in about N families (in the sites, if given)")
    simulate.add_argument("--raters", type=_positive_int, default=0, metavar="N",
                          help="each observation rated by one of N raters (crossed with subjects)")
    simulate.add_argument("--slopes", nargs="+", metavar="FACTOR", default=None,
                          help="factors with a random time slope besides their intercept "
                               "(subject, site, family, rater; 'none'); default: subject")
    simulate.add_argument("--form", choices=("matrix", "formula"), default="matrix",
                          help="write the spec in the matrix form (X.csv, factor and Z files; "
                               "the default) or the formula form (participants.csv and an lme4 "
                               "formula)")
    _add_spec_tools(sub)
    return parser


def _add_spec_tools(sub: argparse._SubParsersAction) -> None:
    """`check`, `schema` and `convert-blmm`: the spec's tools, none of which fits."""
    check = sub.add_parser(
        "check",
        help="validate a spec without fitting and print the model summary",
        description=(
            "Validate everything a fit would (files, grids, tables, formula, design rank, "
            "contrasts, factor levels, thresholds) without fitting. Prints the model summary "
            "(n, p and the coefficient names, factors, contrasts, candidate voxels, memory "
            "per rank, rough run time) and exits 0, or lists every problem, one per line, "
            "and exits 2."
        ),
    )
    check.add_argument("spec", metavar="SPEC", help="the analysis spec (JSON)")
    check.add_argument("--ranks", type=_positive_int, metavar="N",
                       help="ranks to estimate memory and run time for (default: this job's)")

    sub.add_parser(
        "schema",
        help="print the JSON Schema of the spec (both forms)",
        description="Print the JSON Schema the spec is validated against, for editors.",
    )

    convert = sub.add_parser(
        "convert-blmm",
        help="turn a BLMM configuration (YAML) into a spec",
        description=(
            "Convert a BLMM configuration file into an equivalent mpiblmm spec; print it, or "
            "write it with --output. Every BLMM option without an equivalent is listed on "
            "stderr."
        ),
    )
    convert.add_argument("config", metavar="CONFIG", help="BLMM's blmm_config.yml")
    convert.add_argument("--output", "-o", metavar="SPEC",
                         help="write the spec here (relative paths are rewritten for it)")


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {_short(text)!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _memory_mb(text: str) -> int:
    """argparse type of ``--max-memory-mb``: a whole number of MiB from 1 to the spec's
    :data:`~mpiblmm.spec.MAX_MEMORY_MB` (a larger budget overflows the byte counts the
    chunks are sized with)."""
    from mpiblmm.spec import MAX_MEMORY_MB

    value = _positive_int(text)
    if value > MAX_MEMORY_MB:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_MEMORY_MB} MiB (1 PiB) per rank, got {_short(text)}")
    return value


#: The longest ``--grace-seconds`` and ``--progress-interval``: one week, longer than any batch
#: job's time limit.  ``signal.setitimer`` (the grace timer) refuses about 9.3e9 s with an
#: OverflowError, raised inside the signal handler.
MAX_SECONDS = int(MAX_GRACE_SECONDS)


def _finite_float(text: str, positive: bool) -> float:
    """argparse type: a number greater than 0 (``positive``) or at least 0, and at most
    :data:`MAX_SECONDS` (the options of this type are durations)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0.0 if positive else value >= 0.0) or value == float("inf"):
        what = "a positive number" if positive else "a number of at least 0"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_SECONDS} seconds (one week), got {_short(text)}")
    return value


def _short(text: str, width: int = 40) -> str:
    """A value from the command line, cut for an error line (``1`` and 400 zeros)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _non_negative_float(text: str) -> float:
    """argparse type: a number of at least 0 (and at most :data:`MAX_SECONDS`)."""
    return _finite_float(text, positive=False)


def _positive_float(text: str) -> float:
    """argparse type: a number greater than 0 (and at most :data:`MAX_SECONDS`)."""
    return _finite_float(text, positive=True)


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


class QuietWhenClosed:
    """``sys.stdout`` that stops printing, quietly, once its reader has closed the pipe.

    The usual CLI rule for a broken pipe (EPIPE: ``mpiblmm env | head -1``): the output is not
    wanted any more, which is no error of the command.  On the first :class:`BrokenPipeError`
    the stream's file descriptor is pointed at ``/dev/null`` (so the interpreter's own last
    flush cannot fail either) and every later write is dropped; the command goes on.
    Any other write error (a full disk under ``> fit.out``) does the same after one warning
    on stderr: a batch job's output is never worth its results.
    Everything else is the wrapped stream's.

    Standard error is wrapped too, with ``what=None``: no warning (there is nowhere left to
    print one), so a user error under ``2>/dev/full`` still ends with exit code 2, not with
    the OSError of printing its line.
    """

    def __init__(self, stream, what: str | None = "standard output") -> None:
        self._stream = stream
        self._what = what
        self._dropped = False

    def write(self, text: str) -> int:
        if self._dropped:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
        except OSError as exc:
            self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if self._dropped:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        if self._what is not None:
            warn_unwritable(self._what, exc)
        self._to_devnull()

    def _to_devnull(self) -> None:
        self._dropped = True
        self._point_at_devnull()

    def _point_at_devnull(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's capture)
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def pin_blas_threads(environ: dict | None = None) -> None:
    """Set one BLAS/OpenMP thread per rank unless the user chose otherwise.

    ``OMP_NUM_THREADS``, where set (a batch script's ``$SLURM_CPUS_PER_TASK``), is the
    choice for the libraries' own variables not set: OpenBLAS and MKL read those first, so
    setting them to 1 beside it had left the user's ``OMP_NUM_THREADS=4`` without effect.
    Must run before numpy is imported: BLAS reads these variables when it loads.
    """
    environ = os.environ if environ is None else environ
    threads = environ.get("OMP_NUM_THREADS", "").strip()
    # only a whole number of at least 1 is a choice: OpenBLAS takes "0", "abc" or "2.0" as
    # unset and runs a thread per core in every rank
    threads = threads if threads.isdigit() and 0 < int(threads) <= 4096 else "1"
    for name in THREAD_VARIABLES:
        environ.setdefault(name, threads)


def check_inputs_exist(args: argparse.Namespace) -> None:
    """Raise :class:`UserError` if a file named on the command line does not exist.

    Cheap checks that need no MPI; the handlers validate contents.
    """
    if args.command in ("fit", "check"):
        _require_file(args.spec, "SPEC")
    elif args.command == "convert-blmm":
        _require_file(args.config, "CONFIG")
    elif args.command in ("export", "report"):
        _require_file(args.results, "RESULTS_H5")
    elif args.command == "simulate":
        _require_known_slopes(args)
        _require_output_folder(args.out_dir, "OUT_DIR")


def _require_known_slopes(args: argparse.Namespace) -> None:
    """``simulate --slopes``: only factors of the study (as ``study.run_simulate`` checks, but
    here every rank agrees on it, so it is printed once)."""
    factors = ["subject"] + [name for name, n in (("family", args.families),
                                                  ("site", args.sites),
                                                  ("rater", args.raters)) if n]
    unknown = [s for s in (args.slopes or ()) if s != "none" and s not in factors]
    if unknown:
        raise UserError(f"--slopes: no factor {unknown[0]!r} in this study (factors: "
                        f"{', '.join(factors)}; or 'none')")


def _require_output_folder(path: str, what: str) -> None:
    """Create the folder ``simulate`` writes into (and its ``images/``), on every rank at once,
    so a path that is a file, under a file, not writable, or a folder that already holds
    files is a user error before the study is simulated; the study writer then finds its
    folders in place."""
    from mpiblmm.io import make_dirs

    if not str(path).strip():
        raise UserError("is empty: name the folder to write the study into", what)
    make_dirs(path, what)
    _require_no_study_there(Path(path), what)
    make_dirs(Path(path) / "images", what)


def _require_no_study_there(folder: Path, what: str) -> None:
    """Refuse a folder that holds anything but an empty ``images/``: simulating into an
    earlier study replaced some of its files and left the rest (30 old images beside the 9
    of a new images.txt), a study that is neither.  An empty ``images/`` is no study: the
    other ranks, which run this at the same time, may have made it already."""
    try:
        entries = list(folder.iterdir())
        if [e.name for e in entries] == ["images"] and not entries[0].is_symlink():
            if not entries[0].is_dir():
                return  # a file named images: make_dirs says what is wrong with it
            entries = list(entries[0].iterdir())
    except OSError as exc:
        raise UserError(f"cannot read the folder {folder} ({exc.strerror or exc})", what) from None
    if entries:
        raise UserError(f"{folder} is not empty: choose a new or empty folder (simulate writes "
                        "a whole study and would mix it with the files already there)", what)


def _require_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        from mpiblmm.spec import not_a_file

        raise UserError(f"{what} {not_a_file(Path(path))}")


def resolve_handler(command: str) -> Callable[[argparse.Namespace], int]:
    """Import and return the function a subcommand dispatches to.

    Raises
    ------
    UserError
        If that part of mpiblmm is not available in this installation.
    """
    module_name, function_name = DISPATCH[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # a dependency of the module is missing: a real installation problem
        raise UserError(
            f"`mpiblmm {command}` is not available in this version ({module_name} is missing)"
        ) from None
    handler = getattr(module, function_name, None)
    if handler is None:
        raise UserError(
            f"`mpiblmm {command}` is not available in this version "
            f"({module_name}.{function_name} is missing)"
        )
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``mpiblmm`` command; return its exit code (the console script is :func:`run`).

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The process exit code: 0 on success, 2 for a user error (on every rank).
    """
    pin_blas_threads()
    stdout, stderr = sys.stdout, sys.stderr
    # A closed reader or a full disk ends the printing, not the command.  (A stream that is
    # None, no standard output at all, is left alone: print() already drops its lines.)
    if stdout is not None:
        sys.stdout = QuietWhenClosed(stdout)
    if stderr is not None:
        sys.stderr = QuietWhenClosed(stderr, what=None)
    try:
        return _main_quiet_when_closed(argv)
    finally:
        for stream in (sys.stdout, sys.stderr):  # what is still buffered, while still quiet
            if isinstance(stream, QuietWhenClosed):
                stream.flush()
        sys.stdout, sys.stderr = stdout, stderr


def _main_quiet_when_closed(argv: Sequence[str] | None) -> int:
    """:func:`main` with ``sys.stdout`` a :class:`QuietWhenClosed`."""
    try:
        args = get_parser().parse_args(argv)
    except CommandLineError as exc:
        return _command_line_error(exc)
    keep_freed_memory()
    if args.command not in ("fit", "export"):
        return _main(args)
    # SIGTERM/SIGINT ask for a clean stop from now on (also during the imports of _main).
    from mpiblmm import interrupt

    interrupt.install(getattr(args, "grace_seconds", interrupt.DEFAULT_GRACE_SECONDS))
    try:
        return _main(args)
    finally:
        interrupt.uninstall()


def _command_line_error(exc: CommandLineError) -> int:
    """Report a bad command line once (rank 0); exit code 2 on every rank.

    Every rank parsed the same arguments and failed the same way, so all of them take part
    in the agreement and none waits for another.
    """
    try:
        from mpi4py import MPI
    except ImportError:  # no MPI at all: this process is the whole job
        try:
            print(f"mpiblmm: error: {exc}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr unwritable: the exit code still says it
            pass
        return USER_ERROR_EXIT_CODE
    from mpiblmm.parallel import agree_on_user_error, run_guarded

    comm = MPI.COMM_WORLD
    return run_guarded(lambda: agree_on_user_error(comm, UserError(str(exc))), comm)


def _main(args: argparse.Namespace) -> int:
    """:func:`main` after parsing: MPI, the launcher check, and the guarded handler."""
    # Imported here, not at module level: importing mpi4py initialises MPI.
    from mpi4py import MPI

    from mpiblmm.parallel import (
        LAUNCHER_MISMATCH_EXIT_CODE,
        agree_on_user_error,
        launcher_mismatch,
        run_guarded,
        say,
    )

    comm = MPI.COMM_WORLD
    mismatch = launcher_mismatch(comm)
    if mismatch and args.command != "env":  # `env` reports it in full
        say(f"mpiblmm: error: {mismatch}")
        return LAUNCHER_MISMATCH_EXIT_CODE

    def job() -> int:
        problem = None
        try:
            check_inputs_exist(args)
            handler = resolve_handler(args.command)
        except UserError as exc:
            problem = exc
        agree_on_user_error(comm, problem)  # every rank raises together, or none does
        return handler(args)

    return run_guarded(job, comm)


def run() -> None:
    """The ``mpiblmm`` console script: :func:`main`, then a fast exit of the process.

    Kept apart from :func:`main`, which returns its code so tests can call it in-process.
    """
    code = main()
    from mpiblmm.parallel import exit_now

    exit_now(code)


if __name__ == "__main__":
    run()
