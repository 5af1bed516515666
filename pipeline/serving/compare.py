"""Challenger against champion on the new snapshot's validation split, over what both models know.

Why: the champion has no embedding for newer users and items, and the snapshots index them differently. So both rank the
same candidates for the users and items of both snapshots (by raw id), on validation pairs neither trained on."""

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


def _restricted(inter: Artifact, users: np.ndarray, items: np.ndarray) -> pd.DataFrame:
    """The snapshot's interactions of ``users`` and ``items``, re-indexed to their positions in those arrays."""
    frame = pd.read_parquet(inter.file("interactions.parquet"), columns=["user", "item", "split"])
    u_pos, i_pos = pd.Series(np.arange(len(users)), index=users), pd.Series(np.arange(len(items)), index=items)
    kept = frame[frame["user"].isin(u_pos.index) & frame["item"].isin(i_pos.index)]
    return pd.DataFrame({"user": u_pos.reindex(kept["user"]).to_numpy(np.int64),
                         "item": i_pos.reindex(kept["item"]).to_numpy(np.int64),
                         "split": kept["split"].to_numpy(np.int64)})


def shared_split(new_inter: Artifact, old_inter: Artifact) -> SharedSplit:
    """The new snapshot's split restricted to users and items of both snapshots (see the module doc)."""
    (new_u, new_i), (old_u, old_i) = id_maps(new_inter), id_maps(old_inter)
    (nu, ou), (ni, oi) = shared_indices(new_u, old_u), shared_indices(new_i, old_i)
    frame = _restricted(new_inter, nu, ni)
    # validation pairs the champion trained on (they would flatter it): translated to the shared indices, then dropped
    old = _restricted(old_inter, ou, oi)
    seen = old[old["split"] == 0]
    n_items = max(len(ni), 1)
    trained_before = np.isin(_pair_codes(frame, n_items), _pair_codes(seen, n_items))
    frame = frame[~((frame["split"] == 1) & trained_before)]
    return SharedSplit(SplitData.from_frame(frame, len(nu), len(ni)), nu, ni, ou, oi)


def compare_on_shared(shared: SharedSplit, challenger: tuple[Any, Any], champion: tuple[Any, Any],
                      metric: str) -> dict[str, Any]:
    """Both models' ``metric`` on the shared validation split (embeddings indexed by their snapshot), and its size."""
    k = int(metric.partition("@")[2])
    out: dict[str, Any] = {"metric": metric, "users": int(len(shared.new_users)), "items": int(len(shared.new_items)),
                           "valid_pairs": int(len(shared.data.valid))}
    if len(shared.data.valid) == 0:
        out.update(challenger_value=None, champion_value=None)
        return out
    import torch  # lazy: torch is slow to import; indexing the tensors keeps them on their device
    for name, (ue, ie), users, items in (("challenger", challenger, shared.new_users, shared.new_items),
                                         ("champion", champion, shared.old_users, shared.old_items)):
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
    result["relative_change"] = change = (new - old) / old
    if change < -max_drop:
        return False, f"challenger {metric} {new:.4f} is {-change:.1%} below the champion's {old:.4f} " \
                      f"(more than max_drop {max_drop:.1%}): the champion stays"
    return True, f"challenger {metric} {new:.4f} vs champion {old:.4f} ({change:+.1%}, max_drop {max_drop:.1%}): " \
                 "promoted"
