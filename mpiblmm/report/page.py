"""The report page: sections of text, tables and figures, written as one self-contained HTML
file (figures embedded as base64 PNG, no external files, no scripts)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from mpiblmm.io.derived import STATUS_NOT_ANALYSED
from mpiblmm.report import figures as fg
from mpiblmm.report.data import ReportData

STATUS_COLOURS = {0: "#2ca02c", 1: "#ff7f0e", 2: "#1f77b4", 3: "#d62728", 4: "#9467bd",
                  5: "#8c564b", 6: "#7f7f7f", 7: "#bcbd22", STATUS_NOT_ANALYSED: "#00000000",
                  255: "#e377c2"}
SINGULAR_TEXT = (
    "A <b>singular fit</b> (status 2) is a fit like any other: the likelihood's maximum lies on "
    "the boundary, where a random-effect variance is zero or a correlation is &plusmn;1, as "
    "lme4 reports with <code>isSingular()</code>. It is common in voxel-wise designs with few "
    "visits per subject: the data cannot tell a small variance from none. The fixed effects, "
    "their covariance and the tests remain valid at that estimate. The parameters on the "
    "boundary drop out of the Satterthwaite df (as in lmerTest), so the df are close to those "
    "of a model without that random effect, often larger than at neighbouring non-singular "
    "voxels. Treat the random-effect "
    "covariance maps at these voxels as 'at most this much'."
)
#: The pipeline's phases in the order they run (the stored summary sorts its keys).
PHASE_ORDER = ["setup", "ingest", "create", "read", "fit", "write", "finish", "export", "total"]
MASK_CATEGORIES = [
    (0, "#00000000", "not analysed"),
    (1, "#2ca02c", "complete data: kept by both"),
    (2, "#1f77b4", "missing data, kept by the thresholds (lost to voxel-wise deletion)"),
    (3, "#d62728", "not fitted"),
]


def _dropped_text(dropped: int, V: int) -> str:
    """The paragraph on fitted voxels whose observed rows left X rank deficient."""
    if not dropped:
        return ""
    return (f"<p>{dropped} fitted voxels ({100.0 * dropped / max(V, 1):.1f}%) leave X rank "
            "deficient on their observed rows (e.g. no image of a group there): they are "
            "fitted without the dependent columns, as lme4 drops them, with NaN in those "
            "columns of beta and in the contrasts they cannot estimate.</p>")


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>'


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x:.4g}"


def _map_figure(d: ReportData, values: np.ndarray, title: str, cmap: str, vmin: float,
                vmax: float, label: str, categorical=None) -> bytes:
    grid = d.grid(values) if values.shape[0] == d.voxels.shape[0] else values
    if d.is_surface:  # grid (N, 1, 1): values in vertex order
        return fg.png(fg.by_vertex(grid.reshape(-1), title, label, cmap, vmin, vmax,
                                   categorical))
    occupied = np.zeros(d.grid_shape, bool)
    occupied[tuple(d.voxels.T)] = True
    return fg.png(fg.mosaic(grid, d.background, title, cmap, vmin, vmax, label, occupied,
                            categorical))


#: The z a contrast's voxels are counted beyond, and the z of p = 0.001 (one-sided).
Z_COUNT = 2.3
Z_STRONG = 3.09


def contrast_summary(kind: str, alternative: str, z: np.ndarray) -> tuple[str, int]:
    """What a contrast's z map shows (HTML) and how many voxels lie beyond
    :data:`Z_COUNT` in the direction of an effect.

    Only a two-sided T contrast's z is signed by the estimate with both tails meaning an
    effect (``|z| > 2.3``, p < 0.021 two-sided).  A one-sided T contrast's and an F
    contrast's z are ``isf(p)`` of a one-tailed p: an effect is ``z > 2.3`` (p < 0.011;
    for ``less``, ``z < -2.3``, as its z is ``-isf(p)``), and a z beyond 2.3 on the other
    side is p > 0.989, no effect at all.  NaN is never counted.
    """
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        if kind == "T" and alternative == "two-sided":
            count = int(np.sum(np.abs(z) > Z_COUNT))
            what = (f"z with the two-sided p of t, signed by the estimate; |z| &ge; {Z_STRONG} "
                    f"is p &lt; 0.002 two-sided, before any correction. Voxels with "
                    f"|z| &gt; {Z_COUNT} (p &lt; 0.021 two-sided)")
        elif kind == "T" and alternative == "less":
            count = int(np.sum(z < -Z_COUNT))
            what = (f"z with the one-sided p of t (alternative 'less': an effect below 0 "
                    f"gives z &lt; 0); z &le; -{Z_STRONG} is p &lt; 0.001 one-sided, before "
                    f"any correction. Voxels with z &lt; -{Z_COUNT} (p &lt; 0.011 one-sided)")
        elif kind == "T":
            count = int(np.sum(z > Z_COUNT))
            what = (f"z with the one-sided p of t (alternative 'greater': an effect above 0 "
                    f"gives z &gt; 0); z &ge; {Z_STRONG} is p &lt; 0.001 one-sided, before "
                    f"any correction. Voxels with z &gt; {Z_COUNT} (p &lt; 0.011 one-sided)")
        else:
            count = int(np.sum(z > Z_COUNT))
            what = (f"z with the p of F (upper tail, not signed: z &lt; 0 is p &gt; 0.5, no "
                    f"effect); z &ge; {Z_STRONG} is p &lt; 0.001, before any correction. "
                    f"Voxels with z &gt; {Z_COUNT} (p &lt; 0.011)")
    return what, count


def sections(d: ReportData) -> list[tuple[str, str]]:
    """(title, html) of every section, in order."""
    out = []
    fitted = d.fitted
    V = d.voxels.shape[0]
    s = d.summary
    total = s.get("total_seconds", (s.get("seconds", {}).get("total") or [None] * 3)[2])
    facts = [["results file", str(d.path)], ["method", d.method],
             ["candidate voxels (in the mask, observed at least once)", V],
             ["fitted voxels (status 0-2)", int(fitted.sum())],
             ["observations in the study", f"{d.n_total} ({d.n_total_source})"],
             ["ranks", s.get("ranks", "-")],
             ["total seconds", _fmt(total) if total is not None else "-"],
             ["background", d.background_source or "none"]]
    out.append(("Overview", _table(["", ""], facts)))

    # contrasts
    parts = []
    for c in d.contrasts:
        z = np.where(fitted, c.z, np.nan)
        top = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        lim = max(3.0, min(top, 12.0))
        parts.append(_img(_map_figure(d, z, f"contrast {c.name} ({c.kind}): z", "coolwarm",
                                      -lim, lim, "z"),
                          f"contrast {c.name} z map"))
        what, count = contrast_summary(c.kind, c.alternative, z)
        parts.append(f"<p>{html.escape(c.name)}: {what}: {count} of {int(fitted.sum())}.</p>")
    out.append(("Contrasts", "".join(parts) or "<p>No contrasts in this fit.</p>"))

    # status
    codes = d.codes
    status_grid = d.status_grid()
    present = sorted(set(int(x) for x in np.unique(d.status)) | {STATUS_NOT_ANALYSED})
    cats = [(k, STATUS_COLOURS.get(k, "#444444"), codes.get(k, "?")[:45]) for k in present]
    rows = [[k, codes.get(k, "?"), d.counts.get(k, 0),
             f"{100.0 * d.counts.get(k, 0) / max(V, 1):.1f}%"] for k in sorted(d.counts)]
    n_sing = d.counts.get(2, 0)
    body = (_table(["status", "meaning", "voxels", "of candidates"], rows)
            + _img(fg.png(fg.status_bars(d.counts, codes, STATUS_COLOURS)), "status counts")
            + _img(_map_figure(d, status_grid, "status per voxel", "tab10", 0, 9, "status",
                               categorical=cats), "status map")
            + f"<p>{n_sing} voxels ({100.0 * n_sing / max(V, 1):.1f}%) are singular fits. "
            + SINGULAR_TEXT + "</p>" + _dropped_text(d.dropped_columns, V)
            + "<p>Background (status 8 in the maps): voxels outside the "
            "analysis mask or never observed; they are not in results.h5.</p>")
    out.append(("Voxel status: why voxels were dropped", body))

    # mask: listwise deletion vs thresholds
    complete = d.n >= (d.n_total or 0)
    cat = np.where(~fitted, 3, np.where(complete, 1, 2)).astype(np.int16)
    grid = d.grid(cat, 0)
    listwise, kept = int((fitted & complete).sum()), int(fitted.sum())
    body = (f"<p>Voxel-wise (listwise) deletion keeps only voxels observed in all "
            f"{d.n_total} observations: {listwise} voxels. The missingness thresholds kept "
            f"{kept} voxels, {kept - listwise} more, each fitted on the observations it has.</p>"
            + _img(_map_figure(d, grid, "analysis mask: voxel-wise deletion vs thresholds",
                               "tab10", 0, 3, "", categorical=MASK_CATEGORIES), "mask comparison"))
    out.append(("Analysis mask", body))

    # n per voxel
    top = max(1, int(d.n.max()) if V else 1)
    body = (_img(_map_figure(d, d.n.astype(float), "observations used per voxel (n)", "viridis",
                             0, top, "n"), "n map")
            + _img(fg.png(fg.histogram({"n": d.n[d.n > 0]}, "observations per voxel", "n",
                                       integer=True)), "n histogram"))
    out.append(("Observations per voxel", body))

    # iterations
    it = d.iterations[fitted]
    body = (f"<p>Estimator iterations at fitted voxels: mean {_fmt(float(it.mean()) if it.size else np.nan)}, "
            f"max {int(it.max()) if it.size else '-'}; {d.counts.get(1, 0)} voxels hit the "
            "iteration cap (status 1).</p>"
            + _img(fg.png(fg.histogram({"iterations": it}, "iterations per fitted voxel",
                                       "iterations", integer=True)), "iterations histogram"))
    out.append(("Iterations", body))

    # df
    rows, series = [], {}
    for c in d.contrasts:
        df = c.df[fitted & np.isfinite(c.df)]
        series[c.name] = df
        rows.append([c.name, c.kind, _fmt(c.df_num) if c.df_num is not None else "1",
                     _fmt(float(df.min())) if df.size else "-",
                     _fmt(float(np.median(df))) if df.size else "-",
                     _fmt(float(df.max())) if df.size else "-"])
    body = (("<p>Satterthwaite denominator df per fitted voxel. They vary with the "
             "missing data and with how much of the variance is between subjects.</p>"
             + _table(["contrast", "kind", "df (numerator)", "df min", "df median", "df max"], rows)
             + _img(fg.png(fg.histogram(series, "Satterthwaite df", "df")), "df histogram"))
            if rows else "<p>No contrasts.</p>")
    out.append(("Degrees of freedom", body))

    secs = s.get("seconds")
    if secs:
        order = [k for k in PHASE_ORDER if k in secs] + sorted(k for k in secs if k not in PHASE_ORDER)
        secs = {k: secs[k] for k in order}
        body = (_img(fg.png(fg.timing(secs)), "time per phase")
                + _table(["phase", "min", "median", "max"],
                         [[k, *(_fmt(x) for x in v)] for k, v in secs.items()]))
    else:
        body = "<p>No timing in this results file.</p>"
    out.append(("Time per phase (seconds, over ranks)", body))
    out.append(("Run summary (as stored)",
                "<pre>" + html.escape("\n".join(f"{k}: {json.dumps(v, default=str)}"
                                                 for k, v in sorted(s.items()))) + "</pre>"))
    return out


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left;font-size:90%}figure{margin:0.5em 0}img{max-width:100%}
h2{border-bottom:1px solid #ddd;margin-top:1.6em}pre{background:#f6f6f6;padding:0.5em;
font-size:80%;overflow-x:auto}"""


def render(d: ReportData) -> str:
    """The whole page as one HTML string."""
    body = "".join(f"<h2 id='s{i}'>{html.escape(t)}</h2>\n{h}\n"
                   for i, (t, h) in enumerate(sections(d)))
    title = f"mpiblmm report: {d.path}"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n{body}</body></html>\n")


def write_report(d: ReportData, out_dir: Path) -> Path:
    """Write ``report.html`` into ``out_dir`` (atomically); return its path."""
    import os

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    text = render(d)  # before the temporary file exists: a failure here leaves nothing
    tmp = out_dir / f".report.html.tmp{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # disk full, quota, a signal: no half-written page is left behind
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path
