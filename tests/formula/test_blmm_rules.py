"""`mpiblmm convert-blmm`: BLMM's own rules about which voxels it fits, checked against BLMM.

Each case was run through BLMM 0.1.1 (``pyblmm``, its stages as its ``blmm`` command runs
them) on a simulated study when this was written:

- ``blmm_concat`` drops every voxel with ``n <= p + 1`` observations and, in its
  ``safeMode`` (default 1), every voxel with ``n <= q``, q = levels x random effects summed
  over the factors: 10 subjects x 3 visits with ``(1 + time | subject)`` (q = 20) and 4
  subjects missing in half the grid (n = 18 there): BLMM fitted 54 voxels, the spec
  converted without the rule 108 (the 54 with n = 18 as well);
- its analysis mask keeps only the voxels equal to 1 (``get_amInds``): a mask with 2 and
  0.5 in 48 of 144 voxels gave BLMM 92 voxels, the converted spec 140;
- ``Missingness`` is read under the keys ``MinPercent``/``minpercent`` and ``minn``/``MinN``
  only; BLMM ignores any other spelling;
- its setup writes ``q`` (and ``safeMode``) into the config it ran, so a config converted
  after a BLMM run has them;
- it opens the entries of ``Y_files`` after changing directory into its own package, so it
  refuses relative entries;
- it multiplies each image by its data mask (``blmm_batch.obtainY``; read from its code).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpiblmm.blmm_convert import convert_file
from mpiblmm.errors import SpecError

CONFIG = """\
Y_files: Y.txt
X: X.csv
Z:
  - f1: {{name: subject, factor: f.csv, design: z.csv}}
outdir: out
contrasts:
  - c1: {{name: time, vector: [0, 1]}}
{extra}"""


def _study(folder, subjects=4, visits=3, effects=2):
    """X (intercept, time: p = 2), the subject factor and a (1 + time) or (1) design."""
    n = subjects * visits
    time = np.tile(np.arange(visits, dtype=float), subjects)
    (folder / "X.csv").write_text("".join(f"1,{t:g}\n" for t in time))
    (folder / "f.csv").write_text("".join(f"{s + 1}\n" for s in range(subjects)
                                          for _ in range(visits)))
    z = "".join(("1\n" if effects == 1 else f"1,{t:g}\n") for t in time)
    (folder / "z.csv").write_text(z)
    return n


#: The start of the note a conversion gives where X names no file (most cases here have none).
UNREAD = "Missingness: BLMM's own voxel rules"


def _convert(folder, extra="", unread_note=False):
    """Convert ``CONFIG`` with ``extra``; the note on files that could not be read is left out
    of the notes unless ``unread_note``."""
    (folder / "cfg.yml").write_text(CONFIG.format(extra=extra))
    spec, notes = convert_file(folder / "cfg.yml", output=folder / "spec.json", cwd=folder)
    return spec, notes if unread_note else [n for n in notes if not n.startswith(UNREAD)]


def test_safe_mode_sets_min_n(tmp_path):
    """q = 6 subjects x 2 effects = 12 < n = 18: BLMM drops n <= 12."""
    _study(tmp_path, subjects=6, visits=3)
    spec, notes = _convert(tmp_path)
    assert spec["missingness"] == {"min_n": 13}
    (note,) = [n for n in notes if n.startswith("missingness.min_n")]
    assert "more than p + 1 = 3 observations" in note and "more than q = 12" in note


@pytest.mark.parametrize("extra, min_n", [
    ("safeMode: 0\n", 4),                   # only n <= p + 1 is dropped
    ("safeMode: False\n", 4),
    ("safeMode: 1\n", 13),
    ("safeMode: True\n", 13),               # BLMM: inputs['safeMode'] == 1
    ("Missingness: {MinN: 15}\n", 15),      # the larger wins
    ("Missingness: {MinN: 5}\n", 13),
])
def test_safe_mode_setting_and_min_n(tmp_path, extra, min_n):
    _study(tmp_path, subjects=6, visits=3)
    spec, notes = _convert(tmp_path, extra)
    assert spec["missingness"]["min_n"] == min_n
    safe_notes = [n for n in notes if n.startswith("safeMode")]
    if min_n == 4:                          # safe mode off: what mpiblmm still does not fit
        (note,) = safe_notes
        assert "status 9" in note and "n <= observed levels x effects" in note
    else:
        assert not safe_notes


def test_p_plus_one_rule_without_random_slopes(tmp_path):
    """A random intercept only: q = 6 levels x 1 effect, so min_n = q + 1 = 7; without the
    safe mode only BLMM's n > p + 1 is left: min_n = p + 2 = 4."""
    _study(tmp_path, subjects=6, visits=3, effects=1)
    spec, _ = _convert(tmp_path)
    assert spec["missingness"] == {"min_n": 7}
    spec, notes = _convert(tmp_path, "safeMode: 0\n")
    assert spec["missingness"] == {"min_n": 4}
    assert any("more than p + 1 = 3 observations;" in n for n in notes)


