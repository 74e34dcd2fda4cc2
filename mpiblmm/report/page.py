"""The report page: sections of text, tables and figures, written as one self-contained HTML
file (figures embedded as base64 PNG, no external files, no scripts)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from mpiblmm.io.derived import STATUS_NOT_ANALYSED
from mpiblmm.lmm.model import STATUS_TOO_FEW
from mpiblmm.report import figures as fg
from mpiblmm.report.data import ReportData

STATUS_COLOURS = {0: "#2ca02c", 1: "#ff7f0e", 2: "#1f77b4", 3: "#d62728", 4: "#9467bd",
                  5: "#8c564b", 6: "#7f7f7f", 7: "#bcbd22", STATUS_NOT_ANALYSED: "#00000000",
                  255: "#e377c2"}
SINGULAR_TEXT = (
    "A <b>singular fit</b> (status 2) is a fit like any other: the likelihood's maximum lies on "
    "the boundary, where a random-effect variance is zero or a correlation is &plusmn;1, as "
    "lme4 reports with <code>isSingular()</code>. It is common in mass-univariate designs with few "
    "visits per subject: the data cannot tell a small variance from none. The fixed effects, "
    "their covariance and the tests remain valid at that estimate. The parameters on the "
    "boundary drop out of the Satterthwaite df (as in lmerTest), so the df are close to those "
    "of a model without that random effect, often larger than at neighbouring non-singular "
    "{unit}. Treat the random-effect "
    "covariance maps at these {unit} as 'at most this much'."
)
#: The pipeline's phases in the order they run (the stored summary sorts its keys).
PHASE_ORDER = ["setup", "ingest", "create", "read", "fit", "write", "finish", "export", "total"]
MASK_CATEGORIES = [
    (0, "#00000000", "not analysed"),
    (1, "#2ca02c", "complete data: kept by both"),
    (2, "#1f77b4", "missing data, kept by the thresholds (lost to {unit1}-wise deletion)"),
    (3, "#d62728", "not fitted"),
]


def _dropped_text(dropped: int, V: int, unit: str = "voxels") -> str:
    """The paragraph on fitted voxels (``unit``) whose observed rows left X rank deficient."""
    if not dropped:
        return ""
    return (f"<p>{dropped} fitted {unit} ({100.0 * dropped / max(V, 1):.1f}%) leave X rank "
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
                vmax: float, label: str, categorical=None,
                not_fitted: np.ndarray | None = None,
                no_estimate: np.ndarray | None = None) -> bytes:
    """One map as PNG: a mosaic of slices (volumes) or values by vertex (surfaces).
    ``values``, ``not_fitted`` and ``no_estimate`` (fitted voxels a contrast has no value
    at) are per candidate voxel (V,) or already grid-shaped."""
    grid = d.grid(values) if values.ndim == 1 else values  # (V,) per voxel, or a grid

    def holes(mask):
        return None if mask is None else d.grid(np.asarray(mask, bool), False).astype(bool)

    dropped, none = holes(not_fitted), holes(no_estimate)
    if d.is_surface:  # grid (N, 1, 1): values in vertex order
        return fg.png(fg.by_vertex(grid.reshape(-1), title, label, cmap, vmin, vmax,
                                   categorical, None if dropped is None else dropped.reshape(-1),
                                   d.unit1, None if none is None else none.reshape(-1)))
    occupied = np.zeros(d.grid_shape, bool)
    occupied[tuple(d.voxels.T)] = True
    return fg.png(fg.mosaic(grid, d.background, title, cmap, vmin, vmax, label, occupied,
                            categorical, dropped, fg.orientation(d.affine),
                            fg.pixel_aspect(d.affine), none))


#: The z a contrast's voxels are counted beyond, and the z of p = 0.001 (one-sided).
Z_COUNT = 2.3
Z_STRONG = 3.09


def contrast_summary(kind: str, alternative: str, z: np.ndarray,
                     unit: str = "voxels") -> tuple[str, int]:
    """What a contrast's z map shows (HTML) and how many voxels lie beyond
    :data:`Z_COUNT` in the direction of an effect.

    Only a two-sided T contrast's z is signed by the estimate with both tails meaning an
    effect (``|z| > 2.3``, p < 0.021 two-sided).  A one-sided T contrast's and an F
    contrast's z are ``isf(p)`` of a one-tailed p: an effect is ``z > 2.3`` (p < 0.011;
    for ``less``, ``z < -2.3``, as its z is ``-isf(p)``), and a z beyond 2.3 on the other
    side is p > 0.989, no effect at all.  NaN is never counted.  ``unit``: what is counted
    (voxels, vertices or grayordinates).
    """
    z = np.asarray(z, dtype=np.float64)
    Unit = unit.capitalize()
    with np.errstate(invalid="ignore"):
        if kind == "T" and alternative == "two-sided":
            count = int(np.sum(np.abs(z) > Z_COUNT))
            what = (f"z with the two-sided p of t, signed by the estimate; |z| &ge; {Z_STRONG} "
                    f"is p &lt; 0.002 two-sided, before any correction. {Unit} with "
                    f"|z| &gt; {Z_COUNT} (p &lt; 0.021 two-sided)")
        elif kind == "T" and alternative == "less":
            count = int(np.sum(z < -Z_COUNT))
            what = (f"z with the one-sided p of t (alternative 'less': an effect below 0 "
                    f"gives z &lt; 0); z &le; -{Z_STRONG} is p &lt; 0.001 one-sided, before "
                    f"any correction. {Unit} with z &lt; -{Z_COUNT} (p &lt; 0.011 one-sided)")
        elif kind == "T":
            count = int(np.sum(z > Z_COUNT))
            what = (f"z with the one-sided p of t (alternative 'greater': an effect above 0 "
                    f"gives z &gt; 0); z &ge; {Z_STRONG} is p &lt; 0.001 one-sided, before "
                    f"any correction. {Unit} with z &gt; {Z_COUNT} (p &lt; 0.011 one-sided)")
        else:
            count = int(np.sum(z > Z_COUNT))
            what = (f"z with the p of F (upper tail, not signed: z &lt; 0 is p &gt; 0.5, no "
                    f"effect); z &ge; {Z_STRONG} is p &lt; 0.001, before any correction. "
                    f"{Unit} with z &gt; {Z_COUNT} (p &lt; 0.011)")
    return what, count


#: Colour scales of the z maps: diverging for T (both signs mean something), sequential
#: from 0 for F (its z is isf of an upper-tail p: z < 0 is only p > 0.5, no effect).
T_CMAP = "coolwarm"
F_CMAP = "Reds"


def _z_scale(kind: str, z: np.ndarray) -> tuple[str, float, float, str, str]:
    """(cmap, vmin, vmax, colour-bar label, caption HTML) of a contrast's z map."""
    finite = z[np.isfinite(z)]
    if kind == "F":
        top = float(finite.max()) if finite.size else 0.0
        lim = max(3.0, min(top, 12.0))
        return (F_CMAP, 0.0, lim, "z (z \u2264 0 drawn as 0)",
                "F contrast: z on a sequential scale from 0 upward; z &le; 0 (p &ge; 0.5, no "
                "effect) is drawn as 0, the palest colour.")
    top = float(np.abs(finite).max()) if finite.size else 0.0
    lim = max(3.0, min(top, 12.0))
    return (T_CMAP, -lim, lim, "z", "T contrast: z on a diverging scale centred at 0 "
            "(blue below, red above).")


