"""The documentation's examples run, so they cannot rot.

Every fenced block marked ``console`` in README.md and docs/*.md is an example to run: its
lines starting with ``$ `` are commands (a trailing backslash continues a command), the
other lines are sample output and are not checked.  The blocks of one page run in order, in
one shell, in a fresh folder, with the environment's ``bin`` first on ``PATH`` (as after
``source .venv/bin/activate``); each command must succeed.  Relative links between the pages
must point at files that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```console\n(.*?)^```", re.S | re.M)


def commands(page: Path) -> list[str]:
    """The ``$ `` commands of a page's console blocks, continuation lines joined."""
    out: list[str] = []
    for block in BLOCK.findall(page.read_text()):
        pending = None
        for line in block.splitlines():
            if pending is not None:
                pending += "\n" + line
                if not line.endswith("\\"):
                    out.append(pending)
                    pending = None
            elif line.startswith("$ "):
                cmd = line[2:]
                if cmd.endswith("\\"):
                    pending = cmd
                else:
                    out.append(cmd)
    return out


RUNNABLE = [p for p in PAGES if commands(p)]


def test_the_quick_start_has_runnable_examples():
    assert REPO / "docs" / "QUICKSTART.md" in RUNNABLE
    assert len(commands(REPO / "docs" / "QUICKSTART.md")) >= 5


@pytest.mark.spawns_mpiexec
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_console_examples_run(page, tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.prefix, 'bin')}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for cmd in commands(page):
        job = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, (f"{page.name}: `{cmd}` failed ({job.returncode}):\n"
                                     f"{job.stdout[-1500:]}\n{job.stderr[-1500:]}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
