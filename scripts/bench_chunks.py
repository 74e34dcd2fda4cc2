#!/usr/bin/env python3
"""Benchmark the cost of small chunks: the same voxels fitted as one chunk and in small chunks.

Demo-like study (60 subjects x 4 visits, ``y ~ age + t + (1 + t | subject)``, REML; a quarter
of the voxels without random effects; 30% of the voxels miss 1-15% of their observations),
fitted chunk by chunk as the pipeline does (:func:`~mpiblmm.lmm.analysis.analyse_chunk`:
complete and incomplete voxels are two product-form groups, fitted as one in small chunks).  Prints, for the
whole set as one chunk and in chunks of ``--chunk`` voxels, the CPU seconds of

- ``fit``: :func:`~mpiblmm.lmm.estimate.fit` alone (product forms built outside the timing),
- ``chunk``: :func:`~mpiblmm.lmm.analysis.analyse_chunk` (product forms, fit, Satterthwaite,
  contrasts),

best of ``--repeats``, and the ratio small/whole (issue 12: at most 1.3).  Checks that both
chunkings give the same bits.  BLAS threads are pinned to 1 before numpy is imported.
``--subjects`` sizes the study (4 visits each; default the demo's 60, n = 240): a chunk's
fixed cost (its rounds of Fisher Scoring and polish) does not grow with n, a voxel's work
does, so the ratio falls as n grows.

Usage::

    python3 scripts/bench_chunks.py [--voxels 6000] [--chunk 300] [--repeats 3]
    python3 scripts/bench_chunks.py --subjects 1000 --voxels 1200   # n = 4,000
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpiblmm.allocator import keep_freed_memory  # noqa: E402
from mpiblmm.lmm.analysis import (  # noqa: E402
    ContrastDef, Model, Settings, analyse_chunk, fit_groups, product_form_groups,
)
from mpiblmm.lmm.estimate import fit  # noqa: E402
from mpiblmm.lmm.products import product_forms  # noqa: E402

from bench_estimator import longitudinal  # noqa: E402


def study(v: int, n_sub: int = 60, missing: float = 0.3, seed: int = 1):
    """The model and (v, n) data with NaN for missing observations."""
    rng = np.random.default_rng(seed)
    X, rd, _ = longitudinal(n_sub, rng)
    n = X.shape[0]
    contrasts = (ContrastDef("age", np.array([[0.0, 1.0, 0.0]])),
                 ContrastDef("t", np.array([[0.0, 0.0, 1.0]])),
                 ContrastDef("both", np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "F"))
    sd = rng.uniform(0.0, 1.0, size=(v, 2))
    sd[: v // 4] = 0.0
    B = rng.normal(size=(2 * n_sub, v)) * np.tile(sd, n_sub).T   # column j*2+a: level j, effect a
    Y = (100.0 + X @ rng.normal(size=(3, v)) + rd.sparse() @ B + rng.normal(size=(n, v))).T
    holes = rng.random(v) < missing
    for i in np.flatnonzero(holes):                      # setup only, not timed
        k = rng.integers(max(1, int(0.01 * n)), int(0.15 * n) + 1)
        Y[i, rng.choice(n, size=k, replace=False)] = np.nan
    return Model(X, rd, contrasts), Y


def chunks(v: int, size: int) -> list[slice]:
    return [slice(s, min(v, s + size)) for s in range(0, v, size)]


def time_fit(model: Model, Y: np.ndarray, size: int) -> tuple[float, np.ndarray]:
    """CPU seconds of ``fit`` over chunks of ``size`` voxels, and llh.  Each chunk's groups
    are fitted as :func:`~mpiblmm.lmm.analysis.analyse_chunk` fits them: apart, or as one
    (:func:`~mpiblmm.lmm.analysis.fit_groups`)."""
    llh = np.full(Y.shape[0], np.nan)
    total = 0.0
    for sl in chunks(Y.shape[0], size):
        Yc = Y[sl]
        obs = np.isfinite(Yc)
        groups = product_form_groups(obs, np.ones(Yc.shape[0], dtype=bool))
        for pf, g in fit_groups([(product_forms(model.X, model.rd, Yc[grp].T, obs[grp].T), grp)
                                 for grp in groups]):
            c0 = time.process_time()
            res = fit(pf)
            total += time.process_time() - c0
            llh[np.arange(sl.start, sl.stop)[g]] = res.llh
    return total, llh


def time_chunk(model: Model, Y: np.ndarray, size: int) -> tuple[float, dict]:
    """CPU seconds of ``analyse_chunk`` over chunks of ``size`` voxels, and the results."""
    parts = []
    c0 = time.process_time()
    for sl in chunks(Y.shape[0], size):
        parts.append(analyse_chunk(model, Y[sl], Settings()))
    total = time.process_time() - c0
    return total, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def same_bits(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=6000)
    ap.add_argument("--chunk", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subjects", type=int, default=60, help="subjects (4 visits each)")
    args = ap.parse_args(argv)
    keep_freed_memory()
    model, Y = study(args.voxels, n_sub=args.subjects)
    v = Y.shape[0]
    analyse_chunk(model, Y[:50], Settings())                 # warm up
    best = {}
    for _ in range(args.repeats):                            # alternate the two chunkings
        for what, fn in (("fit", time_fit), ("chunk", time_chunk)):
            for size in (v, args.chunk):
                sec, out = fn(model, Y, size)
                key = (what, size)
                best[key] = min(best.get(key, np.inf), sec)
                if size == v:
                    ref = out
                elif what == "fit":
                    assert np.array_equal(ref, out, equal_nan=True), "llh differs by chunking"
                else:
                    assert same_bits(ref, out), "results differ by chunking"
    print(f"{v} voxels, n = {4 * args.subjects}, one chunk vs chunks of {args.chunk} (CPU s, "
          f"best of {args.repeats}; same bits)")
    for what in ("fit", "chunk"):
        whole, small = best[(what, v)], best[(what, args.chunk)]
        print(f"{what:6s} whole {whole:7.3f}  chunks {small:7.3f}  ratio {small / whole:5.2f}")


if __name__ == "__main__":
    main()
