"""Map headers as a viewer reads them: the input's qform and sform come back as they were
(matrices, codes, voxel sizes; a sheared sform and a qform that differs from the sform
included), intent NONE except on z, p and q maps (never the input's, never a t/F intent),
and every file its own AFNI ID code, the same at every export of the same results."""

from __future__ import annotations

import json
import re

import h5py
import nibabel as nib
import numpy as np

from mpiblmm.io.export import DERIVED_INTENTS, export_nifti
from mpiblmm.io.nifti import afni_idcode, read_grid, save_map
from mpiblmm.io.results import ContrastLayout, ResultsLayout, create_results

SHAPE = (5, 4, 3)
BASE = np.array([[2.0, 0, 0, -9], [0, 2, 0, -7], [0, 0, 2, -5], [0, 0, 0, 1]])
AFNI_ID = re.compile(r'self_idcode="(XYZ_[A-Za-z0-9_-]{22})"')


def _rotation_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def _input(path, sform, scode, qform, qcode, intent=None):
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), None)
    img.set_sform(sform, code=scode)
    img.set_qform(qform, code=qcode)
    if intent:
        img.header.set_intent(*intent)
    nib.save(img, str(path))
    return path


def _results(folder, grid, t_alternative="two-sided"):
    """A complete results file on ``grid`` (its affine and space) with a T and an F contrast."""
    lay = ResultsLayout(n_voxels=3, fixed_names=("a", "b"), factors=(("s", ("(Intercept)",)),),
                        contrasts=(ContrastLayout("b", "T", ((0.0, 1.0),), t_alternative),
                                   ContrastLayout("ab", "F", ((1.0, 0.0), (0.0, 1.0)))),
                        method="REML", grid_shape=grid.shape,
                        affine=tuple(map(tuple, grid.affine.tolist())))
    vox = np.array([[0, 0, 0], [1, 2, 1], [4, 3, 2]], dtype=np.int32)
    path = folder / "results.h5"
    w = create_results(path, lay, vox)
    w.file.attrs["space"] = grid.space
    p = np.array([0.04, 1e-5, 0.5])
    w.write(0, 3, {"status": np.array([0, 2, 1], dtype=np.uint8),
                   "contrasts/b/estimate": np.array([-1.0, 2.0, 0.5]),
                   "contrasts/b/t": np.array([-2.2, 5.0, 0.7]),
                   "contrasts/b/df": np.array([9.5, 12.0, 30.2]),
                   "contrasts/b/p": p, "contrasts/b/neglog10p": -np.log10(p),
                   "contrasts/ab/F": np.array([3.0, 20.0, 0.5]),
                   "contrasts/ab/p": p, "contrasts/ab/neglog10p": -np.log10(p)})
    w.finish({})
    return path


def _same_geometry(out: nib.Nifti1Header, inp: nib.Nifti1Header) -> None:
    """The header fields that place the voxels, bit for bit."""
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        np.testing.assert_array_equal(out[key], inp[key], err_msg=key)
    np.testing.assert_array_equal(out["pixdim"][:4], inp["pixdim"][:4])


def test_mni_sform_and_a_different_scanner_qform_both_survive(tmp_path):
    qform = _rotation_z(10) @ BASE
    image = _input(tmp_path / "in.nii.gz", BASE, 4, qform, 1)
    grid = read_grid(image)
    info = json.loads(grid.space)
    np.testing.assert_allclose(info["qform"], qform, atol=1e-6)
    np.testing.assert_allclose(info["sform"], BASE)
    path = _results(tmp_path, grid)
    export_nifti(path)
    inp = nib.load(str(image)).header
    for name in ("beta", "status", "mask", "con_b_t", "con_ab_z"):
        out = nib.load(str(tmp_path / "nifti" / f"{name}.nii.gz"))
        _same_geometry(out.header, inp)
        assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 4)
        np.testing.assert_allclose(out.header.get_qform(), qform, atol=1e-6)
        np.testing.assert_allclose(out.header.get_sform(), BASE)
        np.testing.assert_allclose(out.affine, grid.affine)


