"""``mpiblmm report``: a fitted demo study's page loads in headless Chromium with every figure.

The page itself has no scripts; the test loads a copy with a checking script appended that
writes, once the page has loaded, how many images there are and how many decoded
(``naturalWidth > 0``), then reads Chromium's ``--dump-dom``.  A screenshot is kept in
``test-reports/report.png``.  Chromium is Debian's ``chromium`` (scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var d = document.createElement('div'); d.id = 'image-check';
  d.textContent = 'IMAGES ' + imgs.length + ' LOADED ' + ok;
  document.body.appendChild(d);
});
</script>"""


def mpiblmm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    job = subprocess.run([sys.executable, "-m", "mpiblmm", *args], cwd=cwd, text=True,
                         capture_output=True, timeout=300)
    assert job.returncode == 0, job.stderr
    return job


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is missing: scripts/setup.sh installs it (Debian package chromium)"
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    mpiblmm("simulate", "study", "--subjects", "10", "--visits", "3", "--shape", "7", "6", "4",
            cwd=tmp)
    fit = mpiblmm("fit", "study/spec.json", cwd=tmp)
    (tmp / "fit.txt").write_text(fit.stdout)
    out = mpiblmm("report", "study/results/results.h5", "--out", "rep", cwd=tmp)
    assert "report.html" in out.stdout
    return tmp / "rep" / "report.html"


def test_stored_summary_has_the_printed_total_and_the_export(report):
    import h5py

    printed = (report.parent.parent / "fit.txt").read_text()
    headline = re.search(r"fitted \d+ of \d+ voxels in ([0-9.]+) s", printed)
    with h5py.File(report.parent.parent / "study" / "results" / "results.h5", "r") as f:
        summary = json.loads(f.attrs["summary"])
    assert headline and headline.group(1) == f"{summary['total_seconds']:.2f}"
    seconds = summary["seconds"]
    assert seconds["total"][2] == summary["total_seconds"]
    assert 0 < seconds["export"][1] < summary["total_seconds"]
    assert sum(v[2] for k, v in seconds.items() if k != "total") >= 0.5 * summary["total_seconds"]
    table = re.search(r"\n\s+total\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)\n", printed)
    assert table and table.group(1) == headline.group(1)  # the phase table agrees too


def test_report_is_one_self_contained_page(report):
    text = report.read_text()
    assert list(report.parent.iterdir()) == [report]
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', text)
    assert len(srcs) >= 10 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for section in ("Contrasts", "Voxel status", "Analysis mask", "Observations per voxel",
                    "Iterations", "Degrees of freedom", "Time per phase"):
        assert section in text
    # the figures' facts come from results.h5: its status counts appear in the table
    import h5py

    with h5py.File(report.parent.parent / "study" / "results" / "results.h5", "r") as f:
        counts = json.loads(f.attrs["status_counts"])
    for code, n in counts.items():
        assert f"<td>{code}</td>" in text and f"<td>{n}</td>" in text


def test_report_loads_in_headless_chromium(report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"IMAGES (\d+) LOADED (\d+)", dom.stdout)
    assert found, dom.stderr[-2000:]
    total, loaded = int(found.group(1)), int(found.group(2))
    assert total >= 10 and loaded == total
    shots = REPO / "test-reports"
    shots.mkdir(exist_ok=True)
    shot = shots / "report.png"
    subprocess.run([chromium(), *flags, "--window-size=1200,4000", f"--screenshot={shot}",
                    report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_report_over_a_given_background_and_a_wrong_one(report):
    tmp = report.parent.parent
    image = sorted((tmp / "study" / "images").glob("*.nii*"))[0]
    mpiblmm("report", "study/results/results.h5", "--out", "rep2", "--background", str(image),
            cwd=tmp)
    assert str(image) in (tmp / "rep2" / "report.html").read_text()
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp / "small.nii")
    job = subprocess.run([sys.executable, "-m", "mpiblmm", "report", "study/results/results.h5",
                          "--background", "small.nii"], cwd=tmp, text=True, capture_output=True,
                         timeout=120)
    assert job.returncode == 2 and "Traceback" not in job.stderr
    assert job.stderr.strip().startswith("mpiblmm: error: small.nii: background shape (3, 3, 3)")
    # the right shape, mirrored in x: not the study grid either (was drawn without a word)
    img = nib.load(str(image))
    flipped = img.affine.copy()
    flipped[0, 0] = -flipped[0, 0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), flipped), tmp / "flip.nii")
    job = subprocess.run([sys.executable, "-m", "mpiblmm", "report", "study/results/results.h5",
                          "--out", "rep3", "--background", "flip.nii"], cwd=tmp, text=True,
                         capture_output=True, timeout=120)
    lines = job.stderr.strip().splitlines()
    assert job.returncode == 2 and len(lines) == 1, job.stderr
    assert lines[0].startswith("mpiblmm: error: flip.nii: background is not on the study "
                               "grid: affine differs (by up to"), lines[0]


