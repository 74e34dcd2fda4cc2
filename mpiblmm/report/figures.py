"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes a :class:`~mpiblmm.report.data.ReportData` (or plain arrays) and draws
one figure; nothing here reads files or computes statistics.  Volumes are shown as mosaics of
slices of the third grid axis (axial for the usual RAS-like affines), first axis to the right,
second axis up, over the background image in grey, each slice marked with the subject's side
its edges face (from the affine); surface studies (grid ``(N, 1, 1)``) as values by vertex.
"""

from __future__ import annotations

import io
import textwrap
from typing import Sequence

import numpy as np

#: Slices in a mosaic, and mosaic columns.
MAX_SLICES = 12
COLUMNS = 6
DPI = 80
#: Colour of analysed voxels that have no value (not fitted): outside every map's colour
#: scale, and neither grey (the background image, coolwarm's centre) nor black (the
#: background outside the analysed voxels), so it cannot be read as "no effect".
NOT_FITTED_COLOUR = "#f0e442"
NOT_FITTED_LABEL = "analysed, not fitted (no value)"
#: Colour of fitted voxels where a contrast has no value (not estimable on their observed
#: rows, e.g. a group none of whose images is observed there): as the above, on no scale.
NO_ESTIMATE_COLOUR = "#cc79a7"
NO_ESTIMATE_LABEL = "fitted, contrast not estimable there (no value)"
#: The side each axis code's opposite names, the plane a slice axis code cuts, and words.
OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
PLANE = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "R": "sagittal",
         "L": "sagittal"}
WORDS = {"R": "right (R)", "L": "left (L)", "A": "anterior (A)", "P": "posterior (P)",
         "S": "superior (S)", "I": "inferior (I)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def choose_slices(occupied: np.ndarray, most: int = MAX_SLICES) -> list[int]:
    """Up to ``most`` evenly spaced axial slices among those with any occupied voxel."""
    ks = np.flatnonzero(occupied.reshape(-1, occupied.shape[-1]).any(axis=0))
    if ks.size <= most:
        return [int(k) for k in ks]
    pick = np.unique(np.round(np.linspace(0, ks.size - 1, most)).astype(int))
    return [int(ks[i]) for i in pick]


def _grey(background: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if background is None:
        return np.zeros(shape)
    b = np.where(np.isfinite(background), background, np.nan)
    if not np.isfinite(b).any():
        return np.zeros(shape)
    lo, hi = np.nanpercentile(b, [2, 98])
    return np.nan_to_num(np.clip((b - lo) / (hi - lo if hi > lo else 1.0), 0, 1), nan=0.0)


def legend_text(text: str, width: int = 40) -> str:
    """A legend or tick label: ``text`` wrapped at word boundaries onto at most two lines
    of ``width`` characters, ending in an ellipsis if cut (the page's table has it whole)."""
    return textwrap.fill(" ".join(str(text).split()), width=width, max_lines=2,
                         placeholder=" \u2026")


def swatch(colour: str, label: str):
    """A legend swatch; a transparent colour (the background shows through, as for "not
    analysed") gets an empty box with a dark edge, so the entry is still visible."""
    from matplotlib.patches import Patch

    if len(colour) == 9 and colour.endswith("00"):
        return Patch(facecolor="none", edgecolor="#444444", label=label)
    return Patch(facecolor=colour, edgecolor="#444444", linewidth=0.5, label=label)


def orientation(affine: np.ndarray | None) -> tuple[str, str, str] | None:
    """Where each grid axis points in world space (nibabel's axis codes, e.g. ``('R', 'A',
    'S')``: the first axis runs toward the subject's right), or None without a usable affine."""
    if affine is None:
        return None
    try:
        from nibabel.orientations import aff2axcodes

        codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    except (ImportError, ValueError, np.linalg.LinAlgError):
        return None
    if any(c is None for c in codes):
        return None
    return tuple(str(c) for c in codes)  # type: ignore[return-value]


def pixel_aspect(affine: np.ndarray | None) -> float:
    """Height over width of a slice's pixel (voxel size along the grid's second axis over
    its first, from the affine's columns), so slices are drawn in physical proportions;
    1 when the affine says nothing usable."""
    if affine is None:
        return 1.0
    sizes = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(sizes[:2])) or sizes[0] <= 0 or sizes[1] <= 0:
        return 1.0
    return float(sizes[1] / sizes[0])


def orientation_note(codes: tuple[str, str, str] | None) -> str:
    """One line saying which slices a mosaic shows and which way they face."""
    if codes is None:
        return "slices k of the third grid axis (orientation unknown: no affine)"
    return (f"{PLANE[codes[2]]} slices k (third grid axis); from the affine: right of each "
            f"slice = subject's {WORDS[codes[0]]}, top = {WORDS[codes[1]]}")


