"""Benchmark: streaming the Amazon 2014 image feature file for a Baby-sized dataset.

Why: the release's per-category ``.b`` files are 1 GB (Baby) to tens of GB
(Clothing) and a 5-core dataset keeps a few thousand of their items; the reader
must stream them in bounded memory (target: < 500 MB peak RSS), whatever the
file's size. This writes a generated file of ``--records`` records (default
122,000, about 2.0 GB) in the release's layout, streaming, with ``--items``
of a ``--items + --absent``-item dataset scattered through it, reads it in a
fresh subprocess per repeat (so ``ru_maxrss`` is the read's own), checks the
kept rows, and deletes the file. Prints a table; not run by CI.

    .venv/bin/python benchmarks/bench_amazon2014_features.py --records 122000 --items 7000 --repeats 2

"hash" repeats also compute the file's sha256 on the way (what a local file
costs; a downloaded one already has its sha256 from the download). The file was
just written, so it is read from the page cache: the numbers are the reader's
CPU cost, not the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 1024  # records generated per write


def _asin(i: int) -> str:
    return f"B{i:09d}"


def _write_file(path: Path, n_records: int, seed: int) -> None:
    """The file, written a block at a time: record ``r`` holds ASIN ``B<r>`` and a row whose first value is ``r``."""
    import numpy as np
    from tqdm import tqdm

    from sand.pipeline.features.amazon2014 import FEATURE_DIM, RECORD_DTYPE

    base = np.random.default_rng(seed).standard_normal((BLOCK, FEATURE_DIM), dtype=np.float32)
    block = np.zeros(BLOCK, dtype=RECORD_DTYPE)
    block["feat"] = base
    with open(path, "wb") as fh:
        for start in tqdm(range(0, n_records, BLOCK), desc="writing", unit="block"):
            count = min(BLOCK, n_records - start)
            rows = block[:count]
            rows["asin"] = [_asin(start + j).encode() for j in range(count)]
            rows["feat"][:, 0] = np.arange(start, start + count, dtype=np.float32)
            rows.tofile(fh)
    assert path.stat().st_size == n_records * RECORD_DTYPE.itemsize


def _worker(path: str, asins_path: str, hash_file: bool) -> None:
    import numpy as np

    from sand.pipeline.features.amazon2014 import read_item_features

    asins = json.loads(Path(asins_path).read_text())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = read_item_features(path, asins, hash_file=hash_file)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = ru1.ru_maxrss / 1024
    found = np.flatnonzero(out.found)
    expected = np.array([int(asins[i][1:]) for i in found], dtype=np.float32)
    assert np.array_equal(out.features[found, 0], expected), "kept rows are not the file's rows"
    print(json.dumps({
        "seconds": seconds, "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "peak_rss_mb": peak, "rss_before_mb": rss_before, "found": int(out.items_found),
        "filled": int(out.items_filled), "records": out.stats.records, "gb": out.stats.file_bytes / 1e9,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=122_000, help="records in the file (16,394 bytes each)")
    ap.add_argument("--items", type=int, default=7_000, help="dataset items present in the file")
    ap.add_argument("--absent", type=int, default=50, help="dataset items absent from the file")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temp dir)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.worker[2] == "1")
        return

    import numpy as np

    rng = np.random.default_rng(args.seed)
    rows = sorted(rng.choice(args.records, size=args.items, replace=False).tolist())
    asins = [_asin(r) for r in rows] + [f"Z{i:09d}" for i in range(args.absent)]
    order = rng.permutation(len(asins))  # item order unrelated to file order
    asins = [asins[i] for i in order]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "image_features_Bench.b"
        asins_path = Path(tmp) / "asins.json"
        asins_path.write_text(json.dumps(asins))
        t0 = time.perf_counter()
        _write_file(path, args.records, args.seed)
        print(f"wrote {path.stat().st_size / 1e9:.2f} GB ({args.records} records) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results: dict[str, list[dict]] = {"no hash": [], "hash": []}
        for _ in range(args.repeats):
            for label, flag in (("no hash", "0"), ("hash", "1")):
                out = subprocess.run([sys.executable, __file__, "--worker", str(path), str(asins_path), flag],
                                     capture_output=True, text=True, check=True, env=os.environ)
                results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = results["no hash"][0]
    print(f"\nfile: {first['gb']:.2f} GB, {first['records']} records; dataset: {len(asins)} items "
          f"({first['found']} in the file, {first['filled']} mean-filled); {args.repeats} repeats, median")
    print("| read | seconds | CPU s | GB/s | peak RSS MB | RSS before read MB |")
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        sec = statistics.median(r["seconds"] for r in runs)
        print(f"| {label} | {sec:.2f} | {statistics.median(r['cpu_s'] for r in runs):.2f} | "
              f"{first['gb'] / sec:.2f} | {max(r['peak_rss_mb'] for r in runs):.0f} | "
              f"{statistics.median(r['rss_before_mb'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
