"""Feature files an MMRec folder ships (``image_feat.npy`` / ``text_feat.npy``), used as they are: the text and image
stages share their check (one row per item) and the error when neither they nor the raw data (titles, URLs) exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact
from sand.pipeline.stage_context import StageContext


def imported_feature(inter: Artifact, name: str) -> Path | None:
    """The feature file ``name`` of the raw MMRec folder, if it ships one."""
    candidate = Path(inter.manifest["inputs"]["raw"]["path"]) / name
    return candidate if candidate.is_file() else None


def missing_feature_message(ctx: StageContext, inter: Artifact, modality: str, what: str) -> str:
    """Name the model that needs the features and the folder the user gave."""
    raw = Path(inter.manifest["inputs"]["raw"]["path"])
    try:
        origin = json.loads((raw / "manifest.json").read_text())["params"].get("mmrec_dir") or raw
    except (OSError, KeyError, json.JSONDecodeError):
        origin = raw
    return (f"model {ctx.cfg.train.model!r} needs {modality} features: the dataset has no {what} and {origin} "
            f"has no {modality}_feat.npy (add one, or train an ID-only model: --model bpr | lightgcn)")


def copy_imported(src: Path, out: Path, name: str, n_items: int) -> dict[str, Any]:
    """An imported feature file into the artifact, as float32, after checking it has one row per item."""
    feats = np.load(src, allow_pickle=False)
    if feats.ndim != 2 or feats.shape[0] != n_items:
        raise StageError(f"{src}: expected {n_items} rows (one per item), found shape {feats.shape}")
    np.save(out / name, feats.astype(np.float32, copy=False))
    return {"source": "imported", "file": str(src), "shape": list(feats.shape)}
