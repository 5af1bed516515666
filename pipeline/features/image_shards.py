"""Image features per item shard, and their assembly into one N x d matrix.

Why shards: fetching and encoding tens of thousands of images is the slowest
stage, so it maps over item ranges that can run in other processes or on Dask
workers. A shard is self-contained (it loads the CNN file the stage saved once,
reads only URLs and the shared image cache) and its result is a small ``.npz``
file, so nothing big travels through the orchestrator. Its features do not depend
on which shard an item landed in: same CNN bytes everywhere, no global RNG, and a
fixed batch shape in the encoder.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.base.files import write_bytes_atomic

# the modules that pull in torch: imported inside the functions that use them,
# so importing this module (and `sand --help`) stays fast.

log = logging.getLogger(__name__)

#: Keys of ``encoder_kwargs`` that choose the CNN; the others go to ``encode_images``.
_BUILD_KEYS = ("backbone", "weights", "seed")


@dataclass
class ShardResult:
    """Features of the usable items of one shard and the reasons for the others."""

    item_ids: np.ndarray  # (k,) int64, items with a usable image
    features: np.ndarray  # (k, dim) float32, rows aligned with item_ids
    missing: list[tuple[int, str, str]] = field(default_factory=list)  # (item, url, reason)
    weights: str = ""  # description of the CNN weights, for provenance

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def shard_items(n_items: int, shard_size: int) -> list[range]:
    """Consecutive item ranges of at most ``shard_size`` (>= 1, by the config) covering ``0..n_items-1``."""
    return [range(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


def process_shard(
    item_ids: Sequence[int],
    urls: Sequence[str],
    cache_dir: Path,
    fetch_kwargs: Mapping[str, Any] | None = None,
    encoder_kwargs: Mapping[str, Any] | None = None,
) -> ShardResult:
    """Fetch, validate and encode the images of one shard (``urls[i]`` belongs to ``item_ids[i]``).

    ``fetch_kwargs`` go to :func:`sand.pipeline.features.image_fetch.fetch_images`; ``encoder_kwargs``
    hold ``backbone``/``weights``/``seed`` for :func:`build_cnn` and the rest for
    :func:`encode_images`. Builds the CNN only when some image is usable.
    """
    from sand.pipeline.features.image_encoder import OUT_DIMS, build_cnn, encode_images
    from sand.pipeline.features.image_fetch import fetch_images

    if len(item_ids) != len(urls):
        raise ConfigError(f"process_shard got {len(item_ids)} item ids but {len(urls)} URLs")
    enc = dict(encoder_kwargs or {})
    build = {k: enc.pop(k) for k in _BUILD_KEYS if k in enc}
    build.setdefault("backbone", "resnet50")
    build.setdefault("weights", "imagenet")
    results = fetch_images(list(urls), Path(cache_dir), **dict(fetch_kwargs or {}))
    ok = [(int(i), r.path) for i, r in zip(item_ids, results, strict=True) if r.ok]
    missing = [
        (int(i), str(u or ""), str(r.reason)) for i, u, r in zip(item_ids, urls, results, strict=True) if not r.ok
    ]
    if ok:
        model, dim, description = build_cnn(**build)
        feats = encode_images([p for _, p in ok], model, **enc)
    else:
        if build["backbone"] not in OUT_DIMS:
            build_cnn(**build)  # raises the ConfigError for the bad backbone name
        dim, description = OUT_DIMS[build["backbone"]], ""
        feats = np.zeros((0, dim), dtype=np.float32)
    counts = Counter(reason for _, _, reason in missing)
    log.debug("image shard: %d items, %d encoded, missing %s", len(item_ids), len(ok), dict(counts))
    return ShardResult(
        item_ids=np.asarray([i for i, _ in ok], dtype=np.int64),
        features=np.ascontiguousarray(feats, dtype=np.float32),
        missing=missing,
        weights=description,
    )


def save_shard(result: ShardResult, path: Path) -> None:
    """Write a shard as ``.npz`` (strings as unicode arrays, so loading needs no pickle), atomically."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(
        buf,
        item_ids=np.asarray(result.item_ids, dtype=np.int64),
        features=np.asarray(result.features, dtype=np.float32),
        missing_items=np.asarray([m[0] for m in result.missing], dtype=np.int64),
        missing_urls=np.asarray([m[1] for m in result.missing], dtype=np.str_),
        missing_reasons=np.asarray([m[2] for m in result.missing], dtype=np.str_),
        meta=np.asarray(json.dumps({"weights": result.weights})),
    )
    write_bytes_atomic(path, buf.getvalue())


