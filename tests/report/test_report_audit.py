"""The report's answers to an audit: the study's size without ``packed.h5``, dropped voxels
drawn unlike z = 0, F maps on a sequential scale, a study with every voxel dropped, resumed
fits, surface wording, and the labels of legends, slices and the n map."""

from __future__ import annotations

import io
import json
import re
import warnings

import h5py
import numpy as np
import pytest

from mpiblmm.io.results import ContrastLayout, ResultsLayout, create_results
from mpiblmm.report import figures as fg
from mpiblmm.report import page
from mpiblmm.report.data import load_report_data
from mpiblmm.report.page import render

GRID = (6, 5, 4)
CONTRASTS = (ContrastLayout("tT", "T", ((0.0, 1.0),)),
             ContrastLayout("fF", "F", ((0.0, 1.0), (1.0, 0.0))))


def make_results(folder, status, n, *, z_sign=None, input_parts=None, space="",
                 summary=None, grid=GRID, affine=None):
    """A complete results file of ``len(status)`` candidates (the first voxels of ``grid``
    in C order): fitted ones get p = 0.01 (T signed by ``z_sign``), dropped ones NaN, as
    the fit writes them."""
    V = len(status)
    status = np.asarray(status, np.uint8)
    fitted = status <= 2
    lay = ResultsLayout(n_voxels=V, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=CONTRASTS, method="REML", grid_shape=grid,
                        affine=tuple(map(tuple, (np.eye(4) if affine is None else affine).tolist())))
    vox = np.argwhere(np.ones(grid, bool)).astype(np.int32)[:V]
    path = folder / "results.h5"
    w = create_results(path, lay, vox, space=space, input_parts=input_parts)
    p = np.where(fitted, 0.01, np.nan)
    sign = np.ones(V) if z_sign is None else np.asarray(z_sign, float)
    values = {"status": status, "n": np.asarray(n, np.int32), "iterations": np.where(fitted, 5, 0)}
    values.update({"contrasts/tT/neglog10p": -np.log10(p), "contrasts/tT/p": p,
                   "contrasts/tT/estimate": np.where(fitted, sign, np.nan),
                   "contrasts/tT/df": np.where(fitted, 18.0, np.nan),
                   "contrasts/fF/neglog10p": -np.log10(p), "contrasts/fF/p": p,
                   "contrasts/fF/df_den": np.where(fitted, 17.0, np.nan),
                   "contrasts/fF/df_num": np.where(fitted, 2.0, np.nan)})
    w.write(0, V, values)
    w.finish(summary or {})
    return path


def page_text(html: str) -> str:
    """The page's words: no images, no raw summary block, no tags."""
    html = re.sub(r'src="data:[^"]+"', "", html)
    html = re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)
    html = re.sub(r"<style>.*?</style>", "", html, flags=re.S)
    return re.sub(r"<[^>]+>", " ", html)


class Recorder:
    """Stands in for a figure function: keeps its arguments, returns an empty figure."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return fg._plt().figure(figsize=(1, 1))


# 1. the study's size without packed.h5

def test_study_size_comes_from_input_parts_without_packed_h5(tmp_path):
    """No voxel was observed in all 60 images (largest n 59): the size is the fit's record."""
    V = 30
    n = np.full(V, 55)
    n[4] = 59
    path = make_results(tmp_path, np.zeros(V), n, input_parts={"observations": 60})
    assert not (tmp_path / "packed.h5").exists()
    d = load_report_data(path)
    assert (d.n_total, d.n_total_source) == (60, "the fit's record in results.h5")
    html = render(d)
    assert "<td>observations in the study</td><td>60 (the fit&#x27;s record in results.h5)</td>" \
        in html
    assert "observed in all 60 observations: 0 voxels" in html  # listwise keeps none


def test_listwise_counts_complete_voxels_whatever_their_status(tmp_path):
    """A maps audit: with every voxel complete but constant (status 7), the page said
    listwise deletion kept 0 voxels and the thresholds 0: it counted fitted voxels only."""
    status = np.array([7] * 6 + [0] * 3 + [3] * 2 + [6])
    n = np.array([60] * 6 + [60, 59, 58] + [4, 3] + [0])
    d = load_report_data(make_results(tmp_path, status, n, input_parts={"observations": 60}))
    text = " ".join(page_text(render(d)).split())
    assert ("observed in all 60 observations: 7 voxels. The missingness thresholds kept 9 "
            "voxels, 2 more, each to be fitted on the observations it has. Of these, 6 voxels "
            "ended without a fit for other reasons (see the status map).") in text, text