def test_a_sheared_sform_keeps_the_input_qform_and_voxel_sizes(tmp_path):
    sheared = BASE.copy()
    sheared[0, 1] = 0.5  # not representable by a qform
    image = _input(tmp_path / "in.nii", sheared, 2, BASE, 1)
    inp = nib.load(str(image)).header
    assert inp.get_zooms() == (2.0, 2.0, 2.0)
    # save_map alone, with the input's space
    grid = read_grid(image)
    save_map(tmp_path / "m.nii.gz", np.zeros(SHAPE), grid.affine, space=grid.space)
    out = nib.load(str(tmp_path / "m.nii.gz"))
    _same_geometry(out.header, inp)
    assert out.header.get_zooms() == (2.0, 2.0, 2.0)  # not the shear's (2, 2.06, 2)
    np.testing.assert_allclose(out.header.get_qform(), BASE)
    np.testing.assert_allclose(out.affine, sheared)
    # and through the export, a 4-D map too
    export_nifti(_results(tmp_path, grid))
    for name in ("beta", "con_ab_F", "status"):
        out = nib.load(str(tmp_path / "nifti" / f"{name}.nii.gz"))
        _same_geometry(out.header, inp)
        assert out.header.get_zooms()[:3] == (2.0, 2.0, 2.0)


def test_no_codes_and_a_flipped_qform_come_back_too(tmp_path):
    flipped = np.diag([-2.0, 3.0, 4.0, 1.0])
    flipped[:3, 3] = [9, -10, -11]
    for name, (scode, qcode) in {"none.nii": (0, 0), "flip.nii": (0, 1)}.items():
        image = _input(tmp_path / name, flipped, scode, flipped, qcode)
        grid = read_grid(image)
        save_map(tmp_path / f"m_{name}", np.zeros(SHAPE + (2,)), grid.affine, space=grid.space)
        out = nib.load(str(tmp_path / f"m_{name}"))
        _same_geometry(out.header, nib.load(str(image)).header)
        np.testing.assert_allclose(out.affine, grid.affine)


def test_results_without_the_recorded_matrices_are_written_as_before(tmp_path):
    """Older results files record only the codes: both transforms are the affine."""
    qform = _rotation_z(10) @ BASE
    grid = read_grid(_input(tmp_path / "in.nii", BASE, 4, qform, 1))
    info = json.loads(grid.space)
    old = {k: info[k] for k in ("format", "qform_code", "sform_code", "intent", "xyz_units")}
    save_map(tmp_path / "m.nii.gz", np.zeros(SHAPE), grid.affine, space=json.dumps(old))
    out = nib.load(str(tmp_path / "m.nii.gz")).header
    assert (int(out["qform_code"]), int(out["sform_code"])) == (1, 4)
    np.testing.assert_allclose(out.get_sform(), BASE)
    np.testing.assert_allclose(out.get_qform(), BASE)
    # recorded matrices that do not give the results' affine are not trusted either
    moved = grid.affine.copy()
    moved[0, 3] += 1.0
    save_map(tmp_path / "n.nii.gz", np.zeros(SHAPE), moved, space=grid.space)
    np.testing.assert_allclose(nib.load(str(tmp_path / "n.nii.gz")).affine, moved)


def test_only_z_p_and_q_maps_have_an_intent(tmp_path):
    """An input labelled 't test (12)' (or 'z score') gives no map that intent: beta, sigma2,
    status, t, df or F maps are NONE; z maps are z scores; p and q maps p values."""
    for intent in (("t test", (12,), "tstat"), ("z score", (), "zstat")):
        folder = tmp_path / intent[0].replace(" ", "_")
        folder.mkdir()
        grid = read_grid(_input(folder / "in.nii.gz", BASE, 4, BASE, 1, intent))
        export_nifti(_results(folder, grid), fdr=True)
        expected = {"con_b_z": "z score", "con_ab_z": "z score", "con_b_p": "p value",
                    "con_ab_p": "p value", "con_b_q": "p value", "con_ab_q": "p value"}
        files = sorted((folder / "nifti").glob("*.nii.gz"))
        assert {"con_b_t.nii.gz", "con_ab_F.nii.gz", "beta.nii.gz"} <= {f.name for f in files}
        for f in files:
            stem = f.name[: -len(".nii.gz")]
            code, params, _ = nib.load(str(f)).header.get_intent()
            assert code == expected.get(stem, "none"), (intent[0], stem, code)
            assert params == (), (stem, params)
    assert DERIVED_INTENTS["p"] == "p value"


