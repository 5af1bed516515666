"""Images/s of decode + CNN encode on this machine (random weights, local file:// images).

Decoding is timed twice: one image at a time on one thread, and as the image stage does it on a CPU (each batch
decoded on every core between two forward passes, then normalised at once).

Why: the image stage dominates the pipeline's wall time; these numbers size the
shards and tell whether a GPU is needed. Each configuration runs in a fresh
subprocess so its peak RSS is its own. Usage:

    python benchmarks/bench_image_features.py [--n 32] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("resnet18", 64), ("resnet18", 112), ("resnet18", 224), ("resnet50", 224)]


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Product-photo-like JPEGs (500x500, smooth gradient + noise), as file:// URLs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:500, 0:500]
    urls = []
    for i in range(n):
        base = rng.integers(0, 256, size=3)
        arr = (base + 0.3 * xx[..., None] + 0.2 * yy[..., None] + rng.normal(0, 12, (500, 500, 3))) % 256
        path = folder / f"item{i:05d}.jpg"
        Image.fromarray(arr.astype(np.uint8), "RGB").save(path, quality=90)
        urls.append(path.as_uri())
    return urls


def _decode_between_forwards(paths: list[Path], size: int) -> float:
    """Seconds the stage's CPU path (no decode thread beside the forward: each batch decoded on every core, then
    normalised at once) spends on ``paths`` with a CNN that costs nothing; 0 where the stream predates it."""
    import torch

    from sand.pipeline.features import image_encoder

    if not hasattr(image_encoder, "normalize_pixels"):
        return 0.0

    class NoCNN:
        batch_size = 32

        def __call__(self, batch: torch.Tensor) -> torch.Tensor:
            return batch[:, 0, 0, :1].numpy()

    t0 = time.perf_counter()
    for _ in image_encoder.encode_stream(paths, NoCNN(), image_size=size, num_workers=0):
        pass
    return time.perf_counter() - t0


def run_one(backbone: str, size: int, urls: list[str], repeats: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from sand.pipeline.features.image_encoder import ImageFileDataset, build_cnn, encode_images
    from sand.pipeline.features.image_fetch import fetch_images

    try:  # the URL policy (local files are the user's own here); absent before it existed
        from sand.pipeline.acquire.url_policy import UrlPolicy

        policy = {"policy": UrlPolicy.for_origin("local")}
    except ImportError:
        policy = {}
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        results = fetch_images(urls, Path(cache), progress=False, **policy)
        validate_s = time.perf_counter() - t0
    paths = [r.path for r in results if r.ok]
    dataset = ImageFileDataset(paths, size)
    decode_times, burst_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        decode_times.append(time.perf_counter() - t0)
        burst_times.append(_decode_between_forwards(paths, size))
    model, dim, _ = build_cnn(backbone, "random", seed=0)
    encode_images(paths[:2], model, image_size=size, batch_size=2, device="cpu", progress=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        feats = encode_images(paths, model, image_size=size, batch_size=32, device="cpu", progress=False)
        times.append(time.perf_counter() - t0)
    assert feats.shape == (len(paths), dim)
    med = statistics.median(times)
    return {
        "backbone": backbone,
        "size": size,
        "dim": dim,
        "n": len(paths),
        "validate_img_s": len(urls) / validate_s,
        "decode_img_s": len(paths) / statistics.median(decode_times),
        "burst_img_s": len(paths) / statistics.median(burst_times) if burst_times[0] else float("nan"),
        "encode_img_s": len(paths) / med,
        "runs_s": [round(t, 2) for t in times],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="number of images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--one", nargs=3, metavar=("BACKBONE", "SIZE", "URLS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        backbone, size, urls_file = args.one
        urls = json.loads(Path(urls_file).read_text())
        print(json.dumps(run_one(backbone, int(size), urls, args.repeats, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_images(Path(tmp), args.n)
        urls_file = Path(tmp) / "urls.json"
        urls_file.write_text(json.dumps(urls))
        rows = []
        for backbone, size in CONFIGS:
            cmd = [
                sys.executable,
                __file__,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
                "--one",
                backbone,
                str(size),
                str(urls_file),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"decode+encode, {args.n} JPEGs 500x500, random weights, CPU, median of {args.repeats} runs")
    print(
        f"{'backbone':<9} {'px':>4} {'dim':>5} {'validate img/s':>15} {'decode+resize img/s':>20} "
        f"{'same, all cores/batch':>22} "
        f"{'decode+encode img/s':>20} "
        f"{'runs (s)':<20} {'peak RSS MB':>11} {'threads':>7}"
    )
    for r in rows:
        print(
            f"{r['backbone']:<9} {r['size']:>4} {r['dim']:>5} {r['validate_img_s']:>15.1f} "
            f"{r['decode_img_s']:>20.1f} {r.get('burst_img_s', float('nan')):>22.1f} {r['encode_img_s']:>20.1f} "
            f"{str(r['runs_s']):<20} {r['peak_rss_mb']:>11.0f} {r['threads']:>7}"
        )


if __name__ == "__main__":
    main()
