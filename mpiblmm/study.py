"""Write a simulated imaging study with known truth: `mpiblmm simulate OUT_DIR`.

A study is what a user would bring: one 3-D NIfTI image per observation, the matrix-form
design files, and a ``spec.json`` ready for ``mpiblmm fit``; plus ``truth.h5`` with the
parameters every voxel was drawn from, for checking estimates.

The design is longitudinal (``subjects x visits``; fixed effects intercept, age, time; a
random intercept and slope per subject).  The truth varies smoothly over the grid, and a
fraction of voxels (default 0.2) have zero slope variance so the study has boundary fits.
The outermost ``missing_fraction`` of voxels (by distance from the grid centre, like the
edge of a brain) each miss 1-15% of their observations, written as 0 (BLMM's convention,
the spec's default ``zero_is_missing``).

Every rank draws the same data from the seed (no communication), then writes its share of
the images; rank 0 writes the small files.  The result does not depend on the rank count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .simulate import FactorSpec, simulate_design

FIXED = ("intercept", "age", "time")
CONTRASTS = [
    {"name": "time", "weights": [0, 0, 1]},
    {"name": "age", "weights": [0, 1, 0]},
    {"name": "age_or_time", "weights": [[0, 1, 0], [0, 0, 1]]},
]


@dataclass(frozen=True)
class StudyTruth:
    """Per-voxel truth of a simulated study (voxel axis first, C order over the grid)."""

    voxels: np.ndarray        # (V, 3) int
    beta: np.ndarray          # (V, p)
    sigma2: np.ndarray        # (V,)
    cov_subject: np.ndarray   # (V, 2, 2) absolute
    missing_rate: np.ndarray  # (V,) target fraction of missing observations


def _grid_truth(rng: np.random.Generator, shape: tuple[int, int, int],
                missing_fraction: float) -> StudyTruth:
    """Smooth parameter maps over the grid, boundary voxels and edge missingness."""
    idx = np.indices(shape).reshape(3, -1).T
    centre = (np.asarray(shape) - 1) / 2.0
    rel = (idx - centre) / np.maximum(centre, 1.0)          # in [-1, 1]
    radius = np.sqrt((rel**2).sum(1))
    blob = np.exp(-4.0 * ((rel - [0.3, -0.2, 0.0]) ** 2).sum(1))
    wave = np.cos(np.pi * rel[:, 0]) * np.sin(np.pi * rel[:, 1] / 2.0)
    V = idx.shape[0]
    beta = np.column_stack([1000.0 + 40.0 * wave, 4.0 * blob, 1.5 * blob - 0.5 * wave])
    sigma2 = 16.0 + 8.0 * (1.0 + wave)
    sd_int = 6.0 + 2.0 * blob
    sd_slope = np.where(rng.random(V) < 0.2, 0.0, 1.0 + 0.5 * (1.0 - blob))
    corr = 0.3 * wave
    cov = np.empty((V, 2, 2))
    cov[:, 0, 0] = sd_int**2
    cov[:, 1, 1] = sd_slope**2
    cov[:, 0, 1] = cov[:, 1, 0] = corr * sd_int * sd_slope
    order = np.argsort(-radius, kind="stable")
    missing_rate = np.zeros(V)
    n_edge = int(round(missing_fraction * V))
    missing_rate[order[:n_edge]] = rng.uniform(0.01, 0.15, n_edge)
    return StudyTruth(idx.astype(np.int32), beta, sigma2, cov, missing_rate)


def simulate_study(seed: int, subjects: int, visits: int, shape: tuple[int, int, int],
                   missing_fraction: float):
    """Draw the whole study: (design, truth, Y (n, V) float32 with 0 where missing)."""
    rng = np.random.default_rng(seed)
    design = simulate_design(rng, subjects, visits, fixed=FIXED,
                             factors=(FactorSpec("subject", effects=("intercept", "time")),))
    truth = _grid_truth(rng, shape, missing_fraction)
    f = design.factors[0]
    n, V = design.n, truth.voxels.shape[0]
    # Y = X beta + Z b + e, vectorised over voxels: b (V, l, 2) from the per-voxel covariance.
    w, U = np.linalg.eigh(truth.cov_subject)
    root = U * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
    b = np.einsum("vij,vlj->vli", root, rng.standard_normal((V, f.n_levels, 2)))
    Y = design.X @ truth.beta.T
    Y += np.einsum("nq,vnq->nv", f.Z, b[:, f.codes, :])
    Y += rng.standard_normal((n, V)) * np.sqrt(truth.sigma2)
    missing = rng.random((n, V)) < truth.missing_rate
    Y[missing] = 0.0
    return design, truth, Y.astype(np.float32)


def _write_csv(path: Path, rows: np.ndarray, fmt: str = "%.10g") -> None:
    np.savetxt(path, rows, delimiter=",", fmt=fmt)


def write_study(out_dir: str | Path, subjects: int = 60, visits: int = 4,
                shape: tuple[int, int, int] = (20, 20, 15), seed: int = 0,
                missing_fraction: float = 0.3, comm=None) -> Path:
    """Write a simulated study into ``out_dir``; return the path of its ``spec.json``."""
    import nibabel as nib

    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    out = Path(out_dir)
    design, truth, Y = simulate_study(seed, subjects, visits, shape, missing_fraction)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.asarray(shape) + 1.0
    if rank == 0:
        (out / "images").mkdir(parents=True, exist_ok=True)
    if comm is not None:
        comm.Barrier()
    names = [f"images/obs_{i:05d}.nii.gz" for i in range(design.n)]
    for i in range(rank, design.n, size):
        img = nib.Nifti1Image(Y[i].reshape(shape), affine)
        img.header.set_data_dtype(np.float32)
        nib.save(img, out / names[i])
    if rank == 0:
        (out / "images.txt").write_text("\n".join(names) + "\n")
        _write_csv(out / "X.csv", design.X)
        f = design.factors[0]
        (out / "factor_subject.csv").write_text("\n".join(f.labels) + "\n")
        _write_csv(out / "Z_subject.csv", f.Z)
        spec = {
            "images": "images.txt",
            "X": "X.csv",
            "fixed_names": list(design.fixed_names),
            "random": [{"name": "subject", "factor": "factor_subject.csv",
                        "design": "Z_subject.csv", "effect_names": ["intercept", "time"]}],
            "contrasts": CONTRASTS,
            "output": "results",
        }
        (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        _write_truth(out / "truth.h5", truth, shape, affine, design.fixed_names)
    if comm is not None:
        comm.Barrier()
    return out / "spec.json"


def _write_truth(path: Path, truth: StudyTruth, shape, affine, names) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["grid_shape"] = np.asarray(shape)
        h5.attrs["affine"] = affine
        h5["voxels"] = truth.voxels
        h5["beta"] = truth.beta
        h5["beta"].attrs["names"] = json.dumps(list(names))
        h5["sigma2"] = truth.sigma2
        h5["random/subject/cov"] = truth.cov_subject
        h5["missing_rate"] = truth.missing_rate


def run_simulate(args) -> int:
    """`mpiblmm simulate OUT_DIR ...`: write a study; every rank takes part."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    spec = write_study(args.out_dir, subjects=args.subjects, visits=args.visits,
                       shape=tuple(args.shape), seed=args.seed,
                       missing_fraction=args.missing_fraction, comm=comm)
    if comm.Get_rank() == 0:
        print(f"mpiblmm: simulated study written; fit it with: mpiblmm fit {spec}")
    return 0


