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


@pytest.mark.spawns_mpiexec
def test_a_budget_that_cannot_hold_one_voxel_of_the_design_is_refused(tmp_path, run_mpi,
                                                                       mpiblmm_command):
    """A memory audit: subjects crossed with 1,296 raters at 160 MiB ran in chunks of one
    voxel and peaked at 194 MiB; chunks cannot be smaller, so such a budget is refused up
    front, by check and fit alike, with the minimum; --chunk-voxels above what a budget
    allows says it was capped."""
    from mpiblmm.memory import ADVICE_MARGIN_MB, ONE_VOXEL_MARGIN, one_voxel_problem

    assert one_voxel_problem(300, 200, 100, "w") is None
    problem = one_voxel_problem(200, 90, 100, "spec.json: max_memory_mb")
    assert str(problem) == (
        f"spec.json: max_memory_mb: 200 MiB per rank is too little for this design: one "
        f"voxel's fit needs about {100 * ONE_VOXEL_MARGIN:.0f} MiB (its arrays, estimated at "
        f"100 MiB, and the allocator's slack) and 90 MiB are left after what a rank holds at "
        f"its start; give at least {200 - 90 + 100 * ONE_VOXEL_MARGIN + ADVICE_MARGIN_MB:.0f} "
        f"MiB")

    study = tmp_path / "study"
    run = run_mpi(1, [*mpiblmm_command, "simulate", str(study), "--subjects", "600",
                      "--visits", "3", "--raters", "900", "--shape", "2", "2", "1"], timeout=120)
    assert run.returncode == 0, run.stderr
    spec = json.loads((study / "spec.json").read_text())
    spec["max_memory_mb"] = 190
    (study / "tight.json").write_text(json.dumps(spec))
    lines = {}
    for command in ("check", "fit"):
        job = run_mpi(2 if command == "fit" else 1,
                      [*mpiblmm_command, command, str(study / "tight.json"),
                       *(["-o", str(tmp_path / "out"), "-q"] if command == "fit" else [])],
                      timeout=300)
        assert job.returncode == 2, job.stderr
        lines[command] = [x for x in job.stderr.splitlines() if x.startswith("mpiblmm: error")]
        assert len(lines[command]) == 1, job.stderr
        assert "is too little for this design: one voxel's fit needs about" in \
            lines[command][0], lines[command]
    assert not (tmp_path / "out" / "results.h5").exists()
    least = int(re.search(r"give at least (\d+) MiB", lines["fit"][0]).group(1))
    job = run_mpi(1, [*mpiblmm_command, "fit", str(study / "spec.json"), "-o",
                      str(tmp_path / "ok"), "--max-memory-mb", str(least + 10),
                      "--chunk-voxels", "4"], timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert re.search(r"note: --chunk-voxels 4: chunks of \d voxels, the most the memory "
                     rf"budget \({least + 10} MiB per rank\) allows", job.stdout), job.stdout
    summary = json.loads(read_results(tmp_path / "ok" / "results.h5")["@"]["summary"])
    assert max(summary["peak_memory_mb"]) <= least + 10, summary
