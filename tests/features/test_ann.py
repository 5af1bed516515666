"""Approximate (faiss) item-item graphs: measured recall in the manifest, method choice and fallback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.features import ann

pytest.importorskip("faiss")


def clustered(n: int, d: int, seed: int = 0, centres: int = 60) -> np.ndarray:
    """Items around topic centres (like real embeddings, unlike isotropic noise)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32)


def test_exact_rows_equal_blocked_exact() -> None:
    from sand.pipeline.features.knn import knn_neighbours

    x = clustered(2500, 24, seed=3)
    rows = np.array([0, 7, 1234, 2499])
    for include_self in (True, False):
        want = knn_neighbours(x, 10, include_self=include_self, rows=rows)
        np.testing.assert_array_equal(ann.exact_rows(x, rows, 10, include_self), want)
        np.testing.assert_array_equal(want, knn_neighbours(x, 10, include_self=include_self)[rows])


@pytest.mark.parametrize("include_self", [True, False])
def test_faiss_graph_recall_measured_and_reached(include_self: bool) -> None:
    from sand.pipeline.features.knn import knn_neighbours

    x = clustered(20000, 32)
    got, report = ann.faiss_neighbours(x, 10, include_self=include_self, recall_sample=400, seed=0)
    assert got.shape == (20000, 10) and got.dtype == np.int64
    assert (np.diff(got, axis=1) > 0).all(), "rows sorted, no repeats"
    has_self = (got == np.arange(20000)[:, None]).any(axis=1)
    assert has_self.all() if include_self else not has_self.any()
    assert report.recall_at_k >= 0.95 and report.recall_rows == 200
    assert report.nlist == ann.default_nlist(20000) and report.tuning[-1]["nprobe"] == report.nprobe
    # The reported (sampled, held-out) recall matches the true recall over every row.
    exact = knn_neighbours(x, 10, include_self=include_self)
    true = ann.recall_at_k(got, exact, np.arange(20000))
    assert true >= 0.95 and abs(true - report.recall_at_k) < 0.03
    again, _ = ann.faiss_neighbours(x, 10, include_self=include_self, recall_sample=400, seed=0)
    np.testing.assert_array_equal(again, got)


def test_faiss_rows_search_only_those_rows_with_the_same_answer() -> None:
    """``rows=`` (what bench_graphs_scale times at a million items): the full graph's rows, nothing else."""
    x = clustered(6000, 16, seed=5)
    full, _ = ann.faiss_neighbours(x, 10, recall_sample=200, seed=1)
    rows = np.array([3, 17, 2048, 5999])
    part, report = ann.faiss_neighbours(x, 10, recall_sample=200, seed=1, rows=rows)
    np.testing.assert_array_equal(part, full[rows])
    assert report.recall_rows == 100
    with pytest.raises(ConfigError, match="rows"):
        ann.faiss_neighbours(x, 10, recall_sample=200, rows=np.array([6000]))


