"""The whole image stage (loopback fetch, decode, encode): fast engine against eager, and a snapshot update.

On a CPU with native bf16 (AMX) the comparison adds the fast engine in bf16 by default.

Why: the image stage is the slowest stage of a cold run, so its two speed-ups are
measured where a user feels them, end to end: (1) ``image_features.engine=fast``
against ``eager`` in the same run (alternating, each run in a fresh process on a fresh
data root, so both fetch every image from the server), with the largest difference
between their features; (2) a second snapshot of the same category with ~5% more
items (every later item re-indexed) on the same data root, where only the new images
are encoded. Images are product-photo-like 500x500 JPEGs served over HTTP on 127.0.0.1;
acquire and interactions run first in the same process and are not timed. Usage:

    python benchmarks/bench_image_engines.py [--items 800] [--rounds 2] [--configs eager:fp32 fast:fp32 fast:bf16]
    python benchmarks/bench_image_engines.py --skip-engines   # only the snapshot part

The defaults take 10 to 40 minutes on a 2-core CPU; fixed costs (imports, CNN load, tracing, the graph's
profiling call) weigh less the more images a run encodes, so small ``--items`` understate the fast engine's gain,
and a small ``--snapshot-items`` overstates the second snapshot's share: its default is the size of a real category
(Baby, 7,050 items).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_realsize import LoopbackHost  # noqa: E402 (found through the path set above)

ONE = """
import json, sys, time
import numpy as np
from sand.pipeline.base.config import load_config
from sand.pipeline.acquire.stage import run_acquire
from sand.pipeline.dataset.stage import run_interactions
from sand.pipeline.features.image_stage import run_image_features
from sand.pipeline.stages import Context
from sand.pipeline.features import image_encoder

# Where the stage's time goes: the encoder's construction (for the fast engine: trace, freeze and
# optimize) and its forward passes, summed; the rest is imports, CNN build, fetch, decode, cache.
spent = {"build": 0.0, "forward": 0.0}
def timed(method, part):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start
    return wrapper
image_encoder.Encoder.__init__ = timed(image_encoder.Encoder.__init__, "build")
image_encoder.Encoder.__call__ = timed(image_encoder.Encoder.__call__, "forward")
root, name, reviews, meta, settings = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
cfg = load_config(None, {"data_root": root, "acquire.dataset": name, "acquire.format": "amazon2014",
                         "acquire.reviews": reviews, "acquire.meta": meta}, settings)
ctx = Context.create(cfg, progress=False)
inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
t0, c0 = time.perf_counter(), time.process_time()
out = run_image_features(ctx, inter)
m = out.artifact.manifest
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                  "build_seconds": spent["build"], "forward_seconds": spent["forward"],
                  "items": m["shape"][0], "usable": m["shape"][0] - m["missing"], "cache": m["cache"],
                  "engine": m["engine"], "precision": m["precision"], "threads": m["threads"],
                  "features": str(out.artifact.file("image_feat.npy")),
                  "missing": str(out.artifact.file("missing_images.csv"))}))
"""


def _serve(images: dict[str, bytes]) -> tuple[LoopbackHost, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            body = images.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = LoopbackHost(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def make_dataset(folder: Path, n_items: int, seed: int = 0) -> tuple[object, dict[str, bytes], list[str]]:
    """The generated sample's reviews and metadata with a product-photo JPEG per item (by URL path)."""
    from bench_image_features import make_images

    from sand.pipeline.acquire.bundled_sample import generate_sample

    files = generate_sample(folder / "gen", seed=seed, n_users=2 * n_items, n_items=n_items)
    asins = sorted(files.truth["item_attributes"])
    (folder / "jpeg").mkdir(parents=True, exist_ok=True)
    jpegs = make_images(folder / "jpeg", len(asins), seed)
    broken = set(files.truth["missing_image_files"]) | set(files.truth["corrupt_images"])
    images = {f"/img/{a}.png": Path(u.removeprefix("file://")).read_bytes()
              for a, u in zip(asins, jpegs, strict=True) if a not in broken}
    return files, images, asins


