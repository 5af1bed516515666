"""`sand export mmrec` extras that MMRec-family code needs: the user graph, the dataset yaml, the width warning."""

from __future__ import annotations

import numpy as np
import yaml

from sand.pipeline.dataset.export import (
    MMREC_IMAGE_DIM,
    co_interaction_user_graph,
    image_width_warning,
    mmrec_dataset_yaml,
)


def _brute_force(users, items, n_users):
    baskets = [set() for _ in range(n_users)]
    for u, i in zip(users, items, strict=True):
        baskets[u].add(i)
    return {
        u: {v: len(baskets[u] & baskets[v]) for v in range(n_users) if v != u and baskets[u] & baskets[v]}
        for u in range(n_users)
    }


def test_user_graph_is_mmrec_format_ordered_by_shared_items():
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 25
    users = rng.integers(0, n_users - 2, 400)  # the last two users have no items at all
    items = rng.integers(0, n_items, 400)
    graph = co_interaction_user_graph(users, items, n_users)
    expected = _brute_force(users, items, n_users)
    assert sorted(graph) == list(range(n_users))  # every user has an entry, as MMRec indexes graph[i]
    assert graph[n_users - 1] == [[], []]
    for user, (neighbours, weights) in graph.items():
        assert isinstance(neighbours, list) and isinstance(weights, list)
        assert all(isinstance(w, float) for w in weights)
        assert user not in neighbours
        assert dict(zip(neighbours, weights, strict=True)) == expected[user]
        # most shared items first; ties by the smaller user id
        keys = [(-w, n) for n, w in zip(neighbours, weights, strict=True)]
        assert keys == sorted(keys)


def test_user_graph_keeps_at_most_max_neighbours_and_counts_repeats_once():
    users = np.array([0, 0, 0] + [u for u in range(1, 8) for _ in range(2)])
    items = np.array([5, 5, 6] + [5, 6] * 7)
    graph = co_interaction_user_graph(users, items, 8, max_neighbours=3)
    neighbours, weights = graph[0]
    assert neighbours == [1, 2, 3] and weights == [2.0, 2.0, 2.0]  # item 5 twice for user 0 counts once


def test_user_graph_survives_numpy_round_trip(tmp_path):
    graph = co_interaction_user_graph(np.array([0, 1, 2]), np.array([0, 0, 1]), 3)
    np.save(tmp_path / "user_graph_dict.npy", np.array(graph, dtype=object), allow_pickle=True)
    loaded = np.load(tmp_path / "user_graph_dict.npy", allow_pickle=True).item()  # how MMRec reads it
    assert loaded == {0: [[1], [1.0]], 1: [[0], [1.0]], 2: [[], []]}


def test_dataset_yaml_names_the_folder_files():
    text = mmrec_dataset_yaml("baby", {"baby.inter", "image_feat.npy", "user_graph_dict.npy"}, has_timestamp=True)
    config = yaml.safe_load(text)
    assert config["inter_file_name"] == "baby.inter"
    assert config["vision_feature_file"] == "image_feat.npy"
    assert "text_feature_file" not in config  # no text features exported: MMRec must not look for them
    assert config["user_graph_dict_file"] == "user_graph_dict.npy"
    assert config["USER_ID_FIELD"] == "userID" and config["ITEM_ID_FIELD"] == "itemID"
    assert config["field_separator"] == "\t"


def test_width_warning_only_when_not_4096():
    assert image_width_warning(MMREC_IMAGE_DIM) is None and image_width_warning(None) is None
    line = image_width_warning(512)
    assert line is not None and "512-d" in line and "\n" not in line