def _not_fitted_caption(d: ReportData) -> str:
    """How the z maps show candidates that were not fitted ('' when all were fitted)."""
    dropped = int((~d.fitted).sum())
    if not dropped:
        return ""
    if d.is_surface:
        return (f" The {dropped:,} {d.unit} in the mask that were not fitted (status &gt; 2) "
                "have no z: they are marked in yellow in a row above the plot, off its z axis.")
    return (f" The {dropped:,} voxels in the analysis mask that were not fitted (status &gt; 2) "
            "have no z: they are drawn in yellow ('analysed, not fitted'), never like a z "
            "near 0; the grey background image shows only outside the analysed voxels.")


def _overview(d: ReportData) -> str:
    """The table of facts about the run (and a line on a resumed run)."""
    s = d.summary
    V = d.voxels.shape[0]
    total = s.get("total_seconds", (s.get("seconds", {}).get("total") or [None] * 3)[2])
    mask = "mask" if d.is_surface else "analysis mask"
    facts = [["results file", str(d.path)], ["method", d.method],
             [f"candidate {d.unit} (in the {mask}, observed at least once)", V],
             [f"fitted {d.unit} (status 0-2)", int(d.fitted.sum())],
             ["observations in the study", f"{d.n_total} ({d.n_total_source})"],
             ["ranks", s.get("ranks", "-")],
             ["total seconds", _fmt(total) if total is not None else "-"]]
    peak, budget = s.get("peak_memory_mb"), s.get("memory_budget_mb")
    if isinstance(peak, list) and len(peak) == 3:
        facts.append(["peak memory per rank (MiB, min / median / max)",
                      " / ".join(_fmt(float(x)) for x in peak)
                      + (f"; budget {_fmt(float(budget))}" if budget is not None else "")])
    resumed = _resumed_text(d)
    if resumed:
        facts.append(["resumed", resumed])
    if d.is_surface:  # surface plots are values by vertex: no image is drawn under them
        facts.append(["background", "none (surface values are plotted by "
                                    f"{d.unit1} index, over no image)"])
    else:
        facts.append(["background", d.background_source or "none"])
    return _table(["", ""], facts)


