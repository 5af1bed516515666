"""The ``graphs`` stage: item-item kNN graphs, exact for small catalogues, faiss IVF above ``graphs.auto_threshold``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.features.ann import faiss_neighbours, resolve_method
from sand.pipeline.features.knn import graph_from_neighbours, knn_neighbours, save_graph
from sand.pipeline.stage_context import PERFORMANCE_FIELDS, StageContext, key_params

#: Graph settings used only by the faiss method (left out of the key of an exact graph).
_FAISS_FIELDS = {"nlist", "nprobe", "target_recall", "recall_sample", "faiss_storage", "seed"}


def run_graphs(ctx: StageContext, text: Artifact, image: Artifact) -> StageOutcome:
    import torch  # lazy: torch takes seconds to import (asked only whether CUDA is present)

    gcfg = ctx.cfg.graphs
    n_items = np.load(text.file("text_feat.npy"), mmap_mode="r").shape[0]
    method = resolve_method(gcfg.method, int(n_items), gcfg.auto_threshold, cuda=torch.cuda.is_available())
    drop = PERFORMANCE_FIELDS | {"auto_threshold"} | (_FAISS_FIELDS if method == "exact" else set())
    params = {**key_params(gcfg, drop), "method": method}

    def build(out: Path) -> dict[str, Any]:
        stats = {}
        for modality, art, name in (("image", image, "image_feat.npy"), ("text", text, "text_feat.npy")):
            # Memory-mapped: the exact path makes one normalised float32 copy, faiss only its index.
            feats = np.load(art.file(name), mmap_mode="r", allow_pickle=False)
            info: dict[str, Any] = {"method": method}
            if method == "faiss":
                nbrs, report = faiss_neighbours(feats, gcfg.k, include_self=gcfg.include_self, nlist=gcfg.nlist,
                                                nprobe=gcfg.nprobe, target_recall=gcfg.target_recall,
                                                recall_sample=gcfg.recall_sample, seed=gcfg.seed,
                                                storage=gcfg.faiss_storage, progress=ctx.progress)
                info["ann"] = report.to_dict()
            else:
                nbrs = knn_neighbours(feats, gcfg.k, include_self=gcfg.include_self, block_size=gcfg.block_size,
                                      progress=ctx.progress)
            graph = graph_from_neighbours(nbrs)
            save_graph(out / f"{modality}_graph.npz", graph)
            stats[modality] = {"nnz": int(graph.nnz), "shape": list(graph.shape), **info}
        return {"graphs": stats, "method": method, "note": "image/text mix weight is applied at model time"}

    return ctx.run("graphs", params, {"text_features": text, "image_features": image}, build)
