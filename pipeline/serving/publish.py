"""Every user's top-K, in raw ids, written where downstream jobs read it; replaced atomically.

Why atomic and in this order: a downstream job may read ``recommendations.parquet`` at any moment, including while a
retrain replaces it. The table is written to a temporary file beside it, flushed, then renamed over it (one rename:
readers see the old file or the new one, never half of one); ``manifest.json`` follows the same way, and names the
table's sha256, so a reader that caught the two mid-swap can tell. A publisher killed before its rename leaves the
previous pair intact (its temporary file is removed by the next publish)."""

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
COLUMNS = ("user_id", "rank", "item_id", "score")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def top_k_table(inter: Artifact, data: Any, user_emb: Any, item_emb: Any, k: int) -> pd.DataFrame:
    """Every user's top ``k`` (training items masked) with raw ids: user_id, rank, item_id, score."""
    if k < 1:
        raise ConfigError(f"invalid k {k}: must be at least 1")
    recs = recommendations_table(user_emb, item_emb, data, k)
    users = pd.read_parquet(inter.file("user_map.parquet"), columns=["user", "user_id"])
    items = pd.read_parquet(inter.file("item_map.parquet"), columns=["item", "asin"])
    user_ids = np.empty(data.n_users, dtype=object)
    user_ids[users["user"].to_numpy()] = users["user_id"].astype(str).to_numpy()
    item_ids = np.empty(data.n_items, dtype=object)
    item_ids[items["item"].to_numpy()] = items["asin"].astype(str).to_numpy()
    return pd.DataFrame({
        "user_id": pd.array(user_ids[recs["user"].to_numpy()], dtype="string"),
        "rank": recs["rank"].to_numpy(np.int32),
        "item_id": pd.array(item_ids[recs["item"].to_numpy()], dtype="string"),
        "score": recs["score"].to_numpy(np.float32),
    })


def write_table(table: pd.DataFrame, out: Path) -> Path:
    """``table`` as Parquet at ``out``, atomically."""
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