def test_study_size_falls_back_to_largest_n_for_older_files(tmp_path):
    V = 30
    n = np.full(V, 55)
    n[4] = 59
    path = make_results(tmp_path, np.zeros(V), n)
    with h5py.File(path, "r+") as f:
        del f.attrs["input_parts"]  # as written before fits recorded it
    d = load_report_data(path)
    assert d.n_total == 59 and d.n_total_source.startswith("the largest n of any voxel")


# 2. dropped voxels drawn unlike z = 0

def _colour_pixels(png: bytes, colour: str) -> int:
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    rgb = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    return int(np.all(np.abs(rgb - np.array(to_rgb(colour))) < 0.02, axis=-1).sum())


def test_not_fitted_voxels_have_their_own_legended_colour():
    grid = np.zeros((8, 8, 1))
    occupied = np.zeros((8, 8, 1), bool)
    occupied[1:7, 1:7] = True
    holes = np.zeros_like(occupied)
    holes[1:3, 1:7] = True  # 12 analysed voxels without a value
    grid[~occupied | holes] = np.nan
    without = fg.mosaic(grid, None, "z", "coolwarm", -3, 3, "z", occupied)
    assert not without.legends
    plain = fg.png(without)
    fig = fg.mosaic(grid, None, "z", "coolwarm", -3, 3, "z", occupied, not_fitted=holes)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == [fg.NOT_FITTED_LABEL]
    drawn = fg.png(fig)
    assert _colour_pixels(plain, fg.NOT_FITTED_COLOUR) == 0
    more = holes.copy()
    more[3:5, 1:7] = True  # twice as many: twice the colour (the legend swatch aside)
    twice = fg.png(fg.mosaic(np.where(more, np.nan, grid), None, "z", "coolwarm", -3, 3, "z",
                             occupied, not_fitted=more))
    ratio = _colour_pixels(twice, fg.NOT_FITTED_COLOUR) / _colour_pixels(drawn, fg.NOT_FITTED_COLOUR)
    assert _colour_pixels(drawn, fg.NOT_FITTED_COLOUR) > 1000 and 1.9 < ratio < 2.05


def test_the_page_passes_the_dropped_candidates_to_every_z_map(tmp_path, monkeypatch):
    status = np.array([0] * 20 + [3] * 10)
    d = load_report_data(make_results(tmp_path, status, np.full(30, 20)))
    rec = Recorder()
    monkeypatch.setattr(fg, "mosaic", rec)
    html = render(d)
    zmaps = [(a, k) for a, k in rec.calls if a[2].startswith("contrast ")]
    assert len(zmaps) == 2
    for args, _ in zmaps:
        holes = args[9]
        assert holes.shape == GRID and int(holes.sum()) == 10
        assert holes.reshape(-1)[20:30].all() and not holes.reshape(-1)[:20].any()
    assert "The 10 voxels in the analysis mask that were not fitted" in html


# 3. F maps on a sequential scale

def test_f_maps_are_sequential_from_zero_and_t_maps_diverging(tmp_path, monkeypatch):
    sign = np.tile([1.0, -1.0], 15)
    status = np.zeros(30)
    path = make_results(tmp_path, status, np.full(30, 20), z_sign=sign)
    with h5py.File(path, "r+") as f:  # F p > 0.5 at half the voxels: z < 0 there
        f["contrasts/fF/neglog10p"][::2] = -np.log10(0.9)
    rec = Recorder()
    monkeypatch.setattr(fg, "mosaic", rec)
    html = render(load_report_data(path))
    calls = {a[2]: a for a, _ in rec.calls}
    t = calls["contrast tT (T): z"]
    f = calls["contrast fF (F): z"]
    assert t[3] == page.T_CMAP == "coolwarm" and t[4] == -t[5] == -3.0
    assert np.nanmin(t[0]) < -2.5  # negative T z are kept
    assert f[3] == page.F_CMAP and f[3] != "coolwarm" and (f[4], f[5]) == (0.0, 3.0)
    shown = f[0][np.isfinite(f[0])]
    assert shown.min() == 0.0 and np.sum(shown == 0.0) == 15  # z = isf(0.9) < 0 drawn as 0
    assert "F contrast: z on a sequential scale from 0 upward" in html
    assert "T contrast: z on a diverging scale centred at 0" in html


# 4. every voxel dropped

def test_all_dropped_is_a_warning_box_without_warnings_on_stderr(tmp_path):
    V = 40
    path = make_results(tmp_path, np.full(V, 3), np.full(V, 2), input_parts={"observations": 30})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        html = render(load_report_data(path))
    assert [str(w.message) for w in caught] == []
    assert ("<div class='warning'><b>No voxel was fitted.</b> None of the 40 candidate voxels "
            "has an estimate: 40 with status 3 (not fitted: too few observations") in html
    assert html.index("class='warning'") < html.index("<h2")
    text = page_text(html)
    assert "singular" not in text
    assert "<td>fF</td><td>F</td><td>- (no fitted voxel)</td>" in html
    assert "no z values, so no maps are drawn" in html
    assert "No voxel was fitted: there are no iterations to show." in html
    assert "contrast fF z map" not in html and "df histogram" not in html


