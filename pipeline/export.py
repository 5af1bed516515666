"""Export a pipeline run as an MMRec dataset folder.

Why: MMRec ships 20+ baselines; writing its format (``<name>.inter``, id maps,
``image_feat.npy``/``text_feat.npy`` aligned with the exported item ids) lets
users run all of them on data this pipeline filtered, split and encoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.pipeline.errors import StageError


def export_mmrec_folder(summary: dict[str, Any], out: Path) -> list[str]:
    """Write the folder from a run summary (``PipelineResult.summary()``); returns file names."""
    from sand.pipeline.mmrec import write_mmrec_folder

    stages = summary.get("stages", {})
    if "interactions" not in stages:
        raise StageError("export mmrec needs the interactions stage: use --until interactions or later")
    inter_dir = Path(stages["interactions"]["artifact"])
    name = summary.get("dataset_name") or _dataset_name(inter_dir)
    features = {}
    for stage, fname in (("image_features", "image_feat.npy"), ("text_features", "text_feat.npy")):
        if stage in stages:
            features[fname.removesuffix(".npy")] = np.load(Path(stages[stage]["artifact"]) / fname)
    folder = write_mmrec_folder(
        out, name, pd.read_parquet(inter_dir / "interactions.parquet"),
        pd.read_parquet(inter_dir / "user_map.parquet"), pd.read_parquet(inter_dir / "item_map.parquet"),
        **features,
    )
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def _dataset_name(inter_dir: Path) -> str:
    import json

    manifest = json.loads((inter_dir / "manifest.json").read_text())
    return str(manifest.get("name") or "dataset")
