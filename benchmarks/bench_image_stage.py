"""Images/s of the whole image stage (fetch/validate, decode, encode, assemble) on a generated sample.

Why: the stage's speed is what a user waits for, and its shard/runner machinery
must not cost throughput. Each round runs the stage in a fresh subprocess with the
given interpreter (so two checkouts, each with its own venv, can be compared in one
interleaved run); acquire and interactions are built first and not timed. Usage:

    python benchmarks/bench_image_stage.py [--items 200] [--rounds 2] [--set image_features.num_workers=2]
    python benchmarks/bench_image_stage.py --python /other/checkout/.venv/bin/python   # interleaved A/B
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ONE = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from sand.pipeline.base.config import load_config
from sand.pipeline.acquire.stage import run_acquire
from sand.pipeline.dataset.stage import run_interactions
from sand.pipeline.features.image_stage import run_image_features
from sand.pipeline.stages import Context
root, settings, threads = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
cfg = load_config(None, {"data_root": root}, settings)
ctx = Context.create(cfg, progress=False)
inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
def all_at_once(fn, jobs):
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(fn, jobs))
t0 = time.perf_counter()
out = run_image_features(ctx, inter, all_at_once if threads else None)
print(json.dumps({"seconds": time.perf_counter() - t0, "items": out.artifact.manifest["shape"][0],
                  "shards": out.artifact.manifest["shards"]}))
"""


def run_once(python: str, root: Path, settings: list[str], threads: bool) -> dict:
    cmd = [python, "-c", ONE, str(root), json.dumps(settings), "1" if threads else "0"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="settings", action="append", default=[], help="extra config settings")
    ap.add_argument("--threads", action="store_true", help="run the shards all at once in threads (default runner)")
    ap.add_argument("--python", default=None, help="a second interpreter (another checkout) to compare, interleaved")
    args = ap.parse_args()
    settings = [f"acquire.sample_items={args.items}", f"acquire.sample_users={2 * args.items}",
                "image_features.image_size=64", *args.settings]
    pythons = {"this": sys.executable, **({"other": args.python} if args.python else {})}
    times: dict[str, list[float]] = {name: [] for name in pythons}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, python in pythons.items():
                res = run_once(python, Path(tmp) / f"{name}-{r}", settings, args.threads)
                times[name].append(res["seconds"])
                print(f"round {r} {name}: {res['seconds']:.1f}s, {res['items']} items, {res['shards']} shards",
                      file=sys.stderr)
    print(f"image stage, sample with {args.items} items, {' '.join(settings[2:])}, median of {args.rounds} rounds")
    print(f"{'interpreter':<12} {'median s':>9} {'items/s':>8}  runs (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<12} {med:>9.1f} {res['items'] / med:>8.1f}  {[round(t, 1) for t in ts]}")
    if args.python:
        ratio = statistics.median(times["other"]) / statistics.median(times["this"])
        print(f"speed this/other: {ratio:.2f}x")


if __name__ == "__main__":
    main()