def test_no_singular_paragraph_when_none_is_singular(tmp_path):
    html = render(load_report_data(make_results(tmp_path, np.zeros(20), np.full(20, 9))))
    assert "are singular fits" not in html and "No fitted voxel is a singular fit" in html
    assert "class='warning'" not in html


# 5. resumed fits

def test_resumed_voxels_are_in_the_overview(tmp_path):
    summary = {"resumed_voxels": 9300, "seconds": {"fit": [1.0, 1.0, 1.0],
                                                   "total": [2.0, 2.0, 2.0]}}
    html = render(load_report_data(make_results(tmp_path, np.zeros(20), np.full(20, 9),
                                                summary=summary)))
    overview = html[html.index("Overview"):html.index("Contrasts")]
    assert ("<td>resumed</td><td>9,300 voxels were fitted by an earlier run and kept by "
            "--resume; the times are this run&#x27;s") in overview
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    html = render(load_report_data(make_results(fresh, np.zeros(20), np.full(20, 9),
                                                summary={"resumed_voxels": 0})))
    assert "<td>resumed</td>" not in html


# 6. surface wording

@pytest.mark.parametrize("fmt, unit", [("gifti", "vertices"), ("cifti", "grayordinates")])
def test_surface_pages_count_vertices_and_draw_no_background(tmp_path, fmt, unit):
    status = np.array([0] * 20 + [2] * 5 + [3] * 5)
    path = make_results(tmp_path, status, np.full(30, 20), space=json.dumps({"format": fmt}),
                        grid=(40, 1, 1), input_parts={"observations": 20})
    d = load_report_data(path)
    d.background_source = "mean of the observations (packed.h5)"  # as packed.h5 would set it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = page_text(render(d))
    assert [str(w.message) for w in caught] == []
    assert "voxel" not in text.lower()
    assert f"candidate {unit} (in the mask, observed at least once)" in text
    assert "analysis mask" not in text and "mean of the observations" not in text
    assert f"5 {unit} (16.7%) are singular fits" in text
    from mpiblmm.errors import UserError

    # a background image given for a surface study: said, not read and left undrawn (a
    # journey audit: the overview then said "background: none")
    with pytest.raises(UserError) as info:
        load_report_data(path, tmp_path / "mean.func.gii")
    assert str(info.value) == (f"{tmp_path / 'mean.func.gii'}: a surface study's maps are "
                               f"plotted by {dict(gifti='vertex', cifti='grayordinate')[fmt]} "
                               "index, over no image: leave --background out")


def test_surface_category_plots_have_category_ticks_and_a_label():
    values = np.array([0, 0, 2, 3, 8, 8], float)
    cats = [(0, "#2ca02c", "fitted"), (2, "#1f77b4", "singular"), (3, "#d62728", "too few"),
            (8, "#00000000", "not analysed"), (9, "#444444", "absent")]
    fig = fg.by_vertex(values, "status", "status (code)", categorical=cats, unit="vertex")
    ax = fig.axes[0]
    assert list(ax.get_yticks()) == [0, 2, 3, 8]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "3", "8"]
    assert ax.get_ylabel() == "status (code)" and ax.get_xlabel() == "vertex (index)"


def test_surface_z_plot_marks_vertices_not_fitted():
    z = np.array([1.0, np.nan, -2.0, np.nan, np.nan])
    fig = fg.by_vertex(z, "z", "z", not_fitted=np.isnan(z), unit="vertex")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{fg.NOT_FITTED_LABEL} (3; marked above the plot)"]
    marks = ax.get_lines()[0]
    assert list(marks.get_xdata()) == [1, 3, 4]
    assert all(y > 1.0 for y in marks.get_ydata())  # above the axes: never read as a z


# 7. small labels

def test_legend_labels_break_at_words():
    meaning = ("not fitted: too few observations (below min_n or min_fraction, or not more "
               "than the rank of X on the observed rows)")
    text = fg.legend_text(meaning)
    lines = text.split("\n")
    assert lines == ["not fitted: too few observations (below",
                     "min_n or min_fraction, or not more \u2026"]
    assert fg.legend_text("fitted and converged") == "fitted and converged"


def test_status_legend_has_a_visible_swatch_for_not_analysed():
    occupied = np.ones((4, 4, 1), bool)
    values = np.full((4, 4, 1), 8.0)
    values[1:3, 1:3] = 0
    cats = [(0, "#2ca02c", "fitted and converged"),
            (8, "#00000000", "not analysed (outside the analysis mask, or never observed)")]
    fig = fg.mosaic(values, None, "status", "tab10", 0, 9, "status", occupied, categorical=cats)
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["0: fitted and converged",
                     "8: not analysed (outside the analysis mask,\nor never observed)"]
    empty = legend.legend_handles[1]
    assert empty.get_facecolor()[3] == 0.0 and empty.get_edgecolor()[3] == 1.0


