"""Benchmark: the item-item graph at a million items — faiss (measured) vs exact (extrapolated).

Why: the exact blocked top-k costs N^2 d; at 1M x 384 that is 0.77 PFLOP, at 1M x 4,096
about 8 PFLOP. This builds the faiss IVF graph of ``sand.pipeline.features.ann`` on N synthetic items
(topic centres plus noise, a stand-in for sentence / CNN embeddings: random isotropic
vectors have no neighbourhoods to find), stored on disk as ``.npy`` and read
memory-mapped (float16 halves the file), reports the recall@k faiss measured on its
held-out sample rows, and times the exact build on a sample of rows to extrapolate its
full cost (its cost per row is the same for every row; timed with the streaming
``ann.exact_rows``, whose memory is bounded, where ``knn_neighbours`` would first make a
normalised float32 copy of all features: 16 GB at 1M x 4,096, next to the index). Each size runs in a fresh
subprocess so that peak RSS is its own. Not run by CI.

    .venv/bin/python benchmarks/bench_graphs_scale.py --items 1000000 --dims 384 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_features(path: Path, n: int, d: int, dtype: str, seed: int, centres: int) -> None:
    """Write N x d items (topic centre + noise) block by block into an .npy memory map."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    for start in range(0, n, 65536):
        b = min(65536, n - start)
        x = c[rng.integers(0, centres, b)] + 0.7 * rng.standard_normal((b, d), dtype=np.float32)
        out[start : start + b] = x.astype(dtype)
    out.flush()
    del out


def _cpu() -> float:
    """User + system CPU seconds of this process: less sensitive to other load than wall time."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch  # noqa: F401 - loaded before timing, as in a running pipeline

    from sand.pipeline.features.ann import exact_rows, faiss_neighbours

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "feat.npy"
        synthetic_features(path, args.items, args.dims, args.dtype, args.seed, args.centres)
        feats = np.load(path, mmap_mode="r")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0, c0 = time.perf_counter(), _cpu()
        rows = None
        if args.search_rows:
            rows = np.sort(np.random.default_rng(2).choice(args.items, args.search_rows, replace=False))
        nbrs, report = faiss_neighbours(feats, args.k, recall_sample=args.recall_sample, seed=args.seed, rows=rows,
                                        storage=args.storage)
        faiss_s, faiss_cpu = time.perf_counter() - t0, _cpu() - c0
        rss_faiss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert nbrs.shape == (args.items if rows is None else len(rows), args.k)
        if rows is not None:  # the search costs the same per row: scale it to every row
            scale, search = args.items / len(rows), report.seconds["search"]
            search_cpu = faiss_cpu * search / faiss_s  # its share of the CPU time, as of the wall time
            faiss_s += search * (scale - 1)
            faiss_cpu += search_cpu * (scale - 1)
        exact_s = exact_cpu = float("nan")
        if args.exact_rows:
            timed = np.sort(np.random.default_rng(1).choice(args.items, args.exact_rows, replace=False))
            t0, c0 = time.perf_counter(), _cpu()
            exact_rows(feats, timed, args.k, include_self=True)
            exact_s = (time.perf_counter() - t0) * args.items / args.exact_rows
            exact_cpu = (_cpu() - c0) * args.items / args.exact_rows
    print(json.dumps({
        "faiss_s": faiss_s, "phases": report.seconds, "nlist": report.nlist, "nprobe": report.nprobe,
        "recall": report.recall_at_k, "recall_rows": report.recall_rows, "tuning": report.tuning,
        "peak_rss_mb_faiss": rss_faiss, "rss_before_mb": rss0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "exact_s_extrapolated": exact_s,
        "faiss_cpu_s": faiss_cpu, "exact_cpu_s_extrapolated": exact_cpu,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--exact-rows", type=int, default=2000, help="rows timed to extrapolate the exact build")
    ap.add_argument("--storage", choices=["float32", "float16"], default="float32",
                    help="how the faiss index stores the vectors (graphs.faiss_storage)")
    ap.add_argument("--search-rows", type=int, default=0,
                    help="search only this many rows and extrapolate the search (0: all rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the feature file (default: system temp)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    import subprocess

    print(f"graph at scale: {args.items} items x {args.dims} dims ({args.dtype}, memory-mapped), k={args.k}, "
          f"faiss storage {args.storage}, "
          f"cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f} at start")
    out = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], check=True, capture_output=True,
                         text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"{'method':>8} {'wall s':>9} {'CPU s':>9} {'recall@k':>9} {'nlist':>6} {'nprobe':>6} {'peak RSS MB':>11}")
    print(f"{'faiss':>8} {r['faiss_s']:>9.0f} {r['faiss_cpu_s']:>9.0f} {r['recall']:>9.4f} {r['nlist']:>6} "
          f"{r['nprobe']:>6} {r['peak_rss_mb_faiss']:>11.0f}")
    print(f"{'exact':>8} {r['exact_s_extrapolated']:>9.0f} {r['exact_cpu_s_extrapolated']:>9.0f} {1.0:>9.4f} "
          f"{'-':>6} {'-':>6} {'(sample)':>11}   <- extrapolated from {args.exact_rows} rows")
    print(f"faiss phases (s): {r['phases']}; nprobe tuning: {r['tuning']}; recall on {r['recall_rows']} rows")
    if args.search_rows:
        print(f"faiss search timed on {args.search_rows} rows and extrapolated to {args.items} (phases: as timed)")
    print(f"exact / faiss: wall {r['exact_s_extrapolated'] / r['faiss_s']:.1f}x, "
          f"CPU {r['exact_cpu_s_extrapolated'] / r['faiss_cpu_s']:.1f}x; "
          f"load avg {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