def _resumed_text(d: ReportData) -> str:
    """What a resumed fit's summary means for the numbers shown ('' when not resumed)."""
    try:
        resumed = int(d.summary.get("resumed_voxels") or 0)
    except (TypeError, ValueError):
        return ""
    if resumed <= 0:
        return ""
    return (f"{resumed:,} {d.unit if resumed != 1 else d.unit1} were fitted by an earlier run "
            "and kept by --resume; the times are this run's (the counts, maps and iterations "
            "cover all)")


def _warning(d: ReportData) -> str:
    """A box at the top of the page when no candidate was fitted ('' otherwise)."""
    V = d.voxels.shape[0]
    if V and d.fitted.any():
        return ""
    if not V:
        what = f"There are no candidate {d.unit}: nothing was analysed."
    else:
        why = "; ".join(f"{d.counts[k]:,} with status {k} ({html.escape(d.codes.get(k, '?'))})"
                        for k in sorted(d.counts) if d.counts[k])
        what = (f"None of the {V:,} candidate {d.unit} has an estimate: {why}. There are "
                "no estimates, z values, iterations or df; the status section shows where "
                "and why. Check the missingness thresholds and the data.")
    return (f"<div class='warning'><b>No {d.unit1} was fitted.</b> {what}</div>")


def _status_section(d: ReportData) -> str:
    """The status table, bars and map, and what singular fits and status 8 mean."""
    V = d.voxels.shape[0]
    codes = d.codes
    present = sorted(set(int(x) for x in np.unique(d.status)) | {STATUS_NOT_ANALYSED})
    cats = [(k, STATUS_COLOURS.get(k, "#444444"), codes.get(k, "?")) for k in present]
    rows = [[k, codes.get(k, "?"), d.counts.get(k, 0),
             f"{100.0 * d.counts.get(k, 0) / max(V, 1):.1f}%"] for k in sorted(d.counts)]
    n_sing = d.counts.get(2, 0)
    singular = ""
    if n_sing:  # the explanation only where there is something to explain
        singular = (f"<p>{n_sing:,} {d.unit} ({100.0 * n_sing / max(V, 1):.1f}%) are singular "
                    f"fits. {SINGULAR_TEXT.format(unit=d.unit)}</p>")
    elif d.fitted.any():
        singular = "<p>No fitted {} is a singular fit (status 2).</p>".format(d.unit1)
    if d.is_surface:
        outside = (f"<p>Status 8 in the plot: {d.unit} outside the mask or never observed; "
                   "they are not in results.h5.</p>")
    else:
        outside = ("<p>Status 8 (empty box in the legend: the background image shows there): "
                   "voxels outside the analysis mask or never observed; they are not in "
                   "results.h5.</p>")
    return (_table(["status", "meaning", d.unit, "of candidates"], rows)
            + _img(fg.png(fg.status_bars(d.counts, codes, STATUS_COLOURS, d.unit)),
                   "status counts")
            + _img(_map_figure(d, d.status_grid(), f"status per {d.unit1}", "tab10", 0, 9,
                               "status (code)", categorical=cats), "status map")
            + singular + _dropped_text(d.dropped_columns, V, d.unit) + outside)


def _mask_section(d: ReportData) -> str:
    """Voxel-wise (listwise) deletion against the missingness thresholds, in numbers and a map."""
    fitted = d.fitted
    complete = d.n >= (d.n_total or 0)
    cat = np.where(~fitted, 3, np.where(complete, 1, 2)).astype(np.int16)
    # whatever their status: a complete voxel that failed (constant data, say) was kept by
    # both rules; only status 3 is the thresholds' doing (a voxel with no observation, 6,
    # neither's)
    listwise = int((complete & (d.n > 0)).sum())
    kept = int(((d.status != STATUS_TOO_FEW) & (d.n > 0)).sum())
    mask = "mask" if d.is_surface else "analysis mask"
    others = kept - int(fitted.sum())      # kept, not fitted (a fitted voxel is kept)
    failed = (f" Of these, {others} {d.unit} ended without a fit for other reasons (see the "
              "status map)." if others else "")
    return (f"<p>{d.unit1.capitalize()}-wise (listwise) deletion keeps only {d.unit} observed "
            f"in all {d.n_total} observations: {listwise} {d.unit}. The missingness thresholds "
            f"kept {kept} {d.unit}, {kept - listwise} more, each to be fitted on the "
            f"observations it has.{failed}</p>"
            + _img(_map_figure(d, d.grid(cat, 0), f"{mask}: {d.unit1}-wise deletion vs "
                               "thresholds", "tab10", 0, 3, "mask category",
                               categorical=[(v, c, t.format(unit1=d.unit1))
                                            for v, c, t in MASK_CATEGORIES]),
                   "mask comparison"))


