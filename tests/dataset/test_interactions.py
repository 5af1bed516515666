"""The pure interactions transform: dedup -> k-core -> re-index -> split -> metadata join."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.dataset.interactions import build_interactions, interactions_from_mmrec
from sand.pipeline.dataset.mmrec import read_mmrec_folder, write_mmrec_folder
from sand.pipeline.dataset.readers import read_meta, read_reviews
from sand.pipeline.dataset.splits import split_counts


def block_reviews(n_users: int = 12, n_items: int = 8, seed: int = 0) -> pd.DataFrame:
    """Every user reviews every item (a dense block survives any k-core up to its size)."""
    rng = np.random.default_rng(seed)
    users = np.repeat([f"U{u:03d}" for u in range(n_users)], n_items)
    items = np.tile([f"B{i:03d}" for i in range(n_items)], n_users)
    return pd.DataFrame(
        {
            "user_id": users,
            "asin": items,
            "rating": rng.integers(1, 6, len(users)).astype(np.float32),
            "timestamp": rng.integers(1_000_000, 2_000_000, len(users)),
        }
    )


def test_build_dedup_kcore_reindex_split():
    core = block_reviews()
    extras = pd.DataFrame(
        {
            # duplicate of a core pair with a later timestamp (must win), a fringe user and item
            "user_id": ["U000", "ZZZ", "U001"],
            "asin": ["B000", "B000", "B999"],
            "rating": np.array([1.0, 5.0, 5.0], dtype=np.float32),
            "timestamp": [3_000_000, 5, 6],
        }
    )
    reviews = pd.concat([extras, core], ignore_index=True)
    res = build_interactions(reviews, None, k_core=5, seed=1)
    inter = res.interactions
    assert res.stats["raw_reviews"] == len(reviews)
    assert res.stats["duplicates_removed"] == 1
    assert res.stats["kcore_rounds"] == 1 and res.stats["kcore_removed"] == 2
    assert (res.stats["users"], res.stats["items"], res.stats["interactions"]) == (12, 8, 96)
    assert dict(inter.dtypes.astype(str)) == {
        "user": "int64",
        "item": "int64",
        "rating": "float32",
        "timestamp": "int64",
        "split": "int8",
    }
    # Ids follow the sorted raw ids.
    assert res.user_map["user_id"].tolist() == [f"U{u:03d}" for u in range(12)]
    assert res.item_map["asin"].tolist() == [f"B{i:03d}" for i in range(8)]
    assert res.user_map["user"].tolist() == list(range(12))
    # The later duplicate won.
    first = inter[(inter.user == 0) & (inter.item == 0)]
    assert first["timestamp"].tolist() == [3_000_000] and first["rating"].tolist() == [1.0]
    # Split per user follows the mmrec rule; counts in stats.
    for _, group in inter.groupby("user"):
        assert tuple(np.bincount(group["split"], minlength=3)) == tuple(
            int(x[0]) for x in split_counts(np.array([len(group)]), "mmrec")
        )
    assert res.stats["train"] + res.stats["valid"] + res.stats["test"] == 96
    assert res.stats["items_without_meta"] == 8


def test_build_is_deterministic_and_seeded():
    reviews = block_reviews(20, 10)
    a = build_interactions(reviews, None, seed=3)
    b = build_interactions(reviews.sample(frac=1.0, random_state=5), None, seed=3)
    c = build_interactions(reviews, None, seed=4)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert (a.interactions["split"] != c.interactions["split"]).any()


def test_metadata_join_and_parquet(tmp_path):
    reviews = block_reviews(6, 5)
    meta = pd.DataFrame(
        {
            "asin": ["B001", "B000", "B001", "NOTREVIEWED"],
            "title": ["Second", "First", "dup ignored", "x"],
            "brand": ["b1", "b0", "", ""],
            "categories": [["Baby", "Toys"], ["Baby"], [], []],
            "description": ["d1", "d0", "", ""],
            "features": ["", "", "", ""],
            "image_url": ["http://i/1.jpg", "", "", ""],
        }
    )
    res = build_interactions(reviews, meta)
    items = res.items
    assert items["item"].tolist() == [0, 1, 2, 3, 4]
    assert items["has_meta"].tolist() == [True, True, False, False, False]
    assert items["title"].tolist()[:3] == ["First", "Second", ""]
    assert [list(c) for c in items["categories"]] == [["Baby"], ["Baby", "Toys"], [], [], []]
    assert res.stats["items_without_meta"] == 3 and res.stats["items_without_image"] == 4
    items.to_parquet(tmp_path / "items.parquet")
    back = pd.read_parquet(tmp_path / "items.parquet")
    assert [list(c) for c in back["categories"]] == [["Baby"], ["Baby", "Toys"], [], [], []]


def test_empty_after_kcore_is_a_data_error():
    reviews = block_reviews(4, 4)
    with pytest.raises(DataError, match=r"no interactions left after 5-core filtering \(16 reviews in"):
        build_interactions(reviews, None, k_core=5)
    assert build_interactions(reviews, None, k_core=4).stats["interactions"] == 16


def test_bad_arguments():
    reviews = block_reviews(6, 6)
    with pytest.raises(ConfigError, match="valid rules"):
        build_interactions(reviews, None, split_rule="nope")
    with pytest.raises(ConfigError, match="k_core"):
        build_interactions(reviews, None, k_core=-1)
    with pytest.raises(DataError, match="lacks column 'timestamp'"):
        build_interactions(reviews.drop(columns=["timestamp"]), None)
    with pytest.raises(DataError, match="no reviews"):
        build_interactions(reviews.iloc[:0], None)


def test_raw_files_to_mmrec_folder_and_back(tmp_path):
    """Readers -> build -> MMRec export -> import keeps ids, split and asins."""
    lines = [
        json.dumps({"reviewerID": f"U{u}", "asin": f"B{i}", "overall": 5.0, "unixReviewTime": 100 * u + i})
        for u in range(7)
        for i in range(6)
    ]
    rpath = tmp_path / "reviews.json.gz"
    rpath.write_bytes(gzip.compress("\n".join(lines).encode()))
    mpath = tmp_path / "meta.json"
    mpath.write_text("\n".join(f"{{'asin': 'B{i}', 'title': 'item {i}', 'categories': [['Baby']]}}" for i in range(6)))
    reviews, _ = read_reviews(rpath, "amazon2014")
    meta, _ = read_meta(mpath, "amazon2014")
    res = build_interactions(reviews, meta, split_rule="chronological")
    assert res.items["has_meta"].all()
    # chronological: each user's latest item (B5) is test, the one before (B4) valid.
    test_items = res.interactions.loc[res.interactions["split"] == 2, "item"].unique().tolist()
    assert test_items == [5]

    out = write_mmrec_folder(tmp_path / "mm", "toy", res.interactions, res.user_map, res.item_map)
    back = interactions_from_mmrec(read_mmrec_folder(out))
    pd.testing.assert_frame_equal(back.interactions, res.interactions)
    pd.testing.assert_frame_equal(back.item_map, res.item_map, check_dtype=False)
    pd.testing.assert_frame_equal(back.user_map, res.user_map, check_dtype=False)
