"""Image features per item shard, and their assembly into one N x d matrix.

Why shards: fetching and encoding tens of thousands of images is the slowest stage, so it maps over item ranges that
can run in other processes or on Dask workers. A shard loads the CNN file the stage saved once and returns a small
``.npz`` file, so nothing big travels through the orchestrator. Its features do not depend on which shard an item
landed in (same CNN bytes, no global RNG, a fixed batch shape), which makes a per-item vector cache safe: a shard
encodes only images (by content) its encoder has not seen in this data root.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.base.files import write_bytes_atomic
from sand.pipeline.features.image_fetch import MAX_PIXELS, read_regular_file
from sand.pipeline.features.vector_cache import FeatureCache, content_key

# the modules that pull in torch: imported inside the functions that use them, so `sand --help` stays fast.

log = logging.getLogger(__name__)

#: Keys of ``encoder_kwargs`` that choose the CNN; the others go to ``encode_images``.
_BUILD_KEYS = ("backbone", "weights", "seed")
#: Encoded rows per feature-cache chunk: keeps the index small, and an interrupted shard loses at most that much work.
_CHUNK_ROWS = 256


@dataclass
class ShardResult:
    """Features of the usable items of one shard and the reasons for the others."""

    item_ids: np.ndarray  # (k,) int64, items with a usable image
    features: np.ndarray  # (k, dim) float32, rows aligned with item_ids
    missing: list[tuple[int, str, str]] = field(default_factory=list)  # (item, url, reason)
    weights: str = ""  # description of the CNN weights, for provenance
    n_cached: int = 0  # distinct images read from the per-item feature cache
    n_encoded: int = 0  # distinct images encoded by this shard

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def shard_items(n_items: int, shard_size: int) -> list[range]:
    """Consecutive item ranges of at most ``shard_size`` (>= 1, by the config) covering ``0..n_items-1``."""
    return [range(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


#: Bumped whenever the fast engine's arithmetic changes, so that no stage key or cached vector of the old graph is
#: reused (2: oneDNN Graph fusion on x86 CPUs instead of ``optimize_for_inference``).
FAST_ENGINE_REVISION = 2


def image_identity(backbone: str, weights_sha256: str, image_size: int, precision: str, engine: str,
                   batch_size: int, device: str, threads: int | None) -> dict[str, Any]:
    """What decides a cached image vector's bits, besides the image bytes. Batch size, device type and thread count
    are in it because the eager engine's bits depend on them; a shard pins the thread count the stage chose, so a Dask
    worker fills the same cache as a local run."""
    from sand.pipeline.features.image_encoder import PREPROCESS_VERSION

    return {"kind": "image", "backbone": backbone, "weights_sha256": weights_sha256, "image_size": int(image_size),
            "precision": precision, "engine": engine, "preprocess_version": PREPROCESS_VERSION,
            "batch_size": int(batch_size), "device": device, "threads": threads,
            **({"fast_revision": FAST_ENGINE_REVISION} if engine == "fast" else {})}


def fetch_groups(n_urls: int, first: int, group: int) -> list[range]:
    """Index ranges of the URLs fetched together: ``first`` of them, then ``group`` at a time. Why a small first group:
    nothing can be decoded or encoded before it arrives, so its size is idle time at the start of every shard (0.60 s
    for 128 images against 0.16 s for 32 over loopback, more from a real host); later groups arrive while earlier ones
    are encoded, and larger ones amortise each fetch's client setup."""
    bounds = [0, *range(min(first, n_urls), n_urls, group), n_urls] if n_urls else [0]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _fetch_ahead(urls: Sequence[str], cache_dir: Path, fetch_kwargs: Mapping[str, Any],
                 groups: Sequence[range]) -> Iterator[list]:
    """The fetch results of ``urls`` group by group, the next group fetched while the caller works on this one."""
    from sand.pipeline.features.image_fetch import fetch_images

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch") as pool:
        fetches = (pool.submit(fetch_images, [urls[i] for i in g], cache_dir, **fetch_kwargs) for g in groups)
        ahead = next(fetches, None)
        while ahead is not None:
            current, ahead = ahead, next(fetches, None)
            yield current.result()


class _ProcessMemo:
    """Values built once per process and shared by the shards running in it; the two most recent keys are kept (a
    benchmark comparing two engines in one process)."""

    def __init__(self) -> None:
        self.values: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self.lock:
            if key not in self.values:
                self.values[key] = build()
                while len(self.values) > 2:
                    self.values.popitem(last=False)
            self.values.move_to_end(key)
            return self.values[key]