def load_shard(path: Path) -> ShardResult:
    """Read a shard written by :func:`save_shard` (``allow_pickle=False``)."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            missing = list(
                zip(
                    (int(i) for i in z["missing_items"]),
                    (str(u) for u in z["missing_urls"]),
                    (str(r) for r in z["missing_reasons"]),
                    strict=True,
                )
            )
            return ShardResult(
                item_ids=z["item_ids"].astype(np.int64),
                features=z["features"].astype(np.float32),
                missing=missing,
                weights=json.loads(str(z["meta"]))["weights"],
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image feature shard ({exc})") from None


def assemble_features(
    n_items: int, shards: Sequence[ShardResult], dim: int, fill: str = "mean"
) -> tuple[np.ndarray, pd.DataFrame]:
    """One ``(n_items, dim)`` float32 matrix plus the table of items without a usable image.

    Items without an image get the mean of the usable rows (MMRec's convention, so
    they sit in the middle of feature space rather than at an arbitrary corner) or
    zeros. Every item must appear in exactly one shard, as encoded or missing.
    ``fill`` is ``image_features.fill``, checked by the config.
    """
    feat = np.zeros((n_items, dim), dtype=np.float32)
    seen = np.zeros(n_items, dtype=bool)
    usable = np.zeros(n_items, dtype=bool)
    rows: list[tuple[int, str, str]] = []

    def mark(items: np.ndarray) -> None:
        if items.size and (items.min() < 0 or items.max() >= n_items):
            bad = items[(items < 0) | (items >= n_items)][0]
            raise DataError(f"image feature shard names item {bad}, outside 0..{n_items - 1}")
        uniq, counts = np.unique(items, return_counts=True)
        repeated = uniq[(counts > 1) | seen[uniq]]
        if repeated.size:
            raise DataError(f"image feature shards list item {repeated[0]} more than once")
        seen[items] = True

    for shard in shards:
        ids = np.asarray(shard.item_ids, dtype=np.int64)
        if shard.features.shape != (len(ids), dim):
            raise DataError(
                f"image feature shard has features of shape {shard.features.shape}, expected ({len(ids)}, {dim})"
            )
        mark(ids)
        feat[ids] = shard.features
        usable[ids] = True
        missing_ids = np.asarray([m[0] for m in shard.missing], dtype=np.int64)
        mark(missing_ids)
        rows.extend(shard.missing)
    if not seen.all():
        first = int(np.flatnonzero(~seen)[0])
        raise DataError(f"image feature shards cover {int(seen.sum())} of {n_items} items (first absent: {first})")
    missing = pd.DataFrame(rows, columns=["item", "url", "reason"]).sort_values("item", ignore_index=True)
    missing["item"] = missing["item"].astype(np.int64)
    if n_items and not usable.any():
        top = Counter(missing["reason"]).most_common(3)
        raise DataError(
            f"no item has a usable image ({n_items} items; most common reasons: "
            f"{', '.join(f'{r} x{c}' for r, c in top)}); check the image URLs or use a text-only model"
        )
    if fill == "mean" and (~usable).any():
        feat[~usable] = feat[usable].astype(np.float64).mean(axis=0).astype(np.float32)
    return feat, missing
