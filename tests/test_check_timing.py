"""`mpiblmm check`'s run time: a chunk's cost is a fixed part and a part per voxel, and both are
taken from two chunks of the same simulated voxels (a journey audit: one chunk of 5 voxels of
a four-factor design put its fixed cost on each voxel, and the run time was 9x the fit's).
The clock is the test's: a chunk of k voxels "takes" 20 ms + 0.5 ms x k."""

from __future__ import annotations

import pytest

from mpiblmm import check
from mpiblmm.design import design_from_spec
from mpiblmm.spec import load_spec
from mpiblmm.study import write_study


def test_the_chunk_cost_splits_into_fixed_and_per_voxel(tmp_path, monkeypatch):
    path = write_study(tmp_path, subjects=6, visits=2, shape=(2, 2, 1), seed=1)
    spec = load_spec(path)
    design = design_from_spec(spec)
    import mpiblmm.lmm.analysis as analysis

    clock = [0.0]
    sizes = []

    def fake(model, Y, settings):
        sizes.append(Y.shape[0])
        clock[0] += 0.020 + 0.0005 * Y.shape[0]

    monkeypatch.setattr(analysis, "analyse_chunk", fake)
    monkeypatch.setattr(check.time, "perf_counter", lambda: clock[0])
    fixed, ms = check._chunk_cost(spec, design)
    assert sizes[0] == 4 and sizes[2] >= 64 and sizes[1] == sizes[2] // 4
    assert check._chunk_cost.voxels == sizes[2]
    assert fixed == pytest.approx(20.0) and ms == pytest.approx(0.5)