#: Encoders by identity. Why: tracing, freezing and the first (profiling) call of a graph cost seconds, too much for
#: each shard of a small snapshot update.
_ENCODERS = _ProcessMemo()
#: The stage's CNN, its description and weights digest. Why: every shard loads the same file (~100 MB for resnet50)
#: and hashes it twice, and a large category has hundreds of shards. Keyed by the file's size, mtime and inode, so a
#: rebuilt file is loaded again. Shared: the encoder converts a copy, never this module.
_CNNS = _ProcessMemo()


def _cnn(build: Mapping[str, Any]) -> tuple[Any, str, str]:
    from sand.pipeline.features.image_encoder import build_cnn, weights_digest

    def load() -> tuple[Any, str, str]:
        model, _, description = build_cnn(**build)
        return model, description, weights_digest(model)

    path = Path(str(build["weights"]))
    stat = path.stat() if path.is_file() else None
    version = (stat.st_size, stat.st_mtime_ns, stat.st_ino) if stat else None
    return _CNNS.get((json.dumps(build, sort_keys=True, default=str), version), load)


def _image_key(identity: str, path: Path, max_bytes: int) -> str:
    """Cache key of one fetched image: sha256 of the encoder identity and of the image's bytes."""
    reason, data = read_regular_file(Path(path), max_bytes)
    if reason is not None or data is None:
        raise DataError(f"{path}: image cannot be read ({reason}); delete it to refetch")
    return content_key(identity, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class _EncodeSettings:
    """The encoder's settings of ``encoder_kwargs`` with their defaults, resolved once per shard."""

    engine: str
    precision: str
    batch_size: int
    image_size: int
    threads: int | None
    device: Any  # torch.device
    max_bytes: int
    max_pixels: int
    num_workers: int


def _split_encoder_kwargs(encoder_kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], _EncodeSettings]:
    """Split ``encoder_kwargs`` into :func:`build_cnn`'s arguments and the encoder's settings; refuse a bad backbone."""
    from sand.pipeline.base.devices import resolve_device
    from sand.pipeline.features.image_encoder import OUT_DIMS, build_cnn

    enc = dict(encoder_kwargs or {})
    build = {k: enc.pop(k) for k in _BUILD_KEYS if k in enc}
    build.setdefault("backbone", "resnet50")
    build.setdefault("weights", "imagenet")
    if build["backbone"] not in OUT_DIMS:
        build_cnn(**build)  # raises the ConfigError for the bad backbone name
    device = resolve_device(enc.get("device"))
    num_workers = enc.get("num_workers")
    return build, _EncodeSettings(
        engine=enc.get("engine", "eager"), precision=enc.get("precision", "fp32"), threads=enc.get("threads"),
        batch_size=int(enc.get("batch_size", 32)), image_size=int(enc.get("image_size", 224)), device=device,
        max_bytes=int(enc.get("max_bytes", 10_000_000)), max_pixels=int(enc.get("max_pixels", MAX_PIXELS)),
        num_workers=_decode_workers(device, enc.get("threads")) if num_workers is None else int(num_workers))


def _decode_workers(device: Any, threads: int | None) -> int:
    """Decode threads by default: the cores the forward pass leaves free. Why not always the cores: on a CPU the forward
    already runs torch's threads on every core, and decode threads beside it only preempt them (slower overall). On a
    GPU the cores are free while it computes, so every core decodes ahead."""
    import torch  # lazy: torch takes seconds to import

    cores = os.cpu_count() or 1
    return cores if device.type != "cpu" else max(0, cores - (threads or torch.get_num_threads()))


