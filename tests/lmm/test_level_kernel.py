"""The compiled per-level evaluation of the one-factor model
(mpiblmm/lmm/structures/_level_kernel.c).

- it is built (scripts/setup.sh installs the package, which compiles it), and a library of
  another version is refused;
- its V^-1 products, log|V|, level sums of the scores and information and the
  Satterthwaite setup equal the numpy path's (:mod:`~mpiblmm.lmm.structures.levels`,
  itself checked against dense algebra and lme4) for one, two and three effects per level,
  REML and ML, with complete (shared) and missing (per-voxel) data, in both layouts the fit
  hands it (the chunk's, voxels innermost, and a subset's, voxel first), and at any square
  root Lambda of D;
- a voxel gets the same bits in any batch, tile, layout, and with shared or its own forms;
- the one-call evaluation (pass "gls": the GLS fit, s2 and lme4's logLik formed in the kernel
  by the Cholesky factor of X'V^-1X) equals the numpy path's profiled fit; it reads a
  subset's forms in place through their rows (``VoxelRows``) with the bits of a copy, and a
  voxel whose X'V^-1X is not positive definite gets NaN;
- fits through the kernel reach the numpy path's optima;
- the same equality on random one-factor designs (hypothesis).
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings  # the `test` extra
from hypothesis import strategies as st

from mpiblmm.lmm.analysis import joint_forms
from mpiblmm.lmm.estimate import fit
from mpiblmm.lmm.fisher import evaluate
from mpiblmm.lmm.model import VoxelRows
from mpiblmm.lmm.products import product_forms, random_design
from mpiblmm.lmm.structures import level_kernel, levels


def _forms(q=2, missing=True, v=45, n_sub=30, visits=4, p=3, seed=0):
    """Product forms of a longitudinal one-factor design, (1 | subject) or (1 + t | subject)."""
    rng = np.random.default_rng(seed)
    n = n_sub * visits
    sub = np.repeat(np.arange(n_sub), visits)
    t = np.tile(np.arange(visits, dtype=float), n_sub)
    X = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(p - 1)])
    Zk = np.column_stack([np.ones(n), t, (t - 1.5) ** 2][:q])
    rd = random_design([sub], [Zk])
    Y = X @ rng.normal(size=(p, v)) + rng.normal(size=(n, v))
    Y += (Zk[:, None, :] * rng.normal(size=(n_sub, v, q))[sub]).sum(-1)
    obs = rng.random(Y.shape) > 0.1 if missing else None
    pf = product_forms(X, rd, Y, observed=obs)
    assert pf.shared == (not missing)
    lam = rng.normal(size=(v, q, q))           # any square root of D, not only triangular
    lam[0] = 0.0                               # D = 0
    if q >= 2:
        lam[1, :, 1] = 0.0                     # a singular D
    return pf, lam


def _numpy(monkeypatch):
    monkeypatch.setattr(level_kernel, "_EVAL", None)
    assert not level_kernel.applies(2)


def _profiled(pf, lam, method, want_sums=True):
    """The profiled fit as the estimator gets it (``algebra.profiled_llh``): the kernel's one
    call, or with the kernel off (:func:`_numpy`) the numpy path's ``products_and_sums``."""
    llh, beta, s2, vp, sums = pf.algebra.profiled_llh(pf, (lam,), method, want_sums)
    out = dict(llh=llh, beta=beta, s2=s2, XtViX=vp.XtViX, XtViY=vp.XtViY, YtViY=vp.YtViY,
               logdetV=vp.logdetV)
    if want_sums:
        out.update(R=sums.R, G=sums.G, RR=sums.RR)
    return out


#: Rows of a subset in any order, with a repeat; voxel 0 has D = 0, voxel 1 a singular D.
ROWS = np.array([7, 3, 3, 40, 0, 12, 44, 1, 21, 5])