def test_safe_mode_that_would_drop_every_voxel(tmp_path):
    """2 visits and (1 + time | subject): q = 2 x 5 subjects = n = 10, so BLMM's safe mode
    drops every voxel; the rule is left out (with a note), n > p + 1 kept."""
    _study(tmp_path, subjects=5, visits=2)
    spec, notes = _convert(tmp_path)
    assert spec["missingness"] == {"min_n": 4}
    assert any(n.startswith("safeMode: BLMM drops every voxel here (q = 10") for n in notes)


@pytest.mark.parametrize("fraction, min_n", [
    ("0.07", 8),        # 0.07 * 100 = 7.000000000000001 in BLMM's floats: 7 are too few
    ("'7%'", 8),        # 7 / 100 is the same float
    ("0.1", 4),         # 0.1 * 100 = 10.0: min_fraction alone keeps the same voxels
])
def test_min_percent_compared_in_floating_point(tmp_path, fraction, min_n):
    """``blmm_concat`` drops a voxel with ``n_sv < MinPercent * n`` in floating point, where
    ``min_fraction`` reads the decimal (7 of 100 observations pass 0.07): where the two
    differ, min_n keeps BLMM's voxels."""
    _study(tmp_path, subjects=25, visits=4)
    spec, notes = _convert(tmp_path, f"safeMode: 0\nMissingness: {{MinPercent: {fraction}}}\n")
    assert spec["missingness"]["min_n"] == min_n
    assert spec["missingness"]["min_fraction"] == pytest.approx(0.07 if min_n == 8 else 0.1)
    if min_n == 8:
        (note,) = [n for n in notes if n.startswith("missingness.min_n")]
        assert "MinPercent x n = 0.07 x 100 = 7.000000000000001 observations" in note


@pytest.mark.parametrize("present, unread", [
    # converted where X names no file: the spec's loader refuses it later, and the note says
    # BLMM's voxel rules are not in the spec (a fault audit: with the path then corrected in
    # the spec, the fit kept voxels BLMM drops, without a word)
    ((), "X, Z: f1.factor, Z: f1.design name no file"),
    # X is there, a factor's file is not (only a missing X gave the note, so a wrong factor
    # path corrected in the spec later fitted voxels BLMM's safeMode drops)
    (("X.csv", "z.csv"), "Z: f1.factor names no file"),
])
def test_unreadable_files_leave_min_n_to_the_loader(tmp_path, present, unread):
    if present:
        _study(tmp_path, subjects=6, visits=3)
        for name in {"X.csv", "f.csv", "z.csv"} - set(present):
            (tmp_path / name).unlink()
    spec, notes = _convert(tmp_path, unread_note=True)
    assert "missingness" not in spec
    assert notes == [f"{UNREAD} (n > p + 1, and n > q in its safeMode) are not in the spec: "
                     f"{unread} (relative paths are read from the working directory, "
                     f"{tmp_path}); convert again where BLMM runs, once the files are there"]


def _mask(path, values):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(values, dtype=np.float32), np.eye(4)), str(path))


@pytest.mark.parametrize("values", [[[[1, 0], [1, 1]]], [[[1, 0], [np.nan, 1]]]])
def test_binary_analysis_mask(tmp_path, values):
    _study(tmp_path)
    _mask(tmp_path / "m.nii", values)
    spec, _ = _convert(tmp_path, "analysis_mask: m.nii\n")
    assert spec["analysis_mask"] == "m.nii"


@pytest.mark.parametrize("values, shown", [([[[1, 2], [0, 1]]], "2 in 1 voxels"),
                                           ([[[0.5, 2], [0, 1]]], "0.5, 2 in 2 voxels")])
