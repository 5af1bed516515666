"""Challenger against champion on the new snapshot's validation split, over what both models know.

Why a shared universe: the champion was trained on an older snapshot, so it has no embedding for a user or item that
arrived since, and the two snapshots index users and items differently. Both models are therefore scored on one
restricted split: the users and items present in both snapshots (matched by their raw ids), the new snapshot's training
items masked, and only validation pairs that neither model trained on (a pair in the champion's older training split
would flatter it). Each model ranks the same candidate items for the same users, so the two numbers compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.base.store import Artifact
from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.training.evaluation import evaluate_split
from sand.pipeline.training.warm_start import id_maps, shared_indices


@dataclass(frozen=True)
class SharedSplit:
    """The restricted split and, per snapshot, the index of each shared user and item in it."""

    data: SplitData
    new_users: np.ndarray
    new_items: np.ndarray
    old_users: np.ndarray
    old_items: np.ndarray


def _pair_codes(frame: pd.DataFrame, n_items: int) -> np.ndarray:
    return frame["user"].to_numpy(np.int64) * n_items + frame["item"].to_numpy(np.int64)


def shared_split(new_inter: Artifact, old_inter: Artifact) -> SharedSplit:
    """The new snapshot's split restricted to users and items of both snapshots (see the module doc)."""
    new_u, new_i = id_maps(new_inter)
    old_u, old_i = id_maps(old_inter)
    nu, ou = shared_indices(new_u, old_u)
    ni, oi = shared_indices(new_i, old_i)

    new_frame = pd.read_parquet(new_inter.file("interactions.parquet"), columns=["user", "item", "split"])
    u_pos = pd.Series(np.arange(len(nu)), index=nu)
    i_pos = pd.Series(np.arange(len(ni)), index=ni)
    keep = new_frame["user"].isin(u_pos.index) & new_frame["item"].isin(i_pos.index)
    frame = pd.DataFrame({
        "user": u_pos.reindex(new_frame.loc[keep, "user"]).to_numpy(np.int64),
        "item": i_pos.reindex(new_frame.loc[keep, "item"]).to_numpy(np.int64),
        "split": new_frame.loc[keep, "split"].to_numpy(np.int64),
    })
    # validation pairs the champion trained on: translated to the shared indices, then dropped
    old_frame = pd.read_parquet(old_inter.file("interactions.parquet"), columns=["user", "item", "split"])
    ou_pos, oi_pos = pd.Series(np.arange(len(ou)), index=ou), pd.Series(np.arange(len(oi)), index=oi)
    old_train = old_frame[(old_frame["split"] == 0) & old_frame["user"].isin(ou_pos.index)
                          & old_frame["item"].isin(oi_pos.index)]
    seen = pd.DataFrame({"user": ou_pos.reindex(old_train["user"]).to_numpy(np.int64),
                         "item": oi_pos.reindex(old_train["item"]).to_numpy(np.int64)})
    n_items = max(len(ni), 1)
    trained_before = np.isin(_pair_codes(frame, n_items), _pair_codes(seen, n_items))
    frame = frame[~((frame["split"] == 1) & trained_before)]
    return SharedSplit(SplitData.from_frame(frame, len(nu), len(ni)), nu, ni, ou, oi)


def compare_on_shared(
    shared: SharedSplit, challenger: tuple[Any, Any], champion: tuple[Any, Any], metric: str
) -> dict[str, Any]:
    """Both models' ``metric`` (``recall@K`` / ``ndcg@K``) on the shared validation split.

    ``challenger`` holds (user, item) embeddings indexed by the new snapshot, ``champion`` by the old one. Returns the
    two values and the size of what was compared."""
    k = int(metric.partition("@")[2])
    out: dict[str, Any] = {
        "metric": metric, "users": int(len(shared.new_users)), "items": int(len(shared.new_items)),
        "valid_pairs": int(len(shared.data.valid)),
    }
    if len(shared.data.valid) == 0:
        out.update(challenger_value=None, champion_value=None)
        return out
    import torch  # lazy: torch is slow to import; indexing the tensors keeps them on their device

    for name, (ue, ie), users, items in (
        ("challenger", challenger, shared.new_users, shared.new_items),
        ("champion", champion, shared.old_users, shared.old_items),
    ):
        sub_u = ue[torch.tensor(users, dtype=torch.long)]  # a copy: pandas hands out read-only arrays
        sub_i = ie[torch.tensor(items, dtype=torch.long)]
        out[f"{name}_value"] = evaluate_split(sub_u, sub_i, shared.data, "valid", ks=(k,))[metric]
    return out


def promotion_verdict(result: dict[str, Any], max_drop: float) -> tuple[bool, str]:
    """(promote?, why): promoted unless worse than the champion by more than ``max_drop`` (relative)."""
    new, old = result.get("challenger_value"), result.get("champion_value")
    if new is None or old is None:
        return True, "no validation pair shared by both models: the newer model is promoted"
    metric = result["metric"]
    if old <= 0:
        return True, f"champion {metric} is 0: the challenger is promoted"
    change = (new - old) / old
    result["relative_change"] = change
    if change < -max_drop:
        return False, f"challenger {metric} {new:.4f} is {-change:.1%} below the champion's {old:.4f} " \
                      f"(more than max_drop {max_drop:.1%}): the champion stays"
    return True, f"challenger {metric} {new:.4f} vs champion {old:.4f} ({change:+.1%}, max_drop {max_drop:.1%}): " \
                 "promoted"
