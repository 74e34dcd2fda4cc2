"""What a report shows, read from ``results.h5`` (and ``packed.h5`` beside it, if present).

Only reads and re-expresses stored values (z from the stored -log10 p, as the maps do); no
model is fitted and no test recomputed.  Everything lands in one :class:`ReportData`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpiblmm.errors import UserError
from mpiblmm.io.derived import NOT_ANALYSED_MEANING, STATUS_NOT_ANALYSED
from mpiblmm.io.export import FITTED_MAX_STATUS, contrast_z, volume
from mpiblmm.io.results import foreign_file_problem, refuse_missing_datasets, stored_parts
from mpiblmm.io.images import UNITS
from mpiblmm.lmm.model import dropped_column_voxels


#: (singular, plural) name of one element of a study, by the input format.
#: Where :attr:`ReportData.n_total` comes from when the fit recorded it.
INPUT_PARTS_SOURCE = "the fit's record in results.h5"


@dataclass
class ContrastView:
    """One contrast: its kind, z per voxel, and its df range over fitted voxels."""

    name: str
    kind: str
    alternative: str
    z: np.ndarray                     # (V,)
    df: np.ndarray                    # (V,) T: df; F: df_den
    df_num: float | None = None
    df_num_fewer: int = 0             # fitted voxels with a smaller df_num (columns dropped)
    weights: np.ndarray | None = None  # (r, p) as stored (attribute weights)


@dataclass
class FactorView:
    """One random factor: its effects and each effect's variance over the fitted voxels."""

    name: str
    effects: tuple[str, ...]
    variances: np.ndarray              # (V, q): the diagonal of random/<name>/cov


@dataclass
class ReportData:
    """Per-voxel arrays (V,) of the candidate voxels and the facts of the run."""

    path: Path
    grid_shape: tuple[int, int, int]
    voxels: np.ndarray
    status: np.ndarray
    n: np.ndarray
    iterations: np.ndarray
    codes: dict[int, str]
    counts: dict[int, int]
    summary: dict[str, Any]
    method: str
    contrasts: list[ContrastView]
    space_format: str = "nifti"
    n_total: int | None = None          # observations in the study (None: not known)
    n_total_source: str = ""
    background: np.ndarray | None = None  # grid-shaped, or None
    background_source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    dropped_columns: int = 0            # fitted voxels with NaN in beta (lme4's dropped columns)
    affine: np.ndarray | None = None    # (4, 4) voxel to world, None when not stored
    fixed_names: tuple[str, ...] = ()
    formula: str = ""                   # the spec's formula ('' for the matrix form)
    factors: list[FactorView] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """What one element of the study is called, plural: voxels, vertices or grayordinates."""
        return UNITS.get(self.space_format, UNITS["nifti"])[1]

    @property
    def unit1(self) -> str:
        """What one element of the study is called, singular."""
        return UNITS.get(self.space_format, UNITS["nifti"])[0]

    @property
    def fitted(self) -> np.ndarray:
        return self.status <= FITTED_MAX_STATUS

    @property
    def is_surface(self) -> bool:
        return self.space_format in ("gifti", "cifti")

    def grid(self, values: np.ndarray, fill: Any = None) -> np.ndarray:
        """Per-voxel values on the grid (NaN / 0 / ``fill`` outside the candidates)."""
        return volume(values, self.voxels, self.grid_shape, fill)

    def status_grid(self) -> np.ndarray:
        return self.grid(self.status, STATUS_NOT_ANALYSED)


def _open(path: Path):
    import h5py

    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"not a readable results file ({exc})", str(path)) from None