def compare_to_truth(results_path: str | Path, truth_path: str | Path) -> dict[str, float]:
    """How close a fit of a simulated study came to the truth it was drawn from.

    Returns, over voxels with a fit: correlation and RMSE of each beta map against the true
    one, median ratio of estimated to true sigma^2 and random-effect variances, and the share
    of fitted voxels.
    """
    import h5py

    with h5py.File(results_path, "r") as r, h5py.File(truth_path, "r") as t:
        grid = tuple(int(s) for s in t.attrs["grid_shape"])
        index = np.ravel_multi_index(tuple(r["voxels"][...].T.astype(np.int64)), grid)
        tindex = np.ravel_multi_index(tuple(t["voxels"][...].T.astype(np.int64)), grid)
        pos = np.searchsorted(tindex, index)
        fitted = r["status"][...] <= 2
        names = json.loads(t["beta"].attrs["names"])
        out: dict[str, float] = {"voxels": float(index.size),
                                 "fitted_share": float(fitted.mean())}
        beta, tbeta = r["beta"][...][fitted], t["beta"][...][pos][fitted]
        for j, name in enumerate(names):
            out[f"beta_{name}_corr"] = float(np.corrcoef(beta[:, j], tbeta[:, j])[0, 1])
            out[f"beta_{name}_rmse"] = float(np.sqrt(np.mean((beta[:, j] - tbeta[:, j]) ** 2)))
        s2 = r["sigma2"][...][fitted] / t["sigma2"][...][pos][fitted]
        out["sigma2_ratio_median"] = float(np.median(s2))
        cov, tcov = r["random/subject/cov"][...][fitted], t["random/subject/cov"][...][pos][fitted]
        out["var_intercept_ratio_median"] = float(np.median(cov[:, 0, 0] / tcov[:, 0, 0]))
    return out
