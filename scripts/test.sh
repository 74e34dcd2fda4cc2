#!/usr/bin/env bash
# Run mpiblmm's tests: the serial suite (everything under tests/ except tests/mpi), then
# tests/mpi under `mpiexec -n 1`, `-n 2` and `-n 3`. This is the README's test command and
# what CI runs (.ci/run).
#
#   scripts/test.sh                       # everything
#   scripts/test.sh -x -k slab            # extra pytest arguments go to every run
#   scripts/test.sh tests/cli tests/mpi   # only these paths (tests/mpi/* paths run under MPI)
#
# Brings up .venv with scripts/setup.sh first (about a second when it is up to date).
# Every run is under `timeout`, so a hung MPI test fails instead of blocking CI.
# Environment: MPIEXEC / MPIEXEC_NUMPROC_FLAG (launcher, default .venv/bin/mpiexec -n),
# MPIBLMM_TEST_RANKS (default "1 2 3"), MPIBLMM_SERIAL_TIMEOUT (s, default 2400),
# MPIBLMM_MPI_TIMEOUT (s per run, default 900), MPIBLMM_TEST_TIMEOUT (s per MPI test, 120).
# Exit status: 0 if every run passed, 5 if no run collected any test, else 1.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh || {
    echo "test.sh: scripts/setup.sh failed; see the message above" >&2
    exit 1
}

PY="$ROOT/.venv/bin/python"
read -r -a LAUNCHER <<<"${MPIEXEC:-$ROOT/.venv/bin/mpiexec}"
NP_FLAG="${MPIEXEC_NUMPROC_FLAG:--n}"
RANKS="${MPIBLMM_TEST_RANKS:-1 2 3}"
SERIAL_TIMEOUT="${MPIBLMM_SERIAL_TIMEOUT:-2400}"
MPI_TIMEOUT="${MPIBLMM_MPI_TIMEOUT:-900}"
export PYTHONUNBUFFERED=1
export MPIEXEC="${LAUNCHER[*]}" MPIEXEC_NUMPROC_FLAG="$NP_FLAG" # for tests that spawn jobs

# Split the arguments into test paths (serial or MPI) and pytest options.
SERIAL_PATHS=()
MPI_PATHS=()
OPTIONS=()
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        case "$(realpath --relative-to="$ROOT" "${arg%%::*}")" in
            tests/mpi | tests/mpi/*) MPI_PATHS+=("$arg") ;;
            *) SERIAL_PATHS+=("$arg") ;;
        esac
    else
        OPTIONS+=("$arg")
    fi
done
if [[ ${#SERIAL_PATHS[@]} -eq 0 && ${#MPI_PATHS[@]} -eq 0 ]]; then
    SERIAL_PATHS=(tests)
    MPI_PATHS=(tests/mpi)
fi

REPORTS="$(mktemp -d "${TMPDIR:-/tmp}/mpiblmm-tests.XXXXXX")"
trap 'rm -rf "$REPORTS"' EXIT
SUMMARY=()
FAILED=0
RAN_SOMETHING=0
TOTAL_PASSED=0
TOTAL_FAILED=0

# record NAME RC LOGFILE TIMEOUT: interpret one run's exit status and pytest summary line.
record() {
    local name="$1" rc="$2" log="$3" limit="$4" line passed failed errors
    line="$(grep -E '^=+ .*( in [0-9.]+s).* =+$' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
    passed="$(grep -oE '[0-9]+ passed' <<<"$line" | grep -oE '[0-9]+' || echo 0)"
    failed="$(grep -oE '[0-9]+ failed' <<<"$line" | grep -oE '[0-9]+' || echo 0)"
    errors="$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '[0-9]+' || echo 0)"
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed + errors))
    case "$rc" in
        0) RAN_SOMETHING=1; SUMMARY+=("ok      $name: $line") ;;
        5) SUMMARY+=("empty   $name: no tests collected") ;;
        124 | 137) FAILED=1; TOTAL_FAILED=$((TOTAL_FAILED + 1))
            SUMMARY+=("TIMEOUT $name: killed after ${limit} s (a hung test?)") ;;
        *) FAILED=1; RAN_SOMETHING=1
            [[ "$failed$errors" == 00 ]] && TOTAL_FAILED=$((TOTAL_FAILED + 1))
            SUMMARY+=("FAILED  $name (exit $rc): ${line:-no pytest summary}") ;;
    esac
}

if [[ ${#SERIAL_PATHS[@]} -gt 0 ]]; then
    echo "=== serial tests: pytest ${SERIAL_PATHS[*]} (without tests/mpi)"
    log="$REPORTS/serial.log"
    timeout -k 10 "$SERIAL_TIMEOUT" "$PY" -m pytest "${SERIAL_PATHS[@]}" --ignore=tests/mpi \
        "${OPTIONS[@]}" 2>&1 | tee "$log"
    record "serial" "${PIPESTATUS[0]}" "$log" "$SERIAL_TIMEOUT"
fi

if [[ ${#MPI_PATHS[@]} -gt 0 ]]; then
    for n in $RANKS; do
        echo "=== MPI tests at $n rank(s): ${LAUNCHER[*]} $NP_FLAG $n pytest ${MPI_PATHS[*]}"
        log="$REPORTS/mpi-$n.log"
        MPIBLMM_MPI_TEST_LOGDIR="$REPORTS/mpi-$n" timeout -k 10 "$MPI_TIMEOUT" \
            "${LAUNCHER[@]}" "$NP_FLAG" "$n" "$PY" -m pytest "${MPI_PATHS[@]}" \
            -p no:cacheprovider "${OPTIONS[@]}" 2>&1 | tee "$log"
        rc="${PIPESTATUS[0]}"
        record "mpi -n $n" "$rc" "$log" "$MPI_TIMEOUT"
        if [[ "$rc" != 0 && "$rc" != 5 ]]; then
            for rank_log in "$REPORTS/mpi-$n"/rank-*.log; do
                [[ -s "$rank_log" ]] || continue
                case "$rank_log" in
                    *-fatal.log) echo "--- $(basename "$rank_log" .log) of the $n-rank run (first 60 lines):"
                        head -n 60 "$rank_log" ;;
                    *) echo "--- $(basename "$rank_log" .log) of the $n-rank run (last 40 lines):"
                        tail -n 40 "$rank_log" ;;
                esac
            done
        fi
    done
fi

echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
if [[ $FAILED != 0 ]]; then
    echo "test.sh: FAILED"
    echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
    exit 1
fi
if [[ $RAN_SOMETHING == 0 ]]; then
    echo "test.sh: no tests were collected"
    exit 5
fi
echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
