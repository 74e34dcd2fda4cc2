"""Spec loading: the happy path, defaults, and one test per error path (one line, names key/file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpiblmm.errors import SpecError
from mpiblmm.spec import load_spec, read_path_list


def write_study(folder: Path, n: int = 4, **overrides) -> Path:
    """A minimal matrix-form study; ``overrides`` replace top-level spec keys (None deletes)."""
    (folder / "img").mkdir(exist_ok=True)
    for i in range(n):
        (folder / "img" / f"s{i}.nii.gz").write_bytes(b"")
    (folder / "images.txt").write_text(
        "# one image per row of X\n\n" + "".join(f"img/s{i}.nii.gz\n" for i in range(n)))
    (folder / "X.csv").write_text("".join(f"1,{i}\n" for i in range(n)))
    (folder / "f.csv").write_text("".join(f"s{i // 2}\n" for i in range(n)))
    (folder / "Z.csv").write_text("".join(f"1,{i}\n" for i in range(n)))
    spec = {
        "images": "images.txt",
        "X": "X.csv",
        "random": [{"name": "subject", "factor": "f.csv", "design": "Z.csv"}],
        "contrasts": [{"name": "slope", "weights": [0, 1]},
                      {"name": "both", "weights": [[1, 0], [0, 1]]}],
    }
    for k, v in overrides.items():
        if v is None:
            spec.pop(k, None)
        else:
            spec[k] = v
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def spec_error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_happy_path_and_defaults(tmp_path):
    spec = load_spec(write_study(tmp_path))
    assert spec.images == tuple(tmp_path / "img" / f"s{i}.nii.gz" for i in range(4))
    assert spec.packed is None
    assert spec.X == tmp_path / "X.csv"
    assert spec.random[0].name == "subject" and spec.random[0].design == tmp_path / "Z.csv"
    assert [c.kind for c in spec.contrasts] == ["T", "F"]
    assert spec.contrasts[1].weights == ((1.0, 0.0), (0.0, 1.0))
    assert spec.output == tmp_path / "results"
    assert spec.zero_is_missing is True
    assert spec.estimation.method == "REML" and spec.estimation.tolerance is None
    assert spec.missingness.min_n is None and spec.missingness.min_fraction == 0.0
    assert json.loads(spec.text)["X"] == "X.csv"
    assert spec.n_images == 4


def test_all_optional_keys(tmp_path):
    (tmp_path / "mask.nii").write_bytes(b"")
    path = write_study(
        tmp_path, images=[f"img/s{i}.nii.gz" for i in range(4)], output="out",
        fixed_names=["a", "b"], analysis_mask="mask.nii",
        observation_masks=[f"img/s{i}.nii.gz" for i in range(4)], zero_is_missing=False,
        missingness={"min_n": 3, "min_fraction": 0.5},
        estimation={"method": "ml", "tolerance": 1e-8, "max_iterations": 50}, max_memory_mb=512)
    spec = load_spec(path)
    assert spec.output == tmp_path / "out" and spec.fixed_names == ("a", "b")
    assert spec.analysis_mask == tmp_path / "mask.nii" and len(spec.observation_masks) == 4
    assert spec.zero_is_missing is False and spec.missingness.min_n == 3
    assert spec.estimation.method == "ML" and spec.estimation.max_iterations == 50
    assert spec.max_memory_mb == 512.0


def test_max_iterations_bound(tmp_path):
    from mpiblmm.spec import MAX_ITERATIONS

    assert MAX_ITERATIONS == 10**6
    spec = load_spec(write_study(tmp_path, estimation={"max_iterations": MAX_ITERATIONS}))
    assert spec.estimation.max_iterations == MAX_ITERATIONS


def test_null_takes_the_default_for_every_estimation_and_missingness_key(tmp_path):
    """SPEC.md: omitted or null values take the defaults; "method": null and
    "min_fraction": null were refused ("expected \"REML\" or \"ML\", got null")."""
    spec = load_spec(write_study(tmp_path, missingness={"min_n": None, "min_fraction": None},
                                 estimation={"method": None, "tolerance": None,
                                             "max_iterations": None}, max_memory_mb=None))
    assert (spec.estimation.method, spec.estimation.tolerance,
            spec.estimation.max_iterations) == ("REML", None, None)
    assert (spec.missingness.min_n, spec.missingness.min_fraction) == (None, 0.0)
    spec = load_spec(write_study(tmp_path, missingness=None, estimation=None))   # deleted
    (tmp_path / "spec.json").write_text((tmp_path / "spec.json").read_text()[:-1]
                                        + ', "missingness": null, "estimation": null}')
    spec = load_spec(tmp_path / "spec.json")            # the objects themselves null
    assert (spec.estimation.method, spec.missingness.min_fraction) == ("REML", 0.0)


def test_packed_images(tmp_path):
    (tmp_path / "packed.h5").write_bytes(b"")
    spec = load_spec(write_study(tmp_path, images={"h5": "packed.h5"}))
    assert spec.images is None and spec.packed.h5 == tmp_path / "packed.h5"
    assert spec.packed.dataset == "/Y" and spec.n_images is None


def test_list_file_paths_are_relative_to_the_list(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "a.nii").write_bytes(b"")
    (sub / "l.txt").write_text("a.nii\n")
    assert read_path_list(sub / "l.txt") == (sub / "a.nii",)


@pytest.mark.parametrize("overrides, expected", [
    ({"colour": 1}, "spec.json: colour: unknown key"),
    ({"X": None}, "spec.json: X: required key is missing"),
    ({"X": "nope.csv"}, "spec.json: X: file not found"),
    ({"X": 3}, "spec.json: X: expected a non-empty string"),
    ({"images": "missing.txt"}, "spec.json: images: file not found"),
    ({"images": ["a.png"]}, "spec.json: images[0]: expected a NIfTI file"),
    ({"images": []}, "spec.json: images: the list is empty"),
    ({"images": {"h5": "x.h5", "extra": 1}}, "spec.json: images.extra: unknown key"),
    ({"images": {"dataset": "/Y"}}, "spec.json: images.h5: required key is missing"),
    ({"random": []}, "spec.json: random: expected a non-empty list"),
    ({"random": [{"name": "s"}]}, "spec.json: random[0].factor: required key is missing"),
    ({"random": [{"name": "a b", "factor": "f.csv"}]}, "spec.json: random[0].name: invalid name"),
    ({"random": [{"name": "s", "factor": "f.csv", "levels": 2}]}, "spec.json: random[0].levels: unknown key"),
    ({"random": [{"name": "s", "factor": "f.csv"}, {"name": "s", "factor": "f.csv"}]},
     "spec.json: random: factor name 's' appears twice"),
    ({"random": [{"name": "s", "factor": "f.csv", "effect_names": ["a", "a"]}]},
     "spec.json: random[0].effect_names: name 'a' appears twice"),
    ({"contrasts": {"a": 1}}, "spec.json: contrasts: expected a list"),
    ({"contrasts": [{"name": "c/d", "weights": [1, 0]}]}, "spec.json: contrasts[0].name: invalid name"),
    ({"contrasts": [{"name": "c", "weights": [1, "x"]}]}, "spec.json: contrasts[0] (\"c\").weights[1]: expected a number"),
    ({"contrasts": [{"name": "c", "weights": []}]}, "spec.json: contrasts[0] (\"c\").weights: expected a non-empty list"),
    ({"contrasts": [{"name": "c", "weights": [[1, 0], [1]]}]}, "spec.json: contrasts[0] (\"c\").weights: the rows have different lengths"),
    ({"contrasts": [{"name": "c", "weights": [1, 0], "alternative": "up"}]}, "spec.json: contrasts[0] (\"c\").alternative: expected one of"),
    ({"contrasts": [{"name": "c", "weights": [[1, 0]], "alternative": "less"}]}, "spec.json: contrasts[0] (\"c\").alternative: an F contrast"),
    ({"contrasts": [{"name": "c", "weights": [1, 0]}, {"name": "c", "weights": [0, 1]}]},
     "spec.json: contrasts: contrast name 'c' appears twice"),
    ({"zero_is_missing": "yes"}, "spec.json: zero_is_missing: expected true or false"),
    ({"missingness": {"min_n": 0}}, "spec.json: missingness.min_n: expected a whole number of at least 1"),
    ({"missingness": {"min_fraction": 2}}, "spec.json: missingness.min_fraction: expected a number between"),
    ({"missingness": {"min_count": 2}}, "spec.json: missingness.min_count: unknown key"),
    ({"estimation": {"method": "OLS"}}, "spec.json: estimation.method: expected \"REML\" or \"ML\""),
    ({"estimation": {"tolerance": -1}}, "spec.json: estimation.tolerance: expected a number greater than 0"),
    ({"estimation": {"max_iterations": 1.5}}, "spec.json: estimation.max_iterations: expected a whole number"),
    ({"estimation": {"max_iterations": 10**6 + 1}},
     "spec.json: estimation.max_iterations: expected a whole number from 1 to 1000000, got 1000001"),
    ({"estimation": {"max_iterations": 2**63}},     # an OverflowError in the fit, unbounded
     "spec.json: estimation.max_iterations: expected a whole number from 1 to 1000000"),
    ({"estimation": {"max_iterations": 1e300}},
     "spec.json: estimation.max_iterations: expected a whole number from 1 to 1000000"),
    ({"max_memory_mb": 0}, "spec.json: max_memory_mb: expected a number greater than 0"),
    ({"fixed_names": []}, "spec.json: fixed_names: expected a non-empty list of names"),
    ({"analysis_mask": "mask.png"}, "spec.json: analysis_mask: expected a NIfTI file"),
    ({"observation_masks": ["img/s0.nii.gz"]}, "spec.json: observation_masks: 1 masks for 4 images"),
    ({"X": "img"}, "spec.json: X: is a directory, not a file"),
    ({"images": "img"}, "spec.json: images: is a directory, not a file"),
    ({"contrasts": [{"name": "c" * 218, "weights": [1, 0]}]},
     f'spec.json: contrasts[0] ("{"c" * 37}..."): name too long: 218 bytes, at most 217'),
    ({"random": [{"name": "s" * 225, "factor": "f.csv"}]},
     "spec.json: random[0].name: name too long: 225 bytes, at most 224"),
])
def test_spec_errors(tmp_path, overrides, expected):
    text = spec_error(write_study(tmp_path, **overrides))
    assert text.startswith(str(tmp_path / expected.split(":")[0]))
    assert expected.split(": ", 1)[1] in text


def test_observation_masks_not_with_packed(tmp_path):
    (tmp_path / "p.h5").write_bytes(b"")
    text = spec_error(write_study(tmp_path, images={"h5": "p.h5"},
                                  observation_masks=["img/s0.nii.gz"]))
    assert "observation_masks: not allowed with packed" in text


def test_json_problems(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"X": "a",\n "X": "b"}')
    assert "key given twice: 'X'" in spec_error(path)
    path.write_text('{"X": ')
    assert "not valid JSON: line 1" in spec_error(path)
    assert "YAML" not in spec_error(path)
    path.write_text("# a BLMM config given as the spec\nY_files: images.txt\nX: X.csv\n")
    assert spec_error(path).endswith("(this looks like YAML: a spec is JSON; a BLMM "
                                     "configuration is converted by mpiblmm convert-blmm)")
    path.write_text('[1]')
    assert "expected a JSON object" in spec_error(path)
    assert "cannot read the spec" in spec_error(tmp_path / "none.json")


def test_image_list_errors_name_the_row(tmp_path):
    path = write_study(tmp_path)
    (tmp_path / "images.txt").write_text("img/s0.nii.gz\n# c\nimg/zz.nii.gz\n")
    assert f"{tmp_path / 'images.txt'}: row 3: file not found" in spec_error(path)
    (tmp_path / "images.txt").write_text("img/s0.nii.gz\nimg/s1.mgz\n")
    assert f"{tmp_path / 'images.txt'}: row 2: expected a NIfTI file" in spec_error(path)
    (tmp_path / "images.txt").write_text("# nothing\n")
    assert "lists no files" in spec_error(path)
    (tmp_path / "dir.nii.gz").mkdir()
    (tmp_path / "images.txt").write_text("img/s0.nii.gz\ndir.nii.gz\n")
    assert f"{tmp_path / 'images.txt'}: row 2: is a directory, not a file" in spec_error(path)


def test_longest_names_that_fit_in_a_file_name(tmp_path):
    """A contrast or factor name is refused when export's longest file for it (the temporary
    name of its map: ``.con_<name>_neglog10p.tmp<pid>.dscalar.nii``) would pass 255 bytes."""
    from mpiblmm.spec import NAME_MAX, max_name_bytes

    limit = max_name_bytes("contrast")
    assert len(f".con_{'c' * limit}_neglog10p.tmp4194304.dscalar.nii") == NAME_MAX == 255
    assert len(f".random_{'s' * max_name_bytes('factor')}.tmp4194304.dscalar.nii") == NAME_MAX
    spec = load_spec(write_study(
        tmp_path, contrasts=[{"name": "c" * limit, "weights": [1, 0]}],
        random=[{"name": "s" * max_name_bytes("factor"), "factor": "f.csv"}]))
    assert spec.contrasts[0].name == "c" * limit


@pytest.mark.parametrize("key", ["images", "X"])
def test_a_directory_is_refused_even_without_check_files(tmp_path, key):
    """``mpiblmm check`` loads with check_files=False: a list file or table that is a
    directory is still named as one (one stat each; images are not stat'ed)."""
    text = str(pytest.raises(SpecError, load_spec, write_study(tmp_path, **{key: "img"}),
                             check_files=False).value)
    assert text == f"{tmp_path / 'spec.json'}: {key}: is a directory, not a file: {tmp_path / 'img'}"


def test_check_files_false_skips_stat(tmp_path):
    path = write_study(tmp_path, X="elsewhere.csv")
    assert load_spec(path, check_files=False).X == tmp_path / "elsewhere.csv"


# --------------------------------------------------------------------------- fault audit
#: A JSON integer too large for a float (a fault audit's ``1`` and 400 zeros).
HUGE = 10**400


@pytest.mark.parametrize("overrides, key", [
    ({"max_memory_mb": HUGE}, "max_memory_mb"),
    ({"estimation": {"tolerance": HUGE}}, "estimation.tolerance"),
    ({"contrasts": [{"name": "c", "weights": [0, HUGE]}]}, 'contrasts[0] ("c").weights[1]'),
    ({"contrasts": [{"name": "c", "weights": {"x": HUGE}}]}, 'contrasts[0] ("c").weights.x'),
    ({"missingness": {"min_fraction": HUGE}}, "missingness.min_fraction"),
])
def test_an_integer_too_large_for_a_float_names_its_key(tmp_path, overrides, key):
    """Validator.number called math.isfinite on it: an OverflowError traceback."""
    for check_files in (True, False):                    # fit and check
        with pytest.raises(SpecError) as info:
            load_spec(write_study(tmp_path, **overrides), check_files=check_files)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / 'spec.json'}: {key}: expected "), text
        assert "\n" not in text and len(text) < 400


