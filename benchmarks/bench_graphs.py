"""Benchmark: blocked kNN item-item graph for many items (default 100,000 x 384, k = 10).

Why: a dense N x N similarity matrix would need 40 GB at this size; this checks that the
blocked build stays fast and small. Each (block size, repeat) runs in a fresh subprocess
so that its peak RSS (ru_maxrss) is its own. Prints a table; not run by CI.

    .venv/bin/python benchmarks/bench_graphs.py --items 100000 --repeats 3 --block-sizes 0 1024
(block size 0 = the library default). "CPU s" is user+sys CPU time of the build: on a
shared machine, CPU s / cores is roughly what the wall time would be without the other load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(n: int, d: int, k: int, block_size: int, seed: int) -> None:
    import numpy as np
    import torch  # noqa: F401 - imported before timing, as a running pipeline already has it

    from sand.pipeline.features.knn import default_block_size, knn_graph

    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    g = knn_graph(x, k, block_size=block_size or None)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert g.nnz == n * k
    print(json.dumps({
        "seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak, "rss_before_mb": rss_before,
        "block_size": block_size or default_block_size(n), "nnz": int(g.nnz),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.items, args.dims, args.k, args.block_sizes[0], args.seed)
        return

    print(f"kNN graph: {args.items} items x {args.dims} dims, k={args.k}, cpus={os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.1f} at start")
    print(f"{'block':>6} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'peak RSS MB':>11} "
          f"{'RSS before MB':>13} {'CPU s':>7}")
    for bs in args.block_sizes:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--worker", "--items", str(args.items), "--dims", str(args.dims),
                   "--k", str(args.k), "--block-sizes", str(bs), "--seed", str(args.seed)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        secs = [r["seconds"] for r in runs]
        print(f"{runs[0]['block_size']:>6} {len(runs):>4} {statistics.median(secs):>9.1f} {min(secs):>7.1f} "
              f"{max(secs):>7.1f} {max(r['peak_rss_mb'] for r in runs):>11.0f} "
              f"{max(r['rss_before_mb'] for r in runs):>13.0f} "
              f"{statistics.median(r.get('cpu_s', float('nan')) for r in runs):>7.1f}", flush=True)
    print(f"load avg {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