def test_the_kernel_is_built():
    assert level_kernel.available(), ("mpiblmm/lmm/structures/_level_kernel.c was not built: "
                                      "run scripts/setup.sh")
    assert all(level_kernel.applies(q) for q in (1, 2, 3)) and not level_kernel.applies(4)


def test_a_library_of_another_version_is_refused(monkeypatch):
    monkeypatch.setattr(level_kernel, "ABI", level_kernel.ABI + 1)
    assert level_kernel._load() == (None, "built from older sources")


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
@pytest.mark.parametrize("q", [1, 2, 3])
def test_kernel_equals_the_numpy_path(q, missing, method, monkeypatch):
    # the one-call fit (pass "gls": the GLS fit, s2 and logLik in the kernel) and the V^-1
    # products alone, on the chunk's forms, a copied subset (voxel first) and rows read in place
    pf, lam = _forms(q, missing)
    sub = pf.take(np.arange(3, 40))                       # a subset: voxel-first layout
    assert pf.algebra.reads_rows and isinstance(pf.voxels(ROWS), VoxelRows)
    fast = [_profiled(pf, lam, method), _profiled(sub, lam[3:40], method),
            _profiled(pf.voxels(ROWS), lam[ROWS], method)]
    fast_vinv = levels.vinv_single_fast(pf, lam)
    _numpy(monkeypatch)
    assert not pf.algebra.reads_rows and not isinstance(pf.voxels(ROWS), VoxelRows)
    slow = [_profiled(pf, lam, method), _profiled(sub, lam[3:40], method),
            _profiled(pf.take(ROWS), lam[ROWS], method)]
    slow_vinv = levels.vinv_single_fast(pf, lam)
    for f, s in zip(fast, slow):
        assert np.isfinite(s["llh"]).all()
        for key in s:
            scale = np.abs(s[key]).max()
            np.testing.assert_allclose(f[key], s[key], rtol=1e-12, atol=1e-13 * scale,
                                       err_msg=key)
    for key in ("XtViX", "XtViY", "YtViY", "logdetV"):
        np.testing.assert_allclose(getattr(fast_vinv, key), getattr(slow_vinv, key),
                                   rtol=1e-12, atol=1e-13 * np.abs(getattr(slow_vinv, key)).max())


def _same_bits(a: dict, b: dict, idx=slice(None)):
    for key in a:
        assert np.array_equal(a[key][idx], b[key], equal_nan=True), key


@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
def test_a_voxel_gets_the_same_bits_in_any_batch_tile_or_layout(missing):
    # 45 voxels: tiles of 32 and 8 and a rest of 5; subsets put each voxel in other tiles
    pf, lam = _forms(2, missing, v=45)
    whole = _profiled(pf, lam, "REML")
    rng = np.random.default_rng(1)
    for size in (2, 7, 8, 16, 17, 33, 45):
        idx = np.sort(rng.choice(45, size, replace=False))
        _same_bits(whole, _profiled(pf.take(idx), lam[idx], "REML"), idx)
    _same_bits(whole, _profiled(pf.take(np.array([4])), lam[4:5], "REML"), slice(4, 5))


def test_shared_forms_give_the_same_bits_as_per_voxel_ones():
    # a small chunk fits its complete-data voxels with per-voxel copies of the shared forms
    # (analysis.joint_forms): the same arithmetic, the same bits
    pf, lam = _forms(2, missing=False, v=20)
    joint = joint_forms([pf])
    assert not joint.shared and joint.ZtX.shape[0] == 20
    _same_bits(_profiled(pf, lam, "REML"), _profiled(joint, lam, "REML"))
    sub = np.arange(5, 20)
    _same_bits(_profiled(pf.take(sub), lam[sub], "ML"), _profiled(joint.take(sub), lam[sub], "ML"))