def load_report_data(results: Path, background: Path | None = None) -> ReportData:
    """Read everything the report draws.  Raises :class:`UserError` for an unusable file."""
    results = Path(results)
    if not results.is_file():
        raise UserError("file not found", str(results))
    with _open(results) as f:
        if (problem := foreign_file_problem(f, results)) is not None:
            raise problem
        if not bool(f.attrs.get("complete", False)):
            raise UserError("the results are incomplete (attribute 'complete' is not true): the "
                            "fit did not finish; re-run `mpiblmm fit` on the spec with --resume "
                            "to finish it (the voxels done are kept)", str(results))
        for name in ("voxels", "status", "n", "iterations"):
            if name not in f:
                raise UserError(f"not a results file: dataset {name!r} is missing", str(results))
        refuse_missing_datasets(f, results, "the report cannot be made")
        status = np.asarray(f["status"][...])
        dropped = dropped_column_voxels(f["beta"][...], status) if "beta" in f else 0
        codes = {int(k): v for k, v in json.loads(f["status"].attrs.get("codes", "{}")).items()}
        codes[STATUS_NOT_ANALYSED] = NOT_ANALYSED_MEANING
        contrasts = []
        groups = f.get("contrasts", {})
        # in the spec's order (attribute order; files without it: by name, as HDF5 lists)
        for name in sorted(groups, key=lambda k: int(groups[k].attrs.get("order", -1))):
            g = f[f"contrasts/{name}"]
            kind = str(g.attrs.get("kind", "F" if "F" in g else "T"))
            alt = str(g.attrs.get("alternative", "two-sided"))
            z = contrast_z(g)
            df = np.asarray(g["df"][...] if "df" in g else g["df_den"][...])
            df_num, fewer = _df_num(g, status) if "df_num" in g else (None, 0)
            weights = np.atleast_2d(np.asarray(g.attrs["weights"], dtype=np.float64)) \
                if "weights" in g.attrs else None
            contrasts.append(ContrastView(name, kind, alt, z, df, df_num, fewer, weights))
        factors = [FactorView(name, tuple(_names(f[f"random/{name}/cov"])),
                              np.diagonal(np.asarray(f[f"random/{name}/cov"][...]),
                                          axis1=1, axis2=2))
                   for name in f.get("random", {}) if "cov" in f[f"random/{name}"]]
        space = str(f.attrs.get("space", ""))
        data = ReportData(
            path=results,
            grid_shape=tuple(int(s) for s in f.attrs["grid_shape"]),  # type: ignore[arg-type]
            voxels=np.asarray(f["voxels"][...], dtype=np.int64),
            status=status, n=np.asarray(f["n"][...]), iterations=np.asarray(f["iterations"][...]),
            codes=codes,
            counts={int(k): int(v) for k, v in json.loads(f.attrs.get("status_counts", "{}")).items()},
            summary=json.loads(f.attrs.get("summary", "{}") or "{}"),
            method=str(f.attrs.get("method", "")),
            contrasts=contrasts,
            space_format=json.loads(space).get("format", "nifti") if space else "nifti",
            dropped_columns=dropped,
            fixed_names=tuple(_names(f["beta"])) if "beta" in f else (),
            formula=_formula(f.attrs.get("spec", "")),
            factors=factors,
            affine=np.asarray(f.attrs["affine"], dtype=np.float64) if "affine" in f.attrs else None,
        )
        data.n_total = _recorded_observations(f)
        if data.n_total is not None:
            data.n_total_source = INPUT_PARTS_SOURCE
    data.counts = data.counts or {int(k): int(v) for k, v in zip(*np.unique(status, return_counts=True))}
    _add_packed(data, results.parent / "packed.h5")
    if background is not None and data.is_surface:  # (it was read, and then not drawn)
        raise UserError(f"a surface study's maps are plotted by {data.unit1} index, over no "
                        "image: leave --background out", str(background))
    if background is not None:
        from mpiblmm.io.images import read_volume

        data.background = read_volume(Path(background), None, dtype=np.float64)
        if data.background.shape != data.grid_shape:
            raise UserError(f"background shape {data.background.shape} differs from the study "
                            f"grid {data.grid_shape}", str(background))
        _same_affine(Path(background), data)
        data.background_source = str(background)
    if data.n_total is None:  # a results file from before fits recorded input_parts
        data.n_total = int(data.n.max()) if data.n.size else 0
        data.n_total_source = "the largest n of any voxel (packed.h5 not found)"
    return data


