"""End to end at real size: a raw Amazon-2014-format dataset of Baby's size through ``sand run``.

Why: the pipeline was proven on the 499-item bundled sample only, and at real size
raw data breaks things the sample never shows (memory, dirty lines, dead and
hostile image URLs, slow stages). This script generates, with a fixed seed, a raw
dataset shaped like Amazon 2014 Baby (about 7,050 items, 19,445 users, 155,000
reviews; ``reviews_*.json.gz`` JSON lines and Python-literal ``meta_*.json.gz``),
with the dirty cases of issue 10 planted, serves it from a loopback HTTP server,
runs ``sand run`` end to end with default settings except the CNN weights
(``--image-weights random``: pretrained weights cannot be downloaded offline; the
default resnet50 backbone is kept), prints per-stage seconds and peak memory, then
reruns the same command (everything cached) and prints the warm time.

Planted dirt: reviews with ratings 0 / 6 / "five", missing ids, truncated and
non-record lines, one line over the 4 MiB line limit, duplicates; metadata with a
too-dense Python literal, a truncated literal, an over-long line, items without
metadata; images of different sizes and formats (JPEG, PNG, GIF), corrupt bytes,
HTML pages, dead URLs (404), Amazon's "no-img" placeholder, empty ``imUrl``, a
decompression-bomb PNG, a too-small image, and hostile URLs (``javascript:``,
``file:///etc/passwd``, ``..`` paths, a closed port, a 3,000-character URL).

Why the raw files are downloaded first and passed to ``sand`` as local paths:
image URLs inside metadata that itself came over the network may be limited to
public addresses (a loopback or private image URL in downloaded metadata is
refused, so a hostile dump cannot make sand probe the local network). Metadata the
user holds locally may name private hosts. So the script fetches the raw files
from its loopback server with sand's own downloader (timed as "download raw") and
hands them over as local paths; only the images are fetched over HTTP by sand.

Memory is the peak proportional set size (PSS: shared pages split between the
processes sharing them, so forked DataLoader workers are not counted twice) of the
``sand`` process and its children, sampled every 0.5 s and attributed to the stage
whose Prefect sub-flow was running; Prefect's own API server process is left out.

Usage:
    python benchmarks/bench_realsize.py [--scale 1.0] [--epochs N] [--keep DIR] [--seed 0]
    python benchmarks/bench_realsize.py --scale 0.1 --epochs 2      # a quick smoke run
    python benchmarks/bench_realsize.py --backbone resnet18         # cheaper CNN on a CPU-only machine
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from sand.pipeline.acquire import bundled_sample as S

BABY_ITEMS, BABY_USERS = 7050, 19445
PER_USER = (5, 11)  # distinct items per user: mean 8, as Baby's 8.3
IMAGE_SIZES = (64, 128, 256, 400)
IMAGE_FORMATS = (("JPEG", "jpg", 0.6), ("PNG", "png", 0.3), ("GIF", "gif", 0.1))
# Shares of items per image kind (the rest get a good image); Baby has 13 of 7,050 empty imUrl, 6 "no-img".
IMAGE_DIRT = {"empty": 0.002, "placeholder": 0.001, "corrupt": 0.004, "html": 0.004, "dead": 0.02}
PLACEHOLDER_PATH = "/images/G/01/x-site/icons/no-img-sm._CB192198896_.gif"
LINE_LIMIT = 4 << 20  # the default interactions.max_line_bytes
STAGE_LINE = re.compile(r"for flow 'sand-([a-z-]+)'")


# ---------------------------------------------------------------------------- the dataset


@dataclass
class Generated:
    reviews: Path
    meta: Path
    www: Path
    counts: dict[str, int] = field(default_factory=dict)


def generate(out: Path, base_url: str, *, seed: int = 0, scale: float = 1.0) -> Generated:
    """Write ``raw/`` (reviews + meta) and ``images/`` under ``out/www``; same seed and URL, same bytes.

    The interactions, texts and images come from the bundled sample's generator
    (planted attribute structure), scaled to Baby's size; the dirt is added here.
    """
    rng = np.random.default_rng(seed)
    n_items = max(60, round(BABY_ITEMS * scale))
    n_users = max(60, round(BABY_USERS * scale))
    www = out / "www"
    (www / "raw").mkdir(parents=True, exist_ok=True)
    (www / "images" / "I").mkdir(parents=True, exist_ok=True)

    asins = S._unique_ids(rng, n_items, "B00", 7)
    users = S._unique_ids(rng, n_users, "A", 13)
    attrs = S._item_attributes(rng, n_items)
    popularity = rng.normal(0.0, S.POPULARITY_SD, n_items)
    tastes = S._user_tastes(rng, n_users)
    picks = S._sample_interactions(rng, attrs, popularity, tastes, PER_USER)
    records = S._review_records(rng, users, asins, attrs, tastes, picks)
    lines, _duplicates, _malformed = S._review_lines(rng, records)
    lines = _plant_review_dirt(rng, lines, asins, users)
    reviews = www / "raw" / "reviews_Realsize_5.json.gz"
    S._write_gz(reviews, lines)

    kinds = _image_kinds(rng, n_items)
    meta_lines, no_meta = [], set(rng.choice(n_items, size=max(2, n_items // 300), replace=False).tolist())
    hostile = iter(_hostile_urls(base_url))
    counts: dict[str, int] = {"items": n_items, "users": n_users, "review_lines": len(lines), "no_meta": len(no_meta)}
    for i in np.argsort(asins, kind="stable").tolist():
        if i in no_meta:
            continue
        kind = kinds[i]
        if kind == "hostile":
            url = next(hostile, "")
        else:
            url = _write_image(rng, www, base_url, asins[i], attrs[i], kind)
        counts[f"image_{kind}"] = counts.get(f"image_{kind}", 0) + 1
        meta_lines.append(repr(S._meta_record(rng, asins[i], attrs[i], popularity[i], url)))
    meta_lines = _plant_meta_dirt(rng, meta_lines)
    meta = www / "raw" / "meta_Realsize.json.gz"
    S._write_gz(meta, meta_lines)
    counts["meta_lines"] = len(meta_lines)
    counts["reviews_gz_bytes"] = reviews.stat().st_size
    counts["meta_gz_bytes"] = meta.stat().st_size
    return Generated(reviews, meta, www, counts)


def _plant_review_dirt(rng: np.random.Generator, lines: list[str], asins: list[str], users: list[str]) -> list[str]:
    """Out-of-range and non-numeric ratings, missing ids, non-records, one line over the limit."""
    def review(**changes: Any) -> str:
        rec = {"reviewerID": users[int(rng.integers(len(users)))], "asin": asins[int(rng.integers(len(asins)))],
               "helpful": [0, 0], "reviewText": "ok", "overall": 5.0, "unixReviewTime": 1_300_000_000}
        rec.update(changes)
        return json.dumps({k: v for k, v in rec.items() if v is not None})

    dirt = [
        review(overall=0.0), review(overall=6.0), review(overall="five"), review(overall=None),
        review(reviewerID=None), review(asin=""), "[1, 2, 3]", '{"reviewerID": "A1", "asin": ',
        review(reviewText="x" * (LINE_LIMIT + 1024)),  # over the line limit: dropped in chunks
    ]
    out = list(lines)
    for line in dirt:
        out.insert(int(rng.integers(len(out) + 1)), line)
    return out


def _plant_meta_dirt(rng: np.random.Generator, lines: list[str]) -> list[str]:
    dense = "{'asin': 'B00DENSE', 'related': {'also_bought': [" + "0," * 60_000 + "]}}"  # literal too dense
    long_line = repr({"asin": "B00LONG", "description": "y" * (LINE_LIMIT + 1024)})
    out = list(lines)
    for line in (dense, "{'asin': 'B00CUT', 'title': 'cut off", long_line, "__import__('os').system('true')"):
        out.insert(int(rng.integers(len(out) + 1)), line)
    return out


def _image_kinds(rng: np.random.Generator, n_items: int) -> list[str]:
    names = [*IMAGE_DIRT, "good"]
    shares = [*IMAGE_DIRT.values(), 1.0 - sum(IMAGE_DIRT.values())]
    kinds = [names[k] for k in rng.choice(len(names), size=n_items, p=shares)]
    for i in rng.choice(n_items, size=min(len(_hostile_urls("")), n_items), replace=False).tolist():
        kinds[i] = "hostile"
    return kinds


def _hostile_urls(base: str) -> list[str]:
    return [
        "javascript:alert(1)",
        "file:///etc/passwd",
        f"{base}/images/../../../etc/passwd",
        "http://127.0.0.1:1/closed-port.jpg",
        f"{base}/images/I/" + "A" * 3000 + ".jpg",
        f"{base}/images/I/bomb.png",  # 9,000 x 9,000 pixels in a few KB
        f"{base}/images/I/tiny.png",  # 8 x 8: below min_side
        "data:image/png;base64,iVBORw0KGgo=",
        f"{base}/images/I/spaces and ünïcode.jpg",
    ]


def _write_image(
    rng: np.random.Generator, www: Path, base: str, asin: str, attr: dict[str, Any], kind: str
) -> str:
    from PIL import Image

    if kind == "empty":
        return ""
    if kind == "placeholder":
        return base + PLACEHOLDER_PATH
    if kind == "dead":
        return f"{base}/images/I/{asin}-gone.jpg"
    if kind == "html":
        (www / "images" / "I" / f"{asin}.html").write_bytes(b"<html><body>Moved</body></html>\n")
        return f"{base}/images/I/{asin}.html"
    if kind == "corrupt":
        (www / "images" / "I" / f"{asin}.jpg").write_bytes(S._corrupt_bytes(rng))
        return f"{base}/images/I/{asin}.jpg"
    size = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    fmt, ext, _ = IMAGE_FORMATS[int(rng.choice(len(IMAGE_FORMATS), p=[f[2] for f in IMAGE_FORMATS]))]
    # Drawn small and scaled up: encoding full-size noisy PNGs would dominate the generator's time.
    small = Image.open(io.BytesIO(S._draw_image(rng, attr, 64))).convert("RGB")
    buf = io.BytesIO()
    options = {"compress_level": 1} if fmt == "PNG" else {"quality": 85} if fmt == "JPEG" else {}
    image = small.resize((size, size), Image.Resampling.BILINEAR)
    if fmt == "GIF":
        image = image.convert("P")  # the fixed web palette: adaptive quantising is slow
    image.save(buf, format=fmt, **options)
    (www / "images" / "I" / f"{asin}.{ext}").write_bytes(buf.getvalue())
    return f"{base}/images/I/{asin}.{ext}"


def _write_special_images(www: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (9_000, 9_000)).save(buf, format="PNG")  # 81 Mpx: over sand's 50 Mpx limit
    (www / "images" / "I" / "bomb.png").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    (www / "images" / "I" / "tiny.png").write_bytes(buf.getvalue())
    placeholder = www / PLACEHOLDER_PATH.lstrip("/")
    placeholder.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (230, 230, 230)).save(buf, format="GIF")
    placeholder.write_bytes(buf.getvalue())


# ---------------------------------------------------------------------------- serving


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class LoopbackHost(ThreadingHTTPServer):
    """A loopback image host that accepts connections as fast as an image CDN. Why: socketserver's listen backlog is
    5, and the stage opens 16 connections at once, so the kernel drops the others' SYNs and they retry after a second:
    a stall in every fetch group that no real host causes (it made the first image group take 1.3 s instead of 0.1)."""

    request_queue_size = 1024
    daemon_threads = True


def serve(folder: Path, port: int = 0) -> ThreadingHTTPServer:
    """A loopback HTTP server over ``folder`` (404 for anything missing), in a daemon thread."""
    server = LoopbackHost(("127.0.0.1", port), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------------------- running sand


class _Watcher:
    """Reads sand's stderr (the current stage from Prefect's sub-flow lines) and samples RSS."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        import psutil

        self.proc = proc
        self.root = psutil.Process(proc.pid)
        self.stage = "startup"
        self.started = time.perf_counter()
        self.startup_s: float | None = None  # until the first stage's sub-flow began
        self.peak_mb: dict[str, float] = {}
        self.log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in join()
        self.tail: list[str] = []
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)
            self.tail = (self.tail + [line.rstrip()])[-40:]
            match = STAGE_LINE.search(line)
            if match and match.group(1) != "pipeline":
                self.stage = match.group(1).replace("-", "_")
                if self.startup_s is None:
                    self.startup_s = time.perf_counter() - self.started

    def _rss_mb(self) -> float:
        import psutil

        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
                if "uvicorn" in cmd or "prefect.server" in cmd or "server start" in cmd:
                    continue  # Prefect's API server is not the pipeline's memory
                total += p.memory_full_info().pss  # proportional: forked workers share pages
            except psutil.Error:
                continue
        return total / 2**20

    def _sample(self) -> None:
        while self.proc.poll() is None:
            rss = self._rss_mb()
            self.peak_mb[self.stage] = max(self.peak_mb.get(self.stage, 0.0), rss)
            time.sleep(0.5)

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=30)
        self.log.close()


