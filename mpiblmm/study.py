"""Write a simulated imaging study with known truth: `mpiblmm simulate OUT_DIR`.

A study is what a user would bring: one 3-D NIfTI image per observation, the matrix-form
design files, and a ``spec.json`` ready for ``mpiblmm fit``; plus ``truth.h5`` with the
parameters every voxel was drawn from, for checking estimates.

The design is longitudinal (``subjects x visits``; fixed effects intercept, age, time; a
random intercept and slope per subject).  Optional grouping factors make it nested or
crossed: ``sites`` (subjects nested in sites), ``families`` (subjects nested in families,
families in sites when both are given), ``raters`` (each observation rated by one rater,
crossed with subjects); ``slopes`` names the factors with a random time slope (default the
subject).  ``form="formula"`` writes the spec in the formula form (``participants.csv`` and
an lme4 formula) instead of the matrix form.  The truth varies smoothly over the grid, and a
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
class Grouping:
    """Extra grouping factors of a simulated study (none: the longitudinal default)."""

    sites: int = 0
    families: int = 0
    raters: int = 0
    slopes: tuple[str, ...] = ("subject",)

    def factor_specs(self) -> tuple[FactorSpec, ...]:
        """The factors in the order :func:`simulate_design` makes them (parents first)."""
        def effects(name: str) -> tuple[str, ...]:
            return ("intercept", "time") if name in self.slopes else ("intercept",)

        out = []
        if self.sites:
            out.append(FactorSpec("site", effects("site"), n_levels=self.sites, prefix="site"))
        if self.families:
            per = max(1, round(self.families / self.sites)) if self.sites else self.families
            out.append(FactorSpec("family", effects("family"), n_levels=per,
                                  nested_in="site" if self.sites else None, prefix="family"))
        out.append(FactorSpec("subject", effects=effects("subject")))
        if self.raters:
            out.append(FactorSpec("rater", effects("rater"), n_levels=self.raters,
                                  assign="observation", prefix="rater"))
        return tuple(out)

    def formula_order(self) -> tuple[str, ...]:
        """The factors in the written spec: subject first, then family, site, rater."""
        names = ["subject"]
        names += ["family"] if self.families else []
        names += ["site"] if self.sites else []
        names += ["rater"] if self.raters else []
        return tuple(names)


DEFAULT_GROUPING = Grouping()


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
                   missing_fraction: float, grouping: Grouping = DEFAULT_GROUPING):
    """Draw the whole study: (design, truth, Y (n, V) float32 with 0 where missing, extra
    covariances {factor: (V, q, q)} of the factors other than the subject)."""
    rng = np.random.default_rng(seed)
    design = simulate_design(rng, subjects, visits, fixed=FIXED,
                             factors=grouping.factor_specs())
    truth = _grid_truth(rng, shape, missing_fraction)
    f = design.factor("subject")
    n, V = design.n, truth.voxels.shape[0]
    cov_subject = truth.cov_subject[:, :f.n_effects, :f.n_effects]
    # Y = X beta + Z b + e, vectorised over voxels: b (V, l, q) from the per-voxel covariance.
    w, U = np.linalg.eigh(cov_subject)
    root = U * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
    b = np.einsum("vij,vlj->vli", root, rng.standard_normal((V, f.n_levels, f.n_effects)))
    Y = design.X @ truth.beta.T
    Y += np.einsum("nq,vnq->nv", f.Z, b[:, f.codes, :])
    extra = {}
    for g in design.factors:
        if g.name == "subject":
            continue
        extra[g.name] = cov = _extra_covariance(truth, g.name, g.n_effects)
        sd = np.sqrt(np.einsum("vqq->vq", cov))           # diagonal covariances
        b = sd[:, None, :] * rng.standard_normal((V, g.n_levels, g.n_effects))
        Y += np.einsum("nq,vnq->nv", g.Z, b[:, g.codes, :])
    Y += rng.standard_normal((n, V)) * np.sqrt(truth.sigma2)
    missing = rng.random((n, V)) < truth.missing_rate
    Y[missing] = 0.0
    return design, truth, Y.astype(np.float32), extra


#: Standard deviations of the extra factors' intercepts and slopes (scaled over the grid).
EXTRA_SD = {"site": (4.0, 0.5), "family": (3.0, 0.4), "rater": (2.5, 0.6)}


def _extra_covariance(truth: StudyTruth, name: str, q: int) -> np.ndarray:
    """(V, q, q) diagonal covariance of an extra factor, varying smoothly over the grid."""
    scale = np.sqrt(truth.sigma2 / truth.sigma2.mean())
    sd = np.asarray(EXTRA_SD[name][:q])[None, :] * scale[:, None]
    return np.einsum("vq,qr->vqr", sd**2, np.eye(q))


def _write_csv(path: Path, rows: np.ndarray, fmt: str = "%.10g") -> None:
    np.savetxt(path, rows, delimiter=",", fmt=fmt)


def write_study(out_dir: str | Path, subjects: int = 60, visits: int = 4,
                shape: tuple[int, int, int] = (20, 20, 15), seed: int = 0,
                missing_fraction: float = 0.3, comm=None,
                grouping: Grouping = DEFAULT_GROUPING, form: str = "matrix") -> Path:
    """Write a simulated study into ``out_dir``; return the path of its ``spec.json``."""
    import nibabel as nib

    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    out = Path(out_dir)
    design, truth, Y, extra = simulate_study(seed, subjects, visits, shape, missing_fraction,
                                             grouping)
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
        order = grouping.formula_order()
        if form == "formula":
            spec = _write_formula_form(out, design, order)
        else:
            spec = _write_matrix_form(out, design, order)
        (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        _write_truth(out / "truth.h5", truth, shape, affine, _fit_names(design, form),
                     design.factor("subject").n_effects, extra)
    if comm is not None:
        comm.Barrier()
    return out / "spec.json"


def _write_matrix_form(out: Path, design, order: tuple[str, ...]) -> dict:
    """X.csv, factor_<f>.csv and Z_<f>.csv per factor, and the matrix-form spec."""
    _write_csv(out / "X.csv", design.X)
    random = []
    for name in order:
        f = design.factor(name)
        (out / f"factor_{name}.csv").write_text("\n".join(f.labels) + "\n")
        _write_csv(out / f"Z_{name}.csv", f.Z)
        random.append({"name": name, "factor": f"factor_{name}.csv",
                       "design": f"Z_{name}.csv", "effect_names": list(f.effect_names)})
    return {
        "images": "images.txt",
        "X": "X.csv",
        "fixed_names": list(design.fixed_names),
        "random": random,
        "contrasts": CONTRASTS,
        "output": "results",
    }


#: The contrasts of the formula form, by coefficient name.
FORMULA_CONTRASTS = [
    {"name": "time", "weights": {"time": 1}},
    {"name": "age", "weights": {"age": 1}},
    {"name": "age_or_time", "weights": [{"age": 1}, {"time": 1}]},
]


def _write_formula_form(out: Path, design, order: tuple[str, ...]) -> dict:
    """participants.csv (one row per image) and the formula-form spec."""
    cov = design.covariates
    columns = {"subject": design.factor("subject").labels}
    for name in order[1:]:
        columns[name] = design.factor(name).labels
    columns["visit"] = cov["visit"] + 1
    rows = [",".join(columns) + "\n"]
    for i in range(design.n):
        cells = [str(columns[k][i]) for k in columns]
        cells += [f"{cov['age'][i]:.10g}", f"{cov['time'][i]:.10g}"]
        rows.append(",".join(cells) + "\n")
    rows[0] = rows[0].rstrip("\n") + ",age,time\n"
    (out / "participants.csv").write_text("".join(rows))
    bars = []
    for name in order:
        f = design.factor(name)
        bars.append(f"(1 + time | {name})" if f.n_effects == 2 else f"(1 | {name})")
    return {
        "images": "images.txt",
        "covariates": "participants.csv",
        "formula": "y ~ age + time + " + " + ".join(bars),
        "contrasts": FORMULA_CONTRASTS,
        "output": "results",
    }


def _fit_names(design, form: str) -> dict[str, tuple[str, ...]]:
    """beta's and each factor's effect names as the fit of the written spec names them in
    ``results.h5``: the matrix form's own names, or the formula's (``(Intercept)``)."""
    def named(names):
        return tuple("(Intercept)" if form == "formula" and n == "intercept" else n
                     for n in names)

    out = {"beta": named(design.fixed_names)}
    out.update({f"random/{f.name}/cov": named(f.effect_names) for f in design.factors})
    return out


def _write_truth(path: Path, truth: StudyTruth, shape, affine, names: dict,
                 q_subject: int = 2, extra: dict | None = None) -> None:
    """truth.h5 in results.h5's layout: ``beta``, ``sigma2`` and ``random/<f>/cov`` per
    voxel, each with the fit's ``names`` (a string array, as in ``results.h5``)."""
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["grid_shape"] = np.asarray(shape)
        h5.attrs["affine"] = affine
        h5["voxels"] = truth.voxels
        h5["beta"] = truth.beta
        h5["sigma2"] = truth.sigma2
        h5["random/subject/cov"] = truth.cov_subject[:, :q_subject, :q_subject]
        for name, cov in (extra or {}).items():
            h5[f"random/{name}/cov"] = cov
        for key, labels in names.items():
            if key in h5:
                h5[key].attrs["names"] = np.array(list(labels), dtype=h5py.string_dtype())
        h5["missing_rate"] = truth.missing_rate


