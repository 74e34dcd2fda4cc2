"""Small synthetic NIfTI studies and MPI test helpers shared by the io tests.

:func:`all_ranks_pass` gathers every rank's failure (with its message) so all ranks fail or
pass together; the shared folder and communicator come from ``tests/mpi/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

GRID = (4, 5, 3)
AFFINE = np.array([[2.0, 0, 0, -4], [0, 2.0, 0, -5], [0, 0, 2.5, 1], [0, 0, 0, 1]])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def make_study(folder: Path, n: int = 7, seed: int = 0, with_masks: bool = False,
               bad_affine: tuple[int, ...] = ()) -> dict:
    """Write n images with zeros, NaN, Inf, an all-zero voxel; optional masks.

    Returns paths: ``images``, ``observation_masks`` (or None), ``analysis_mask`` (or None).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        data = rng.normal(10, 2, size=GRID).astype(np.float32)
        data[0, 0, 0] = 0.0                  # never observed when zero is missing
        data[1, 1, 1] = np.nan if i % 2 else 0.0
        data[2, 2, i % 3] = np.inf if i % 3 == 0 else data[2, 2, i % 3]
        data[3, 4, 2] = 0.0 if i < n - 1 else 5.0   # observed only in the last image
        if i == 1:
            data[0, 1, 0] = 0.0
        affine = AFFINE.copy()
        if i in bad_affine:
            affine[0, 3] += 1.0
        suffix = ".nii.gz" if i % 2 == 0 else ".nii"
        images.append(save(folder / f"img{i}{suffix}", data, affine))
        if with_masks:
            m = (rng.uniform(size=GRID) > 0.2).astype(np.uint8)
            masks.append(save(folder / f"mask{i}.nii.gz", m))
    analysis = None
    if with_masks:
        a = np.ones(GRID, dtype=np.int16)
        a[:, :, 0] = 0
        a[1, 0, 1] = 0
        analysis = save(folder / "analysis.nii.gz", a)
    return {"images": images, "observation_masks": masks or None, "analysis_mask": analysis}


def reference(study: dict, zero_is_missing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Serial nibabel read: (voxels (V, 3), Y (n, V) float32 with NaN for missing)."""
    import nibabel as nib

    rows = []
    for i, p in enumerate(study["images"]):
        d = np.asarray(nib.load(str(p)).get_fdata(), dtype=np.float32)
        miss = ~np.isfinite(d)
        if zero_is_missing:
            miss |= d == 0
        if study["observation_masks"] is not None:
            m = np.asarray(nib.load(str(study["observation_masks"][i])).get_fdata())
            miss |= m == 0
        rows.append(np.where(miss, np.nan, d).reshape(-1))
    Y = np.stack(rows)
    keep = np.isfinite(Y).any(axis=0)
    if study["analysis_mask"] is not None:
        keep &= np.asarray(nib.load(str(study["analysis_mask"])).get_fdata()).reshape(-1) != 0
    flat = np.flatnonzero(keep)
    voxels = np.column_stack(np.unravel_index(flat, GRID)).astype(np.int32)
    return voxels, Y[:, flat]


# --------------------------------------------------------------------------- MPI
def all_ranks_pass(comm: Any, check: Callable[[], None]) -> None:
    """Run ``check`` on every rank; fail on every rank if it failed on any."""
    try:
        check()
        mine = None
    except Exception as exc:  # noqa: BLE001 - reported below on every rank
        mine = f"{type(exc).__name__}: {exc}"
    failures = [(r, m) for r, m in enumerate(comm.allgather(mine)) if m is not None]
    assert not failures, f"failed on ranks: {failures}"
