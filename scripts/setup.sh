#!/usr/bin/env bash
# Set up mpiblmm's environment: .venv at the repository root with mpi4py built against the
# site's MPI and h5py built against the site's parallel HDF5.
#
# Idempotent and quiet: one line per step, details in .venv/setup.log; a re-run with an
# unchanged pyproject.toml, set-up script and MPI/HDF5 choice returns in about a second.
#
# Which MPI and HDF5 (first match wins):
#   MPI : $MPICC; else `mpicc` on PATH (e.g. after `module load`); else, on Debian/Ubuntu as
#         root only, `apt-get install libhdf5-mpich-dev` (brings MPICH).
#   HDF5: $HDF5_DIR; else the prefix reported by a parallel `h5pcc` on PATH; else Debian's
#         /usr/lib/<multiarch>/hdf5/<mpich|openmpi> matching the MPI; else apt as above.
#   Launcher: $MPIEXEC; else the mpiexec beside $MPICC. It is linked as .venv/bin/mpiexec.
# Other knobs: PYTHON (default python3), MPIBLMM_SKIP_MPI_CHECK=1 on login nodes where
# `mpiexec -n 2` may not run (then run `mpiexec -n 2 .venv/bin/mpiblmm env` in a job).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOG="$VENV/setup.log"
STAMP="$VENV/.mpiblmm-setup-stamp"
PYTHON="${PYTHON:-python3}"
BUILD_CFLAGS="-O2 -g0" # pip's default -O3 -g took >20 GB of memory building mpi4py here

step() { printf 'setup: %s\n' "$*"; }

die() {
    printf 'setup: FAILED: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    if [[ -f "$LOG" ]]; then
        printf '  last lines of %s:\n' "$LOG" >&2
        tail -n 25 "$LOG" | sed 's/^/    /' >&2
    fi
    exit 1
}

# Run a command with its output in the log; on failure show the log's tail.
run_logged() {
    local what="$1"
    shift
    printf '\n### %s\n$ %s\n' "$what" "$*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        die "$what" "command: $*"
    fi
}

is_debian_root() {
    [[ -f /etc/debian_version ]] && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null
}

multiarch() {
    gcc -print-multiarch 2>/dev/null || dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu
}

hdf5_is_parallel() { # $1 = HDF5 prefix
    local conf
    for conf in "$1/include/H5pubconf.h" "$1/include/"*/H5pubconf.h; do
        [[ -f "$conf" ]] && grep -q '^#define H5_HAVE_PARALLEL 1' "$conf" && return 0
    done
    return 1
}

mpi_flavour() { # $1 = mpicc; prints mpich, openmpi or unknown
    local show
    show="$("$1" -show 2>/dev/null || "$1" --showme 2>/dev/null || true)"
    case "$show" in
        *mpich*) echo mpich ;;
        *openmpi* | *open-mpi*) echo openmpi ;;
        *) echo unknown ;;
    esac
}

find_mpicc() {
    if [[ -n "${MPICC:-}" ]]; then
        command -v "$MPICC"
    elif command -v mpicc >/dev/null; then
        command -v mpicc
    fi
}

find_hdf5_dir() { # $1 = MPI flavour
    if [[ -n "${HDF5_DIR:-}" ]]; then
        echo "$HDF5_DIR"
        return
    fi
    if command -v h5pcc >/dev/null; then
        local prefix
        prefix="$(h5pcc -showconfig 2>/dev/null | sed -n 's/^ *Installation point: *//p' | head -n 1)"
        if [[ -n "$prefix" ]] && hdf5_is_parallel "$prefix"; then
            echo "$prefix"
            return
        fi
    fi
    local base
    base="/usr/lib/$(multiarch)/hdf5"
    if [[ -d "$base/$1" ]]; then
        echo "$base/$1"
    fi
}

find_mpiexec() { # $1 = mpicc
    if [[ -n "${MPIEXEC:-}" ]]; then
        command -v "$MPIEXEC"
        return
    fi
    local real dir name suffix
    real="$(readlink -f "$1")"
    dir="$(dirname "$real")"
    name="$(basename "$real")"
    suffix="${name#mpicc}" # Debian: mpicc.mpich -> .mpich
    for candidate in "$dir/mpiexec$suffix" "$dir/mpiexec" "$(dirname "$1")/mpiexec"; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
    command -v mpiexec
}

# ---------------------------------------------------------------- choose MPI and HDF5
MPICC_PATH="$(find_mpicc || true)"
if [[ -n "${MPICC:-}" && -z "$MPICC_PATH" ]]; then
    die "MPICC=$MPICC is not an executable" "set MPICC to your MPI's C compiler wrapper"