def test_float16_storage_halves_the_index_and_keeps_the_recall() -> None:
    """``graphs.faiss_storage=float16``: what makes 1M x 4,096 fit a 24 GB machine."""
    import faiss

    x = clustered(6000, 64, seed=7)
    want, full = ann.faiss_neighbours(x, 10, recall_sample=400, seed=2)
    got, half = ann.faiss_neighbours(x, 10, recall_sample=400, seed=2, storage="float16")
    assert "QT_fp16" in half.method and "IndexIVFFlat" in full.method
    assert half.recall_at_k >= 0.95 and abs(half.recall_at_k - full.recall_at_k) <= 0.01
    assert (got == want).all(axis=1).mean() >= 0.97  # the same neighbour lists, bar near-ties
    sizes = {}
    for storage in ("float32", "float16"):
        index = ann._ivf_index(faiss, 64, 16, storage)
        index.train(ann._normalised(x[:2000]))
        index.add(ann._normalised(x))
        sizes[storage] = faiss.serialize_index(index).nbytes
    assert sizes["float16"] < 0.6 * sizes["float32"]
    with pytest.raises(ConfigError, match="faiss_storage"):
        ann.faiss_neighbours(x, 10, storage="int8")


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_reserved_add_builds_the_index_plain_adds_build(storage: str) -> None:
    """Lists sized up front (no 1.6x growth slack) hold the same entries in the same order."""
    import faiss

    x = clustered(5000, 24, seed=9)
    plain, reserved = (ann._ivf_index(faiss, 24, 32, storage) for _ in range(2))
    for index in (plain, reserved):
        index.train(ann._normalised(x[:2000]))
    for start in range(0, 5000, 1500):  # several blocks, as the stage adds them
        plain.add(ann._normalised(x[start : start + 1500]))
    ann._add_reserved(reserved, x, progress=False)
    for list_no in range(32):
        assert reserved.invlists.list_size(list_no) == plain.invlists.list_size(list_no)
    plain.nprobe = reserved.nprobe = 4
    q = ann._normalised(x[::97])
    for a, b in zip(plain.search(q, 10), reserved.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fixed_nprobe_reports_low_recall_honestly() -> None:
    x = clustered(5000, 32, centres=5)
    _, report = ann.faiss_neighbours(x, 10, nlist=256, nprobe=1, recall_sample=200)
    assert report.nprobe == 1 and len(report.tuning) == 1
    assert report.recall_at_k < 0.95


def test_method_choice_and_fallback(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert ann.resolve_method("auto", 1000, 5000) == "exact"
    assert ann.resolve_method("auto", 10_000, 5000) == "faiss"
    assert ann.resolve_method("auto", 10_000, 5000, cuda=True) == "exact"
    assert ann.resolve_method("exact", 10**7, 5000) == "exact"
    monkeypatch.setattr(ann, "faiss_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sand.pipeline.features.ann"):
        assert ann.resolve_method("auto", 10_000, 5000) == "exact"
    assert "faiss is not installed" in caplog.text
    with pytest.raises(ConfigError) as info:
        ann.resolve_method("faiss", 10, 5000)
    assert "graphs.method=faiss" in str(info.value) and "\n" not in str(info.value)


def _feature_artifacts(tmp_path, n: int, dtype=np.float32):
    from sand.pipeline.base.store import Artifact

    arts = {}
    for i, (stage, name, d) in enumerate((("text_features", "text_feat.npy", 24), ("image_features",
                                                                                    "image_feat.npy", 40))):
        path = tmp_path / stage
        path.mkdir()
        np.save(path / name, clustered(n, d, seed=i).astype(dtype))
        arts[stage] = Artifact(stage, f"k{i}", path, {"shape": [n, d]})
    return arts["text_features"], arts["image_features"]


def test_graph_stage_records_recall_in_manifest(tmp_path) -> None:
    from sand.pipeline.base.config import load_config
    from sand.pipeline.features.graph_stage import run_graphs
    from sand.pipeline.features.knn import load_graph
    from sand.pipeline.stages import Context

    text, image = _feature_artifacts(tmp_path, 6000, dtype=np.float16)
    cfg = load_config(None, {"data_root": str(tmp_path / "root")}, ["graphs.auto_threshold=5000",
                                                                    "graphs.recall_sample=300"])
    outcome = run_graphs(Context.create(cfg, progress=False), text, image)
    manifest = json.loads((outcome.artifact.path / "manifest.json").read_text())
    assert manifest["method"] == "faiss" and manifest["params"]["method"] == "faiss"
    for modality in ("image", "text"):
        info = manifest["graphs"][modality]
        assert info["ann"]["recall_at_k"] >= 0.95 and info["ann"]["recall_rows"] == 150
        g = load_graph(outcome.artifact.path / f"{modality}_graph.npz")
        assert g.shape == (6000, 6000) and g.nnz == 6000 * 10
    # Below the threshold the same config builds the exact graph (a different artifact).
    small = load_config(None, {"data_root": str(tmp_path / "root")}, ["graphs.auto_threshold=100000"])
    exact = run_graphs(Context.create(small, progress=False), text, image)
    assert exact.artifact.manifest["method"] == "exact" and exact.artifact.key != outcome.artifact.key
    assert "ann" not in exact.artifact.manifest["graphs"]["text"]
    # float16 storage: another faiss graph (its own key), which the exact build ignores.
    half = ["graphs.auto_threshold=5000", "graphs.recall_sample=300", "graphs.faiss_storage=float16"]
    fp16 = run_graphs(Context.create(load_config(None, {"data_root": str(tmp_path / "root")}, half),
                                     progress=False), text, image)
    assert fp16.artifact.key not in (outcome.artifact.key, exact.artifact.key)
    assert "QT_fp16" in fp16.artifact.manifest["graphs"]["image"]["ann"]["method"]
    exact_half = ["graphs.auto_threshold=100000", "graphs.faiss_storage=float16"]
    again = run_graphs(Context.create(load_config(None, {"data_root": str(tmp_path / "root")}, exact_half),
                                      progress=False), text, image)
    assert again.artifact.key == exact.artifact.key