@dataclass
class _ShardRun:
    """One shard's progress: usable images, vectors known so far, and the images still to encode."""

    build: dict[str, Any]
    settings: _EncodeSettings
    feature_cache: Path | None
    read_cache: bool
    cnn: tuple[Any, str, str] | None = None  # (model, description, weights digest), once some image is usable
    cache: FeatureCache | None = None
    known: dict[str, str] = field(default_factory=dict)
    identity: str = ""
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    todo: dict[str, Path] = field(default_factory=dict)  # keys to encode, in first-seen order
    ok: list[tuple[int, str]] = field(default_factory=list)
    missing: list[tuple[int, str, str]] = field(default_factory=list)
    n_cached: int = 0

    def loaded_cnn(self) -> tuple[Any, str, str]:
        """The CNN, loaded only when some image is usable (a shard of dead URLs loads no weights)."""
        if self.cnn is None:
            self.cnn = _cnn(self.build)
        return self.cnn

    def _open_identity(self) -> None:
        """Fix the encoder identity at the first usable image, and open the shared feature cache under it."""
        st = self.settings
        ident = image_identity(self.build["backbone"], self.loaded_cnn()[2], st.image_size, st.precision,
                               st.engine, st.batch_size, st.device.type, st.threads)
        self.identity = content_key("", json.dumps(ident, sort_keys=True))
        if self.feature_cache is not None:
            self.cache = FeatureCache(Path(self.feature_cache), self.identity)
            self.cache.describe(ident)
            self.known = self.cache.index_all() if self.read_cache else {}

    def add_group(self, item_ids: Sequence[int], urls: Sequence[str], results: Sequence[Any]) -> list[str]:
        """Sort one fetched group: note failures, read its cache hits in one go; return the keys it queued to encode."""
        hits: dict[str, Path] = {}
        queued: list[str] = []
        for item, url, r in zip(item_ids, urls, results, strict=True):
            if not r.ok:
                self.missing.append((int(item), str(url or ""), str(r.reason)))
                continue
            if not self.identity:
                self._open_identity()
            key = _image_key(self.identity, r.path, self.settings.max_bytes)
            self.ok.append((int(item), key))
            if key in self.vectors or key in self.todo or key in hits:
                continue
            if key in self.known:
                hits[key] = r.path
            else:
                self.todo[key] = r.path
                queued.append(key)
        if hits and self.cache is not None:  # one read per chunk for the group's hits
            found = self.cache.load({k: self.known[k] for k in hits})
            self.vectors.update(found)
            self.n_cached += len(found)
            again = [k for k in hits if k not in found]  # a corrupted chunk: recompute
            self.todo.update((k, hits[k]) for k in again)
            queued += again
        return queued

    def encode(self, queued: Iterable[str]) -> None:
        """Encode the queued images as ``queued`` yields them, adding each chunk of vectors to the cache. Why a stream:
        ``queued`` fetches the next group of URLs while this group is encoded, so download and validation hide behind
        the forward pass. A fully cached shard builds no encoder."""
        from sand.pipeline.features.image_encoder import Encoder, encode_stream

        stream = iter(queued)
        first = next(stream, None)
        if first is None:
            return
        st = self.settings
        encoder = _ENCODERS.get(self.identity, lambda: Encoder(
            self.loaded_cnn()[0], engine=st.engine, precision=st.precision, device=st.device,
            batch_size=st.batch_size, image_size=st.image_size, threads=st.threads))
        order: list[str] = []  # keys in the order their images entered the encoder

        def paths() -> Iterator[Path]:
            for key in itertools.chain([first], stream):
                order.append(key)
                yield self.todo[key]

        done, pending = 0, []
        for batch in encode_stream(paths(), encoder, image_size=st.image_size, num_workers=st.num_workers,
                                   max_bytes=st.max_bytes, max_pixels=st.max_pixels):
            pending.append(batch)
            if sum(len(b) for b in pending) >= _CHUNK_ROWS:
                done = self._keep(order, done, pending)
                pending = []
        if pending:
            self._keep(order, done, pending)

    def _keep(self, order: list[str], done: int, rows: list[np.ndarray]) -> int:
        """Hold one chunk of encoded rows (the keys ``order[done:]``) and append it to the cache."""
        feats = np.concatenate(rows).astype(np.float32, copy=False)
        keys = order[done : done + len(feats)]
        self.vectors.update(zip(keys, feats, strict=True))
        if self.cache is not None:
            self.cache.append(keys, feats)
        return done + len(feats)

    def result(self, n_items: int) -> ShardResult:
        from sand.pipeline.features.image_encoder import OUT_DIMS

        ok = self.ok
        dim = OUT_DIMS[self.build["backbone"]]
        feats = np.stack([self.vectors[k] for _, k in ok]).astype(np.float32) if ok else np.zeros((0, dim), np.float32)
        log.debug("image shard: %d items, %d cached, %d encoded, missing %s", n_items, self.n_cached, len(self.todo),
                  dict(Counter(reason for _, _, reason in self.missing)))
        return ShardResult(item_ids=np.asarray([i for i, _ in ok], dtype=np.int64),
                           features=np.ascontiguousarray(feats, dtype=np.float32), missing=self.missing,
                           weights=self.cnn[1] if self.cnn else "", n_cached=self.n_cached, n_encoded=len(self.todo))