#: Runs ``mpiblmm report`` with files limited to 64 KB once MPI is up (its own start-up
#: needs larger shared-memory files): a larger write fails with EFBIG, as on a full quota.
_SMALL_FILES = """
import resource, signal, sys
from mpi4py import MPI
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
from mpiblmm.cli import run
sys.argv[0] = "mpiblmm"
run()
"""


def test_a_report_that_cannot_be_written_is_one_line_and_exit_code_4(report):
    """A failed write (the page with its figures is larger than the limit) is an I/O
    failure, exit code 4 as the README says for every failed write; not a user error."""
    tmp = report.parent.parent
    job = subprocess.run([sys.executable, "-c", _SMALL_FILES, "report",
                          "study/results/results.h5", "--out", "rep_small"], cwd=tmp,
                         text=True, capture_output=True, timeout=300)
    assert job.returncode == 4, job.stderr
    lines = job.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in job.stderr
    assert lines[0].startswith("mpiblmm: error: rep_small: cannot write the report (File too "
                               "large)"), lines[0]
    assert not (tmp / "rep_small").exists()    # the folder it made is not left empty behind


def test_a_read_only_output_is_the_user_s_to_change(tmp_path, monkeypatch):
    """EROFS is exit code 2, as fit and export give for a read-only output (an audit saw
    4 from report alone); a full disk stays 4 (above)."""
    import errno

    from mpiblmm.errors import UserError
    from mpiblmm.parallel import IOFailure
    from mpiblmm.report import make_report, page

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(page.Path, "write_text", refuse)
    results = next(Path(__file__).parent.glob("*.py"))     # never read: load is replaced
    monkeypatch.setattr("mpiblmm.report.data.load_report_data", lambda r, b: None)
    monkeypatch.setattr(page, "render", lambda d: "<html></html>")
    with pytest.raises(UserError) as err:
        make_report(results, tmp_path / "out")
    assert not isinstance(err.value, IOFailure)     # a UserError: exit code 2
    assert "cannot write the report (Read-only file system)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_model_section_shows_what_was_fitted(report):
    """A journey audit: the page never showed the model.  Now: the formula (or the matrix
    form), the fixed effects, each random effect's median variance over the fitted voxels
    (as results.h5 has it) and each contrast's weights, in the spec's order."""
    import h5py
    import numpy as np

    page = report.read_text()
    start = page.index(">Model<")
    model = re.sub(r"<[^>]+>", " ", page[start:page.index("<h2", start)])
    model = " ".join(model.split())
    spec = json.loads((report.parents[1] / "study" / "spec.json").read_text())
    results = report.parents[1] / "study" / "results" / "results.h5"
    with h5py.File(results, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["beta"].attrs["names"]]
        fitted = f["status"][...] <= 2
        rows = []
        for factor in f["random"]:
            cov = f[f"random/{factor}/cov"][...]
            effects = [e.decode() if isinstance(e, bytes) else e
                       for e in f[f"random/{factor}/cov"].attrs["names"]]
            for k, effect in enumerate(effects):
                v = cov[fitted, k, k]
                rows.append(f"{factor} {effect} {float(np.median(v[np.isfinite(v)])):.4g}")
    if "formula" in spec:
        assert f"Formula: {spec['formula']}" in model
    assert "Fixed effects: " + " , ".join(names) + " ." in model
    for row in rows:
        assert row in model, (row, model)
    order = [c["name"] for c in spec.get("contrasts", [])]
    assert [model.index(f" {n} T ") if f" {n} T " in model else model.index(f" {n} F ")
            for n in order] == sorted(model.index(f" {n} T ") if f" {n} T " in model
                                      else model.index(f" {n} F ") for n in order)


def test_the_overview_gives_the_peak_memory_and_budget(report):
    import h5py

    with h5py.File(report.parents[1] / "study" / "results" / "results.h5", "r") as f:
        summary = json.loads(f.attrs["summary"])
    peak = " / ".join(f"{x:.4g}" for x in summary["peak_memory_mb"])
    assert (f"<td>peak memory per rank (MiB, min / median / max)</td><td>{peak}; budget "
            f"{summary['memory_budget_mb']:.4g}</td>") in report.read_text()
