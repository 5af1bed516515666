"""Reading and writing MMRec dataset folders (``<name>.inter`` + id maps + feature arrays).

Why: published preprocessed data come in this format: importing one lets a user train on the exact graph and split of a
paper, exporting ours lets MMRec run on our output. As found in the wild: ``<name>.inter`` is tab-separated with a
header; MMRec reads only ``userID itemID x_label`` but ``rating``/``timestamp`` may be present. ``u_id_mapping.csv``
(``user_id -> userID``) and ``i_id_mapping.csv`` (``asin -> itemID``) are tab- or comma-separated depending on who wrote
them, so the separator is sniffed. ``image_feat.npy`` / ``text_feat.npy`` hold one row per item; ``item_images.csv``
(``itemID, asin, imUrl``), from some redistributions, lets the image stage fetch pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.base.errors import DataError, one_line

FEATURE_FILES = {"image": "image_feat.npy", "text": "text_feat.npy"}
_INTER_COLUMNS = {"userID": "user", "itemID": "item", "x_label": "split"}


@dataclass(frozen=True)
class MMRecDataset:
    """An MMRec folder in memory; ``inter`` has columns user, item, split [, rating, timestamp]."""

    path: Path
    name: str
    inter: pd.DataFrame
    n_users: int
    n_items: int
    user_map: pd.DataFrame | None = None  # columns user_id (str), user (int64)
    item_map: pd.DataFrame | None = None  # columns asin (str), item (int64)
    item_images: pd.DataFrame | None = None  # columns item (int64), image_url (str)
    image_feat: Path | None = None
    text_feat: Path | None = None


def _reject_first(bad: np.ndarray | pd.Series, df: pd.DataFrame, col: str, path: Path, problem: str) -> None:
    """If any row is bad, a DataError naming the first one's line (``row + 2``: after the header) and value."""
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}:{row + 2}: field {col!r} {problem} {df[col].iloc[row]!r}")


def _int_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() | (values < 0) | (values != values.round())
    _reject_first(bad, df, col, path, "must be a non-negative integer, got")
    return values.to_numpy(np.int64)


def _read_table(path: Path, required: list[str]) -> pd.DataFrame:
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
    if not header.strip():
        raise DataError(f"{path}: file is empty")
    try:
        df = pd.read_csv(path, sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse ({one_line(err)})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (header: {', '.join(df.columns)})")
    return df


def _read_map(path: Path, raw_col: str, id_col: str, out_col: str) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = _read_table(path, [raw_col, id_col])
    ids = _int_column(df, id_col, path)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: field {id_col!r} has duplicate ids")
    return pd.DataFrame({raw_col: df[raw_col].astype("str").to_numpy(), out_col: ids})


def _find_inter(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.inter"))
    if not candidates:
        raise DataError(f"{folder}: no <name>.inter file (not an MMRec dataset folder)")
    if len(candidates) > 1:
        raise DataError(f"{folder}: several .inter files ({', '.join(p.name for p in candidates)}); expected one")
    return candidates[0]


def _check_features(path: Path, n_items: int) -> Path:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if arr.ndim != 2 or arr.shape[0] != n_items:
        raise DataError(f"{path}: shape {tuple(arr.shape)} does not match {n_items} items (expected N x d)")
    return path


def read_mmrec_folder(path: str | Path) -> MMRecDataset:
    """Read an MMRec folder; validates ids, split codes, id maps and feature shapes. ``n_users`` / ``n_items`` cover
    every id in the interactions and the id maps (MMRec ids are contiguous from 0)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    inter_path = _find_inter(folder)
    df = _read_table(inter_path, list(_INTER_COLUMNS))
    inter = pd.DataFrame({new: _int_column(df, old, inter_path) for old, new in _INTER_COLUMNS.items()})
    _reject_first(~np.isin(inter["split"].to_numpy(), (0, 1, 2)), df, "x_label", inter_path, "must be 0, 1 or 2, got")
    inter["split"] = inter["split"].astype(np.int8)
    if "rating" in df.columns:
        rating = pd.to_numeric(df["rating"], errors="coerce")
        _reject_first(rating.isna(), df, "rating", inter_path, "is not a number:")
        inter["rating"] = rating.to_numpy(np.float32)
    if "timestamp" in df.columns:
        inter["timestamp"] = _int_column(df, "timestamp", inter_path)
    if len(inter) == 0:
        raise DataError(f"{inter_path}: no interactions")
    user_map = _read_map(folder / "u_id_mapping.csv", "user_id", "userID", "user")
    item_map = _read_map(folder / "i_id_mapping.csv", "asin", "itemID", "item")
    item_images = None
    if (img_path := folder / "item_images.csv").is_file():
        table = _read_table(img_path, ["itemID", "imUrl"])
        urls = table["imUrl"].astype("str").to_numpy()
        item_images = pd.DataFrame({"item": _int_column(table, "itemID", img_path), "image_url": urls})
    n_users = 1 + max(int(frame["user"].max()) for frame in (inter, user_map) if frame is not None)
    n_items = 1 + max(int(frame["item"].max()) for frame in (inter, item_map) if frame is not None)
    feats = {kind: _check_features(folder / f, n_items) for kind, f in FEATURE_FILES.items() if (folder / f).is_file()}
    return MMRecDataset(
        path=folder, name=inter_path.stem, inter=inter, n_users=n_users, n_items=n_items, user_map=user_map,
        item_map=item_map, item_images=item_images, image_feat=feats.get("image"), text_feat=feats.get("text"),
    )


def write_mmrec_folder(
    out_dir: str | Path, name: str, interactions: pd.DataFrame, user_map: pd.DataFrame | None = None,
    item_map: pd.DataFrame | None = None, *, image_feat: np.ndarray | None = None, text_feat: np.ndarray | None = None,
) -> Path:
    """Write ``<name>.inter`` (+ id maps and feature arrays if given) in MMRec's tab-separated layout; return the
    folder. ``rating``/``timestamp`` columns are written when present, as MMRec's own preprocessing does."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"invalid MMRec dataset name {name!r}")
    missing = [c for c in ("user", "item", "split") if c not in interactions.columns]
    if missing:
        raise DataError(f"interactions table lacks column {missing[0]!r}")
    # Validate everything before writing anything, so a bad call leaves no half-written folder.
    n_items = int(interactions["item"].max()) + 1 if len(interactions) else 0
    if item_map is not None and len(item_map):
        n_items = max(n_items, int(item_map["item"].max()) + 1)
    given = {"image": image_feat, "text": text_feat}
    features = [(arr, FEATURE_FILES[kind]) for kind, arr in given.items() if arr is not None]
    for arr, fname in features:
        if arr.ndim != 2 or arr.shape[0] != n_items:
            raise DataError(f"{fname}: shape {tuple(arr.shape)} does not match {n_items} items")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optional = {col: col for col in ("rating", "timestamp") if col in interactions.columns}
    cols = {"user": "userID", "item": "itemID", **optional, "split": "x_label"}
    tsv: dict[str, Any] = {"sep": "\t", "index": False}
    interactions[list(cols)].rename(columns=cols).to_csv(out / f"{name}.inter", **tsv)
    if user_map is not None:
        user_map[["user_id", "user"]].rename(columns={"user": "userID"}).to_csv(out / "u_id_mapping.csv", **tsv)
    if item_map is not None:
        item_map[["asin", "item"]].rename(columns={"item": "itemID"}).to_csv(out / "i_id_mapping.csv", **tsv)
    for arr, fname in features:
        np.save(out / fname, np.ascontiguousarray(arr))
    return out
