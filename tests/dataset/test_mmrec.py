"""MMRec folder I/O: round trip, separator sniffing, validation errors naming file and line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sand.pipeline.base.errors import DataError
from sand.pipeline.dataset.interactions import interactions_from_mmrec
from sand.pipeline.dataset.mmrec import read_mmrec_folder, write_mmrec_folder


def sample_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = pd.DataFrame(
        {
            "user": np.array([0, 0, 1, 1, 2, 2], dtype=np.int64),
            "item": np.array([0, 2, 1, 2, 0, 3], dtype=np.int64),
            "rating": np.array([5, 4, 3, 2, 1, 5], dtype=np.float32),
            "timestamp": np.array([10, 20, 30, 40, 50, 60], dtype=np.int64),
            "split": np.array([0, 2, 0, 1, 0, 2], dtype=np.int8),
        }
    )
    user_map = pd.DataFrame({"user_id": ["A1", "A2", "A3"], "user": [0, 1, 2]})
    item_map = pd.DataFrame({"asin": ["B0", "B1", "B2", "0000031852"], "item": [0, 1, 2, 3]})
    return inter, user_map, item_map


def test_round_trip(tmp_path):
    inter, user_map, item_map = sample_tables()
    text = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = write_mmrec_folder(tmp_path / "baby", "baby", inter, user_map, item_map, text_feat=text)
    header = (out / "baby.inter").read_text().splitlines()[0]
    assert header == "userID\titemID\trating\ttimestamp\tx_label"
    assert (out / "i_id_mapping.csv").read_text().splitlines()[:2] == ["asin\titemID", "B0\t0"]
    assert (out / "u_id_mapping.csv").read_text().splitlines()[:2] == ["user_id\tuserID", "A1\t0"]

    ds = read_mmrec_folder(out)
    assert ds.name == "baby" and ds.n_users == 3 and ds.n_items == 4
    pd.testing.assert_frame_equal(ds.inter[list(inter.columns)], inter)
    pd.testing.assert_frame_equal(ds.user_map, user_map, check_dtype=False)
    # Leading zeros in an asin survive (ids are read as text, not numbers).
    assert ds.item_map["asin"].tolist() == ["B0", "B1", "B2", "0000031852"]
    assert ds.text_feat == out / "text_feat.npy" and ds.image_feat is None
    np.testing.assert_array_equal(np.load(ds.text_feat), text)

    res = interactions_from_mmrec(ds)
    pd.testing.assert_frame_equal(res.interactions, inter)
    assert res.items["asin"].tolist() == ["B0", "B1", "B2", "0000031852"]
    assert res.stats["train"] == 3 and res.stats["valid"] == 1 and res.stats["test"] == 2


def test_minimal_mmrec_folder_with_comma_maps(tmp_path):
    (tmp_path / "toy.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n0\t1\t1\n1\t1\t2\n")
    (tmp_path / "i_id_mapping.csv").write_text("asin,itemID\nX9,1\nX8,0\n")
    (tmp_path / "item_images.csv").write_text("itemID,asin,imUrl\n0,X8,http://img/0.jpg\n1,X9,\n")
    ds = read_mmrec_folder(tmp_path)
    assert list(ds.inter.columns) == ["user", "item", "split"]
    assert ds.user_map is None and ds.n_users == 2 and ds.n_items == 2
    res = interactions_from_mmrec(ds)
    assert res.items["asin"].tolist() == ["X8", "X9"]
    assert res.items["image_url"].tolist() == ["http://img/0.jpg", ""]
    assert res.interactions["rating"].isna().all()
    assert res.interactions["split"].tolist() == [0, 1, 2]
    assert res.user_map["user_id"].tolist() == ["0", "1"]
    # Export of an import without ratings writes only the columns it has.
    out = write_mmrec_folder(tmp_path / "out", "toy", res.interactions.drop(columns=["rating", "timestamp"]))
    assert (out / "toy.inter").read_text().splitlines()[0] == "userID\titemID\tx_label"


def test_feature_shape_mismatch(tmp_path):
    inter, user_map, item_map = sample_tables()
    write_mmrec_folder(tmp_path, "d", inter, user_map, item_map)
    np.save(tmp_path / "image_feat.npy", np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(DataError, match=r"image_feat\.npy: shape \(3, 5\) does not match 4 items"):
        read_mmrec_folder(tmp_path)
    with pytest.raises(DataError, match="does not match 4 items"):
        write_mmrec_folder(tmp_path / "o", "d", inter, user_map, item_map, image_feat=np.zeros((5, 2)))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "userID\titemID\tx_label\n0\t0\t0\n1\t1\t3\n",
            r"d\.inter:3: field 'x_label' must be 0, 1 or 2, got '3'",
        ),
        (
            "userID\titemID\tx_label\n0\tabc\t0\n",
            r"d\.inter:2: field 'itemID' must be a non-negative integer",
        ),
        ("userID\titemID\tx_label\n-1\t0\t0\n", r"d\.inter:2: field 'userID'"),
        ("user\titemID\tx_label\n0\t0\t0\n", r"d\.inter: missing column 'userID'"),
        ("", "empty"),
    ],
)
def test_bad_inter_files(tmp_path, content, message):
    (tmp_path / "d.inter").write_text(content)
    with pytest.raises(DataError, match=message):
        read_mmrec_folder(tmp_path)


def test_folder_problems(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_mmrec_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no <name>.inter"):
        read_mmrec_folder(tmp_path)
    (tmp_path / "a.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n")
    (tmp_path / "b.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n")
    with pytest.raises(DataError, match="several .inter files"):
        read_mmrec_folder(tmp_path)
    inter, _, _ = sample_tables()
    with pytest.raises(DataError, match="invalid MMRec dataset name"):
        write_mmrec_folder(tmp_path / "x", "../evil", inter)


@pytest.mark.parametrize("ship", [(), ("image",), ("text",), ("image", "text")])
def test_import_counts_items_without_image_or_meta_by_what_the_folder_ships(tmp_path, ship):
    inter, user_map, item_map = sample_tables()
    feats = {f"{kind}_feat": np.ones((4, 3), np.float32) for kind in ship}
    out = write_mmrec_folder(tmp_path / "baby", "baby", inter, user_map, item_map, **feats)
    (out / "item_images.csv").write_text("itemID,asin,imUrl\n0,B0,http://x/0.jpg\n1,B1,\n")
    stats = interactions_from_mmrec(read_mmrec_folder(out)).stats
    # shipped features cover every item; otherwise images come from item_images.csv (2 of 4 items have none
    # listed, 1 an empty URL) and texts from metadata, which a folder never has
    assert stats["items_without_image"] == (0 if "image" in ship else 3)
    assert stats["items_without_meta"] == (0 if "text" in ship else 4)
