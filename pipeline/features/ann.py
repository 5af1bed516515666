"""Approximate item-item kNN graphs for large catalogues (faiss IVF), with their measured recall.

Why: the exact graph costs N^2 d multiply-adds (about 8 PFLOP for one million 4,096-d items), which a CPU does not
finish in a working day. An inverted-file index (faiss ``IndexIVFFlat``, inner product on L2-normalised rows = cosine)
compares each item with the items of its ``nprobe`` nearest clusters only. What that costs in quality is measured, not
assumed: the exact top-k of a seeded sample of rows is computed by streaming all items past them, ``nprobe`` is doubled
on one half of the sample until recall@k reaches the target, and the recall reported in the manifest is measured on the
other half (held out from the tuning).

Recall@k here counts the neighbours other than the item itself (the item is forced in or out by ``include_self`` in both
graphs, so it would only inflate the number). Determinism: clustering and search are seeded and single-pass; faiss's
BLAS sums, like any BLAS, can differ in the last bits across machines and thread counts."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.features.knn import l2_normalise, query_rows

log = logging.getLogger(__name__)

METHODS = ("exact", "faiss", "auto")
#: Rows normalised and added / searched per call: bounds the float32 copies held at once.
_ROW_BLOCK = 16384


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401  # lazy: an optional dependency, only probed here
    except ImportError:
        return False
    return True


def resolve_method(method: str, n_items: int, auto_threshold: int, cuda: bool = False) -> str:
    """``exact`` or ``faiss`` for this catalogue.

    ``auto``: exact up to ``auto_threshold`` items, or at any size when a CUDA GPU runs the blocked exact product; above
    it on CPU faiss, or exact with a warning if faiss is missing."""
    if method not in METHODS:
        raise ConfigError(f"graphs.method: must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "faiss" and not faiss_available():
        raise ConfigError("graphs.method=faiss: the faiss package is not installed (pip install faiss-cpu)")
    if method != "auto":
        return method
    if n_items <= auto_threshold or cuda:
        return "exact"
    if not faiss_available():
        log.warning(
            "graphs.method=auto: %d items > auto_threshold %d but faiss is not installed "
            "(pip install faiss-cpu); building the exact graph, which costs N^2 d", n_items, auto_threshold,
        )
        return "exact"
    return "faiss"


@dataclass
class AnnReport:
    """What the approximate build did and how good it is (goes into the graph manifest)."""

    method: str
    nlist: int
    nprobe: int
    recall_at_k: float  # on the held-out half of the sample
    recall_rows: int
    target_recall: float
    tuning: list[dict[str, float]] = field(default_factory=list)  # nprobe -> recall on the tuning half
    exact_fallback_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normalised(x: np.ndarray) -> np.ndarray:
    """:func:`pipeline.features.knn.l2_normalise`, C-contiguous as faiss wants it."""
    return np.ascontiguousarray(l2_normalise(x))


def exact_rows(features: np.ndarray, rows: np.ndarray, k: int, include_self: bool) -> np.ndarray:
    """Exact top-k cosine neighbours of ``rows`` only, streaming the items in blocks.

    Memory O(len(rows) x block + block x d): the reference for recall on a million items without a normalised copy of
    the whole matrix. Ties at the k-th value are not ordered by index here (a recall estimate does not need the tie
    rule)."""
    n = features.shape[0]
    q = _normalised(features[rows])
    best_v = np.full((len(rows), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(rows), k), -1, dtype=np.int64)
    diag = np.inf if include_self else -np.inf
    for start in range(0, n, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, n)
        sims = q @ _normalised(features[start:stop]).T
        own = (rows >= start) & (rows < stop)
        sims[np.flatnonzero(own), rows[own] - start] = diag
        vals = np.concatenate([best_v, sims], axis=1)
        idx = np.concatenate([best_i, np.broadcast_to(np.arange(start, stop), sims.shape)], axis=1)
        top = np.argpartition(-vals, k - 1, axis=1)[:, :k]
        best_v = np.take_along_axis(vals, top, axis=1)
        best_i = np.take_along_axis(idx, top, axis=1)
    return np.sort(best_i, axis=1)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, rows: np.ndarray) -> float:
    """Mean over rows of |approx & exact| / |exact|, neighbours other than the row's item only."""
    total = 0.0
    counted = 0
    for a, e, r in zip(approx, exact, rows, strict=True):
        e_set = set(e.tolist()) - {int(r)}
        if not e_set:
            continue
        total += len(e_set & (set(a.tolist()) - {int(r)})) / len(e_set)
        counted += 1
    return total / counted if counted else 1.0


#: k-means on ``_TRAIN_PER_CLUSTER`` sampled rows per cluster (faiss warns below 39), ``_KMEANS_ITERS`` rounds:
#: training then costs about as much as the search instead of dominating it.
_TRAIN_PER_CLUSTER = 40
_KMEANS_ITERS = 10


