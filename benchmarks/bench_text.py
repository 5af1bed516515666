"""Benchmark: MiniLM text features for generated Amazon-like items (items/s on this machine).

Why: the text stage's cost is the sentence-transformers encode; this measures it for
the MMRec recipe (title + brand + category path + description) at realistic lengths,
and the throughput of a fully cached re-run. Prints a table; not run by CI.

    .venv/bin/python benchmarks/bench_text.py --items 2000 --repeats 3 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sand.pipeline.features.text import encode_texts, item_text  # noqa: E402

WORDS = (
    "soft cotton baby blanket warm lightweight stroller car seat organic bottle nipple pacifier "
    "crib sheet fitted breathable mesh toddler toy educational wooden rattle teether silicone "
    "bpa free dishwasher safe easy clean portable travel foldable adjustable strap buckle "
    "safety certified gentle skin hypoallergenic washable machine durable premium quality "
    "newborn infant months years design color pink blue green grey pattern animal star moon"
).split()
BRANDS = ["Acme", "Graco", "Munchkin", "Summer Infant", "Fisher-Price", "Tommee Tippee", None]
PATHS = [["Baby", "Nursery", "Bedding"], ["Baby", "Feeding", "Bottle-Feeding", "Bottles"],
         ["Baby", "Gear", "Strollers"], ["Baby", "Toys"], None]


def generated_texts(n: int, seed: int) -> list[str]:
    """Deterministic item texts: title 5-15 words, description 30-200 words (2014 meta-like)."""
    rng = np.random.default_rng(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))

    return [
        item_text(words(5, 15).title(), BRANDS[rng.integers(len(BRANDS))], PATHS[rng.integers(len(PATHS))],
                  words(30, 200) + ".")
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    texts = generated_texts(args.items, args.seed)
    mean_words = statistics.mean(len(t.split()) for t in texts)
    encode_texts(texts[:8], batch_size=args.batch_size, progress=False, device="cpu")  # load the model
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        encode_texts(texts, batch_size=args.batch_size, progress=False, device="cpu")
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        encode_texts(texts, batch_size=args.batch_size, progress=False, device="cpu", cache_dir=Path(tmp))
        t0 = time.perf_counter()
        encode_texts(texts, batch_size=args.batch_size, progress=False, device="cpu", cache_dir=Path(tmp))
        cached_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(times)
    print(f"MiniLM text features: {args.items} items (mean {mean_words:.0f} words), batch {args.batch_size}, "
          f"cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f} at end")
    print(f"{'case':<22} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'items/s':>8}")
    print(f"{'encode (no cache)':<22} {len(times):>4} {med:>9.2f} {min(times):>7.2f} {max(times):>7.2f} "
          f"{args.items / med:>8.1f}")
    print(f"{'all cached':<22} {1:>4} {cached_s:>9.2f} {cached_s:>7.2f} {cached_s:>7.2f} "
          f"{args.items / cached_s:>8.1f}")
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
