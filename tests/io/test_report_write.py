"""``report``: a write that fails (full disk, quota) leaves no ``.report.html.tmp<pid>``
behind, and an earlier page stays as it was."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mpiblmm.report import page


def _half_written(self: Path, text: str, *args, **kwargs) -> int:
    """Path.write_text as on a full disk: part of the file, then ENOSPC."""
    with open(self, "w", encoding="utf-8") as fh:
        fh.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(self))


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_failed_report_write_leaves_no_temporary_file(tmp_path, monkeypatch, where):
    (tmp_path / "report.html").write_text("the earlier page")
    monkeypatch.setattr(page, "render", lambda d: "<html>" + "x" * 10000 + "</html>")
    if where == "write":
        monkeypatch.setattr(Path, "write_text", _half_written)
    else:
        def refuse(src, dst):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "replace", refuse)  # page imports os where it writes
    with pytest.raises(OSError):
        page.write_report(None, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "the earlier page"


def test_a_report_written_whole_replaces_the_page(tmp_path, monkeypatch):
    monkeypatch.setattr(page, "render", lambda d: "<html>new</html>")
    assert page.write_report(None, tmp_path) == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "<html>new</html>"