def test_a_non_positive_determinant_gives_nan_not_a_number():
    # |S_j| <= 0 cannot happen for real Lambda (S_j = I + Lambda'B_j Lambda); a NaN Lambda
    # (isolated upstream by fisher.evaluate) must give NaN, never a finite log|V|
    pf, lam = _forms(2, missing=True, v=10)
    lam = lam.copy()
    lam[2, 0, 0] = np.nan
    cxx, cxy, cyy, logdet = level_kernel.products(pf, lam)
    assert np.isnan(logdet[2]) and np.isfinite(np.delete(logdet, 2)).all()


@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
def test_rows_read_in_place_give_the_bits_of_a_copy(missing):
    pf, lam = _forms(2, missing, v=45)
    whole = _profiled(pf, lam, "REML")
    rows = VoxelRows(pf, ROWS)
    in_place = _profiled(rows, lam[ROWS], "REML")
    _same_bits(in_place, _profiled(pf.take(ROWS), lam[ROWS], "REML"))
    _same_bits(whole, in_place, ROWS)
    # without the sums: the same fit, to the bit
    _same_bits({k: in_place[k] for k in ("llh", "beta", "s2", "XtViX", "logdetV")},
               _profiled(rows, lam[ROWS], "REML", want_sums=False))
    # a subset of a subset, a slice, and the level sums alone (lazy halvings) read rows too
    again = rows.take(np.array([4, 1]))
    assert np.array_equal(again.rows, ROWS[[4, 1]])
    _same_bits(whole, _profiled(again, lam[ROWS[[4, 1]]], "REML"), ROWS[[4, 1]])
    sl = VoxelRows(pf, slice(10, 20))
    _same_bits(whole, _profiled(sl, lam[10:20], "REML"), slice(10, 20))
    A = np.linalg.inv(whole["XtViX"][ROWS])
    a = levels.level_sums(rows, lam[ROWS], whole["beta"][ROWS], whole["s2"][ROWS], A)
    b = levels.level_sums(pf.take(ROWS), lam[ROWS], whole["beta"][ROWS], whole["s2"][ROWS], A)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("R", "G", "RR"))
    # any other reader gets the copy's arrays
    for name in ("XtX", "XtY", "YtY", "ZtX", "ZtY", "ZtZ", "n"):
        assert np.array_equal(getattr(rows, name), getattr(pf.take(ROWS), name)), name


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
def test_sums_added_to_a_lazy_halving_have_the_bits_of_an_eager_one(missing, method):
    # Fisher Scoring evaluates a group of halvings for l only and adds the sums to the
    # accepted ones, or evaluates them with the sums when they are few: which one depends on
    # how many voxels share the call, so both must give a voxel the same bits
    from mpiblmm.lmm.fisher import _with_sums
    pf, lam = _forms(2, missing, v=20)
    sub = pf.voxels(ROWS[ROWS < 20])
    eager = evaluate(sub, (lam[sub.rows],), method, need_z=True)
    lazy = _with_sums(evaluate(sub, (lam[sub.rows],), method, need_z=False), sub,
                      (lam[sub.rows],), method)
    for key in ("R", "G", "RR"):
        assert np.array_equal(getattr(lazy.sums, key), getattr(eager.sums, key)), key
    assert np.array_equal(lazy.llh, eager.llh) and np.array_equal(lazy.beta, eager.beta)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_a_voxel_whose_gls_matrix_is_not_positive_definite_fails_alone(method):
    pf, lam = _forms(2, missing=True, v=12)
    XtX = pf.XtX.copy()
    XtX[2] = -XtX[2]                            # X'V^-1X negative definite at voxel 2
    XtX[5, 1, 1] = 0.0                          # a zero pivot at voxel 5
    bad = dataclasses.replace(pf, XtX=XtX)
    good, got = _profiled(pf, lam, method), _profiled(bad, lam, method)
    for key in ("llh", "beta", "s2"):
        assert np.isnan(got[key][[2, 5]]).all(), key
        keep = np.delete(np.arange(12), [2, 5])
        assert np.array_equal(got[key][keep], good[key][keep]), key
    ev = evaluate(bad, (lam,), method)
    assert np.isnan(ev.llh[[2, 5]]).all() and np.isfinite(np.delete(ev.llh, [2, 5])).all()


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
def test_fits_through_the_kernel_reach_the_numpy_optima(q, missing, monkeypatch):
    pf, _ = _forms(q, missing, v=40, seed=5)
    fast = fit(pf)
    _numpy(monkeypatch)
    slow = fit(pf)
    np.testing.assert_array_equal(fast.status, slow.status)
    np.testing.assert_allclose(fast.llh, slow.llh, rtol=0, atol=1e-9)
    np.testing.assert_allclose(fast.beta, slow.beta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fast.s2, slow.s2, rtol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=st.integers(1, 3), p=st.integers(1, 5), n_sub=st.integers(6, 40),
       visits=st.integers(3, 6), missing=st.booleans(), ml=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_the_numpy_path_on_random_designs(q, p, n_sub, visits, missing, ml,
                                                       seed):
    pf, lam = _forms(q, missing, v=11, n_sub=n_sub, visits=visits, p=p, seed=seed)
    method = "ML" if ml else "REML"
    rows = np.array([10, 3, 3, 0, 7])
    fast = [_profiled(pf, lam, method), _profiled(pf, lam, method),
            _profiled(pf.voxels(rows), lam[rows], method)]
    with pytest.MonkeyPatch.context() as mp:
        _numpy(mp)
        slow = [_profiled(pf, lam, method), _profiled(pf, lam, method),
                _profiled(pf.take(rows), lam[rows], method)]
    # the GLS fit and what follows it only where X'V^-1X is well conditioned (the fit
    # screens out voxels whose observed rows leave X rank deficient)
    for f, s in zip(fast, slow):
        ok = np.linalg.cond(s["XtViX"]) < 1e6
        for key in s:
            a, b = (f[key], s[key]) if key in ("XtViX", "XtViY", "YtViY", "logdetV") else (
                f[key][ok], s[key][ok])
            scale = np.abs(b).max(initial=1.0)
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11 * scale, err_msg=key)