def _mark_sides(ax, codes: tuple[str, str, str] | None) -> None:
    """Letters at a slice's left and right edges naming the subject's side there (which
    side is which in the image depends on the affine: neurological or radiological)."""
    if codes is None:
        return
    kw = {"transform": ax.transAxes, "fontsize": 7, "va": "center", "color": "#333333"}
    ax.text(-0.02, 0.5, OPPOSITE[codes[0]], ha="right", **kw)
    ax.text(1.02, 0.5, codes[0], ha="left", **kw)


def mosaic(values: np.ndarray, background: np.ndarray | None, title: str, cmap: str,
           vmin: float, vmax: float, label: str, occupied: np.ndarray,
           categorical: Sequence[tuple[int, str, str]] | None = None,
           not_fitted: np.ndarray | None = None,
           axcodes: tuple[str, str, str] | None = None, aspect: float = 1.0,
           no_estimate: np.ndarray | None = None):
    """A mosaic of axial slices of a grid-shaped ``values`` (NaN: transparent) over ``background``.

    ``categorical``: (value, colour, label) triples for integer maps drawn with a legend.
    ``not_fitted``: grid-shaped mask of analysed voxels that have no value; drawn in
    :data:`NOT_FITTED_COLOUR` with a legend entry, so a dropped voxel is never mistaken for
    the background or for a value at the colour scale's centre; ``no_estimate`` likewise, in
    :data:`NO_ESTIMATE_COLOUR`, the fitted voxels a contrast has no value at.  ``axcodes``: the grid's
    orientation (:func:`orientation`), for the side letters and the note under the title.
    ``aspect``: a pixel's height over its width (:func:`pixel_aspect`: anisotropic voxels
    drawn in their physical proportions).
    """
    plt = _plt()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    slices = choose_slices(occupied)
    rows = max(1, -(-len(slices) // COLUMNS))
    cols = max(1, min(COLUMNS, len(slices)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols + 1.2, 2.0 * rows + 0.8),
                             squeeze=False)
    grey = _grey(background, values.shape[:3])
    norm, cm = None, cmap
    if categorical:
        cats = sorted(categorical)
        cm = ListedColormap([c for _, c, _ in cats])
        edges = [v - 0.5 for v, _, _ in cats] + [cats[-1][0] + 0.5]
        norm = BoundaryNorm(edges, cm.N)
    marks = [(mask, colour, text) for mask, colour, text in
             ((not_fitted, NOT_FITTED_COLOUR, NOT_FITTED_LABEL),
              (no_estimate, NO_ESTIMATE_COLOUR, NO_ESTIMATE_LABEL))
             if mask is not None and bool(np.any(mask))]
    im = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), slices):
        ax.imshow(grey[:, :, k].T, cmap="gray", origin="lower", vmin=0, vmax=1,
                  interpolation="nearest", aspect=aspect)
        layer = np.ma.masked_invalid(values[:, :, k].astype(float).T)
        kwargs = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
        im = ax.imshow(layer, cmap=cm, origin="lower", interpolation="nearest", aspect=aspect,
                       **kwargs)
        for mask, colour, _ in marks:
            holes = np.ma.masked_where(~mask[:, :, k].T, np.ones(mask.shape[:2][::-1]))
            ax.imshow(holes, cmap=ListedColormap([colour]), origin="lower",
                      vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
        plane = PLANE[axcodes[2]] + " " if axcodes is not None else ""
        ax.set_title(f"{plane}k = {k}", fontsize=8)
        _mark_sides(ax, axcodes)
    fig.suptitle(f"{title}\n{orientation_note(axcodes)}", fontsize=10)
    handles = []
    if im is not None and categorical:
        handles = [swatch(c, f"{v}: {legend_text(t)}") for v, c, t in sorted(categorical)]
    elif im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    if im is not None:
        handles += [swatch(colour, text) for _, colour, text in marks]
    if handles:  # hangs below the lowest slice, however many lines its entries take
        bottom = min(ax.get_position().y0 for ax, _ in zip(axes.ravel(), slices))
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, bottom - 0.01),
                   ncol=min(3, len(handles)), fontsize=7)
    return fig


