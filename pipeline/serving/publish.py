"""Every user's top-K, in raw ids, written where downstream jobs read it; replaced atomically.

Why: a downstream job may read ``recommendations.parquet`` at any moment. The table and then ``manifest.json`` (naming
the table's sha256, so a reader caught mid-swap can tell) are each written beside their target and renamed over it:
readers see the old file or the new, never half of one."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.files import atomic_path, sha256_file, write_json_atomic
from sand.pipeline.base.store import Artifact
from sand.pipeline.training.evaluation import recommendations_table

PUBLISHED_DIR = "published"
TABLE_NAME = "recommendations.parquet"
MANIFEST_NAME = "manifest.json"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def top_k_table(inter: Artifact, data: Any, user_emb: Any, item_emb: Any, k: int) -> pd.DataFrame:
    """Every user's top ``k`` (training items masked) with raw ids: user_id, rank, item_id, score."""
    if k < 1:
        raise ConfigError(f"invalid k {k}: must be at least 1")
    recs = recommendations_table(user_emb, item_emb, data, k)
    user_ids = pd.read_parquet(inter.file("user_map.parquet"), columns=["user", "user_id"]).set_index("user")["user_id"]
    item_ids = pd.read_parquet(inter.file("item_map.parquet"), columns=["item", "asin"]).set_index("item")["asin"]
    return pd.DataFrame({
        "user_id": pd.array(user_ids.astype(str).reindex(recs["user"]).to_numpy(), dtype="string"),
        "rank": recs["rank"].to_numpy(np.int32),
        "item_id": pd.array(item_ids.astype(str).reindex(recs["item"]).to_numpy(), dtype="string"),
        "score": recs["score"].to_numpy(np.float32),
    })


def write_table(table: pd.DataFrame, out: Path) -> Path:
    with atomic_path(out, suffix=".parquet") as tmp:
        table.to_parquet(tmp, index=False)
    return out


def published_dir(data_root: Path, dataset: str) -> Path:
    if not _SAFE.match(dataset):
        raise ConfigError(f"dataset name {dataset!r} cannot name a folder under {PUBLISHED_DIR}/")
    return Path(data_root) / PUBLISHED_DIR / dataset


def publish(folder: Path, table: pd.DataFrame, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Replace ``folder``'s table and manifest (see the module doc); returns the manifest written."""
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".publish.lock")):
        for stale in folder.glob(f".{TABLE_NAME}.*"):  # left by a publisher killed before its rename
            stale.unlink(missing_ok=True)
        target = write_table(table, folder / TABLE_NAME)
        written = {**manifest, "rows": len(table), "users": int(table["user_id"].nunique()),
                   "table": TABLE_NAME, "sha256": sha256_file(target)}
        write_json_atomic(folder / MANIFEST_NAME, written)
    return written
