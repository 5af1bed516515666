"""Challenger vs champion: the shared universe, the pairs left out, and the promotion rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sand.pipeline.base.store import ArtifactStore
from sand.pipeline.serving.compare import compare_on_shared, promotion_verdict, shared_split


def snapshot(store: ArtifactStore, users: list[str], items: list[str], rows: list[tuple[str, str, int]]):
    """An interactions artifact with raw ids mapped to indices in the order given."""
    u = {name: i for i, name in enumerate(users)}
    i = {name: j for j, name in enumerate(items)}
    frame = pd.DataFrame([(u[a], i[b], s) for a, b, s in rows], columns=["user", "item", "split"])

    def build(out: Path) -> dict:
        frame.to_parquet(out / "interactions.parquet", index=False)
        pd.DataFrame({"user_id": users, "user": range(len(users))}).to_parquet(out / "user_map.parquet")
        pd.DataFrame({"asin": items, "item": range(len(items))}).to_parquet(out / "item_map.parquet")
        return {"stats": {"users": len(users), "items": len(items)}}

    return store.run("interactions", "1", {"users": users, "items": items, "rows": rows}, {}, build).artifact


def test_shared_split_keeps_what_both_know_and_drops_what_the_champion_trained_on(tmp_path):
    store = ArtifactStore(tmp_path)
    old = snapshot(store, ["bo", "al"], ["i2", "i1", "i3"],
                   [("al", "i1", 0), ("al", "i3", 0), ("bo", "i2", 0), ("bo", "i1", 1)])
    new = snapshot(store, ["al", "bo", "cy"], ["i1", "i2", "i3", "i4"],
                   [("al", "i1", 0), ("al", "i2", 1), ("al", "i3", 1), ("bo", "i2", 0), ("bo", "i3", 1),
                    ("cy", "i4", 1), ("al", "i4", 1)])
    shared = shared_split(new, old)
    # users al, bo and items i1..i3 (sorted by raw id); cy and i4 are new
    assert shared.new_users.tolist() == [0, 1] and shared.old_users.tolist() == [1, 0]
    assert shared.new_items.tolist() == [0, 1, 2] and shared.old_items.tolist() == [1, 0, 2]
    assert shared.data.train.tolist() == [[0, 0], [1, 1]]
    # (al, i3) was in the champion's training split: left out of the comparison
    assert sorted(shared.data.valid.tolist()) == [[0, 1], [1, 2]]

    # a champion that knows the answer and a challenger that ranks it last
    champion_u = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # old order: bo, al
    champion_i = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i2, i1, i3
    challenger_u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    challenger_i = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.0], [0.0, 1.0]])
    result = compare_on_shared(shared, (challenger_u, challenger_i), (champion_u, champion_i), "recall@1")
    assert result["champion_value"] == 1.0 and result["challenger_value"] == 0.0
    assert result["users"] == 2 and result["items"] == 3 and result["valid_pairs"] == 2
    promoted, reason = promotion_verdict(result, max_drop=0.05)
    assert not promoted and "champion stays" in reason and result["relative_change"] == -1.0


@pytest.mark.parametrize(("new", "old", "max_drop", "promoted"), [
    (0.96, 1.0, 0.05, True),  # a 4% drop is within 5%
    (0.94, 1.0, 0.05, False),
    (0.94, 1.0, 0.10, True),
    (1.20, 1.0, 0.0, True),
    (0.10, 0.0, 0.05, True),  # nothing to lose against a zero champion
    (None, None, 0.05, True),  # no shared validation pair
])
def test_promotion_rule(new, old, max_drop, promoted):
    result = {"metric": "recall@20", "challenger_value": new, "champion_value": old}
    assert promotion_verdict(result, max_drop)[0] is promoted


def test_no_shared_validation_pair_means_no_values(tmp_path):
    store = ArtifactStore(tmp_path)
    old = snapshot(store, ["a"], ["x", "y"], [("a", "x", 0), ("a", "y", 1)])
    new = snapshot(store, ["b"], ["x", "y"], [("b", "x", 0), ("b", "y", 1)])
    result = compare_on_shared(shared_split(new, old), (torch.ones(1, 2), torch.ones(2, 2)),
                               (torch.ones(1, 2), torch.ones(2, 2)), "recall@20")
    assert result["challenger_value"] is None and result["users"] == 0
    assert np.isclose(0, result["valid_pairs"])
