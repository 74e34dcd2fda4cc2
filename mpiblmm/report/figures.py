"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes a :class:`~mpiblmm.report.data.ReportData` (or plain arrays) and draws
one figure; nothing here reads files or computes statistics.  Volumes are shown as mosaics of
axial slices (third grid axis), first axis to the right, second axis up, over the background
image in grey; surface studies (grid ``(N, 1, 1)``) as values by vertex.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

#: Slices in a mosaic, and mosaic columns.
MAX_SLICES = 12
COLUMNS = 6
DPI = 80


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


def mosaic(values: np.ndarray, background: np.ndarray | None, title: str, cmap: str,
           vmin: float, vmax: float, label: str, occupied: np.ndarray,
           categorical: Sequence[tuple[int, str, str]] | None = None):
    """A mosaic of axial slices of a grid-shaped ``values`` (NaN: transparent) over ``background``.

    ``categorical``: (value, colour, label) triples for integer maps drawn with a legend.
    """
    plt = _plt()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    slices = choose_slices(occupied)
    rows = max(1, -(-len(slices) // COLUMNS))
    cols = max(1, min(COLUMNS, len(slices)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols + 1.2, 2.0 * rows + 0.6),
                             squeeze=False)
    grey = _grey(background, values.shape[:3])
    norm, cm = None, cmap
    if categorical:
        cats = sorted(categorical)
        cm = ListedColormap([c for _, c, _ in cats])
        edges = [v - 0.5 for v, _, _ in cats] + [cats[-1][0] + 0.5]
        norm = BoundaryNorm(edges, cm.N)
    im = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), slices):
        ax.imshow(grey[:, :, k].T, cmap="gray", origin="lower", vmin=0, vmax=1,
                  interpolation="nearest")
        layer = np.ma.masked_invalid(values[:, :, k].astype(float).T)
        kwargs = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
        im = ax.imshow(layer, cmap=cm, origin="lower", interpolation="nearest", **kwargs)
        ax.set_title(f"k = {k}", fontsize=8)
    fig.suptitle(title, fontsize=11)
    if im is not None and categorical:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=c, label=f"{v}: {t}") for v, c, t in sorted(categorical)],
                   loc="lower center", ncol=min(3, len(categorical)), fontsize=7,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(categorical) - 1) // 3)))
    elif im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=label)
    return fig


def by_vertex(values: np.ndarray, title: str, label: str, cmap: str = "coolwarm",
              vmin: float | None = None, vmax: float | None = None,
              categorical: Sequence[tuple[int, str, str]] | None = None):
    """Surface studies: the per-vertex values in vertex order, coloured by value (or, for
    ``categorical`` (value, colour, label) triples, by category with a legend)."""
    plt = _plt()
    v = np.asarray(values, dtype=float).reshape(-1)
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.set_xlabel("vertex / grayordinate")
    ax.set_ylabel(label)
    ax.set_title(title)
    if categorical:
        for value, colour, text in sorted(categorical):
            idx = np.flatnonzero(v == value)
            if idx.size:
                ax.scatter(idx, v[idx], color=colour if not colour.endswith("00") or
                           len(colour) != 9 else "#bbbbbb", s=6, label=f"{value}: {text}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig
    idx = np.flatnonzero(np.isfinite(v))
    sc = ax.scatter(idx, v[idx], c=v[idx], cmap=cmap, s=6, vmin=vmin, vmax=vmax)
    if idx.size:
        fig.colorbar(sc, ax=ax, label=label)
    return fig


def histogram(series: dict[str, np.ndarray], title: str, xlabel: str, integer: bool = False):
    """Histograms of one or more per-voxel series (finite values only)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel("voxels")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


def status_bars(counts: dict[int, int], codes: dict[int, str], colours: dict[int, str]):
    """Voxels per status code, as horizontal bars labelled with the meaning."""
    plt = _plt()
    keys = sorted(counts)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(keys) + 1.0))
    y = np.arange(len(keys))
    ax.barh(y, [counts[k] for k in keys], color=[colours.get(k, "grey") for k in keys])
    ax.set_yticks(y, [f"{k}: {codes.get(k, '?')[:60]}" for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("voxels")
    for yi, k in zip(y, keys):
        ax.text(counts[k], yi, f" {counts[k]}", va="center", fontsize=8)
    ax.set_title("voxels per status")
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
