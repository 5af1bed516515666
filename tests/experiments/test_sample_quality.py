"""The bundled sample is a meaningful benchmark: SAND beats MF-BPR on validation Recall@20.

The sample plants item attributes that show in the images and the texts and users
who prefer some of them; an ID-only model sees ~9 training items per user, a
multimodal model generalises through the features. Runs the real stages (sample
generation, readers, MiniLM text features, CNN image features, kNN graphs, training).
"""

from __future__ import annotations

import pytest

from sand.pipeline.base.config import load_config
from sand.pipeline.runner import run_pipeline
from sand.pipeline.stages import Context

EPOCHS = ["train.epochs=8", "train.lr=0.001", "image_features.num_workers=0"]


@pytest.mark.slow
def test_sand_beats_mf_bpr_on_the_sample(tmp_path):
    def valid_recall(*settings: str) -> float:
        cfg = load_config(None, {"data_root": str(tmp_path)}, [*EPOCHS, *settings])
        result = run_pipeline(Context.create(cfg, progress=False), until="evaluate")
        return result.summary()["metrics"]["valid"]["recall@20"]

    bpr = valid_recall("train.model=bpr")
    sand = valid_recall("train.model=sand", "train.club_steps=10")
    assert sand > bpr * 1.3, (sand, bpr)