fi
FLAVOUR="unknown"
[[ -n "$MPICC_PATH" ]] && FLAVOUR="$(mpi_flavour "$MPICC_PATH")"
HDF5_PREFIX="$(find_hdf5_dir "$FLAVOUR" || true)"
if [[ -n "$HDF5_PREFIX" ]] && ! hdf5_is_parallel "$HDF5_PREFIX"; then
    [[ -n "${HDF5_DIR:-}" ]] && die "HDF5_DIR=$HDF5_DIR is not a parallel HDF5 (H5_HAVE_PARALLEL missing)" \
        "point HDF5_DIR at an MPI build of HDF5 (e.g. module load hdf5-parallel)"
    HDF5_PREFIX=""
fi

if [[ -z "$MPICC_PATH" || -z "$HDF5_PREFIX" ]]; then
    if ! is_debian_root; then
        die "no MPI compiler and parallel HDF5 found" \
            "load your site's modules (e.g. module load mpi hdf5-parallel) or set MPICC and HDF5_DIR," \
            "or on Debian/Ubuntu as root: apt-get install libhdf5-mpich-dev pkg-config"
    fi
    step "installing MPICH and parallel HDF5 with apt (libhdf5-mpich-dev)"
    mkdir -p "$VENV"
    export DEBIAN_FRONTEND=noninteractive
    run_logged "apt-get update" apt-get update -q
    run_logged "apt-get install" apt-get install -y -q --no-install-recommends \
        libhdf5-mpich-dev mpich pkg-config
    MPICC_PATH="$(command -v mpicc.mpich)"
    FLAVOUR=mpich
    HDF5_PREFIX="/usr/lib/$(multiarch)/hdf5/mpich"
    hdf5_is_parallel "$HDF5_PREFIX" || die "apt installed libhdf5-mpich-dev but $HDF5_PREFIX is not parallel"
fi
MPIEXEC_PATH="$(find_mpiexec "$MPICC_PATH" || true)"
[[ -n "$MPIEXEC_PATH" ]] || die "no launcher found for $MPICC_PATH (MPIEXEC=${MPIEXEC:-unset})" \
    "set MPIEXEC to your site's launcher (mpiexec, srun, ...)"

# ---------------------------------------------------------------- test tools
# Headless Chromium loads the `mpiblmm report` page in tests/report (tests only; a fit never
# needs it).  Cheap when present; only on Debian/Ubuntu as root is it installed.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if is_debian_root; then
        step "installing chromium with apt (for the report test)"
        mkdir -p "$VENV"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q --no-install-recommends chromium >>"$LOG" 2>&1; then
            run_logged "apt-get update" apt-get update -q
            run_logged "apt-get install chromium" apt-get install -y -q --no-install-recommends chromium
        fi
    else
        step "warning: no chromium on PATH: tests/report will fail (install Chromium to run it)"
    fi
fi

# ---------------------------------------------------------------- fast path
stamp_key() {
    {
        cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/scripts/setup.sh"
        echo "$MPICC_PATH $HDF5_PREFIX $MPIEXEC_PATH"
        "$PYTHON" --version 2>&1
    } | sha256sum | cut -d' ' -f1
}
# Bytecode of mpiblmm's own modules, written ahead as a non-editable pip install does: with
# PYTHONDONTWRITEBYTECODE set (common in batch and CI environments) every process of every
# rank would otherwise compile the package from source, ~0.15 s per start.  Stale files are
# detected by Python and ignored, so this is safe after edits; re-run on every setup call.
compile_bytecode() {
    "$VENV/bin/python" -m compileall -q -j 0 "$ROOT/mpiblmm" >/dev/null ||
        step "warning: could not write bytecode for $ROOT/mpiblmm (start-up is slower)"
}

# The man page, from the argparse parser of the sources as they are now: on every setup
# call, as the bytecode, so a `git pull` then `scripts/setup.sh` does not keep the old page.
write_manpage() {
    mkdir -p "$VENV/share/man/man1"
    run_logged "man page" "$VENV/bin/python" -m mpiblmm.manpage "$VENV/share/man/man1/mpiblmm.1"
}

KEY="$(stamp_key)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" && -x "$VENV/bin/python" ]] &&
    "$VENV/bin/python" -c 'import h5py, mpi4py, mpiblmm, sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
    compile_bytecode
    write_manpage
    step ".venv is up to date (MPI: $MPICC_PATH, HDF5: $HDF5_PREFIX)"
    exit 0
fi

# ---------------------------------------------------------------- build
start=$SECONDS
step "MPI compiler $MPICC_PATH ($FLAVOUR), launcher $MPIEXEC_PATH, parallel HDF5 $HDF5_PREFIX"
if [[ ! -x "$VENV/bin/python" ]]; then
    step "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed" "install python3-venv (Debian) or load a Python module"
