"""Maps as FSL/AFNI users check them: header codes kept, background status distinct, z maps
equal ``norm.isf(p/2) * sign`` (also far beyond float underflow, against mpmath), FDR q-values,
integer maps integer, and every file named in maps.json."""

from __future__ import annotations

import json

import mpmath
import numpy as np
import pytest
from scipy import stats

import h5py  # noqa: E402
import nibabel as nib  # noqa: E402

from mpiblmm.io.derived import STATUS_NOT_ANALYSED, bh_qvalues, z_from_neglog10p, z_upper
from mpiblmm.io.export import export_nifti
from mpiblmm.io.ingest import pack_images
from mpiblmm.io.nifti import nifti_space, read_grid
from mpiblmm.io.results import ContrastLayout, ResultsLayout, create_results
from tests.io.helpers import AFFINE, GRID, make_study


def mp_z_two_sided(neglog10p: float) -> float:
    """Reference: the z > 0 with 2 P(Z > z) = 10**-neglog10p, in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    target = -mpmath.mpf(neglog10p) * mpmath.log(10)

    def f(z):
        return mpmath.log(mpmath.erfc(z / mpmath.sqrt(2))) - target

    z0 = float(np.sqrt(max(2.0 * float(-target), 1.0)))
    return float(mpmath.findroot(f, z0))


def test_z_equals_isf_of_half_p_with_the_sign_of_the_estimate():
    p = np.array([1.0, 0.9, 0.5, 0.05, 1e-3, 1e-10, 1e-100, 1e-290])
    est = np.array([1.0, -2.0, 3.0, -0.5, 0.1, -7.0, 2.0, -1.0])
    z = z_from_neglog10p(-np.log10(p), "T", "two-sided", est)
    np.testing.assert_allclose(z, stats.norm.isf(p / 2) * np.sign(est), rtol=1e-12, atol=1e-12)


def test_z_stays_accurate_where_p_underflows():
    nl = np.array([290.0, 300.5, 320.0, 400.0, 1000.0, 5000.0, 1e5])
    z = z_from_neglog10p(nl, "T", "two-sided", np.ones(nl.size))
    ref = np.array([mp_z_two_sided(x) for x in nl])
    np.testing.assert_allclose(z, ref, rtol=1e-12)
    assert np.all(np.diff(z) > 0)  # and continuous across the switch at p = 1e-300


def test_one_sided_and_f_z_keep_their_p():
    p = np.array([0.3, 0.01, 0.99, 1e-50])
    nl = -np.log10(p)
    np.testing.assert_allclose(z_from_neglog10p(nl, "F"), stats.norm.isf(p), rtol=1e-11)
    np.testing.assert_allclose(z_from_neglog10p(nl, "T", "greater"), stats.norm.isf(p), rtol=1e-11)
    np.testing.assert_allclose(z_from_neglog10p(nl, "T", "less"), -stats.norm.isf(p), rtol=1e-11)
    assert np.isnan(z_upper(np.array([np.nan]))).all()
    assert np.isnan(z_from_neglog10p(np.array([2.0]), "T", sign=np.array([np.nan]))).all()


def test_a_one_sided_z_is_the_two_sided_z_also_where_the_effect_goes_the_other_way():
    # A contract audit: a "less" contrast at t = 600 (df 118) had p = 1 and z = inf, from
    # about t = 9.6 on; at t = 9 z was 7.8357 where it is 7.8371.  z is the same whatever the
    # alternative (RESULTS.md): here from t and df, checked against 50-digit arithmetic.
    def log10_tail(x):                                  # log10 P(T > |x|), df 118
        mpmath.mp.dps = 60
        u = mpmath.mpf(118) / (118 + mpmath.mpf(abs(x)) ** 2)
        return float(mpmath.log10(mpmath.betainc(59, 0.5, 0, u, regularized=True) / 2))

    df = np.full(6, 118.0)
    for alternative, t in (("less", np.array([600.0, 0.98, 9.0, 24248.0, 1.2e7, -3.0])),
                           ("greater", -np.array([600.0, 0.98, 9.0, 24248.0, 1.2e7, -3.0]))):
        tails = np.array([log10_tail(x) for x in t])
        ref = np.sign(t) * np.array([mp_z_two_sided(-(lt + np.log10(2.0))) for lt in tails])
        # the stored one-sided p: the small tail where t goes its way, else 1 - that
        its_way = t < 0 if alternative == "less" else t > 0
        p = np.where(its_way, 10.0 ** tails, 1.0 - 10.0 ** tails)
        nl = np.where(its_way, -tails, -np.log10(p)) + 0.0
        z = z_from_neglog10p(nl, "T", alternative, t=t, df=df)
        np.testing.assert_allclose(z, ref, rtol=1e-11)
    z = z_from_neglog10p(np.array([np.nan]), "T", "less", t=np.array([np.nan]), df=df[:1])
    assert np.isnan(z).all()


def test_bh_qvalues_match_the_definition():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=40) ** 3
    p[5] = np.nan
    include = np.ones(40, bool)
    include[:4] = False
    q = bh_qvalues(p, include)
    use = include & np.isfinite(p)
    vals, m = p[use], use.sum()
    # q_i = min over p_j >= p_i of p_j m / rank(p_j)   (written as a plain double loop)
    ranks = np.array([np.sum(vals <= v) for v in vals])
    ref = np.array([min(1.0, min(vals[j] * m / ranks[j] for j in range(m) if vals[j] >= v))
                    for v in vals])
    np.testing.assert_allclose(q[use], ref, rtol=1e-14)
    assert np.isnan(q[~use]).all()


def _mni_image(path, sform_code=4, qform_code=4, intent=None):
    img = nib.Nifti1Image(np.ones(GRID, np.float32), AFFINE)
    img.set_sform(AFFINE, code=sform_code)
    img.set_qform(AFFINE, code=qform_code)
    if intent:
        img.header.set_intent(intent)
    nib.save(img, str(path))
    return path


def test_packing_keeps_the_input_codes(tmp_path):
    study = make_study(tmp_path / "s", n=3)
    for i, path in enumerate(study["images"]):  # re-save as MNI (sform 4, qform 2)
        img = nib.load(str(path))
        img.set_sform(AFFINE, code=4)
        img.set_qform(AFFINE, code=2)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), AFFINE, img.header), str(path))
    packed = pack_images(study["images"], tmp_path / "p" / "packed.h5")
    info = json.loads(packed.space)
    assert (info["format"], info["qform_code"], info["sform_code"]) == ("nifti", 2, 4)
    with h5py.File(tmp_path / "p" / "packed.h5", "r") as f:
        assert f.attrs["space"] == packed.space


def _results(tmp_path, space: str):
    lay = ResultsLayout(n_voxels=4, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=(ContrastLayout("b", "T", ((0.0, 1.0),)),
                                   ContrastLayout("ab", "F", ((1.0, 0.0), (0.0, 1.0)))),
                        method="REML", grid_shape=GRID, affine=tuple(map(tuple, AFFINE.tolist())))
    vox = np.array([[0, 0, 0], [1, 2, 1], [2, 2, 2], [3, 4, 2]], dtype=np.int32)
    path = tmp_path / "r" / "results.h5"
    w = create_results(path, lay, vox)
    w.file.attrs["space"] = space
    p = np.array([0.04, 1e-320, 0.5, np.nan])
    nl = np.array([-np.log10(0.04), 321.7, -np.log10(0.5), np.nan])
    w.write(0, 4, {"status": np.array([0, 2, 1, 3], dtype=np.uint8),
                   "n": np.array([9, 9, 8, 2], dtype=np.int32),
                   "contrasts/b/estimate": np.array([-1.0, 2.0, 0.5, np.nan]),
                   "contrasts/b/p": p, "contrasts/b/neglog10p": nl,
                   "contrasts/ab/p": p, "contrasts/ab/neglog10p": nl})
    w.finish({})
    return path, vox, nl


def test_export_keeps_codes_and_marks_the_background(tmp_path):
    space = nifti_space(nib.load(str(_mni_image(tmp_path / "mni.nii.gz", 4, 4))).header)
    path, vox, nl = _results(tmp_path, space)
    export_nifti(path, fdr=True)
    out = tmp_path / "r" / "nifti"

    def load(stem):
        return nib.load(str(out / f"{stem}.nii.gz"))

    for stem in ("beta", "status", "mask", "con_b_z", "n"):
        img = load(stem)
        assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4, stem
        np.testing.assert_allclose(img.affine, AFFINE)
    status = np.asanyarray(load("status").dataobj)
    assert status.dtype == np.uint8
    inside = np.zeros(GRID, bool)
    inside[tuple(vox.T)] = True
    assert (status[~inside] == STATUS_NOT_ANALYSED).all()
    np.testing.assert_array_equal(status[tuple(vox.T)], [0, 2, 1, 3])
    mask = np.asanyarray(load("mask").dataobj)
    assert mask.dtype == np.uint8 and mask.sum() == 3 and list(mask[tuple(vox.T)]) == [1, 1, 1, 0]
    assert np.asanyarray(load("n").dataobj).dtype == np.int32
    z = np.asanyarray(load("con_b_z").dataobj)[tuple(vox.T)]
    assert z[0] == pytest.approx(-stats.norm.isf(0.02), rel=1e-12)
    assert z[1] == pytest.approx(mp_z_two_sided(321.7), rel=1e-12)
    assert np.isnan(z[3])
    zf = np.asanyarray(load("con_ab_z").dataobj)[tuple(vox.T)]
    assert zf[0] == pytest.approx(stats.norm.isf(0.04), rel=1e-12) and zf[1] > 37
    assert load("con_b_z").header.get_intent()[0] == "z score"
    q = np.asanyarray(load("con_b_q").dataobj)[tuple(vox.T)]
    np.testing.assert_allclose(q[:3], bh_qvalues(np.array([0.04, 1e-320, 0.5]), np.ones(3, bool)))
    index = json.loads((out / "maps.json").read_text())
    assert set(index) == {p.name for p in out.glob("*.nii.gz")}
    with h5py.File(path, "r") as f:  # every source is the results file's path, as written
        assert all(entry["dataset"] in f and not entry["dataset"].startswith("/")
                   for entry in index.values()), index
    beta = load("beta")  # volume names for AFNI: BRICK_LABS in an AFNI extension
    ext = [e for e in beta.header.extensions if e.get_code() == 4]
    assert len(ext) == 1
    xml = ext[0].get_content().decode()
    assert '"a~b"' in xml and 'atr_name="BRICK_LABS"' in xml
    dim = beta.header["dim"]
    assert f'NIfTI_nums="{dim[1]},{dim[2]},{dim[3]},2,1,64"' in xml
    assert index["status.nii.gz"]["codes"]["8"].startswith("not analysed")
    assert index["con_b_z.nii.gz"]["volumes"] == ["z"]
    # what each z holds follows its test (it said "signed ... for two-sided T" for every z)
    assert index["con_b_z.nii.gz"]["derived"].startswith(
        "standard normal z with the two-sided p, signed by the estimate")
    assert "F test's p, upper tail" in index["con_ab_z.nii.gz"]["derived"]


def test_codes_of_the_first_image_survive_but_not_its_intent(tmp_path):
    img = _mni_image(tmp_path / "a.nii", sform_code=2, qform_code=0, intent="estimate")
    grid = read_grid(img)
    info = json.loads(grid.space)
    assert (info["qform_code"], info["sform_code"], info["intent"][0]) == (0, 2, "estimate")
    path, _, _ = _results(tmp_path, grid.space)
    export_nifti(path)
    beta = nib.load(str(tmp_path / "r" / "nifti" / "beta.nii.gz"))
    assert (int(beta.header["qform_code"]), int(beta.header["sform_code"])) == (0, 2)
    assert beta.header.get_intent()[0] == "none"  # the input's intent described the input
    assert not (tmp_path / "r" / "nifti" / "con_b_q.nii.gz").exists()  # q maps only on request


def test_an_export_removes_the_maps_an_earlier_one_listed_and_no_other_file(tmp_path):
    """Maps are what maps.json lists: a q map of an earlier `export --fdr` goes when the next
    export writes none; files the exports did not write stay."""
    space = nifti_space(nib.load(str(_mni_image(tmp_path / "mni.nii.gz", 4, 4))).header)
    path, _, _ = _results(tmp_path, space)
    out = tmp_path / "r" / "nifti"
    export_nifti(path, fdr=True)
    assert (out / "con_b_q.nii.gz").is_file()
    (out / "mine.nii.gz").write_bytes(b"x")
    (out / "notes.txt").write_text("x")
    export_nifti(path)
    index = json.loads((out / "maps.json").read_text())
    assert not (out / "con_b_q.nii.gz").exists()
    assert {p.name for p in out.iterdir()} == set(index) | {"maps.json", "mine.nii.gz",
                                                            "notes.txt"}


def test_z_meaning_follows_the_test():
    from mpiblmm.io.export import z_meaning

    assert "z = isf(p)" in z_meaning("T", "greater")
    assert "z = -isf(p)" in z_meaning("T", "less")
    assert "sign(estimate)" in z_meaning("T", "two-sided")
    assert "not signed" in z_meaning("F", "two-sided")