def by_vertex(values: np.ndarray, title: str, label: str, cmap: str = "coolwarm",
              vmin: float | None = None, vmax: float | None = None,
              categorical: Sequence[tuple[int, str, str]] | None = None,
              not_fitted: np.ndarray | None = None, unit: str = "vertex",
              no_estimate: np.ndarray | None = None):
    """Surface studies: the per-vertex values in vertex order, coloured by value (or, for
    ``categorical`` (value, colour, label) triples, by category with a legend and the
    categories as the y ticks).  ``not_fitted`` (per vertex) marks analysed vertices
    without a value in a row above the plot, in :data:`NOT_FITTED_COLOUR` (``no_estimate``:
    fitted vertices a contrast has no value at, in :data:`NO_ESTIMATE_COLOUR`); ``unit``: what
    the x axis counts (vertex or grayordinate)."""
    plt = _plt()
    v = np.asarray(values, dtype=float).reshape(-1)
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.set_xlabel(f"{unit} (index)")
    ax.set_ylabel(label)
    ax.set_title(title)
    if categorical:
        shown = []
        for value, colour, text in sorted(categorical):
            idx = np.flatnonzero(v == value)
            if idx.size:
                ax.scatter(idx, v[idx], color=colour if not colour.endswith("00") or
                           len(colour) != 9 else "#bbbbbb", s=6,
                           label=f"{value}: {legend_text(text)}")
                shown.append(value)
        if shown:  # categories, not a continuous scale: ticks at the codes present only
            ax.set_yticks(shown, [str(x) for x in shown])
            ax.set_ylim(min(shown) - 0.5, max(shown) + 0.5)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig
    idx = np.flatnonzero(np.isfinite(v))
    sc = ax.scatter(idx, v[idx], c=v[idx], cmap=cmap, s=6, vmin=vmin, vmax=vmax)
    if idx.size:
        fig.colorbar(sc, ax=ax, label=label)
    if vmin is not None and vmax is not None:  # the y axis spans the colour scale (F: from 0)
        lo = min(vmin, float(v[idx].min())) if idx.size else vmin
        hi = max(vmax, float(v[idx].max())) if idx.size else vmax
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    marked = 0
    for mask, colour, text in ((not_fitted, NOT_FITTED_COLOUR, NOT_FITTED_LABEL),
                               (no_estimate, NO_ESTIMATE_COLOUR, NO_ESTIMATE_LABEL)):
        holes = np.flatnonzero(np.asarray(mask, bool).reshape(-1)) if mask is not None \
            else np.zeros(0, int)
        if not holes.size:
            continue
        # no value to place them by: a row of marks above the plot, off the value axis,
        # where no one reads them as a z (along the bottom they would sit at z = 0)
        ax.plot(holes, np.full(holes.size, 1.04), linestyle="none", marker="s", markersize=3,
                markerfacecolor=colour, markeredgecolor="#444444",
                markeredgewidth=0.4, transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"{text} ({holes.size}; marked above the plot)")
        marked += holes.size
    if marked:
        ax.set_title(title, pad=14)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    if not idx.size and not marked:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center")
    return fig


def histogram(series: dict[str, np.ndarray], title: str, xlabel: str, integer: bool = False,
              unit: str = "voxels"):
    """Histograms of one or more per-voxel series (finite values only); ``unit``: what the
    y axis counts.  A legend only when more than one series has values to show."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    drawn = 0
    for name, values in series.items():
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        if integer:
            bins = np.arange(v.min() - 0.5, v.max() + 1.5, max(1.0, np.ceil((v.max() - v.min() + 1) / 60)))
        else:
            bins = 40
        ax.hist(v, bins=bins, alpha=0.6, label=name)
        drawn += 1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_title(title)
    if len(series) > 1 and drawn:  # an empty legend only warns ("No artists with labels")
        ax.legend(fontsize=8)
    return fig


def status_bars(counts: dict[int, int], codes: dict[int, str], colours: dict[int, str],
                unit: str = "voxels"):
    """Voxels (``unit``) per status code, as horizontal bars labelled with the meaning (cut
    at a word boundary; the page's table has it whole)."""
    plt = _plt()
    keys = sorted(counts)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(keys) + 1.0))
    y = np.arange(len(keys))
    ax.barh(y, [counts[k] for k in keys], color=[colours.get(k, "grey") for k in keys])
    ax.set_yticks(y, [f"{k}: {legend_text(codes.get(k, '?'), 60)}" for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    for yi, k in zip(y, keys):
        ax.text(counts[k], yi, f" {counts[k]}", va="center", fontsize=8)
    ax.set_title(f"{unit} per status")
    return fig


def timing(seconds: dict[str, Sequence[float]]):
    """Seconds per phase: median bar with the min-max range over ranks."""
    plt = _plt()
    names = [k for k in seconds if k != "total"]
    med = np.array([seconds[k][1] for k in names])
    lo = np.array([seconds[k][0] for k in names])
    hi = np.array([seconds[k][2] for k in names])
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, med, xerr=[med - lo, hi - med], color="tab:blue", capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median over ranks; whiskers: min to max)")
    total = seconds.get("total")
    ax.set_title("time per phase" + (f" (total {total[2]:.2f} s)" if total else ""))
    return fig
