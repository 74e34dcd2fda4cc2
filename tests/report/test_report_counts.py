"""The report's count of voxels beyond z = 2.3 per contrast: both tails only for a two-sided
T contrast; the upper tail for F and 'greater' (their z is isf of a one-tailed p, so
z < -2.3 is p > 0.989), the lower tail for 'less' (its z is -isf(p)); and the threshold
words fit the kind (no "two-sided" for F or one-sided contrasts)."""

from __future__ import annotations

import re

import h5py
import numpy as np
from scipy import stats

from mpiblmm.io.results import ContrastLayout, ResultsLayout, create_results
from mpiblmm.report.data import load_report_data
from mpiblmm.report.page import contrast_summary, render

GRID = (10, 8, 5)


def test_contrast_summary_counts_the_tail_of_an_effect():
    z = np.array([-3.0, -2.5, -2.3, -1.0, 0.0, 2.3, 2.4, 3.5, np.nan])
    two, n_two = contrast_summary("T", "two-sided", z)
    greater, n_greater = contrast_summary("T", "greater", z)
    less, n_less = contrast_summary("T", "less", z)
    f, n_f = contrast_summary("F", "two-sided", z)  # an F contrast's stored alternative
    assert (n_two, n_greater, n_less, n_f) == (4, 2, 2, 2)
    assert "|z| &gt; 2.3" in two and "two-sided" in two
    for text in (greater, less, f):
        assert "|z|" not in text and "two-sided" not in text
    assert "z &gt; 2.3" in greater and "z &gt; 2.3" in f and "z &lt; -2.3" in less
    assert "p &lt; 0.001" in f and "p &lt; 0.002" in two


def _results(folder, p, estimate):
    """A complete results file of V voxels with an F, a 'greater', a 'less' and a two-sided
    T contrast, all with the p-values ``p`` (T: signed by ``estimate``)."""
    V = p.size
    contrasts = (ContrastLayout("noiseF", "F", ((0.0, 1.0),)),
                 ContrastLayout("noise_gt", "T", ((0.0, 1.0),), "greater"),
                 ContrastLayout("noise_lt", "T", ((0.0, 1.0),), "less"),
                 ContrastLayout("noise", "T", ((0.0, 1.0),)))
    lay = ResultsLayout(n_voxels=V, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=contrasts, method="REML", grid_shape=GRID,
                        affine=tuple(map(tuple, np.eye(4).tolist())))
    vox = np.argwhere(np.ones(GRID, bool)).astype(np.int32)[:V]  # C order
    path = folder / "results.h5"
    w = create_results(path, lay, vox)
    values = {"status": np.zeros(V, np.uint8), "n": np.full(V, 20, np.int32),
              "iterations": np.full(V, 5, np.int32)}
    for c in contrasts:
        values[f"contrasts/{c.name}/p"] = p
        values[f"contrasts/{c.name}/neglog10p"] = -np.log10(p)
        if c.kind == "T":
            values[f"contrasts/{c.name}/estimate"] = estimate
            values[f"contrasts/{c.name}/df"] = np.full(V, 18.0)
        else:
            values[f"contrasts/{c.name}/df_den"] = np.full(V, 18.0)
            values[f"contrasts/{c.name}/df_num"] = np.ones(V)
    w.write(0, V, values)
    w.finish({})
    return path


def test_report_page_counts_f_one_sided_and_two_sided_contrasts(tmp_path):
    rng = np.random.default_rng(5)
    V = 400
    p = np.concatenate([rng.uniform(0.0001, 0.02, 40), rng.uniform(0.995, 1.0, 60),
                        rng.uniform(0.02, 0.98, V - 100)])
    estimate = rng.choice([-1.0, 1.0], V)
    page = render(load_report_data(_results(tmp_path, p, estimate)))
    found = {m.group(1): (m.group(2), int(m.group(3)), int(m.group(4)))
             for m in re.finditer(r"<p>(noise\w*): (.*?): (\d+) of (\d+)\.</p>", page)}
    assert set(found) == {"noiseF", "noise_gt", "noise_lt", "noise"}
    upper = int(np.sum(stats.norm.isf(p) > 2.3))  # the voxels with p < 0.0107
    assert 20 < upper < 40 and int(np.sum(-stats.norm.isf(p) > 2.3)) == 60  # p > 0.989
    two = int(np.sum(stats.norm.isf(p / 2) > 2.3))  # p < 0.021: |z| > 2.3
    assert found["noiseF"][1:] == (upper, V)
    assert found["noise_gt"][1:] == (upper, V)
    assert found["noise_lt"][1:] == (upper, V)
    assert found["noise"][1:] == (two, V) and two > upper
    assert "two-sided" in found["noise"][0]
    for name in ("noiseF", "noise_gt", "noise_lt"):
        assert "two-sided" not in found[name][0] and "|z|" not in found[name][0], name


