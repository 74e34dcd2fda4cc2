#!/usr/bin/env python3
"""Ingest (NIfTI images -> packed.h5) against reading the same images with nibabel alone.

The issue's target: ingest within 2x of the time nibabel alone needs to read the images.
Times, interleaved over ``--repeats`` (the page cache is warm for both after the first pass):

- ``nibabel``: ``np.asanyarray(nibabel.load(p).dataobj)`` for every image, the least any
  reader does (decompress and scale);
- ``ingest``: :func:`mpiblmm.io.ingest.pack_images` on one process (no MPI), which reads
  every image (float32/float64 NIfTI-1 on the first image's geometry directly, in its stored
  dtype; anything else through nibabel as float64), marks missing values, counts
  observations per voxel and writes ``packed.h5`` (n x V, chunked by voxel columns).

Prints best and median seconds of each, their ratio, and with ``--profile`` the top of a
cProfile of one ingest.  Asserts nothing.

    .venv/bin/python scripts/bench_ingest.py [--subjects 60 --visits 4 --shape 20 20 15]
    .venv/bin/python scripts/bench_ingest.py --spec my_study/spec.json --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nibabel_read(images: list[Path]) -> float:
    import nibabel as nib

    t0 = time.perf_counter()
    for p in images:
        np.asanyarray(nib.load(p).dataobj)
    return time.perf_counter() - t0


def ingest(images: list[Path], out: Path) -> float:
    from mpiblmm.io.ingest import pack_images

    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    pack_images(images, out)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, help="a study's spec (default: simulate one)")
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--visits", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs=3, default=[20, 20, 15])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mpiblmm-ingest-"))
    try:
        spec_path = args.spec
        if spec_path is None:
            bin_dir = Path(sys.executable).parent
            subprocess.run([str(bin_dir / "mpiexec"), "-n", "1", str(bin_dir / "mpiblmm"),
                            "simulate", str(work / "study"), "--subjects", str(args.subjects),
                            "--visits", str(args.visits), "--shape", *map(str, args.shape),
                            "--seed", "1"], check=True, capture_output=True)
            spec_path = work / "study" / "spec.json"
        from mpiblmm.spec import load_spec

        images = [Path(p) for p in load_spec(str(spec_path)).images]
        size = sum(p.stat().st_size for p in images)
        nib_t, ing_t = [], []
        nibabel_read(images)  # warm the page cache for both
        for _ in range(args.repeats):
            nib_t.append(nibabel_read(images))
            ing_t.append(ingest(images, work / "packed.h5"))
        print(f"{len(images)} images of {args.shape if args.spec is None else 'the study'}, "
              f"{size / 2**20:.1f} MiB on disk, packed.h5 "
              f"{(work / 'packed.h5').stat().st_size / 2**20:.1f} MiB; {args.repeats} repeats")
        print(f"{'':>8} {'best s':>8} {'median s':>9} {'ms/image':>9}")
        for name, t in (("nibabel", nib_t), ("ingest", ing_t)):
            print(f"{name:>8} {min(t):8.3f} {statistics.median(t):9.3f} "
                  f"{1000 * min(t) / len(images):9.2f}")
        print(f"ratio ingest / nibabel: best {min(ing_t) / min(nib_t):.2f}, "
              f"median {statistics.median(ing_t) / statistics.median(nib_t):.2f}")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(ingest, images, work / "packed.h5")
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
