"""A resume across a change of mpiblmm's code is refused, also when the version is the same.

The version string of a development install does not change with its code; the digest of the
package's sources (``source_digest``) is part of ``input_hash`` and ``input_parts``.
"""

from __future__ import annotations

import shutil

import numpy as np

import mpiblmm.source_digest as sd
from mpiblmm import pipeline
from mpiblmm.design import Design, Factor
from mpiblmm.io.results import what_changed
from mpiblmm.lmm.analysis import Settings
from mpiblmm.lmm.model import RandomFactor, RandomStructure


def _design() -> Design:
    n = 12
    codes = np.repeat(np.arange(4), 3)
    X = np.column_stack([np.ones(n), np.arange(n, dtype=float)])
    factor = Factor("subject", codes, tuple("abcd"), np.ones((n, 1)), ("(Intercept)",))
    structure = RandomStructure((RandomFactor("subject", 4, 1, ("(Intercept)",)),))
    return Design(X, ("(Intercept)", "t"), (factor,), (), structure)


def test_the_digest_follows_the_sources(tmp_path, monkeypatch):
    first = sd.source_digest()
    assert len(first) == 16 and int(first, 16) >= 0
    assert sd.source_digest() == first
    copy = tmp_path / "mpiblmm"
    shutil.copytree(sd._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    monkeypatch.setattr(sd, "_PACKAGE", copy)
    sd.source_digest.cache_clear()
    try:
        assert sd.source_digest() == first               # the same sources elsewhere
        (copy / "lmm" / "__init__.py").write_text((copy / "lmm" / "__init__.py").read_text()
                                                  + "\n# one line more\n")
        sd.source_digest.cache_clear()
        assert sd.source_digest() != first
    finally:
        sd.source_digest.cache_clear()


def test_a_code_change_changes_the_hash_and_is_named(monkeypatch):
    design = _design()
    before_hash, before = pipeline.input_digests(design, Settings(), "fingerprint")
    assert before["code"] == sd.source_digest()
    monkeypatch.setattr(pipeline, "source_digest", lambda: "0123456789abcdef")
    after_hash, after = pipeline.input_digests(design, Settings(), "fingerprint")
    assert after_hash != before_hash
    assert after["version"] == before["version"]
    assert what_changed(before, after) == (
        f"mpiblmm's code changed (version {before['version']}, sources {before['code']} -> "
        f"0123456789abcdef)")
    # a results file written before the digest was recorded
    old = {k: v for k, v in before.items() if k != "code"}
    assert what_changed(old, after).startswith("mpiblmm's code changed (version ")
    assert "sources unrecorded -> 0123456789abcdef" in what_changed(old, after)
