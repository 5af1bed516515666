"""Warm start: a new model initialised from an older one for the users and items both know.

A scheduled retrain on a grown snapshot mostly sees users and items the champion has learnt; starting their rows from
its weights may reach its quality in fewer epochs (``benchmarks/bench_warm_start.py``). They are matched by raw id (the
snapshots index them differently): a weight whose first dimension is the user (item) count in both models has its shared
rows copied, one with the same shape in both is copied whole, the rest keep their fresh initialisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact, ArtifactStore
from sand.pipeline.stage_context import dataset_counts
from sand.pipeline.training.checkpoints import read_checkpoint


def id_maps(inter: Artifact) -> tuple[pd.Series, pd.Series]:
    """(raw user id -> index, raw item id -> index) of an interactions artifact."""
    users = pd.read_parquet(inter.file("user_map.parquet"), columns=["user_id", "user"])
    items = pd.read_parquet(inter.file("item_map.parquet"), columns=["asin", "item"])
    return (pd.Series(users["user"].to_numpy(np.int64), index=users["user_id"].astype(str)),
            pd.Series(items["item"].to_numpy(np.int64), index=items["asin"].astype(str)))


def shared_indices(new: pd.Series, old: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(index in new, index in old) of every raw id both maps hold, sorted by raw id."""
    ids = new.index.intersection(old.index).sort_values()
    return new[ids].to_numpy(np.int64), old[ids].to_numpy(np.int64)


def warm_state(new_state: dict[str, Any], old_state: dict[str, Any], rows: dict[str, tuple[int, int, Any, Any]]
               ) -> tuple[dict[str, Any], dict[str, int]]:
    """``new_state`` with what ``old_state`` knows copied in (see the module doc), and the copy counts. ``rows``:
    ``"user"``/``"item"`` -> (count in new, count in old, new indices, old indices); a weight whose first dimension
    matches both kinds is told apart by ``user``/``item`` in its name."""
    import torch  # lazy: torch takes seconds to import

    out = dict(new_state)
    copied = {"whole": 0, "user_rows": 0, "item_rows": 0}
    for name, new in new_state.items():
        old = old_state.get(name)
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor) or not new.ndim:
            continue
        kinds = [k for k, (n_new, n_old, _, _) in rows.items()
                 if new.shape[0] == n_new and old.shape[0] == n_old and new.shape[1:] == old.shape[1:]]
        if len(kinds) > 1:
            kinds = [k for k in kinds if k in name.lower()]
        if len(kinds) == 1:
            _, _, new_idx, old_idx = rows[kinds[0]]
            merged = new.clone()
            # torch.tensor copies: the indices come from pandas as read-only arrays
            merged[torch.tensor(new_idx)] = old[torch.tensor(old_idx)].to(new.dtype)
            out[name] = merged
            copied[f"{kinds[0]}_rows"] += len(new_idx)
        elif old.shape == new.shape:
            out[name] = old.to(new.dtype).clone()
            copied["whole"] += 1
    return out, copied


def warm_start(model: Any, inter: Artifact, store: ArtifactStore, champion_train_key: str) -> dict[str, int]:
    """Initialise ``model`` (built for ``inter``) from the trained run ``champion_train_key``; returns the counts."""
    trained = store.lookup("train", champion_train_key)
    old_inter_key = (trained.manifest.get("inputs", {}).get("interactions", {}).get("key") if trained else None)
    old_inter = store.lookup("interactions", old_inter_key) if old_inter_key else None
    if trained is None or old_inter is None:
        raise StageError(f"warm start: the trained run {champion_train_key} or its interactions is not in {store.root}")
    checkpoint = read_checkpoint(trained.file("best.pt"))
    old_state = checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint
    new_users, new_items = id_maps(inter)
    old_users, old_items = id_maps(old_inter)
    (n_users, n_items), (o_users, o_items) = dataset_counts(inter), dataset_counts(old_inter)
    rows = {"user": (n_users, o_users, *shared_indices(new_users, old_users)),
            "item": (n_items, o_items, *shared_indices(new_items, old_items))}
    state, copied = warm_state(model.state_dict(), old_state, rows)
    model.load_state_dict(state)
    return copied