def run_simulate(args) -> int:
    """`mpiblmm simulate OUT_DIR ...`: write a study; every rank takes part."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    grouping = Grouping(sites=getattr(args, "sites", 0) or 0,
                        families=getattr(args, "families", 0) or 0,
                        raters=getattr(args, "raters", 0) or 0,
                        slopes=tuple(getattr(args, "slopes", None) or ("subject",)))
    unknown = [s for s in grouping.slopes if s not in ("subject", "site", "family", "rater", "none")
               or (s != "none" and s not in grouping.formula_order())]
    if unknown:
        from mpiblmm.errors import UserError

        raise UserError(f"--slopes: no factor {unknown[0]!r} in this study (factors: "
                        f"{', '.join(grouping.formula_order())}; or 'none')")
    spec = write_study(args.out_dir, subjects=args.subjects, visits=args.visits,
                       shape=tuple(args.shape), seed=args.seed,
                       missing_fraction=args.missing_fraction, comm=comm, grouping=grouping,
                       form=getattr(args, "form", "matrix") or "matrix")
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
        names = _names(t["beta"].attrs["names"])
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


def _names(attr) -> list[str]:
    """A names attribute: a string array (as results.h5), or JSON text (earlier truth files)."""
    if isinstance(attr, (str, bytes)):
        return list(json.loads(attr))
    return [x.decode() if isinstance(x, bytes) else str(x) for x in attr]