def _n_section(d: ReportData) -> str:
    """Observations per candidate (fitted or not: dropped ones have an n too)."""
    V = d.voxels.shape[0]
    top = max(1, int(d.n.max()) if V else 1)
    title = f"observations per {d.unit1} (fitted or not)"
    body = _img(_map_figure(d, d.n.astype(float), title, "viridis", 0, top, "n"), "n map")
    if np.any(d.n > 0):
        body += _img(fg.png(fg.histogram({"n": d.n[d.n > 0]}, title, "n", integer=True,
                                         unit=d.unit)), "n histogram")
    return body


def _iterations_section(d: ReportData) -> str:
    """The estimator's iterations at fitted voxels."""
    it = d.iterations[d.fitted]
    if not it.size:
        return f"<p>No {d.unit1} was fitted: there are no iterations to show.</p>"
    return (f"<p>Estimator iterations at fitted {d.unit}: mean {_fmt(float(it.mean()))}, "
            f"max {int(it.max())}; {d.counts.get(1, 0)} {d.unit} hit the iteration cap "
            "(status 1).</p>"
            + _img(fg.png(fg.histogram({"iterations": it}, f"iterations per fitted {d.unit1}",
                                       "iterations", integer=True, unit=d.unit)),
                   "iterations histogram"))


def _df_section(d: ReportData) -> str:
    """Satterthwaite df per contrast: a table and histograms (none without fitted voxels)."""
    if not d.contrasts:
        return "<p>No contrasts.</p>"
    rows, series = [], {}
    for c in d.contrasts:
        df = c.df[d.fitted & np.isfinite(c.df)]
        series[c.name] = df
        if c.kind != "F":
            num = "1"
        else:  # unknown only when no voxel was fitted (unfitted voxels store NaN)
            num = _fmt(c.df_num) if c.df_num is not None else "- (no fitted " + d.unit1 + ")"
            if c.df_num_fewer:     # voxels whose observed rows drop columns test fewer rows
                num += (f" (fewer at {c.df_num_fewer:,} "
                        f"{d.unit1 if c.df_num_fewer == 1 else d.unit} that drop columns)")
        rows.append([c.name, c.kind, num,
                     _fmt(float(df.min())) if df.size else "-",
                     _fmt(float(np.median(df))) if df.size else "-",
                     _fmt(float(df.max())) if df.size else "-"])
    table = _table(["contrast", "kind", "df (numerator)", "df min", "df median", "df max"], rows)
    if not any(v.size for v in series.values()):
        return (f"<p>No {d.unit1} was fitted: there are no df ('-' in the table).</p>" + table)
    return (f"<p>Satterthwaite denominator df per fitted {d.unit1}. They vary with the "
            "missing data and with how much of the variance is between subjects.</p>"
            + table + _img(fg.png(fg.histogram(series, "Satterthwaite df", "df",
                                               unit=d.unit)), "df histogram"))


def _contrast_section(d: ReportData) -> str:
    """Each contrast's z map (with its scale and not-fitted candidates) and its counts."""
    fitted = d.fitted
    if not d.contrasts:
        return "<p>No contrasts in this fit.</p>"
    if not fitted.any():  # a map of nothing but "not fitted" says no more than the warning
        names = ", ".join(html.escape(c.name) for c in d.contrasts)
        return (f"<p>No {d.unit1} was fitted: the contrasts ({names}) have no z values, so no "
                "maps are drawn.</p>")
    parts = [f"<p class='caption'>{_not_fitted_caption(d).strip()}</p>"
             if _not_fitted_caption(d) else ""]
    for c in d.contrasts:
        z = np.where(fitted, c.z, np.nan)
        cmap, vmin, vmax, label, caption = _z_scale(c.kind, z)
        # an F map starts at 0: z < 0 (p > 0.5) is drawn (and, on surfaces, placed) as 0
        shown = np.maximum(z, 0.0) if c.kind == "F" else z  # NaN stays NaN
        none = fitted & ~np.isfinite(z)   # not estimable on those voxels' observed rows
        parts.append(_img(_map_figure(d, shown, f"contrast {c.name} ({c.kind}): z", cmap, vmin,
                                      vmax, label, not_fitted=~fitted, no_estimate=none),
                          f"contrast {c.name} z map"))
        parts.append(f"<p class='caption'>{caption}</p>")
        what, count = contrast_summary(c.kind, c.alternative, z, d.unit)
        tested = int((fitted & np.isfinite(z)).sum())
        why = (f" ({int(none.sum()):,} fitted {d.unit} cannot estimate it: their observed rows "
               f"drop columns it needs; drawn in purple)" if none.any() else "")
        parts.append(f"<p>{html.escape(c.name)}: {what}: {count} of {tested}{why}.</p>")
    return "".join(parts)