def _idcodes(folder):
    codes = {}
    for f in sorted(folder.glob("*.nii.gz")):
        ext = [e for e in nib.load(str(f)).header.extensions if e.get_code() == 4]
        assert len(ext) == 1, f.name
        found = AFNI_ID.search(ext[0].get_content().decode())
        assert found, ext[0].get_content()
        codes[f.name] = found.group(1)
    return codes


def test_every_map_has_its_own_afni_id_the_same_at_every_export(tmp_path):
    grid = read_grid(_input(tmp_path / "in.nii.gz", BASE, 4, BASE, 4))
    (tmp_path / "a").mkdir()
    path = _results(tmp_path / "a", grid)
    export_nifti(path, fdr=True)
    first = _idcodes(tmp_path / "a" / "nifti")
    assert len(first) >= 15 and len(set(first.values())) == len(first)
    export_nifti(path, tmp_path / "a" / "again", fdr=True)  # deterministic: no clock
    assert _idcodes(tmp_path / "a" / "again") == first
    # another study (another results file) gets other codes for the same map names
    (tmp_path / "b").mkdir()
    export_nifti(_results(tmp_path / "b", grid), fdr=True)
    second = _idcodes(tmp_path / "b" / "nifti")
    assert second.keys() == first.keys() and not set(second.values()) & set(first.values())
    # and so does the same path once it holds results of other data (another input_hash)
    with h5py.File(path, "r+") as f:
        f.attrs["input_hash"] = "another"
    export_nifti(path, tmp_path / "a" / "refit", fdr=True)
    assert not set(_idcodes(tmp_path / "a" / "refit").values()) & set(first.values())


def test_afni_idcode_has_afnis_form():
    """``XYZ_`` and 22 characters of the MD5 hash in Base64, '/' and '+' replaced."""
    import base64
    import hashlib

    code = afni_idcode("some map")
    assert re.fullmatch(r"XYZ_[A-Za-z0-9_-]{22}", code)
    b64 = base64.b64encode(hashlib.md5(b"some map").digest()).decode()[:22]
    assert code == "XYZ_" + b64.replace("/", "-").replace("+", "_")
    assert afni_idcode("some map") == code != afni_idcode("some map ")


def test_save_map_alone_makes_the_id_from_the_path(tmp_path):
    for name in ("x.nii.gz", "y.nii.gz"):
        save_map(tmp_path / name, np.zeros(SHAPE), BASE, labels=("v",))
    codes = _idcodes(tmp_path)
    assert codes["x.nii.gz"] != codes["y.nii.gz"]
    assert codes["x.nii.gz"] == afni_idcode(str(tmp_path / "x.nii.gz"))


def test_a_study_packed_before_the_transforms_were_kept_is_packed_again():
    """packed.h5 whose `space` holds the codes only (an older version) is not reused."""
    import json

    from mpiblmm.io.ingest import _space_complete

    old = json.dumps({"format": "nifti", "qform_code": 1, "sform_code": 4, "intent": ["none", [], ""],
                      "xyz_units": "mm"})
    assert not _space_complete(old)
    assert _space_complete(json.dumps({**json.loads(old), "quatern": [0, 0, 0, 0, 0, 0]}))
    assert _space_complete(json.dumps({"format": "nifti"}))      # no header facts at all
    assert _space_complete(json.dumps({"format": "gifti"}))
    assert _space_complete("")