def test_n_map_title_and_slice_orientation(tmp_path, monkeypatch):
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # first axis toward the subject's left
    path = make_results(tmp_path, np.array([0] * 20 + [3] * 10), np.full(30, 20),
                        affine=affine)
    d = load_report_data(path)
    rec = Recorder()
    monkeypatch.setattr(fg, "mosaic", rec)
    render(d)
    titles = [a[2] for a, _ in rec.calls]
    assert "observations per voxel (fitted or not)" in titles
    assert all(a[10] == ("L", "A", "S") for a, _ in rec.calls)
    monkeypatch.undo()
    grid = d.grid(d.n.astype(float))
    occupied = np.isfinite(grid)
    fig = fg.mosaic(grid, None, "n", "viridis", 0, 20, "n", occupied,
                    axcodes=fg.orientation(affine))
    ax = fig.axes[0]
    assert ax.get_title() == "axial k = 0"
    assert sorted((t.get_position()[0], t.get_text()) for t in ax.texts) == [(-0.02, "R"),
                                                                            (1.02, "L")]
    assert "right of each slice = subject's left (L), top = anterior (A)" in fig._suptitle.get_text()
    assert fg.orientation(np.eye(4)) == ("R", "A", "S") and fg.orientation(None) is None


def test_slices_keep_the_voxels_physical_proportions(tmp_path, monkeypatch):
    """A maps audit: 0.5 x 0.75 mm voxels were drawn square (imshow's default aspect)."""
    affine = np.diag([0.5, 0.75, 3.0, 1.0])
    d = load_report_data(make_results(tmp_path, np.zeros(30), np.full(30, 20), affine=affine))
    rec = Recorder()
    monkeypatch.setattr(fg, "mosaic", rec)
    render(d)
    assert rec.calls and all(a[11] == 1.5 for a, _ in rec.calls)
    monkeypatch.undo()
    grid = d.grid(d.n.astype(float))
    fig = fg.mosaic(grid, None, "n", "viridis", 0, 20, "n", np.isfinite(grid), aspect=1.5)
    assert all(im.axes.get_aspect() == 1.5 for im in fig.axes[0].images)
    rotated = np.array([[0.0, -0.75, 0, 0], [0.5, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    assert fg.pixel_aspect(rotated) == 1.5 and fg.pixel_aspect(None) == 1.0
    assert fg.pixel_aspect(np.diag([1.0, 1.0, 1.0, 1.0])) == 1.0


@pytest.mark.parametrize("grid", [(2, 1, 1), (1, 1, 1), (3, 1, 2)])
def test_a_grid_whose_first_size_is_the_voxel_count_is_drawn(tmp_path, grid):
    """A grid of N x 1 x 1 (1 x 1 x 1 too) has as many rows as candidate voxels, and the
    status grid was taken for per-voxel values and gridded again: a TypeError traceback."""
    V = int(np.prod(grid))
    path = make_results(tmp_path, np.zeros(V), np.full(V, 20), grid=grid,
                        input_parts={"observations": 20})
    html = render(load_report_data(path))
    assert html.count("data:image/png;base64,") >= 4     # z maps, status, mask, n


@pytest.mark.parametrize("attr, value", [("summary", "not json"), ("space", "[1, 2]"),
                                         ("status_counts", "[1]")])
def test_a_damaged_attribute_is_one_line_not_a_traceback(tmp_path, attr, value):
    import h5py

    from mpiblmm.errors import UserError
    from mpiblmm.report import make_report

    path = make_results(tmp_path, np.zeros(6), np.full(6, 20), input_parts={"observations": 20})
    with h5py.File(path, "r+") as f:
        f.attrs[attr] = value
    with pytest.raises(UserError, match="not a results file as the fit writes it"):
        make_report(path)


def test_the_df_table_says_where_an_f_tests_fewer_rows(tmp_path):
    # a contract audit: "df (numerator) 2" for group where a voxel without group C had 1
    path = make_results(tmp_path, np.zeros(12), np.full(12, 20))
    import h5py
    with h5py.File(path, "r+") as f:
        f["contrasts/fF/df_num"][3] = 1.0
    html = render(load_report_data(path))
    assert "<td>fF</td><td>F</td><td>2 (fewer at 1 voxel that drop columns)</td>" in html
    path = make_results(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None,
                        np.zeros(12), np.full(12, 20))
    assert "<td>fF</td><td>F</td><td>2</td>" in render(load_report_data(path))