fi
rm -f "$STAMP"
: >"$LOG"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
py_ok() { "$VENV/bin/python" -c "$1" >/dev/null 2>&1; }
export PIP_NO_INPUT=1

step "installing numpy, scipy, nibabel, pytest and build tools"
run_logged "pip upgrade" "${PIP[@]}" install -q --upgrade pip
run_logged "base packages" "${PIP[@]}" install -q numpy scipy nibabel threadpoolctl \
    "argparse-manpage[setuptools]>=4.5" pytest "Cython>=3" pkgconfig "setuptools>=77" wheel


# mpi4py and h5py are rebuilt unless the record of what they were built against matches
# (mpi4py 4 no longer reports its mpicc).
BUILT="$VENV/.mpiblmm-built-against"
built_with() { grep -qxF "$1=$2" "$BUILT" 2>/dev/null; }
remember() { grep -v "^$1=" "$BUILT" 2>/dev/null >"$BUILT.new" || true; echo "$1=$2" >>"$BUILT.new"; mv "$BUILT.new" "$BUILT"; }

if built_with mpi4py "$MPICC_PATH" && py_ok "from mpi4py import MPI"; then
    step "mpi4py already built against $MPICC_PATH"
else
    step "building mpi4py against $MPICC_PATH (about 3 minutes)"
    # --no-cache-dir: a cached wheel may have been built against another MPI.
    MPICC="$MPICC_PATH" CFLAGS="$BUILD_CFLAGS" run_logged "build mpi4py" \
        "${PIP[@]}" install -q --no-cache-dir --force-reinstall --no-deps --no-binary mpi4py mpi4py
    remember mpi4py "$MPICC_PATH"
fi

if built_with h5py "$HDF5_PREFIX $MPICC_PATH" && py_ok "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)"; then
    step "h5py already built with MPI against $HDF5_PREFIX"
else
    step "building h5py with MPI against $HDF5_PREFIX (about 2 minutes)"
    CC="$MPICC_PATH" CFLAGS="$BUILD_CFLAGS" HDF5_MPI=ON HDF5_DIR="$HDF5_PREFIX" run_logged "build h5py" \
        "${PIP[@]}" install -q --no-cache-dir --force-reinstall --no-deps --no-binary h5py --no-build-isolation h5py
    remember h5py "$HDF5_PREFIX $MPICC_PATH"
fi

step "installing mpiblmm (editable, with test extra) and its man page"
# A wrapper, not a symlink: MPICH's hydra finds its helpers beside its own path.
rm -f "$VENV/bin/mpiexec"
printf '#!/bin/sh\n# The launcher that matches the MPI mpi4py was built with (scripts/setup.sh).\nexec %q "$@"\n' \
    "$MPIEXEC_PATH" >"$VENV/bin/mpiexec"
chmod +x "$VENV/bin/mpiexec"
run_logged "install mpiblmm" "${PIP[@]}" install -q --no-build-isolation -e "$ROOT[test]"
compile_bytecode
write_manpage

# ---------------------------------------------------------------- checks
step "checking h5py MPI support and a 2-rank MPI run"
"$VENV/bin/python" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)' ||
    die "h5py was built without MPI" \
        "rebuild: rm -rf .venv && HDF5_DIR=<parallel HDF5 prefix> MPICC=<mpicc> scripts/setup.sh"
if [[ "${MPIBLMM_SKIP_MPI_CHECK:-0}" != 1 ]]; then
    # Rank 0 prints "<size> <distinct ranks>": one line, whatever the launcher does to output.
    ranks="$(timeout 60 "$VENV/bin/mpiexec" -n 2 "$VENV/bin/python" -c \
        'from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.gather(c.Get_rank()); c.Get_rank() or print(c.Get_size(), len(set(r)))' \
        2>>"$LOG" | tr -s ' \n' ' ')" || true
    if [[ "$ranks" != "2 2 " ]]; then
        die "\`mpiexec -n 2\` did not give two distinct ranks (got size and distinct ranks: ${ranks:-nothing})" \
            "mpi4py is built against $MPICC_PATH but was launched with $MPIEXEC_PATH;" \
            "set MPIEXEC to the launcher of that MPI (or MPICC to the MPI of your launcher)," \
            "then: rm -rf .venv && scripts/setup.sh   (MPIBLMM_SKIP_MPI_CHECK=1 skips this on login nodes)"
    fi
fi

echo "$KEY" >"$STAMP"
step "done in $((SECONDS - start)) s; try: .venv/bin/mpiexec -n 2 .venv/bin/mpiblmm env"
