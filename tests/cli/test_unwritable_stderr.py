"""A user error whose line cannot be printed still exits with code 2.

A fault audit ran ``mpiblmm fit spec.json 2>/dev/full`` on a spec with a contrast named
twice: the OSError of printing the error line escaped ``run_guarded`` and the exit code was 1
(255 under ``mpiexec``, whose rank aborted), as for a bug.  Standard error is now printed
through :class:`mpiblmm.cli.QuietWhenClosed` (without the warning, which has nowhere to go),
and ``run_guarded`` prints its lines through :func:`mpiblmm.parallel.say`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from mpiblmm.errors import UserError
from mpiblmm.parallel import AgreedUserError, run_guarded


class _FullStream(io.TextIOBase):
    """A text stream on a full disk: every write and flush fails with ENOSPC."""

    def __init__(self) -> None:
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _OneRank:
    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1


def _raise(exc: BaseException):
    def job():
        raise exc
    return job


@pytest.mark.parametrize("error", [UserError("spec.json: contrasts: appears twice"),
                                   AgreedUserError("spec.json: contrasts: appears twice", 0)])
def test_run_guarded_keeps_exit_code_2_when_stderr_is_full(monkeypatch, error):
    full = _FullStream()
    monkeypatch.setattr("sys.stderr", full)
    assert run_guarded(_raise(error), _OneRank()) == 2
    assert full.attempts >= 1                       # it tried to print


def test_standard_error_is_dropped_quietly_once_it_fails(monkeypatch):
    """stderr's wrapper: no warning (where would it go), no exception, writes dropped."""
    from mpiblmm.cli import QuietWhenClosed

    full = _FullStream()
    stream = QuietWhenClosed(full, what=None)
    for _ in range(3):
        print("mpiblmm: error: something", file=stream, flush=True)
    assert full.attempts == 1


def _spec_with_a_contrast_twice(folder: Path) -> Path:
    """A spec whose error is found before any file is read (a contrast named twice)."""
    for name in ("X.csv", "f.csv", "images.txt"):
        (folder / name).write_text("")
    path = folder / "spec.json"
    path.write_text(json.dumps({
        "images": "images.txt", "X": "X.csv", "random": [{"name": "s", "factor": "f.csv"}],
        "contrasts": [{"name": "c", "weights": [1]}, {"name": "c", "weights": [1]}]}))
    return path


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("argv", [["fit", "SPEC"], ["check", "SPEC"],
                                  ["fit", "SPEC", "--chunk-voxels", "0"]])
def test_a_user_error_into_dev_full_exits_2(mpiblmm_command, tmp_path, argv):
    spec = _spec_with_a_contrast_twice(tmp_path)
    with open("/dev/full", "w") as full:
        result = subprocess.run([*mpiblmm_command, *[str(spec) if a == "SPEC" else a
                                                     for a in argv]],
                                stdout=subprocess.PIPE, stderr=full, text=True, timeout=120,
                                cwd=tmp_path)
    assert result.returncode == 2
    assert not (tmp_path / "results").exists()
