"""A voxel's bits do not depend on which voxels share its chunk, at many levels.

numpy's einsum reduces over the levels by another loop when the voxel axis has length one,
and with thousands of levels its partial sums round differently: a voxel alone in an
evaluation block, in a chunk's missing-data group or in Satterthwaite's set got other last
bits than among others, so results changed with the rank count (seen on an ABCD-like study
through the CLI).  Checked here on one factor with 10,000 levels (evaluation blocks of 8 to
9 voxels), with complete and with missing data.
"""

import numpy as np
import pytest

from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.satterthwaite import satterthwaite_setup
from mpiblmm.lmm.structures import levels


def _forms(missing: bool, v: int = 100):
    rng = np.random.default_rng(21)
    n_sub = 10000
    sub = np.repeat(np.arange(n_sub), 2)
    n = sub.size
    X = np.column_stack([np.ones(n), rng.normal(size=n), np.tile([0.0, 1.0], n_sub)])
    rd = random_design([sub], [np.ones((n, 1))])
    Y = X @ rng.normal(size=(3, v)) + rng.normal(size=(n_sub, v))[sub] + rng.normal(size=(n, v))
    if missing:
        Y[rng.random((n, v)) < 0.05] = np.nan
    return product_forms(X, rd, Y)


def test_no_evaluation_block_holds_one_voxel_of_several():
    pf = _forms(False, v=250)
    for v in (2, 9, 17, 100, 101, 250):
        sizes = [s.stop - s.start for s in levels.voxel_blocks(pf.take(np.arange(v)))]
        assert sum(sizes) == v and min(sizes) >= 2 and max(sizes) - min(sizes) <= 1, sizes


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "missing"])
def test_level_sums_fit_and_satterthwaite_of_a_voxel_in_any_company(missing):
    pf = _forms(missing)
    lam = np.full((pf.n_voxels, 1, 1), 0.8)
    whole = levels.products_and_sums(pf, lam, "REML")
    res = fit(pf)
    pre = satterthwaite_setup(pf, res.s2, res.D, res.method)
    for idx in (np.array([99]), np.array([97, 98, 99]), np.arange(71, 100), np.arange(0, 100, 7)):
        part = levels.products_and_sums(pf.take(idx), lam[idx], "REML")
        np.testing.assert_array_equal(part[0].XtViX, whole[0].XtViX[idx])
        for key in ("R", "G", "RR"):
            np.testing.assert_array_equal(getattr(part[4], key), getattr(whole[4], key)[idx])
        sub = pf.take(idx)
        r = fit(sub)
        np.testing.assert_array_equal(r.llh, res.llh[idx])
        np.testing.assert_array_equal(r.beta, res.beta[idx])
        p = satterthwaite_setup(sub, r.s2, r.D, r.method)
        np.testing.assert_array_equal(p.cov_beta, pre.cov_beta[idx])
        np.testing.assert_array_equal(p.vcov_varpar, pre.vcov_varpar[idx])


def test_contrast_df_and_f_of_a_voxel_alone_equal_its_values_among_others():
    """An audit found Satterthwaite df 1-2 ulp apart between a chunk of 12 voxels and the
    same voxels one by one (`--chunk-voxels 1`, and slabs at other rank counts): einsum
    reduced ``g' V g`` over two axes in another order when the voxel axis had length one.
    The quadratic forms of the contrasts now reduce over one contiguous axis."""
    from mpiblmm.lmm.inference import f_contrast, t_contrast

    rng = np.random.default_rng(4)
    n_sub, v = 30, 40
    sub = np.repeat(np.arange(n_sub), 3)
    group = np.repeat(rng.integers(0, 3, n_sub), 3)
    sex = np.repeat(rng.integers(0, 2, n_sub), 3).astype(float)
    gB, gC = (group == 1) * 1.0, (group == 2) * 1.0
    X = np.column_stack([np.ones(sub.size), gB, gC, sex, gB * sex, gC * sex])
    rd = random_design([sub], [np.ones((sub.size, 1))])
    Y = X @ rng.normal(size=(6, v)) + rng.normal(size=(n_sub, v))[sub] \
        + rng.normal(size=(sub.size, v))
    pf = product_forms(X, rd, Y)
    res = fit(pf)
    pre = satterthwaite_setup(pf, res.s2, res.D, res.method)
    L = np.eye(6)[[4, 5]]
    t_all = t_contrast(pre, res.beta, np.eye(6)[1])
    f_all = f_contrast(pre, res.beta, L)
    for i in range(v):
        one = pf.take(np.array([i]))
        r = fit(one)
        p = satterthwaite_setup(one, r.s2, r.D, r.method)
        t, f = t_contrast(p, r.beta, np.eye(6)[1]), f_contrast(p, r.beta, L)
        for name in ("t", "df", "p"):
            np.testing.assert_array_equal(getattr(t, name), getattr(t_all, name)[[i]], name)
        for name in ("F", "df_den", "p"):
            np.testing.assert_array_equal(getattr(f, name), getattr(f_all, name)[[i]], name)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_every_reference_structure_gives_a_voxel_alone_its_bits_among_others(method):
    """Every random-effects structure of the reference datasets (one factor with slopes,
    crossed, nested, three factors, missing data), through analyse_chunk with the datasets'
    contrasts: each of 12 voxels alone has the bits it has in their chunk (what
    `--chunk-voxels 1` or a one-voxel slab gives)."""
    from mpiblmm.lmm.analysis import ContrastDef, Model, Settings, analyse_chunk
    from tests.refdata import list_datasets, load_dataset

    for name in list_datasets():
        ds = load_dataset(name)
        rd = random_design([f.codes for f in ds.factors], [f.Z for f in ds.factors],
                           names=[f.name for f in ds.factors])
        contrasts = tuple(ContrastDef(c.name, np.atleast_2d(np.asarray(c.L, float)), c.kind)
                          for c in ds.contrasts)
        model, Y = Model(ds.X, rd, contrasts), ds.Y.T[:12]      # (voxels, n)
        whole = analyse_chunk(model, Y, Settings(method=method))
        for v in range(Y.shape[0]):
            alone = analyse_chunk(model, Y[v:v + 1], Settings(method=method))
            for key, values in whole.items():
                np.testing.assert_array_equal(alone[key][0], values[v],
                                              err_msg=f"{name} voxel {v} {key}")