def write_snapshot(files, folder: Path, base_url: str, drop: set[str]) -> tuple[str, str]:
    """Raw files without the items in ``drop``; image URLs point at the loopback server."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in (files.reviews, files.meta):
        with gzip.open(src, "rt") as fh:
            lines = [ln.replace(files.images_dir.as_uri() + "/", base_url + "/img/") for ln in fh
                     if not any(f"'{a}'" in ln or f'"{a}"' in ln for a in drop)]
        with gzip.open(folder / src.name, "wt") as fh:
            fh.writelines(lines)
        out.append(str(folder / src.name))
    return out[0], out[1]


def run_stage(root: Path, name: str, raw: tuple[str, str], settings: list[str]) -> dict:
    cmd = [sys.executable, "-c", ONE, str(root), name, *raw, json.dumps(settings)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SAND_LOG_LEVEL": "WARNING"})
    if done.returncode:
        sys.exit(f"stage run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def usable_rows(res: dict):
    import numpy as np
    import pandas as pd

    feats = np.load(res["features"])
    missing = pd.read_csv(res["missing"])["item"].to_numpy()
    return np.delete(feats, missing, axis=0).astype(np.float64)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def default_configs() -> list[str]:
    """eager and fast in fp32, plus fast in bf16 where the CPU multiplies bf16 natively (AMX)."""
    from sand.pipeline.base.hardware import cpu_bf16_support

    return ["eager:fp32", "fast:fp32", *(["fast:bf16"] if cpu_bf16_support() else [])]


def engines(tmp: Path, args, settings: list[str]) -> None:
    """Each ENGINE:PRECISION configuration ``args.rounds`` times, alternating; eager fp32 is the reference."""
    import numpy as np

    configs = args.configs or default_configs()
    files, images, _ = make_dataset(tmp / "engines", args.items)
    server, url = _serve(images)
    raw = write_snapshot(files, tmp / "engines" / "raw", url, set())
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    loads = []
    for r in range(args.rounds):
        for config in configs:
            engine, precision = config.split(":")
            loads.append(load_average())
            res = run_stage(tmp / f"{engine}-{precision}-{r}", "bench", raw,
                            [*settings, f"image_features.engine={engine}", f"image_features.precision={precision}"])
            runs[config].append(res)
            print(f"round {r} {config}: {res['seconds']:.1f} s ({res['usable']} images), load {loads[-1]}",
                  file=sys.stderr)
    server.shutdown()
    ref = usable_rows(runs[configs[0]][0])
    first = runs[configs[0]][0]
    print(f"\nwhole image stage, {' '.join(settings)}, {args.items} items generated, {first['usable']} usable "
          f"images, {first['threads']} torch threads; load averages at the starts: {', '.join(loads)}")
    print(f"{'engine:precision':<17} {'median s':>9} {'images/s':>9} {'CPU s':>8} {'build s':>8} {'forward s':>9} "
          f"{'other s':>8} {'speed-up':>9} {'min cosine':>11} {'max |diff|':>10}  runs (s)")
    base = statistics.median(r["seconds"] for r in runs[configs[0]])
    for config, rs in runs.items():
        med = statistics.median(r["seconds"] for r in rs)
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        build = statistics.median(r["build_seconds"] for r in rs)
        forward = statistics.median(r["forward_seconds"] for r in rs)
        other = statistics.median(r["seconds"] - r["build_seconds"] - r["forward_seconds"] for r in rs)
        b = usable_rows(rs[0])
        cos = (ref * b).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        print(f"{config:<17} {med:>9.1f} {rs[0]['usable'] / med:>9.2f} {cpu:>8.1f} {build:>8.1f} {forward:>9.1f} "
              f"{other:>8.1f} {base / med:>8.2f}x "
              f"{cos.min():>11.7f} {np.abs(ref - b).max():>10.2e}  {[round(r['seconds'], 1) for r in rs]}")
    print(f"(cosine and |diff| against {configs[0]}, the first configuration; build: the encoders' construction, "
          "forward: their forward passes, other: the rest of the stage -- imports, CNN build, fetch, decode, cache)")


def snapshots(tmp: Path, args, settings: list[str]) -> None:
    files, images, asins = make_dataset(tmp / "snap", args.snapshot_items)
    server, url = _serve(images)
    new = set(asins[:: max(1, round(1 / args.new_fraction))])  # spread over the index range
    first = write_snapshot(files, tmp / "snap" / "first", url, new)
    second = write_snapshot(files, tmp / "snap" / "second", url, set())
    root = tmp / "snap-root"
    load_1 = load_average()
    r1 = run_stage(root, "snap1", first, settings)
    load_2 = load_average()
    r2 = run_stage(root, "snap2", second, settings)
    server.shutdown()
    print(f"\nsnapshot update, {' '.join(settings)}, same data root; load averages at the starts: {load_1}, {load_2}")
    print(f"{'snapshot':<9} {'items':>6} {'seconds':>8} {'cache hits':>11} {'encoded':>8}")
    for name, r in (("first", r1), ("second", r2)):
        print(f"{name:<9} {r['items']:>6} {r['seconds']:>8.1f} {r['cache']['hits']:>11} {r['cache']['misses']:>8}")
    print(f"second / first stage time: {r2['seconds'] / r1['seconds']:.1%} (target: at most 15%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=800, help="items of the engine comparison")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--snapshot-items", type=int, default=7050, help="items of the second snapshot (default: Baby's)")
    ap.add_argument("--new-fraction", type=float, default=0.05, help="share of new items in the second snapshot")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--configs", nargs="+", metavar="ENGINE:PRECISION",
                    help="what to compare, the first being the reference (default: eager:fp32 fast:fp32, "
                         "plus fast:bf16 on a CPU with native bf16)")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-snapshots", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another config setting for every run (e.g. image_features.num_workers=1)")
    args = ap.parse_args()
    settings = ["image_features.weights=random", f"image_features.backbone={args.backbone}",
                f"image_features.image_size={args.size}", *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_engines:
            engines(Path(tmp), args, settings)
        if not args.skip_snapshots:
            snapshots(Path(tmp), args, [*settings, "image_features.engine=fast"])


if __name__ == "__main__":
    main()