def run_sand(args: list[str], log_path: Path) -> tuple[dict[str, Any], float, dict[str, float]]:
    """Run ``sand ARGS --json``; (summary, wall seconds, peak MB per stage). Fails loudly with the log tail.

    The peaks dict also holds ``startup_s``: seconds until the first stage began (imports and
    Prefect's temporary API server, which dominate a fully cached run).
    """
    exe = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"
    env = {**os.environ, "SAND_LOG_LEVEL": os.environ.get("SAND_LOG_LEVEL", "INFO")}
    start = time.perf_counter()
    proc = subprocess.Popen([exe, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    watcher = _Watcher(proc, log_path)
    stdout = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        tail = "\n".join(watcher.tail)
        raise SystemExit(f"sand exited with {proc.returncode}; log {log_path}; last lines:\n{tail}")
    log_path.with_suffix(".json").write_text(stdout)
    return json.loads(stdout.strip().splitlines()[-1]), wall, {**watcher.peak_mb, "startup_s": watcher.startup_s or 0.0}


# ---------------------------------------------------------------------------- report


def _manifest(summary: dict[str, Any], stage: str) -> dict[str, Any]:
    path = Path(summary["stages"][stage]["artifact"]) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def print_tables(cold: dict[str, Any], cold_wall: float, peaks: dict[str, float], warm: dict[str, Any],
                 warm_wall: float, warm_peaks: dict[str, float], gen_s: float, download_s: float) -> None:
    print("\n| stage | cold s | peak PSS MB | warm s (cached) |")
    print("|---|---:|---:|---:|")
    print(f"| generate dataset (outside sand) | {gen_s:.1f} | | |")
    print(f"| download raw (outside sand) | {download_s:.1f} | | |")
    print(f"| startup (imports, Prefect temporary server) | {peaks['startup_s']:.1f} | {peaks.get('startup', 0):.0f} "
          f"| {warm_peaks['startup_s']:.1f} |")
    for stage, info in cold["stages"].items():
        w = warm["stages"].get(stage, {})
        mark = "yes" if w.get("cached") else "NO"
        print(f"| {stage} | {info['seconds']:.1f} | {peaks.get(stage, 0):.0f} | {w.get('seconds', 0):.2f} ({mark}) |")
    top = max(v for k, v in peaks.items() if k != "startup_s")
    print(f"| **total sand run (wall)** | **{cold_wall:.1f}** | **{top:.0f}** | "
          f"**{warm_wall:.1f}** |")
    print("\ndataset:", json.dumps(cold.get("dataset", {})))
    skipped = _manifest(cold, "interactions").get("skipped", {})
    for role, rep in skipped.items():
        print(f"skipped in {role}: {rep.get('total')} of {rep.get('lines_read')} lines: {rep.get('counts')}")
    img = _manifest(cold, "image_features")
    reasons = {k: v for k, v in img.items() if "reason" in k or "missing" in k}
    print("image stage:", json.dumps(reasons, default=str)[:600])
    print("train:", json.dumps({k: cold.get("train", {}).get(k) for k in ("epochs", "best_epoch",
                                                                          "seconds_per_epoch")}))
    print("test metrics:", json.dumps(cold.get("metrics", {}).get("test", {})))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of Baby's size (default 1.0)")
    parser.add_argument("--epochs", type=int, default=None, help="max training epochs (default: sand's)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the dataset and data root here")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: any free one)")
    parser.add_argument("--backbone", default=None, help="CNN backbone (default: sand's, resnet50)")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 4:
        parser.error("--scale must be in (0, 4]")
    work = args.keep or Path(tempfile.mkdtemp(prefix="sand-realsize-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "www").mkdir(exist_ok=True)
    server = serve(work / "www", args.port)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        t0 = time.perf_counter()
        gen = generate(work, base, seed=args.seed, scale=args.scale)
        _write_special_images(gen.www)
        gen_s = time.perf_counter() - t0
        print(f"generated in {gen_s:.1f}s: {json.dumps(gen.counts)}", flush=True)

        from sand.pipeline.acquire.download import fetch_file

        t0 = time.perf_counter()
        local = [fetch_file(f"{base}/raw/{p.name}", work / "raw-downloaded", progress=False).path
                 for p in (gen.reviews, gen.meta)]
        download_s = time.perf_counter() - t0
        cmd = ["run", "--dataset", "realsize", "--data-root", str(work / "data"), "--image-weights", "random",
               "--set", f"acquire.reviews={local[0]}", "--set", f"acquire.meta={local[1]}"]
        if args.epochs is not None:
            cmd += ["--epochs", str(args.epochs)]
        if args.backbone is not None:
            cmd += ["--set", f"image_features.backbone={args.backbone}"]
        print("sand " + " ".join(cmd), flush=True)
        cold, cold_wall, peaks = run_sand(cmd, work / "cold.log")
        print(f"cold run: {cold_wall:.1f}s", flush=True)
        warm, warm_wall, warm_peaks = run_sand(cmd, work / "warm.log")
        print(f"warm run: {warm_wall:.1f}s", flush=True)
        print_tables(cold, cold_wall, peaks, warm, warm_wall, warm_peaks, gen_s, download_s)
        print(f"\nlogs and data under {work}")
    finally:
        server.shutdown()
        server.server_close()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
