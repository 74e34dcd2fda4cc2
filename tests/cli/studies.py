"""Turn a reference dataset (tests/reference) into an imaging study a user would bring.

Voxel ``j`` of the dataset becomes the ``j``-th grid position in C order of a small grid,
each observation a NIfTI image (NaN where missing), with the spec in matrix form.  Grid
positions beyond the dataset's voxels are never observed, so they are not candidates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GRID = (4, 5, 3)


def write_reference_study(ds, folder: Path, method: str = "REML", extra: dict | None = None) -> Path:
    """Write ``ds`` as NIfTI images + spec.json into ``folder``; return the spec path."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    n, v = ds.Y.shape
    size = int(np.prod(GRID))
    if v > size:
        raise ValueError(f"{ds.name}: {v} voxels do not fit the {GRID} grid")
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    names = []
    (folder / "img").mkdir(exist_ok=True)
    for i in range(n):
        vol = np.full(size, np.nan)  # float64: the reference data are not float32 numbers
        vol[:v] = ds.Y[i]
        name = f"img/obs{i:04d}.nii"
        nib.save(nib.Nifti1Image(vol.reshape(GRID), affine), folder / name)
        names.append(name)
    np.savetxt(folder / "X.csv", ds.X, delimiter=",", fmt="%.17g")
    random = []
    for f in ds.factors:
        (folder / f"factor_{f.name}.csv").write_text("\n".join(map(str, f.labels)) + "\n")
        np.savetxt(folder / f"Z_{f.name}.csv", f.Z, delimiter=",", fmt="%.17g")
        random.append({"name": f.name, "factor": f"factor_{f.name}.csv",
                       "design": f"Z_{f.name}.csv", "effect_names": list(f.effect_names)})
    contrasts = []
    for c in ds.contrasts:
        w = c.L[0] if c.kind == "T" else c.L
        contrasts.append({"name": c.name, "weights": np.asarray(w).tolist()})
    spec = {"images": names, "X": "X.csv", "fixed_names": list(ds.fixed_names),
            "random": random, "contrasts": contrasts, "output": "results",
            "zero_is_missing": False, "estimation": {"method": method}}
    spec.update(extra or {})
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def read_results(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a results file, by path, plus the root attributes under '@'."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...])
                     if isinstance(obj, h5py.Dataset) else None)
        out["@"] = dict(f.attrs)
    return out


def assert_same_datasets(a: dict, b: dict) -> None:
    """Two :func:`read_results` dicts hold the same datasets, bit for bit (NaN where NaN)."""
    assert set(a) == set(b)
    for key in a:
        if key == "@":
            continue
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.shape == y.shape and x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)


def voxel_order(results: dict) -> np.ndarray:
    """Dataset voxel index of each results row (C-order grid index)."""
    vox = results["voxels"].astype(np.int64)
    return np.ravel_multi_index(tuple(vox.T), GRID)
