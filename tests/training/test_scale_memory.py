"""Bounded memory at scale: features are memory-mapped into the trainer, evaluation streams users.

What users rely on: a million-item feature matrix is not copied into RAM by the training
stage (SAND keeps the mapping as its frozen buffer), and ranking a million items holds a
fixed number of scores at once, with the same metrics as one big block.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.training import evaluation


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of ``path`` (Linux /proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                out.append((lo, hi))
    return out


def _artifacts(tmp_path, n_users=40, n_items=60):
    from sand.pipeline.base.store import Artifact
    from sand.pipeline.features.knn import knn_graph, save_graph

    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, 6, replace=False)
        rows += [(u, int(i), s) for i, s in zip(items, [0, 0, 0, 0, 1, 2], strict=True)]
    inter_dir = tmp_path / "inter"
    inter_dir.mkdir()
    pd.DataFrame(rows, columns=["user", "item", "split"]).to_parquet(inter_dir / "interactions.parquet")
    inter = Artifact("interactions", "i", inter_dir, {"stats": {"users": n_users, "items": n_items}})
    feats, graphs_dir = {}, tmp_path / "graphs"
    graphs_dir.mkdir()
    for stage, name, d in (("text_features", "text", 16), ("image_features", "image", 24)):
        path = tmp_path / stage
        path.mkdir()
        x = rng.standard_normal((n_items, d)).astype(np.float32)
        np.save(path / f"{name}_feat.npy", x)
        save_graph(graphs_dir / f"{name}_graph.npz", knn_graph(x, 5))
        feats[stage] = Artifact(stage, name, path, {})
    feats["graphs"] = Artifact("graphs", "g", graphs_dir, {})
    return inter, feats


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_training_reads_features_memory_mapped_without_a_copy(tmp_path) -> None:
    from sand.pipeline.base.config import load_config
    from sand.pipeline.training.model_io import build_model_for, load_model_inputs

    inter, arts = _artifacts(tmp_path)
    cfg = load_config(None, {"data_root": str(tmp_path / "root")}, ["train.model=sand"])
    _, features, _ = load_model_inputs(inter, arts)
    for name, stage in (("text", "text_features"), ("image", "image_features")):
        ranges = _mapped_ranges(arts[stage].file(f"{name}_feat.npy"))
        ptr = features[name].data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} features are a copy, not the mapping"
    model, _ = build_model_for(cfg.train, inter, arts)
    ranges = _mapped_ranges(arts["text_features"].file("text_feat.npy"))
    assert any(lo <= model.feat_text.data_ptr() < hi for lo, hi in ranges), "the model holds its own copy"
    # Copy-on-write: writing into the tensor never changes the artifact.
    before = arts["text_features"].file("text_feat.npy").read_bytes()
    features["text"][0, 0] = 123.0
    assert arts["text_features"].file("text_feat.npy").read_bytes() == before


def test_evaluation_blocks_are_bounded_and_give_the_same_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert evaluation.users_per_block(4096, 1_000_000) == 67
    assert evaluation.users_per_block(4096, 7_050) == 4096
    assert evaluation.users_per_block(4096, 10**9) == 1
    rng = np.random.default_rng(1)
    n_users, n_items = 50, 300
    edges = np.stack([rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000)], axis=1)
    split = rng.choice(3, len(edges), p=[0.8, 0.1, 0.1])
    data = SplitData(n_users, n_items, edges[split == 0], edges[split == 1], edges[split == 2])
    ue, ie = torch.randn(n_users, 8), torch.randn(n_items, 8)
    whole = evaluation.evaluate_split(ue, ie, data, "test", ks=(10, 20))
    seen: list[int] = []
    real = evaluation._topk_rows

    def spy(scores, k):
        seen.append(scores.numel())
        return real(scores, k)

    monkeypatch.setattr(evaluation, "_topk_rows", spy)
    monkeypatch.setattr(evaluation, "MAX_SCORE_ELEMENTS", 7 * n_items)
    blocked = evaluation.evaluate_split(ue, ie, data, "test", ks=(10, 20))
    assert max(seen) <= 7 * n_items and len(seen) > 3
    assert blocked == pytest.approx(whole, abs=1e-12)
    top = evaluation.rank_topk(ue, ie, np.arange(n_users), sp.csr_matrix(data.csr("train")), 10)
    monkeypatch.setattr(evaluation, "MAX_SCORE_ELEMENTS", 1 << 26)
    np.testing.assert_array_equal(top, evaluation.rank_topk(ue, ie, np.arange(n_users), data.csr("train"), 10))