def test_mpiblmm_env_says_whether_the_kernel_is_in_use(monkeypatch):
    from mpiblmm.envreport import kernel_facts
    problems = []
    assert kernel_facts(problems)["one-factor kernel"].startswith("yes") and not problems
    monkeypatch.setattr(level_kernel, "_EVAL", None)
    monkeypatch.setattr(level_kernel, "WHY_NOT", "built from older sources")
    assert kernel_facts(problems)["one-factor kernel"] == ("NO, built from older sources "
                                                           "(numpy path)")
    assert len(problems) == 1 and "_level_kernel.c" in problems[0] and "setup.sh" in problems[0]
    problems.clear()
    monkeypatch.setattr(level_kernel, "WHY_NOT", level_kernel.TURNED_OFF)
    kernel_facts(problems)
    assert not problems                                   # turned off on purpose


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("missing", [False, True], ids=["shared", "per-voxel"])
@pytest.mark.parametrize("q", [1, 2, 3])
def test_satterthwaite_sums_equal_the_numpy_path(q, missing, method, monkeypatch):
    # Cov(beta), its Jacobian and the deviance Hessian at a fitted estimate
    from mpiblmm.lmm.structures.level_satterthwaite import level_setup
    pf, _ = _forms(q, missing, v=30, seed=7)
    res = fit(pf, method=method)
    varpar = np.concatenate([res.extras["theta"], np.sqrt(res.s2)[:, None]], axis=1)
    fast = level_setup(pf, varpar, method)
    _numpy(monkeypatch)
    slow = level_setup(pf, varpar, method)
    for f, s, name in zip(fast, slow, ("cov", "J", "H")):
        np.testing.assert_allclose(f, s, rtol=1e-10, atol=1e-12 * np.abs(s).max(), err_msg=name)
