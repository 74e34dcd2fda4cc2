#!/usr/bin/env python3
"""The cost model of docs/SCALING.md: a large study on many ranks, phase by phase.

Counts (bytes, flops, messages, HDF5 chunks and writes) follow from the code's layout rules
(packed.h5 chunking, chunk sizing by `--max-memory-mb`, the results datasets); times apply
constants measured on the development machine (see docs/SCALING.md) and stated assumptions
about the cluster (file-system bandwidth, metadata rate, MPI start-up), all overridable.
Prints one table per study.  Asserts nothing.

    .venv/bin/python scripts/cost_model.py [--ranks 512] [--fs-gbs 20] [--t-level-us 0.62]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Study:
    name: str
    n: int  # images
    V: int  # voxels fitted
    grid: int  # voxels of the image grid
    levels: tuple[int, ...]  # levels per random factor
    q: tuple[int, ...]  # random effects per level, per factor
    p: int  # fixed effects
    contrasts: tuple[str, ...]  # "T" / "F"
    image_mb: float  # one image on disk (compressed NIfTI)
    missing: float = 0.1  # share of voxels with some observation missing


UKB = Study("UK Biobank: 40,000 images (16,000 subjects x 2-3 visits), (1 + age | subject)",
            n=40_000, V=230_000, grid=91 * 109 * 91, levels=(16_000,), q=(2,), p=4,
            contrasts=("T", "T", "F"), image_mb=2.0)
ABCD = Study("ABCD-like: 20,000 images, (1 | site) + (1 | family) + (1 | subject), nested",
             n=20_000, V=230_000, grid=91 * 109 * 91, levels=(11_800, 9_900, 21), q=(1, 1, 1),
             p=6, contrasts=("T", "T", "F"), image_mb=2.0)


def fmt_bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def model(s: Study, a: argparse.Namespace) -> list[tuple[str, str]]:
    R = a.ranks
    L = sum(s.levels)
    q_tot = sum(l * q for l, q in zip(s.levels, s.q))
    q1 = s.q[0]
    vox_rank = math.ceil(s.V / R)
    img_rank = math.ceil(s.n / R)
    rows = []

    # ---- bytes
    packed = s.n * s.V * 4.0
    rows += [("voxels / images per rank", f"{vox_rank:,} / {img_rank:,}"),
             ("ingest: read per rank (compressed) / decoded",
              f"{fmt_bytes(img_rank * s.image_mb * 1e6)} / {fmt_bytes(img_rank * s.grid * 4.0)}"),
             ("packed.h5 (n x V float32), written once", fmt_bytes(packed)),
             ("fit: read per rank (its slab)", fmt_bytes(vox_rank * s.n * 4.0))]

    # ---- flops per voxel (counts from the formulas, docs/SCALING.md)
    pf_complete = 2 * s.n * (2 * s.p + q1 + 1)
    pf_missing = pf_complete + s.n * (s.p * (s.p + 1) + 2 * q1 * s.p + q1 * (q1 + 1))
    fs = a.evaluations * a.flops_per_level * L * (a.nested_flops if len(s.levels) > 1 else 1)
    rows += [("product forms per voxel: complete / with missing data",
              f"{pf_complete / 1e6:.2g} / {pf_missing / 1e6:.2g} Mflop"),
             ("Fisher Scoring + polish + Satterthwaite per voxel (per-level path)",
              f"{fs / 1e6:.3g} Mflop ({a.evaluations} evaluations x {a.flops_per_level} "
              f"flop x {L:,} levels" + (f" x {a.nested_flops:g}" if len(s.levels) > 1 else "")
              + ")")]
    if len(s.levels) > 1:
        dense = q_tot ** 3 / 3
        rows.append(("  dense q x q path (today's several-factor code), one Cholesky",
                     f"{dense:.2g} flop, {fmt_bytes(8.0 * q_tot ** 2)} per voxel: infeasible"))

    # ---- memory: mpiblmm.lmm.analysis.bytes_per_voxel for one factor; for several, the
    # blocked path (issue 9) is assumed to keep O(levels) per voxel as one factor does (today's
    # dense path needs q^2, see above)
    zz = s.levels[0] * q1 ** 2 if len(s.levels) == 1 else L
    m = sum(q * (q + 1) // 2 for q in s.q) + 1
    per_voxel = 8 * (4 * s.n + 8 * (s.p ** 2 + q_tot * s.p + zz + q_tot) + m * m * s.p ** 2
                     + 6 * len(s.contrasts)) + 4096
    budget = a.memory_mb * 2 ** 20
    chunk = max(1, min(16384, int(0.5 * budget // per_voxel)))
    n_chunks = math.ceil(vox_rank / chunk)
    shared = 8.0 * (s.n * (s.p + sum(s.q)) + L * q1 * (s.p + q1))  # X, Z, shared Z'X, Z'Z
    rows += [("working memory per voxel (bytes_per_voxel, generous)", fmt_bytes(per_voxel)),
             (f"chunk at --max-memory-mb {a.memory_mb:.0f} / chunks per rank",
              f"{chunk:,} voxels / {n_chunks}"),
             ("per rank: design + shared product forms + one data chunk",
              f"{fmt_bytes(shared)} + {fmt_bytes(chunk * s.n * 8.0)}")]

    # ---- reductions and messages
    rows += [("reductions", f"ingest Allreduce of observed counts {fmt_bytes(4.0 * s.grid)}; "
              f"design Bcast ~{fmt_bytes(shared)}; timers Allgather {fmt_bytes(72.0 * R)}; "
              f"status counts {fmt_bytes(8.0 * 256)}; progress: <= 1 message of 32 B per "
              f"rank per {a.interval / 2:.0f} s")]

    # ---- HDF5
    c = max(1, min(s.V, (1 << 20) // (4 * s.n)))
    # written per chunk: beta, cov_beta, sigma2, llh, iterations, n, status, one covariance
    # per random factor, 6 per contrast, progress/done; the file also holds `voxels`
    n_results = 7 + len(s.levels) + 6 * len(s.contrasts) + 1
    res_bytes = s.V * (8 * (s.p + s.p ** 2 + sum(q * q for q in s.q) + 2 + 6 * len(s.contrasts))
                       + 4 * 3 + 12 + 2)
    rows += [("packed.h5 chunks", f"{math.ceil(s.V / c):,} chunks of {c} voxels x all "
              f"{s.n:,} images ({fmt_bytes(c * s.n * 4.0)}); a rank's ingest rows touch every "
              f"chunk ({img_rank} rows x {c} voxels = {fmt_bytes(img_rank * c * 4.0)} pieces)"),
             ("results.h5", f"{n_results + 1} datasets, {fmt_bytes(res_bytes)}; "
              f"{n_results * n_chunks} independent writes per rank, "
              f"{n_results * n_chunks * R:,} in all")]

    # ---- time
    startup = a.startup_s + a.mpi_init_s
    # the input fingerprint: each rank stats its block of the images, then one gather of
    # their keys (~120 B each) on rank 0 (io.ingest.shared_input_fingerprint)
    setup = img_rank * a.stat_ms / 1e3
    # before that (thirteenth session) rank 0 made every stat alone, two per image: the spec's
    # parse (is it a file?) and the input fingerprint
    setup_root = 2 * s.n * a.stat_ms / 1e3
    decode = img_rank * a.ingest_ms_per_mb * s.grid * 4.0 / 1e6 / 1e3
    fs = a.fs_gbs * 1e9
    ingest = max(decode, s.n * s.image_mb * 1e6 / fs) + 2 * packed / fs  # fill + data
    read = max(vox_rank * s.n * 4.0 / (a.rank_read_mbs * 1e6), packed / fs)
    blocked = a.nested_factor if len(s.levels) > 1 else 1.0  # the blocked path, measured
    fit_lo = (blocked * vox_rank * (a.t_voxel_ms / 1e3 + a.t_level_us / 1e6 * L)
              + n_chunks * a.chunk_s)
    fit = fit_lo * a.load_factor
    write = n_results * n_chunks * a.small_write_ms / 1e3
    export = 1.0
    total_lo = startup + setup + ingest + read + fit_lo + write + export
    total_hi = startup + setup + ingest + read + fit + write + export
    rows += [("time: start-up (imports + MPI_Init)", f"{startup:.0f} s"),
             ("time: setup (each rank stats its block of the images)", f"{setup:.2f} s"),
             ("time: ingest (decode per rank vs file system; packed written twice: fill+data)",
              f"{ingest:.0f} s"),
             ("time: read slabs", f"{read:.1f} s"),
             ("time: fit (idle core .. x{:g} for a loaded or slower one)".format(a.load_factor)
              + (f", x{a.nested_factor:g} for the blocked path" if blocked != 1 else ""),
              f"{fit_lo:.0f} .. {fit:.0f} s"),
             ("time: results writes + export", f"{write + export:.1f} s"),
             ("time: end to end", f"{total_lo / 60:.1f} .. {total_hi / 60:.1f} min"),
             ("time: setup when rank 0 made every stat alone (2 per image)",
              f"{setup_root:.0f} s"),
             ("time: end to end when rank 0 made every stat alone",
              f"{(total_lo - setup + setup_root) / 60:.1f} .. "
              f"{(total_hi - setup + setup_root) / 60:.1f} min")]
    return rows


def parser() -> argparse.ArgumentParser:
    """The options: the cluster's and the measured constants."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=512)
    ap.add_argument("--memory-mb", type=float, default=1600, help="--max-memory-mb per rank")
    ap.add_argument("--fs-gbs", type=float, default=20.0,
                    help="parallel file system bandwidth, GB/s (striped files)")
    ap.add_argument("--rank-read-mbs", type=float, default=500.0, help="one rank's read MB/s")
    ap.add_argument("--stat-ms", type=float, default=0.5, help="one stat() on the shared FS")
    ap.add_argument("--startup-s", type=float, default=5.0, help="imports at scale")
    ap.add_argument("--mpi-init-s", type=float, default=2.0)
    ap.add_argument("--ingest-ms-per-mb", type=float, default=18.6,
                    help="ingest per MB of decoded image (measured with the direct read of "
                         "float32 NIfTI, scripts/bench_ingest.py on 2 mm images of 3.6 MB: "
                         "67 ms per image on the loaded machine, 25 ms on an idle one)")
    ap.add_argument("--t-voxel-ms", type=float, default=0.045,
                    help="fit cost per voxel, idle core (measured with the one-factor kernel, "
                         "one call per evaluation: scripts/scaling.py, 1,000 voxels, 60 / 250 "
                         "/ 1,000 subjects)")
    ap.add_argument("--t-level-us", type=float, default=0.62,
                    help="fit cost per voxel-level, idle core (the same runs)")
    ap.add_argument("--chunk-s", type=float, default=0.012,
                    help="fixed cost per chunk (scripts/bench_chunks.py: ~11 ms per chunk of 300)")
    ap.add_argument("--load-factor", type=float, default=3.0,
                    help="the upper end: how much slower a loaded or older core may run (the "
                         "shared dev machine ran up to 3x slower than idle)")
    ap.add_argument("--nested-factor", type=float, default=1.17,
                    help="several nested one-effect factors (the blocked path's compiled "
                         "kernel): cost per voxel against the one-factor line at the same "
                         "number of levels (measured: scripts/bench_cohort.py design (b), "
                         "18,021 levels, 12.9-13.3 ms per voxel on an idle core against the "
                         "line's 0.045 ms + 0.62 us x 18,021 = 11.2 ms: 1.15-1.19)")
    ap.add_argument("--nested-flops", type=float, default=0.15,
                    help="the blocked kernel's flops per voxel against the per-level count "
                         "at the same number of levels (about 21 evaluations x 0.5 Mflop on "
                         "design (b))")
    ap.add_argument("--evaluations", type=int, default=12)
    ap.add_argument("--flops-per-level", type=int, default=400)
    ap.add_argument("--small-write-ms", type=float, default=2.0)
    ap.add_argument("--interval", type=float, default=10.0)
    return ap


def main() -> None:
    a = parser().parse_args()
    for study in (UKB, ABCD):
        print(f"\n{study.name}, {a.ranks} ranks")
        for key, value in model(study, a):
            print(f"  {key:<74} {value}")


if __name__ == "__main__":
    main()
