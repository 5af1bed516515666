"""The scopes benchmark's synthetic features: deterministic for a seed, built from the train split only."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_scopes  # noqa: E402

from sand.pipeline.dataset.split_data import SplitData  # noqa: E402

DIMS = {"image": 24, "text": 16}
RANKS = {"shared_rank": 4, "unique_rank": 2}


def _edges(rng: np.random.Generator, n_users: int, n_items: int, n: int) -> np.ndarray:
    keys = rng.choice(n_users * n_items, size=n, replace=False)
    return np.stack([keys // n_items, keys % n_items], 1).astype(np.int64)


@pytest.fixture()
def data() -> SplitData:
    rng = np.random.default_rng(0)
    edges = _edges(rng, 120, 80, 2_000)
    return SplitData(120, 80, edges[:1_600], edges[1_600:1_800], edges[1_800:])


def _features(data: SplitData, seed: int) -> dict[str, np.ndarray]:
    return bench_scopes.collaborative_features(data, seed, DIMS, **RANKS)


def test_same_seed_same_bytes_other_seed_other_features(data):
    first, again, other = _features(data, 3), _features(data, 3), _features(data, 4)
    assert {m: (x.shape, x.dtype) for m, x in first.items()} == {
        "image": ((80, 24), np.float32), "text": ((80, 16), np.float32)
    }
    assert all(first[m].tobytes() == again[m].tobytes() for m in DIMS)
    assert all(not np.allclose(first[m], other[m]) for m in DIMS)


def test_only_the_train_split_is_read(data):
    rng = np.random.default_rng(1)
    reference = _features(data, 3)
    other_holdout = replace(data, valid=_edges(rng, 120, 80, 300), test=_edges(rng, 120, 80, 300))
    fewer_train = replace(data, train=data.train[:-100])
    assert all(reference[m].tobytes() == _features(other_holdout, 3)[m].tobytes() for m in DIMS)
    assert all(not np.allclose(reference[m], _features(fewer_train, 3)[m]) for m in DIMS)


def test_modalities_share_the_collaborative_factor(data):
    """Items close in one modality are close in the other (the shared SVD factor), unless noise drowns it."""

    def agreement(noise: float) -> float:
        feats = bench_scopes.collaborative_features(
            data, 3, {"image": 128, "text": 96}, shared_rank=8, unique_rank=1, noise=noise
        )
        unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in feats.values()]
        upper = np.triu_indices(data.n_items, 1)
        return float(np.corrcoef(*((u @ u.T)[upper] for u in unit))[0, 1])

    shared, drowned = agreement(0.1), agreement(10.0)
    assert shared > 0.5 and drowned < shared / 3


def test_a_rank_the_matrix_cannot_hold_is_refused(data):
    with pytest.raises(ValueError, match="SVD rank"):
        bench_scopes.collaborative_features(data, 0, DIMS, shared_rank=70, unique_rank=10)


def test_the_informative_set_reads_the_held_out_splits(data):
    """bench_convergence's informative features change with valid/test; the control set does not."""
    rng = np.random.default_rng(2)
    other_holdout = replace(data, valid=_edges(rng, 120, 80, 300), test=_edges(rng, 120, 80, 300))
    every = ("train", "valid", "test")
    first = bench_scopes.collaborative_features(data, 3, DIMS, **RANKS, splits=every)
    moved = bench_scopes.collaborative_features(other_holdout, 3, DIMS, **RANKS, splits=every)
    assert all(not np.allclose(first[m], moved[m]) for m in DIMS)


def test_the_convergence_benchmark_writes_mmrec_folders_the_pipeline_reads(data, tmp_path):
    import bench_convergence

    from sand.pipeline.dataset.mmrec import read_mmrec_folder

    inter = tmp_path / "toy.inter"
    frames = [np.column_stack([e, np.full(len(e), code)]) for code, e in enumerate((data.train, data.valid,
                                                                                   data.test))]
    np.savetxt(inter, np.concatenate(frames), fmt="%d", delimiter="\t", header="userID\titemID\tx_label",
               comments="")
    bench_convergence.prepare(inter, tmp_path / "root", seed=0, dims=DIMS, **RANKS)
    for features in bench_convergence.FEATURE_SETS:
        folder = read_mmrec_folder(bench_convergence.dataset_folder(tmp_path / "root", features))
        assert (folder.n_users, folder.n_items, len(folder.inter)) == (120, 80, 2_000)
        assert np.load(folder.image_feat).shape == (80, 24)


def _row(cpu_profile: str, recall: float, h: float) -> dict:
    return {"features": "informative", "profile": cpu_profile, "label": "FREEDOM", "seed": 0, "state": "stopped",
            "valid_recall@20": recall, "h_median": h, "epochs": 10, "curve": [[1, recall]]}


def test_exported_runs_compare_paper_and_fast_on_their_own_cpu(tmp_path):
    """Runs kept beside the docs rebuild the comparison, pairing a fast run with the paper run of its machine only."""
    import json

    import bench_convergence

    files = []
    for cpu, paper_h, fast_h in (("AMD", 1.0, 0.25), ("Intel", 0.5, 0.1)):
        path = tmp_path / f"{cpu}.json"
        path.write_text(json.dumps({"cpu": cpu, "rows": [_row("default", 0.09, paper_h), _row("fast", 0.09, fast_h)]}))
        files.append(path)
    cpus, rows = bench_convergence.load_exported(files)
    assert cpus == ["AMD", "Intel"] and len(rows) == 4
    table = bench_convergence.comparison(rows)
    assert "| 4.0x |" in table and "| 5.0x |" in table  # 1.0/0.25 and 0.5/0.1, never 1.0/0.1
    assert "10.0x" not in table and "2.0x" not in table


def test_a_fast_run_with_its_own_lr_is_not_the_fast_profile():
    """Explicit settings win over the profile, so such a run is labelled apart and never paired as 'fast'."""
    import bench_convergence

    fast = {"model": "freedom", "profile": "fast", "batch_size": 8192, "lr": 0.002}
    assert bench_convergence._setting(fast) == "fast"
    assert bench_convergence._setting({**fast, "lr": 0.001}) == "fast, lr 0.001"
    assert bench_convergence._setting({**fast, "extra": {"train_features": False}}) == "fast, train_features=False"
    assert bench_convergence._setting({**fast, "eval_every": 2}) == "fast, eval every 2"
    assert bench_convergence._setting({**fast, "eval_every": 1}) == "fast"
    paper = {"model": "freedom", "profile": None, "batch_size": 2048, "lr": None}
    assert bench_convergence._setting(paper) == "default"
    assert bench_convergence._setting({"model": "vbpr", "profile": None, "batch_size": 8192, "lr": 0.004}) == (
        "batch 8192, lr 0.004")


def test_a_run_from_before_a_fix_to_its_model_is_labelled_with_its_revision():
    """FREEDOM+SAND runs trained before the scoring fusion's scale (revision 0) never pair with the fixed model's."""
    import bench_convergence

    before = {"model": "freedom-sand", "plugin_fusion": "scoring", "variant": "a"}
    assert bench_convergence._label(before) == "FREEDOM+SAND (scoring) [revision 0]"
    assert bench_convergence._label({**before, "model_revision": 1}) == "FREEDOM+SAND (scoring)"
    assert bench_convergence._label({"model": "freedom", "variant": None}) == "FREEDOM"