def _names(dataset: Any) -> list[str]:
    """A dataset's ``names`` attribute as text (empty when it has none)."""
    return [n.decode() if isinstance(n, bytes) else str(n)
            for n in dataset.attrs.get("names", [])]


def _formula(spec_text: Any) -> str:
    """The formula of the spec stored with the results ('' for the matrix form, or a spec
    that does not read)."""
    try:
        spec = json.loads(spec_text.decode() if isinstance(spec_text, bytes) else spec_text)
    except (TypeError, ValueError):
        return ""
    formula = spec.get("formula", "") if isinstance(spec, dict) else ""
    return formula if isinstance(formula, str) else ""


def _same_affine(background: Path, data: ReportData) -> None:
    """A NIfTI background must lie on the study's grid, affine included, as every input
    image must (a contract audit: a mirrored, 5 mm or half-voxel-shifted background of the
    right shape was drawn under the maps without a word)."""
    if data.affine is None or data.space_format != "nifti":
        return
    import nibabel as nib

    from mpiblmm.io.nifti import Grid, quiet_nibabel

    try:
        with quiet_nibabel():
            affine = np.asarray(nib.load(str(background)).affine, dtype=np.float64)
    except Exception:       # read above already: a format without an affine has none to check
        return
    why = Grid(tuple(data.grid_shape), data.affine).differs(data.grid_shape, affine)
    if why is not None:
        raise UserError(f"background is not on the study grid: {why}", str(background))


def _df_num(group, status: np.ndarray) -> tuple[float | None, int]:
    """An F contrast's numerator df: the largest over fitted voxels with a finite value
    (None when there is none: every voxel dropped; unfitted voxels hold NaN), and how many
    fitted voxels test fewer rows (their observed rows drop columns)."""
    df_num = np.asarray(group["df_num"][...], dtype=np.float64)
    ok = (status <= FITTED_MAX_STATUS) & np.isfinite(df_num)
    if not ok.any():
        return None, 0
    top = float(df_num[ok].max())
    return top, int((df_num[ok] < top).sum())


def _recorded_observations(f) -> int | None:
    """The study's number of observations as the fit recorded it in the ``input_parts``
    attribute (:func:`~mpiblmm.io.results.stored_parts`), or None for files written before
    it held them."""
    n = stored_parts(f).get("observations")
    try:
        return None if n is None else int(n)
    except (ValueError, TypeError):
        return None


def _add_packed(data: ReportData, packed: Path) -> None:
    """Mean image and the study's number of observations from ``packed.h5``, if it is ours
    and matches the results' voxels; silently nothing otherwise."""
    import h5py

    if not packed.is_file():
        return
    try:
        with h5py.File(packed, "r", locking=False) as f:
            if f.attrs.get("format") != "mpiblmm-packed-1" or "voxels" not in f:
                return
            vox = np.asarray(f["voxels"][...], dtype=np.int64)
            if tuple(int(s) for s in f.attrs["grid_shape"]) != data.grid_shape:
                return
            if data.n_total is None:  # the fit's own record (input_parts) comes first
                data.n_total = int(f.attrs["n_observations"])
                data.n_total_source = "packed.h5"
            Y = f["Y"]
            total = np.zeros(vox.shape[0])
            count = np.zeros(vox.shape[0])
            step = max(1, (64 << 20) // (8 * max(1, Y.shape[0])))
            for lo in range(0, vox.shape[0], step):  # column blocks: bounded memory
                block = np.asarray(Y[:, lo:lo + step], dtype=np.float64)
                ok = np.isfinite(block)
                if bool(f.attrs.get("zero_is_missing", False)):
                    ok &= block != 0
                total[lo:lo + step] = np.where(ok, block, 0.0).sum(axis=0)
                count[lo:lo + step] = ok.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = total / count
            data.background = volume(mean, vox, data.grid_shape)
            data.background_source = "mean of the observations (packed.h5)"
    except (OSError, KeyError, ValueError):
        return