def test_analysis_mask_with_other_values_is_refused(tmp_path, values, shown):
    _study(tmp_path)
    _mask(tmp_path / "m.nii", values)
    with pytest.raises(SpecError) as info:
        _convert(tmp_path, "analysis_mask: m.nii\n")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'cfg.yml'}: analysis_mask: has values other than 0 "
                           f"and 1 ({shown}): BLMM analyses only the voxels where it is exactly 1")
    assert "\n" not in text


@pytest.mark.parametrize("missingness, expected, ignored", [
    ("{minPercent: 0.5}", None, "minPercent"),
    ("{MINN: 40}", None, "MINN"),
    ("{MinPercent: 0.2, minpercent: 0.5}", {"min_fraction": 0.2}, None),
    ("{MinN: 50, minn: 60}", {"min_n": 60}, None),
])
def test_missingness_keys_as_blmm_reads_them(tmp_path, missingness, expected, ignored):
    spec, notes = _convert(tmp_path, f"Missingness: {missingness}\n")
    assert spec.get("missingness") == expected
    assert [n.split(":")[0] for n in notes if n.startswith("Missingness")] == (
        [f"Missingness.{ignored}"] if ignored else [])


def test_keys_blmm_writes_into_its_config(tmp_path):
    """A config BLMM has run holds q and safeMode, written by its setup."""
    _, notes = _convert(tmp_path, "q: '40'\nsafeMode: 1\n")
    assert notes == []


@pytest.mark.parametrize("method, other", [("pSFS", False), ("FS", True), ("SFS", True),
                                           ("pFS", True)])
def test_method_note(tmp_path, method, other):
    _, notes = _convert(tmp_path, f"method: {method}\n")
    (note,) = notes
    assert note.startswith("method: no equivalent in mpiblmm: ")
    assert ("BLMM 0.1.1 calls FS, SFS and pFS without reml" in note) == other


@pytest.mark.parametrize("where", ["cwd", "list"])
def test_relative_entries_of_an_image_list(tmp_path, where):
    """BLMM opens Y_files' entries after changing directory into its package, so it refuses
    relative entries ("The image "data/img/y000.nii.gz"does not exist"); they are taken
    where they name files: relative to the working directory (as BLMM's other paths), else
    relative to the list's folder (as mpiblmm reads a list)."""
    (tmp_path / "data" / "img").mkdir(parents=True)
    if where == "cwd":
        entries = ["data/img/a.nii", "data/img/b.nii"]
        files = [tmp_path / e for e in entries]
    else:
        entries = ["img/a.nii", "img/b.nii"]
        files = [tmp_path / "data" / e for e in entries]
    for f in files:
        f.write_text("x")
    (tmp_path / "data" / "Y.txt").write_text("\n".join(entries) + "\n")
    (tmp_path / "cfg.yml").write_text(CONFIG.format(extra="").replace("Y_files: Y.txt",
                                                                      "Y_files: data/Y.txt"))
    spec, notes = convert_file(tmp_path / "cfg.yml", output=tmp_path / "spec.json", cwd=tmp_path)
    (note,) = [n for n in notes if n.startswith("Y_files")]
    assert note.startswith("Y_files: BLMM 0.1.1 cannot read relative entries")
    if where == "cwd":
        assert spec["images"] == entries and "working directory" in note
    else:
        assert spec["images"] == "data/Y.txt" and "the list is kept" in note


def _data_masks(folder, masks):
    (folder / "masks").mkdir()
    for i, values in enumerate(masks):
        _mask(folder / "masks" / f"m{i}.nii", values)
    (folder / "M.txt").write_text("".join(f"{folder}/masks/m{i}.nii\n"
                                          for i in range(len(masks))))


def test_zero_one_data_masks_need_no_note(tmp_path):
    _data_masks(tmp_path, [[[[1, 0], [np.nan, 1]]], [[[1, 1], [1, 1]]]])
    spec, notes = _convert(tmp_path, "data_mask_files: M.txt\n")
    assert spec["observation_masks"] == "M.txt"
    assert not any(n.startswith("data_mask_files") for n in notes)


def test_data_masks_with_other_values_are_refused(tmp_path):
    """BLMM multiplies each image by its mask: a mask of 0.5 halves the data there."""
    _data_masks(tmp_path, [[[[1, 0], [1, 1]]], [[[0.5, 1], [1, 0.25]]]])
    with pytest.raises(SpecError) as info:
        _convert(tmp_path, "data_mask_files: M.txt\n")
    assert str(info.value).startswith(
        f"{tmp_path / 'cfg.yml'}: data_mask_files: {tmp_path}/masks/m1.nii: has values other "
        "than 0 and 1 (0.25, 0.5 in 2 voxels): BLMM multiplies each image by its mask")


