"""Approximate item-item kNN graphs for large catalogues (faiss IVF), with their measured recall.

Why: the exact graph costs N^2 d multiply-adds (about 8 PFLOP for one million 4,096-d items), more than a CPU does in a
working day; an inverted-file index (inner product on L2-normalised rows = cosine) compares each item with the items
of its ``nprobe`` nearest clusters only. The quality lost is measured, not assumed: the exact top-k of a seeded row
sample is computed by streaming all items past it, ``nprobe`` is doubled on one half of the sample until recall@k
reaches the target, and the recall reported is measured on the other half. Recall counts the neighbours other than the
item itself (``include_self`` fixes it in both graphs). Determinism: clustering and search are seeded; faiss's BLAS
sums, like any BLAS, can differ in the last bits across machines and thread counts."""

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
    """``auto``: exact up to ``auto_threshold`` items or on CUDA, else faiss (exact with a warning if it is missing)."""
    if method not in METHODS:
        raise ConfigError(f"graphs.method: must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "faiss" and not faiss_available():
        raise ConfigError("graphs.method=faiss: the faiss package is not installed (pip install faiss-cpu)")
    if method != "auto":
        return method
    if n_items <= auto_threshold or cuda:
        return "exact"
    if faiss_available():
        return "faiss"
    log.warning("graphs.method=auto: %d items > auto_threshold %d but faiss is not installed (pip install faiss-cpu); "
                "building the exact graph, which costs N^2 d", n_items, auto_threshold)
    return "exact"


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
    """Exact top-k cosine neighbours of ``rows`` only, streaming the items in blocks: the recall reference on a million
    items without a normalised copy of them all. Ties at the k-th value are not ordered (recall needs no tie rule)."""
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
    total, counted = 0.0, 0
    for a, e, r in zip(approx, exact, rows, strict=True):
        e_set = set(e.tolist()) - {int(r)}
        if e_set:
            total += len(e_set & set(a.tolist())) / len(e_set)
            counted += 1
    return total / counted if counted else 1.0


#: k-means on ``_TRAIN_PER_CLUSTER`` sampled rows per cluster (faiss warns below 39), ``_KMEANS_ITERS`` rounds:
#: training then costs about as much as the search instead of dominating it.
_TRAIN_PER_CLUSTER = 40
_KMEANS_ITERS = 10


def default_nlist(n_items: int) -> int:
    """About 2 sqrt(N) clusters (>= 39 items each): a query meets as many centroids as items, ~N^1.5 d, not N^2 d."""
    return int(max(1, min(round(2 * math.sqrt(n_items)), n_items // 39)))


def _search_rows(index: Any, features: np.ndarray, rows: np.ndarray, k: int, include_self: bool,
                 progress: bool = False) -> np.ndarray:
    """(len(rows), k) neighbours from the index in row blocks; the item itself forced in/out; -1 where short."""
    kk = min(k + 1, features.shape[0])
    need = k - 1 if include_self else k
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in tqdm(range(0, len(rows), _ROW_BLOCK), desc="faiss search", disable=not progress, unit="block"):
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
    quantizer = faiss.IndexFlatIP(d)
    if storage == "float16":
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                             faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)


def _add_reserved(index: Any, features: np.ndarray, progress: bool) -> None:
    """Add every row to the trained IVF ``index``, each inverted list allocated once at its final size. Why: faiss
    grows a list's buffer geometrically as rows are appended, which at a million 4,096-d rows wastes too much memory.
    Assigning every row first (the nearest-centroid search ``add`` does) gives each list's size; its capacity is
    reserved (``resize`` up, then to 0: a std::vector keeps its capacity) and the rows are added with their assignment:
    same index. Blocks are normalised twice: keeping them would be the N x d copy this avoids."""
    from faiss.contrib.ivf_tools import add_preassigned  # lazy: optional and heavy

    n = features.shape[0]
    assign = np.empty(n, dtype=np.int64)
    blocks = range(0, n, _ROW_BLOCK)
    for start in tqdm(blocks, desc="faiss assign", disable=not progress, unit="block"):
        _, nearest = index.quantizer.search(_normalised(features[start : start + _ROW_BLOCK]), 1)
        assign[start : start + _ROW_BLOCK] = nearest[:, 0]
    lists = index.invlists
    for list_no, size in enumerate(np.bincount(assign, minlength=index.nlist)):
        lists.resize(list_no, int(size))
        lists.resize(list_no, 0)
    for start in tqdm(blocks, desc="faiss add", disable=not progress, unit="block"):
        add_preassigned(index, _normalised(features[start : start + _ROW_BLOCK]), assign[start : start + _ROW_BLOCK])


def _tune_nprobe(index: Any, features: np.ndarray, rows: np.ndarray, exact: np.ndarray, k: int, include_self: bool,
                 nprobe: int | None, nl: int, target_recall: float) -> tuple[int, list[dict[str, float]]]:
    """Double ``nprobe`` from 8 until the tuning rows' recall meets the target (or use the one given), on ``index``."""
    tuning: list[dict[str, float]] = []
    probe = int(nprobe) if nprobe else min(8, nl)
    while True:
        index.nprobe = probe
        rec = recall_at_k(_search_rows(index, features, rows, k, include_self), exact, rows)
        tuning.append({"nprobe": probe, "recall": round(rec, 4)})
        if nprobe or rec >= target_recall or probe >= nl:
            break
        probe = min(2 * probe, nl)
    return probe, tuning


def faiss_neighbours(features: np.ndarray, k: int = 10, *, include_self: bool = True, nlist: int | None = None,
                     nprobe: int | None = None, target_recall: float = 0.95, recall_sample: int = 1000, seed: int = 0,
                     progress: bool = False, rows: np.ndarray | None = None,
                     storage: str = "float32") -> tuple[np.ndarray, AnnReport]:
    """(N x k) approximate top-k cosine neighbours (rows sorted by item index) and their report. ``features`` may be
    memory-mapped, any float dtype: rows are normalised in blocks, so the index holds the only full copy; rows it cannot
    fill (tiny clusters) are computed exactly. ``rows``: search only these items. ``storage="float16"`` halves the index
    (what lets a million 4,096-d items fit), moving cosines by ~1e-4, which the measured recall includes."""
    import faiss  # lazy: optional and heavy

    n, d = features.shape
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

    t0 = time.perf_counter()  # k-means on a seeded row sample, then every row added: the one index all searches share
    train_rows = np.sort(rng.choice(n, size=min(n, nl * _TRAIN_PER_CLUSTER), replace=False))
    index = _ivf_index(faiss, d, nl, storage)
    index.cp.seed = int(seed)
    index.cp.niter = _KMEANS_ITERS
    index.train(_normalised(features[train_rows]))
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _add_reserved(index, features, progress)
    seconds["add"] = time.perf_counter() - t0

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
    out = _search_rows(index, features, queries, k, include_self, progress)
    short = np.flatnonzero((out < 0).any(axis=1))
    if len(short):
        out[short] = exact_rows(features, queries[short], k, include_self)
    seconds["search"] = time.perf_counter() - t0
    out.sort(axis=1)

    report = AnnReport(method=f"faiss.{_STORAGE[storage]}(inner product, L2-normalised rows)", nlist=nl, nprobe=probe,
                       recall_at_k=round(held_recall, 4), recall_rows=int(len(held)), target_recall=target_recall,
                       tuning=tuning, exact_fallback_rows=int(len(short)),
                       seconds={k_: round(v, 3) for k_, v in seconds.items()})
    level = logging.WARNING if held_recall < target_recall else logging.INFO
    log.log(level, "faiss kNN graph: %d items, nlist %d, nprobe %d, recall@%d %.4f on %d held-out rows "
            "(target %.2f)", n, nl, probe, k, held_recall, len(held), target_recall)
    return out, report
