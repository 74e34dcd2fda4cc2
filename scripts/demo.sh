#!/usr/bin/env bash
# The README's demo command: set up (if needed), simulate a small study with known truth,
# fit it with 2 MPI ranks, and print the fit summary and how close it came to the truth.
#
#   scripts/demo.sh [OUT_DIR]        (default: demo/ in the repository; re-running overwrites it)
#
# The study: 60 subjects x 4 visits on a 20 x 20 x 15 grid (6,000 voxels), a random
# intercept and slope per subject, 30% of voxels missing 1-15% of their observations.
# Its spec is in the formula form: participants.csv and y ~ age + time + (1 + time | subject).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/demo}")"
RANKS="${MPIBLMM_DEMO_RANKS:-2}"

bash "$ROOT/scripts/setup.sh"
BIN="$ROOT/.venv/bin"
rm -rf "$OUT"
echo "=== simulating a study into $OUT"
"$BIN/mpiexec" -n "$RANKS" "$BIN/mpiblmm" simulate "$OUT" --subjects 60 --visits 4 \
    --shape 20 20 15 --missing-fraction 0.3 --seed 1 --form formula
echo "=== checking the spec: mpiblmm check $OUT/spec.json"
"$BIN/mpiexec" -n "$RANKS" "$BIN/mpiblmm" check "$OUT/spec.json" --ranks "$RANKS"
echo "=== fitting it: mpiexec -n $RANKS mpiblmm fit $OUT/spec.json"
start=$(date +%s%N)
"$BIN/mpiexec" -n "$RANKS" "$BIN/mpiblmm" fit "$OUT/spec.json"
end=$(date +%s%N)
ms=$(( (end - start) / 1000000 ))
printf '=== fit wall time (launch to exit): %d.%03d s\n' $((ms / 1000)) $((ms % 1000))
echo "=== estimates against the truth the study was drawn from"
"$BIN/python" - "$OUT/results/results.h5" "$OUT/truth.h5" <<'PY'
import sys
from mpiblmm.study import compare_to_truth
for key, value in compare_to_truth(sys.argv[1], sys.argv[2]).items():
    print(f"  {key:<28} {value:10.4f}")
PY
echo "=== maps: $OUT/results/nifti/"
