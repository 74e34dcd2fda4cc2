"""`--max-memory-mb` is the peak resident memory per rank, interpreter included (issue 11).

Before, the budget only sized the chunks (half of it), the interpreter's ~100 MiB came on
top, and a fit with 256 MiB peaked at 270; a budget of 1 MiB ran anyway.  Now the resident
memory at the start of the fit is subtracted, a budget that leaves too little is refused
(exit 2, one line stating the minimum), and a fit at the minimum stays within it.
"""

from __future__ import annotations

import json
import re

import pytest

from .studies import read_results


@pytest.mark.spawns_mpiexec
def test_peak_memory_stays_within_the_budget(tmp_path, run_mpi, mpiblmm_command):
    study = tmp_path / "study"
    run = run_mpi(2, [*mpiblmm_command, "simulate", str(study), "--subjects", "40",
                      "--shape", "16", "16", "12"], timeout=120)
    assert run.returncode == 0, run.stderr
    fit = [*mpiblmm_command, "fit", str(study / "spec.json"), "--quiet"]

    small = run_mpi(2, [*fit, "--output", str(tmp_path / "small"), "--max-memory-mb", "20"],
                    timeout=120)
    assert small.returncode == 2, small.stderr
    lines = small.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpiblmm: error: --max-memory-mb: 20 MiB"), lines
    minimum = int(re.search(r"give at least (\d+) MiB", lines[0]).group(1))
    assert 20 < minimum < 400
    assert not (tmp_path / "small" / "results.h5").exists()

    budget = minimum + 8
    out = tmp_path / "fit"
    run = run_mpi(2, [*fit, "--output", str(out), "--max-memory-mb", str(budget)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = read_results(out / "results.h5")
    summary = json.loads(results["@"]["summary"])
    per_rank = 16 * 16 * 12 // 2
    assert summary["chunk_voxels"] < per_rank          # the budget, not the study, set the chunks
    assert max(summary["peak_memory_mb"]) <= budget, (summary, budget)
