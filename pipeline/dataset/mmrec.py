"""Reading and writing MMRec dataset folders (``<name>.inter`` + id maps + feature arrays).

Why: MMRec's folder format is how published preprocessed data (and MMRec's 20+ baselines) exchange datasets. Importing
one lets a user train on the exact graph and split of a paper; exporting ours lets MMRec run on our output.

The format as found in the wild: ``<name>.inter`` is tab-separated with a header; MMRec reads only ``userID itemID
x_label`` but ``rating``/``timestamp`` columns may be present. ``u_id_mapping.csv`` (``user_id -> userID``) and
``i_id_mapping.csv`` (``asin -> itemID``) are tab- or comma-separated depending on who wrote them, so the separator is
sniffed. ``image_feat.npy`` / ``text_feat.npy`` hold one row per item. Some redistributions add ``item_images.csv``
(``itemID, asin, imUrl``); it is read when present so the image stage can fetch the pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def _sniff_sep(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
    if not header.strip():
        raise DataError(f"{path}: file is empty")
    return "\t" if "\t" in header else ","


def _int_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    """The column as non-negative int64, or a DataError naming the first bad line and value."""
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() | (values < 0) | (values != values.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}:{row + 2}: field {col!r} must be a non-negative integer, got {df[col].iloc[row]!r}")
    return values.to_numpy(np.int64)


def _read_table(path: Path, required: list[str]) -> pd.DataFrame:
    sep = _sniff_sep(path)
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse ({one_line(err)})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (header: {', '.join(df.columns)})")
    return df


def _read_map(path: Path, raw_col: str, id_col: str, new_col: str, out_col: str) -> pd.DataFrame:
    df = _read_table(path, [raw_col, id_col])
    ids = _int_column(df, id_col, path)
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: field {id_col!r} has duplicate ids")
    return pd.DataFrame({new_col: df[raw_col].astype("str").to_numpy(), out_col: ids})


def _find_inter(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.inter"))
    if not candidates:
        raise DataError(f"{folder}: no <name>.inter file (not an MMRec dataset folder)")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(f"{folder}: several .inter files ({names}); expected one")
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
    """Read an MMRec folder; validates ids, split codes, id maps and feature shapes.

    ``n_users`` / ``n_items`` cover every id in the interactions and the id maps (MMRec ids are contiguous from 0);
    feature arrays must have ``n_items`` rows."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    inter_path = _find_inter(folder)
    df = _read_table(inter_path, list(_INTER_COLUMNS))
    inter = pd.DataFrame({new: _int_column(df, old, inter_path) for old, new in _INTER_COLUMNS.items()})
    bad_split = ~np.isin(inter["split"].to_numpy(), (0, 1, 2))
    if bad_split.any():
        row = int(np.flatnonzero(bad_split)[0])
        raise DataError(f"{inter_path}:{row + 2}: field 'x_label' must be 0, 1 or 2, got {df['x_label'].iloc[row]!r}")
    inter["split"] = inter["split"].astype(np.int8)
    if "rating" in df.columns:
        rating = pd.to_numeric(df["rating"], errors="coerce")
        if rating.isna().any():
            row = int(np.flatnonzero(rating.isna().to_numpy())[0])
            value = df["rating"].iloc[row]
            raise DataError(f"{inter_path}:{row + 2}: field 'rating' is not a number: {value!r}")
        inter["rating"] = rating.to_numpy(np.float32)
    if "timestamp" in df.columns:
        inter["timestamp"] = _int_column(df, "timestamp", inter_path)
    if len(inter) == 0:
        raise DataError(f"{inter_path}: no interactions")

    user_map = item_map = item_images = None
    u_path, i_path = folder / "u_id_mapping.csv", folder / "i_id_mapping.csv"
    img_path = folder / "item_images.csv"
    if u_path.is_file():
        user_map = _read_map(u_path, "user_id", "userID", "user_id", "user")
    if i_path.is_file():
        item_map = _read_map(i_path, "asin", "itemID", "asin", "item")
    if img_path.is_file():
        table = _read_table(img_path, ["itemID", "imUrl"])
        urls = table["imUrl"].astype("str").to_numpy()
        item_images = pd.DataFrame({"item": _int_column(table, "itemID", img_path), "image_url": urls})

    n_users = int(inter["user"].max()) + 1
    n_items = int(inter["item"].max()) + 1
    if user_map is not None:
        n_users = max(n_users, int(user_map["user"].max()) + 1)
    if item_map is not None:
        n_items = max(n_items, int(item_map["item"].max()) + 1)

    feats = {
        kind: _check_features(folder / name, n_items)
        for kind, name in FEATURE_FILES.items()
        if (folder / name).is_file()
    }
    return MMRecDataset(
        path=folder, name=inter_path.stem, inter=inter, n_users=n_users, n_items=n_items, user_map=user_map,
        item_map=item_map, item_images=item_images, image_feat=feats.get("image"), text_feat=feats.get("text"),
    )


def write_mmrec_folder(
    out_dir: str | Path, name: str, interactions: pd.DataFrame, user_map: pd.DataFrame | None = None,
    item_map: pd.DataFrame | None = None, *, image_feat: np.ndarray | None = None, text_feat: np.ndarray | None = None,
) -> Path:
    """Write ``<name>.inter`` (+ id maps, + feature arrays if given) in MMRec's tab-separated layout.

    ``interactions`` has user, item, split and optionally rating, timestamp (written when present, as MMRec's own
    preprocessing does). Returns the folder."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"invalid MMRec dataset name {name!r}")
    missing = [c for c in ("user", "item", "split") if c not in interactions.columns]
    if missing:
        raise DataError(f"interactions table lacks column {missing[0]!r}")
    # Validate everything before writing anything, so a bad call leaves no half-written folder.
    n_items = int(interactions["item"].max()) + 1 if len(interactions) else 0
    if item_map is not None and len(item_map):
        n_items = max(n_items, int(item_map["item"].max()) + 1)
    features = [
        (arr, fname)
        for arr, fname in ((image_feat, FEATURE_FILES["image"]), (text_feat, FEATURE_FILES["text"]))
        if arr is not None
    ]
    for arr, fname in features:
        if arr.ndim != 2 or arr.shape[0] != n_items:
            raise DataError(f"{fname}: shape {tuple(arr.shape)} does not match {n_items} items")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = {"user": "userID", "item": "itemID"}
    for optional in ("rating", "timestamp"):
        if optional in interactions.columns:
            cols[optional] = optional
    cols["split"] = "x_label"
    interactions[list(cols)].rename(columns=cols).to_csv(out / f"{name}.inter", sep="\t", index=False)
    if user_map is not None:
        user_map[["user_id", "user"]].rename(columns={"user": "userID"}).to_csv(
            out / "u_id_mapping.csv", sep="\t", index=False
        )
    if item_map is not None:
        item_map[["asin", "item"]].rename(columns={"item": "itemID"}).to_csv(
            out / "i_id_mapping.csv", sep="\t", index=False
        )
    for arr, fname in features:
        np.save(out / fname, np.ascontiguousarray(arr))
    return out
