"""A user's top-K recommendations from a trained run, with item titles. A fresh forward pass: ``sand recommend`` follows
the evaluator's rule (score in eval mode, mask the user's training items)."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from sand.pipeline.base.config import TrainConfig
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.store import Artifact
from sand.pipeline.training.evaluation import recommendations_table
from sand.pipeline.training.model_io import trained_embeddings


def resolve_user(user: str, user_map: pd.DataFrame, n_users: int) -> int:
    """A raw reviewerID, or failing that a 0-based user index."""
    match = user_map.loc[user_map["user_id"].astype(str) == user, "user"]
    if len(match):
        return int(match.iloc[0])
    if user.isdigit() and int(user) < n_users:
        return int(user)
    raise ConfigError(f"unknown user {user!r}: not a user id of this dataset nor an index below {n_users}")


def recommend_for_user(tcfg: TrainConfig, artifacts: Mapping[str, Artifact], user: str, k: int) -> pd.DataFrame:
    """``user``'s top ``k`` items from a run's artifacts (stage name -> artifact, up to ``train``)."""
    if k < 1:
        raise ConfigError(f"invalid -k {k}: must be at least 1")
    inter, trained = artifacts["interactions"], artifacts["train"]
    features = {s: artifacts[s] for s in ("text_features", "image_features", "graphs") if s in artifacts}
    data, user_emb, item_emb = trained_embeddings(tcfg, inter, trained, features)
    idx = resolve_user(user, pd.read_parquet(inter.file("user_map.parquet")), data.n_users)
    recs = recommendations_table(user_emb, item_emb, data, k, users=[idx])
    items = pd.read_parquet(inter.file("items.parquet"))
    keep = [c for c in ("item", "asin", "title") if c in items.columns]
    return recs.merge(items[keep], on="item", how="left").sort_values("rank")
