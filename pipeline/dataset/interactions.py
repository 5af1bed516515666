"""The ``interactions`` transform: raw reviews (+ metadata) -> indexed, filtered, split tables.

Pure (tables in, tables out), so the CLI, a flow and a notebook share it. Steps: factorise raw ids (sorted, so indices
follow the raw ids' order on every run) -> drop duplicate (user, item) pairs (latest review wins) -> iterative k-core ->
re-index the survivors from 0 -> per-user split -> join metadata. ``items.categories`` stays a list of str
(``list<string>`` in parquet): each text recipe joins it as it likes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.dataset.kcore import dedup_mask, kcore
from sand.pipeline.dataset.mmrec import MMRecDataset
from sand.pipeline.dataset.split_data import SPLIT_NAMES
from sand.pipeline.dataset.splits import SPLIT_RULES, split_interactions

log = logging.getLogger(__name__)

REVIEW_COLUMNS = ("user_id", "asin", "rating", "timestamp")
ITEM_TEXT_COLUMNS = ("title", "brand", "description", "features", "image_url")
ITEM_COLUMNS = ("item", "asin", "title", "brand", "categories", "description", "features", "image_url", "has_meta")


@dataclass(frozen=True)
class InteractionsResult:
    """Output of the interactions stage, one parquet file per table:
    interactions: user int64, item int64, rating float32, timestamp int64, split int8
    items: item, asin, title, brand, categories (list[str]), description, features, image_url, has_meta
    user_map: user_id (raw str), user;  item_map: asin (raw str), item"""

    interactions: pd.DataFrame
    items: pd.DataFrame
    user_map: pd.DataFrame
    item_map: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _split_stats(split: np.ndarray) -> dict[str, int]:
    counts = np.bincount(split.astype(np.int64), minlength=3)
    return {SPLIT_NAMES[code]: int(counts[code]) for code in SPLIT_NAMES}


def _items_table(item_map: pd.DataFrame, meta: pd.DataFrame | None) -> pd.DataFrame:
    """Join metadata onto the item index; items without a metadata record get empty fields."""
    n = len(item_map)
    items = pd.DataFrame({"item": item_map["item"].to_numpy(np.int64), "asin": item_map["asin"].to_numpy()})
    if meta is None or len(meta) == 0:
        meta = pd.DataFrame(columns=["asin"])
    elif "asin" not in meta.columns:
        raise DataError(f"metadata table lacks column 'asin' (columns: {', '.join(map(str, meta.columns))})")
    meta = meta.drop_duplicates("asin", keep="first").set_index("asin")
    pos = meta.index.get_indexer(items["asin"])
    has = pos >= 0
    items["has_meta"] = has
    for col in ITEM_TEXT_COLUMNS:
        values = np.full(n, "", dtype=object)
        if col in meta.columns:
            src = meta[col].fillna("").astype("str").to_numpy(dtype=object)
            values[has] = src[pos[has]]
        items[col] = pd.array(values, dtype="str")
    cats = meta["categories"].to_numpy(dtype=object) if "categories" in meta.columns else np.full(len(meta), None)
    items["categories"] = [
        [str(c) for c in cats[p]] if p >= 0 and isinstance(cats[p], list | tuple | np.ndarray) else [] for p in pos
    ]
    return items[list(ITEM_COLUMNS)]


def _id_map(raw: np.ndarray | pa.Array, raw_col: str, id_col: str, known: pd.DataFrame | None = None) -> pd.DataFrame:
    """Raw id ``raw[i]`` of each id ``i``, overridden where the ``known`` map has one."""
    if known is not None:
        raw[known[id_col].to_numpy()] = known[raw_col].to_numpy(dtype=object)
    return pd.DataFrame({raw_col: pd.array(raw, dtype="str"), id_col: np.arange(len(raw))})


def _codes(values: pd.Series, what: str) -> tuple[np.ndarray, pa.Array]:
    codes, uniques = pd.factorize(values, sort=True)
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise DataError(f"reviews row {row}: field {what!r} is empty")
    return codes.astype(np.int64), pa.array(np.asarray(uniques, dtype=object), pa.string())


def _reindex(codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes still in use, ascending; each row's position among them)."""
    used = np.flatnonzero(np.bincount(codes, minlength=n_codes))
    lookup = np.full(n_codes, -1, dtype=np.int64)
    lookup[used] = np.arange(len(used))
    return used, lookup[codes]


def _check_options(k_core: int, split_rule: str) -> None:
    if split_rule not in SPLIT_RULES:
        raise ConfigError(f"unknown split rule {split_rule!r}; valid rules: {', '.join(SPLIT_RULES)}")
    if not isinstance(k_core, int | np.integer) or k_core < 0:
        raise ConfigError(f"k_core must be a non-negative integer, got {k_core!r}")


def build_interactions(
    reviews: pd.DataFrame, meta: pd.DataFrame | None = None, *, k_core: int = 5, split_rule: str = "mmrec",
    seed: int = 0,
) -> InteractionsResult:
    """Deduplicate, k-core filter, re-index (sorted raw ids -> 0..N-1) and split reviews."""
    missing = [c for c in REVIEW_COLUMNS if c not in reviews.columns]
    if missing:
        raise DataError(f"reviews table lacks column {missing[0]!r}")
    _check_options(k_core, split_rule)  # before the codes, so a bad option is reported first
    ucodes, raw_users = _codes(reviews["user_id"], "user_id")
    icodes, raw_items = _codes(reviews["asin"], "asin")
    result = index_reviews(
        ucodes, icodes, raw_users, raw_items, reviews["rating"].to_numpy(np.float32),
        reviews["timestamp"].to_numpy(np.int64), k_core=k_core, split_rule=split_rule, seed=seed,
    )
    return with_meta(result, meta)