def test_report_counts_fitted_voxels_with_dropped_columns(tmp_path):
    """Fitted voxels with a NaN in beta (columns lme4 drops where their observed rows leave X
    rank deficient) are counted on the page; a run without them says nothing of it."""
    V = 50
    p = np.full(V, 0.5)
    path = _results(tmp_path, p, np.ones(V))
    beta = np.ones((V, 2))
    with h5py.File(path, "r+") as f:
        f["beta"][...] = beta
    assert "leave X rank deficient" not in render(load_report_data(path))
    beta[[3, 7, 11], 1] = np.nan
    with h5py.File(path, "r+") as f:
        f["beta"][...] = beta
    page = render(load_report_data(path))
    assert "<p>3 fitted voxels (6.0%) leave X rank deficient on their observed rows" in page


def test_a_contrast_not_estimable_at_fitted_voxels_counts_and_marks_them(tmp_path, monkeypatch):
    """A journey audit: voxels fitted without a column a contrast needs (a group none of
    whose images is observed there) have no p; they were counted in the denominator ("11 of
    600" where 420 were tested) and drawn transparent, like the background.  Now the count
    is of the tested voxels, with a word on the others, and the map marks them in their own
    colour."""
    from mpiblmm.report import figures as fg

    V = 60
    p = np.full(V, 0.5)
    p[:5] = 1e-4
    p[40:] = np.nan                      # 20 fitted voxels that cannot estimate it
    path = _results(tmp_path, p, np.ones(V))
    calls = []
    real = fg.mosaic

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(fg, "mosaic", record)
    page = render(load_report_data(path))
    line = re.search(r"<p>noise: (.*?): (\d+) of (\d+) \((\d+) fitted voxels cannot estimate "
                     r"it: their observed rows drop columns it needs; drawn in purple\)\.</p>",
                     page)
    assert line is not None and line.group(2, 3, 4) == ("5", "40", "20")
    zmaps = [kwargs for args, kwargs in calls if args[2].startswith("contrast noise ")]
    assert zmaps
    for args, kwargs in calls:
        if args[2].startswith("contrast "):
            marked = args[12] if len(args) > 12 else kwargs.get("no_estimate")
            assert int(marked.sum()) == 20 and marked.reshape(-1)[40:60].all()


def test_the_mosaic_legends_voxels_without_an_estimate():
    from mpiblmm.report import figures as fg

    grid = np.zeros((8, 8, 1))
    occupied = np.ones((8, 8, 1), bool)
    none = np.zeros_like(occupied)
    none[1:3, 1:7] = True
    grid[none] = np.nan
    fig = fg.mosaic(grid, None, "z", "coolwarm", -3, 3, "z", occupied, no_estimate=none)
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == [fg.NO_ESTIMATE_LABEL]
    surface = fg.by_vertex(grid.reshape(-1), "z", "z", no_estimate=none.reshape(-1))
    assert any(fg.NO_ESTIMATE_LABEL in t.get_text() for t in surface.axes[0].get_legend().get_texts())


def test_the_contrasts_come_in_the_spec_s_order(tmp_path):
    """A journey audit: the report listed them by name, as HDF5 lists the groups; each group
    now has its place in the spec (attribute order)."""
    path = _results(tmp_path, np.full(20, 0.5), np.ones(20))
    with h5py.File(path, "r") as f:
        assert list(f["contrasts"]) == ["noise", "noiseF", "noise_gt", "noise_lt"]
        assert [int(f[f"contrasts/{n}"].attrs["order"]) for n in f["contrasts"]] == [3, 0, 1, 2]
    data = load_report_data(path)
    assert [c.name for c in data.contrasts] == ["noiseF", "noise_gt", "noise_lt", "noise"]
    page = render(data)
    assert [page.index(f"<p>{n}: ") for n in ("noiseF", "noise_gt", "noise_lt", "noise")] == \
        sorted(page.index(f"<p>{n}: ") for n in ("noiseF", "noise_gt", "noise_lt", "noise"))