def test_max_memory_mb_has_an_upper_bound(tmp_path):
    """1e308 passed the check and overflowed the chunk sizing of the fit."""
    from mpiblmm.spec import MAX_MEMORY_MB

    assert MAX_MEMORY_MB == 2**30
    assert load_spec(write_study(tmp_path, max_memory_mb=MAX_MEMORY_MB)).max_memory_mb == 2**30
    for value in (1e308, MAX_MEMORY_MB + 1, 2**1000):
        text = spec_error(write_study(tmp_path, max_memory_mb=value))
        assert text.startswith(f"{tmp_path / 'spec.json'}: max_memory_mb: expected a number "
                               f"greater than 0 and at most {MAX_MEMORY_MB}"), text


@pytest.mark.parametrize("overrides, key", [
    ({"output": "res\0ults"}, "output"),
    ({"X": "X\0.csv"}, "X"),
    ({"images": "images\0.txt"}, "images"),
    ({"images": ["img/s0\0.nii.gz"] * 4}, "images[0]"),
    ({"random": [{"name": "s", "factor": "f\0.csv"}]}, "random[0].factor"),
    ({"random": [{"name": "s", "factor": "f.csv", "design": "Z.csv\0"}]}, "random[0].design"),
    ({"analysis_mask": "m\0.nii"}, "analysis_mask"),
    ({"observation_masks": "m\0.txt"}, "observation_masks"),
    ({"images": {"h5": "p\0.h5"}}, "images.h5"),
])
def test_a_nul_character_in_a_path_names_its_key(tmp_path, overrides, key):
    """``check`` said OK to an output with a NUL, and the fit failed with ValueError:
    embedded null byte.  The line shows the NUL escaped, never the raw byte."""
    for check_files in (True, False):
        with pytest.raises(SpecError) as info:
            load_spec(write_study(tmp_path, **overrides), check_files=check_files)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / 'spec.json'}: {key}: contains a NUL character"), text
        assert "\0" not in text and "\\u0000" in text


