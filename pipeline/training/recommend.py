"""A user's top-K recommendations from a trained run, with item titles.

Why a fresh forward pass: the evaluator's rule (score in eval mode, mask the
user's training items) is what users expect ``sand recommend`` to follow too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sand.pipeline.config import PipelineConfig
from sand.pipeline.errors import ConfigError
from sand.pipeline.store import Artifact


def _artifact(summary: dict[str, Any], stage: str) -> Artifact:
    import json

    path = Path(summary["stages"][stage]["artifact"])
    return Artifact(stage, path.name, path, json.loads((path / "manifest.json").read_text()))


def resolve_user(user: str, user_map: pd.DataFrame, n_users: int) -> int:
    """A raw reviewerID, or failing that a 0-based user index."""
    match = user_map.loc[user_map["user_id"].astype(str) == user, "user"]
    if len(match):
        return int(match.iloc[0])
    if user.isdigit() and int(user) < n_users:
        return int(user)
    raise ConfigError(f"unknown user {user!r}: not a user id of this dataset nor an index below {n_users}")


def recommend_for_user(cfg: PipelineConfig, summary: dict[str, Any], user: str, k: int) -> pd.DataFrame:
    from sand.pipeline.stages import Context, trained_embeddings
    from sand.pipeline.training.evaluation import recommendations_table

    if k < 1:
        raise ConfigError(f"invalid -k {k}: must be at least 1")
    inter = _artifact(summary, "interactions")
    trained = _artifact(summary, "train")
    features = {s: _artifact(summary, s) for s in ("text_features", "image_features", "graphs")
                if s in summary["stages"]}
    data, user_emb, item_emb = trained_embeddings(Context.create(cfg), inter, trained, features)
    idx = resolve_user(user, pd.read_parquet(inter.file("user_map.parquet")), data.n_users)
    recs = recommendations_table(user_emb, item_emb, data, k, users=[idx])
    items = pd.read_parquet(inter.file("items.parquet"))
    keep = [c for c in ("item", "asin", "title") if c in items.columns]
    return recs.merge(items[keep], on="item", how="left").sort_values("rank")