def index_reviews(
    ucodes: np.ndarray, icodes: np.ndarray, raw_users: pa.Array, raw_items: pa.Array, ratings: np.ndarray,
    timestamps: np.ndarray, *, k_core: int = 5, split_rule: str = "mmrec", seed: int = 0,
) -> InteractionsResult:
    """:func:`build_interactions` without metadata (join it with :func:`with_meta`) on reviews coded by sorted raw id
    (``ucodes``/``icodes`` index ``raw_users``/``raw_items``), so the columnar reader never holds a Python string per
    review."""
    _check_options(k_core, split_rule)
    n_raw = len(ucodes)
    if n_raw == 0:
        raise DataError("no reviews in the input")
    timestamps = np.asarray(timestamps, dtype=np.int64)
    rows = np.flatnonzero(dedup_mask(ucodes, icodes, timestamps))
    n_dups = n_raw - len(rows)
    core = kcore(ucodes[rows], icodes[rows], int(k_core))
    rows = rows[core.mask]
    if len(rows) == 0:
        raise DataError(
            f"no interactions left after {k_core}-core filtering ({n_raw} reviews in, {n_dups} duplicates "
            f"removed, {len(raw_users)} users and {len(raw_items)} items before filtering)"
        )

    # Re-index the survivors 0..N-1 in code order (= sorted raw ids); O(n) lookups, no sort.
    used_users, user = _reindex(ucodes[rows], len(raw_users))
    used_items, item = _reindex(icodes[rows], len(raw_items))
    order = np.lexsort((item, user))
    rows, user, item = rows[order], user[order], item[order]
    ts = timestamps[rows]
    split = split_interactions(user, item, ts, rule=split_rule, seed=seed)
    interactions = pd.DataFrame({
        "user": user.astype(np.int64), "item": item.astype(np.int64),
        "rating": np.asarray(ratings, dtype=np.float32)[rows], "timestamp": ts, "split": split,
    })
    user_map = _id_map(raw_users.take(used_users), "user_id", "user")
    item_map = _id_map(raw_items.take(used_items), "asin", "item")
    stats: dict[str, Any] = {
        "raw_reviews": n_raw, "duplicates_removed": int(n_dups), "k_core": int(k_core), "kcore_rounds": core.rounds,
        "kcore_removed": int(len(core.mask) - core.mask.sum()), "users": len(used_users), "items": len(used_items),
        "interactions": len(interactions), "split_rule": split_rule, "seed": seed, **_split_stats(split),
    }
    log.info(
        "interactions: %d reviews -> %d users, %d items, %d interactions (%d duplicates, %d k-core rounds)", n_raw,
        stats["users"], stats["items"], stats["interactions"], n_dups, core.rounds,
    )
    return with_meta(InteractionsResult(interactions, pd.DataFrame(), user_map, item_map, stats), None)


def with_meta(result: InteractionsResult, meta: pd.DataFrame | None) -> InteractionsResult:
    """``result`` with its items table (and metadata stats) rebuilt from ``meta``."""
    items = _items_table(result.item_map, meta)
    without_meta, without_image = int((~items["has_meta"]).sum()), int((items["image_url"] == "").sum())
    stats = {**result.stats, "items_without_meta": without_meta, "items_without_image": without_image}
    return InteractionsResult(result.interactions, items, result.user_map, result.item_map, stats)


def interactions_from_mmrec(ds: MMRecDataset) -> InteractionsResult:
    """The same tables from an MMRec folder, KEEPING its ids and split (no filtering, no re-split): missing ratings
    become NaN and timestamps 0; asins come from the id map ("" without one), image URLs from ``item_images.csv``; no
    metadata is joined."""
    inter = ds.inter
    n = len(inter)
    rating = inter["rating"].to_numpy(np.float32) if "rating" in inter else np.full(n, np.nan, np.float32)
    timestamp = inter["timestamp"].to_numpy(np.int64) if "timestamp" in inter else np.zeros(n, np.int64)
    split = inter["split"].to_numpy(np.int8)
    interactions = pd.DataFrame({
        "user": inter["user"].to_numpy(np.int64), "item": inter["item"].to_numpy(np.int64), "rating": rating,
        "timestamp": timestamp, "split": split,
    })
    user_map = _id_map(np.array([str(u) for u in range(ds.n_users)], dtype=object), "user_id", "user", ds.user_map)
    item_map = _id_map(np.full(ds.n_items, "", dtype=object), "asin", "item", ds.item_map)
    items = _items_table(item_map, None)
    if ds.item_images is not None:
        known = ds.item_images[ds.item_images["item"] < ds.n_items]
        urls = items["image_url"].to_numpy(dtype=object)
        urls[known["item"].to_numpy()] = known["image_url"].to_numpy(dtype=object)
        items["image_url"] = pd.array(urls, dtype="str")
    stats: dict[str, Any] = {
        "source": f"mmrec:{ds.name}", "users": ds.n_users, "items": ds.n_items, "interactions": n,
        **_split_stats(split),
        # Items lacking what a modality is built from: a shipped image_feat.npy / text_feat.npy covers every item;
        # without it, images come from item_images.csv URLs and texts from metadata, which a folder never has.
        "items_without_meta": 0 if ds.text_feat is not None else ds.n_items,
        "items_without_image": 0 if ds.image_feat is not None else int((items["image_url"] == "").sum()),
    }
    return InteractionsResult(interactions, items, user_map, item_map, stats)
