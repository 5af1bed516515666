"""Cost curves: seconds and peak memory of each pipeline stage as a 2023 category grows.

Usage:
    python benchmarks/bench_scale.py --work /tmp/scale --sizes 1e6,5e6            # generate + measure
    python benchmarks/bench_scale.py --work /tmp/scale --sizes 2e7 --stages acquire,interactions
    python benchmarks/bench_scale.py --work /tmp/scale --sizes 2e7 --stages train_sand_batches  # projected epoch
    python benchmarks/bench_scale.py --work /tmp/scale --report --plot docs/scaling.png

Data: Amazon 2023-format raw reviews and metadata (``.jsonl.gz``, the real field
names) with users = reviews / 3 and items = reviews / 8 (Clothing_Shoes_and_Jewelry
has 66M reviews, 22M users, 7.2M items; Books 29M, 10M, 4.4M) drawn from bounded
power laws, 1% re-reviews, review texts of about 180 characters. Generation is
vectorised (numpy + Arrow string kernels, no Python object per review) and cached
under ``--work/n<size>/``, so a later run only measures.

Stages, each timed in its own subprocess (so each has its own peak RSS, ``ru_maxrss``):
acquire (local file: hard link + fingerprint), interactions (the real stage, parquet
out), graphs (the real stage on clustered random features of the pipeline's default sizes: 2048-d
image (resnet50) and 384-d text (MiniLM), so no CNN is needed), and one training epoch
of SAND and of LightGCN through the real train stage (the epoch's validation and test
evaluation included). A stage that exceeds ``--stage-timeout`` is recorded as such.
Results accumulate in ``--work/results.jsonl``; ``--report`` prints the table and the
fitted growth per stage and writes the plot.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("generate", "acquire", "interactions", "graphs", "train_sand", "train_lightgcn")
#: Not run by default: the per-line reference path (read_reviews + read_meta + build_interactions).
REFERENCE = "interactions_per_line"
#: Not run by default: dedup + k-core + re-index + split on codes drawn like ``generate`` (no file, no parsing).
CORE = "interactions_core"
#: Not run by default: a few timed training batches and one validation + test evaluation through the
#: train stage's own model and data, projected to an epoch (where a whole epoch takes hours on a CPU).
SAMPLED = ("train_sand_batches", "train_lightgcn_batches")
EXTRA = (REFERENCE, CORE, *SAMPLED)
BLOCK = 500_000  # reviews generated per block: bounds the generator's memory
IMAGE_DIM, TEXT_DIM = 2048, 384
TRAIN_BATCHES = 6  # timed batches of the *_batches stages; the first (warm-up) is left out of the median
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_ALNUM = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


# ------------------------------------------------------------------------------------ generation
def power_law_codes(rng: np.random.Generator, n: int, size: int, exponent: float, perm: np.ndarray) -> np.ndarray:
    """Codes in [0, size): u**exponent puts most mass on few codes; ``perm`` decides which codes."""
    raw = (size * rng.random(n) ** exponent).astype(np.int64)
    return perm[np.minimum(raw, size - 1)]


def _fixed_ids(codes: np.ndarray, prefix: bytes, width: int, salt: int) -> pa.Array:
    """Random-looking fixed-width ids (``prefix`` + base-36 digits of a scrambled code), vectorised."""
    x = (codes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)) & np.uint64((1 << 63) - 1)
    digits = np.empty((len(codes), width), dtype=np.uint8)
    for j in range(width - 1, -1, -1):
        digits[:, j] = _ALNUM[(x % np.uint64(36)).astype(np.int64)]
        x //= np.uint64(36)
    body = np.concatenate([np.frombuffer(prefix * len(codes), np.uint8).reshape(len(codes), -1), digits], axis=1)
    return _strings_from_matrix(body)


def _strings_from_matrix(rows: np.ndarray) -> pa.Array:
    n, w = rows.shape
    offsets = np.arange(0, (n + 1) * w, w, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows).tobytes()))


def _random_text(rng: np.random.Generator, lengths: np.ndarray) -> pa.Array:
    """Lowercase words (a space about every 6 letters) cut to ``lengths``: JSON-safe, compresses like prose."""
    total = int(lengths.sum())
    data = _LETTERS[rng.integers(0, 26, total)]
    data[rng.random(total) < 0.17] = ord(" ")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def _join(pieces: list[Any]) -> pa.Array:
    """Concatenate string columns and literals row-wise (Arrow kernel), one JSON line per row."""
    cols = [p if isinstance(p, pa.Array) else pa.scalar(p, pa.large_string()) for p in pieces]
    cols = [c.cast(pa.large_string()) if isinstance(c, pa.Array) else c for c in cols]
    return pc.binary_join_element_wise(*cols, pa.scalar("", pa.large_string()))


def _write_lines(fh, lines: pa.Array) -> None:
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    data = lines.buffers()[2]
    fh.write(memoryview(data)[int(offsets[0]) : int(offsets[-1])])


def _num(values: np.ndarray) -> pa.Array:
    return pa.array(values).cast(pa.string())


@dataclass(frozen=True)
class Population:
    """Who reviews what: user and item counts and their popularity orders, from one seed.

    One definition shared by the file generator and the in-memory bench, so both measure
    the same interactions.
    """

    n_users: int
    n_items: int
    user_perm: np.ndarray
    item_perm: np.ndarray

    @classmethod
    def draw(cls, n: int, rng: np.random.Generator) -> Population:
        n_users, n_items = max(n // 3, 10), max(n // 8, 10)
        return cls(n_users, n_items, rng.permutation(n_users), rng.permutation(n_items))

    def block(self, b: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        """User and item codes of one block of ``m`` reviews, 1% of them re-reviews within the block."""
        fresh = m - m // 100
        users = power_law_codes(b, fresh, self.n_users, 2.4, self.user_perm)
        items = power_law_codes(b, fresh, self.n_items, 2.8, self.item_perm)
        redo = b.integers(0, fresh, m - fresh)
        return np.r_[users, users[redo]], np.r_[items, items[redo]]


def generate(n: int, folder: Path, seed: int = 0) -> dict[str, Any]:
    """Write ``reviews.jsonl.gz`` and ``meta.jsonl.gz`` for ``n`` reviews (cached: skipped if present)."""
    done = folder / "generated.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    pop = Population.draw(n, np.random.default_rng(seed))
    n_users, n_items = pop.n_users, pop.n_items
    t0 = time.perf_counter()
    with gzip.open(folder / "reviews.jsonl.gz.tmp", "wb", compresslevel=1) as fh:
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            b = np.random.default_rng([seed, start])
            users, items = pop.block(b, m)
            parent = _fixed_ids(items, b"B0", 8, 7)
            stamp = b.integers(1_262_304_000_000, 1_694_000_000_000, m)
            rating = b.choice(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), m, p=[0.08, 0.05, 0.08, 0.16, 0.63])
            lines = _join(
                [
                    '{"rating": ', _num(rating), ', "title": "', _random_text(b, b.integers(4, 40, m)),
                    '", "text": "', _random_text(b, np.minimum(b.geometric(1 / 180, m), 3000)),
                    '", "images": [], "asin": "', parent, '", "parent_asin": "', parent,
                    '", "user_id": "', _fixed_ids(users, b"A", 27, 3), '", "timestamp": ', _num(stamp),
                    ', "helpful_vote": ', _num(b.geometric(0.6, m) - 1),
                    ', "verified_purchase": ', pa.array(np.where(b.random(m) < 0.9, "true", "false")), "}\n",
                ]
            )
            _write_lines(fh, lines)
    reviews_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with gzip.open(folder / "meta.jsonl.gz.tmp", "wb", compresslevel=1) as fh:
        for start in range(0, n_items, BLOCK):
            m = min(BLOCK, n_items - start)
            b = np.random.default_rng([seed, 1, start])
            codes = np.arange(start, start + m)
            keep = b.random(m) < 0.98  # 2% of items have no metadata record
            codes = codes[keep]
            m = len(codes)
            image_id = _fixed_ids(codes, b"", 11, 11)
            url = "https://m.media-amazon.com/images/I/"
            lines = _join(
                [
                    '{"main_category": "AMAZON FASHION", "title": "', _random_text(b, b.integers(20, 120, m)),
                    '", "average_rating": ', _num(np.round(b.uniform(1, 5, m), 1)),
                    ', "rating_number": ', _num(b.geometric(0.02, m)),
                    ', "features": ["', _random_text(b, b.integers(10, 200, m)), '", "',
                    _random_text(b, b.integers(10, 200, m)), '"], "description": ["',
                    _random_text(b, b.integers(0, 400, m)), '"], "price": ', _num(np.round(b.uniform(3, 90, m), 2)),
                    ', "images": [{"thumb": "', url, image_id, '._AC_SR38,50_.jpg", "large": "', url, image_id,
                    '._AC_.jpg", "variant": "MAIN", "hi_res": "', url, image_id, '._AC_UL1500_.jpg"}]',
                    ', "videos": [], "store": "', _random_text(b, b.integers(3, 20, m)),
                    '", "categories": ["Clothing, Shoes & Jewelry", "Women"], "details": {"Department": "womens"}',
                    ', "parent_asin": "', _fixed_ids(codes, b"B0", 8, 7), '", "bought_together": null}\n',
                ]
            )
            _write_lines(fh, lines)
    meta_s = time.perf_counter() - t0
    (folder / "reviews.jsonl.gz.tmp").rename(folder / "reviews.jsonl.gz")
    (folder / "meta.jsonl.gz.tmp").rename(folder / "meta.jsonl.gz")
    info = {
        "reviews": n, "users": n_users, "items": n_items, "reviews_seconds": round(reviews_s, 1),
        "meta_seconds": round(meta_s, 1),
        "reviews_gz_bytes": (folder / "reviews.jsonl.gz").stat().st_size,
        "meta_gz_bytes": (folder / "meta.jsonl.gz").stat().st_size,
    }
    done.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------- stages
def _context(folder: Path, model: str = "sand", refresh: tuple[str, ...] = ()):
    from sand.pipeline.base.config import PipelineConfig
    from sand.pipeline.stages import Context

    cfg = PipelineConfig.model_validate(
        {
            "data_root": str(folder / "store"),
            "acquire": {"dataset": "scale", "format": "amazon2023", "reviews": str(folder / "reviews.jsonl.gz"),
                        "meta": str(folder / "meta.jsonl.gz")},
            "train": {"model": model, "epochs": 1, "batch_size": 2048},
        }
    )
    return Context.create(cfg, refresh=refresh, progress=False)


def _random_features(ctx, inter, name: str, dim: int):
    """A features artifact of clustered random vectors (stands in for the CNN / sentence encoder).

    Topic centres plus noise (``bench_graphs_scale.synthetic_features``), one centre per
    ~125 items: isotropic noise has no neighbourhoods, so an approximate index (the graph
    stage's faiss path above 100,000 items) would need to probe nearly every cluster to
    reach its recall target, which real embeddings never make it do.
    """
    from bench_graphs_scale import synthetic_features

    from sand.pipeline.stage_context import dataset_counts

    _, n_items = dataset_counts(inter)
    centres = max(64, n_items // 125)

    def build(out: Path) -> dict[str, Any]:
        synthetic_features(out / f"{name}_feat.npy", n_items, dim, "float32", seed=dim, centres=centres)
        return {"random": True, "dim": dim, "centres": centres}

    return ctx.store.run(f"{name}_features", "clustered", {"dim": dim}, {"interactions": inter}, build).artifact


def run_stage(stage: str, folder: Path, n: int) -> dict[str, Any]:
    """Run one stage (its inputs come from the store, cached) and time only that stage."""
    if stage == "generate":
        t0 = time.perf_counter()
        info = generate(n, folder)
        return {"seconds": time.perf_counter() - t0, **info}
    if stage == REFERENCE:
        return _per_line_reference(folder)
    if stage == CORE:
        return _core_only(n)
    if stage in SAMPLED:
        return _sampled_epoch(stage, folder)
    from sand.pipeline.acquire.stage import run_acquire
    from sand.pipeline.dataset.stage import run_interactions
    from sand.pipeline.features.graph_stage import run_graphs
    from sand.pipeline.training.stage import run_train

    model = {"train_sand": "sand", "train_lightgcn": "lightgcn"}.get(stage, "sand")
    refresh = {"train_sand": "train", "train_lightgcn": "train"}.get(stage, stage)
    ctx = _context(folder, model, (refresh,))
    upstream = _context(folder, model)
    if stage == "acquire":
        t0 = time.perf_counter()
        run_acquire(ctx)
        return {"seconds": time.perf_counter() - t0}
    raw = run_acquire(upstream).artifact
    if stage == "interactions":
        t0 = time.perf_counter()
        out = run_interactions(ctx, raw).artifact
        stats = out.manifest["stats"]
        return {"seconds": time.perf_counter() - t0, **{k: stats[k] for k in ("users", "items", "interactions")}}
    inter = run_interactions(upstream, raw).artifact
    if stage == "train_lightgcn":  # no features, no graphs
        t0 = time.perf_counter()
        result = run_train(ctx, inter, {}).artifact.manifest["result"]
        return {"seconds": time.perf_counter() - t0, "seconds_per_epoch": result["seconds_per_epoch"]}
    text = _random_features(upstream, inter, "text", TEXT_DIM)
    image = _random_features(upstream, inter, "image", IMAGE_DIM)
    if stage == "graphs":
        t0 = time.perf_counter()
        run_graphs(ctx, text, image)
        return {"seconds": time.perf_counter() - t0}
    graphs = run_graphs(upstream, text, image).artifact
    feats = {"text_features": text, "image_features": image, "graphs": graphs}
    t0 = time.perf_counter()
    result = run_train(ctx, inter, feats).artifact.manifest["result"]
    return {"seconds": time.perf_counter() - t0, "seconds_per_epoch": result["seconds_per_epoch"]}


def _train_inputs(folder: Path, model: str):
    """(context, interactions, feature artifacts) of the train stage, every upstream stage cached or built."""
    from sand.pipeline.acquire.stage import run_acquire
    from sand.pipeline.dataset.stage import run_interactions
    from sand.pipeline.features.graph_stage import run_graphs

    ctx = _context(folder, model)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    if model == "lightgcn":
        return ctx, inter, {}
    text = _random_features(ctx, inter, "text", TEXT_DIM)
    image = _random_features(ctx, inter, "image", IMAGE_DIM)
    graphs = run_graphs(ctx, text, image).artifact
    return ctx, inter, {"text_features": text, "image_features": image, "graphs": graphs}


def _sampled_epoch(stage: str, folder: Path) -> dict[str, Any]:
    """``TRAIN_BATCHES`` timed batches + one validation and one test evaluation, projected to an epoch.

    Why: one SAND epoch at 5 M reviews and beyond takes hours on this CPU (every batch
    reads all items' features), while every batch of an epoch costs the same, so an
    epoch is ``batches x median s/batch + evaluations``. The model and data are the
    train stage's own (``build_model_for``); the batch step is the trainer's
    (``bench_memory_model.time_batches``). Checked against a whole epoch at 1 M reviews.
    """
    import math

    import torch
    from bench_memory_model import time_batches

    from sand.pipeline.training.evaluation import SplitEvaluator
    from sand.pipeline.training.model_io import build_model_for

    model_name = stage.removeprefix("train_").removesuffix("_batches")
    ctx, inter, feats = _train_inputs(folder, model_name)
    t_build = time.perf_counter()
    model, data = build_model_for(ctx.cfg.train, inter, feats)
    build_s = time.perf_counter() - t_build
    batch = ctx.cfg.train.batch_size
    times = time_batches(model, data.train, data.csr("train"), data.n_items, TRAIN_BATCHES, batch)
    per_batch = float(np.median(times[1:] or times))
    n_batches = math.ceil(len(data.train) / batch)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    SplitEvaluator(data, "valid")(user_emb, item_emb)
    SplitEvaluator(data, "test")(user_emb, item_emb)
    eval_s = time.perf_counter() - t0
    return {
        "seconds": build_s + per_batch * n_batches + eval_s, "projected": True, "batches_timed": len(times),
        "s_per_batch": per_batch, "batches_per_epoch": n_batches, "eval_seconds": eval_s, "build_seconds": build_s,
        "seconds_per_epoch": per_batch * n_batches, "users": data.n_users, "items": data.n_items,
        "train_edges": int(len(data.train)),
    }


def _per_line_reference(folder: Path) -> dict[str, Any]:
    """The per-line path the columnar one replaced (same tables), for a memory and time ratio."""
    from sand.pipeline.dataset.interactions import build_interactions
    from sand.pipeline.dataset.readers import read_meta, read_reviews

    t0 = time.perf_counter()
    reviews, _ = read_reviews(folder / "reviews.jsonl.gz", "amazon2023", max_bad_lines=1000)
    meta, _ = read_meta(folder / "meta.jsonl.gz", "amazon2023", max_bad_lines=1000)
    stats = build_interactions(reviews, meta).stats
    return {"seconds": time.perf_counter() - t0, **{k: stats[k] for k in ("users", "items", "interactions")}}


def _core_only(n: int, seed: int = 0) -> dict[str, Any]:
    """``index_reviews`` on what the columnar reader would hand it for ``n`` generated reviews."""
    from sand.pipeline.dataset.interactions import index_reviews

    rng = np.random.default_rng(seed)
    pop = Population.draw(n, rng)
    ucodes, icodes = np.empty(n, np.int64), np.empty(n, np.int64)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        block_users, block_items = pop.block(np.random.default_rng([seed, start]), m)
        ucodes[start : start + m], icodes[start : start + m] = block_users, block_items
    users = _fixed_ids(np.arange(pop.n_users), b"A", 27, 3)
    items = _fixed_ids(np.arange(pop.n_items), b"B0", 8, 7)
    rating = rng.integers(1, 6, n).astype(np.float32)
    stamps = rng.integers(1_262_304_000, 1_694_000_000, n)
    t0 = time.perf_counter()
    stats = index_reviews(ucodes, icodes, users, items, rating, stamps).stats
    return {"seconds": time.perf_counter() - t0, **{k: stats[k] for k in ("users", "items", "interactions")}}


def measure(stage: str, folder: Path, n: int, timeout: float) -> dict[str, Any]:
    """The stage in a fresh subprocess: its own wall time, CPU time and peak RSS."""
    cmd = [sys.executable, __file__, "--worker", stage, "--size", str(n), "--work", str(folder.parent)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"stage": stage, "size": n, "status": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"stage": stage, "size": n, "status": f"failed: {tail}", "wall": time.perf_counter() - t0}
    return {"stage": stage, "size": n, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


# ----------------------------------------------------------------------------------------- report
def load_results(work: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Latest result per (stage, size)."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    path = work / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            latest[(rec["stage"], int(rec["size"]))] = rec
    return latest


def fit_growth(sizes: list[int], seconds: list[float], unit: str = "CPU s") -> str:
    """Exponent of t ~ n^b (log-log least squares) and seconds per 10M reviews at the largest size.

    Fitted on CPU seconds: on a shared machine wall time mostly measures the queue.
    """
    if len(sizes) < 2:
        return f"one size only: {seconds[0]:.0f} s at {sizes[0] / 1e6:g}M"
    b = float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])
    if b < 0.85:
        shape = "sublinear (fixed costs dominate at these sizes)"
    else:
        shape = "linear" if b < 1.15 else ("n log n-ish" if b < 1.35 else f"superlinear (n^{b:.1f})")
    per10m = seconds[-1] / sizes[-1] * 1e7
    return f"{shape}, exponent {b:.2f}, {per10m:.0f} {unit} per 10M reviews (at {sizes[-1] / 1e6:g}M)"


def _cost(rec: dict[str, Any]) -> float:
    """CPU seconds of a measured stage; the projected epoch's wall seconds of a sampled one."""
    return rec["seconds"] if rec.get("projected") else rec["cpu_seconds"]


def _unit(stage: str) -> str:
    return "projected wall s" if stage in SAMPLED else "CPU s"


def report(work: Path, plot: Path | None) -> None:
    results = load_results(work)
    sizes = sorted({n for _, n in results})
    print("| stage | " + " | ".join(f"{n / 1e6:g}M reviews" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for stage in (*STAGES, *EXTRA):
        cells = []
        for n in sizes:
            rec = results.get((stage, n))
            if rec is None:
                cells.append("not run")
            elif rec["status"] != "ok":
                cells.append(rec["status"])
            elif rec.get("projected"):
                cells.append(f"{rec['seconds']:.0f} s projected ({rec['s_per_batch']:.2f} s/batch x "
                             f"{rec['batches_per_epoch']} batches + {rec['eval_seconds']:.0f} s evaluation), "
                             f"{rec['peak_rss_gb']:.2f} GB")
            else:
                wall, cpu, peak = rec["seconds"], rec["cpu_seconds"], rec["peak_rss_gb"]
                cells.append(f"{wall:.0f} s wall, {cpu:.0f} s CPU, {peak:.2f} GB")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print()
    for stage in (*STAGES, *EXTRA):
        ok = [(n, results[(stage, n)]) for n in sizes if results.get((stage, n), {}).get("status") == "ok"]
        if ok:  # projected stages: their projected wall seconds (their CPU seconds cover a few batches)
            print(f"{stage}: {fit_growth([n for n, _ in ok], [_cost(r) for _, r in ok], _unit(stage))}")
    for n in sizes:
        rec = results.get(("interactions", n)) or results.get((CORE, n)) or {}
        if rec.get("status") == "ok":
            print(f"{n / 1e6:g}M reviews -> 5-core: {rec['users']:,} users, {rec['items']:,} items, "
                  f"{rec['interactions']:,} interactions")
    if plot is not None:
        _plot(results, sizes, plot)


def _plot(results, sizes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in (*STAGES, *EXTRA):
        pts = [(n, results[(stage, n)]) for n in sizes if results.get((stage, n), {}).get("status") == "ok"]
        if not pts:
            continue
        x = [n / 1e6 for n, _ in pts]
        ax_t.plot(x, [_cost(r) for _, r in pts], "o-", label=f"{stage} ({_unit(stage)})")
        ax_m.plot(x, [r["peak_rss_gb"] for _, r in pts], "o-", label=stage)
    for ax, label in ((ax_t, "seconds (CPU, all threads; *_batches: projected wall)"), (ax_m, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("raw reviews (millions), 2023 format")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("sand: cost per stage vs. raw review count (benchmarks/bench_scale.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="cache of generated data and results")
    parser.add_argument("--sizes", default="1e6,5e6", help="comma-separated review counts, e.g. 1e6,5e6,2e7")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"also: {', '.join(EXTRA)}")
    parser.add_argument("--stage-timeout", type=float, default=3600.0)
    parser.add_argument("--force", action="store_true", help="re-measure stages (not generate) already measured")
    parser.add_argument("--report", action="store_true", help="only print the table (and plot) of past results")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--worker", choices=(*STAGES, *EXTRA), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    if args.worker:
        out = run_stage(args.worker, work / f"n{args.size}", args.size)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out.update(peak_rss_gb=peak_rss_gb(), cpu_seconds=usage.ru_utime + usage.ru_stime)
        print(json.dumps(out))
        return
    if args.report:
        report(work, args.plot)
        return
    work.mkdir(parents=True, exist_ok=True)
    done = load_results(work)
    stages = [s for s in (*STAGES, *EXTRA) if s in args.stages.split(",")]
    for n in (int(float(s)) for s in args.sizes.split(",")):
        needs_files = any(s != CORE for s in stages)
        for stage in ["generate"] * needs_files + [s for s in stages if s != "generate"]:
            prev = done.get((stage, n))
            if prev is not None and prev["status"] == "ok" and (not args.force or stage == "generate"):
                continue
            rec = measure(stage, work / f"n{n}", n, args.stage_timeout)
            rec["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            rec["load_avg"] = os.getloadavg()[0]
            with open(work / "results.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            shown = f"{rec['seconds']:.1f} s, peak {rec['peak_rss_gb']:.2f} GB" if rec["status"] == "ok" else ""
            print(f"{n / 1e6:g}M {stage}: {rec['status']} {shown}", flush=True)
            if rec["status"] != "ok" and stage in ("generate", "acquire", "interactions"):
                break  # later stages need this one
            if rec["status"] != "ok" and stage == "graphs":
                stages = [s for s in stages if s != "train_sand"]  # SAND needs the graphs
    report(work, args.plot)


if __name__ == "__main__":
    main()