def test_data_masks_that_cannot_be_read_keep_the_note(tmp_path):
    (tmp_path / "M.txt").write_text(f"{tmp_path}/missing.nii\n")
    _, notes = _convert(tmp_path, "data_mask_files: M.txt\n")
    assert any(n.startswith("data_mask_files: written as observation_masks: BLMM multiplies")
               for n in notes)


@pytest.mark.spawns_mpiexec
def test_safe_mode_voxels_are_not_fitted(tmp_path, run_mpi, mpiblmm_command):
    """End to end: 6 subjects x 3 visits, (1 + time | subject), q = 12; two of four voxels
    miss two subjects (n = 12 <= q): BLMM leaves them out, so does the converted spec
    (status 3), while the other two (n = 18) are fitted."""
    import h5py
    import nibabel as nib

    n = _study(tmp_path, subjects=6, visits=3)
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(n):
        y = (100 + rng.normal(size=(2, 2, 1)) + (i // 3) * 0.5).astype(np.float32)
        if i >= 12:                                  # subjects 5 and 6
            y[0, :, 0] = 0                           # missing in voxels (0, 0) and (0, 1)
        nib.save(nib.Nifti1Image(y, np.eye(4)), str(tmp_path / "img" / f"y{i}.nii"))
        lines.append(f"{tmp_path}/img/y{i}.nii\n")
    (tmp_path / "Y.txt").write_text("".join(lines))
    spec, _ = _convert(tmp_path)
    assert spec["missingness"] == {"min_n": 13}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = run_mpi(2, [*mpiblmm_command, "fit", "--quiet", str(tmp_path / "spec.json")],
                  timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with h5py.File(tmp_path / "out" / "results.h5", "r") as f:
        by_voxel = {tuple(v): (int(s), int(k)) for v, s, k in
                    zip(f["voxels"][...], f["status"][...], f["n"][...])}
    assert by_voxel[(0, 0, 0)][0] == by_voxel[(0, 1, 0)][0] == 3
    assert by_voxel[(1, 0, 0)][0] in (0, 2) and by_voxel[(1, 1, 0)][0] in (0, 2)


@pytest.mark.parametrize("which, key", [("X.csv", "X"), ("z.csv", "Z: f1.design")])
def test_csv_with_a_header_row_is_an_error_naming_the_key(tmp_path, which, key):
    """BLMM skips a header row of X and of a factor's design (an audit ran one through
    BLMM: the same maps as without it); the spec's files have none, and without reading X
    the conversion could not set BLMM's min_n or check the contrasts' lengths."""
    _study(tmp_path)
    path = tmp_path / which
    path.write_text("intercept,time\n" + path.read_text())
    with pytest.raises(SpecError) as err:
        _convert(tmp_path)
    assert err.value.where.endswith(f"cfg.yml: {key}")
    assert "header row" in err.value.message and str(path) in err.value.message


def test_names_repeated_in_blmm_are_made_unique(tmp_path):
    """BLMM only prints factor and contrast names; the spec keys results by them, so a
    repeated name (also one that repeats after renaming) gets a suffix and a note."""
    _study(tmp_path)
    (tmp_path / "cfg.yml").write_text(
        "Y_files: Y.txt\nX: X.csv\nZ:\n"
        "  - f1: {name: subject, factor: f.csv, design: z.csv}\n"
        "  - f2: {name: subject, factor: f.csv, design: z.csv}\n"
        "outdir: out\ncontrasts:\n"
        "  - c1: {name: age time, vector: [0, 1]}\n"
        "  - c2: {name: age_time, vector: [1, 0]}\n")
    spec, notes = convert_file(tmp_path / "cfg.yml", output=tmp_path / "spec.json",
                               cwd=tmp_path)
    assert [f["name"] for f in spec["random"]] == ["subject", "subject_2"]
    assert [c["name"] for c in spec["contrasts"]] == ["age_time", "age_time_2"]
    assert sum("renamed subject_2" in n for n in notes) == 1
    assert sum("renamed age_time_2" in n for n in notes) == 1
