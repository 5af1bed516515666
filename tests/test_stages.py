"""Stages over an MMRec folder that holds only interactions: ID-only models train, multimodal
models name the missing feature file."""

from __future__ import annotations

import numpy as np
import pytest

from sand.pipeline.config import load_config
from sand.pipeline.errors import StageError
from sand.pipeline.runner import run_pipeline
from sand.pipeline.stages import Context


@pytest.fixture
def inter_only_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny"
    folder.mkdir()
    lines = ["userID\titemID\tx_label"]
    for user in range(30):
        items = rng.choice(25, 8, replace=False)
        labels = [0] * 6 + [1, 2]
        lines += [f"{user}\t{item}\t{label}" for item, label in zip(items, labels, strict=True)]
    (folder / "tiny.inter").write_text("\n".join(lines) + "\n")
    return folder


def _run(folder, root, *settings):
    cfg = load_config(None, {"data_root": str(root), "acquire.dataset": str(folder)}, list(settings))
    return run_pipeline(Context.create(cfg, progress=False))


def test_id_only_model_trains_on_interactions_alone(inter_only_folder, tmp_path):
    result = _run(inter_only_folder, tmp_path / "data", "train.model=lightgcn", "train.epochs=2")
    summary = result.summary()
    assert "text_features" not in summary["stages"] and "graphs" not in summary["stages"]
    assert summary["dataset"]["users"] == 30 and summary["dataset"]["valid"] == 30
    assert set(summary["metrics"]) == {"valid", "test"}


def test_multimodal_model_names_the_missing_feature_file(inter_only_folder, tmp_path):
    with pytest.raises(StageError, match=r"model 'sand' needs text features.*tiny has no text_feat\.npy"):
        _run(inter_only_folder, tmp_path / "data", "train.model=sand", "train.epochs=1")
