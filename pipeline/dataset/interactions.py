"""The ``interactions`` transform: raw reviews (+ metadata) -> indexed, filtered, split tables.

Pure: tables in, tables out; reading files and writing the artifact happen at the edges (the stage), so the same code
serves the CLI, a flow and a notebook.

Steps: factorise raw ids (sorted, so indices follow the raw ids' order and are the same on every run) -> drop duplicate
(user, item) pairs (latest review wins) -> iterative k-core -> re-index the survivors from 0 -> per-user split -> join
metadata.

The ``items`` table keeps ``categories`` as a list of str (one category path, e.g. ``["Baby", "Nursery", "Bedding"]``);
parquet stores it as ``list<string>``, and the text recipe joins it however it likes (MMRec joins with spaces)."""

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
    """Output of the interactions stage (each table becomes one parquet file).

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
        for col in ITEM_TEXT_COLUMNS:
            items[col] = pd.array([""] * n, dtype="str")
        items["categories"] = [[] for _ in range(n)]
        items["has_meta"] = np.zeros(n, dtype=bool)
        return items[list(ITEM_COLUMNS)]
    if "asin" not in meta.columns:
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
    cats: list[list[str]] = [[] for _ in range(n)]
    if "categories" in meta.columns:
        src_cats = meta["categories"].to_numpy(dtype=object)
        for row in np.flatnonzero(has):
            value = src_cats[pos[row]]
            cats[row] = [str(c) for c in value] if isinstance(value, list | tuple | np.ndarray) else []
    items["categories"] = cats
    return items[list(ITEM_COLUMNS)]


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
    _check_options(k_core, split_rule)
    if len(reviews) == 0:
        raise DataError("no reviews in the input")
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
    """:func:`build_interactions` on reviews already coded by sorted raw id, without metadata.

    ``ucodes``/``icodes`` index ``raw_users``/``raw_items`` (sorted distinct raw ids); this is the entry of the columnar
    reader (:mod:`sand.pipeline.dataset.columnar`), which never holds a Python string per review. Join metadata with
    :func:`with_meta`."""
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

    interactions = pd.DataFrame(
        {
            "user": user.astype(np.int64),
            "item": item.astype(np.int64),
            "rating": np.asarray(ratings, dtype=np.float32)[rows],
            "timestamp": ts,
            "split": split,
        }
    )
    user_map = pd.DataFrame(
        {"user_id": pd.array(raw_users.take(used_users), dtype="str"), "user": np.arange(len(used_users))}
    )
    item_map = pd.DataFrame(
        {"asin": pd.array(raw_items.take(used_items), dtype="str"), "item": np.arange(len(used_items))}
    )
    stats: dict[str, Any] = {
        "raw_reviews": n_raw,
        "duplicates_removed": int(n_dups),
        "k_core": int(k_core),
        "kcore_rounds": core.rounds,
        "kcore_removed": int(len(core.mask) - core.mask.sum()),
        "users": len(used_users),
        "items": len(used_items),
        "interactions": len(interactions),
        "split_rule": split_rule,
        "seed": seed,
        **_split_stats(split),
    }
    log.info(
        "interactions: %d reviews -> %d users, %d items, %d interactions (%d duplicates, %d k-core rounds)", n_raw,
        stats["users"], stats["items"], stats["interactions"], n_dups, core.rounds,
    )
    return with_meta(InteractionsResult(interactions, pd.DataFrame(), user_map, item_map, stats), None)


def with_meta(result: InteractionsResult, meta: pd.DataFrame | None) -> InteractionsResult:
    """``result`` with its items table (and metadata stats) rebuilt from ``meta``."""
    items = _items_table(result.item_map, meta)
    stats = {
        **result.stats,
        "items_without_meta": int((~items["has_meta"]).sum()),
        "items_without_image": int((items["image_url"] == "").sum()),
    }
    return InteractionsResult(result.interactions, items, result.user_map, result.item_map, stats)


def interactions_from_mmrec(ds: MMRecDataset) -> InteractionsResult:
    """The same tables from an MMRec folder, KEEPING its ids and split (no filtering, no re-split).

    Missing ratings become NaN and missing timestamps 0; items get their asin from the id map (or "" without one) and an
    image URL from ``item_images.csv`` if the folder has it. No metadata is joined (``has_meta`` is False)."""
    inter = ds.inter
    n = len(inter)
    rating = inter["rating"].to_numpy(np.float32) if "rating" in inter else np.full(n, np.nan, np.float32)
    timestamp = inter["timestamp"].to_numpy(np.int64) if "timestamp" in inter else np.zeros(n, np.int64)
    split = inter["split"].to_numpy(np.int8)
    interactions = pd.DataFrame(
        {
            "user": inter["user"].to_numpy(np.int64), "item": inter["item"].to_numpy(np.int64), "rating": rating,
            "timestamp": timestamp, "split": split,
        }
    )
    user_ids = np.array([str(u) for u in range(ds.n_users)], dtype=object)
    if ds.user_map is not None:
        user_ids[ds.user_map["user"].to_numpy()] = ds.user_map["user_id"].to_numpy(dtype=object)
    asins = np.full(ds.n_items, "", dtype=object)
    if ds.item_map is not None:
        asins[ds.item_map["item"].to_numpy()] = ds.item_map["asin"].to_numpy(dtype=object)
    user_map = pd.DataFrame({"user_id": pd.array(user_ids, dtype="str"), "user": np.arange(ds.n_users)})
    item_map = pd.DataFrame({"asin": pd.array(asins, dtype="str"), "item": np.arange(ds.n_items)})
    items = _items_table(item_map, None)
    if ds.item_images is not None:
        known = ds.item_images[ds.item_images["item"] < ds.n_items]
        urls = items["image_url"].to_numpy(dtype=object)
        urls[known["item"].to_numpy()] = known["image_url"].to_numpy(dtype=object)
        items["image_url"] = pd.array(urls, dtype="str")
    stats: dict[str, Any] = {
        "source": f"mmrec:{ds.name}",
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": n,
        **_split_stats(split),
        **_mmrec_feature_coverage(ds, items),
    }
    return InteractionsResult(interactions, items, user_map, item_map, stats)


def _mmrec_feature_coverage(ds: MMRecDataset, items: pd.DataFrame) -> dict[str, int]:
    """Items lacking what each modality is built from.

    A folder that ships ``image_feat.npy`` / ``text_feat.npy`` gives every item that modality (the rows are used as they
    are), so none is missing it; without the file, images come from ``item_images.csv`` URLs and texts from metadata,
    which a folder never has."""
    return {
        "items_without_meta": 0 if ds.text_feat is not None else ds.n_items,
        "items_without_image": 0 if ds.image_feat is not None else int((items["image_url"] == "").sum()),
    }