def _model_section(d: ReportData) -> str:
    """The model as fitted: formula, fixed effects, random factors with the median of each
    variance over the fitted voxels, and the contrasts' weights."""
    fitted = d.fitted
    parts = [f"<p>Formula: <code>{html.escape(d.formula)}</code></p>" if d.formula else
             "<p>Matrix form (X and the random factors as files).</p>"]
    if d.fixed_names:
        parts.append("<p>Fixed effects: " + ", ".join(f"<code>{html.escape(n)}</code>"
                                                       for n in d.fixed_names) + ".</p>")
    rows = []
    for f in d.factors:
        for k, effect in enumerate(f.effects or [f"effect {k}" for k in range(f.variances.shape[1])]):
            v = f.variances[fitted, k] if fitted.any() else np.zeros(0)
            v = v[np.isfinite(v)]
            rows.append([f.name, effect, _fmt(float(np.median(v))) if v.size else "-",
                         f"{v.size:,}"])
    if rows:
        parts.append(_table(["factor", "effect", f"median variance over the fitted {d.unit}",
                             f"{d.unit} with a value"], rows))
    if d.contrasts and d.fixed_names:
        crows = []
        for c in d.contrasts:
            w = "-" if c.weights is None else "; ".join(
                " ".join(f"{x:+g} {n}" for x, n in zip(row, d.fixed_names) if x != 0)
                .lstrip("+") or "0" for row in c.weights)
            crows.append([c.name, c.kind, c.alternative, w])
        parts.append(_table(["contrast", "kind", "alternative", "weights (rows separated by ;)"],
                            crows))
    return "".join(parts)


def sections(d: ReportData) -> list[tuple[str, str]]:
    """(title, html) of every section, in order."""
    s = d.summary
    out = [("Overview", _overview(d)),
           ("Model", _model_section(d)),
           ("Contrasts", _contrast_section(d)),
           (f"{d.unit1.capitalize()} status: why {d.unit} were dropped", _status_section(d)),
           ("Mask" if d.is_surface else "Analysis mask", _mask_section(d)),
           (f"Observations per {d.unit1}", _n_section(d)),
           ("Iterations", _iterations_section(d)),
           ("Degrees of freedom", _df_section(d))]
    secs = s.get("seconds")
    if secs:
        order = [k for k in PHASE_ORDER if k in secs] + sorted(k for k in secs if k not in PHASE_ORDER)
        secs = {k: secs[k] for k in order}
        body = (_img(fg.png(fg.timing(secs)), "time per phase")
                + _table(["phase", "min", "median", "max"],
                         [[k, *(_fmt(x) for x in v)] for k, v in secs.items()]))
        if _resumed_text(d):
            body = "<p>This run's times only: " + _resumed_text(d) + ".</p>" + body
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
font-size:80%;overflow-x:auto}.caption{font-size:90%;color:#444}
.warning{border:2px solid #d62728;background:#fdecea;padding:0.6em 1em;margin:1em 0}"""


def render(d: ReportData) -> str:
    """The whole page as one HTML string."""
    body = "".join(f"<h2 id='s{i}'>{html.escape(t)}</h2>\n{h}\n"
                   for i, (t, h) in enumerate(sections(d)))
    title = f"mpiblmm report: {d.path}"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>\n{_warning(d)}\n{body}</body></html>\n")


def write_report(d: ReportData, out_dir: Path) -> Path:
    """Write ``report.html`` into ``out_dir`` (atomically); return its path."""
    import os

    out_dir = Path(out_dir)
    text = render(d)  # before the folder and the temporary file exist: a failure leaves nothing
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    tmp = out_dir / f".report.html.tmp{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # disk full, quota, a signal: no half-written page is left behind,
        for leftover in (tmp.unlink, out_dir.rmdir if created else None):   # nor an empty
            try:                                                            # folder it made
                if leftover is not None:
                    leftover()
            except OSError:
                pass
        raise
    return path