def process_shard(
    item_ids: Sequence[int], urls: Sequence[str], cache_dir: Path, fetch_kwargs: Mapping[str, Any] | None = None,
    encoder_kwargs: Mapping[str, Any] | None = None, feature_cache: Path | None = None, read_cache: bool = True,
) -> ShardResult:
    """Fetch, validate and encode the images of one shard (``urls[i]`` belongs to ``item_ids[i]``). ``fetch_kwargs``
    go to :func:`sand.pipeline.features.image_fetch.fetch_images`; ``encoder_kwargs`` hold ``backbone``, ``weights``
    and ``seed`` for :func:`build_cnn` and the encoder's settings (``precision`` resolved). Images already in
    ``feature_cache`` (shared by every dataset and snapshot of a data root) under the same encoder identity are read
    from it unless ``read_cache=False`` (a refresh); the others are encoded and added."""
    if len(item_ids) != len(urls):
        raise ConfigError(f"process_shard got {len(item_ids)} item ids but {len(urls)} URLs")
    build, settings = _split_encoder_kwargs(encoder_kwargs)
    run = _ShardRun(build, settings, feature_cache, read_cache)
    groups = fetch_groups(len(urls), first=settings.batch_size, group=max(4 * settings.batch_size, 64))

    def queued() -> Iterator[str]:
        fetched = _fetch_ahead(urls, Path(cache_dir), dict(fetch_kwargs or {}), groups)
        for g, results in zip(groups, fetched, strict=True):
            yield from run.add_group(item_ids[g.start : g.stop], urls[g.start : g.stop], results)

    run.encode(queued())
    return run.result(len(item_ids))


def save_shard(result: ShardResult, path: Path) -> None:
    """Write a shard as ``.npz`` (strings as unicode arrays, so loading needs no pickle), atomically."""
    buf = io.BytesIO()
    np.savez(
        buf,
        item_ids=np.asarray(result.item_ids, dtype=np.int64),
        features=np.asarray(result.features, dtype=np.float32),
        missing_items=np.asarray([m[0] for m in result.missing], dtype=np.int64),
        missing_urls=np.asarray([m[1] for m in result.missing], dtype=np.str_),
        missing_reasons=np.asarray([m[2] for m in result.missing], dtype=np.str_),
        meta=np.asarray(json.dumps({"weights": result.weights, "n_cached": result.n_cached,
                                    "n_encoded": result.n_encoded})),
    )
    write_bytes_atomic(Path(path), buf.getvalue())


def load_shard(path: Path) -> ShardResult:
    """Read a shard written by :func:`save_shard` (``allow_pickle=False``)."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            missing = [(int(i), str(u), str(r))
                       for i, u, r in zip(z["missing_items"], z["missing_urls"], z["missing_reasons"], strict=True)]
            meta = json.loads(str(z["meta"]))
            return ShardResult(item_ids=z["item_ids"].astype(np.int64), features=z["features"].astype(np.float32),
                               missing=missing, weights=meta["weights"], n_cached=int(meta.get("n_cached", 0)),
                               n_encoded=int(meta.get("n_encoded", 0)))
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image feature shard ({exc})") from None


def assemble_features(
    n_items: int, shards: Sequence[ShardResult], dim: int, fill: str = "mean"
) -> tuple[np.ndarray, pd.DataFrame]:
    """One ``(n_items, dim)`` float32 matrix plus the table of items without a usable image, which get the mean of the
    usable rows (``fill="mean"``, MMRec's convention: the middle of feature space, not an arbitrary corner) or zeros.
    Every item must appear in exactly one shard, as encoded or missing."""
    feat = np.zeros((n_items, dim), dtype=np.float32)
    seen, usable = np.zeros(n_items, dtype=bool), np.zeros(n_items, dtype=bool)
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
            raise DataError(f"image feature shard has features of shape {shard.features.shape}, "
                            f"expected ({len(ids)}, {dim})")
        mark(ids)
        feat[ids] = shard.features
        usable[ids] = True
        mark(np.asarray([m[0] for m in shard.missing], dtype=np.int64))
        rows.extend(shard.missing)
    if not seen.all():
        first = int(np.flatnonzero(~seen)[0])
        raise DataError(f"image feature shards cover {int(seen.sum())} of {n_items} items (first absent: {first})")
    missing = pd.DataFrame(rows, columns=["item", "url", "reason"]).sort_values("item", ignore_index=True)
    missing["item"] = missing["item"].astype(np.int64)
    if n_items and not usable.any():
        top = Counter(missing["reason"]).most_common(3)
        raise DataError(f"no item has a usable image ({n_items} items; most common reasons: "
                        f"{', '.join(f'{r} x{c}' for r, c in top)}); check the image URLs or use a text-only model")
    if fill == "mean" and (~usable).any():
        feat[~usable] = feat[usable].astype(np.float64).mean(axis=0).astype(np.float32)
    return feat, missing