def default_nlist(n_items: int) -> int:
    """About 2 sqrt(N) clusters (at least 39 items each), so that for a few probes a query compares with about as many
    centroids as items: cost ~ N^1.5 d instead of N^2 d."""
    return int(max(1, min(round(2 * math.sqrt(n_items)), n_items // 39)))


def _search_rows(index: Any, features: np.ndarray, rows: np.ndarray, k: int, include_self: bool) -> np.ndarray:
    """(len(rows), k) neighbours from the index; the item itself forced in/out; -1 where short."""
    n = features.shape[0]
    kk = min(k + 1, n)
    need = k - 1 if include_self else k
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), _ROW_BLOCK):
        r = rows[start : start + _ROW_BLOCK]
        _, found = index.search(_normalised(features[r]), kk)
        found = np.where(found == r[:, None], -1, found)
        order = np.argsort(found == -1, axis=1, kind="stable")  # valid hits first, in rank order
        others = np.take_along_axis(found, order, axis=1)[:, :need]
        if include_self:
            others = np.concatenate([r[:, None], others], axis=1)
        out[start : start + len(r)] = others
    return out


#: ``graphs.faiss_storage`` -> the faiss index class that stores the vectors so.
_STORAGE = {"float32": "IndexIVFFlat", "float16": "IndexIVFScalarQuantizer(QT_fp16)"}


def _ivf_index(faiss: Any, d: int, nlist: int, storage: str) -> Any:
    """An untrained IVF index over inner products, vectors stored in ``storage``."""
    quantizer = faiss.IndexFlatIP(d)
    if storage == "float16":
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                             faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)


def _add_reserved(index: Any, features: np.ndarray, progress: bool) -> None:
    """Add every row to the trained IVF ``index``, each inverted list allocated once at its final size.

    Why two passes: faiss appends to a list by growing its buffer geometrically, so adding row blocks left the lists
    holding ~1.6x their codes (measured: 932 MB for 586 MB of vectors), and at 1M x 4,096 float32 the process was killed
    for memory on a 24 GB machine. Assigning every row to its list first (the same nearest-centroid search ``add`` does;
    N int64s kept) gives each list's size; its capacity is then reserved (``resize`` up, then back to 0: a std::vector
    keeps its capacity) and the rows are added with their assignment (``add_preassigned``). Same index, same output.
    Each block is read and normalised twice: keeping the normalised rows between the passes would be the N x d float32
    copy this avoids."""
    from faiss.contrib.ivf_tools import add_preassigned  # lazy: optional and heavy

    n = features.shape[0]
    assign = np.empty(n, dtype=np.int64)
    blocks = range(0, n, _ROW_BLOCK)
    for start in tqdm(blocks, desc="faiss assign", disable=not progress, unit="block"):
        assign[start : start + _ROW_BLOCK] = index.quantizer.search(
            _normalised(features[start : start + _ROW_BLOCK]), 1
        )[1][:, 0]
    lists = index.invlists
    for list_no, size in enumerate(np.bincount(assign, minlength=index.nlist)):
        lists.resize(list_no, int(size))
        lists.resize(list_no, 0)
    for start in tqdm(blocks, desc="faiss add", disable=not progress, unit="block"):
        add_preassigned(index, _normalised(features[start : start + _ROW_BLOCK]), assign[start : start + _ROW_BLOCK])


def _build_index(faiss: Any, features: np.ndarray, nl: int, storage: str, rng: np.random.Generator, seed: int,
                 progress: bool, seconds: dict[str, float]) -> Any:
    """Train the IVF clustering on a seeded row sample, then add every row: the one index all searches share."""
    n, d = features.shape
    t0 = time.perf_counter()
    train_rows = np.sort(rng.choice(n, size=min(n, nl * _TRAIN_PER_CLUSTER), replace=False))
    index = _ivf_index(faiss, d, nl, storage)
    index.cp.seed = int(seed)
    index.cp.niter = _KMEANS_ITERS
    index.train(_normalised(features[train_rows]))
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _add_reserved(index, features, progress)
    seconds["add"] = time.perf_counter() - t0
    return index


def _tune_nprobe(index: Any, features: np.ndarray, rows: np.ndarray, exact: np.ndarray, k: int, include_self: bool,
                 nprobe: int | None, nl: int, target_recall: float) -> tuple[int, list[dict[str, float]]]:
    """Double ``nprobe`` from 8 on the tuning rows until their recall meets the target (or use the one given).

    Leaves the chosen value set on ``index``; returns it with the recall measured at each step."""
    tuning: list[dict[str, float]] = []
    probe = int(nprobe) if nprobe else min(8, nl)
    while True:
        index.nprobe = probe
        got = _search_rows(index, features, rows, k, include_self)
        rec = recall_at_k(got, exact, rows)
        tuning.append({"nprobe": probe, "recall": round(rec, 4)})
        if nprobe or rec >= target_recall or probe >= nl:
            break
        probe = min(2 * probe, nl)
    return probe, tuning