def test_a_nul_character_in_a_list_file_names_the_row(tmp_path):
    path = write_study(tmp_path)
    (tmp_path / "images.txt").write_text("img/s0.nii.gz\n# c\nimg/s\0.nii.gz\n")
    for check_files in (True, False):
        with pytest.raises(SpecError) as info:
            load_spec(path, check_files=check_files)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / 'images.txt'}: row 3: contains a NUL character")
        assert "\0" not in text


def test_a_name_too_long_for_the_file_system_names_its_key(tmp_path):
    """An output folder named by 300 characters passed the spec and failed when created."""
    text = spec_error(write_study(tmp_path, output="out/" + "a" * 300))
    assert text.startswith(f"{tmp_path / 'spec.json'}: output: a name in the path is 300 bytes "
                           "long, at most 255")
    assert load_spec(write_study(tmp_path, output="a" * 255)).output == tmp_path / ("a" * 255)


def test_json_nested_too_deeply_or_with_a_number_too_long(tmp_path):
    """json.loads raised RecursionError (100,000 nested lists) and ValueError (an integer of
    more than 4300 digits): tracebacks."""
    path = tmp_path / "spec.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert spec_error(path) == f"{path}: not valid JSON for mpiblmm: nested too deeply (lists " \
                               "or objects inside each other hundreds of levels deep)"
    path.write_text('{"max_memory_mb": 1' + "0" * 5000 + "}")
    assert spec_error(path).startswith(f"{path}: not valid JSON for mpiblmm: a number with more "
                                       "than ")
