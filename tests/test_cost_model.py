"""scripts/cost_model.py (docs/SCALING.md): its counts follow the code's layout rules; checked
by hand for the UK Biobank-sized study at 512 ranks."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model_script",
                                                  REPO_ROOT / "scripts" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _options(cost_model, argv=()):
    return cost_model.parser().parse_args(list(argv))


def test_uk_biobank_counts_at_512_ranks(cost_model):
    rows = dict(cost_model.model(cost_model.UKB, _options(cost_model)))
    assert rows["voxels / images per rank"] == "450 / 79"        # ceil(230000/512), ceil(40000/512)
    assert rows["packed.h5 (n x V float32), written once"] == "36.8 GB"   # 40000*230000*4
    assert rows["fit: read per rank (its slab)"] == "72 MB"      # 450*40000*4
    # chunks of 2^20 // (4*40000) = 6 voxels -> ceil(230000/6) = 38,334
    assert rows["packed.h5 chunks"].startswith("38,334 chunks of 6 voxels")
    # bytes_per_voxel: 8*(4n + 8*(p^2 + qp + L q1^2 + q) + m^2 p^2 + 6c) + 4096, q = 32,000
    per_voxel = 8 * (4 * 40000 + 8 * (16 + 128000 + 64000 + 32000) + 16 * 16 + 18) + 4096
    assert rows["working memory per voxel (bytes_per_voxel, generous)"] == \
        f"{per_voxel / 1e6:.3g} MB"
    assert rows["chunk at --max-memory-mb 1600 / chunks per rank"] == "53 voxels / 9"


def test_the_model_matches_the_library_memory_rule(cost_model):
    import numpy as np

    from mpiblmm.lmm.analysis import bytes_per_voxel
    from mpiblmm.lmm.products import random_design

    codes = np.repeat(np.arange(500), 2)  # 500 subjects x 2 visits, q1 = 2
    Z = np.column_stack([np.ones(1000), np.arange(1000) % 2])
    structure = random_design([codes], [Z]).structure
    small = cost_model.Study("small", n=1000, V=100, grid=100, levels=(500,), q=(2,), p=4,
                             contrasts=("T", "T", "F"), image_mb=0.01)
    rows = dict(cost_model.model(small, _options(cost_model, ["--ranks", "1"])))
    expected = bytes_per_voxel(1000, 4, structure, 3)
    assert rows["working memory per voxel (bytes_per_voxel, generous)"] == \
        cost_model.fmt_bytes(expected)