def _search_all(index: Any, features: np.ndarray, queries: np.ndarray, k: int, include_self: bool,
                progress: bool) -> tuple[np.ndarray, int]:
    """Search the query rows block by block (bounded copies); rows the index cannot fill are computed exactly.

    Returns the (unsorted) neighbour rows and how many rows fell back to the exact search."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in tqdm(range(0, len(queries), _ROW_BLOCK), desc="faiss search", disable=not progress, unit="block"):
        out[start : start + _ROW_BLOCK] = _search_rows(index, features, queries[start : start + _ROW_BLOCK], k,
                                                       include_self)
    short = np.flatnonzero((out < 0).any(axis=1))
    if len(short):
        out[short] = exact_rows(features, queries[short], k, include_self)
    return out, int(len(short))


def faiss_neighbours(
    features: np.ndarray, k: int = 10, *, include_self: bool = True, nlist: int | None = None,
    nprobe: int | None = None, target_recall: float = 0.95, recall_sample: int = 1000, seed: int = 0,
    progress: bool = False, rows: np.ndarray | None = None, storage: str = "float32",
) -> tuple[np.ndarray, AnnReport]:
    """(N x k) approximate top-k cosine neighbours (rows sorted by item index) and their report.

    ``features`` may be memory-mapped and of any float dtype: rows are normalised block by block, so the only full copy
    is the index's own storage (N x d x 4 or 2 bytes, ``storage``).
    ``nprobe`` None: tuned on half of the recall sample (doubling from 8) until ``target_recall``; a row the index
    cannot fill (a tiny cluster) is computed exactly.
    ``rows``: search only these items (len(rows) x k; the index still holds every item), e.g. to time the search on a
    sample where searching all rows takes hours.
    ``storage``: "float32" (``IndexIVFFlat``, N x d x 4 bytes) or "float16" (``IndexIVFScalarQuantizer`` with
    half-precision codes, N x d x 2 bytes: what lets 1M x 4,096 fit a 24 GB machine; rounding the stored vectors to 11
    significant bits moves cosines by ~1e-4, and the recall is measured the same way)."""
    import faiss  # lazy: optional and heavy

    n, _ = features.shape
    if not 0 < target_recall <= 1:
        raise ConfigError(f"graphs.target_recall: must be in (0, 1], got {target_recall}")
    if storage not in _STORAGE:
        raise ConfigError(f"graphs.faiss_storage: must be one of {sorted(_STORAGE)}, got {storage!r}")
    nl = int(nlist) if nlist else default_nlist(n)
    if not 1 <= nl <= n:
        raise ConfigError(f"graphs.nlist: must be between 1 and the number of items {n}, got {nlist}")
    queries = query_rows(rows, n)
    rng = np.random.default_rng(seed)
    seconds: dict[str, float] = {}
    index = _build_index(faiss, features, nl, storage, rng, seed, progress, seconds)

    t0 = time.perf_counter()
    sample = np.sort(rng.choice(n, size=min(n, max(2, recall_sample)), replace=False))
    exact = exact_rows(features, sample, k, include_self)
    tune, held = np.arange(0, len(sample), 2), np.arange(1, len(sample), 2)
    seconds["exact_sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probe, tuning = _tune_nprobe(index, features, sample[tune], exact[tune], k, include_self, nprobe, nl, target_recall)
    seconds["tune"] = time.perf_counter() - t0
    held_recall = recall_at_k(_search_rows(index, features, sample[held], k, include_self), exact[held], sample[held])

    t0 = time.perf_counter()
    out, n_short = _search_all(index, features, queries, k, include_self, progress)
    seconds["search"] = time.perf_counter() - t0
    out.sort(axis=1)

    report = AnnReport(
        method=f"faiss.{_STORAGE[storage]}(inner product, L2-normalised rows)", nlist=nl, nprobe=probe,
        recall_at_k=round(held_recall, 4), recall_rows=int(len(held)), target_recall=target_recall, tuning=tuning,
        exact_fallback_rows=n_short, seconds={k_: round(v, 3) for k_, v in seconds.items()},
    )
    level = logging.WARNING if held_recall < target_recall else logging.INFO
    log.log(level, "faiss kNN graph: %d items, nlist %d, nprobe %d, recall@%d %.4f on %d held-out rows "
            "(target %.2f)", n, nl, probe, k, held_recall, len(held), target_recall)
    return out, report
