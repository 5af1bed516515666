"""Export a pipeline run as an MMRec dataset folder that MMRec-family code runs as is.

Why: MMRec ships 20+ baselines, and DualGNN, DRAGON and the SAND authors' code are built on it. Beside ``<name>.inter``,
id maps and feature arrays aligned with the item ids, such code expects the co-interaction user graph
``user_graph_dict.npy`` (DualGNN's preprocessing builds it by hand) and a dataset config ``<name>.yaml`` for
``src/configs/dataset/``: the export writes both, plus a ``sand_export.json`` manifest of where the folder came from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact, write_json_atomic
from sand.pipeline.dataset.mmrec import write_mmrec_folder

USER_GRAPH_FILE = "user_graph_dict.npy"
EXPORT_MANIFEST = "sand_export.json"
#: MMRec's DualGNN preprocessing keeps at most this many neighbours per user.
USER_GRAPH_MAX_NEIGHBOURS = 200
#: Published MMRec folders and the SAND authors' code assume image features of this width.
MMREC_IMAGE_DIM = 4096
_ROW_BLOCK = 4096  # users per block of the co-interaction product: bounds its memory


def co_interaction_user_graph(
    users: np.ndarray, items: np.ndarray, n_users: int, max_neighbours: int = USER_GRAPH_MAX_NEIGHBOURS
) -> dict[int, list[list[Any]]]:
    """Per user, up to ``max_neighbours`` users sharing training items with it, most shared first: MMRec's
    ``{user: [[neighbour ids], [shared-item counts as floats]]}`` for every user ``0..n_users-1``. Ties go to the
    smaller id, so the file is deterministic (MMRec's ``torch.topk`` leaves tie order open); ``A A^T`` is computed
    sparse in row blocks, so memory never grows as ``n_users^2``."""
    n_items = int(items.max()) + 1 if len(items) else 0
    adjacency = sp.csr_matrix(
        (np.ones(len(users), np.int64), (users.astype(np.int64), items.astype(np.int64))), shape=(n_users, n_items)
    )
    adjacency.sum_duplicates()
    adjacency.data[:] = 1  # a user who rated an item twice shares it once
    transposed = adjacency.T.tocsr()
    graph: dict[int, list[list[Any]]] = {}
    for start in range(0, n_users, _ROW_BLOCK):
        block = (adjacency[start : start + _ROW_BLOCK] @ transposed).tocsr()
        for row in range(block.shape[0]):
            user = start + row
            lo, hi = block.indptr[row], block.indptr[row + 1]
            neighbours, counts = block.indices[lo:hi], block.data[lo:hi]
            keep = neighbours != user
            neighbours, counts = neighbours[keep], counts[keep]
            order = np.lexsort((neighbours, -counts))[:max_neighbours]
            graph[user] = [neighbours[order].tolist(), counts[order].astype(np.float64).tolist()]
    return graph


def mmrec_dataset_yaml(name: str, files: set[str], has_timestamp: bool) -> str:
    """The ``src/configs/dataset/<name>.yaml`` MMRec reads: field names and the folder's file names."""
    config: dict[str, Any] = {"USER_ID_FIELD": "userID", "ITEM_ID_FIELD": "itemID"}
    if has_timestamp:
        config["TIME_FIELD"] = "timestamp"
    config["filter_out_cod_start_users"] = True
    config["inter_file_name"] = f"{name}.inter"
    for key, file in (("vision_feature_file", "image_feat.npy"), ("text_feature_file", "text_feat.npy"),
                      ("user_graph_dict_file", USER_GRAPH_FILE)):
        if file in files:
            config[key] = file
    config["field_separator"] = "\t"
    header = f"# MMRec dataset config written by `sand export mmrec`: copy to MMRec's src/configs/dataset/{name}.yaml\n"
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def image_width_warning(image_dim: int | None) -> str | None:
    """One line when the exported image features are not the 4,096-d MMRec folders assume, else None."""
    if image_dim is None or image_dim == MMREC_IMAGE_DIM:
        return None
    return (
        f"exported image features are {image_dim}-d; published MMRec folders and the SAND authors' code assume "
        f"{MMREC_IMAGE_DIM}-d (use --image-source amazon2014 or --set image_features.backbone=vgg16 for 4,096-d)"
    )


def export_mmrec_folder(artifacts: Mapping[str, Artifact], out: Path) -> dict[str, Any]:
    """Write the folder from a run's artifacts (stage name -> artifact, as the runner returns them) and return its
    manifest (also written as ``sand_export.json``): the files, the feature widths and warnings for the user."""
    if "interactions" not in artifacts:
        raise StageError("export mmrec needs the interactions stage: use --until interactions or later")
    inter = artifacts["interactions"]
    inter_dir = inter.path
    name = str(inter.manifest.get("name") or "dataset")
    stages = {"image_feat": "image_features", "text_feat": "text_features"}
    features = {key: np.load(artifacts[st].file(f"{key}.npy")) for key, st in stages.items() if st in artifacts}
    interactions = pd.read_parquet(inter_dir / "interactions.parquet")
    user_map = pd.read_parquet(inter_dir / "user_map.parquet")
    item_map = pd.read_parquet(inter_dir / "item_map.parquet")
    folder = write_mmrec_folder(out, name, interactions, user_map, item_map, **features)
    train = interactions[interactions["split"] == 0]
    n_users = max(len(user_map), int(interactions["user"].max()) + 1)
    graph = co_interaction_user_graph(train["user"].to_numpy(), train["item"].to_numpy(), n_users)
    np.save(folder / USER_GRAPH_FILE, np.array(graph, dtype=object), allow_pickle=True)
    files = {p.name for p in folder.iterdir() if p.is_file()}
    (folder / f"{name}.yaml").write_text(mmrec_dataset_yaml(name, files, "timestamp" in interactions.columns))
    image_dim = int(features["image_feat"].shape[1]) if "image_feat" in features else None
    warning = image_width_warning(image_dim)
    manifest = {
        "name": name, "interactions_artifact": str(inter_dir), "image_dim": image_dim,
        "text_dim": int(features["text_feat"].shape[1]) if "text_feat" in features else None,
        "warnings": [warning] if warning else [], "files": sorted({*files, f"{name}.yaml", EXPORT_MANIFEST}),
    }
    write_json_atomic(folder / EXPORT_MANIFEST, manifest)
    return manifest

